package main

import (
	"bytes"
	"encoding/json"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"

	"github.com/nanite-go/nanite/security"
)

// TestSecureSettings: flag > environment > config file > default for every
// secure-mode setting, paths in the config file relative to it, and the
// errors a user can make.
func TestSecureSettings(t *testing.T) {
	dir := t.TempDir()
	conf := writeFile(t, filepath.Join(dir, "config.yaml"), `secure:
  cert: f.crt
  key: keys/f.key
  ca: /etc/nanite/ca.crt
  revoked: f-revoked.txt
  policy: f-policy.yaml
  seal: true
  replay_window: 90s
`, 0o600)
	resolve := func(flags, env map[string]string) (SecureSettings, error) {
		if flags == nil {
			flags = map[string]string{}
		}
		flags["config"] = conf
		s, err := resolveSettings(settingsInput{Flags: flags, ReadFile: os.ReadFile,
			LookupEnv: func(k string) (string, bool) { v, ok := env[k]; return v, ok }})
		if err != nil {
			return SecureSettings{}, err
		}
		return s.Secure, nil
	}
	fromFile := SecureSettings{Cert: filepath.Join(dir, "f.crt"), Key: filepath.Join(dir, "keys/f.key"), CA: "/etc/nanite/ca.crt",
		Revoked: filepath.Join(dir, "f-revoked.txt"), Policy: filepath.Join(dir, "f-policy.yaml"), Seal: true, ReplayWindow: 90 * time.Second}
	env := map[string]string{envCert: "e.crt", envKey: "e.key", envCA: "e-ca.crt", envRevoked: "e-revoked.txt",
		envPolicy: "e-policy.yaml", envSeal: "false", envReplayWindow: "30s"}
	fromEnv := SecureSettings{Cert: "e.crt", Key: "e.key", CA: "e-ca.crt", Revoked: "e-revoked.txt", Policy: "e-policy.yaml",
		ReplayWindow: 30 * time.Second}
	flags := map[string]string{"cert": "x.crt", "key": "x.key", "ca": "x-ca.crt", "revoked": "x-revoked.txt",
		"policy": "x-policy.yaml", "seal": "true", "replay-window": "2m0s"}
	fromFlags := SecureSettings{Cert: "x.crt", Key: "x.key", CA: "x-ca.crt", Revoked: "x-revoked.txt", Policy: "x-policy.yaml",
		Seal: true, ReplayWindow: 2 * time.Minute}

	for _, tc := range []struct {
		name        string
		flags, env  map[string]string
		want        SecureSettings
		wantNoConf  bool // resolve without the config file
		wantEnabled bool
	}{
		{name: "config file", want: fromFile, wantEnabled: true},
		{name: "env beats file", env: env, want: fromEnv, wantEnabled: true},
		{name: "flags beat env and file", flags: flags, env: env, want: fromFlags, wantEnabled: true},
		{name: "--seal=false beats env and file", flags: map[string]string{"seal": "false"}, env: map[string]string{envSeal: "1"},
			want: func() SecureSettings { s := fromFile; s.Seal = false; return s }(), wantEnabled: true},
		{name: "env seal beats file", env: map[string]string{envSeal: "false"},
			want: func() SecureSettings { s := fromFile; s.Seal = false; return s }(), wantEnabled: true},
		{name: "defaults", wantNoConf: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got SecureSettings
			var err error
			if tc.wantNoConf {
				var s *Settings
				s, err = resolveSettings(settingsInput{Flags: tc.flags})
				if s != nil {
					got = s.Secure
				}
			} else {
				got, err = resolve(tc.flags, tc.env)
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Errorf("got  %+v\nwant %+v", got, tc.want)
			}
			if got.Enabled() != tc.wantEnabled {
				t.Errorf("Enabled() = %v", got.Enabled())
			}
		})
	}

	for name, in := range map[string]settingsInput{
		"cert without key":   {Flags: map[string]string{"cert": "a.crt"}},
		"key without cert":   {LookupEnv: func(k string) (string, bool) { return "a.key", k == envKey }},
		"bad NANITE_SEAL":    {LookupEnv: func(k string) (string, bool) { return "sometimes", k == envSeal }},
		"bad window":         {LookupEnv: func(k string) (string, bool) { return "soon", k == envReplayWindow }},
		"negative window":    {Flags: map[string]string{"replay-window": "-1s"}},
		"unknown file key":   {Flags: map[string]string{"config": writeFile(t, filepath.Join(dir, "typo.yaml"), "secure:\n  sael: true\n", 0o600)}},
		"file seal not bool": {Flags: map[string]string{"config": writeFile(t, filepath.Join(dir, "seal.yaml"), "secure:\n  seal: [x]\n", 0o600)}},
	} {
		in.ReadFile = os.ReadFile
		if _, err := resolveSettings(in); exitCode(err) != exitUsage {
			t.Errorf("%s: %v, want a usage error", name, err)
		}
	}
}

