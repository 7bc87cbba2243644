package nanite

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"syscall"
	"testing"
	"time"
)

// The helper agent runs in a child process so that tests can kill it with
// SIGKILL, as a crashed machine would.
const helperEnv = "NANITE_TEST_HELPER_AGENT"

// helperActor serves /work/slow (not idempotent) and /work/idem
// (idempotent): both sleep for the payload's "ms" and answer with the agent
// identity.
func helperActor(id string) *Actor {
	h := func(ctx context.Context, r *Request) (any, error) {
		var in struct{ MS int }
		if err := r.Decode(&in); err != nil {
			return nil, err
		}
		_ = r.Intermediate(ctx, "started", id)
		select {
		case <-time.After(time.Duration(in.MS) * time.Millisecond):
			return map[string]string{"agent": id}, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return NewActor("work").Expose("slow", h).Expose("idem", h, Idempotent())
}

func runHelperAgent() int {
	var cfg struct {
		URL, Identity, DataDir string
		HeartbeatMS            int
	}
	if err := json.Unmarshal([]byte(os.Getenv(helperEnv)), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	a, err := NewAgent(AgentConfig{URL: cfg.URL, Identity: cfg.Identity, DataDir: cfg.DataDir,
		HeartbeatInterval: time.Duration(cfg.HeartbeatMS) * time.Millisecond,
		Status:            func() float64 { return 0 },
		Logger:            slog.New(slog.NewTextHandler(os.Stderr, nil))})
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 2
	}
	a.AddActor(helperActor(a.Identity()))
	if err := a.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 1
	}
	return 0
}

// startHelperAgent starts an agent in a child process and returns it; the
// test kills it with cmd.Process.Kill().
func startHelperAgent(t *testing.T, url, identity string, heartbeat time.Duration) *exec.Cmd {
	t.Helper()
	cfg, _ := json.Marshal(map[string]any{"URL": url, "Identity": identity, "HeartbeatMS": heartbeat.Milliseconds()})
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+string(cfg))
	cmd.Stderr = &testWriter{t: t, prefix: "helper " + identity + ": "}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start helper agent: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return cmd
}

type testWriter struct {
	t      *testing.T
	prefix string
}

func (w *testWriter) Write(b []byte) (int, error) {
	defer func() { _ = recover() }() // the test may have ended
	w.t.Log(w.prefix + string(b))
	return len(b), nil
}
