package nanite

import (
	"errors"
	"math/rand/v2"
	"testing"
	"time"
)

// The mapper's single deadline timer ends each request at its own
// deadline, not before, and leaves alone the ones that finished.
func TestDeadlines(t *testing.T) {
	d := newDeadlines()
	start := time.Now()
	var mcs []*mcall
	for i := range 40 {
		mc := new(mcall)
		mc.setup(&Packet{Token: "t"}, "/s/x", requestOptions{}, 1)
		mc.byAgent = true
		mc.expect.add("agent-1")
		// Out of order, some sharing a deadline.
		mc.deadline = start.Add(time.Duration(20+rand.IntN(20)*10) * time.Millisecond)
		if i%4 == 0 {
			mc.deadline = start.Add(time.Hour) // finishes before
		}
		d.add(mc)
		mcs = append(mcs, mc)
	}
	for i, mc := range mcs {
		if i%4 == 0 {
			mc.complete(Result{Agent: "agent-1"})
			d.remove(mc)
			if mc.slot != -1 {
				t.Fatalf("removed request still has slot %d", mc.slot)
			}
		}
	}
	for i, mc := range mcs {
		if i%4 == 0 {
			continue
		}
		select {
		case <-mc.done:
		case <-time.After(5 * time.Second):
			t.Fatalf("request %d not ended by its deadline", i)
		}
		if now := time.Now(); now.Before(mc.deadline) {
			t.Fatalf("request %d ended %v before its deadline", i, mc.deadline.Sub(now))
		}
		var te *TimeoutError
		if !errors.As(mc.failure, &te) || len(te.Missing) != 1 || te.Missing[0] != "agent-1" {
			t.Fatalf("request %d: failure %v", i, mc.failure)
		}
	}
	if n := d.len(); n != 0 {
		t.Fatalf("%d requests left in the heap", n)
	}
	for i, mc := range mcs {
		if i%4 == 0 && mc.failure != nil {
			t.Fatalf("finished request %d failed: %v", i, mc.failure)
		}
	}
	// An earlier deadline added later moves the timer forward.
	late, early := new(mcall), new(mcall)
	for _, mc := range []*mcall{late, early} {
		mc.setup(&Packet{Token: "t"}, "/s/x", requestOptions{}, 1)
	}
	late.deadline = time.Now().Add(time.Hour)
	early.deadline = time.Now().Add(20 * time.Millisecond)
	d.add(late)
	d.add(early)
	select {
	case <-early.done:
	case <-time.After(5 * time.Second):
		t.Fatal("the earlier deadline added second did not fire")
	}
	d.remove(late)
}
