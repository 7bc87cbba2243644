package vertebra

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"mellium.im/xmlstream"
	"mellium.im/xmpp/jid"
	"mellium.im/xmpp/stanza"
)

// Request is an op received by an endpoint.
type Request struct {
	From    jid.JID // the caller, as authenticated by its server
	To      jid.JID // the address the op was sent to (a component serves many)
	ID      string  // the IQ id of the op
	Token   string  // T:S, the op's token once echoed
	Type    string  // the operation, "/actor/method"
	Scope   string
	Payload json.RawMessage // the arguments as JSON; nil when there are none
	Meta    Meta
	// Deadline is when the op ends: the time the caller said it had left
	// (or Config.DefaultTimeout), counted from its arrival. The handler's
	// context ends then.
	Deadline time.Time
}

// OpHandler serves ops. ServeOp runs in its own goroutine; it answers
// through w (Ack, Intermediate, Data, Final, Nack, Fail). When it returns
// without having ended the op, the endpoint ends it: with final when it
// returned nil, otherwise with a nack (if not yet acked) or an error whose
// code is the error's ErrorCode() when it has one (see Error), else
// handler_error.
type OpHandler interface {
	ServeOp(ctx context.Context, req *Request, w *Reply) error
}

// OpHandlerFunc adapts a function to OpHandler.
type OpHandlerFunc func(ctx context.Context, req *Request, w *Reply) error

// ServeOp calls f.
func (f OpHandlerFunc) ServeOp(ctx context.Context, req *Request, w *Reply) error {
	return f(ctx, req, w)
}

type opKey struct{ from, token string }

// served is an incoming op.
type served struct {
	key    opKey
	req    Request
	local  jid.JID // the op's to: the from of everything we send about it
	ctx    context.Context
	cancel context.CancelFunc
	batch  bool // the caller accepts batches
	// compact: the caller accepts the compact echo <done>.
	compact bool
	// multi: the op came in a <batch> of ops, so its caller reads
	// <batch>es of several ops' stanzas: they go through an opQueue.
	multi bool

	// echoMu guards the echo: a component holds it back (echoHeld) to
	// send the op's first stanzas in it; echoEls are the stanzas it
	// carried, to answer duplicates of the op with the same echo while it
	// runs (once finished, a doneOp keeps the echo as XML text).
	echoMu   sync.Mutex
	echoHeld bool
	echoEls  []*Element
}

// echoLocked returns the payload of the op's echo: a batch of the op and
// the stanzas the echo carried, or the bare echo. s.echoMu is held.
func (s *served) echoLocked() []xml.Token {
	if len(s.echoEls) > 0 {
		if s.compact {
			if p, agent, ok := compactDone(s.echoEls); ok {
				return AppendDone(nil, s.req.Token, agent, p)
			}
		}
		op := &Element{Kind: KindOp, Token: s.req.Token, Type: s.req.Type}
		if toks, err := AppendBatch(nil, append([]*Element{op}, s.echoEls...)); err == nil {
			return toks
		}
		// Cannot happen: the elements were checked when sent.
	}
	return s.echo()
}

func (s *served) echo() []xml.Token {
	name := xml.Name{Space: NS, Local: string(KindOp)}
	return []xml.Token{
		xml.StartElement{Name: name, Attr: []xml.Attr{
			{Name: xml.Name{Local: "token"}, Value: s.req.Token},
			{Name: xml.Name{Local: "type"}, Value: s.req.Type},
		}},
		xml.EndElement{Name: name},
	}
}

