package bridge

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"mellium.im/xmpp/jid"

	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/testenv"
)

// The helper agent runs in a child process so that a test can kill it
// with SIGKILL, as a crashed machine would (see TestMain).
const helperEnv = "NANITE_BRIDGE_TEST_HELPER_AGENT"

// workActor serves /work/who (the agent's identity), /work/echo (the
// payload), /work/stream (3 intermediates, then "done"), /work/fail (an
// error) and /work/slow (waits for the payload's "ms", after an
// intermediate "started"), counting the requests it handles.
func workActor(id string, count *atomic.Int64) *nanite.Actor {
	inc := func() {
		if count != nil {
			count.Add(1)
		}
	}
	return nanite.NewActor("work").
		Expose("who", func(ctx context.Context, r *nanite.Request) (any, error) {
			inc()
			return id, nil
		}).
		Expose("echo", func(ctx context.Context, r *nanite.Request) (any, error) {
			inc()
			return r.Payload, nil
		}).
		Expose("stream", func(ctx context.Context, r *nanite.Request) (any, error) {
			inc()
			for i := range 3 {
				if err := r.Intermediate(ctx, "progress", i); err != nil {
					return nil, err
				}
			}
			return "done", nil
		}).
		Expose("fail", func(ctx context.Context, r *nanite.Request) (any, error) {
			inc()
			return nil, fmt.Errorf("%s broke", id)
		}).
		Expose("info", func(ctx context.Context, r *nanite.Request) (any, error) {
			inc()
			return map[string]any{"persistent": r.Persistent, "hops": r.Hops}, nil
		}).
		Expose("slow", func(ctx context.Context, r *nanite.Request) (any, error) {
			inc()
			var in struct{ MS int }
			_ = r.Decode(&in)
			_ = r.Intermediate(ctx, "started", id)
			select {
			case <-time.After(time.Duration(in.MS) * time.Millisecond):
				return id, nil
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		})
}

// siteAgent runs an in-process agent with a fixed load serving actors.
func siteAgent(t *testing.T, url, id string, load float64, actors ...*nanite.Actor) (stop func()) {
	t.Helper()
	a, err := nanite.NewAgent(nanite.AgentConfig{URL: url, Identity: id, HeartbeatInterval: 300 * time.Millisecond,
		Status: func() float64 { return load }})
	if err != nil {
		t.Fatal(err)
	}
	for _, act := range actors {
		a.AddActor(act)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); <-done }) }
	t.Cleanup(stop)
	rctx, rcancel := context.WithTimeout(ctx, 15*time.Second)
	defer rcancel()
	if err := a.Ready(rctx); err != nil {
		t.Fatal(err)
	}
	return stop
}

func runHelperAgent() int {
	var cfg struct{ URL, Identity string }
	if err := json.Unmarshal([]byte(os.Getenv(helperEnv)), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	a, err := nanite.NewAgent(nanite.AgentConfig{URL: cfg.URL, Identity: cfg.Identity,
		HeartbeatInterval: 200 * time.Millisecond, Status: func() float64 { return 0 },
		Logger: slog.New(slog.NewTextHandler(os.Stderr, nil))})
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 2
	}
	a.AddActor(workActor(cfg.Identity, nil))
	if err := a.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 1
	}
	return 0
}

// startHelperAgent starts an agent serving workActor in a child process.
func startHelperAgent(t *testing.T, url, identity string) *exec.Cmd {
	t.Helper()
	cfg, _ := json.Marshal(map[string]any{"URL": url, "Identity": identity})
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+string(cfg))
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start helper agent: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return cmd
}

// runBridge runs a bridge for the YAML config; stop ends it (also at the
// end of the test).
func runBridge(t *testing.T, yml string) (*Bridge, func()) {
	t.Helper()
	cfg, err := ParseConfig("test.yaml", []byte(yml))
	if err != nil {
		t.Fatal(err)
	}
	var logger *slog.Logger
	if os.Getenv("NANITE_TEST_DEBUG") != "" {
		logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("bridge", cfg.XMPP.Domain)
	}
	b, err := New(cfg, Options{Logger: logger, MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
		PresenceInterval: 200 * time.Millisecond, DiscoveryInterval: 2 * time.Second,
		Mapper: func(_ string, mc *nanite.MapperConfig) {
			mc.Warmup = 100 * time.Millisecond
			mc.AgentTimeout = 1500 * time.Millisecond
		},
		Agent: func(_ string, ac *nanite.AgentConfig) { ac.HeartbeatInterval = 300 * time.Millisecond }})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Bridge.Run %s: %v", b.Domain(), err)
			}
		})
	}
	t.Cleanup(stop)
	rctx, rcancel := context.WithTimeout(ctx, 15*time.Second)
	defer rcancel()
	if err := b.Ready(rctx); err != nil {
		t.Fatal(err)
	}
	return b, stop
}

