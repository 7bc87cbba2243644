package nanite

import (
	"sync"
	"time"
)

// deadlines ends a mapper's outstanding requests at their deadlines with one
// timer for all of them, instead of a context with a timer of its own per
// request. Requests are kept in a min-heap on their deadlines; the timer is
// set for the earliest one. A request that finishes leaves the heap at once
// (its slot is known), but the timer is not moved for it: when the timer
// fires with nothing due it is set again for the new earliest deadline. With
// one timeout for all requests, new ones are always the latest, so adding
// one touches neither the timer nor more than one level of the heap.
type deadlines struct {
	mu    sync.Mutex
	heap  []*mcall // mc.slot is the index of mc; -1 when not in the heap
	timer *time.Timer
	next  time.Time // when the timer fires; zero when it is stopped
}

func newDeadlines() *deadlines {
	d := &deadlines{}
	d.timer = time.AfterFunc(time.Hour, d.fire)
	d.timer.Stop()
	return d
}

// add schedules mc.expire at mc.deadline.
func (d *deadlines) add(mc *mcall) {
	mc.due = mc.deadline.UnixNano()
	d.mu.Lock()
	mc.slot = len(d.heap)
	d.heap = append(d.heap, mc)
	d.up(mc.slot)
	if d.next.IsZero() || mc.deadline.Before(d.next) {
		d.next = mc.deadline
		d.timer.Reset(time.Until(mc.deadline))
	}
	d.mu.Unlock()
}

// remove unschedules mc; it does nothing if mc is not scheduled.
func (d *deadlines) remove(mc *mcall) {
	d.mu.Lock()
	if i := mc.slot; i >= 0 {
		d.removeAt(i)
	}
	d.mu.Unlock()
}

// len is the number of scheduled requests.
func (d *deadlines) len() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.heap)
}

// fire runs in the timer's goroutine: it ends the requests that are due
// and sets the timer for the next one.
func (d *deadlines) fire() {
	now := time.Now()
	var due []*mcall
	d.mu.Lock()
	for len(d.heap) > 0 && !d.heap[0].deadline.After(now) {
		due = append(due, d.heap[0])
		d.removeAt(0)
	}
	d.next = time.Time{}
	if len(d.heap) > 0 {
		d.next = d.heap[0].deadline
		d.timer.Reset(time.Until(d.next))
	}
	d.mu.Unlock()
	for _, mc := range due {
		mc.expire()
	}
}

func (d *deadlines) removeAt(i int) {
	last := len(d.heap) - 1
	mc := d.heap[i]
	if i != last {
		d.swap(i, last)
	}
	d.heap[last] = nil
	d.heap = d.heap[:last]
	mc.slot = -1
	if i != last {
		d.down(i)
		d.up(i)
	}
}

func (d *deadlines) less(i, j int) bool { return d.heap[i].due < d.heap[j].due }

func (d *deadlines) swap(i, j int) {
	d.heap[i], d.heap[j] = d.heap[j], d.heap[i]
	d.heap[i].slot = i
	d.heap[j].slot = j
}

func (d *deadlines) up(i int) {
	for i > 0 {
		p := (i - 1) / 2
		if !d.less(i, p) {
			return
		}
		d.swap(i, p)
		i = p
	}
}

func (d *deadlines) down(i int) {
	n := len(d.heap)
	for {
		l := 2*i + 1
		if l >= n {
			return
		}
		c := l
		if r := l + 1; r < n && d.less(r, l) {
			c = r
		}
		if !d.less(c, i) {
			return
		}
		d.swap(i, c)
		i = c
	}
}
