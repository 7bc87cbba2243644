// Command demo is the README's first command: it starts a private RabbitMQ,
// a mapper daemon and three agents (each in its own process), sends requests
// with every selector, kills an agent in the middle of its work and shows
// what the cluster does about it.
//
//	go run ./examples/demo
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/testenv"
)

const childEnv = "NANITE_DEMO_AGENT"

type childConfig struct {
	URL, Name string
	Load      float64
	Tags      []string
}

func main() {
	if cfg := os.Getenv(childEnv); cfg != "" {
		os.Exit(runChild(cfg))
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

// runChild is one agent process.
func runChild(raw string) int {
	var cfg childConfig
	if err := json.Unmarshal([]byte(raw), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	a, err := nanite.NewAgent(nanite.AgentConfig{URL: cfg.URL, Identity: cfg.Name, Tags: cfg.Tags,
		HeartbeatInterval: 500 * time.Millisecond, Status: func() float64 { return cfg.Load }})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	name := cfg.Name
	work := func(ctx context.Context, r *nanite.Request) (any, error) {
		var ms int
		_ = r.Decode(&ms)
		_ = r.Intermediate(ctx, "started", name)
		select {
		case <-time.After(time.Duration(ms) * time.Millisecond):
			return "done by " + name, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	a.AddActor(nanite.NewActor("demo").
		Expose("whoami", func(context.Context, *nanite.Request) (any, error) { return name, nil }, nanite.Idempotent()).
		Expose("count", func(ctx context.Context, r *nanite.Request) (any, error) {
			for i := 1; i <= 3; i++ {
				_ = r.Intermediate(ctx, "tick", i)
				time.Sleep(100 * time.Millisecond)
			}
			return "counted to 3", nil
		}).
		Expose("resize", work, nanite.Idempotent(), nanite.Describe("safe to run twice")).
		Expose("charge", work, nanite.Describe("must not run twice")))
	if err := a.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

type demo struct {
	url   string
	m     *nanite.Mapper
	procs map[string]*exec.Cmd
}

func say(format string, args ...any) { fmt.Printf(format+"\n", args...) }

func step(title string) { fmt.Printf("\n== %s\n", title) }

func run(ctx context.Context) error {
	step("starting a private RabbitMQ node (about 5 s)")
	if missing := testenv.Missing("rabbitmq-server"); len(missing) > 0 {
		return fmt.Errorf("missing %v: run `make demo` as root, or apt-get install -y rabbitmq-server", missing)
	}
	r, err := testenv.StartRabbitMQ(ctx, testenv.RabbitOptions{Name: "demo"})
	if err != nil {
		return err
	}
	defer r.Close()
	say("broker: %s", r.URL())

	d := &demo{url: r.URL(), procs: map[string]*exec.Cmd{}}
	defer d.killAll()

	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	daemon, err := nanite.NewMapper(nanite.MapperConfig{URL: d.url, ServeAgentRequests: true, ServeFailsafe: true, Logger: logger})
	if err != nil {
		return err
	}
	d.m, err = nanite.NewMapper(nanite.MapperConfig{URL: d.url, Logger: logger})
	if err != nil {
		return err
	}
	mctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	for _, m := range []*nanite.Mapper{daemon, d.m} {
		wg.Add(1)
		go func() { defer wg.Done(); _ = m.Run(mctx) }()
	}

	step("starting three agents, each its own process")
	for _, c := range []childConfig{
		{Name: "alpha", Load: 1.5, Tags: []string{"eu", "big"}},
		{Name: "bravo", Load: 0.2, Tags: []string{"eu"}},
		{Name: "charlie", Load: 0.5, Tags: []string{"us"}},
	} {
		if err := d.start(c); err != nil {
			return err
		}
	}
	wctx, wcancel := context.WithTimeout(ctx, 20*time.Second)
	defer wcancel()
	if err := d.m.WaitForAgents(wctx, "/demo/whoami", 3); err != nil {
		return err
	}
	d.table()

	step("least_loaded (default): bravo reports the lowest load")
	for range 3 {
		d.call("/demo/whoami", nil)
	}
	step("least_loaded with a burst of 6 slow requests: in-flight requests count as load, so the burst spreads")
	d.burst(6)
	step("all: one result per agent")
	d.call("/demo/whoami", nil, nanite.WithSelector(nanite.SelectAll))
	step("rr: round robin")
	for range 3 {
		d.call("/demo/whoami", nil, nanite.WithSelector(nanite.SelectRoundRobin))
	}
	step("random")
	d.call("/demo/whoami", nil, nanite.WithSelector(nanite.SelectRandom))
	step("target by identity, and tag filters")
	d.call("/demo/whoami", nil, nanite.WithTarget("charlie"))
	d.call("/demo/whoami", nil, nanite.WithSelector(nanite.SelectAll), nanite.WithTags("eu"))
	d.call("/demo/whoami", nil, nanite.WithTags("big", "us"), nanite.MatchAnyTag(), nanite.WithSelector(nanite.SelectAll))
	step("streamed intermediate results")
	d.call("/demo/count", nil, nanite.OnIntermediate(func(i nanite.Intermediate) {
		say("   ... %s sent %s=%s", i.Agent, i.Key, i.Payload)
	}))
	step("errors are explicit, never a hang")
	d.call("/demo/nosuch", nil)
	d.call("/demo/resize", 5000, nanite.WithTimeout(500*time.Millisecond))

	step("failover: bravo is killed (SIGKILL) while it works on two requests")
	var fwg sync.WaitGroup
	started := make(chan string, 4)
	onStart := nanite.OnIntermediate(func(i nanite.Intermediate) { started <- i.Agent })
	for _, req := range []struct {
		svc  string
		opts []nanite.RequestOption
	}{
		// Not idempotent, sent to bravo by name.
		{"/demo/charge", []nanite.RequestOption{nanite.WithTarget("bravo")}},
		// Idempotent, least-loaded among the "eu" agents: bravo again
		// (load 0.2 + 1 in flight is still below alpha's 1.5).
		{"/demo/resize", []nanite.RequestOption{nanite.WithTags("eu")}},
	} {
		fwg.Add(1)
		go func() {
			defer fwg.Done()
			d.call(req.svc, 3000, append(req.opts, onStart, nanite.WithTimeout(20*time.Second))...)
		}()
		say("   %s started on %s", req.svc, <-started)
	}
	say("   both requests are running; killing bravo")
	d.kill("bravo")
	fwg.Wait()
	say("   /demo/resize is idempotent: retried on another agent. /demo/charge is not: reported as agent_lost.")
	time.Sleep(2 * time.Second)
	d.table()
	step("after the failover, requests go to the agents that are left")
	d.call("/demo/whoami", nil, nanite.WithSelector(nanite.SelectAll))

	step("what the mapper counted")
	st := d.m.Stats()
	say("   requests=%d results=%d timeouts=%d no_agent=%d retries=%d agent_lost=%d agents_dropped=%d",
		st["requests"], st["results"], st["timeouts"], st["no_agent"], st["retries"], st["agent_lost"], st["agents_dropped"])
	say("\ndone: run `go run ./cmd/nanite dev` for a cluster that keeps running, or `make test` for the suite.")
	return nil
}

func (d *demo) start(c childConfig) error {
	c.URL = d.url
	raw, _ := json.Marshal(c)
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), childEnv+"="+string(raw))
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start agent %s: %w", c.Name, err)
	}
	d.procs[c.Name] = cmd
	say("   agent %-8s pid %-7d load %.1f tags %v", c.Name, cmd.Process.Pid, c.Load, c.Tags)
	return nil
}

func (d *demo) kill(name string) {
	if p := d.procs[name]; p != nil {
		_ = p.Process.Kill()
		_ = p.Wait()
		delete(d.procs, name)
	}
}

func (d *demo) killAll() {
	for name, p := range d.procs {
		_ = p.Process.Signal(syscall.SIGTERM)
		_ = p.Wait()
		delete(d.procs, name)
	}
}

func (d *demo) table() {
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "   IDENTITY\tLOAD\tTAGS\tSERVICES\tLAST SEEN")
	for _, a := range d.m.Agents() {
		fmt.Fprintf(w, "   %s\t%.1f\t%s\t%d\t%s ago\n", a.Identity, a.Status, strings.Join(a.Tags, ","), len(a.Services),
			time.Since(a.LastSeen).Round(time.Millisecond))
	}
	_ = w.Flush()
}

func (d *demo) call(svc string, payload any, opts ...nanite.RequestOption) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	t0 := time.Now()
	resp, err := d.m.Request(ctx, svc, payload, opts...)
	took := time.Since(t0).Round(100 * time.Microsecond)
	if resp != nil {
		for _, r := range resp.Results {
			if r.Err != nil {
				say("   %s -> %s: error: %v", svc, r.Agent, r.Err)
			} else {
				say("   %s -> %s: %s", svc, r.Agent, r.Payload)
			}
		}
	}
	if err != nil && (resp == nil || len(resp.Results) == 0 || errors.Is(err, nanite.ErrTimeout)) {
		say("   %s -> error after %v: %v", svc, took, err)
	}
}

func (d *demo) burst(n int) {
	var wg sync.WaitGroup
	var mu sync.Mutex
	count := map[string]int{}
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := d.m.Request(context.Background(), "/demo/resize", 300)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				count["error"]++
				return
			}
			count[resp.Results[0].Agent]++
		}()
	}
	wg.Wait()
	say("   %v", count)
}
