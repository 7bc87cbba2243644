package vertebra

import (
	"sync"
	"testing"
	"time"
)

func TestOpWorkers(t *testing.T) {
	done := make(chan struct{})
	var mu sync.Mutex
	nServed := 0
	release := make(chan struct{})
	block := false
	w := &opWorkers{done: done, serve: func(*served) {
		mu.Lock()
		nServed++
		b, r := block, release
		mu.Unlock()
		if b {
			<-r
		}
	}}
	waitIdle := func(n int) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for w.idleCount() != n {
			if time.Now().After(deadline) {
				t.Fatalf("%d idle workers, want %d", w.idleCount(), n)
			}
			time.Sleep(time.Millisecond)
		}
	}
	// One after the other: one goroutine serves them all.
	for range 10 {
		w.run(&served{})
		waitIdle(1)
	}
	if got := w.started.Load(); got != 1 {
		t.Fatalf("10 ops one after the other started %d goroutines, want 1", got)
	}
	// Five at once: the idle one and four more; all five wait after.
	mu.Lock()
	block = true
	mu.Unlock()
	for range 5 {
		w.run(&served{})
	}
	if got := w.started.Load(); got != 5 {
		t.Fatalf("5 ops at once: %d goroutines started in all, want 5", got)
	}
	close(release)
	waitIdle(5)
	// More than maxIdleWorkers at once: the extra ones end after their op.
	mu.Lock()
	release = make(chan struct{})
	mu.Unlock()
	for range maxIdleWorkers + 10 {
		w.run(&served{})
	}
	if got := w.started.Load(); got != maxIdleWorkers+10 {
		t.Fatalf("%d ops at once: %d goroutines started in all, want %d", maxIdleWorkers+10, got, maxIdleWorkers+10)
	}
	mu.Lock()
	close(release)
	mu.Unlock()
	waitIdle(maxIdleWorkers)
	// Done: the idle ones end; an op run after still runs.
	close(done)
	waitIdle(0)
	w.run(&served{})
	deadline := time.Now().Add(5 * time.Second)
	for {
		mu.Lock()
		n := nServed
		mu.Unlock()
		if n == 10+5+maxIdleWorkers+10+1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d ops served", n)
		}
		time.Sleep(time.Millisecond)
	}
	if got := w.idleCount(); got != 0 {
		t.Fatalf("%d workers idle after done", got)
	}
}
