package nanite

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
)

// Result is one agent's answer to a request.
type Result struct {
	Agent   string          // identity of the agent that answered
	Payload json.RawMessage // the result, JSON; nil when Err is set
	Err     error           // a *RemoteError when the agent answered with an error
}

// Decode unmarshals the result payload into v, or returns the result's error.
func (r Result) Decode(v any) error {
	if r.Err != nil {
		return r.Err
	}
	if err := json.Unmarshal(r.Payload, v); err != nil {
		return fmt.Errorf("nanite: decode result from %s: %w", r.Agent, err)
	}
	return nil
}

// Response collects the results of one request: one for selectors that pick a
// single agent, one per agent for "all".
type Response struct {
	Token   string
	Service string
	Results []Result
}

// Decode unmarshals the first result into v (or returns its error).
func (r *Response) Decode(v any) error {
	if r == nil || len(r.Results) == 0 {
		return fmt.Errorf("nanite: no result to decode")
	}
	return r.Results[0].Decode(v)
}

// Intermediate is a streamed intermediate result.
type Intermediate struct {
	Agent   string
	Key     string
	Payload json.RawMessage
}

// call is one outstanding request in a caller's table.
type call struct {
	token   string
	service string

	mu sync.Mutex
	// byAgent: only results from the agents in expect count, one each, and
	// the call is finished when expect is empty. Otherwise the first result
	// packet completes it.
	byAgent  bool
	expect   idSet // agents still expected, when byAgent
	results  []Result
	finished bool
	done     chan struct{}
	failure  error // set when the call failed as a whole
	resBuf   [1]Result
	resp     Response // what response returns: the call's own memory

	onIntermediate func(Intermediate)
	// onResult, when set, is told about every result as it arrives (the
	// mapper uses it for in-flight accounting and retries).
	onResult func(c *call, agent string)
}

// complete records a result; it returns true when the call is finished.
func (c *call) complete(r Result) bool {
	c.mu.Lock()
	if c.finished {
		c.mu.Unlock()
		return false
	}
	if c.byAgent {
		if !c.expect.has(r.Agent) {
			c.mu.Unlock()
			return false // unexpected or duplicate answer
		}
		c.expect.del(r.Agent)
	}
	if c.results == nil {
		c.results = c.resBuf[:0]
	}
	c.results = append(c.results, r)
	fin := !c.byAgent || len(c.expect) == 0
	if fin {
		c.finished = true
		close(c.done)
	}
	c.mu.Unlock()
	return fin
}

// completeFor records the results a gateway agent sent for several
// agents at once, in place of its own. It returns false when the call does
// not expect an answer from agent (the packet is then a relayed aggregate).
func (c *call) completeFor(agent string, recs []ResultRecord) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.finished || !c.byAgent || !c.expect.has(agent) {
		return false
	}
	c.expect.del(agent)
	for _, r := range recs {
		c.results = append(c.results, Result{Agent: r.Agent, Payload: r.Payload, Err: remoteErr(r.Agent, r.Error)})
	}
	if len(c.expect) == 0 {
		c.finished = true
		close(c.done)
	}
	return true
}

// completeAll records a whole set of results and finishes the call.
func (c *call) completeAll(rs []Result) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.finished {
		return
	}
	c.results = append(c.results, rs...)
	c.expect = c.expect[:0]
	c.finished = true
	close(c.done)
}

// fail ends the call with err unless it already finished.
func (c *call) fail(err error) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.finished {
		return false
	}
	c.failure = err
	c.finished = true
	close(c.done)
	return true
}

// missing lists the agents that have not answered, sorted.
func (c *call) missing() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.missingLocked()
}

func (c *call) missingLocked() []string {
	out := slices.Clone(c.expect)
	slices.Sort(out)
	return out
}

// expire ends the call at its deadline, unless it already finished: wait
// then returns a *TimeoutError naming the agents that did not answer.
func (c *call) expire() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.finished {
		return false
	}
	c.failure = &TimeoutError{Service: c.service, Missing: c.missingLocked()}
	c.finished = true
	close(c.done)
	return true
}

// calls is a table of outstanding requests keyed by token.
type calls struct {
	mu sync.Mutex
	m  map[string]*call
}

func newCalls() *calls { return &calls{m: map[string]*call{}} }

func (t *calls) add(c *call) {
	t.mu.Lock()
	t.m[c.token] = c
	t.mu.Unlock()
}

func (t *calls) get(token string) *call {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.m[token]
}

func (t *calls) remove(token string) {
	t.mu.Lock()
	delete(t.m, token)
	t.mu.Unlock()
}

func (t *calls) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.m)
}

func (t *calls) all() []*call {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]*call, 0, len(t.m))
	for _, c := range t.m {
		out = append(out, c)
	}
	return out
}

// handleReply dispatches a packet that arrived on a reply queue. It returns
// the call it belonged to, or nil.
func (t *calls) handleReply(p *Packet) *call {
	c := t.get(p.Token)
	if c == nil {
		return nil
	}
	switch p.Kind {
	case KindIntermediate:
		if c.onIntermediate != nil {
			c.onIntermediate(Intermediate{Agent: p.From, Key: p.Key, Payload: p.Payload})
		}
	case KindResult:
		if len(p.Results) > 0 && c.completeFor(p.From, p.Results) {
			// A gateway answered for several agents (MultiResult).
		} else if len(p.Results) > 0 {
			// An aggregated answer relayed by a mapper: it ends the call.
			rs := make([]Result, 0, len(p.Results))
			for _, r := range p.Results {
				rs = append(rs, Result{Agent: r.Agent, Payload: r.Payload, Err: remoteErr(r.Agent, r.Error)})
			}
			c.completeAll(rs)
		} else {
			c.complete(Result{Agent: p.From, Payload: p.Payload, Err: remoteErr(p.From, p.Error)})
		}
		if c.onResult != nil {
			c.onResult(c, p.From)
		}
	}
	return c
}

// wait blocks until the call finishes or ctx ends, and builds the response.
func (c *call) wait(ctx context.Context) (*Response, error) {
	select {
	case <-c.done:
	case <-ctx.Done():
		if c.fail(nil) { // mark finished so late answers are ignored
			resp := c.response()
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return resp, &TimeoutError{Service: c.service, Missing: c.missing()}
			}
			return resp, fmt.Errorf("nanite: request %s: %w", c.service, context.Cause(ctx))
		}
	}
	resp := c.response()
	c.mu.Lock()
	failure := c.failure
	c.mu.Unlock()
	if failure != nil {
		return resp, failure
	}
	return resp, nil
}

// response builds the response of a finished call. Its results no longer
// change (complete, completeAll and fail do nothing once it finished), so
// the response shares them, and it is part of the call (one allocation
// less per request; the requester holding it holds the call).
func (c *call) response() *Response {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.resp = Response{Token: c.token, Service: c.service, Results: c.results[:len(c.results):len(c.results)]}
	return &c.resp
}

// newToken returns a random 128-bit token in hex.
func newToken() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
