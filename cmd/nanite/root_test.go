package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nanite-go/nanite/nanite"
)

func TestExitCode(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want int
	}{
		{"nil", nil, 0},
		{"other", errors.New("disk full"), 1},
		{"canceled", context.Canceled, 1},
		{"closed", nanite.ErrClosed, 1},
		{"usage", usageErrorf("bad flag"), 2},
		{"usage wrapped", fmt.Errorf("x: %w", usageErrorf("bad")), 2},
		{"no agent", fmt.Errorf("%w: no registered agent offers /a/b", nanite.ErrNoAgent), 3},
		{"no agent relayed", &nanite.RemoteError{Code: nanite.CodeNoAgent}, 3},
		{"timeout", &nanite.TimeoutError{Service: "/a/b"}, 4},
		{"timeout remote", &nanite.RemoteError{Agent: "a1", Code: nanite.CodeTimeout}, 4},
		{"expired remote", &nanite.RemoteError{Agent: "a1", Code: nanite.CodeExpired}, 4},
		{"remote", &nanite.RemoteError{Agent: "a1", Code: nanite.CodeHandler, Message: "boom"}, 5},
		{"remote panic", &nanite.RemoteError{Agent: "a1", Code: nanite.CodePanic}, 5},
		{"remote among many", failedResults(&nanite.Response{Results: []nanite.Result{
			{Agent: "a1"}, {Agent: "a2", Err: &nanite.RemoteError{Agent: "a2", Code: nanite.CodeHandler}}}}), 5},
		{"connection", &connectionError{URL: "amqp://x", Err: errors.New("refused")}, 6},
		{"net error", fmt.Errorf("dial: %w", &net.OpError{Op: "dial", Err: syscall.ECONNREFUSED}), 6},
		{"econnrefused", fmt.Errorf("x: %w", syscall.ECONNREFUSED), 6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := exitCode(tc.err); got != tc.want {
				t.Errorf("exitCode(%v) = %d, want %d", tc.err, got, tc.want)
			}
		})
	}
}

