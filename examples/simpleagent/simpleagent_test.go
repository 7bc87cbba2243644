package simpleagent_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nanite-go/nanite/testenv"
)

// TestWalkthrough builds the two programs, starts two agents (one tagged
// demo) and runs the requester the way README.md says, checking what it
// prints.
func TestWalkthrough(t *testing.T) {
	url := testenv.Rabbit(t).NewVhost(t)
	bin := t.TempDir()
	for _, prog := range []string{"agent", "requester"} {
		cmd := exec.CommandContext(t.Context(), "go", "build", "-o", filepath.Join(bin, prog), "./"+prog)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build ./%s: %v\n%s", prog, err, out)
		}
	}
	env := append(os.Environ(), "NANITE_URL="+url)

	for _, args := range [][]string{{"-identity", "simple-1", "-tags", "demo"}, {"-identity", "simple-2"}} {
		var logs bytes.Buffer
		agent := exec.Command(filepath.Join(bin, "agent"), args...)
		agent.Env = env
		agent.Stderr = &logs
		if err := agent.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			// SIGTERM: the agent unregisters and exits 0.
			_ = agent.Process.Signal(syscall.SIGTERM)
			done := make(chan error, 1)
			go func() { done <- agent.Wait() }()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("agent %v: %v\n%s", args, err, logs.String())
				}
			case <-time.After(15 * time.Second):
				_ = agent.Process.Kill()
				<-done
				t.Errorf("agent %v did not stop on SIGTERM\n%s", args, logs.String())
			}
			if t.Failed() {
				t.Logf("agent %v logs:\n%s", args, logs.String())
			}
		})
	}

	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	req := exec.CommandContext(ctx, filepath.Join(bin, "requester"), "-agents", "2")
	req.Env = env
	out, err := req.CombinedOutput()
	t.Logf("requester output:\n%s", out)
	if err != nil {
		t.Fatalf("requester: %v", err)
	}
	for _, want := range []string{
		"agents:\n  simple-1 ",
		"  simple-2 ",
		`/simple/echo (least_loaded) from simple-`,
		`: "hello nanite :)"`,
		"/simple/time (all) from simple-1:",
		"/simple/time (all) from simple-2:",
		"/simple/count (random) from simple-",
		"intermediate count=1 count=2 count=3, final {\"counted\":3}",
		"/simple/slow (rr, 200 ms) from simple-",
		"timed out as expected",
		`/simple/echo (tag demo) from simple-1: "tagged"`,
		"/nanite/info (target simple-1): version ",
		"/simple/nothing: nanite: no agent available",
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("requester output lacks %q", want)
		}
	}
}
