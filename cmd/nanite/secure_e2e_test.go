package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/testenv"
)

// pkiFixture is a CA and identities made with the nanite pki commands.
type pkiFixture struct {
	dir, ca string // the directory of the certificates, the CA certificate
}

func newPKI(t *testing.T, dir, caName string, ids map[string]string) pkiFixture {
	t.Helper()
	if r := runCLI(t.Context(), "", "pki", "init", "--dir", filepath.Join(dir, "ca"), "--name", caName); r.code != 0 {
		t.Fatalf("pki init: exit %d\n%s%s", r.code, r.out, r.errOut)
	}
	p := pkiFixture{dir: dir, ca: filepath.Join(dir, "ca", "ca.crt")}
	for name, role := range ids {
		r := runCLI(t.Context(), "", "pki", "issue", name, "--role", role, "--ca-dir", filepath.Join(dir, "ca"),
			"--out-dir", dir, "--kem", "x25519")
		if r.code != 0 {
			t.Fatalf("pki issue %s: exit %d\n%s%s", name, r.code, r.out, r.errOut)
		}
	}
	return p
}

// flags are the secure-mode flags of identity name.
func (p pkiFixture) flags(name string) []string {
	return []string{"--cert", filepath.Join(p.dir, name+".crt"), "--key", filepath.Join(p.dir, name+".key"), "--ca", p.ca}
}

