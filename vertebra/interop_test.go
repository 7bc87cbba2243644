package vertebra

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"mellium.im/xmpp/jid"

	"github.com/nanite-go/nanite/testenv"
)

// recordingActors is fakeActors remembering the payloads it was called with.
type recordingActors struct {
	fakeActors
	mu       sync.Mutex
	payloads map[string][]json.RawMessage
}

func (r *recordingActors) Call(ctx context.Context, service string, payload json.RawMessage, from string,
	emit func(ctx context.Context, key string, data json.RawMessage) error) (json.RawMessage, error) {
	r.mu.Lock()
	if r.payloads == nil {
		r.payloads = map[string][]json.RawMessage{}
	}
	r.payloads[service] = append(r.payloads[service], append(json.RawMessage(nil), payload...))
	r.mu.Unlock()
	return r.fakeActors.Call(ctx, service, payload, from, emit)
}

func (r *recordingActors) last(service string) json.RawMessage {
	r.mu.Lock()
	defer r.mu.Unlock()
	p := r.payloads[service]
	if len(p) == 0 {
		return nil
	}
	return p[len(p)-1]
}

// pythonWithSlixmpp returns a Python 3 that can import slixmpp ($NANITE_PYTHON,
// python3 on $PATH, /usr/bin/python3: a pyenv python3 on the PATH does not
// see Debian's python3-slixmpp), or fails (CI=true) or skips the test.
func pythonWithSlixmpp(t *testing.T) string {
	t.Helper()
	var cands []string
	if p := os.Getenv("NANITE_PYTHON"); p != "" {
		cands = append(cands, p)
	}
	if p, err := exec.LookPath("python3"); err == nil {
		cands = append(cands, p)
	}
	cands = append(cands, "/usr/bin/python3")
	for _, c := range cands {
		if err := exec.Command(c, "-c", "import slixmpp").Run(); err == nil {
			return c
		}
	}
	msg := "python3 with slixmpp not found (tried " + strings.Join(cands, ", ") +
		"); install with `apt-get install -y python3-slixmpp` (or run scripts/install-deps)"
	if v := strings.ToLower(strings.TrimSpace(os.Getenv("CI"))); v == "true" || v == "1" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// jsonEqual compares two JSON texts as values, numbers by their text.
func jsonEqual(t *testing.T, a, b []byte) bool {
	t.Helper()
	dec := func(p []byte) any {
		d := json.NewDecoder(bytes.NewReader(p))
		d.UseNumber()
		var v any
		if err := d.Decode(&v); err != nil {
			t.Fatalf("bad JSON %q: %v", p, err)
		}
		return v
	}
	return reflect.DeepEqual(dec(a), dec(b))
}

// TestInteropPythonClient calls an XMPP agent with a client written in
// Python (slixmpp) only from docs/xmpp.md: testdata/interop/call_op.py.
func TestInteropPythonClient(t *testing.T) {
	python := pythonWithSlixmpp(t)
	p := testenv.RunProsody(t, testenv.ProsodyOptions{
		VirtualHosts: []string{testDomain},
		Accounts: []testenv.Account{
			{User: "agent1", Host: testDomain, Password: testPassword},
			{User: "alice", Host: testDomain, Password: "alice-pw"},
		},
	})
	actors := &recordingActors{}
	ad := clientDial(t, p, "agent1")
	ad.JID = jid.MustParse("agent1@" + testDomain + "/agent")
	a := startAgent(t, AgentConfig{Dial: ad, Handler: actors, Authorizer: AllowJIDs("alice@" + testDomain),
		Load: func() float64 { return 0.5 }, StatusInterval: time.Hour})

	const script = "testdata/interop/call_op.py"
	if _, err := os.ReadFile(script); err != nil { // also makes go test's cache depend on it
		t.Fatal(err)
	}
	run := func(t *testing.T, extra []string, op, args string, env ...string) (stdout string, err error) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		argv := append([]string{script, "--timeout", "10"}, extra...)
		argv = append(argv, a.JID().String(), op)
		if args != "" {
			argv = append(argv, args)
		}
		cmd := exec.CommandContext(ctx, python, argv...)
		cmd.Env = append(os.Environ(),
			"XMPP_JID=alice@"+testDomain+"/py",
			"XMPP_PASSWORD=alice-pw",
			"XMPP_SERVER="+p.C2SAddr(),
			"XMPP_CA="+p.CAFile(),
		)
		cmd.Env = append(cmd.Env, env...)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		err = cmd.Run()
		if errb.Len() > 0 {
			t.Logf("call_op.py stderr:\n%s", errb.String())
		}
		return out.String(), err
	}

	// A struct with a string, an i4, a list and a boolean, and the cases
	// the document says need care: a number that is not an i4, a string
	// with a carriage return, a member name with a tab, nil, markup.
	const args = `{"text":"héllo <world> & \"friends\"","count":42,"items":["a",2,false,null,{"x":-7}],"ok":true,` +
		`"nested":{"ratio":1.5,"big":4294967296,"crlf":"one\r\ntwo","tab\tname":"t"},"empty":{},"none":[]}`

	for _, mode := range []struct {
		name  string
		extra []string
	}{{"starttls", nil}, {"plaintext", []string{"--plaintext"}}} {
		t.Run("say/"+mode.name, func(t *testing.T) {
			out, err := run(t, mode.extra, "/echo/say", args)
			if err != nil {
				t.Fatalf("call_op.py /echo/say: %v; stdout %q", err, out)
			}
			got := actors.last("/echo/say")
			if !jsonEqual(t, got, []byte(args)) {
				t.Errorf("the agent received\n%s\nPython sent\n%s", got, args)
			}
			lines := strings.Split(strings.TrimSpace(out), "\n")
			if len(lines) != 1 || !jsonEqual(t, []byte(lines[0]), []byte(args)) {
				t.Errorf("Python printed\n%s\nwant\n%s", out, args)
			}
		})
	}

	t.Run("null and no payload", func(t *testing.T) {
		for _, c := range []struct{ args, want string }{{"null", "null"}, {"", ""}} {
			out, err := run(t, nil, "/echo/say", c.args)
			if err != nil {
				t.Fatalf("call_op.py /echo/say %q: %v", c.args, err)
			}
			if strings.TrimSpace(out) != "null" {
				t.Errorf("Python printed %q, want null", out)
			}
			if got := string(actors.last("/echo/say")); got != c.want {
				t.Errorf("args %q: the agent received %q, want %q", c.args, got, c.want)
			}
		}
	})

	t.Run("stream", func(t *testing.T) {
		out, err := run(t, nil, "/echo/stream", `{"steps":3,"label":"demo"}`)
		if err != nil {
			t.Fatalf("call_op.py /echo/stream: %v; stdout %q", err, out)
		}
		want := []string{
			`{"key":"progress","value":{"step":1,"of":3}}`,
			`{"key":"progress","value":{"step":2,"of":3}}`,
			`{"key":"progress","value":{"step":3,"of":3}}`,
			`{"steps":3}`,
		}
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if len(lines) != len(want) {
			t.Fatalf("Python printed\n%s\nwant\n%s", out, strings.Join(want, "\n"))
		}
		for i := range want {
			if !jsonEqual(t, []byte(lines[i]), []byte(want[i])) {
				t.Errorf("line %d: %s, want %s", i+1, lines[i], want[i])
			}
		}
		if got := actors.last("/echo/stream"); !jsonEqual(t, got, []byte(`{"steps":3,"label":"demo"}`)) {
			t.Errorf("the agent received %s", got)
		}
	})

	t.Run("wrong CA", func(t *testing.T) {
		other, err := testenv.GenerateTLS(t.TempDir(), testDomain)
		if err != nil {
			t.Fatal(err)
		}
		out, err := run(t, nil, "/echo/say", `"x"`, "XMPP_CA="+other.CACert)
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 {
			t.Fatalf("call_op.py with another CA: %v (want exit status 2, refused); stdout %q", err, out)
		}
	})

	t.Run("nack", func(t *testing.T) {
		out, err := run(t, nil, "/echo/nothing", "")
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
			t.Fatalf("call_op.py /echo/nothing: %v (want exit status 1); stdout %q", err, out)
		}
	})

	t.Run("error", func(t *testing.T) {
		out, err := run(t, nil, "/echo/fail", `"broken"`)
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
			t.Fatalf("call_op.py /echo/fail: %v (want exit status 1); stdout %q", err, out)
		}
	})
}
