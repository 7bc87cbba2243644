package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/testenv"
)

// startDaemon runs a long-running command (agent, mapper, dev) in-process
// until the test ends, then checks that it stopped cleanly (exit code 0).
func startDaemon(t *testing.T, args ...string) (stdout, stderr *syncBuffer) {
	t.Helper()
	f, out, errOut := testFactory("", nil)
	ctx, cancel := context.WithCancel(context.WithoutCancel(t.Context()))
	done := make(chan int, 1)
	go func() { done <- execute(ctx, f, args) }()
	t.Cleanup(func() {
		cancel()
		select {
		case code := <-done:
			if code != 0 {
				t.Errorf("%v: exit %d\nstderr:\n%s", args, code, errOut.String())
			}
		case <-time.After(30 * time.Second):
			t.Errorf("%v did not stop", args)
		}
	})
	return out, errOut
}

// waitAgents polls "nanite agents --json" until the given identities are
// all registered.
func waitAgents(t *testing.T, url string, ids ...string) []nanite.AgentState {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		r := runCLI(t.Context(), "", "agents", "--url", url, "--json", "--wait", "300ms")
		var agents []nanite.AgentState
		if r.code == 0 {
			if err := json.Unmarshal([]byte(r.out), &agents); err != nil {
				t.Fatalf("agents --json: %v\n%s", err, r.out)
			}
			have := 0
			for _, a := range agents {
				if slices.Contains(ids, a.Identity) {
					have++
				}
			}
			if have == len(ids) {
				return agents
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("agents %v did not register: exit %d, %s %s", ids, r.code, r.out, r.errOut)
		}
	}
}