// TestSecureFlagsReachSettings: the secure-mode flags are global (every
// command has them) and reach the settings.
func TestSecureFlagsReachSettings(t *testing.T) {
	for _, cmdName := range []string{"agent", "mapper", "request", "agents", "policy check"} {
		f, _, _ := testFactory("", map[string]string{envCA: "env-ca.crt", envSeal: "true"})
		root := NewCmdRoot(f)
		sub, _, err := root.Find(strings.Fields(cmdName))
		if err != nil {
			t.Fatal(err)
		}
		var got *Settings
		sub.RunE = func(*cobra.Command, []string) error {
			var err error
			got, err = f.Settings()
			return err
		}
		sub.Args = nil
		root.SetArgs(append(strings.Fields(cmdName), "--cert", "c.crt", "--key", "c.key", "--policy", "p.yaml",
			"--revoked", "r.txt", "--replay-window", "5s", "--seal=false"))
		if err := root.ExecuteContext(t.Context()); err != nil {
			t.Fatalf("%s: %v", cmdName, err)
		}
		want := SecureSettings{Cert: "c.crt", Key: "c.key", CA: "env-ca.crt", Revoked: "r.txt", Policy: "p.yaml", ReplayWindow: 5 * time.Second}
		if got.Secure != want {
			t.Errorf("%s: %+v", cmdName, got.Secure)
		}
	}
}

