package nanite

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Handlers run in the consumer's delivery loop (inline) when they are
// quick; these tests hold the agent to what the protocol promises anyway:
// up to Prefetch handlers run at once, never more, and a slow handler does
// not hold up the requests behind it.

func TestHandlersRunConcurrentlyUpToPrefetch(t *testing.T) {
	c := newCluster(t)
	const prefetch = 4
	var running, most atomic.Int64
	release := make(chan struct{})
	all := make(chan struct{})
	var once sync.Once
	act := NewActor("gate").Expose("wait", func(ctx context.Context, r *Request) (any, error) {
		n := running.Add(1)
		defer running.Add(-1)
		for {
			m := most.Load()
			if n <= m || most.CompareAndSwap(m, n) {
				break
			}
		}
		if n == prefetch {
			once.Do(func() { close(all) })
		}
		select {
		case <-release:
			return "ok", nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	})
	c.agent(AgentConfig{Prefetch: prefetch}, act)
	m, _ := c.mapper(MapperConfig{})
	waitAgents(t, m, "/gate/wait", 1)

	const n = 2 * prefetch
	errs := make(chan error, n)
	for range n {
		go func() {
			_, err := m.Request(t.Context(), "/gate/wait", nil, WithTimeout(20*time.Second))
			errs <- err
		}()
	}
	select {
	case <-all:
	case <-time.After(10 * time.Second):
		t.Fatalf("only %d handlers ran at once, want %d (the prefetch)", most.Load(), prefetch)
	}
	// Give the agent the chance to start more than it may.
	time.Sleep(200 * time.Millisecond)
	close(release)
	for range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if got := most.Load(); got != prefetch {
		t.Fatalf("%d handlers ran at once, want at most %d (the prefetch)", got, prefetch)
	}
}

func TestSlowHandlerDoesNotHoldUpOthers(t *testing.T) {
	// With a prefetch of 2, the quick requests behind the slow one go
	// through only if their deliveries are acknowledged while the slow
	// one still runs.
	for _, prefetch := range []int{DefaultPrefetch, 2} {
		t.Run(fmt.Sprint("prefetch=", prefetch), func(t *testing.T) { testSlowHandler(t, prefetch) })
	}
}

func testSlowHandler(t *testing.T, prefetch int) {
	c := newCluster(t)
	id := new(string)
	a, _ := c.agent(AgentConfig{Prefetch: prefetch}, testActor(id, nil))
	*id = a.Identity()
	m, _ := c.mapper(MapperConfig{})
	waitAgents(t, m, "/echo/slow", 1)

	// Twice, so that the second slow request runs after the agent has
	// learnt that the method is slow.
	for round := range 2 {
		slow := make(chan error, 1)
		go func() {
			_, err := m.Request(t.Context(), "/echo/slow", 3000, WithTimeout(20*time.Second))
			slow <- err
		}()
		time.Sleep(100 * time.Millisecond) // the slow one runs now
		for i := range 10 {
			t0 := time.Now()
			if _, err := m.Request(t.Context(), "/echo/say", fmt.Sprint(i), WithTimeout(10*time.Second)); err != nil {
				t.Fatal(err)
			}
			if d := time.Since(t0); d > time.Second {
				t.Fatalf("round %d: a quick request behind a slow one took %v", round, d)
			}
		}
		if err := <-slow; err != nil {
			t.Fatal(err)
		}
	}
}

func TestDedupeRing(t *testing.T) {
	d := newDedupe(3, 1<<20)
	for i := range 5 {
		tok := fmt.Sprint("t", i)
		if _, st := d.check(tok, "q"); st != dedupeNew {
			t.Fatalf("%s: state %v before it ran", tok, st)
		}
		d.begin(tok, "q")
		if _, st := d.check(tok, "q2"); st != dedupeRunning {
			t.Fatalf("%s: state %v while it runs", tok, st)
		}
		if w := d.done(tok, []byte(tok)); len(w) != 1 || w[0] != "q2" {
			t.Fatalf("%s: waiters %v, want [q2]", tok, w)
		}
	}
	// The last three are remembered, the oldest forgotten.
	for i := range 5 {
		tok := fmt.Sprint("t", i)
		body, st := d.check(tok, "q")
		if i < 2 && st != dedupeNew {
			t.Fatalf("%s: state %v, want forgotten", tok, st)
		}
		if i >= 2 && (st != dedupeDone || string(body) != tok) {
			t.Fatalf("%s: state %v body %q, want done with its body", tok, st, body)
		}
	}
	if len(d.m) != 3 || len(d.ring) != 3 {
		t.Fatalf("map %d ring %d, want 3 and 3", len(d.m), len(d.ring))
	}
	// done without begin (answered without running) records it too.
	d.done("x", []byte("x"))
	if body, st := d.check("x", ""); st != dedupeDone || string(body) != "x" {
		t.Fatalf("x: %v %q", st, body)
	}
}

func TestDedupeBytes(t *testing.T) {
	d := newDedupe(100, 10)
	for i := range 5 {
		tok := fmt.Sprint("t", i)
		d.begin(tok, "q")
		d.done(tok, []byte("abcd")) // 4 bytes each: two fit
	}
	for i := range 5 {
		tok := fmt.Sprint("t", i)
		body, st := d.check(tok, "q")
		if i < 3 && st != dedupeNew {
			t.Fatalf("%s: state %v, want forgotten (over the byte budget)", tok, st)
		}
		if i >= 3 && (st != dedupeDone || string(body) != "abcd") {
			t.Fatalf("%s: state %v body %q, want done with its body", tok, st, body)
		}
	}
	if d.bytes != 8 || len(d.m) != 2 {
		t.Fatalf("bytes %d, tokens %d; want 8 and 2", d.bytes, len(d.m))
	}
	// The oldest go first: big's 10 bytes forget t3 and t4, and then
	// fit, so run (older than big, newer than t4) stays.
	d.begin("run", "q")
	d.done("big", make([]byte, 10))
	if _, st := d.check("run", "q"); st != dedupeRunning {
		t.Fatalf("run: state %v, want running", st)
	}
	if _, st := d.check("big", "q"); st != dedupeDone {
		t.Fatalf("big: state %v, want done (exactly the budget)", st)
	}
	// An answer larger than the whole budget is not kept.
	d.done("huge", make([]byte, 11))
	if _, st := d.check("huge", "q"); st != dedupeNew {
		t.Fatalf("huge: state %v, want forgotten", st)
	}
	if d.bytes != 0 || len(d.m) != 0 {
		t.Fatalf("bytes %d, tokens %d; want 0 and 0", d.bytes, len(d.m))
	}
	// The ring wraps over slots the budget emptied.
	for i := range 250 {
		tok := fmt.Sprint("w", i)
		d.begin(tok, "q")
		d.done(tok, []byte("x"))
	}
	if d.bytes != 10 || len(d.m) != 10 || len(d.ring) != 100 {
		t.Fatalf("bytes %d, tokens %d, ring %d; want 10, 10, 100", d.bytes, len(d.m), len(d.ring))
	}
	if body, st := d.check("w249", "q"); st != dedupeDone || string(body) != "x" {
		t.Fatalf("w249: %v %q", st, body)
	}
}

func TestDedupeHashCollision(t *testing.T) {
	d := newDedupe(10, 1<<20)
	long := strings.Repeat("L", 40) // kept outside the slot
	for _, tok := range []string{"A", long} {
		d.begin(tok, "q")
		d.done(tok, []byte(tok))
		if body, st := d.check(tok, "q"); st != dedupeDone || string(body) != tok {
			t.Fatalf("%.8s: %v %q", tok, st, body)
		}
	}
	// Another token whose hash is A's: it is not taken for A...
	hA := maphash.String(d.seed, "A")
	d.mu.Lock()
	if i := d.findLocked(hA, "B"); i >= 0 {
		t.Fatalf("B found in A's slot %d", i)
	}
	// ...and remembering it forgets A, whose slot, once reused, leaves
	// B's entry in the map alone.
	d.insertLocked(hA, "B", "q")
	if i := d.findLocked(hA, "A"); i >= 0 {
		t.Fatalf("A still found, in slot %d", i)
	}
	d.evictLocked(0)
	if i := d.findLocked(hA, "B"); i != 2 {
		t.Fatalf("B in slot %d, want 2", i)
	}
	d.mu.Unlock()
	if _, st := d.check(long, "q"); st != dedupeDone {
		t.Fatalf("the long token: state %v", st)
	}
}

func TestRequestContext(t *testing.T) {
	parent, stop := context.WithCancelCause(context.Background())
	defer stop(nil)

	// Without Done, the deadline is seen through Deadline and Err.
	var c reqContext
	dl := time.Now().Add(50 * time.Millisecond)
	c.init(parent, dl)
	if d, ok := c.Deadline(); !ok || !d.Equal(dl) {
		t.Fatalf("Deadline = %v %v", d, ok)
	}
	if c.Err() != nil {
		t.Fatal(c.Err())
	}
	time.Sleep(60 * time.Millisecond)
	if !errors.Is(c.Err(), context.DeadlineExceeded) || !errors.Is(context.Cause(&c), context.DeadlineExceeded) {
		t.Fatalf("after the deadline: Err %v, Cause %v", c.Err(), context.Cause(&c))
	}
	c.release()

	// Done closes at the deadline.
	var c2 reqContext
	c2.init(parent, time.Now().Add(30*time.Millisecond))
	select {
	case <-c2.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("Done did not close at the deadline")
	}
	if !errors.Is(c2.Err(), context.DeadlineExceeded) {
		t.Fatal(c2.Err())
	}
	c2.release()

	// The parent's end (the agent stopping) ends it with the parent's cause,
	// with or without Done asked for first; a child context follows it.
	var c3, c4 reqContext
	c3.init(parent, time.Now().Add(time.Hour))
	c4.init(parent, time.Time{})
	child, cancelChild := context.WithCancel(&c4)
	defer cancelChild()
	cause := errors.New("stopping")
	stop(cause)
	for _, ctx := range []context.Context{&c3, &c4, child} {
		select {
		case <-ctx.Done():
		case <-time.After(5 * time.Second):
			t.Fatal("Done did not close when the parent ended")
		}
		if !errors.Is(ctx.Err(), context.Canceled) || context.Cause(ctx) != cause {
			t.Fatalf("Err %v, Cause %v", ctx.Err(), context.Cause(ctx))
		}
	}

	// After release it is cancelled, as with a deferred cancel.
	var c5 reqContext
	c5.init(context.Background(), time.Time{})
	c5.release()
	if !errors.Is(c5.Err(), context.Canceled) {
		t.Fatal(c5.Err())
	}
	select {
	case <-c5.Done():
	default:
		t.Fatal("Done open after release")
	}
}

// The acker sends one multiple acknowledgement for deliveries handled in a
// row in the loop, never one that covers a delivery still being handled,
// and acknowledges at once what a handler outside the loop acks.
func TestAcker(t *testing.T) {
	type sent struct {
		tag      uint64
		multiple bool
	}
	var got []sent
	a := newAcker(func(tag uint64, multiple bool) error {
		got = append(got, sent{tag, multiple})
		return nil
	}, slog.New(slog.DiscardHandler), 8) // a batch of 4
	expect := func(want ...sent) {
		t.Helper()
		if !slices.Equal(got, want) {
			t.Fatalf("sent %v, want %v", got, want)
		}
		got = nil
	}
	inLoop := func(tag uint64) {
		a.received(tag)
		if err := a.ack(tag); err != nil {
			t.Fatal(err)
		}
		a.handled(tag)
	}
	// Three quick ones in a row: nothing yet; the loop flushes when idle.
	inLoop(1)
	inLoop(2)
	inLoop(3)
	expect()
	a.flush()
	expect(sent{3, true})
	// A batch of four goes out without waiting for idle.
	for tag := uint64(4); tag <= 7; tag++ {
		inLoop(tag)
	}
	expect(sent{7, true})
	// 8 runs long (handed to a goroutine: the loop's Handle returned);
	// 9 and 10 are handled meanwhile: acknowledged one by one.
	a.received(8)
	a.handled(8)
	inLoop(9)
	inLoop(10)
	a.flush()
	expect(sent{9, false}, sent{10, false})
	// 8 finishes outside the loop: sent at once; then 11 can be multiple.
	if err := a.ack(8); err != nil {
		t.Fatal(err)
	}
	expect(sent{8, false})
	inLoop(11)
	inLoop(12)
	a.flush()
	expect(sent{12, true})
	// A nacked one in the middle does not stop a multiple after it.
	a.received(13)
	a.settle(13) // nacked
	a.handled(13)
	inLoop(14)
	a.flush()
	expect(sent{14, false})
	inLoop(15)
	inLoop(16)
	a.flush()
	expect(sent{16, true})
	// A second Ack of the same delivery sends nothing.
	if err := a.ack(16); err != nil {
		t.Fatal(err)
	}
	a.flush()
	expect()
}

// The handoff watch lets quick Handles be, hands over a long one within
// about its budget, and stops ticking when deliveries stop.
func TestHandoffWatch(t *testing.T) {
	const budget = 5 * time.Millisecond
	w := newHandoffWatch(budget)
	took := make(chan bool, 1)
	go func() { took <- w.wait() }()
	for range 20 { // quick ones, for longer than several budgets
		w.begin()
		time.Sleep(budget / 5)
		if w.end() {
			t.Fatal("taken over after a quick Handle")
		}
	}
	t0 := time.Now()
	w.begin()
	select {
	case over := <-took:
		if !over {
			t.Fatal("wait reported the end of the loop")
		}
		if d := time.Since(t0); d < budget {
			t.Fatalf("taken over after %v, before the budget %v", d, budget)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a long Handle was not handed over")
	}
	if !w.end() {
		t.Fatal("end did not report the takeover")
	}

	// Idle: the timer rests; stop ends the standby's wait.
	w2 := newHandoffWatch(budget)
	w2.begin()
	w2.end()
	for end := time.Now().Add(5 * time.Second); w2.ticking.Load(); time.Sleep(budget) {
		if time.Now().After(end) { // two budgets should do; the machine may be busy
			t.Fatal("still ticking 5 s after the last delivery")
		}
	}
	go w2.stop()
	if w2.wait() {
		t.Fatal("wait reported a takeover after stop")
	}
}

// A method that was quick and turns slow keeps the delivery loop only
// until the handoff watch gives the consumer to a new loop.
func TestQuickMethodTurningSlowIsHandedOver(t *testing.T) {
	c := newCluster(t)
	var calls atomic.Int64
	release := make(chan struct{})
	act := NewActor("turn").
		Expose("maybe", func(ctx context.Context, r *Request) (any, error) {
			if calls.Add(1) <= 5 {
				return "quick", nil
			}
			select { // from the sixth call on
			case <-release:
				return "slow", nil
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}).
		Expose("quick", func(ctx context.Context, r *Request) (any, error) { return "ok", nil })
	c.agent(AgentConfig{}, act)
	m, _ := c.mapper(MapperConfig{})
	waitAgents(t, m, "/turn/maybe", 1)
	for range 5 { // now known quick: the next call runs in the loop
		if _, err := m.Request(t.Context(), "/turn/maybe", nil, WithTimeout(10*time.Second)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := m.Request(t.Context(), "/turn/quick", nil, WithTimeout(10*time.Second)); err != nil {
		t.Fatal(err) // and so is this one
	}
	slow := make(chan error, 1)
	go func() {
		_, err := m.Request(t.Context(), "/turn/maybe", nil, WithTimeout(20*time.Second))
		slow <- err
	}()
	time.Sleep(50 * time.Millisecond) // it holds the loop now
	t0 := time.Now()
	if _, err := m.Request(t.Context(), "/turn/quick", nil, WithTimeout(10*time.Second)); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(t0); d > 2*time.Second {
		t.Fatalf("a quick request waited %v behind a slow run", d)
	}
	close(release)
	if err := <-slow; err != nil {
		t.Fatal(err)
	}
}
