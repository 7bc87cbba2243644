package nanite

import (
	"context"
	"sync"
	"time"
)

// reqContext is the context a handler runs with: it ends at the request's
// deadline (when it has one) and when its parent (the agent's handler
// context) ends. It is what context.WithDeadline(parent, deadline) is, but it
// makes that context — a timer and a registration with the parent — only
// when the handler asks for Done (or for a value that needs it). Most quick
// handlers never do; they see the deadline through Deadline and Err.
type reqContext struct {
	parent   context.Context
	deadline time.Time // zero: none

	mu       sync.Mutex
	ctx      context.Context // made on demand
	cancel   context.CancelFunc
	released bool // the handler returned
}

func (c *reqContext) init(parent context.Context, deadline time.Time) {
	c.parent, c.deadline = parent, deadline
}

// inner returns the real context, made on first use. After release it is
// made cancelled.
func (c *reqContext) inner() context.Context {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ctx == nil {
		if c.deadline.IsZero() {
			c.ctx, c.cancel = context.WithCancel(c.parent)
		} else {
			c.ctx, c.cancel = context.WithDeadline(c.parent, c.deadline)
		}
		if c.released {
			c.cancel()
		}
	}
	return c.ctx
}

// release ends the context when the handler has returned, as the deferred
// cancel of context.WithDeadline would.
func (c *reqContext) release() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.released = true
	if c.cancel != nil {
		c.cancel()
	}
}

func (c *reqContext) Deadline() (time.Time, bool) {
	if c.deadline.IsZero() {
		return c.parent.Deadline()
	}
	if d, ok := c.parent.Deadline(); ok && d.Before(c.deadline) {
		return d, true
	}
	return c.deadline, true
}

func (c *reqContext) Done() <-chan struct{} { return c.inner().Done() }

func (c *reqContext) Err() error {
	c.mu.Lock()
	ctx, released := c.ctx, c.released
	c.mu.Unlock()
	if ctx != nil {
		return ctx.Err()
	}
	if err := c.parent.Err(); err != nil {
		return err
	}
	if !c.deadline.IsZero() && !time.Now().Before(c.deadline) {
		return context.DeadlineExceeded
	}
	if released {
		return context.Canceled
	}
	return nil
}

func (c *reqContext) Value(key any) any {
	c.mu.Lock()
	ctx := c.ctx
	c.mu.Unlock()
	if ctx != nil {
		return ctx.Value(key)
	}
	// context.Cause looks up the nearest cancelCtx this way: the parent's
	// holds the shutdown cause; a deadline that passed without the real
	// context made has no cause, and Cause falls back to Err.
	return c.parent.Value(key)
}

func (c *reqContext) String() string { return "nanite.requestContext" }
