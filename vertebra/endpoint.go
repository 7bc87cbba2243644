package vertebra

import (
	"context"
	"crypto/rand"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"mellium.im/xmlstream"
	"mellium.im/xmpp"
	"mellium.im/xmpp/component"
	"mellium.im/xmpp/disco/info"
	"mellium.im/xmpp/jid"
	"mellium.im/xmpp/mux"
	"mellium.im/xmpp/stanza"

	"github.com/nanite-go/nanite/vertebra/values"
)

// Config configures an Endpoint. Zero fields take the documented defaults.
type Config struct {
	// Handler serves the ops this endpoint receives. nil refuses every op
	// with a nack (code unknown_service).
	Handler OpHandler
	// DefaultTimeout is the deadline of an incoming op that carries none
	// (a plain Vertebra peer), and of a Call whose context has none.
	// Default 30 s.
	DefaultTimeout time.Duration
	// MaxTimeout caps the deadline an incoming op may ask for. Default 1 h.
	MaxTimeout time.Duration
	// RetryInitial is the least time to wait for an IQ's confirmation
	// before sending it again; the wait grows with the round trips
	// measured (4 deviations above the smoothed round trip, as TCP does)
	// and doubles on each resend, up to RetryMax. Defaults 1 s and 8 s.
	RetryInitial, RetryMax time.Duration
	// Window is the number of stanzas of one op the responder sends
	// without waiting for their confirmations (ack, data..., final follow
	// each other without a round trip each). Default 32.
	Window int
	// MaxOps bounds the incoming ops running at once. Past it new ops are
	// answered with a resource-constraint stanza error (type wait), which
	// callers retry. Default 10000.
	MaxOps int
	// MaxRemembered bounds the finished ops remembered to recognise
	// duplicates (their echo and token are kept until Linger after their
	// deadline). Past it the oldest are forgotten first; a duplicate of a
	// forgotten op, which only a lost stanza can cause, would run again.
	// Default 100000.
	MaxRemembered int
	// Linger is how long a finished op is remembered after its deadline
	// (a caller resends an op only until its deadline), and a finished
	// call after its end (to confirm late duplicates). Default 5 s.
	Linger time.Duration
	// Hold is how long a responder holds its stanzas to fold them into one
	// <batch> for callers that accept it (Meta.Batch): ack, data and final
	// of a quick op then cost one IQ-set, and on a component the op's
	// echo carries the whole op. A final, error or nack is never held.
	// Default 2 ms; negative: never batch.
	Hold time.Duration
	// NoBatch makes calls without offering batching (as a plain Vertebra
	// peer would).
	NoBatch bool
	// OpHold is how long the first send of an op (or a quick op's result
	// to a caller that batches its ops) may wait for others to the same
	// peer, to go with them in one <batch>, when more than 8 ops (or any
	// result) are already under way to that peer (never otherwise: then it
	// leaves at once).
	// Only between this project's peers (see docs/xmpp.md, "Batches of
	// ops"). Default 1 ms; negative: never wait (they still go together
	// when they queue behind a write).
	OpHold time.Duration
	// NoCompact makes calls offer batching but not the compact echo
	// <done> (as a peer that predates it would; see AppendDone).
	NoCompact bool
	// Limits bound the typed values accepted (values.DefaultLimits).
	Limits values.Limits
	// Features adds disco#info features (see ServiceFeature).
	Features func() []string
	// Logger receives debug messages; nil discards them.
	Logger *slog.Logger
}

func (c *Config) setDefaults() {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.DefaultTimeout, 30*time.Second)
	def(&c.MaxTimeout, time.Hour)
	def(&c.RetryInitial, time.Second)
	def(&c.RetryMax, 8*time.Second)
	def(&c.Linger, 5*time.Second)
	if c.Hold == 0 {
		c.Hold = 2 * time.Millisecond
	}
	if c.OpHold == 0 {
		c.OpHold = time.Millisecond
	}
	if c.RetryMax < c.RetryInitial {
		c.RetryMax = c.RetryInitial
	}
	if c.Window <= 0 {
		c.Window = 32
	}
	if c.MaxOps <= 0 {
		c.MaxOps = 10000
	}
	if c.MaxRemembered <= 0 {
		c.MaxRemembered = 100000
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}

// ServiceFeature is the disco#info feature that advertises the op (service)
// svc, e.g. "urn:nanite:op:0#/echo/say".
func ServiceFeature(svc string) string { return NSMeta + "#" + svc }