// waitFor polls cond until it holds or 20 s pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestSecureEndToEnd: a CA and certificates made with "nanite pki", agents
// and a mapper daemon in secure mode with a policy, requests signed and
// sealed by client certificates: allowed, denied by the policy (exit 5,
// not_authorized), allowed after the policy is edited and SIGHUP is sent,
// changed by an edit the file watch picks up, a bad edit that keeps the
// policy in force, a revocation reloaded on SIGHUP; and the clear failures
// of a certificate of another CA, a plain requester, a wrong identity, a
// wrong role and missing settings.
func TestSecureEndToEnd(t *testing.T) {
	rabbit := testenv.Rabbit(t)
	url := rabbit.NewVhost(t)
	dir := t.TempDir()
	app := newPKI(t, filepath.Join(dir, "app"), "app-ca", map[string]string{
		"sec-agent": "agent", "watch-agent": "agent", "sec-mapper": "mapper", "ops-cli": "client", "guest-cli": "client"})
	other := newPKI(t, filepath.Join(dir, "other"), "other-ca", map[string]string{"ops-cli": "client"})

	const opsOnly = `rules:
  - name: ops
    effect: allow
    callers: ["ops-*"]
    services: ["/echo/*"]
  - name: introspection
    effect: allow
    callers: ["*"]
    services: ["/nanite/*"]
`
	policy := writeFile(t, filepath.Join(dir, "policy.yaml"), opsOnly, 0o644)
	watched := writeFile(t, filepath.Join(dir, "watched.yaml"), opsOnly, 0o644)
	revoked := writeFile(t, filepath.Join(dir, "revoked.txt"), "# nothing revoked yet\n", 0o644)

	ctx := t.Context()
	run := func(name string, args ...string) result {
		a := append([]string{args[0], "--url", url}, args[1:]...)
		if name != "" {
			a = append(a, app.flags(name)...)
		}
		return runCLI(ctx, "", a...)
	}
	expect := func(t *testing.T, r result, code int, stdout string, stderr ...string) {
		t.Helper()
		if r.code != code {
			t.Fatalf("exit %d, want %d\nstdout: %s\nstderr: %s", r.code, code, r.out, r.errOut)
		}
		if stdout != "" && r.out != stdout {
			t.Errorf("stdout %q, want %q\nstderr: %s", r.out, stdout, r.errOut)
		}
		for _, s := range stderr {
			if !strings.Contains(r.errOut, s) {
				t.Errorf("stderr does not say %q:\n%s", s, r.errOut)
			}
		}
	}
	hup := func(t *testing.T) {
		t.Helper()
		if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
	}

	// The agents' identities are their certificates' names (no
	// --identity). sec-agent reloads only on SIGHUP, watch-agent also
	// when its policy file changes.
	_, agentLog := startDaemon(t, append([]string{"agent", "--url", url, "--policy", policy, "--policy-watch", "0",
		"--revoked", revoked, "--shutdown-grace", "2s"}, app.flags("sec-agent")...)...)
	_, watchLog := startDaemon(t, append([]string{"agent", "--url", url, "--policy", watched, "--policy-watch", "100ms",
		"--shutdown-grace", "2s"}, app.flags("watch-agent")...)...)
	_, mapperLog := startDaemon(t, append([]string{"mapper", "--url", url, "--report-interval", "1h"}, app.flags("sec-mapper")...)...)
	waitFor(t, "the secure agents to register", func() bool {
		r := run("ops-cli", "agents", "--json", "--wait", "300ms")
		var agents []nanite.AgentState
		_ = json.Unmarshal([]byte(r.out), &agents)
		return r.code == 0 && len(agents) == 2
	})
	if s := agentLog.String(); !strings.Contains(s, `msg="secure mode" identity=sec-agent role=agent`) ||
		!strings.Contains(s, "rules=2") || strings.Contains(s, "PRIVATE") {
		t.Errorf("agent log:\n%s", s)
	}
	if !strings.Contains(mapperLog.String(), `msg="secure mode" identity=sec-mapper role=mapper`) {
		t.Errorf("mapper log:\n%s", mapperLog.String())
	}
	to := func(agent string) string { return "--target=" + agent }

	t.Run("allowed, sealed", func(t *testing.T) {
		expect(t, run("ops-cli", "request", "--seal", "/echo/say", `"hi"`), 0, "\"hi\"\n")
		expect(t, run("ops-cli", "request", "--seal", "--selector", "all", "/echo/say", `"hi"`), 0, "sec-agent: \"hi\"\nwatch-agent: \"hi\"\n")
		expect(t, run("ops-cli", "request", to("sec-agent"), "/echo/say", `"unsealed"`), 0, "\"unsealed\"\n")
		expect(t, run("ops-cli", "push", "--seal", "/echo/say", `"pushed"`), 0, "")
	})
	t.Run("denied by the policy", func(t *testing.T) {
		expect(t, run("guest-cli", "request", "--seal", "/echo/say", `"hi"`), exitRemote, "", "not_authorized", "default deny")
		expect(t, run("guest-cli", "request", "/nanite/info"), 0, "")
	})
	t.Run("policy reloaded on SIGHUP", func(t *testing.T) {
		writeFile(t, policy, `rules:
  - name: ops
    effect: allow
    callers: ["ops-*", "guest-*"]
    services: ["/echo/*"]
`, 0o644)
		time.Sleep(300 * time.Millisecond) // not reloaded without SIGHUP (--policy-watch 0)
		expect(t, run("guest-cli", "request", to("sec-agent"), "/echo/say", `"not yet"`), exitRemote, "", "not_authorized")
		hup(t)
		waitFor(t, "the reload", func() bool { return strings.Contains(agentLog.String(), "rules=1") })
		if !strings.Contains(agentLog.String(), "SIGHUP: reloading") {
			t.Errorf("agent log:\n%s", agentLog.String())
		}
		expect(t, run("guest-cli", "request", to("sec-agent"), "--seal", "/echo/say", `"now"`), 0, "\"now\"\n")
		expect(t, run("guest-cli", "request", to("watch-agent"), "/echo/say", `"not there"`), exitRemote, "", "not_authorized")
	})
	t.Run("policy reloaded on change", func(t *testing.T) {
		writeFile(t, watched, opsOnly+`  - name: guests
    effect: allow
    callers: ["guest-*"]
    services: ["/echo/say"]
`, 0o644)
		waitFor(t, "the watch", func() bool { return strings.Contains(watchLog.String(), "rules=3") })
		expect(t, run("guest-cli", "request", to("watch-agent"), "/echo/say", `"watched"`), 0, "\"watched\"\n")
		// A bad file is logged and the policy in force stays.
		writeFile(t, watched, "rules:\n  - effect: allow\n    callers: [\"role:admin\"]\n    services: [\"*\"]\n", 0o644)
		waitFor(t, "the rejected reload", func() bool {
			return strings.Contains(watchLog.String(), "policy not reloaded, keeping the previous one")
		})
		if !strings.Contains(watchLog.String(), `unknown role \"admin\"`) {
			t.Errorf("the log does not say what is wrong:\n%s", watchLog.String())
		}
		expect(t, run("guest-cli", "request", to("watch-agent"), "/echo/say", `"still"`), 0, "\"still\"\n")
		expect(t, run("guest-cli", "request", to("watch-agent"), "/echo/time"), exitRemote, "", "not_authorized")
	})
	t.Run("revocation reloaded on SIGHUP", func(t *testing.T) {
		writeFile(t, revoked, "name ops-cli\n", 0o644)
		hup(t)
		waitFor(t, "the reload", func() bool { return strings.Contains(agentLog.String(), "revocation list loaded") })
		// sec-agent ignores a revoked requester: it does not even answer
		// its mapper's call for registrations. watch-agent's list is empty.
		expect(t, run("ops-cli", "request", "--selector", "all", "/echo/say", "1"), 0, "watch-agent: 1\n")
		if !strings.Contains(agentLog.String(), `msg="refused packet" agent=sec-agent reason=revoked`) {
			t.Errorf("agent log:\n%s", agentLog.String())
		}
		// A requester given the list refuses its own revoked certificate.
		expect(t, run("ops-cli", "request", "--revoked", revoked, "/echo/say"), exitUsage, "", "revoked")
		writeFile(t, revoked, "", 0o644)
		hup(t)
		waitFor(t, "the second reload", func() bool { return strings.Count(agentLog.String(), "revocation list loaded") >= 2 })
		expect(t, run("ops-cli", "request", "--selector", "all", "/echo/say", "2"), 0, "sec-agent: 2\nwatch-agent: 2\n")
	})
	t.Run("certificate of another CA", func(t *testing.T) {
		// With the application's CA: refused before anything is sent.
		r := runCLI(ctx, "", "request", "--url", url, "--cert", filepath.Join(other.dir, "ops-cli.crt"),
			"--key", filepath.Join(other.dir, "ops-cli.key"), "--ca", app.ca, "/echo/say")
		expect(t, r, exitUsage, "", `"ops-cli"`, "unknown signer")
		// With its own CA: the agents' certificates are unknown to it, and
		// it says so.
		r = runCLI(ctx, "", append([]string{"request", "--url", url, "/echo/say"}, other.flags("ops-cli")...)...)
		expect(t, r, exitNoAgent, "", "unknown_signer", "is --ca the CA that issued the agents' certificates?")
	})
	t.Run("plain requester", func(t *testing.T) {
		expect(t, run("", "request", "/echo/say"), exitNoAgent, "", "are the agents in secure mode?")
	})
	t.Run("configuration errors", func(t *testing.T) {
		expect(t, run("sec-agent", "agent", "--identity", "someone-else"), exitUsage, "",
			`--identity "someone-else" is not the name of the certificate`)
		expect(t, run("ops-cli", "agent"), exitUsage, "", "nanite agent needs a certificate with the role agent", "client certificate")
		expect(t, run("ops-cli", "mapper"), exitUsage, "", "nanite mapper needs a certificate with the role mapper")
		expect(t, run("sec-agent", "request", "/echo/say"), exitUsage, "", "client or mapper")
		expect(t, run("", "agent", "--policy", policy), exitUsage, "", "--policy given without --cert and --key")
		expect(t, run("", "request", "--seal", "/echo/say"), exitUsage, "", "--seal given without --cert and --key")
		expect(t, run("", "request", "--cert", filepath.Join(app.dir, "ops-cli.crt"), "--key", filepath.Join(app.dir, "ops-cli.key"),
			"/echo/say"), exitUsage, "", "needs --ca")
		expect(t, run("", "request", "--cert", filepath.Join(app.dir, "ops-cli.crt"), "--key", filepath.Join(app.dir, "guest-cli.key"),
			"--ca", app.ca, "/echo/say"), exitUsage, "", "bad key")
		bad := writeFile(t, filepath.Join(dir, "bad.yaml"), "rules:\n  - effect: maybe\n    callers: [\"*\"]\n    services: [\"*\"]\n", 0o644)
		expect(t, run("sec-agent", "agent", "--policy", bad), exitUsage, "", "rule 1", "effect")
	})
}