// handleOp registers an op and starts it. With g, the op is the slot-th of
// a <batch> of ops (IQ iq) whose echoes go in one IQ-result (opGroup);
// otherwise its echo answers iq through t.
func (e *Endpoint) handleOp(iq stanza.IQ, el *Element, t xmlstream.TokenReadEncoder, g *opGroup, slot int) error {
	answer := func(toks []xml.Token) error {
		if g != nil {
			g.put(slot, toks)
			return nil
		}
		return writeIQResult(t, iq, toks)
	}
	key := opKey{from: iq.From.String(), token: el.Token}
	now := time.Now()
	e.mu.Lock()
	if d := e.doneOps[key]; d != nil {
		e.mu.Unlock()
		e.stats.dupOps.Add(1)
		e.log.Debug("vertebra: duplicate of a finished op", "from", iq.From, "token", el.Token)
		return answer(decodeXML(d.echo))
	}
	if s := e.served[key]; s != nil {
		e.mu.Unlock()
		e.stats.dupOps.Add(1)
		e.log.Debug("vertebra: duplicate op", "from", iq.From, "token", el.Token)
		s.echoMu.Lock()
		defer s.echoMu.Unlock()
		if s.echoHeld {
			// Still held: answer now; the stanzas go as IQ-sets.
			s.echoHeld = false
			return answer(s.echo())
		}
		return answer(s.echoLocked())
	}
	if e.ctx.Err() != nil {
		e.mu.Unlock()
		if g != nil {
			g.put(slot, nil)
			return nil
		}
		return writeIQError(t, iq, stanza.Cancel, stanza.ServiceUnavailable, "shutting down")
	}
	e.sweepLocked(now)
	if e.running.Load() >= int64(e.cfg.MaxOps) {
		e.mu.Unlock()
		if g != nil {
			g.put(slot, nil)
			return nil
		}
		return writeIQError(t, iq, stanza.Wait, stanza.ResourceConstraint, "too many ops in progress")
	}
	e.running.Add(1)
	timeout := el.Meta.Timeout
	if timeout <= 0 {
		timeout = e.cfg.DefaultTimeout
	}
	timeout = min(timeout, e.cfg.MaxTimeout)
	s := &served{
		key: key,
		req: Request{
			From: iq.From, To: iq.To, ID: iq.ID, Token: el.Token + ":" + newID(), Type: el.Type,
			Scope: el.Scope, Payload: el.Payload, Meta: el.Meta, Deadline: now.Add(timeout),
		},
		local: iq.To,
		batch: el.Meta.Batch && e.cfg.Hold > 0,
	}
	s.compact = s.batch && el.Meta.Compact
	s.multi = g != nil
	// A component may answer an IQ later (a client's session answers one
	// left unanswered with an error at once): hold the echo back to send
	// the op's first stanzas, often all of them, in it. Not in a <batch>
	// of ops: their echoes answer it at once.
	s.echoHeld = s.batch && e.component.Load() && g == nil
	s.ctx, s.cancel = context.WithDeadline(e.ctx, s.req.Deadline)
	e.served[key] = s
	e.mu.Unlock()
	switch {
	case g != nil && !strings.ContainsAny(s.req.Token, " \t\r\n"):
		g.putToken(slot, s.req.Token) // a bare echo, in the batch's <got>
	case !s.echoHeld:
		if err := answer(s.echo()); err != nil {
			s.cancel()
			e.running.Add(-1)
			e.mu.Lock()
			delete(e.served, key)
			e.mu.Unlock()
			return err
		}
	}
	e.stats.served.Add(1)
	e.workers.run(s)
	return nil
}

func (e *Endpoint) runOp(s *served) {
	defer s.cancel()
	w := &Reply{e: e, s: s, window: make(chan struct{}, e.cfg.Window)}
	if s.echoHeld {
		w.mu.Lock()
		w.armLocked() // the echo leaves within Hold whatever the handler does
		w.mu.Unlock()
	}
	err := e.serveOp(s, w)
	w.finish(err)
	w.mu.Lock()
	w.closed = true // nothing more leaves (a held echo of an abandoned op stays unsent)
	if w.timer != nil {
		w.timer.Stop()
		w.timer = nil
	}
	w.mu.Unlock()
	w.wg.Wait()
	e.running.Add(-1)
	// Keep what a duplicate needs, the echo as it was sent (or, when it
	// never was, the bare echo), as XML text: remembered until after the
	// op's deadline, tens of thousands of finished ops at a time under load,
	// and one byte slice is all the garbage collector has to look at.
	s.echoMu.Lock()
	echo := s.echo()
	if !s.echoHeld {
		echo = s.echoLocked()
	}
	s.echoMu.Unlock()
	expires := time.Now().Add(e.cfg.Linger)
	if d := s.req.Deadline.Add(e.cfg.Linger); d.After(expires) {
		expires = d
	}
	d := &doneOp{expires: expires.UnixNano(), echo: encodeXML(echo)}
	e.mu.Lock()
	delete(e.served, s.key)
	e.doneOps[s.key] = d
	e.finished = append(e.finished, s.key)
	e.mu.Unlock()
}