// Endpoint speaks the ops protocol on one XMPP session at a time: it serves
// incoming ops with its Handler and makes calls. It works the same on a
// client (c2s) session and on a component session; the session may be
// replaced (SetSession) when its owner reconnects, and stanzas not yet
// confirmed are sent again on the new one.
//
// Register it on the session's mux with Handle and run the session's Serve:
// replies arrive only while Serve runs.
type Endpoint struct {
	cfg Config
	log *slog.Logger

	ctx    context.Context // ends at Close
	cancel context.CancelFunc

	sess      atomic.Pointer[xmpp.Session]
	local     atomic.Pointer[jid.JID]
	component atomic.Bool // the session is a component's
	connMu    sync.Mutex
	connCh    chan struct{} // closed (and replaced) when the session changes

	// mu guards the maps and everything in call and served marked so.
	mu        sync.Mutex
	pending   map[string]*pending // outgoing IQ-sets by id
	calls     map[string]*call    // our calls by token T
	served    map[opKey]*served   // incoming ops running, by (sender, token)
	doneOps   map[opKey]*doneOp   // finished ones, remembered for duplicates
	lastSweep time.Time

	// compactPeers are the bare JIDs that answered an op with <done>
	// (true: they read <call> too, see AppendCall) and those that then
	// refused a <call> (false: not learnt again).
	compactPeers sync.Map // string → bool
	queues       sync.Map // from+" "+to → *opQueue
	compactN     atomic.Int64

	rtt     rttEstimator
	running atomic.Int64 // incoming ops running
	workers opWorkers    // the goroutines that run them
	// finished lists finished ops oldest first, for MaxRemembered.
	finished []opKey // guarded by mu

	stats struct {
		sent, received, resent, dupOps, dupStanzas, served, called atomic.Int64
		opBatches, opBatchesReceived, resultBatches                atomic.Int64
	}
}

// Stats counts an endpoint's traffic since it was made.
type Stats struct {
	Sent             int64 // IQ-sets sent, resends included (IQ-results written in handlers are not counted)
	Received         int64 // IQ-sets of this protocol received (ops and replies), duplicates included
	Resent           int64 // IQ-sets sent again for want of a confirmation
	DuplicateOps     int64 // ops received again and answered without running them
	DuplicateStanzas int64 // ack/data/final/... received again and confirmed without delivering them
	OpsServed        int64 // ops run by the handler
	OpsCalled        int64 // calls made
	// OpBatches are the <batch>es of several ops sent (each one IQ-set),
	// OpBatchesReceived those received (see AppendOps).
	OpBatches, OpBatchesReceived int64
	// ResultBatches are the <batch>es holding several ops' stanzas sent
	// by a responder (to callers that sent it <batch>es of ops).
	ResultBatches int64
}

// Stats returns the endpoint's counters.
func (e *Endpoint) Stats() Stats {
	s := &e.stats
	return Stats{Sent: s.sent.Load(), Received: s.received.Load(), Resent: s.resent.Load(),
		DuplicateOps: s.dupOps.Load(), DuplicateStanzas: s.dupStanzas.Load(),
		OpsServed: s.served.Load(), OpsCalled: s.called.Load(),
		OpBatches: s.opBatches.Load(), OpBatchesReceived: s.opBatchesReceived.Load(), ResultBatches: s.resultBatches.Load()}
}

// NewEndpoint returns an endpoint with no session yet.
func NewEndpoint(cfg Config) *Endpoint {
	cfg.setDefaults()
	e := &Endpoint{
		cfg:     cfg,
		log:     cfg.Logger,
		connCh:  make(chan struct{}),
		pending: map[string]*pending{},
		calls:   map[string]*call{},
		served:  map[opKey]*served{},
		doneOps: map[opKey]*doneOp{},
	}
	e.ctx, e.cancel = context.WithCancel(context.Background())
	e.workers.serve, e.workers.done = e.runOp, e.ctx.Done()
	return e
}

// Close stops the endpoint: running handlers' contexts are canceled and
// calls end with ErrClosed. It does not close the session.
func (e *Endpoint) Close() error {
	e.cancel()
	return nil
}

// SetSession makes s the session to send on (nil: none, while
// reconnecting). Unconfirmed stanzas are sent again at once on a new
// session.
func (e *Endpoint) SetSession(s *xmpp.Session) {
	e.sess.Store(s)
	if s != nil {
		a := s.LocalAddr()
		e.local.Store(&a)
		e.component.Store(s.In().XMLNS == component.NSAccept)
	}
	e.connMu.Lock()
	close(e.connCh)
	e.connCh = make(chan struct{})
	e.connMu.Unlock()
}

// Session returns the current session, or nil.
func (e *Endpoint) Session() *xmpp.Session { return e.sess.Load() }

// LocalAddr returns the address of the current (or last) session: the
// bound full JID of a client, the domain of a component.
func (e *Endpoint) LocalAddr() jid.JID {
	if a := e.local.Load(); a != nil {
		return *a
	}
	return jid.JID{}
}

func (e *Endpoint) sessionChanged() <-chan struct{} {
	e.connMu.Lock()
	defer e.connMu.Unlock()
	return e.connCh
}

