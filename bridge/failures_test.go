package bridge

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/testenv"
)

// outcome is how one request across the sites ended.
type outcome struct {
	what string
	took time.Duration
	err  error
}

// TestSiteFailures: the two-site set-up of TestTwoSites under failures. A
// remote agent killed mid-request, a graceful restart of bridge B with an
// op in flight, a restart of site B's broker, a restart of prosody: every
// request ends with its result or a clear error by its deadline, and the
// sites work again after each failure.
func TestSiteFailures(t *testing.T) {
	rabbitB := testenv.RunRabbitMQ(t, testenv.RabbitOptions{Name: "site-b"})
	urlA, urlB := testenv.Rabbit(t).NewVhost(t), rabbitB.NewVhost(t)
	p := testenv.RunProsody(t, testenv.ProsodyOptions{
		VirtualHosts: []string{siteDomain},
		Components:   map[string]string{domA: secret, domB: secret},
	})
	jidB := vhostJID(t, urlB, domB)
	killed := startHelperAgent(t, urlB, "k1")
	siteAgent(t, urlB, "b2", 0.2, workActor("b2", nil))
	cfgA, cfgB := twoSiteConfigs(p.ComponentAddr(), urlA, urlB, jidB)
	bB, stopB := runBridge(t, cfgB)
	runBridge(t, cfgA)
	req := requester(t, urlA)
	ctx := t.Context()
	if err := bB.Mapper("app").WaitForAgents(ctx, "/work/slow", 2); err != nil {
		t.Fatal(err)
	}

	const timeout = 8 * time.Second
	var mu sync.Mutex
	var outcomes []outcome
	call := func(what, svc string, payload any, opts ...nanite.RequestOption) (*nanite.Response, error) {
		start := time.Now()
		cctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		resp, err := req.Request(cctx, svc, payload, append(opts, nanite.WithTimeout(timeout))...)
		mu.Lock()
		outcomes = append(outcomes, outcome{what, time.Since(start), err})
		mu.Unlock()
		return resp, err
	}
	works := func(what string) {
		t.Helper()
		start, tries := time.Now(), 0
		eventually(t, what, func() error {
			tries++
			cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			defer cancel()
			resp, err := req.Request(cctx, "/work/who", nil)
			if err != nil {
				return err
			}
			var s string
			return resp.Decode(&s)
		})
		t.Logf("%s: a request succeeded after %v (%d tries)", what, time.Since(start).Round(time.Millisecond), tries)
	}
	eventually(t, "proxy at A", func() error {
		if a, ok := proxyOf(req, jidB); !ok || !offersService(a, "/work/slow") {
			return errors.New("no proxy offering /work/slow")
		}
		return nil
	})

	// 1. The agent running the request is killed: B's mapper notices
	// (heartbeats) and the requester at A gets agent_lost before the
	// deadline (/work/slow is not idempotent, so it is not retried).
	k1 := nanite.TargetXMPP + jidB.String() + "/k1"
	started := make(chan struct{}, 1)
	done := make(chan error, 1)
	go func() {
		_, err := call("killed agent", "/work/slow", map[string]int{"ms": 6000}, nanite.WithTarget(k1),
			nanite.OnIntermediate(func(nanite.Intermediate) { started <- struct{}{} }))
		done <- err
	}()
	select {
	case <-started:
	case err := <-done:
		t.Fatalf("/work/slow at k1 ended before it started: %v", err)
	}
	if err := killed.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	var re *nanite.RemoteError
	if err := <-done; !errors.As(err, &re) || re.Code != nanite.CodeAgentLost {
		t.Errorf("request to a killed agent: %v, want %s", err, nanite.CodeAgentLost)
	}

	// 2. Bridge B restarts gracefully with an op in flight: the op
	// finishes, a new op is refused at once, and after the restart the
	// proxy at A comes back.
	b2 := nanite.TargetXMPP + jidB.String() + "/b2"
	go func() {
		resp, err := call("in flight across a bridge restart", "/work/slow", map[string]int{"ms": 1500}, nanite.WithTarget(b2),
			nanite.OnIntermediate(func(nanite.Intermediate) { started <- struct{}{} }))
		if err == nil {
			var s string
			err = resp.Decode(&s)
		}
		done <- err
	}()
	<-started
	stopped := make(chan struct{})
	go func() { stopB(); close(stopped) }()
	eventually(t, "bridge B draining", func() error {
		if !bB.draining.Load() {
			return errors.New("not yet")
		}
		return nil
	})
	if _, err := call("during bridge shutdown", "/work/who", nil); err == nil {
		t.Errorf("a request while bridge B shuts down succeeded")
	}
	if err := <-done; err != nil {
		t.Errorf("the op in flight when bridge B shut down: %v", err)
	}
	<-stopped
	if n := bB.Stats().Refused[RefuseShutdown]; n != 1 {
		t.Errorf("bridge B refused %d ops for shutdown, want 1", n)
	}
	// While bridge B is away, A's proxy leaves; a persistent request that
	// asked for the offline failsafe waits in A's failsafe queue (a mapper
	// daemon at A serves it) and is answered once bridge B is back.
	daemon, err := nanite.NewMapper(nanite.MapperConfig{URL: urlA, ServeFailsafe: true, Warmup: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	dctx, dcancel := context.WithCancel(context.Background())
	ddone := make(chan error, 1)
	go func() { ddone <- daemon.Run(dctx) }()
	defer func() { dcancel(); <-ddone }()
	eventually(t, "A's proxy gone while bridge B is down", func() error {
		if _, ok := proxyOf(req, jidB); ok {
			return errors.New("proxy still registered")
		}
		return nil
	})
	held := make(chan error, 1)
	go func() {
		resp, err := call("failsafe while bridge B is down", "/work/who", nil, nanite.OfflineFailsafe(), nanite.Persistent())
		if err == nil {
			var s string
			if err = resp.Decode(&s); err == nil && s != "b2" {
				err = errors.New("answered by " + s)
			}
		}
		held <- err
	}()
	time.Sleep(300 * time.Millisecond) // it is in the failsafe queue now
	runBridge(t, cfgB)
	if err := <-held; err != nil {
		t.Errorf("the failsafe request made while bridge B was down: %v", err)
	}
	works("after bridge B restarted")
	eventually(t, "B's presence (b2's load) at A after bridge B restarted", func() error {
		if a, ok := proxyOf(req, jidB); !ok || a.Status != 0.2 {
			return fmt.Errorf("proxy %+v", a)
		}
		return nil
	})

	// 3. Site B's broker restarts: requests during it end with an error by
	// their deadline; then everything reconnects.
	rctx, rcancel := context.WithTimeout(ctx, time.Minute)
	defer rcancel()
	if err := rabbitB.Stop(rctx); err != nil {
		t.Fatal(err)
	}
	// Refused at once: by bridge B (cluster_unavailable), or by A's mapper
	// when B has already told A that its agents are gone (no_agent).
	var re2 *nanite.RemoteError
	start := time.Now()
	_, err = call("site B's broker down", "/work/who", nil)
	if !(errors.As(err, &re2) && re2.Code == CodeUnavailable) && !errors.Is(err, nanite.ErrNoAgent) {
		t.Errorf("a request while site B's broker is down: %v, want %s or no_agent", err, CodeUnavailable)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("a request while site B's broker is down took %v, want an answer at once", took)
	}
	if err := rabbitB.Start(rctx); err != nil {
		t.Fatal(err)
	}
	works("after site B's broker restarted")

	// 4. Prosody restarts: both bridges reconnect, the proxy comes back.
	if err := p.Stop(rctx); err != nil {
		t.Fatal(err)
	}
	if _, err := call("prosody down", "/work/who", nil); err == nil {
		t.Errorf("a request while prosody is down succeeded")
	}
	if err := p.Start(rctx); err != nil {
		t.Fatal(err)
	}
	works("after prosody restarted")

	// No request outlived its deadline.
	mu.Lock()
	defer mu.Unlock()
	for _, o := range outcomes {
		if o.took > timeout+time.Second {
			t.Errorf("%s took %v (deadline %v): %v", o.what, o.took, timeout, o.err)
		}
		if o.err != nil && !clearError(o.err) {
			t.Errorf("%s ended with an unclear error: %v", o.what, o.err)
		}
	}
	for _, o := range outcomes {
		t.Logf("%-40s %8v  %v", o.what, o.took.Round(time.Millisecond), o.err)
	}
}

// clearError reports whether err is one of nanite's documented errors.
func clearError(err error) bool {
	var re *nanite.RemoteError
	var te *nanite.TimeoutError
	return errors.As(err, &re) || errors.As(err, &te) || errors.Is(err, nanite.ErrNoAgent) ||
		errors.Is(err, nanite.ErrTimeout) || errors.Is(err, nanite.ErrConnection) || errors.Is(err, nanite.ErrAgentLost) ||
		errors.Is(err, nanite.ErrNotDelivered) || errors.Is(err, nanite.ErrClosed)
}