func writeFile(t *testing.T, path, body string, mode os.FileMode) string {
	t.Helper()
	if err := os.WriteFile(path, []byte(body), mode); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestEndToEnd(t *testing.T) {
	rabbit := testenv.Rabbit(t)
	url := rabbit.NewVhost(t)
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "hello.sh"), `#!/bin/sh
read -r p
echo '{"intermediate":"progress","data":"started"}'
echo "hello is working" >&2
echo "{\"hello\": $p, \"service\": \"$NANITE_SERVICE\", \"agent\": \"$NANITE_AGENT\"}"
`, 0o755)
	writeFile(t, filepath.Join(dir, "broken.sh"), "#!/bin/sh\necho 'config missing' >&2\nexit 7\n", 0o755)
	actors := writeFile(t, filepath.Join(dir, "actors.yaml"), `
services:
  /ops/hello:
    command: ./hello.sh
    idempotent: true
  /ops/broken:
    command: ./broken.sh
`, 0o644)

	_, agent1Log := startDaemon(t, "agent", "--url", url, "--identity", "e2e-1", "--tags", "eu,web",
		"--actors", actors, "--heartbeat", "500ms", "--shutdown-grace", "2s")
	startDaemon(t, "agent", "--url", url, "--identity", "e2e-2", "--tags", "us", "--heartbeat", "500ms",
		"--shutdown-grace", "2s")
	waitAgents(t, url, "e2e-1", "e2e-2")

	ctx := t.Context()
	run := func(stdin string, args ...string) result {
		return runCLI(ctx, stdin, append([]string{args[0], "--url", url}, args[1:]...)...)
	}
	expect := func(t *testing.T, r result, code int, stdout string) {
		t.Helper()
		if r.code != code {
			t.Fatalf("exit %d, want %d\nstdout: %s\nstderr: %s", r.code, code, r.out, r.errOut)
		}
		if stdout != "" && r.out != stdout {
			t.Errorf("stdout %q, want %q\nstderr: %s", r.out, stdout, r.errOut)
		}
	}

	t.Run("say", func(t *testing.T) {
		expect(t, run("", "request", "/echo/say", `{"x": [1, 2]}`), 0, "{\n  \"x\": [\n    1,\n    2\n  ]\n}\n")
		expect(t, run("", "request", "/echo/say", "hello world"), 0, "\"hello world\"\n")
		expect(t, run("piped text\n", "request", "/echo/say", "-"), 0, "\"piped text\"\n")
		expect(t, run("", "request", "/echo/say"), 0, "null\n")
	})
	t.Run("stream", func(t *testing.T) {
		r := run("", "request", "--target", "e2e-1", "/echo/stream")
		expect(t, r, 0, "{\n  \"agent\": \"e2e-1\",\n  \"steps\": 3\n}\n")
		want := "[e2e-1] progress: {\"of\":3,\"step\":1}\n[e2e-1] progress: {\"of\":3,\"step\":2}\n[e2e-1] progress: {\"of\":3,\"step\":3}\n"
		if r.errOut != want {
			t.Errorf("stderr %q, want %q", r.errOut, want)
		}
	})
	t.Run("all", func(t *testing.T) {
		r := run("", "request", "--selector", "all", "--json", "/echo/time")
		expect(t, r, 0, "")
		var doc struct {
			Service string
			Results []struct {
				Agent  string
				Result struct{ Agent string }
			}
		}
		if err := json.Unmarshal([]byte(r.out), &doc); err != nil {
			t.Fatalf("%v\n%s", err, r.out)
		}
		var got []string
		for _, res := range doc.Results {
			if res.Agent != res.Result.Agent {
				t.Errorf("result of %s says agent %s", res.Agent, res.Result.Agent)
			}
			got = append(got, res.Agent)
		}
		slices.Sort(got)
		if doc.Service != "/echo/time" || !slices.Equal(got, []string{"e2e-1", "e2e-2"}) {
			t.Errorf("service %s, agents %v", doc.Service, got)
		}
		expect(t, run("", "request", "--selector", "all", "/echo/say", "7"), 0, "e2e-1: 7\ne2e-2: 7\n")
	})
	t.Run("tags", func(t *testing.T) {
		expect(t, run("", "request", "--selector", "all", "--tag", "us", "/echo/say", "1"), 0, "e2e-2: 1\n")
		expect(t, run("", "request", "--selector", "all", "--tag", "eu", "--tag", "web", "/echo/say", "1"), 0, "e2e-1: 1\n")
		expect(t, run("", "request", "--selector", "all", "--tag", "us", "--tag", "web", "--match-any-tag", "/echo/say", "1"),
			0, "e2e-1: 1\ne2e-2: 1\n")
		expect(t, run("", "request", "--tag", "us", "--tag", "web", "/echo/say", "1"), exitNoAgent, "")
	})
	t.Run("no agent", func(t *testing.T) {
		r := run("", "request", "/nope/nothing")
		expect(t, r, exitNoAgent, "")
		if !strings.Contains(r.errOut, "/nope/nothing") {
			t.Errorf("stderr %q", r.errOut)
		}
		expect(t, run("", "request", "--target", "ghost", "/echo/say"), exitNoAgent, "")
	})
	t.Run("timeout", func(t *testing.T) {
		start := time.Now()
		r := run("", "request", "--timeout", "700ms", "/echo/slow", `{"ms": 10000}`)
		expect(t, r, exitTimeout, "")
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("took %v", d)
		}
	})
	t.Run("remote error", func(t *testing.T) {
		r := run("", "request", "/echo/fail", `"out of cheese"`)
		expect(t, r, exitRemote, "")
		if !strings.Contains(r.errOut, "out of cheese") {
			t.Errorf("stderr %q", r.errOut)
		}
		r = run("", "request", "--selector", "all", "/echo/fail")
		expect(t, r, exitRemote, "")
		if !strings.Contains(r.errOut, "e2e-1: error: handler_error: failed as asked") || !strings.Contains(r.errOut, "2 of 2 agents") {
			t.Errorf("stderr %q", r.errOut)
		}
	})
	t.Run("external", func(t *testing.T) {
		r := run("", "request", "/ops/hello", `"world"`)
		expect(t, r, 0, "{\n  \"hello\": \"world\",\n  \"service\": \"/ops/hello\",\n  \"agent\": \"e2e-1\"\n}\n")
		if r.errOut != "[e2e-1] progress: \"started\"\n" {
			t.Errorf("stderr %q", r.errOut)
		}
		r = run("", "request", "/ops/broken")
		expect(t, r, exitRemote, "")
		if !strings.Contains(r.errOut, "config missing") {
			t.Errorf("stderr %q", r.errOut)
		}
	})
	t.Run("push", func(t *testing.T) {
		expect(t, run("", "push", "--selector", "all", "/echo/say", "pushed"), 0, "")
		expect(t, run("", "push", "/nope/x"), exitNoAgent, "")
	})
	t.Run("agents", func(t *testing.T) {
		r := run("", "agents", "--services")
		expect(t, r, 0, "")
		lines := strings.Split(strings.TrimSpace(r.out), "\n")
		if len(lines) != 3 || !strings.HasPrefix(lines[0], "IDENTITY") {
			t.Fatalf("table:\n%s", r.out)
		}
		row := regexp.MustCompile(`^e2e-1\s+/echo/fail,/echo/say,/echo/slow,/echo/stream,/echo/time,/ops/broken,/ops/hello\s+eu,web\s+\d+\.\d\d\s+0\s+\d+\.\ds ago\s+` + regexp.QuoteMeta(nanite.Version) + `$`)
		if !row.MatchString(lines[1]) {
			t.Errorf("row %q", lines[1])
		}
		if !strings.HasPrefix(lines[2], "e2e-2 ") || !strings.Contains(lines[2], " us ") {
			t.Errorf("row %q", lines[2])
		}
	})
	t.Run("failsafe via mapper daemon", func(t *testing.T) {
		_, mapperLog := startDaemon(t, "mapper", "--url", url, "--report-interval", "200ms")
		late := writeFile(t, filepath.Join(dir, "late.yaml"), "services:\n  /late/job:\n    command: ./hello.sh\n", 0o644)
		done := make(chan result, 1)
		go func() {
			done <- run("", "request", "--failsafe", "--timeout", "20s", "/late/job", "1")
		}()
		// The request waits in the offline queue until an agent offering
		// the service appears.
		time.Sleep(3 * time.Second)
		select {
		case r := <-done:
			t.Fatalf("request ended before any agent offered the service: %+v", r)
		default:
		}
		startDaemon(t, "agent", "--url", url, "--identity", "e2e-late", "--actors", late, "--no-examples")
		select {
		case r := <-done:
			expect(t, r, 0, "{\n  \"hello\": 1,\n  \"service\": \"/late/job\",\n  \"agent\": \"e2e-late\"\n}\n")
		case <-time.After(20 * time.Second):
			t.Fatal("the failsafe request did not finish")
		}
		if !strings.Contains(mapperLog.String(), "msg=cluster agents=") {
			t.Errorf("the mapper daemon did not report the cluster:\n%s", mapperLog.String())
		}
	})

	if !strings.Contains(agent1Log.String(), `msg="agent starting" agent=e2e-1`) {
		t.Errorf("agent log:\n%s", agent1Log.String())
	}
}