// Handle returns a mux option that registers the endpoint: IQ-sets in
// namespace NS, and the IQ-results and IQ-errors answering its own
// IQ-sets (as wildcard result and error handlers; answers to other IQs
// are ignored, as the mux would). Use it with the stanza namespace of the
// session: mux.New(stanza.NSClient, ...) or mux.New(component.NSAccept, ...).
func (e *Endpoint) Handle() mux.Option {
	return func(m *mux.ServeMux) {
		mux.IQ(stanza.SetIQ, xml.Name{Space: NS}, setHandler{e})(m)
		mux.IQ(stanza.SetIQ, xml.Name{Space: NSMeta, Local: "batch"}, setHandler{e})(m)
		mux.IQ(stanza.SetIQ, callName, setHandler{e})(m)
		mux.IQ(stanza.SetIQ, doneName, setHandler{e})(m)
		mux.IQ(stanza.ResultIQ, xml.Name{}, respHandler{e})(m)
		mux.IQ(stanza.ErrorIQ, xml.Name{}, respHandler{e})(m)
	}
}

func newID() string { return rand.Text() }

// maxCompactPeers bounds the peers remembered as reading <call>; past it
// the memory starts over (ops go as <op> until each answers with <done>
// again).
const maxCompactPeers = 10000

func (e *Endpoint) knowsCompact(to jid.JID) bool {
	v, _ := e.compactPeers.Load(to.Bare().String())
	return v == true
}

func (e *Endpoint) learnCompact(from jid.JID) {
	k := from.Bare().String()
	if _, ok := e.compactPeers.Load(k); ok {
		return
	}
	if e.compactN.Add(1) > maxCompactPeers {
		e.compactPeers.Clear()
		e.compactN.Store(1)
	}
	e.compactPeers.Store(k, true)
}

// forgetCompact marks to as not reading <call> (it refused one).
func (e *Endpoint) forgetCompact(to jid.JID) { e.compactPeers.Store(to.Bare().String(), false) }

// --- sending with confirmation and resends --------------------------------

type response struct {
	token string // the echo's token, for an op
	err   error  // *StanzaError
}

// pending is an outgoing IQ-set awaiting its IQ-result.
type pending struct {
	id    string
	to    jid.JID
	build func() []xml.Token // the IQ; called for each (re)send
	ch    chan response      // capacity 1
	werr  error              // the last write's error
	sent  time.Time          // first sent
	// ops, on the IQ-set of a <batch> of ops, are the ops' own pendings:
	// its IQ-result holds their echoes (see sendOps).
	ops     []*pending
	results bool // ops are a responder's stanzas: confirmed all at once
	// elem returns the op's element for a <batch> of ops (nil: not
	// batchable); queue is the peer's queue it went through.
	elem  func() []xml.Token
	queue *opQueue
}

// errResendNow, delivered to an op's pending, makes it send the op again
// at once, alone (its <batch> of ops was refused).
var errResendNow = errors.New("vertebra: send again alone")

// rttEstimator smooths the round trips of confirmations (Jacobson and
// Karels, as TCP's RFC 6298), measured on stanzas sent once only.
type rttEstimator struct {
	mu           sync.Mutex
	srtt, rttvar time.Duration
	n            int
}

func (r *rttEstimator) sample(d time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.n == 0 {
		r.srtt, r.rttvar = d, d/2
	} else {
		diff := r.srtt - d
		if diff < 0 {
			diff = -diff
		}
		r.rttvar = (3*r.rttvar + diff) / 4
		r.srtt = (7*r.srtt + d) / 8
	}
	r.n++
}

func (r *rttEstimator) rto(least, most time.Duration) time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	return min(max(r.srtt+4*r.rttvar, least), most)
}

func (p *pending) deliver(r response) {
	select {
	case p.ch <- r:
	default:
	}
}

// iqTokens wraps payload tokens in an IQ-set.
func iqTokens(id string, from, to jid.JID, payload []xml.Token) []xml.Token {
	return iqOf(stanza.SetIQ, id, from, to, payload)
}

// iqOf wraps payload tokens in an IQ of type typ.
func iqOf(typ stanza.IQType, id string, from, to jid.JID, payload []xml.Token) []xml.Token {
	st := xml.StartElement{Name: xml.Name{Local: "iq"}, Attr: []xml.Attr{
		{Name: xml.Name{Local: "type"}, Value: string(typ)},
		{Name: xml.Name{Local: "id"}, Value: id},
	}}
	if s := to.String(); s != "" {
		st.Attr = append(st.Attr, xml.Attr{Name: xml.Name{Local: "to"}, Value: s})
	}
	if s := from.String(); s != "" {
		st.Attr = append(st.Attr, xml.Attr{Name: xml.Name{Local: "from"}, Value: s})
	}
	toks := make([]xml.Token, 0, len(payload)+2)
	toks = append(toks, st)
	toks = append(toks, payload...)
	return append(toks, xml.EndElement{Name: st.Name})
}

type tokenSlice struct {
	toks []xml.Token
	i    int
}

