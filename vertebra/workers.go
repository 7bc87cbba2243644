package vertebra

import (
	"sync"
	"sync/atomic"
)

// maxIdleWorkers is how many op goroutines wait for the next op at most.
const maxIdleWorkers = 64

// opWorkers runs incoming ops on goroutines kept for the next op. Serving
// an op takes a deep stack (a bridge's handler publishes to a broker through
// amqp091-go: over 8 KiB of frames); a fresh goroutine starts with a small
// one and grows it, copying it at each doubling, which was ~5 % of a
// bridge's CPU under load. A goroutine that served an op keeps its stack
// for the next (until the garbage collector shrinks an idle one). Up to
// maxIdleWorkers wait, most recently used first; they end when done is
// closed (the endpoint's).
type opWorkers struct {
	serve func(*served)
	done  <-chan struct{}

	mu      sync.Mutex
	idle    []chan *served
	started atomic.Int64 // goroutines started, for tests
}

// run serves s on an idle worker, or on a new one.
func (w *opWorkers) run(s *served) {
	w.mu.Lock()
	if n := len(w.idle); n > 0 {
		c := w.idle[n-1]
		w.idle[n-1] = nil
		w.idle = w.idle[:n-1]
		w.mu.Unlock()
		c <- s // buffered, and only run sends to it: never blocks
		return
	}
	w.mu.Unlock()
	w.started.Add(1)
	go w.work(s)
}

func (w *opWorkers) work(s *served) {
	var c chan *served
	for {
		w.serve(s)
		if c == nil {
			c = make(chan *served, 1)
		}
		w.mu.Lock()
		select {
		case <-w.done:
			w.mu.Unlock()
			return
		default:
		}
		if len(w.idle) >= maxIdleWorkers {
			w.mu.Unlock()
			return
		}
		w.idle = append(w.idle, c)
		w.mu.Unlock()
		select {
		case s = <-c:
		case <-w.done:
			w.mu.Lock()
			for i, x := range w.idle {
				if x == c {
					w.idle = append(w.idle[:i], w.idle[i+1:]...)
					w.mu.Unlock()
					return
				}
			}
			w.mu.Unlock()
			s = <-c // run took this worker just now: serve its op
		}
	}
}

// idleCount is how many workers wait.
func (w *opWorkers) idleCount() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.idle)
}