// twoSiteConfigs returns the configs of bridge A (imports B's /work/*,
// /solo/*) and bridge B (exports them to A and to alice@site-a.test).
func twoSiteConfigs(comp, urlA, urlB string, jidB jid.JID) (cfgA, cfgB string) {
	cfgA = `
xmpp:
  server: ` + comp + `
  domain: ` + domA + `
  secret: ` + secret + `
clusters:
  - name: app
    url: ` + urlA + `
    imports:
      - from: ` + jidB.String() + `
        services: ["/work/*", "/solo/*"]
        as_tags: ["site:b"]
`
	cfgB = `
xmpp:
  server: ` + comp + `
  domain: ` + domB + `
  secret: ` + secret + `
clusters:
  - name: app
    url: ` + urlB + `
    exports:
      - services: ["/work/*", "/solo/*"]
        to: ["` + domA + `", "alice@` + siteDomain + `"]
`
	return cfgA, cfgB
}

// eventually polls f until it returns nil or 15 s pass.
func eventually(t *testing.T, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v", what, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func proxyOf(m *nanite.Mapper, remote jid.JID) (nanite.AgentState, bool) {
	for _, a := range m.Agents() {
		if a.Identity == ProxyIdentity(remote) {
			return a, true
		}
	}
	return nanite.AgentState{}, false
}

func offersService(a nanite.AgentState, svc string) bool {
	return slices.ContainsFunc(a.Services, func(s nanite.ServiceInfo) bool { return s.Name == svc })
}