func (t *tokenSlice) Token() (xml.Token, error) {
	if t.i >= len(t.toks) {
		return nil, io.EOF
	}
	tok := t.toks[t.i]
	if t.i == 0 {
		// The session's encoder edits the stanza's attributes in place;
		// give it a copy so that resends start from the original.
		st := tok.(xml.StartElement)
		st.Attr = append([]xml.Attr(nil), st.Attr...)
		tok = st
	}
	t.i++
	return tok, nil
}

// write sends a stanza. ctx is not passed on: mellium (v0.22.0) makes a
// context's end cut the connection's writes short with a write deadline
// in the past, set from a goroutine that can run after Send has returned
// and then break another goroutine's write (the session's Serve ends with
// "i/o timeout"). Writes end when the connection does.
func (e *Endpoint) write(_ context.Context, toks []xml.Token) error {
	s := e.sess.Load()
	if s == nil {
		return ErrNotConnected
	}
	return sendTokens(s, toks)
}

// SendStanza writes the first element r reads to s, as Session.Send does,
// without the goroutine Send starts per stanza (see sendStanza): for
// stanzas an application sends on a session of its own (a bridge's
// presence).
func SendStanza(s *xmpp.Session, r xml.TokenReader) error { return sendStanza(s, r) }

// sendStanza writes the first element r reads to s, as Session.Send does,
// but through the session's token writer: Send (mellium v0.22.0) starts a
// goroutine per stanza to watch its context, even one that never ends, and
// wakes it when done; two goroutine switches per stanza are a good part of
// the latency of an op when the machine is otherwise idle.
func sendStanza(s *xmpp.Session, r xml.TokenReader) error {
	tok, err := r.Token()
	if err != nil {
		return fmt.Errorf("vertebra: send: %w", err)
	}
	start, ok := tok.(xml.StartElement)
	if !ok {
		return errors.New("vertebra: send: a stanza must start with an element")
	}
	w := s.TokenWriter()
	err = w.EncodeToken(start)
	if err == nil {
		_, err = xmlstream.Copy(w, xmlstream.Inner(r))
	}
	if err == nil {
		err = w.EncodeToken(start.End())
	}
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	return err
}

// opHoldBusy is how many ops must be under way to a peer before a new one
// waits up to Config.OpHold for others to go with: below it, batching
// would cost latency that nothing pays back (fewer requests than that at
// once are bound by latency, not by CPU). Results wait whenever another is
// under way: they only go through the queue when the caller batches its ops
// (then each unbatched result would cost an IQ-set and its confirmation).
const opHoldBusy = 8

// opQueue holds the first sends of ops to one peer (from, to) while
// another goroutine writes: it then sends them together, as one <batch>
// of ops (sendOps). Nothing waits to be batched: an op is sent at once
// when no write to that peer is under way.
type opQueue struct {
	results  bool   // a responder's stanzas of several ops, not ops
	key      string // in Endpoint.queues
	mu       sync.Mutex
	writing  bool
	held     bool // a timer will send what is queued
	q        []*pending
	inflight atomic.Int64 // ops sent, echo not yet received
}

// queueDone says that one of q's ops (or results) is no longer under way;
// the last one takes an idle queue out of Endpoint.queues, so that peers
// called once do not stay there. (An op that took q just before is still
// sent by it; the next ones make a new queue.)
func (e *Endpoint) queueDone(q *opQueue) {
	if q.inflight.Add(-1) != 0 {
		return
	}
	q.mu.Lock()
	if !q.writing && !q.held && len(q.q) == 0 {
		e.queues.CompareAndDelete(q.key, q)
	}
	q.mu.Unlock()
}

// startOp is start for an op whose element elem can go in a <batch> of
// ops to from→to (a peer known to read them, see AppendOps).
func (e *Endpoint) startOp(from, to jid.JID, id string, build, elem func() []xml.Token) *pending {
	return e.startQueued(false, from, to, id, build, elem)
}

// startQueued is start through the queue of from→to for ops or, with
// results, for a responder's stanzas (see opQueue).
func (e *Endpoint) startQueued(results bool, from, to jid.JID, id string, build, elem func() []xml.Token) *pending {
	p := &pending{id: id, to: to, build: build, elem: elem, ch: make(chan response, 1), sent: time.Now()}
	e.mu.Lock()
	e.pending[id] = p
	e.mu.Unlock()
	key := from.String() + " " + to.String()
	if results {
		key += " results"
	}
	qv, ok := e.queues.Load(key)
	if !ok {
		qv, _ = e.queues.LoadOrStore(key, &opQueue{results: results, key: key})
	}
	q := qv.(*opQueue)
	p.queue = q
	busy := q.inflight.Add(1) > opHoldBusy || results && q.inflight.Load() > 1
	q.mu.Lock()
	q.q = append(q.q, p)
	if q.writing || q.held && len(q.q) < MaxBatch {
		q.mu.Unlock()
		return p
	}
	if busy && e.cfg.OpHold > 0 && len(q.q) < MaxBatch {
		// Ops to this peer are under way: wait a little for more to send
		// with this one (as Nagle's algorithm does for TCP).
		q.held = true
		q.mu.Unlock()
		time.AfterFunc(e.cfg.OpHold, func() {
			q.mu.Lock()
			q.held = false
			if q.writing {
				q.mu.Unlock()
				return
			}
			q.writing = true
			q.mu.Unlock()
			e.drain(q, from, to)
		})
		return p
	}
	q.held = false
	q.writing = true
	q.mu.Unlock()
	e.drain(q, from, to)
	return p
}