// TestSecureLoad: what a command gets from the settings, and the clear
// errors of a wrong setup, without a broker.
func TestSecureLoad(t *testing.T) {
	dir := t.TempDir()
	ca, err := security.NewCA("app-ca", 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := ca.Save(filepath.Join(dir, "ca")); err != nil {
		t.Fatal(err)
	}
	otherCA, _ := security.NewCA("other-ca", 24*time.Hour)
	caFile := filepath.Join(dir, "ca", security.CACertFile)
	issue := func(c *security.CA, name string, role security.Role) (string, string) {
		id, err := c.Issue(name, role, time.Hour, security.WithKEM(security.KEMX25519))
		if err != nil {
			t.Fatal(err)
		}
		crt, key := filepath.Join(dir, c.Name+"-"+name+".crt"), filepath.Join(dir, c.Name+"-"+name+".key")
		if err := id.Save(crt, key); err != nil {
			t.Fatal(err)
		}
		return crt, key
	}
	agentCrt, agentKey := issue(ca, "web-1", security.RoleAgent)
	clientCrt, clientKey := issue(ca, "ops", security.RoleClient)
	foreignCrt, foreignKey := issue(otherCA, "ops", security.RoleClient)
	policy := writeFile(t, filepath.Join(dir, "policy.yaml"), "rules:\n  - effect: allow\n    callers: [\"*\"]\n    services: [\"*\"]\n", 0o644)
	revoked := writeFile(t, filepath.Join(dir, "revoked.txt"), "name ops\n", 0o644)

	// Plain mode.
	m, err := SecureSettings{}.load(secureForAgent, nil)
	if m != nil || err != nil {
		t.Errorf("plain: %v %v", m, err)
	}
	// Policy for a requester: not its business, ignored.
	if m, err := (SecureSettings{Policy: policy}).load(secureForClient, nil); m != nil || err != nil {
		t.Errorf("policy for a client in plain mode: %v %v", m, err)
	}

	// An agent with everything.
	s := SecureSettings{Cert: agentCrt, Key: agentKey, CA: caFile, Policy: policy, ReplayWindow: 30 * time.Second}
	m, err = s.load(secureForAgent, nil)
	if err != nil {
		t.Fatal(err)
	}
	if m.Identity.Name != "web-1" || m.Verifier.Window() != 30*time.Second || m.Policy == nil || m.policy == nil || m.Seal {
		t.Errorf("agent: %+v", m)
	}
	if id, err := m.identity(""); id != "web-1" || err != nil {
		t.Errorf("default identity %q %v", id, err)
	}
	if id, err := m.identity("web-1"); id != "web-1" || err != nil {
		t.Errorf("same identity %q %v", id, err)
	}
	if _, err := m.identity("web-2"); exitCode(err) != exitUsage || !strings.Contains(err.Error(), `"web-1"`) {
		t.Errorf("other identity: %v", err)
	}
	// A requester: no policy even when one is configured; seal.
	s = SecureSettings{Cert: clientCrt, Key: clientKey, CA: caFile, Policy: policy, Seal: true}
	m, err = s.load(secureForClient, nil)
	if err != nil {
		t.Fatal(err)
	}
	if m.Policy != nil || !m.Seal || m.nanite() != m.Secure || m.Verifier.Window() != security.DefaultWindow {
		t.Errorf("client: %+v", m)
	}
	if (*secureMode)(nil).nanite() != nil {
		t.Error("nil secureMode")
	}

	for _, tc := range []struct {
		name string
		s    SecureSettings
		use  secureUse
		want []string
	}{
		{"ca without cert", SecureSettings{CA: caFile}, secureForClient, []string{"--ca given without --cert and --key"}},
		{"seal and policy without cert", SecureSettings{Seal: true, Policy: policy}, secureForAgent, []string{"--policy, --seal given without"}},
		{"no ca", SecureSettings{Cert: clientCrt, Key: clientKey}, secureForClient, []string{"needs --ca"}},
		{"missing cert", SecureSettings{Cert: filepath.Join(dir, "nope.crt"), Key: clientKey, CA: caFile}, secureForClient, []string{"nope.crt"}},
		{"key of another", SecureSettings{Cert: clientCrt, Key: agentKey, CA: caFile}, secureForClient, []string{"bad key"}},
		{"another CA", SecureSettings{Cert: foreignCrt, Key: foreignKey, CA: caFile}, secureForClient, []string{"unknown signer", `"ops"`, caFile}},
		{"CA file not a CA", SecureSettings{Cert: clientCrt, Key: clientKey, CA: policy}, secureForClient, []string{"--ca " + policy}},
		{"revoked", SecureSettings{Cert: clientCrt, Key: clientKey, CA: caFile, Revoked: revoked}, secureForClient, []string{"revoked"}},
		{"bad revocation list", SecureSettings{Cert: clientCrt, Key: clientKey, CA: caFile, Revoked: policy}, secureForClient, []string{"--revoked"}},
		{"agent with a client certificate", SecureSettings{Cert: clientCrt, Key: clientKey, CA: caFile}, secureForAgent,
			[]string{"nanite agent needs a certificate with the role agent", "client certificate", "--role agent"}},
		{"requester with an agent certificate", SecureSettings{Cert: agentCrt, Key: agentKey, CA: caFile}, secureForClient,
			[]string{"role client or mapper"}},
		{"bad policy", SecureSettings{Cert: agentCrt, Key: agentKey, CA: caFile, Policy: revoked}, secureForAgent, []string{"--policy", "revoked.txt"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := tc.s.load(tc.use, nil)
			if m != nil || exitCode(err) != exitUsage {
				t.Fatalf("got %v, %v; want a usage error", m, err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
		})
	}
}

func TestRejectHint(t *testing.T) {
	if h := rejectHint(map[string]int64{"agents": 3, "rejected_replay": 0}, true); h != "" {
		t.Errorf("no rejections: %q", h)
	}
	h := rejectHint(map[string]int64{"rejected_unknown_signer": 2, "rejected_bad_signature": 1}, true)
	if h != "3 packets from the cluster were refused (bad_signature 1, unknown_signer 2): is --ca the CA that issued the agents' certificates?" {
		t.Errorf("secure: %q", h)
	}
	if h := rejectHint(map[string]int64{"rejected_malformed": 4}, false); !strings.Contains(h, "are the agents in secure mode?") {
		t.Errorf("plain: %q", h)
	}
}

func TestParseValidity(t *testing.T) {
	for in, want := range map[string]time.Duration{"10y": 3650 * 24 * time.Hour, "1y": 365 * 24 * time.Hour,
		"90d": 90 * 24 * time.Hour, "720h": 720 * time.Hour, "90m": 90 * time.Minute} {
		if got, err := parseValidity(in); got != want || err != nil {
			t.Errorf("%s: %v %v", in, got, err)
		}
	}
	for _, in := range []string{"", "y", "1.5y", "-1d", "0h", "soon", "101y"} {
		if _, err := parseValidity(in); exitCode(err) != exitUsage {
			t.Errorf("%q: %v", in, err)
		}
	}
}

// TestPKICommands: init, issue and show round trip through the files, with
// their modes, without ever printing a key; nothing is overwritten.
func TestPKICommands(t *testing.T) {
	dir := t.TempDir()
	ctx := t.Context()
	caDir := filepath.Join(dir, "ca")
	r := runCLI(ctx, "", "pki", "init", "--dir", caDir, "--name", "shop-ca", "--validity", "2y")
	if r.code != 0 || !strings.Contains(r.out, "name:        shop-ca\nkind:        CA\n") {
		t.Fatalf("init: exit %d\n%s%s", r.code, r.out, r.errOut)
	}
	mode := func(p string) os.FileMode {
		t.Helper()
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		return fi.Mode().Perm()
	}
	if m := mode(caDir); m != 0o700 {
		t.Errorf("CA directory mode %o", m)
	}
	if m := mode(filepath.Join(caDir, "ca.key")); m != 0o600 {
		t.Errorf("ca.key mode %o", m)
	}
	if m := mode(filepath.Join(caDir, "ca.crt")); m != 0o644 {
		t.Errorf("ca.crt mode %o", m)
	}
	caKey, _ := os.ReadFile(filepath.Join(caDir, "ca.key"))
	before := string(caKey)

	// Never overwrite a CA.
	r = runCLI(ctx, "", "pki", "init", "--dir", caDir)
	if r.code == 0 || !strings.Contains(r.errOut, "refusing to overwrite") {
		t.Errorf("second init: exit %d\n%s", r.code, r.errOut)
	}
	if b, _ := os.ReadFile(filepath.Join(caDir, "ca.key")); string(b) != before {
		t.Error("the CA key was overwritten")
	}

	out := filepath.Join(dir, "ids")
	r = runCLI(ctx, "", "pki", "issue", "web-1", "--role", "agent", "--ca-dir", caDir, "--out-dir", out, "--validity", "30d")
	if r.code != 0 {
		t.Fatalf("issue: exit %d\n%s%s", r.code, r.out, r.errOut)
	}
	crt, key := filepath.Join(out, "web-1.crt"), filepath.Join(out, "web-1.key")
	if m := mode(key); m != 0o600 {
		t.Errorf("key mode %o", m)
	}
	if m := mode(crt); m != 0o644 {
		t.Errorf("certificate mode %o", m)
	}
	if m := mode(out); m != 0o700 {
		t.Errorf("out dir mode %o", m)
	}
	id, err := security.LoadIdentity(crt, key)
	if err != nil {
		t.Fatal(err)
	}
	if id.Name != "web-1" || id.Role != security.RoleAgent || id.SealKey().KEM() != security.KEMHybrid ||
		id.Cert.NotAfter.Sub(id.Cert.NotBefore) != 30*24*time.Hour+time.Minute {
		t.Errorf("identity %v, KEM %v, validity %v", id, id.SealKey().KEM(), id.Cert.NotAfter.Sub(id.Cert.NotBefore))
	}
	keyPEM, _ := os.ReadFile(key)
	keyBody := pemBodies(t, keyPEM)
	assertNoKey := func(what, s string) {
		t.Helper()
		for _, b := range append(keyBody, pemBodies(t, caKey)...) {
			if strings.Contains(s, b) {
				t.Errorf("%s prints a key:\n%s", what, s)
			}
		}
		if strings.Contains(s, "PRIVATE KEY-----") {
			t.Errorf("%s prints a PEM key:\n%s", what, s)
		}
	}
	assertNoKey("issue", r.out+r.errOut)

	// Existing files are kept unless --force.
	r = runCLI(ctx, "", "pki", "issue", "web-1", "--role", "agent", "--ca-dir", caDir, "--out-dir", out)
	if r.code == 0 || !strings.Contains(r.errOut, "--force") {
		t.Errorf("issue again: exit %d %s", r.code, r.errOut)
	}
	if b, _ := os.ReadFile(key); !bytes.Equal(b, keyPEM) {
		t.Error("the key was overwritten without --force")
	}
	r = runCLI(ctx, "", "pki", "issue", "web-1", "--role", "client", "--ca-dir", caDir, "--out-dir", out, "--force", "--kem", "x25519")
	if r.code != 0 {
		t.Fatalf("issue --force: exit %d %s", r.code, r.errOut)
	}
	if id, err := security.LoadIdentity(crt, key); err != nil || id.Role != security.RoleClient || id.SealKey().KEM() != security.KEMX25519 {
		t.Errorf("reissued: %v %v", id, err)
	}
	keyPEM, _ = os.ReadFile(key)
	keyBody = pemBodies(t, keyPEM)

	// show: the certificate, the CA, the key files (named, not printed).
	r = runCLI(ctx, "", "pki", "show", crt, key, filepath.Join(caDir, "ca.crt"), filepath.Join(caDir, "ca.key"))
	if r.code != 0 {
		t.Fatalf("show: exit %d\n%s%s", r.code, r.out, r.errOut)
	}
	info, _ := security.InspectCert(id.Cert)
	for _, want := range []string{
		crt + `: the client certificate of "web-1"` + "\nname:        web-1\nrole:        client\nissuer:      shop-ca\n",
		"sealing key: x25519\n",
		key + ": the private keys of an identity (an Ed25519 signing key and an HPKE sealing key; not shown)\n",
		filepath.Join(caDir, "ca.crt") + `: the CA certificate of "shop-ca"` + "\nname:        shop-ca\nkind:        CA\n",
		filepath.Join(caDir, "ca.key") + ": the private key of a CA (an Ed25519 signing key; not shown)\n",
	} {
		if !strings.Contains(r.out, want) {
			t.Errorf("show does not say %q:\n%s", want, r.out)
		}
	}
	if id2, _ := security.LoadIdentity(crt, key); id2 != nil {
		info, _ = security.InspectCert(id2.Cert)
		if !strings.Contains(r.out, info.String()) {
			t.Errorf("show does not print the CertInfo:\n%s\nwant\n%s", r.out, info.String())
		}
	}
	if strings.Contains(r.out, "warning") || strings.Contains(r.out, "verified") {
		t.Errorf("unexpected:\n%s", r.out)
	}
	assertNoKey("show", r.out+r.errOut)

	// show --ca verifies; a key readable by others is pointed out.
	other := filepath.Join(dir, "other")
	if r := runCLI(ctx, "", "pki", "init", "--dir", other); r.code != 0 {
		t.Fatal(r.errOut)
	}
	if err := os.Chmod(key, 0o644); err != nil {
		t.Fatal(err)
	}
	r = runCLI(ctx, "", "pki", "show", "--ca", filepath.Join(caDir, "ca.crt"), crt, key)
	if r.code != 0 || !strings.Contains(r.out, "verified:    yes") || !strings.Contains(r.out, "warning:     "+key+" has mode 0644") {
		t.Errorf("show --ca: exit %d\n%s%s", r.code, r.out, r.errOut)
	}
	r = runCLI(ctx, "", "pki", "show", "--ca", filepath.Join(other, "ca.crt"), crt)
	if r.code != exitError || !strings.Contains(r.out, "verified:    no") || !strings.Contains(r.out, "unknown signer") {
		t.Errorf("show --ca of another CA: exit %d\n%s%s", r.code, r.out, r.errOut)
	}

	// Not a nanite file; a missing file; the others are still shown.
	notPEM := writeFile(t, filepath.Join(dir, "notes.txt"), "hello\n", 0o644)
	r = runCLI(ctx, "", "pki", "show", notPEM, filepath.Join(dir, "missing.crt"), crt)
	if r.code != exitError || !strings.Contains(r.errOut, "not a PEM file") || !strings.Contains(r.errOut, "missing.crt") ||
		!strings.Contains(r.out, "web-1") || !strings.Contains(r.errOut, "2 of 3 files") {
		t.Errorf("show bad files: exit %d\n%s%s", r.code, r.out, r.errOut)
	}

	// Usage errors.
	for _, a := range [][]string{
		{"pki", "init"},
		{"pki", "init", "--dir", filepath.Join(dir, "x"), "--name", "bad name"},
		{"pki", "init", "--dir", filepath.Join(dir, "x"), "--validity", "forever"},
		{"pki", "issue", "web-2", "--ca-dir", caDir},
		{"pki", "issue", "web-2", "--role", "admin", "--ca-dir", caDir},
		{"pki", "issue", "web-2", "--role", "agent"},
		{"pki", "issue", "bad/name", "--role", "agent", "--ca-dir", caDir},
		{"pki", "issue", "web-2", "--role", "agent", "--ca-dir", caDir, "--kem", "rsa"},
		{"pki", "issue", "web-2", "--role", "agent", "--ca-dir", caDir, "--validity", "3y"}, // outlives the CA
		{"pki", "show"},
	} {
		if r := runCLI(ctx, "", a...); r.code != exitUsage {
			t.Errorf("%v: exit %d, want %d\n%s", a, r.code, exitUsage, r.errOut)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "x")); err == nil {
		t.Error("a failed init created its directory")
	}
	r = runCLI(ctx, "", "pki", "issue", "web-2", "--role", "agent", "--ca-dir", filepath.Join(dir, "nope"))
	if r.code != exitError || !strings.Contains(r.errOut, "nope") {
		t.Errorf("missing CA: exit %d %s", r.code, r.errOut)
	}
}

// pemBodies returns the base64 lines of the PEM blocks in b.
func pemBodies(t *testing.T, b []byte) []string {
	t.Helper()
	var out []string
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		lines := strings.Split(string(pem.EncodeToMemory(&pem.Block{Type: blk.Type, Bytes: blk.Bytes})), "\n")
		for _, l := range lines {
			if l != "" && !strings.HasPrefix(l, "-----") {
				out = append(out, l)
			}
		}
	}
	if len(out) == 0 {
		t.Fatal("no PEM block")
	}
	return out
}

// TestPolicyCommands: allow (exit 0), deny (exit 7) with the deciding rule,
// an invalid file (exit 2) naming the rule and field, and the policy file
// taken from the flag, the environment or the config file.
func TestPolicyCommands(t *testing.T) {
	dir := t.TempDir()
	ctx := t.Context()
	policy := writeFile(t, filepath.Join(dir, "policy.yaml"), `rules:
  - name: no-prod-shutdown
    effect: deny
    callers: ["*"]
    services: ["/ops/shutdown"]
    tags: ["env:prod"]
  - name: ops
    effect: allow
    callers: ["ops-*", "role:client", "jid:*@site-b.example"]
    services: ["/ops/*"]
  - effect: allow
    callers: ["*"]
    services: ["/nanite/*"]
`, 0o644)
	check := func(args ...string) result {
		return runCLI(ctx, "", append([]string{"policy", "check", "--policy", policy}, args...)...)
	}
	for _, tc := range []struct {
		args []string
		code int
		out  string
	}{
		{[]string{"ops-1", "/ops/restart"}, 0,
			"allow\nrule:   \"ops\" (#2)\nreason: rule \"ops\" (#2) allows \"ops-1\" to call /ops/restart\n"},
		{[]string{"web-3", "/db/drop", "--role", "agent"}, exitDenied,
			"deny\nrule:   default deny\nreason: no rule matches \"web-3\", role agent calling /db/drop: default deny\n"},
		{[]string{"web-3", "/ops/restart", "--role", "client"}, 0, ""},
		{[]string{"web-3", "/ops/restart", "--role", "agent"}, exitDenied, ""},
		{[]string{"ops-1", "/ops/shutdown", "--tag", "env:prod", "--tag", "web"}, exitDenied,
			"deny\nrule:   \"no-prod-shutdown\" (#1)\nreason: rule \"no-prod-shutdown\" (#1) denies \"ops-1\" to call /ops/shutdown\n"},
		{[]string{"ops-1", "/ops/shutdown", "--tag", "env:dev"}, 0, ""},
		{[]string{"jid:Alice@Site-B.example/phone", "/ops/status"}, 0, ""},
		{[]string{"jid:alice@elsewhere.example", "/ops/status"}, exitDenied, ""},
		{[]string{"anyone", "/nanite"}, 0, "allow\nrule:   #3\nreason: rule #3 allows \"anyone\" to call /nanite/index\n"},
	} {
		r := check(tc.args...)
		if r.code != tc.code || (tc.out != "" && r.out != tc.out) {
			t.Errorf("%v: exit %d, want %d\n%s%s", tc.args, r.code, tc.code, r.out, r.errOut)
		}
		if tc.code == exitDenied && !strings.Contains(r.errOut, "the policy denies the call") {
			t.Errorf("%v: stderr %q", tc.args, r.errOut)
		}
	}

	r := check("ops-1", "/ops/shutdown", "--role", "client", "--jid", "ops@site-b.example", "--tag", "env:prod", "--json")
	var doc map[string]any
	if err := json.Unmarshal([]byte(r.out), &doc); err != nil || r.code != exitDenied {
		t.Fatalf("--json: exit %d %v\n%s", r.code, err, r.out)
	}
	if doc["decision"] != "deny" || doc["rule"] != "no-prod-shutdown" || doc["index"] != 1.0 || doc["service"] != "/ops/shutdown" ||
		doc["policy"] != policy || doc["caller"].(map[string]any)["jid"] != "ops@site-b.example" {
		t.Errorf("--json: %v", doc)
	}

	// The policy file from the environment and from the config file.
	f, out, _ := testFactory("", map[string]string{envPolicy: policy})
	if code := execute(ctx, f, []string{"policy", "check", "ops-1", "/ops/x"}); code != 0 || !strings.HasPrefix(out.String(), "allow\n") {
		t.Errorf("NANITE_POLICY: exit %d %s", code, out.String())
	}
	conf := writeFile(t, filepath.Join(dir, "config.yaml"), "secure:\n  policy: policy.yaml\n", 0o644)
	if r := runCLI(ctx, "", "policy", "check", "--config", conf, "x", "/ops/x"); r.code != exitDenied {
		t.Errorf("config file: exit %d %s", r.code, r.errOut)
	}

	// Invalid policies name the rule and field; bad arguments.
	bad := writeFile(t, filepath.Join(dir, "bad.yaml"), `rules:
  - name: fine
    effect: allow
    callers: ["*"]
    services: ["*"]
  - name: ops
    effect: allow
    callers: ["ops-*", "role:admin"]
    services: ["/ops/*"]
`, 0o644)
	for _, a := range [][]string{
		{"policy", "check", "--policy", bad, "x", "/a/b"},
		{"policy", "validate", bad},
	} {
		r := runCLI(ctx, "", a...)
		if r.code != exitUsage || !strings.Contains(r.errOut, `rule 2 ("ops"): callers[1]: unknown role "admin"`) || !strings.Contains(r.errOut, bad) {
			t.Errorf("%v: exit %d\n%s", a, r.code, r.errOut)
		}
	}
	for _, a := range [][]string{
		{"policy", "check", "x", "/a/b"}, // no policy file
		{"policy", "check", "--policy", filepath.Join(dir, "missing.yaml"), "x", "/a/b"},
		{"policy", "check", "--policy", policy, "x"},
		{"policy", "check", "--policy", policy, "bad name", "/a/b"},
		{"policy", "check", "--policy", policy, "x", "not a service"},
		{"policy", "check", "--policy", policy, "x", "/a/b", "--role", "admin"},
		{"policy", "check", "--policy", policy, "jid:a@b", "/a/b", "--jid", "c@d"},
		{"policy", "validate", filepath.Join(dir, "missing.yaml")},
	} {
		if r := runCLI(ctx, "", a...); r.code != exitUsage {
			t.Errorf("%v: exit %d, want %d\n%s", a, r.code, exitUsage, r.errOut)
		}
	}

	r = runCLI(ctx, "", "policy", "validate", policy)
	if r.code != 0 || !strings.HasPrefix(r.out, policy+": valid, 3 rules") ||
		!strings.Contains(r.out, "#1  no-prod-shutdown  deny   callers *") || !strings.Contains(r.out, "tags env:prod") {
		t.Errorf("validate: exit %d\n%s%s", r.code, r.out, r.errOut)
	}
	if r := runCLI(ctx, "", "policy", "validate", "--policy", policy); r.code != 0 {
		t.Errorf("validate --policy: exit %d %s", r.code, r.errOut)
	}
}