// doneOp is a finished op, remembered to answer its duplicates.
type doneOp struct {
	expires int64  // Unix ns
	echo    []byte // the echo's payload, XML
}

// encodeXML renders tokens as XML text.
func encodeXML(toks []xml.Token) []byte {
	var b bytes.Buffer
	enc := xml.NewEncoder(&b)
	for _, t := range toks {
		if err := enc.EncodeToken(t); err != nil {
			return nil
		}
	}
	if enc.Flush() != nil {
		return nil
	}
	return b.Bytes()
}

// decodeXML reads XML text back as tokens, without the xmlns attributes
// (the names carry their namespaces).
func decodeXML(b []byte) []xml.Token {
	d := xml.NewDecoder(bytes.NewReader(b))
	var toks []xml.Token
	for {
		t, err := d.Token()
		if err != nil {
			return toks
		}
		if st, ok := t.(xml.StartElement); ok {
			attrs := st.Attr[:0:0]
			for _, a := range st.Attr {
				if a.Name.Space == "xmlns" || a.Name.Space == "" && a.Name.Local == "xmlns" {
					continue
				}
				attrs = append(attrs, a)
			}
			st.Attr = attrs
			t = st
		}
		toks = append(toks, xml.CopyToken(t))
	}
}

func (e *Endpoint) serveOp(s *served, w *Reply) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = &Error{Code: CodeInternal, Message: fmt.Sprintf("op handler panicked: %v", r)}
		}
	}()
	if e.cfg.Handler == nil {
		return &Error{Code: CodeUnknown, Message: "no ops are served here"}
	}
	return e.cfg.Handler.ServeOp(s.ctx, &s.req, w)
}

// Reply answers one op. Its methods send the responder's stanzas in order,
// without waiting for each confirmation (up to Config.Window unconfirmed);
// unconfirmed ones are sent again until the op's deadline. They return
// ErrAbandoned (wrapped) once the caller is known to be gone or the
// deadline passed. They are safe for concurrent use, but the order of
// concurrent calls is undefined.
type Reply struct {
	e      *Endpoint
	s      *served
	window chan struct{}
	wg     sync.WaitGroup

	mu     sync.Mutex
	seq    int
	acked  bool
	ended  bool
	held   []*Element  // waiting to go in one batch
	timer  *time.Timer // flushes held after Config.Hold
	closed bool        // the op is over: send nothing more

	abandoned atomic.Pointer[error]
}

// errEnded: a stanza after final, error or nack.
var errEnded = errors.New("vertebra: op already ended")

// Acked reports whether the op was acknowledged.
func (w *Reply) Acked() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.acked
}

// Ack accepts the op. Data, Intermediate, Final and Fail ack first if
// needed.
func (w *Reply) Ack(ctx context.Context) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.ackLocked(ctx)
}

func (w *Reply) ackLocked(ctx context.Context) error {
	if w.ended {
		return errEnded
	}
	if w.acked {
		return nil
	}
	w.acked = true
	return w.sendLocked(ctx, &Element{Kind: KindAck})
}

// Nack refuses the op (before it was acked; after, it fails it).
func (w *Reply) Nack(ctx context.Context, code, message string) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.ended {
		return errEnded
	}
	kind := KindNack
	if w.acked {
		kind = KindError
	}
	w.ended = true
	return w.sendLocked(ctx, &Element{Kind: kind, Payload: errorPayload(code, message)})
}