// drain sends what q holds, as long as it holds any.
func (e *Endpoint) drain(q *opQueue, from, to jid.JID) {
	for {
		q.mu.Lock()
		batch := q.q
		if len(batch) > MaxBatch {
			batch, q.q = batch[:MaxBatch:MaxBatch], batch[MaxBatch:]
		} else {
			q.q = nil
		}
		if len(batch) == 0 {
			q.writing = false
			q.mu.Unlock()
			return
		}
		q.mu.Unlock()
		if len(batch) == 1 {
			// Not batch[0].werr: its own goroutine may be resending it.
			e.stats.sent.Add(1)
			if err := e.write(e.ctx, batch[0].build()); err != nil {
				e.log.Debug("vertebra: send", "id", batch[0].id, "to", to, "err", err)
			}
			continue
		}
		e.sendOps(from, to, batch, q.results)
	}
}

// sendOps sends ops as one <batch> of ops, whose IQ-result holds their
// echoes. Each op still waits for its own echo and, without one, sends
// itself again alone.
func (e *Endpoint) sendOps(from, to jid.JID, ops []*pending, results bool) {
	name := xml.Name{Space: NSMeta, Local: "batch"}
	toks := []xml.Token{xml.StartElement{Name: name}}
	for _, op := range ops {
		toks = append(toks, op.elem()...)
	}
	toks = append(toks, xml.EndElement{Name: name})
	id := newID()
	bp := &pending{id: id, to: to, ops: ops, results: results, ch: make(chan response, 1), sent: time.Now()}
	e.mu.Lock()
	e.pending[id] = bp
	e.mu.Unlock()
	e.stats.sent.Add(1) // one IQ-set for them all
	if results {
		e.stats.resultBatches.Add(1)
	} else {
		e.stats.opBatches.Add(1)
	}
	if err := e.write(e.ctx, iqTokens(id, from, to, toks)); err != nil {
		// Each op sends itself again when its wait is up.
		e.log.Debug("vertebra: send a batch", "id", id, "to", to, "ops", len(ops), "err", err)
	}
	// Unanswered, it is forgotten once the ops have long been sent again.
	time.AfterFunc(4*e.cfg.RetryMax, func() {
		e.mu.Lock()
		delete(e.pending, id)
		e.mu.Unlock()
	})
}

// opsAnswered takes the answer to a <batch> of ops: each echo to its op;
// a refusal sends each op again, alone, at once, and no more batches or
// <call>s to that peer.
func (e *Endpoint) opsAnswered(iq stanza.IQ, bp *pending, t xmlstream.TokenReadEncoder, start *xml.StartElement) {
	resendAll := func() {
		for _, op := range bp.ops {
			op.deliver(response{err: errResendNow})
		}
	}
	if bp.results {
		if iq.Type == stanza.ErrorIQ {
			resendAll()
			return
		}
		for _, op := range bp.ops {
			op.deliver(response{})
		}
		return
	}
	if iq.Type == stanza.ErrorIQ || start == nil || start.Name.Space != NSMeta || start.Name.Local != "batch" {
		var cond stanza.Condition
		if iq.Type == stanza.ErrorIQ {
			var rd xml.TokenReader = t
			if start != nil && start.Name.Local != "" {
				rd = xmlstream.MultiReader(xmlstream.Token(*start), t)
			}
			if se, err := stanza.UnmarshalError(rd); err == nil {
				cond = se.Condition
			}
		}
		if cond != stanza.ResourceConstraint {
			e.forgetCompact(bp.to)
		}
		e.log.Debug("vertebra: batch of ops refused; sending each alone", "to", bp.to, "condition", cond)
		resendAll()
		return
	}
	for {
		tok, err := t.Token()
		if err != nil {
			break
		}
		st, ok := tok.(xml.StartElement)
		if !ok {
			continue
		}
		if st.Name == gotName {
			text, err := readText(t, st, MaxBatch*(maxTokenLen+1))
			if err != nil {
				e.log.Debug("vertebra: bad <got> in a batch's result", "from", iq.From, "err", err)
				break
			}
			for _, tok := range strings.Fields(text) {
				e.echoed(response{token: tok})
			}
			continue
		}
		r := e.readEcho(iq.From, bp.to, &st, t)
		if r.err != nil || r.token == "" {
			break // the ops not answered send themselves again
		}
		e.echoed(r)
	}
}

