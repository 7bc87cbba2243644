package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nanite-go/nanite/testenv"
	"github.com/nanite-go/nanite/vertebra"
)

func TestXMPPFlags(t *testing.T) {
	f, _, _ := testFactory("", nil)
	var got *CallOptions
	cmd := NewCmdCall(f, func(_ context.Context, o *CallOptions) error { got = o; return nil })
	cmd.SetArgs([]string{"dir@x.test", "/echo/say", `"hi"`, "--scope", "all", "--resource", "/cluster/a", "--timeout", "2s",
		"--jid", "me@x.test/r", "--password-file", "pw", "--allow-plaintext"})
	if err := cmd.Execute(); err != nil {
		t.Fatal(err)
	}
	if got.Target != "dir@x.test" || got.Op != "/echo/say" || got.Payload != `"hi"` || got.Scope != "all" ||
		got.Resources[0] != "/cluster/a" || got.Timeout != 2*time.Second || got.Login.JID != "me@x.test/r" || !got.Login.AllowPlaintext {
		t.Errorf("options %+v", got)
	}
	for _, bad := range [][]string{
		{"a@b", "echo/say"},
		{"a@b", "/echo/say", "--scope", "some"},
		{"a@b", "/echo/say", "--resource", "/x"},
		{"a@b", "/echo/say", "--scope", "all", "--resource", "x"},
		{"a@b", "/echo/say", "--timeout", "0"},
		{"a@b"},
	} {
		cmd := NewCmdCall(f, func(context.Context, *CallOptions) error { return nil })
		cmd.SetArgs(bad)
		cmd.SilenceErrors, cmd.SilenceUsage = true, true
		if err := cmd.Execute(); exitCode(err) != exitUsage {
			t.Errorf("%q: %v (exit %d), want a usage error", bad, err, exitCode(err))
		}
	}

	var ag *XMPPAgentOptions
	cmd = NewCmdXMPPAgent(f, func(_ context.Context, o *XMPPAgentOptions) error { ag = o; return nil })
	cmd.SetArgs([]string{"--jid", "a@x.test/1", "--allow", "b@x.test", "--allow", "*@y.test", "--directory", "d.x.test",
		"--resource", "/r/1", "--ttl", "30s", "--no-examples"})
	if err := cmd.Execute(); err != nil {
		t.Fatal(err)
	}
	if len(ag.Allow) != 2 || ag.Directory != "d.x.test" || ag.TTL != 30*time.Second || !ag.NoExamples || ag.Resources[0] != "/r/1" {
		t.Errorf("options %+v", ag)
	}
	var do *DirectoryOptions
	cmd = NewCmdDirectory(f, func(_ context.Context, o *DirectoryOptions) error { do = o; return nil })
	cmd.SetArgs([]string{"--component", "dir.x.test", "--secret-file", "s", "--server", "127.0.0.1:1"})
	if err := cmd.Execute(); err != nil {
		t.Fatal(err)
	}
	if do.Login.Component != "dir.x.test" || do.Login.SecretFile != "s" || do.MaxTTL != 24*time.Hour {
		t.Errorf("options %+v", do)
	}

	// Login resolution: flags, then the environment.
	env := map[string]string{"NANITE_XMPP_JID": "e@x.test", "NANITE_XMPP_PASSWORD": "envpw", "NANITE_XMPP_SERVER": "127.0.0.1:9"}
	fe, _, _ := testFactory("", env)
	dc, err := (&xmppFlags{}).dialConfig(fe)
	if err != nil || dc.JID.String() != "e@x.test" || dc.Password != "envpw" || dc.Addr != "127.0.0.1:9" {
		t.Errorf("from the environment: %+v %v", dc, err)
	}
	for _, x := range []xmppFlags{{}, {JID: "nolocal"}, {JID: "a@x.test"}, {Component: "a@x.test"}, {Component: "d.x.test"}} {
		if _, err := x.dialConfig(f); exitCode(err) != exitUsage {
			t.Errorf("%+v: %v, want a usage error", x, err)
		}
	}
}

