package vertebra

import (
	"context"
	"crypto/rand"
	"encoding/xml"
	"errors"
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
	compactN     atomic.Int64

	rtt     rttEstimator
	running atomic.Int64 // incoming ops running
	// finished lists finished ops oldest first, for MaxRemembered.
	finished []opKey // guarded by mu

	stats struct {
		sent, received, resent, dupOps, dupStanzas, served, called atomic.Int64
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
}

// Stats returns the endpoint's counters.
func (e *Endpoint) Stats() Stats {
	s := &e.stats
	return Stats{Sent: s.sent.Load(), Received: s.received.Load(), Resent: s.resent.Load(),
		DuplicateOps: s.dupOps.Load(), DuplicateStanzas: s.dupStanzas.Load(),
		OpsServed: s.served.Load(), OpsCalled: s.called.Load()}
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
}

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
	return s.Send(context.Background(), &tokenSlice{toks: toks})
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
	var r response
	switch {
	case iq.Type == stanza.ErrorIQ:
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
	case start != nil && start.Name.Space == NS && start.Name.Local == string(KindOp):
		r.token = attrValue(start.Attr, "token")
	case start != nil && start.Name.Space == NSMeta && start.Name.Local == "batch":
		// The echo of an op holding the op's stanzas (a component
		// responder that held its echo).
		els, err := DecodeBatch(t, *start, e.cfg.Limits)
		if err != nil || els[0].Kind != KindOp {
			e.log.Debug("vertebra: bad batch in an op's result", "from", iq.From, "err", err)
			r.err = &StanzaError{From: iq.From, Err: stanza.Error{Type: stanza.Cancel, Condition: stanza.BadRequest}}
			break
		}
		r.token = els[0].Token
		if len(els) > 1 {
			e.deliverEvents(iq.From, "", els[1:])
		}
	case start != nil && start.Name == doneName:
		// The compact echo of a quick op (AppendDone).
		els, err := DecodeDone(t, *start, e.cfg.Limits)
		if err != nil {
			e.log.Debug("vertebra: bad done in an op's result", "from", iq.From, "err", err)
			r.err = &StanzaError{From: iq.From, Err: stanza.Error{Type: stanza.Cancel, Condition: stanza.BadRequest}}
			break
		}
		r.token = els[0].Token
		if !e.cfg.NoCompact {
			e.learnCompact(p.to) // before the call can end and another begin
		}
		e.deliverEvents(iq.From, "", els[1:])
	}
	p.deliver(r)
	return nil
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
	} else if start.Name.Space == NSMeta {
		els, err = DecodeBatch(t, *start, e.cfg.Limits)
		if err == nil && els[0].Kind == KindOp {
			err = badRequest("an op in a <batch>")
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
		return e.handleOp(iq, els[0], t)
	}
	return e.handleReply(iq, els, t)
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