// echoed delivers the echo of an op of a batch to its op.
func (e *Endpoint) echoed(r response) {
	T, _ := splitToken(r.token)
	e.mu.Lock()
	var op *pending
	if c := e.calls[T]; c != nil {
		op = e.pending[c.opID]
	}
	e.mu.Unlock()
	if op != nil {
		op.deliver(r)
	}
}

// start registers an IQ-set and sends it once; wait then waits for the
// answer, sending again as needed. Stanzas started one after the other
// leave in that order.
func (e *Endpoint) start(ctx context.Context, to jid.JID, id string, build func() []xml.Token) *pending {
	p := &pending{id: id, to: to, build: build, ch: make(chan response, 1), sent: time.Now()}
	e.mu.Lock()
	e.pending[id] = p
	e.mu.Unlock()
	e.stats.sent.Add(1)
	p.werr = e.write(ctx, build())
	return p
}

// wait waits for p's answer until ctx ends, resending with backoff. A
// stanza error that may pass (type wait, resource-constraint) is retried;
// with retryUnavailable, so are recipient-unavailable and
// service-unavailable (a client that may come back). Other stanza errors
// are returned as *StanzaError.
func (e *Endpoint) wait(ctx context.Context, p *pending, retryUnavailable bool) (response, error) {
	defer func() {
		e.mu.Lock()
		delete(e.pending, p.id)
		e.mu.Unlock()
	}()
	rto := e.rtt.rto(e.cfg.RetryInitial, e.cfg.RetryMax)
	resent := false
	for {
		changed := e.sessionChanged()
		t := time.NewTimer(rto)
		select {
		case r := <-p.ch:
			t.Stop()
			if r.err == nil {
				if !resent {
					e.rtt.sample(time.Since(p.sent))
				}
				return r, nil
			}
			if r.err == errResendNow {
				e.stats.sent.Add(1)
				p.werr = e.write(ctx, p.build())
				continue
			}
			var se *StanzaError
			if !errors.As(r.err, &se) || !(se.retryable() || retryUnavailable && errors.Is(se, ErrUnavailable) &&
				se.Err.Condition != stanza.ItemNotFound) {
				return r, r.err
			}
			e.log.Debug("vertebra: stanza error, will resend", "id", p.id, "to", p.to, "err", r.err)
			// Back off before resending.
			t = time.NewTimer(rto)
			select {
			case <-t.C:
			case <-changed:
				t.Stop()
			case <-ctx.Done():
				t.Stop()
				return response{}, ctx.Err()
			case <-e.ctx.Done():
				t.Stop()
				return response{}, ErrClosed
			}
		case <-t.C:
		case <-changed:
			t.Stop()
		case <-ctx.Done():
			t.Stop()
			return response{}, ctx.Err()
		case <-e.ctx.Done():
			t.Stop()
			return response{}, ErrClosed
		}
		rto = min(2*rto, e.cfg.RetryMax)
		resent = true
		e.stats.sent.Add(1)
		e.stats.resent.Add(1)
		p.werr = e.write(ctx, p.build())
		if p.werr != nil {
			e.log.Debug("vertebra: resend failed", "id", p.id, "to", p.to, "err", p.werr)
		}
	}
}

// fromMatches reports whether an answer from from may come from to: the
// same JID, another resource of it, or its server.
func fromMatches(from, to jid.JID) bool {
	if from.String() == "" || to.String() == "" {
		return true
	}
	return from.Equal(to) || from.Bare().Equal(to.Bare()) || from.Equal(to.Domain())
}

// respHandler receives IQ-results and IQ-errors.
type respHandler struct{ e *Endpoint }

func (h respHandler) HandleIQ(iq stanza.IQ, t xmlstream.TokenReadEncoder, start *xml.StartElement) error {
	e := h.e
	e.mu.Lock()
	p := e.pending[iq.ID]
	e.mu.Unlock()
	if p == nil || !fromMatches(iq.From, p.to) {
		return nil // not ours, or late
	}
	if p.ops != nil {
		e.mu.Lock()
		delete(e.pending, p.id)
		e.mu.Unlock()
		e.opsAnswered(iq, p, t, start)
		return nil
	}
	var r response
	if iq.Type == stanza.ErrorIQ {
		var rd xml.TokenReader = t
		if start != nil && start.Name.Local != "" {
			rd = xmlstream.MultiReader(xmlstream.Token(*start), t)
		}
		se, err := stanza.UnmarshalError(rd)
		if err != nil {
			se = stanza.Error{Type: stanza.Cancel, Condition: stanza.UndefinedCondition}
		}
		from := iq.From
		if from.String() == "" {
			from = p.to
		}
		r.err = &StanzaError{From: from, Err: se}
	} else {
		r = e.readEcho(iq.From, p.to, start, t)
	}
	p.deliver(r)
	return nil
}