func TestXMPPExitCodes(t *testing.T) {
	for _, c := range []struct {
		err  error
		code int
	}{
		{&vertebra.DeadlineError{}, exitTimeout},
		{&vertebra.OpError{Nack: true}, exitRemote},
		{&vertebra.OpError{}, exitRemote},
		{vertebra.ErrNoTarget, exitNoAgent},
		{vertebra.ErrUnavailable, exitNoAgent},
		{vertebra.ErrAuth, exitConnection},
	} {
		if got := exitCode(wrapXMPP(c.err, "server")); got != c.code {
			t.Errorf("%v: exit %d, want %d", c.err, got, c.code)
		}
	}
}

// TestXMPPCommands runs nanite directory, two nanite xmpp-agent and
// nanite call against a private prosody.
func TestXMPPCommands(t *testing.T) {
	const domain, comp = "site-a.test", "directory.site-a.test"
	var accts []testenv.Account
	for _, u := range []string{"agent1", "agent2", "alice", "mallory"} {
		accts = append(accts, testenv.Account{User: u, Host: domain, Password: "pw-" + u})
	}
	p := testenv.RunProsody(t, testenv.ProsodyOptions{VirtualHosts: []string{domain},
		Components: map[string]string{comp: "dir-secret"}, Accounts: accts, ExtraConfig: `c2s_require_encryption = true`})
	dir := t.TempDir()
	file := func(name, content string) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(content+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	login := func(user string) []string {
		return []string{"--jid", user + "@" + domain + "/cli", "--password-file", file(user+".pw", "pw-"+user),
			"--server", p.C2SAddr(), "--ca-file", p.CAFile()}
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	daemons := make(chan result, 3)
	daemon := func(args ...string) {
		go func() { daemons <- runCLI(ctx, "", args...) }()
	}
	daemon("directory", "--component", comp, "--secret-file", file("dir.secret", "dir-secret"), "--server", p.ComponentAddr())
	for i, a := range []string{"agent1", "agent2"} {
		daemon(append(append([]string{"xmpp-agent"}, login(a)...), "--allow", "alice@"+domain, "--directory", comp,
			"--resource", "/cluster/rd0"+string(rune('0'+i)), "--ttl", "1m")...)
	}
	call := func(args ...string) result {
		c, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		return runCLI(c, "", append(append([]string{"call"}, login("alice")...), args...)...)
	}
	agent1 := "agent1@" + domain + "/cli"
	// Wait until agent1 serves and both agents are in the directory.
	var r result
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		r = call(comp, "/echo/say", "x", "--scope", "all", "--json")
		if r.code == 0 && strings.Count(r.out, `"jid"`) == 2 {
			break
		}
	}
	if r.code != 0 {
		t.Fatalf("agents not ready: %+v", r)
	}

	t.Run("direct", func(t *testing.T) {
		r := call(agent1, "/echo/say", `{"a":[1,2.5,"x"],"b":null}`)
		if r.code != 0 || strings.TrimSpace(r.out) != `{"a":[1,2.5,"x"],"b":null}` {
			t.Fatalf("%+v", r)
		}
	})
	t.Run("streamed", func(t *testing.T) {
		r := call(agent1, "/echo/stream", `{"steps":2,"interval_ms":10}`)
		if r.code != 0 || !strings.Contains(r.errOut, `[`+agent1+`] progress: {"of":2,"step":1}`) ||
			!strings.Contains(r.out, `"steps":2`) {
			t.Fatalf("%+v", r)
		}
	})
	t.Run("handler error", func(t *testing.T) {
		r := call(agent1, "/echo/fail", `"broken"`)
		if r.code != exitRemote || !strings.Contains(r.errOut, "handler_error: broken") {
			t.Fatalf("%+v", r)
		}
	})
	t.Run("unknown op", func(t *testing.T) {
		r := call(agent1, "/echo/nothing")
		if r.code != exitRemote || !strings.Contains(r.errOut, "unknown_service") {
			t.Fatalf("%+v", r)
		}
	})
	t.Run("timeout", func(t *testing.T) {
		r := call(agent1, "/echo/slow", "3000", "--timeout", "500ms")
		if r.code != exitTimeout {
			t.Fatalf("%+v", r)
		}
	})
	t.Run("not authorized", func(t *testing.T) {
		c, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		r := runCLI(c, "", append(append([]string{"call"}, login("mallory")...), agent1, "/echo/say", "x")...)
		if r.code != exitRemote || !strings.Contains(r.errOut, "not_authorized") {
			t.Fatalf("%+v", r)
		}
	})
	t.Run("no such JID", func(t *testing.T) {
		r := call("agent1@"+domain+"/gone", "/echo/say", "x")
		if r.code != exitNoAgent {
			t.Fatalf("%+v", r)
		}
	})
	t.Run("single on a resource", func(t *testing.T) {
		r := call(comp, "/echo/say", `"one"`, "--scope", "single", "--resource", "/cluster/rd01", "--json")
		var doc struct {
			Results []struct {
				JID  string
				Data []json.RawMessage
			}
		}
		if err := json.Unmarshal([]byte(r.out), &doc); err != nil || r.code != 0 || len(doc.Results) != 1 ||
			doc.Results[0].JID != "agent2@"+domain+"/cli" || string(doc.Results[0].Data[0]) != `"one"` {
			t.Fatalf("%+v (%v)", r, err)
		}
	})
	t.Run("all", func(t *testing.T) {
		r := call(comp, "/echo/say", `"both"`, "--scope", "all")
		if r.code != 0 || !strings.Contains(r.out, agent1+`: "both"`) || !strings.Contains(r.out, "agent2@"+domain+`/cli: "both"`) {
			t.Fatalf("%+v", r)
		}
	})
	t.Run("no JID found", func(t *testing.T) {
		r := call(comp, "/echo/say", "--scope", "single", "--resource", "/nowhere")
		if r.code != exitNoAgent {
			t.Fatalf("%+v", r)
		}
	})
	t.Run("wrong password", func(t *testing.T) {
		c, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		args := login("alice")
		args[3] = file("bad.pw", "wrong")
		r := runCLI(c, "", append(append([]string{"call"}, args...), agent1, "/echo/say")...)
		if r.code != exitConnection {
			t.Fatalf("%+v", r)
		}
	})
	t.Run("plaintext refused by the server", func(t *testing.T) {
		c, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		r := runCLI(c, "", append(append([]string{"call"}, login("alice")...), "--allow-plaintext", agent1, "/echo/say")...)
		t.Logf("%+v", r)
		if r.code != exitConnection {
			t.Fatalf("%+v", r)
		}
	})

	cancel()
	for range 3 {
		if r := <-daemons; r.code != 0 {
			t.Errorf("daemon: %+v", r)
		}
	}
}

func TestBenchXMPPSmoke(t *testing.T) {
	testenv.Require(t, "prosody", "prosodyctl")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	r := runCLI(ctx, "", "bench-xmpp", "--duration", "200ms", "--warmup", "0", "--rounds", "1", "--outstanding", "2", "--json")
	var rep XBReport
	if r.code != 0 || json.Unmarshal([]byte(r.out), &rep) != nil || len(rep.Cells) != 1 || len(rep.Cells[0].Sides) != 4 {
		t.Fatalf("%+v", r)
	}
	for name, m := range rep.Cells[0].Sides {
		if m.Requests == 0 || m.Errors != 0 {
			t.Errorf("%s: %+v", name, m)
		}
	}
	if op := rep.Cells[0].Sides[xbOp]; op.StanzasPerReq < 1.9 || op.StanzasPerReq > 2.2 {
		t.Errorf("an op between components took %.1f stanzas", op.StanzasPerReq)
	}
}