// Intermediate sends an intermediate result (a data marked with its key).
func (w *Reply) Intermediate(ctx context.Context, key string, payload json.RawMessage) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.ackLocked(ctx); err != nil {
		return err
	}
	return w.sendLocked(ctx, &Element{Kind: KindData, Payload: payload, Meta: Meta{Intermediate: true, Key: key}})
}

// Data sends a result. An op may have several.
func (w *Reply) Data(ctx context.Context, payload json.RawMessage) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.ackLocked(ctx); err != nil {
		return err
	}
	return w.sendLocked(ctx, &Element{Kind: KindData, Payload: payload})
}

// DataFrom sends a result produced by the named agent (a cluster answering
// for several agents: selector all).
func (w *Reply) DataFrom(ctx context.Context, agent string, payload json.RawMessage) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.ackLocked(ctx); err != nil {
		return err
	}
	return w.sendLocked(ctx, &Element{Kind: KindData, Payload: payload, Meta: Meta{Agent: agent}})
}

// FailedFor reports that one agent of a fan-out failed, without ending the
// op: a data marked failed, with an error body.
func (w *Reply) FailedFor(ctx context.Context, agent, code, message string) error {
	body, err := json.Marshal(ErrorBody{Code: code, Message: message})
	if err != nil {
		return fmt.Errorf("vertebra: %w", err)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.ackLocked(ctx); err != nil {
		return err
	}
	return w.sendLocked(ctx, &Element{Kind: KindData, Payload: body, Meta: Meta{Agent: agent, Failed: true}})
}

// Final ends the op successfully.
func (w *Reply) Final(ctx context.Context) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.ackLocked(ctx); err != nil {
		return err
	}
	w.ended = true
	return w.sendLocked(ctx, &Element{Kind: KindFinal})
}

// Fail ends the op with an error (acking it first if needed; use Nack to
// refuse it).
func (w *Reply) Fail(ctx context.Context, code, message string) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.ackLocked(ctx); err != nil {
		return err
	}
	w.ended = true
	return w.sendLocked(ctx, &Element{Kind: KindError, Payload: errorPayload(code, message)})
}

func (w *Reply) abandon(err error) {
	err = fmt.Errorf("%w: %w", ErrAbandoned, err)
	if w.abandoned.CompareAndSwap(nil, &err) {
		w.e.log.Debug("vertebra: op abandoned", "token", w.s.req.Token, "err", err)
		w.s.cancel()
	}
}

func (w *Reply) sendLocked(ctx context.Context, el *Element) error {
	if p := w.abandoned.Load(); p != nil {
		return *p
	}
	if err := w.s.ctx.Err(); err != nil {
		w.abandon(context.Cause(w.s.ctx))
		return *w.abandoned.Load()
	}
	if w.closed {
		return errEnded
	}
	el.Token = w.s.req.Token
	el.Meta.Seq = w.seq + 1
	// Only a payload can fail to encode: check it before it is held (at
	// once when it plainly encodes: most go out as JSON text, in a <done>).
	if len(el.Payload) > 0 && !plainlyEncodes(el.Payload) {
		if _, err := el.AppendTokens(nil); err != nil {
			return fmt.Errorf("vertebra: %s of %s: %w", el.Kind, w.s.req.Type, err)
		}
	}
	w.seq++
	if !w.s.batch {
		return w.transmitLocked(ctx, []*Element{el})
	}
	w.held = append(w.held, el)
	switch el.Kind {
	case KindFinal, KindError, KindNack:
		return w.flushLocked(ctx)
	}
	if len(w.held) >= MaxBatch {
		return w.flushLocked(ctx)
	}
	w.armLocked()
	return nil
}

// armLocked makes sure held stanzas (and a held echo) leave within Hold.
func (w *Reply) armLocked() {
	if w.timer != nil {
		return
	}
	w.timer = time.AfterFunc(w.e.cfg.Hold, func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		w.timer = nil
		if err := w.flushLocked(w.s.ctx); err != nil {
			w.e.log.Debug("vertebra: flush", "token", w.s.req.Token, "err", err)
		}
	})
}