// readEcho reads the echo of an op sent to to that start opens (<op>, a
// <batch> starting with it, or <done>), delivers the op's elements it
// carries, and returns the echo's token (or a bad-request error).
func (e *Endpoint) readEcho(from, to jid.JID, start *xml.StartElement, t xml.TokenReader) response {
	var r response
	bad := func(what string, err error) response {
		e.log.Debug("vertebra: bad "+what+" in an op's result", "from", from, "err", err)
		return response{err: &StanzaError{From: from, Err: stanza.Error{Type: stanza.Cancel, Condition: stanza.BadRequest}}}
	}
	switch {
	case start == nil:
	case start.Name.Space == NS && start.Name.Local == string(KindOp):
		r.token = attrValue(start.Attr, "token")
		if err := xmlstream.Skip(t); err != nil {
			return bad("echo", err)
		}
	case start.Name.Space == NSMeta && start.Name.Local == "batch":
		// The echo of an op holding the op's stanzas (a component
		// responder that held its echo).
		els, err := DecodeBatch(t, *start, e.cfg.Limits)
		if err != nil || els[0].Kind != KindOp {
			return bad("batch", err)
		}
		r.token = els[0].Token
		if len(els) > 1 {
			e.deliverEvents(from, "", els[1:])
		}
	case start.Name == doneName:
		// The compact echo of a quick op (AppendDone).
		els, err := DecodeDone(t, *start, e.cfg.Limits)
		if err != nil {
			return bad("done", err)
		}
		r.token = els[0].Token
		if !e.cfg.NoCompact {
			e.learnCompact(to) // before the call can end and another begin
		}
		e.deliverEvents(from, "", els[1:])
	}
	return r
}

func attrValue(attrs []xml.Attr, local string) string {
	for _, a := range attrs {
		if a.Name.Local == local && a.Name.Space == "" {
			return a.Value
		}
	}
	return ""
}

// --- receiving IQ-sets -----------------------------------------------------

type setHandler struct{ e *Endpoint }

// ForFeatures lists the endpoint's disco#info features.
func (h setHandler) ForFeatures(node string, f func(info.Feature) error) error {
	if node != "" {
		return nil
	}
	feats := []string{NS, NSMeta}
	if h.e.cfg.Features != nil {
		feats = append(feats, h.e.cfg.Features()...)
	}
	for _, v := range feats {
		if err := f(info.Feature{Var: v}); err != nil {
			return err
		}
	}
	return nil
}

func (h setHandler) HandleIQ(iq stanza.IQ, t xmlstream.TokenReadEncoder, start *xml.StartElement) error {
	e := h.e
	e.stats.received.Add(1)
	if iq.From.String() == "" {
		// The session removes a from equal to our own bare JID.
		iq.From = e.LocalAddr().Bare()
	}
	var els []*Element
	var err error
	if start.Name == callName {
		var el *Element
		el, err = DecodeCall(t, *start, e.cfg.Limits)
		els = []*Element{el}
	} else if start.Name == doneName {
		// A whole quick op's stanzas after its bare echo (AppendDone).
		if els, err = DecodeDone(t, *start, e.cfg.Limits); err == nil {
			els = els[1:]
			if !e.cfg.NoCompact {
				e.learnCompact(iq.From) // before the call can end and another begin
			}
		}
	} else if start.Name.Space == NSMeta {
		var ops bool
		els, ops, err = decodeAnyBatch(t, *start, e.cfg.Limits)
		if err == nil && ops {
			return e.handleOps(iq, els, t)
		}
	} else {
		var el *Element
		el, err = DecodeElement(t, *start, e.cfg.Limits)
		els = []*Element{el}
	}
	if err != nil {
		e.log.Debug("vertebra: bad request", "from", iq.From, "id", iq.ID, "err", err)
		return writeIQError(t, iq, stanza.Modify, stanza.BadRequest, err.Error())
	}
	if els[0].Kind == KindOp {
		return e.handleOp(iq, els[0], t, nil, 0)
	}
	for _, el := range els[1:] {
		if el.Token != els[0].Token {
			return e.handleReplies(iq, els, t)
		}
	}
	return e.handleReply(iq, els, t)
}

// handleReplies receives a responder's stanzas of several of our calls in
// one <batch>: each call gets its own, in order; one confirmation for all.
// When a call cannot take more now, the whole batch is refused (wait): the
// responder sends each op's stanzas again alone, and those delivered
// already are recognised by their sequence numbers.
func (e *Endpoint) handleReplies(iq stanza.IQ, els []*Element, t xmlstream.TokenReadEncoder) error {
	var order []string
	byToken := map[string][]*Element{}
	for _, el := range els {
		if _, ok := byToken[el.Token]; !ok {
			order = append(order, el.Token)
		}
		byToken[el.Token] = append(byToken[el.Token], el)
	}
	busy := false
	for _, tok := range order {
		if e.deliverEvents(iq.From, iq.ID, byToken[tok]) == deliverBusy {
			busy = true
		}
	}
	if busy {
		return writeIQError(t, iq, stanza.Wait, stanza.ResourceConstraint, "caller busy")
	}
	return writeIQResult(t, iq, nil)
}

