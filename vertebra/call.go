package vertebra

import (
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"time"

	"mellium.im/xmlstream"
	"mellium.im/xmpp/jid"
	"mellium.im/xmpp/stanza"
)

// maxBuffered bounds the stanzas of one call received but not yet taken by
// the caller; past it the responder is told to wait (resource-constraint)
// and sends again later.
const maxBuffered = 256

// Data is a data element received by a caller.
type Data struct {
	From         jid.JID // the responder
	Intermediate bool    // an intermediate result (Key says which), not a result
	Key          string
	Payload      json.RawMessage
	// Agent is the agent that produced it, when the responder says so (a
	// cluster answering a fan-out); Failed marks that agent's error, with
	// an error body as Payload.
	Agent  string
	Failed bool
}

// Result is the outcome of an op that ended with final.
type Result struct {
	From  jid.JID // the responder (the JID its stanzas came from)
	Token string  // T:S
	// Data are the op's results (its data elements not marked
	// intermediate), in order. A Nanite actor sends exactly one.
	Data []json.RawMessage
	// Items are the same results with the agent that produced each (when
	// the responder names them) and the failures of single agents of a
	// fan-out (Failed), in order.
	Items []Data
}

// Value returns the last result, or nil when there is none.
func (r *Result) Value() json.RawMessage {
	if r == nil || len(r.Data) == 0 {
		return nil
	}
	return r.Data[len(r.Data)-1]
}

type callOptions struct {
	from   jid.JID
	meta   Meta
	scope  string
	onData func(Data)
	onAck  func(from jid.JID)
}

// CallOption configures a call.
type CallOption func(*callOptions)

// WithFrom sets the JID the op is sent from. A component must give one of
// its addresses (default: its domain); a client's server ignores it.
func WithFrom(j jid.JID) CallOption { return func(o *callOptions) { o.from = j } }

// WithMeta sets the op's project metadata (request id, selector, tags,
// hops, signature). Its Timeout is ignored: the context's deadline is
// sent.
func WithMeta(m Meta) CallOption { return func(o *callOptions) { o.meta = m } }

// WithScope sets the op's scope attribute (informational).
func WithScope(s string) CallOption { return func(o *callOptions) { o.scope = s } }

// OnData receives every data element (intermediate or not) as it arrives,
// in order, in the calling goroutine.
func OnData(f func(Data)) CallOption { return func(o *callOptions) { o.onData = f } }

// OnAck is called when the responder acks the op.
func OnAck(f func(from jid.JID)) CallOption { return func(o *callOptions) { o.onAck = f } }

type event struct {
	el   *Element
	from jid.JID
}

// call is an op we sent.
type call struct {
	to     jid.JID
	opID   string // IQ id of the op
	notify chan struct{}

	// guarded by Endpoint.mu
	events  []event
	seen    map[string]struct{} // IQ ids received (nil until one is: quick ops have none)
	done    bool
	expires time.Time
}