func TestBadActorsFile(t *testing.T) {
	dir := t.TempDir()
	bad := writeFile(t, filepath.Join(dir, "actors.yaml"), "services:\n  /ops/x:\n    command: ./missing.sh\n  nope:\n    command: ls\n", 0o644)
	r := runCLI(t.Context(), "", "agent", "--url", "amqp://guest:guest@127.0.0.1:1/", "--actors", bad)
	if r.code != exitUsage || !strings.Contains(r.errOut, `"/ops/x": command "./missing.sh"`) || !strings.Contains(r.errOut, `"nope": not a service name`) {
		t.Errorf("exit %d, stderr %s", r.code, r.errOut)
	}
	typo := writeFile(t, filepath.Join(dir, "typo.yaml"), "services:\n  /ops/x:\n    comand: ls\n", 0o644)
	r = runCLI(t.Context(), "", "agent", "--url", "amqp://guest:guest@127.0.0.1:1/", "--actors", typo)
	if r.code != exitUsage || !strings.Contains(r.errOut, "comand") {
		t.Errorf("exit %d, stderr %s", r.code, r.errOut)
	}
}

func TestWrongCredentials(t *testing.T) {
	rabbit := testenv.Rabbit(t)
	url := strings.Replace(rabbit.URL(), "guest:guest", "guest:wrong", 1)
	r := runCLI(t.Context(), "", "request", "--url", url, "/echo/say")
	if r.code != exitConnection || !strings.Contains(r.errOut, "cannot connect") || strings.Contains(r.errOut, "wrong") {
		t.Errorf("exit %d, stderr %s", r.code, r.errOut)
	}
	f, _, errOut := testFactory("", nil)
	if code := execute(t.Context(), f, []string{"agent", "--url", url}); code != exitConnection {
		t.Errorf("agent: exit %d, stderr %s", code, errOut.String())
	}
}

func TestDevCommand(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a RabbitMQ node of its own")
	}
	testenv.Require(t, "rabbitmq-server", "rabbitmqctl")
	out, errOut := startDaemon(t, "dev", "--agents", "2")
	var url string
	deadline := time.Now().Add(90 * time.Second)
	for url == "" {
		if m := regexp.MustCompile(`(?m)^  broker\s+(\S+)$`).FindStringSubmatch(out.String()); m != nil && strings.Contains(out.String(), "Press Ctrl-C") {
			url = m[1]
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("dev did not start:\n%s\n%s", out.String(), errOut.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !strings.Contains(out.String(), "nanite request --url '"+url+"' /echo/say '\"hi\"'") {
		t.Errorf("no example command in:\n%s", out.String())
	}
	r := runCLI(t.Context(), "", "request", "--url", url, "--selector", "all", "/echo/say", `"hi"`)
	if r.code != 0 || r.out != "dev-agent-1: \"hi\"\ndev-agent-2: \"hi\"\n" {
		t.Errorf("request: exit %d, %q %q", r.code, r.out, r.errOut)
	}
	r = runCLI(t.Context(), "", "request", "--url", url, "--tag", "green", "/echo/time")
	if r.code != 0 || !strings.Contains(r.out, "dev-agent-2") {
		t.Errorf("request --tag green: exit %d, %q %q", r.code, r.out, r.errOut)
	}
}