// handleOps serves a <batch> of ops (AppendOps): their echoes go in one
// IQ-result (opGroup).
func (e *Endpoint) handleOps(iq stanza.IQ, ops []*Element, t xmlstream.TokenReadEncoder) error {
	if e.ctx.Err() != nil {
		return writeIQError(t, iq, stanza.Cancel, stanza.ServiceUnavailable, "shutting down")
	}
	if e.running.Load()+int64(len(ops)) > int64(e.cfg.MaxOps) {
		return writeIQError(t, iq, stanza.Wait, stanza.ResourceConstraint, "too many ops in progress")
	}
	e.stats.opBatchesReceived.Add(1)
	g := newOpGroup(len(ops))
	for i, el := range ops {
		if err := e.handleOp(iq, el, t, g, i); err != nil {
			return err
		}
	}
	// The bare echoes (most of them) go as one <got> list of tokens; the
	// others (a duplicate's held stanzas) as they are.
	var got []byte
	var others []xml.Token
	for i, p := range g.parts {
		tok, ok := g.tokens[i], g.tokens[i] != ""
		if !ok {
			tok, ok = bareEcho(p) // a duplicate of a finished op
		}
		if ok {
			if len(got) > 0 {
				got = append(got, ' ')
			}
			got = append(got, tok...)
			continue
		}
		others = append(others, p...) // an op refused (shutting down, too many): none; it is sent again alone
	}
	name := xml.Name{Space: NSMeta, Local: "batch"}
	toks := make([]xml.Token, 0, len(others)+5)
	toks = append(toks, xml.StartElement{Name: name})
	if len(got) > 0 {
		toks = append(toks, xml.StartElement{Name: gotName}, xml.CharData(got), xml.EndElement{Name: gotName})
	}
	toks = append(toks, others...)
	if len(toks) == 1 {
		return writeIQError(t, iq, stanza.Wait, stanza.ResourceConstraint, "no op accepted")
	}
	return writeIQResult(t, iq, append(toks, xml.EndElement{Name: name}))
}

// gotName is the list of the bare echoes of a <batch> of ops, in its
// IQ-result: their tokens (T:S), separated by spaces.
var gotName = xml.Name{Space: NSMeta, Local: "got"}

// bareEcho returns the token of toks when they are an op's bare echo.
func bareEcho(toks []xml.Token) (string, bool) {
	if len(toks) != 2 {
		return "", false
	}
	st, ok := toks[0].(xml.StartElement)
	if !ok || st.Name.Space != NS || st.Name.Local != string(KindOp) {
		return "", false
	}
	tok := attrValue(st.Attr, "token")
	return tok, tok != "" && !strings.ContainsAny(tok, " \t\r\n")
}

func writeIQError(w xmlstream.TokenWriter, iq stanza.IQ, typ stanza.ErrorType, cond stanza.Condition, text string) error {
	se := stanza.Error{Type: typ, Condition: cond}
	if text != "" {
		se.Text = map[string]string{"": text}
	}
	_, err := xmlstream.Copy(w, iq.Error(se))
	return err
}

func writeIQResult(w xmlstream.TokenWriter, iq stanza.IQ, payload []xml.Token) error {
	var r xml.TokenReader
	if payload != nil {
		r = &tokenSlice{toks: payload}
	}
	_, err := xmlstream.Copy(w, iq.Result(r))
	return err
}

// sweepLocked forgets finished ops and calls whose time is up (at most once
// a second), and the oldest finished ops past MaxRemembered.
func (e *Endpoint) sweepLocked(now time.Time) {
	for len(e.finished) > e.cfg.MaxRemembered {
		delete(e.doneOps, e.finished[0])
		e.finished = e.finished[1:]
	}
	if now.Sub(e.lastSweep) < time.Second {
		return
	}
	e.lastSweep = now
	ns := now.UnixNano()
	for k, d := range e.doneOps {
		if ns > d.expires {
			delete(e.doneOps, k)
		}
	}
	// Keep the list in step with the map (and its backing array small).
	kept := e.finished[:0]
	for _, k := range e.finished {
		if e.doneOps[k] != nil {
			kept = append(kept, k)
		}
	}
	e.finished = append(make([]opKey, 0, len(kept)), kept...)
	for k, c := range e.calls {
		if c.done && now.After(c.expires) {
			delete(e.calls, k)
		}
	}
}

// splitToken returns T of a token T:S.
func splitToken(tok string) (string, bool) {
	i := strings.LastIndexByte(tok, ':')
	if i <= 0 {
		return "", false
	}
	return tok[:i], true
}