// TestTwoSites: site A and site B on two RabbitMQ nodes, one prosody with
// both component domains, two bridges; two agents at B with different
// loads, a requester at A. The requester calls B's services through A's
// proxy: least-loaded at B, a specific agent by JID, a fan-out, streamed
// intermediates, errors; the proxy follows B's agents (load, an agent
// leaving); a plain XMPP client calls B's cluster JID.
func TestTwoSites(t *testing.T) {
	rabbitB := testenv.RunRabbitMQ(t, testenv.RabbitOptions{Name: "site-b"})
	urlA, urlB := testenv.Rabbit(t).NewVhost(t), rabbitB.NewVhost(t)
	p := testenv.RunProsody(t, testenv.ProsodyOptions{
		VirtualHosts: []string{siteDomain},
		Components:   map[string]string{domA: secret, domB: secret},
		Accounts:     []testenv.Account{{User: "alice", Host: siteDomain, Password: password}},
	})
	jidB := vhostJID(t, urlB, domB)
	var countB1, countB2 atomic.Int64
	stopB1 := siteAgent(t, urlB, "b1", 0.5, workActor("b1", &countB1),
		nanite.NewActor("solo").Expose("ping", func(ctx context.Context, r *nanite.Request) (any, error) { return "pong", nil }))
	siteAgent(t, urlB, "b2", 0.2, workActor("b2", &countB2))
	cfgA, cfgB := twoSiteConfigs(p.ComponentAddr(), urlA, urlB, jidB)
	bB, _ := runBridge(t, cfgB)
	bA, _ := runBridge(t, cfgA)
	req := requester(t, urlA)
	ctx := t.Context()

	// The proxy stands for B with B's lowest load (b2's 0.2), from presence.
	eventually(t, "proxy at A with B's load", func() error {
		a, ok := proxyOf(req, jidB)
		if !ok || !offersService(a, "/solo/ping") || !offersService(a, "/work/who") {
			return fmt.Errorf("proxy %+v", a)
		}
		if a.Status != 0.2 {
			return fmt.Errorf("proxy status %v, want 0.2", a.Status)
		}
		if !slices.Contains(a.Tags, nanite.GatewayTag(jidB.String())) || !slices.Contains(a.Tags, "site:b") {
			return fmt.Errorf("proxy tags %v", a.Tags)
		}
		return nil
	})

	call := func(svc string, payload any, opts ...nanite.RequestOption) (*nanite.Response, error) {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		return req.Request(cctx, svc, payload, opts...)
	}
	who := func(resp *nanite.Response, err error) string {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		var s string
		if err := resp.Decode(&s); err != nil {
			t.Fatal(err)
		}
		return s
	}
	// Least loaded at B.
	if got := who(call("/work/who", nil)); got != "b2" {
		t.Errorf("least loaded at B: %q, want b2", got)
	}
	// The same JSON on both sides.
	in := json.RawMessage(`{"a":[1,2.5,"x"],"b":{"c":null,"d":true},"e":"\u00e9\n"}`)
	resp, err := call("/work/echo", in)
	if err != nil {
		t.Fatal(err)
	}
	jsonEqual(t, resp.Results[0].Payload, in)
	// A specific agent at B by JID; an agent B does not have.
	b1 := nanite.TargetXMPP + jidB.String() + "/b1"
	if got := who(call("/work/who", nil, nanite.WithTarget(b1))); got != "b1" {
		t.Errorf("target %s: %q", b1, got)
	}
	_, err = call("/work/who", nil, nanite.WithTarget(nanite.TargetXMPP+jidB.String()+"/nobody"))
	var re *nanite.RemoteError
	if !errors.As(err, &re) || re.Code != CodeNoAgent {
		t.Errorf("target of an agent B does not have: %v, want %s", err, CodeNoAgent)
	}
	// Fan-out: one result per agent at B, named by its JID.
	resp, err = call("/work/who", nil, nanite.WithSelector(nanite.SelectAll))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range resp.Results {
		var s string
		if err := r.Decode(&s); err != nil {
			t.Fatal(err)
		}
		got = append(got, r.Agent+"="+s)
	}
	sort.Strings(got)
	want := []string{nanite.TargetXMPP + jidB.String() + "/b1=b1", nanite.TargetXMPP + jidB.String() + "/b2=b2"}
	if !slices.Equal(got, want) {
		t.Errorf("fan-out: %v, want %v", got, want)
	}
	// Fan-out of an error: each agent's error, named.
	resp, err = call("/work/fail", nil, nanite.WithSelector(nanite.SelectAll))
	if err != nil || len(resp.Results) != 2 {
		t.Fatalf("fan-out of /work/fail: %v %+v", err, resp)
	}
	for _, r := range resp.Results {
		if !errors.As(r.Err, &re) || re.Code != nanite.CodeHandler {
			t.Errorf("fan-out error from %s: %v", r.Agent, r.Err)
		}
	}
	// Streamed intermediates, in order, then the result.
	var mu sync.Mutex
	var steps []string
	resp, err = call("/work/stream", nil, nanite.OnIntermediate(func(in nanite.Intermediate) {
		mu.Lock()
		steps = append(steps, in.Key+":"+string(in.Payload))
		mu.Unlock()
	}))
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	if !slices.Equal(steps, []string{"progress:0", "progress:1", "progress:2"}) || string(resp.Results[0].Payload) != `"done"` {
		t.Errorf("stream: %v then %s", steps, resp.Results[0].Payload)
	}
	mu.Unlock()
	// An error with the handler's message.
	_, err = call("/work/fail", nil, nanite.WithTarget(b1))
	if !errors.As(err, &re) || re.Code != nanite.CodeHandler || re.Message != "b1 broke" {
		t.Errorf("/work/fail: %v", err)
	}

	// A persistent request stays persistent across the XMPP leg; the hop
	// record holds both bridges.
	resp, err = call("/work/info", nil, nanite.Persistent())
	if err != nil {
		t.Fatal(err)
	}
	jsonEqual(t, resp.Results[0].Payload, json.RawMessage(`{"persistent":true,"hops":["`+domA+`","`+domB+`"]}`))

	// A plain XMPP client at site A calls B's cluster JID.
	alice, _ := client(t, p, "alice", nil)
	res, err := alice.Call(ctx, jidB, "/work/echo", in)
	if err != nil {
		t.Fatal(err)
	}
	jsonEqual(t, res.Data[0], in)

	// Every request above reached B exactly once per agent that ran it.
	if n := countB1.Load() + countB2.Load(); n != 11 {
		t.Errorf("B's agents handled %d requests (b1 %d, b2 %d), want 11", n, countB1.Load(), countB2.Load())
	}

	// b1 leaves: B says it is unavailable, A's proxy stops offering
	// /solo/ping (only b1 had it) and a request for it fails at once.
	stopB1()
	eventually(t, "proxy without /solo/ping", func() error {
		if a, ok := proxyOf(req, jidB); ok && offersService(a, "/solo/ping") {
			var atB []string
			for _, x := range bB.Mapper("app").Agents() {
				atB = append(atB, fmt.Sprintf("%s %v", x.Identity, x.Services))
			}
			return fmt.Errorf("proxy still offers /solo/ping; B's mapper sees %v", atB)
		}
		return nil
	})
	start := time.Now()
	_, err = call("/solo/ping", nil)
	if !errors.Is(err, nanite.ErrNoAgent) || time.Since(start) > 5*time.Second {
		t.Errorf("/solo/ping after b1 left: %v after %v, want ErrNoAgent at once", err, time.Since(start))
	}
	resp, err = call("/work/who", nil, nanite.WithSelector(nanite.SelectAll))
	if err != nil || len(resp.Results) != 1 || resp.Results[0].Agent != nanite.TargetXMPP+jidB.String()+"/b2" {
		t.Errorf("fan-out after b1 left: %v %+v", err, resp)
	}
	st := bA.Stats()
	// Out of A: 9 requests before b1 left, 1 after; into B: those but the
	// one for /nobody (refused no_agent), and alice's.
	if st.RelayedOut != 10 {
		t.Errorf("bridge A relayed %d requests out, want 10", st.RelayedOut)
	}
	if sb := bB.Stats(); sb.Relayed != 10 || sb.Refused[RefuseNoAgent] != 1 {
		t.Errorf("bridge B relayed %d ops in, want 10, and refused %d for no agent, want 1 (stats %+v)", sb.Relayed, sb.Refused[RefuseNoAgent], sb)
	}
}