// Call sends the op to to and waits until it ends: it returns the Result
// after final; an *OpError (ErrNack, ErrRemote) after nack or error; a
// *StanzaError when the op itself is answered with a stanza error (no
// such JID: ErrUnavailable); a *DeadlineError when ctx's deadline passes
// (Config.DefaultTimeout when ctx has none). The op is sent again until
// it is echoed; the responder's stanzas are confirmed, de-duplicated and
// put back in order.
func (e *Endpoint) Call(ctx context.Context, to jid.JID, op string, payload json.RawMessage, opts ...CallOption) (*Result, error) {
	var o callOptions
	for _, f := range opts {
		f(&o)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, e.cfg.DefaultTimeout)
		defer cancel()
	}
	deadline, _ := ctx.Deadline()
	from := o.from
	if from.String() == "" {
		from = e.LocalAddr()
	}
	el := Element{Kind: KindOp, Token: newID(), Type: op, Scope: o.scope, Payload: payload, Meta: o.meta}
	el.Meta.Seq, el.Meta.Intermediate, el.Meta.Key = 0, false, ""
	el.Meta.Batch = !e.cfg.NoBatch
	el.Meta.Compact = el.Meta.Batch && !e.cfg.NoCompact
	el.Meta.Timeout = max(time.Until(deadline), time.Millisecond)
	// A peer known to read <call> gets the op that way (see AppendCall).
	asCall := el.Meta.Compact && e.knowsCompact(to) && compactOp(&el)
	var first []xml.Token
	if !asCall {
		var err error
		if first, err = el.AppendTokens(nil); err != nil { // sent first; an error is the payload's
			return nil, fmt.Errorf("vertebra: op %s: %w", op, err)
		}
	}
	c := &call{to: to, opID: newID(), notify: make(chan struct{}, 1)}
	e.mu.Lock()
	e.sweepLocked(time.Now())
	e.calls[el.Token] = c
	e.mu.Unlock()
	defer e.finishCall(c)
	e.stats.called.Add(1)

	build := func() []xml.Token {
		if first != nil { // the first send, just after the check
			toks := first
			first = nil
			return iqTokens(c.opID, from, to, toks)
		}
		m := el
		m.Meta.Timeout = max(time.Until(deadline), time.Millisecond)
		if asCall {
			return iqTokens(c.opID, from, to, AppendCall(nil, &m))
		}
		toks, _ := m.AppendTokens(nil)
		return iqTokens(c.opID, from, to, toks)
	}
	var p *pending
	if asCall {
		// It may go in a <batch> with other ops to the same peer.
		elem := func() []xml.Token {
			m := el
			m.Meta.Timeout = max(time.Until(deadline), time.Millisecond)
			return AppendCall(nil, &m)
		}
		p = e.startOp(from, to, c.opID, build, elem)
		q := p.queue
		defer e.queueDone(q) // the op is no longer under way

	} else {
		p = e.start(ctx, to, c.opID, build)
	}
	_, err := e.wait(ctx, p, false)
	var se *StanzaError
	if err != nil && asCall && errors.As(err, &se) && se.Err.Type == stanza.Cancel &&
		(se.Err.Condition == stanza.ServiceUnavailable || se.Err.Condition == stanza.FeatureNotImplemented ||
			se.Err.Condition == stanza.BadRequest) {
		// An older peer that does not read <call>: the op again, as <op>.
		e.log.Debug("vertebra: peer refused <call>, sending <op>", "to", to, "err", err)
		e.forgetCompact(to)
		asCall = false
		if first, err = el.AppendTokens(nil); err != nil {
			return nil, fmt.Errorf("vertebra: op %s: %w", op, err)
		}
		p = e.start(ctx, to, c.opID, build)
		_, err = e.wait(ctx, p, false)
	}
	if err != nil {
		return nil, e.callErr(ctx, err, to, op, "the op's echo")
	}
	return e.collect(ctx, c, &o, op)
}

func (e *Endpoint) callErr(ctx context.Context, err error, to jid.JID, op, stage string) error {
	if ctx.Err() != nil {
		if ctx.Err() == context.DeadlineExceeded {
			return &DeadlineError{To: to, Op: op, Stage: stage}
		}
		return fmt.Errorf("vertebra: %s at %s: %w", op, to, context.Cause(ctx))
	}
	return err
}

func (e *Endpoint) finishCall(c *call) {
	e.mu.Lock()
	c.done = true
	c.events = nil
	c.expires = time.Now().Add(e.cfg.Linger)
	e.mu.Unlock()
}

