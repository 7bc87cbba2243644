package nanite

import (
	"context"
	"errors"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nanite-go/nanite/testenv"
)

func hasAgent(m *Mapper, id string) bool {
	for _, a := range m.Agents() {
		if a.Identity == id {
			return true
		}
	}
	return false
}

func eventually(t *testing.T, what string, within time.Duration, f func() bool) {
	t.Helper()
	end := time.Now().Add(within)
	for time.Now().Before(end) {
		if f() {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("not within %v: %s", within, what)
}

func TestRegistrationLifecycle(t *testing.T) {
	c := newCluster(t)
	m, _ := c.mapper(MapperConfig{})
	a, stop := c.agent(AgentConfig{Tags: []string{"t1"}}, testActor(new(string), nil))
	waitAgents(t, m, "/echo/say", 1)
	st := m.Agents()[0]
	if st.Identity != a.Identity() || st.Tags[0] != "t1" || st.Heartbeat != 200*time.Millisecond {
		t.Fatalf("registered state %+v", st)
	}

	t.Run("self_healing", func(t *testing.T) {
		// The mapper forgets the agent; its next heartbeat makes the
		// mapper ask it to advertise, and it registers again.
		// Let the registrations of startup (connect, then the mapper's
		// advertise round) land first.
		time.Sleep(300 * time.Millisecond)
		m.mu.Lock()
		m.reg.remove(a.Identity())
		m.mu.Unlock()
		eventually(t, "agent re-registered after an unknown heartbeat", 5*time.Second, func() bool { return hasAgent(m, a.Identity()) })
		if m.Stats()["advertise_requests"] == 0 {
			t.Fatal("no advertise request was sent")
		}
	})

	t.Run("late_mapper_learns_at_once", func(t *testing.T) {
		m2, _ := c.mapper(MapperConfig{})
		waitAgents(t, m2, "/echo/say", 1)
	})

	t.Run("graceful_stop_unregisters", func(t *testing.T) {
		stop()
		// Unregister arrives long before the 600 ms heartbeat timeout
		// would drop it; the reaper must not be what removed it.
		eventually(t, "agent gone after unregister", 5*time.Second, func() bool { return !hasAgent(m, a.Identity()) })
		if m.Stats()["agents_dropped"] != 0 {
			t.Fatalf("agent was reaped instead of unregistering: %v", m.Stats())
		}
	})
}

func TestAgentKilledIsDropped(t *testing.T) {
	c := newCluster(t)
	m, _ := c.mapper(MapperConfig{})
	cmd := startHelperAgent(t, c.url, NewIdentity("victim"), 200*time.Millisecond)
	waitAgents(t, m, "/work/slow", 1)
	_ = cmd.Process.Kill()
	eventually(t, "killed agent dropped by the reaper", 5*time.Second, func() bool { return len(m.Agents()) == 0 })
	if m.Stats()["agents_dropped"] != 1 {
		t.Fatalf("stats %v", m.Stats())
	}
}

// An agent killed while it runs a non-idempotent request: the caller gets
// ErrAgentLost well before the request's deadline.
func TestAgentKilledMidRequest(t *testing.T) {
	c := newCluster(t)
	m, _ := c.mapper(MapperConfig{})
	victim := NewIdentity("victim")
	cmd := startHelperAgent(t, c.url, victim, 200*time.Millisecond)
	waitAgents(t, m, "/work/slow", 1)

	started := make(chan struct{}, 1)
	errc := make(chan error, 1)
	go func() {
		_, err := m.Request(context.Background(), "/work/slow", map[string]int{"ms": 60000}, WithTimeout(30*time.Second),
			OnIntermediate(func(Intermediate) { started <- struct{}{} }))
		errc <- err
	}()
	<-started
	_ = cmd.Process.Kill()
	select {
	case err := <-errc:
		if !errors.Is(err, ErrAgentLost) {
			t.Fatalf("want ErrAgentLost, got %v", err)
		}
		var re *RemoteError
		if !errors.As(err, &re) || re.Agent != victim {
			t.Fatalf("error should name the agent: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("request still hanging 20 s after its agent died")
	}
}

// An idempotent request whose agent is killed is retried on another agent.
func TestIdempotentRetriedElsewhere(t *testing.T) {
	c := newCluster(t)
	m, _ := c.mapper(MapperConfig{})
	victim := NewIdentity("victim")
	cmd := startHelperAgent(t, c.url, victim, 200*time.Millisecond)
	waitAgents(t, m, "/work/idem", 1)

	started := make(chan struct{}, 2)
	type out struct {
		resp *Response
		err  error
	}
	res := make(chan out, 1)
	go func() {
		resp, err := m.Request(context.Background(), "/work/idem", map[string]int{"ms": 1500}, WithTimeout(30*time.Second),
			OnIntermediate(func(Intermediate) { started <- struct{}{} }))
		res <- out{resp, err}
	}()
	<-started
	// A second agent appears, then the first dies.
	rescuer, _ := c.agent(AgentConfig{HeartbeatInterval: 200 * time.Millisecond}, helperActor("rescuer"))
	waitAgents(t, m, "/work/idem", 2)
	_ = cmd.Process.Kill()
	select {
	case o := <-res:
		if o.err != nil {
			t.Fatalf("retried request failed: %v", o.err)
		}
		if o.resp.Results[0].Agent != rescuer.Identity() {
			t.Fatalf("answered by %s", o.resp.Results[0].Agent)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("retried request hanging")
	}
	if m.Stats()["retries"] != 1 {
		t.Fatalf("stats %v", m.Stats())
	}
}

// Exactly one of several mapper daemons handles an agent-originated request
// (Nanite ran it once per mapper).
func TestAgentOriginatedRequestHandledOnce(t *testing.T) {
	c := newCluster(t)
	for range 3 {
		c.mapper(MapperConfig{ServeAgentRequests: true})
	}
	var counted atomic.Int64
	c.agent(AgentConfig{}, NewActor("counter").Expose("incr", func(ctx context.Context, r *Request) (any, error) {
		return counted.Add(1), nil
	}))
	var pushed atomic.Int64
	c.agent(AgentConfig{}, NewActor("sink").Expose("put", func(ctx context.Context, r *Request) (any, error) {
		pushed.Add(1)
		return nil, nil
	}))
	caller, _ := c.agent(AgentConfig{}, NewActor("caller").Expose("go", func(ctx context.Context, r *Request) (any, error) {
		resp, err := r.Agent.Request(ctx, "/counter/incr", nil)
		if err != nil {
			return nil, err
		}
		if err := r.Agent.Push(ctx, "/sink/put", "x"); err != nil {
			return nil, err
		}
		var n int
		err = resp.Decode(&n)
		return n, err
	}))
	m, _ := c.mapper(MapperConfig{})
	waitAgents(t, m, "", 3)
	_ = caller
	resp, err := m.Request(t.Context(), "/caller/go", nil, WithTimeout(10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	var n int
	if err := resp.Decode(&n); err != nil || n != 1 {
		t.Fatalf("counter answered %d %v", n, err)
	}
	eventually(t, "push delivered", 5*time.Second, func() bool { return pushed.Load() >= 1 })
	time.Sleep(500 * time.Millisecond) // time for any duplicate to show up
	if counted.Load() != 1 || pushed.Load() != 1 {
		t.Fatalf("three mappers: request ran %d times, push %d times", counted.Load(), pushed.Load())
	}

	// An agent-originated request for a service nobody offers fails clearly.
	_, err = caller.Request(t.Context(), "/nobody/here", nil, WithTimeout(5*time.Second))
	if !errors.Is(err, ErrNoAgent) {
		t.Fatalf("agent-originated request to unknown service: %v", err)
	}
}

func TestOfflineFailsafe(t *testing.T) {
	c := newCluster(t)
	c.mapper(MapperConfig{ServeFailsafe: true})
	m, _ := c.mapper(MapperConfig{Warmup: time.Millisecond})
	time.Sleep(100 * time.Millisecond)

	// Without the failsafe: fails at once.
	if _, err := m.Request(t.Context(), "/late/run", nil); !errors.Is(err, ErrNoAgent) {
		t.Fatalf("without failsafe: %v", err)
	}
	// With it, but nobody comes: a timeout that says where it waited. The
	// requester's own deadline and the failsafe daemon's answer (a timeout
	// from the daemon, sent at the same deadline) race; both say so.
	_, err := m.Request(t.Context(), "/late/run", nil, OfflineFailsafe(), WithTimeout(700*time.Millisecond))
	if !errors.Is(err, ErrTimeout) || !strings.Contains(err.Error(), "no agent offering it appeared") {
		t.Fatalf("failsafe expiry: %v", err)
	}
	// With it, and an agent comes later: the held request is delivered.
	res := make(chan error, 1)
	var answer string
	go func() {
		resp, err := m.Request(context.Background(), "/late/run", "hello", OfflineFailsafe(), Persistent(), WithTimeout(20*time.Second))
		if err == nil {
			err = resp.Decode(&answer)
		}
		res <- err
	}()
	time.Sleep(500 * time.Millisecond)
	c.agent(AgentConfig{}, NewActor("late").Expose("run", func(ctx context.Context, r *Request) (any, error) {
		var s string
		_ = r.Decode(&s)
		return s + " from a late agent", nil
	}))
	select {
	case err := <-res:
		if err != nil || answer != "hello from a late agent" {
			t.Fatalf("failsafe delivery: %q %v", answer, err)
		}
	case <-time.After(25 * time.Second):
		t.Fatal("failsafe request hanging")
	}
}

// The broker restarts while requests are in flight: every request ends with
// a result or a clear error by its deadline, agents and mappers reconnect,
// and a persistent request waiting in a durable queue survives.
// TestBrokerRestart: requests under way across a broker restart end by
// their deadline, and succeed again after it: persistent requests to a slow
// service, and transient ones to a quick service whose answers go out in
// reply bundles.
func TestBrokerRestart(t *testing.T) {
	t.Run("persistent", func(t *testing.T) { testBrokerRestart(t, "/echo/slow", 20, Persistent()) })
	t.Run("bundled", func(t *testing.T) { testBrokerRestart(t, "/echo/say", "hi") })
}

func testBrokerRestart(t *testing.T, service string, payload any, opts ...RequestOption) {
	r := testenv.RunRabbitMQ(t, testenv.RabbitOptions{Name: "restart"})
	c := &cluster{t: t, url: r.URL()}
	m, _ := c.mapper(MapperConfig{AgentTimeout: 30 * time.Second})
	a, _ := c.agent(AgentConfig{}, testActor(new(string), nil))
	waitAgents(t, m, service, 1)
	opts = append(opts, WithTimeout(3*time.Second))

	// Load: requests in flight across the restart.
	var wg sync.WaitGroup
	var ok, failed atomic.Int64
	stopLoad := make(chan struct{})
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stopLoad:
					return
				default:
				}
				_, err := m.Request(context.Background(), service, payload, opts...)
				if err != nil {
					failed.Add(1)
				} else {
					ok.Add(1)
				}
			}
		}()
	}
	time.Sleep(500 * time.Millisecond)
	before := ok.Load()
	if err := r.Restart(t.Context()); err != nil {
		t.Fatal(err)
	}
	eventually(t, "requests succeed again after the restart", 30*time.Second, func() bool { return ok.Load() > before+20 })
	close(stopLoad)
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("a request outlived its 3 s deadline across the restart")
	}
	t.Logf("across the restart: %d ok, %d failed with an error; %d answers in bundles", ok.Load(), failed.Load(), a.Stats()["bundled_results"])
	if !hasAgent(m, a.Identity()) {
		t.Fatal("agent not registered after the restart")
	}
}

// A persistent request published while its agent is down stays in the
// agent's durable queue across a broker restart and is answered when the
// agent comes back.
func TestPersistentRequestSurvivesRestart(t *testing.T) {
	r := testenv.RunRabbitMQ(t, testenv.RabbitOptions{Name: "persist"})
	c := &cluster{t: t, url: r.URL()}
	m, _ := c.mapper(MapperConfig{AgentTimeout: time.Minute})
	id := NewIdentity("sleeper")
	cmd := startHelperAgent(t, c.url, id, 200*time.Millisecond)
	waitAgents(t, m, "/work/slow", 1)
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	time.Sleep(200 * time.Millisecond)

	res := make(chan error, 1)
	go func() {
		_, err := m.Request(context.Background(), "/work/slow", map[string]int{"ms": 1}, Persistent(), WithTimeout(60*time.Second))
		res <- err
	}()
	time.Sleep(500 * time.Millisecond) // published and confirmed
	if err := r.Restart(t.Context()); err != nil {
		t.Fatal(err)
	}
	startHelperAgent(t, c.url, id, 200*time.Millisecond)
	select {
	case err := <-res:
		if err != nil {
			t.Fatalf("persistent request: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("persistent request lost")
	}
}

func TestReadyAndRefusedConnection(t *testing.T) {
	c := newCluster(t)
	m, _ := c.mapper(MapperConfig{})
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := m.Ready(ctx); err != nil {
		t.Fatal(err)
	}
	// Bad credentials: Run and Ready both fail with ErrConnection.
	bad, err := NewMapper(MapperConfig{URL: "amqp://nobody:wrong@" + c.url[len("amqp://"):][strings.Index(c.url[len("amqp://"):], "@")+1:]})
	if err != nil {
		t.Fatal(err)
	}
	runErr := make(chan error, 1)
	go func() { runErr <- bad.Run(t.Context()) }()
	if err := bad.Ready(ctx); !errors.Is(err, ErrConnection) {
		t.Fatalf("Ready with bad credentials: %v", err)
	}
	if err := <-runErr; !errors.Is(err, ErrConnection) {
		t.Fatalf("Run with bad credentials: %v", err)
	}
	// Nothing listening: Ready gives up at its context with the dial error.
	none, _ := NewMapper(MapperConfig{URL: "amqp://guest:guest@127.0.0.1:1/"})
	rctx, rcancel := context.WithCancel(t.Context())
	go func() { _ = none.Run(rctx) }()
	defer rcancel()
	short, scancel := context.WithTimeout(t.Context(), 500*time.Millisecond)
	defer scancel()
	if err := none.Ready(short); !errors.Is(err, ErrConnection) || !strings.Contains(err.Error(), "dial") {
		t.Fatalf("Ready with no broker: %v", err)
	}
}

// A handler that runs for many heartbeat intervals does not make its agent
// look dead: heartbeats do not wait for handlers.
func TestLongHandlerKeepsHeartbeating(t *testing.T) {
	c := newCluster(t)
	m, _ := c.mapper(MapperConfig{})
	a, _ := c.agent(AgentConfig{HeartbeatInterval: 100 * time.Millisecond}, testActor(new(string), nil))
	waitAgents(t, m, "/echo/slow", 1)
	// 1.5 s is five times the 300 ms after which a silent agent is dropped.
	resp, err := m.Request(t.Context(), "/echo/slow", 1500)
	if err != nil {
		t.Fatal(err)
	}
	if resp.Results[0].Agent != a.Identity() || m.Stats()["agents_dropped"] != 0 {
		t.Fatalf("busy agent dropped: %v", m.Stats())
	}
}

func TestIdentityPersistsInDataDir(t *testing.T) {
	dir := t.TempDir()
	a1, err := NewAgent(AgentConfig{URL: "amqp://unused/", DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	a2, err := NewAgent(AgentConfig{URL: "amqp://unused/", DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if a1.Identity() != a2.Identity() || !ValidIdentity(a1.Identity()) {
		t.Fatalf("identities %q and %q", a1.Identity(), a2.Identity())
	}
	if err := os.WriteFile(dir+"/identity", []byte("bad id!\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := NewAgent(AgentConfig{URL: "amqp://unused/", DataDir: dir}); err == nil {
		t.Fatal("an invalid stored identity was accepted")
	}
}

// A broker that falls silent with its connections open (frozen: no frames,
// no heartbeats, no TCP close) is noticed by the AMQP heartbeat deadline:
// the mapper reports itself disconnected within seconds, and agent and
// mapper carry on once the broker answers again.
func TestSilentBroker(t *testing.T) {
	r := testenv.RunRabbitMQ(t, testenv.RabbitOptions{Name: "silent"})
	c := &cluster{t: t, url: r.URL()}
	m, _ := c.mapper(MapperConfig{AgentTimeout: time.Minute})
	c.agent(AgentConfig{}, testActor(new(string), nil))
	waitAgents(t, m, "/echo/slow", 1)
	// (Consumers start before the link says it is up.)
	eventually(t, "the mapper is connected", 10*time.Second, m.Connected)
	if err := r.Freeze(); err != nil {
		t.Fatal(err)
	}
	// Cleanups run last first: thaw before the mapper and agent close
	// (closing waits for the broker's answer).
	t.Cleanup(func() { _ = r.Thaw() })
	t0 := time.Now()
	// The read deadline is 1.5 AMQP heartbeats (5 s): 7.5 s, and at most a
	// quarter more since it was last moved.
	eventually(t, "the mapper notices the silent broker", 30*time.Second, func() bool { return !m.Connected() })
	t.Logf("silence noticed after %v", time.Since(t0).Round(100*time.Millisecond))
	if err := r.Thaw(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "requests succeed once the broker answers again", 60*time.Second, func() bool {
		_, err := m.Request(t.Context(), "/echo/slow", 1, WithTimeout(2*time.Second))
		return err == nil
	})
}