// TestDevSecure: "nanite dev --secure" runs its cluster in secure mode and
// prints the client certificate to use; its agents enforce --policy.
func TestDevSecure(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a RabbitMQ node of its own")
	}
	testenv.Require(t, "rabbitmq-server", "rabbitmqctl")
	policy := writeFile(t, filepath.Join(t.TempDir(), "policy.yaml"),
		"rules:\n  - effect: allow\n    callers: [\"role:client\"]\n    services: [\"/echo/say\", \"/nanite/*\"]\n", 0o644)
	out, errOut := startDaemon(t, "dev", "--agents", "2", "--secure", "--policy", policy)
	exports := regexp.MustCompile(`(?m)^  export NANITE_CERT='(\S+)' NANITE_KEY='(\S+)' NANITE_CA='(\S+)'$`)
	var url string
	var m []string
	waitFor(t, "dev to start", func() bool {
		s := out.String()
		if !strings.Contains(s, "Press Ctrl-C") {
			return false
		}
		if u := regexp.MustCompile(`(?m)^  broker\s+(\S+)$`).FindStringSubmatch(s); u != nil {
			url = u[1]
		}
		m = exports.FindStringSubmatch(s)
		return true
	})
	if url == "" || m == nil || !strings.Contains(out.String(), "  secure      signed packets; CA and certificates in ") {
		t.Fatalf("dev output:\n%s\n%s", out.String(), errOut.String())
	}
	secure := []string{"--url", url, "--cert", m[1], "--key", m[2], "--ca", m[3]}
	r := runCLI(t.Context(), "", append([]string{"request", "--selector", "all", "--seal", "/echo/say", `"hi"`}, secure...)...)
	if r.code != 0 || r.out != "dev-agent-1: \"hi\"\ndev-agent-2: \"hi\"\n" {
		t.Errorf("request: exit %d, %q %q", r.code, r.out, r.errOut)
	}
	r = runCLI(t.Context(), "", append([]string{"request", "/echo/time"}, secure...)...)
	if r.code != exitRemote || !strings.Contains(r.errOut, "not_authorized") {
		t.Errorf("denied request: exit %d, %q %q", r.code, r.out, r.errOut)
	}
	r = runCLI(t.Context(), "", "request", "--url", url, "/echo/say")
	if r.code != exitNoAgent {
		t.Errorf("plain request: exit %d, %q %q", r.code, r.out, r.errOut)
	}
}
