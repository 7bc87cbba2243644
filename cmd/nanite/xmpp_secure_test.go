package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nanite-go/nanite/security"
	"github.com/nanite-go/nanite/testenv"
)

// TestXMPPAgentPolicyCommands runs nanite xmpp-agent --policy --ca and
// nanite call, plain and signed (--cert --key), against a private prosody.
func TestXMPPAgentPolicyCommands(t *testing.T) {
	const domain = "site-a.test"
	var accts []testenv.Account
	for _, u := range []string{"agent1", "alice", "bob"} {
		accts = append(accts, testenv.Account{User: u, Host: domain, Password: "pw-" + u})
	}
	p := testenv.RunProsody(t, testenv.ProsodyOptions{VirtualHosts: []string{domain}, Accounts: accts})
	dir := t.TempDir()
	file := func(name, content string) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(content+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	ca, err := security.NewCA("app-ca", 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := ca.Save(filepath.Join(dir, "ca")); err != nil {
		t.Fatal(err)
	}
	caFile := filepath.Join(dir, "ca", security.CACertFile)
	other, err := security.NewCA("app-ca", 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	save := func(ca *security.CA, name, base string) []string {
		id, err := ca.Issue(name, security.RoleClient, time.Hour, security.WithKEM(security.KEMX25519))
		if err != nil {
			t.Fatal(err)
		}
		crt, key := filepath.Join(dir, base+".crt"), filepath.Join(dir, base+".key")
		if err := id.Save(crt, key); err != nil {
			t.Fatal(err)
		}
		return []string{"--cert", crt, "--key", key}
	}
	ops1 := save(ca, "ops-1", "ops-1")
	forged := save(other, "ops-1", "forged")
	if err := other.Save(filepath.Join(dir, "other")); err != nil {
		t.Fatal(err)
	}
	otherCA := filepath.Join(dir, "other", security.CACertFile)
	policy := file("policy.yaml", `rules:
  - name: alice
    effect: allow
    callers: ["jid:alice@site-a.test"]
    services: ["/echo/*"]
  - name: ops
    effect: allow
    callers: ["ops-1"]
    services: ["/echo/say"]`)
	login := func(user string) []string {
		return []string{"--jid", user + "@" + domain + "/cli", "--password-file", file(user+".pw", "pw-"+user),
			"--server", p.C2SAddr(), "--ca-file", p.CAFile()}
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	daemon := make(chan result, 1)
	go func() {
		daemon <- runCLI(ctx, "", append(append([]string{"xmpp-agent"}, login("agent1")...),
			"--policy", policy, "--ca", caFile)...)
	}()
	call := func(user string, args ...string) result {
		c, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		return runCLI(c, "", append(append([]string{"call"}, login(user)...), args...)...)
	}
	agent1 := "agent1@" + domain + "/cli"
	var r result
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if r = call("alice", agent1, "/echo/say", `"hi"`); r.code == 0 {
			break
		}
	}
	if r.code != 0 || strings.TrimSpace(r.out) != `"hi"` {
		t.Fatalf("alice: %+v", r)
	}
	for _, c := range []struct {
		name string
		user string
		args []string
		code int
		want string
	}{
		{"bob by JID", "bob", []string{agent1, "/echo/say", `"x"`}, exitRemote, "not_authorized"},
		{"bob signed by ops-1", "bob", append([]string{agent1, "/echo/say", `"x"`, "--ca", caFile}, ops1...), 0, ""},
		{"bob signed by ops-1, other op", "bob", append([]string{agent1, "/echo/stream", `{"steps":1}`, "--ca", caFile}, ops1...),
			exitRemote, "default deny"},
		// Checked against its own CA by nanite call, then refused by the agent.
		{"bob signed by a forged ops-1", "bob", append([]string{agent1, "/echo/say", `"x"`, "--ca", otherCA}, forged...),
			exitRemote, "unknown signer"},
	} {
		r := call(c.user, c.args...)
		if r.code != c.code || !strings.Contains(r.errOut, c.want) {
			t.Errorf("%s: %+v, want exit %d and %q", c.name, r, c.code, c.want)
		}
	}
	// A certificate without --ca is a usage error of nanite call.
	if r := call("bob", append([]string{agent1, "/echo/say", `"x"`}, ops1...)...); r.code != exitUsage {
		t.Errorf("--cert without --ca: %+v", r)
	}
	cancel()
	if r := <-daemon; r.code != 0 {
		t.Errorf("agent: %+v", r)
	}
}

func TestXMPPAgentSecurityFlags(t *testing.T) {
	for _, c := range []struct {
		s    SecureSettings
		opts XMPPAgentOptions
	}{
		{SecureSettings{Policy: "p.yaml"}, XMPPAgentOptions{Allow: []string{"a@b"}}},
		{SecureSettings{}, XMPPAgentOptions{RequireSignature: true}},
		{SecureSettings{Revoked: "r.txt"}, XMPPAgentOptions{}},
		{SecureSettings{CA: "ca.crt", Seal: true}, XMPPAgentOptions{}},
		{SecureSettings{Policy: filepath.Join(t.TempDir(), "missing.yaml")}, XMPPAgentOptions{}},
	} {
		if _, err := loadXMPPAgentSecurity(c.s, &c.opts, nil); exitCode(err) != exitUsage {
			t.Errorf("%+v %+v: %v, want a usage error", c.s, c.opts, err)
		}
	}
	if m, err := loadXMPPAgentSecurity(SecureSettings{}, &XMPPAgentOptions{}, nil); m != nil || err != nil {
		t.Errorf("nothing: %v %v", m, err)
	}
}