// collect processes the responder's stanzas in order until the op ends.
func (e *Endpoint) collect(ctx context.Context, c *call, o *callOptions, op string) (*Result, error) {
	res := &Result{From: c.to}
	stage := "ack"
	next := 1
	var held map[int]event // arrived ahead of their turn (made when one does)
	// handle returns true when the op has ended.
	handle := func(ev event) (bool, error) {
		el := ev.el
		res.From, res.Token = ev.from, el.Token
		if stage == "ack" && el.Kind != KindNack {
			stage = "final"
			if o.onAck != nil {
				o.onAck(ev.from)
			}
		}
		switch el.Kind {
		case KindNack, KindError:
			b := parseErrorBody(el.Payload)
			return true, &OpError{Nack: el.Kind == KindNack, From: ev.from, Op: op, Code: b.Code, Message: b.Message}
		case KindData:
			if o.onData != nil {
				o.onData(Data{From: ev.from, Intermediate: el.Meta.Intermediate, Key: el.Meta.Key, Payload: el.Payload,
					Agent: el.Meta.Agent, Failed: el.Meta.Failed})
			}
			if !el.Meta.Intermediate {
				if !el.Meta.Failed {
					res.Data = append(res.Data, el.Payload)
				}
				res.Items = append(res.Items, Data{From: ev.from, Payload: el.Payload, Agent: el.Meta.Agent, Failed: el.Meta.Failed})
			}
		case KindFinal:
			return true, nil
		}
		return false, nil
	}
	for {
		e.mu.Lock()
		evs := c.events
		c.events = nil
		e.mu.Unlock()
		for _, ev := range evs {
			seq := ev.el.Meta.Seq
			if seq == 0 {
				// A peer without sequence numbers: arrival order.
				if end, err := handle(ev); end {
					return res, err
				}
				continue
			}
			if seq == next && len(held) == 0 {
				// In order, as almost always.
				next++
				if end, err := handle(ev); end {
					return res, err
				}
				continue
			}
			if seq >= next {
				if held == nil {
					held = map[int]event{}
				}
				held[seq] = ev
			}
			if len(held) > maxBuffered {
				return nil, &OpError{From: ev.from, Op: op, Code: CodeBadRequest, Message: "responder skipped stanzas"}
			}
			for {
				ev, ok := held[next]
				if !ok {
					break
				}
				delete(held, next)
				next++
				if end, err := handle(ev); end {
					return res, err
				}
			}
		}
		select {
		case <-c.notify:
		case <-ctx.Done():
			return nil, e.callErr(ctx, nil, c.to, op, stage)
		case <-e.ctx.Done():
			return nil, ErrClosed
		}
	}
}

// handleReply receives a responder's stanza (or batch of stanzas) for one
// of our calls.
func (e *Endpoint) handleReply(iq stanza.IQ, els []*Element, t xmlstream.TokenReadEncoder) error {
	switch e.deliverEvents(iq.From, iq.ID, els) {
	case deliverUnknown:
		return writeIQError(t, iq, stanza.Cancel, stanza.ItemNotFound, "no op with token "+els[0].Token)
	case deliverOver:
		return writeIQError(t, iq, stanza.Cancel, stanza.ItemNotFound, "op "+els[0].Token+" is over")
	case deliverBusy:
		return writeIQError(t, iq, stanza.Wait, stanza.ResourceConstraint, "caller busy")
	}
	return writeIQResult(t, iq, nil)
}

type deliverResult int

const (
	delivered deliverResult = iota
	deliverDup
	deliverUnknown
	deliverOver
	deliverBusy
)

// deliverEvents hands a responder's elements (all of one op) to its call.
// id is the IQ id they came in ("" for those in an op's echo), used to
// recognise resends.
func (e *Endpoint) deliverEvents(from jid.JID, id string, els []*Element) deliverResult {
	T, ok := splitToken(els[0].Token)
	e.mu.Lock()
	var c *call
	if ok {
		c = e.calls[T]
	}
	if c == nil || !fromMatches(from, c.to) {
		e.mu.Unlock()
		return deliverUnknown
	}
	if id != "" {
		if _, dup := c.seen[id]; dup {
			e.mu.Unlock()
			e.stats.dupStanzas.Add(1)
			return deliverDup
		}
	}
	if c.done {
		e.mu.Unlock()
		return deliverOver
	}
	if len(c.events) >= maxBuffered {
		e.mu.Unlock()
		return deliverBusy
	}
	if id != "" {
		if c.seen == nil {
			c.seen = map[string]struct{}{}
		}
		c.seen[id] = struct{}{}
	}
	for _, el := range els {
		c.events = append(c.events, event{el: el, from: from})
	}
	p := e.pending[c.opID]
	e.mu.Unlock()
	select {
	case c.notify <- struct{}{}:
	default:
	}
	if p != nil {
		// The op is evidently accepted, even if its echo went missing.
		p.deliver(response{token: els[0].Token})
	}
	return delivered
}