func TestResolveSettings(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	yamlFile := write("conf.yaml", "url: amqp://file/\nlog_level: debug\nagent:\n  data_dir: data\n  actors: /etc/actors.yaml\n  heartbeat: 3s\n  tags: [x, y]\n")
	jsonFile := write("conf.json", `{"url": "amqp://json/", "log_format": "json"}`)
	write("xdg/nanite/config.yaml", "url: amqp://xdg/\n")
	write("home/.config/nanite/config.yaml", "url: amqp://home/\n")
	badFile := write("bad.yaml", "url: amqp://x/\nurll: typo\n")

	type want struct {
		url, level, format, file string
		usage                    bool
	}
	for _, tc := range []struct {
		name  string
		flags map[string]string
		env   map[string]string
		want  want
	}{
		{"defaults", nil, nil, want{url: DefaultURL, format: "text"}},
		{"env", nil, map[string]string{envURL: "amqp://env/", envLogLevel: "warn"},
			want{url: "amqp://env/", level: "warn", format: "text"}},
		{"flag beats env", map[string]string{"url": "amqp://flag/"}, map[string]string{envURL: "amqp://env/"},
			want{url: "amqp://flag/", format: "text"}},
		{"file", map[string]string{"config": yamlFile}, nil,
			want{url: "amqp://file/", level: "debug", format: "text", file: yamlFile}},
		{"env beats file", map[string]string{"config": yamlFile}, map[string]string{envURL: "amqp://env/", envLogLevel: "error"},
			want{url: "amqp://env/", level: "error", format: "text", file: yamlFile}},
		{"flag beats env and file", map[string]string{"config": yamlFile, "url": "amqp://flag/", "log-level": "info"},
			map[string]string{envURL: "amqp://env/", envLogLevel: "error"},
			want{url: "amqp://flag/", level: "info", format: "text", file: yamlFile}},
		{"config from env", nil, map[string]string{envConfig: jsonFile},
			want{url: "amqp://json/", format: "json", file: jsonFile}},
		{"config flag beats env", map[string]string{"config": jsonFile}, map[string]string{envConfig: yamlFile},
			want{url: "amqp://json/", format: "json", file: jsonFile}},
		{"xdg default", nil, map[string]string{"XDG_CONFIG_HOME": filepath.Join(dir, "xdg"), "HOME": filepath.Join(dir, "home")},
			want{url: "amqp://xdg/", format: "text", file: filepath.Join(dir, "xdg/nanite/config.yaml")}},
		{"home default", nil, map[string]string{"HOME": filepath.Join(dir, "home")},
			want{url: "amqp://home/", format: "text", file: filepath.Join(dir, "home/.config/nanite/config.yaml")}},
		{"missing default is fine", nil, map[string]string{"XDG_CONFIG_HOME": filepath.Join(dir, "none")},
			want{url: DefaultURL, format: "text"}},
		{"missing explicit file", map[string]string{"config": filepath.Join(dir, "none.yaml")}, nil, want{usage: true}},
		{"missing file from env", nil, map[string]string{envConfig: filepath.Join(dir, "none.yaml")}, want{usage: true}},
		{"unknown key", map[string]string{"config": badFile}, nil, want{usage: true}},
		{"bad level", map[string]string{"log-level": "loud"}, nil, want{usage: true}},
		{"bad format", nil, map[string]string{envLogFormat: "xml"}, want{usage: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := resolveSettings(settingsInput{
				Flags:     tc.flags,
				LookupEnv: func(k string) (string, bool) { v, ok := tc.env[k]; return v, ok },
				ReadFile:  os.ReadFile,
			})
			if tc.want.usage {
				if exitCode(err) != exitUsage {
					t.Fatalf("err = %v, want a usage error", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got := want{url: s.URL, level: s.LogLevel, format: s.LogFormat, file: s.ConfigFile}
			if got != tc.want {
				t.Errorf("got %+v\nwant %+v", got, tc.want)
			}
		})
	}

	// Paths in the file are relative to it; durations and lists decode.
	s, err := resolveSettings(settingsInput{Flags: map[string]string{"config": yamlFile}, ReadFile: os.ReadFile})
	if err != nil {
		t.Fatal(err)
	}
	a := s.File.Agent
	if a.DataDir != filepath.Join(dir, "data") || a.Actors != "/etc/actors.yaml" ||
		time.Duration(a.Heartbeat) != 3*time.Second || !slices.Equal(a.Tags, []string{"x", "y"}) {
		t.Errorf("agent section %+v", a)
	}

	// A default path that exists but cannot be read is an error, not skipped.
	_, err = resolveSettings(settingsInput{
		LookupEnv: func(k string) (string, bool) { return map[string]string{"HOME": "/h"}[k], k == "HOME" },
		ReadFile:  func(string) ([]byte, error) { return nil, fs.ErrPermission },
	})
	if exitCode(err) != exitUsage {
		t.Errorf("unreadable default config: %v", err)
	}
}

func TestAgentPrecedence(t *testing.T) {
	file := AgentFileConfig{Identity: "file-id", DataDir: "/file", Tags: []string{"f"}, Heartbeat: duration(5 * time.Second),
		Prefetch: 3, Actors: "/file/actors.yaml", NoExamples: true}
	defaults := func() *AgentOptions {
		return &AgentOptions{Heartbeat: nanite.DefaultHeartbeatInterval, Prefetch: nanite.DefaultPrefetch,
			ShutdownGrace: nanite.DefaultShutdownGrace}
	}

	// No flags: the file wins over the defaults.
	o := defaults()
	got := o.resolve(file)
	want := agentSpec{Identity: "file-id", DataDir: "/file", Tags: []string{"f"}, Heartbeat: 5 * time.Second,
		Prefetch: 3, ActorsFile: "/file/actors.yaml", Examples: false, ShutdownGrace: nanite.DefaultShutdownGrace}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("file: got %+v\nwant %+v", got, want)
	}

	// Flags given win, even when they equal the defaults.
	o = defaults()
	o.Identity, o.Tags, o.NoExamples = "flag-id", []string{"a,b", " c", "a"}, false
	given := map[string]bool{"identity": true, "tags": true, "prefetch": true, "no-examples": true}
	o.Given = func(n string) bool { return given[n] }
	got = o.resolve(file)
	want = agentSpec{Identity: "flag-id", DataDir: "/file", Tags: []string{"a", "b", "c"}, Heartbeat: 5 * time.Second,
		Prefetch: nanite.DefaultPrefetch, ActorsFile: "/file/actors.yaml", Examples: true, ShutdownGrace: nanite.DefaultShutdownGrace}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("flags: got %+v\nwant %+v", got, want)
	}

	// Neither: defaults.
	o = defaults()
	got = o.resolve(AgentFileConfig{})
	if got.Heartbeat != nanite.DefaultHeartbeatInterval || got.Prefetch != nanite.DefaultPrefetch || !got.Examples || got.Tags != nil {
		t.Errorf("defaults: %+v", got)
	}
}

func TestParsePayload(t *testing.T) {
	for in, want := range map[string]string{
		`{"a": 1}`:  `{"a": 1}`,
		` [1,2] `:   `[1,2]`,
		`42`:        `42`,
		`"quoted"`:  `"quoted"`,
		`true`:      `true`,
		`hello`:     `"hello"`,
		`hi there`:  `"hi there"`,
		`{"broken"`: `"{\"broken\""`,
		``:          `""`,
	} {
		if got := string(parsePayload([]byte(in))); got != want {
			t.Errorf("parsePayload(%q) = %s, want %s", in, got, want)
		}
	}
	o := &RequestOptions{HasPayload: true, Payload: "-", IO: IOStreams{In: strings.NewReader("plain text\n")}}
	if p, err := o.payload(); err != nil || string(p) != `"plain text"` {
		t.Errorf("stdin text: %s %v", p, err)
	}
	o = &RequestOptions{HasPayload: true, Payload: "-", IO: IOStreams{In: strings.NewReader("{\"ms\":\n 5}\n")}}
	if p, err := o.payload(); err != nil || string(p) != "{\"ms\":\n 5}" {
		t.Errorf("stdin JSON: %s %v", p, err)
	}
	o = &RequestOptions{HasPayload: true, Payload: "-", IO: IOStreams{In: strings.NewReader("")}}
	if p, err := o.payload(); err != nil || p != nil {
		t.Errorf("empty stdin: %s %v", p, err)
	}
	if p, err := (&RequestOptions{}).payload(); err != nil || p != nil {
		t.Errorf("no payload: %s %v", p, err)
	}
}

func TestUsageErrors(t *testing.T) {
	ctx := t.Context()
	for _, args := range [][]string{
		{"bogus"},
		{"request"},
		{"request", "noslash"},
		{"request", "/a/b", "x", "extra"},
		{"request", "--selector", "best", "/a/b"},
		{"request", "--timeout", "0s", "/a/b"},
		{"request", "--nope", "/a/b"},
		{"agent", "extra"},
		{"agent", "--identity", "bad id"},
		{"agents", "--wait", "-1s"},
		{"mapper", "--report-interval", "0s"},
		{"dev", "--agents", "0"},
		{"version", "x"},
		{"--log-level", "loud", "agents"},
		{"agents", "--config", "/nonexistent/nanite.yaml"},
	} {
		r := runCLI(ctx, "", args...)
		if r.code != exitUsage {
			t.Errorf("%v: exit %d, want 2 (stderr %q)", args, r.code, r.errOut)
		}
		if !strings.Contains(r.errOut, "--help' for usage") {
			t.Errorf("%v: no usage hint in %q", args, r.errOut)
		}
	}
}

func TestHelpAndVersion(t *testing.T) {
	ctx := t.Context()
	r := runCLI(ctx, "")
	if r.code != 0 || !strings.Contains(r.out, "Exit codes:") || !strings.Contains(r.out, "NANITE_URL") {
		t.Errorf("root help: %d %q", r.code, r.out)
	}
	for _, c := range []string{"agent", "mapper", "request", "push", "agents", "version", "dev"} {
		r := runCLI(ctx, "", c, "--help")
		if r.code != 0 || !strings.Contains(r.out, "Examples:") || !strings.Contains(r.out, "nanite "+c) {
			t.Errorf("%s --help: exit %d, output %q", c, r.code, r.out)
		}
	}
	r = runCLI(ctx, "", "agent", "--help")
	for _, want := range []string{"NANITE_DEADLINE", `{"intermediate": KEY, "data": VALUE}`, "/echo/stream", "SIGKILL"} {
		if !strings.Contains(r.out, want) {
			t.Errorf("agent --help does not mention %s", want)
		}
	}
	r = runCLI(ctx, "", "version")
	if r.code != 0 || !strings.HasPrefix(r.out, "nanite "+nanite.Version+"\nprotocol 1\ngo") {
		t.Errorf("version: %q", r.out)
	}
	r = runCLI(ctx, "", "version", "--json")
	if r.code != 0 || !strings.Contains(r.out, `"protocol": 1`) {
		t.Errorf("version --json: %q", r.out)
	}
}

func TestConnectionRefused(t *testing.T) {
	// A port nobody listens on.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	url := fmt.Sprintf("amqp://guest:secret@%s/", l.Addr())
	l.Close()
	for _, args := range [][]string{
		{"request", "--url", url, "/echo/say", "hi"},
		{"push", "--url", url, "/echo/say"},
		{"agents", "--url", url},
	} {
		start := time.Now()
		r := runCLI(t.Context(), "", args...)
		if r.code != exitConnection || !strings.Contains(r.errOut, "cannot connect to the broker") {
			t.Errorf("%v: exit %d, stderr %q", args, r.code, r.errOut)
		}
		if strings.Contains(r.errOut, "secret") {
			t.Errorf("%v: the password is printed: %q", args, r.errOut)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("%v took %v", args, d)
		}
	}
	r := runCLI(t.Context(), "", "request", "--url", "http://x/", "/echo/say")
	if r.code != exitUsage {
		t.Errorf("http URL: exit %d %q", r.code, r.errOut)
	}
}

func TestWriteAgentsTable(t *testing.T) {
	now := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	agents := []nanite.AgentState{
		{Identity: "a1", Services: []nanite.ServiceInfo{{Name: "/nanite/info"}, {Name: "/echo/say"}, {Name: "/echo/time"}},
			Tags: []string{"eu", "web"}, Status: 0.5, InFlight: 2, LastSeen: now.Add(-1500 * time.Millisecond), Version: "0.1.0"},
		{Identity: "long-agent-2", Services: []nanite.ServiceInfo{{Name: "/nanite/info"}}, LastSeen: now.Add(-90 * time.Second)},
	}
	var b strings.Builder
	if err := writeAgentsTable(&b, agents, now, false); err != nil {
		t.Fatal(err)
	}
	want := `IDENTITY      SERVICES  TAGS    LOAD  IN-FLIGHT  LAST SEEN  VERSION
a1            2         eu,web  0.50  2          1.5s ago   0.1.0
long-agent-2  0         -       0.00  0          1m30s ago  -
`
	if b.String() != want {
		t.Errorf("table:\n%s\nwant:\n%s", b.String(), want)
	}
	b.Reset()
	_ = writeAgentsTable(&b, agents, now, true)
	if !strings.Contains(b.String(), "/echo/say,/echo/time") {
		t.Errorf("--services table:\n%s", b.String())
	}
}