// flushLocked sends the held stanzas: in the op's echo when it is still
// held, else as one IQ-set.
func (w *Reply) flushLocked(ctx context.Context) error {
	if w.timer != nil {
		w.timer.Stop()
		w.timer = nil
	}
	els := w.held
	w.held = nil
	if w.closed {
		return nil
	}
	s := w.s
	s.echoMu.Lock()
	if s.echoHeld {
		s.echoHeld = false
		s.echoEls = els
		toks := s.echoLocked()
		s.echoMu.Unlock()
		// A lost echo is not sent again: the caller sends the op again and
		// gets the same echo (echoLocked).
		err := w.e.write(s.ctx, iqOf(stanza.ResultIQ, s.req.ID, s.local, s.req.From, toks))
		if err != nil {
			w.e.log.Debug("vertebra: echo", "token", s.req.Token, "err", err)
		}
		return nil
	}
	s.echoMu.Unlock()
	if len(els) == 0 {
		return nil
	}
	return w.transmitLocked(ctx, els)
}

// transmitLocked sends els (one element, or a batch) as an IQ-set and
// waits for its confirmation in a goroutine, sending it again as needed.
func (w *Reply) transmitLocked(ctx context.Context, els []*Element) error {
	pl, agent, whole := compactDone(els)
	var toks []xml.Token
	var err error
	switch {
	case whole && w.s.compact:
		// A whole quick op for a caller that reads <done>: one element
		// (a responder that could not hold the op's echo, e.g. a client).
		toks = AppendDone(nil, w.s.req.Token, agent, pl)
	case len(els) == 1:
		toks, err = els[0].AppendTokens(nil)
	default:
		toks, err = AppendBatch(nil, els)
	}
	if err != nil {
		return err
	}
	select {
	case w.window <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	case <-w.s.ctx.Done():
		w.abandon(context.Cause(w.s.ctx))
		return *w.abandoned.Load()
	}
	id := newID()
	full := iqTokens(id, w.s.local, w.s.req.From, toks)
	var p *pending
	if whole && w.s.multi {
		// A whole quick op, for a caller that reads <batch>es of several
		// ops' stanzas: it may go, as a <done>, with others to it.
		unit := toks
		if !w.s.compact {
			unit = AppendDone(nil, w.s.req.Token, agent, pl)
		}
		p = w.e.startQueued(true, w.s.local, w.s.req.From, id, func() []xml.Token { return full },
			func() []xml.Token { return unit })
	} else {
		p = w.e.start(w.s.ctx, w.s.req.From, id, func() []xml.Token { return full })
	}
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		_, err := w.e.wait(w.s.ctx, p, true)
		if p.queue != nil {
			w.e.queueDone(p.queue)
		}
		<-w.window
		if err != nil {
			w.abandon(err)
		}
	}()
	return nil
}

// finish ends the op if the handler did not.
func (w *Reply) finish(herr error) {
	w.mu.Lock()
	ended := w.ended
	w.mu.Unlock()
	if ended || w.abandoned.Load() != nil {
		return
	}
	ctx := w.s.ctx
	if herr == nil {
		_ = w.Final(ctx)
		return
	}
	if errors.Is(herr, ErrAbandoned) {
		return
	}
	code := codeOf(herr, CodeHandler)
	if !w.Acked() {
		_ = w.Nack(ctx, code, messageOf(herr))
		return
	}
	_ = w.Fail(ctx, code, messageOf(herr))
}

// opGroup collects the echoes of a <batch> of ops received in one IQ-set
// (each as it would answer the op alone), to answer them in one IQ-result,
// <batch> of them in the ops' order. The echoes are not held: the ops'
// stanzas follow as IQ-sets, batched across ops (see opQueue).
type opGroup struct {
	parts  [][]xml.Token // an echo as it would answer the op alone
	tokens []string      // or only its token, for a bare echo
}

func newOpGroup(n int) *opGroup {
	return &opGroup{parts: make([][]xml.Token, n), tokens: make([]string, n)}
}

func (g *opGroup) put(slot int, toks []xml.Token) { g.parts[slot] = toks }

func (g *opGroup) putToken(slot int, token string) { g.tokens[slot] = token }
