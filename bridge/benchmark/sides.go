package benchmark

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync/atomic"
	"time"

	"mellium.im/xmlstream"
	"mellium.im/xmpp"
	"mellium.im/xmpp/jid"
	"mellium.im/xmpp/mux"
	"mellium.im/xmpp/stanza"

	"github.com/nanite-go/nanite/bridge"
	"github.com/nanite-go/nanite/nanite"
	nb "github.com/nanite-go/nanite/nanite/benchmark"
	"github.com/nanite-go/nanite/vertebra"
)

// setupTimeout bounds each wait of the set-up (a session, a bridge, an agent
// seen by a mapper).
const setupTimeout = 30 * time.Second

// sites holds what the sides run on, set up on demand and closed in the
// reverse order.
type sites struct {
	cfg     *Config
	closers []func() error

	// The raw components, shared by xmpp, op and raw-chain.
	rawA, rawB *vertebra.Endpoint
	rawASess   *xmpp.Session
	rawBSess   atomic.Pointer[xmpp.Session]
	// The raw AMQP echo at B that the raw chain's relay at B calls.
	chainB atomic.Pointer[nb.RawEcho]
	// The echo agent at B, shared by nanite-b and cross.
	echoB bool
	// The echo agents, for their counters.
	agents map[string]*nanite.Agent
	// The bridges, for their counters.
	bridgeA, bridgeB *bridge.Bridge
}

// start runs run in a goroutine until close. The context it returns ends
// when run returns (its cause says why), to wait on while setting up.
func (s *sites) start(ctx context.Context, what string, run func(context.Context) error) context.Context {
	rctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	wctx, wcancel := context.WithCancelCause(ctx)
	done := make(chan error, 1)
	go func() {
		err := run(rctx)
		if err != nil {
			wcancel(fmt.Errorf("%s: %w", what, err))
		} else {
			wcancel(fmt.Errorf("%s stopped", what))
		}
		done <- err
	}()
	s.closers = append(s.closers, func() error {
		cancel()
		if err := <-done; err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		return nil
	})
	return wctx
}

// wait runs ready with a timeout under ctx (a context of start), and says
// why it failed.
func wait(ctx context.Context, what string, ready func(context.Context) error) error {
	wctx, cancel := context.WithTimeout(ctx, setupTimeout)
	defer cancel()
	if err := ready(wctx); err != nil {
		if c := context.Cause(ctx); c != nil {
			return c
		}
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}

func (s *sites) close() error {
	var errs []error
	for i := len(s.closers) - 1; i >= 0; i-- {
		errs = append(errs, s.closers[i]())
	}
	s.closers = nil
	return errors.Join(errs...)
}

// side sets up the named side.
func (s *sites) side(ctx context.Context, name string) (side nb.Side, err error) {
	switch name {
	case SideAMQPA, SideAMQPB:
		url := s.cfg.URLA
		if name == SideAMQPB {
			url = s.cfg.URLB
		}
		e, err := nb.NewRawEcho(ctx, name, url, nanite.DefaultPrefetch)
		if err != nil {
			return nil, err
		}
		s.closers = append(s.closers, e.Close)
		return e, nil
	case SideXMPP, SideOp:
		if err := s.components(ctx); err != nil {
			return nil, err
		}
		d := s.cfg.Domains
		if name == SideXMPP {
			return &xmppSide{ctx: context.WithoutCancel(ctx), s: s.rawASess, from: jid.MustParse(d.RawA),
				to: jid.MustParse("echo@" + d.RawB)}, nil
		}
		return &opSide{ep: s.rawA, from: jid.MustParse("bench@" + d.RawA), to: jid.MustParse("echo@" + d.RawB)}, nil
	case SideNaniteA:
		if _, err := s.echoAgent(ctx, s.cfg.URLA, LocalEchoService, "bench-echo-a"); err != nil {
			return nil, err
		}
		m, err := s.mapper(ctx, s.cfg.URLA, LocalEchoService)
		if err != nil {
			return nil, err
		}
		return &naniteSide{name: name, m: m, service: LocalEchoService}, nil
	case SideNaniteB:
		if err := s.echoAgentB(ctx); err != nil {
			return nil, err
		}
		m, err := s.mapper(ctx, s.cfg.URLB, EchoService)
		if err != nil {
			return nil, err
		}
		return &naniteSide{name: name, m: m, service: EchoService}, nil
	case SideRawChain:
		return s.rawChain(ctx)
	case SideCross:
		return s.cross(ctx)
	}
	return nil, fmt.Errorf("unknown side %q", name)
}

// components connects the two raw components: raw-B answers echo IQs and
// serves an echo op handler, raw-A calls.
func (s *sites) components(ctx context.Context) error {
	if s.rawA != nil {
		return nil
	}
	d := s.cfg.Domains
	dial := func(domain string, ep *vertebra.Endpoint, opts ...mux.Option) (*xmpp.Session, error) {
		dctx, cancel := context.WithTimeout(ctx, setupTimeout)
		defer cancel()
		sess, err := vertebra.Dial(dctx, vertebra.DialConfig{JID: jid.MustParse(domain), Secret: s.cfg.Secret, Addr: s.cfg.XMPPAddr})
		if err != nil {
			return nil, err
		}
		stop := vertebra.ServeSession(sess, ep, opts...)
		s.closers = append(s.closers, func() error { stop(); return ep.Close() })
		return sess, nil
	}
	echoOp := vertebra.OpHandlerFunc(func(ctx context.Context, req *vertebra.Request, w *vertebra.Reply) error {
		return w.Data(ctx, req.Payload)
	})
	rawB := vertebra.NewEndpoint(vertebra.Config{Handler: echoOp, Logger: s.cfg.Logger})
	sessB, err := dial(d.RawB, rawB, mux.IQ(stanza.SetIQ, echoName, echoIQ{}), mux.IQ(stanza.SetIQ, relayName, relayIQ{s}))
	if err != nil {
		return err
	}
	s.rawBSess.Store(sessB)
	rawA := vertebra.NewEndpoint(vertebra.Config{Logger: s.cfg.Logger})
	sess, err := dial(d.RawA, rawA)
	if err != nil {
		return err
	}
	s.rawA, s.rawB, s.rawASess = rawA, rawB, sess
	// One round trip of each kind proves the path.
	pctx, cancel := context.WithTimeout(ctx, setupTimeout)
	defer cancel()
	x := &xmppSide{ctx: pctx, s: sess, from: jid.MustParse(d.RawA), to: jid.MustParse("echo@" + d.RawB)}
	if err := x.Do(pctx, []byte(`"ping"`)); err != nil {
		return fmt.Errorf("raw XMPP echo does not answer: %w", err)
	}
	o := &opSide{ep: rawA, from: jid.MustParse("bench@" + d.RawA), to: jid.MustParse("echo@" + d.RawB)}
	if err := o.Do(pctx, []byte(`"ping"`)); err != nil {
		return fmt.Errorf("echo op does not answer: %w", err)
	}
	return nil
}

// echoAgent runs an agent at url serving service by echoing the payload.
func (s *sites) echoAgent(ctx context.Context, url, service, prefix string) (*nanite.Agent, error) {
	actor, method, _ := strings.Cut(strings.TrimPrefix(service, "/"), "/")
	a, err := nanite.NewAgent(nanite.AgentConfig{URL: url, Identity: nanite.NewIdentity(prefix), Logger: s.cfg.Logger})
	if err != nil {
		return nil, err
	}
	a.AddActor(nanite.NewActor(actor).Expose(method, func(_ context.Context, r *nanite.Request) (any, error) {
		return r.Payload, nil
	}))
	wctx := s.start(ctx, "echo agent "+a.Identity(), a.Run)
	if s.agents == nil {
		s.agents = map[string]*nanite.Agent{}
	}
	s.agents[prefix] = a
	return a, wait(wctx, "echo agent "+a.Identity(), a.Ready)
}

func (s *sites) echoAgentB(ctx context.Context) error {
	if s.echoB {
		return nil
	}
	if _, err := s.echoAgent(ctx, s.cfg.URLB, EchoService, "bench-echo-b"); err != nil {
		return err
	}
	s.echoB = true
	return nil
}

// mapper runs an embedded mapper (a requester) at url and waits until it
// sees an agent offering service.
func (s *sites) mapper(ctx context.Context, url, service string) (*nanite.Mapper, error) {
	m, err := nanite.NewMapper(nanite.MapperConfig{URL: url, Logger: s.cfg.Logger, Identity: nanite.NewIdentity("bench-requester"),
		RequestTimeout: nb.RequestTimeout})
	if err != nil {
		return nil, err
	}
	wctx := s.start(ctx, "mapper "+m.Identity(), m.Run)
	if err := wait(wctx, "mapper "+m.Identity(), m.Ready); err != nil {
		return nil, err
	}
	err = wait(wctx, "an agent offering "+service, func(ctx context.Context) error { return m.WaitForAgents(ctx, service, 1) })
	return m, err
}

// rawChain sets up the raw chain: a raw AMQP relay at A whose server sends
// each request as an IQ-set from raw A to raw B, whose relay makes a raw
// AMQP RPC at B with it; each answer goes back the same way.
func (s *sites) rawChain(ctx context.Context) (nb.Side, error) {
	if err := s.components(ctx); err != nil {
		return nil, err
	}
	echoB, err := nb.NewRawEcho(ctx, "raw-chain-b", s.cfg.URLB, nanite.DefaultPrefetch)
	if err != nil {
		return nil, err
	}
	s.closers = append(s.closers, echoB.Close)
	s.chainB.Store(echoB)
	d := s.cfg.Domains
	runCtx := context.WithoutCancel(ctx) // see xmppSide
	from, to := jid.MustParse(d.RawA), jid.MustParse("relay@"+d.RawB)
	relayA, err := nb.NewRawRelay(ctx, SideRawChain, s.cfg.URLA, nanite.DefaultPrefetch, func(_ context.Context, body []byte) ([]byte, error) {
		return rawIQ(runCtx, s.rawASess, from, to, relayName, body)
	})
	if err != nil {
		return nil, fmt.Errorf("the raw chain does not answer: %w", err)
	}
	s.closers = append(s.closers, relayA.Close)
	return relayA, nil
}

// cross sets up the two bridges (B exports /bench/* to A, A imports it),
// the echo agent at B and the requester at A.
func (s *sites) cross(ctx context.Context) (nb.Side, error) {
	if err := s.echoAgentB(ctx); err != nil {
		return nil, err
	}
	d := s.cfg.Domains
	q := func(v string) string { b, _ := json.Marshal(v); return string(b) }
	bB, err := s.bridge(ctx, "b", `xmpp: {server: `+q(s.cfg.XMPPAddr)+`, domain: `+q(d.BridgeB)+`, secret: `+q(s.cfg.Secret)+`}
clusters:
  - name: site-b
    url: `+q(s.cfg.URLB)+`
    exports:
      - services: ["/bench/*"]
        to: [`+q(d.BridgeA)+`]
`)
	if err != nil {
		return nil, err
	}
	jidB := bB.ClusterJIDs()["site-b"]
	bA, err := s.bridge(ctx, "a", `xmpp: {server: `+q(s.cfg.XMPPAddr)+`, domain: `+q(d.BridgeA)+`, secret: `+q(s.cfg.Secret)+`}
clusters:
  - name: site-a
    url: `+q(s.cfg.URLA)+`
    imports:
      - from: `+q(jidB.String())+`
        services: ["/bench/*"]
`)
	if err != nil {
		return nil, err
	}
	s.bridgeA, s.bridgeB = bA, bB
	m, err := s.mapper(ctx, s.cfg.URLA, EchoService)
	if err != nil {
		return nil, fmt.Errorf("%w (bridge A's proxy agent for %s)", err, jidB)
	}
	proxy := bridge.ProxyIdentity(jidB)
	for _, a := range m.Agents() {
		for _, svc := range a.Services {
			if svc.Name == EchoService && a.Identity != proxy {
				return nil, fmt.Errorf("agent %s at A offers %s: only bridge A's proxy %s may", a.Identity, EchoService, proxy)
			}
		}
	}
	c := &crossSide{m: m, proxy: proxy}
	pctx, cancel := context.WithTimeout(ctx, setupTimeout)
	defer cancel()
	if err := c.Do(pctx, []byte(`"ping"`)); err != nil {
		return nil, fmt.Errorf("the cross-site echo does not answer: %w", err)
	}
	return c, nil
}

func (s *sites) bridge(ctx context.Context, site, yml string) (*bridge.Bridge, error) {
	cfg, err := bridge.ParseConfig("bench-bridge-"+site+".yaml", []byte(yml))
	if err != nil {
		return nil, err
	}
	opts := bridge.Options{Logger: s.cfg.Logger.With("bridge", site)}
	if s.cfg.BridgeOptions != nil {
		s.cfg.BridgeOptions(site, &opts)
	}
	b, err := bridge.New(cfg, opts)
	if err != nil {
		return nil, err
	}
	what := "bridge " + strings.ToUpper(site)
	wctx := s.start(ctx, what, b.Run)
	return b, wait(wctx, what, b.Ready)
}

// counters returns the bridges' and the endpoints' counters (zeros
// omitted).
func (s *sites) counters() map[string]int64 {
	out := map[string]int64{}
	put := func(k string, v int64) {
		if v != 0 {
			out[k] = v
		}
	}
	for name, b := range map[string]*bridge.Bridge{"bridge-a": s.bridgeA, "bridge-b": s.bridgeB} {
		if b == nil {
			continue
		}
		st := b.Stats()
		put(name+".relayed", st.Relayed)
		put(name+".relayed_out", st.RelayedOut)
		put(name+".failed", st.Failed)
		for k, v := range st.Refused {
			put(name+".refused."+k, v)
		}
		for _, k := range []string{"bundles_sent", "bundled_results"} {
			put(name+".proxies."+k, st.Proxies[k])
		}
		es := b.Endpoint().Stats()
		put(name+".xmpp.iq_sets_sent", es.Sent)
		put(name+".xmpp.iq_sets_received", es.Received)
		put(name+".xmpp.resent", es.Resent)
		put(name+".xmpp.duplicate_ops", es.DuplicateOps)
		put(name+".xmpp.op_batches_sent", es.OpBatches)
		put(name+".xmpp.op_batches_received", es.OpBatchesReceived)
		put(name+".xmpp.result_batches_sent", es.ResultBatches)
		put(name+".xmpp.duplicate_stanzas", es.DuplicateStanzas)
	}
	for name, a := range s.agents {
		st := a.Stats()
		for _, k := range []string{"bundles_sent", "bundled_results"} {
			put(name+"."+k, st[k])
		}
	}
	for name, ep := range map[string]*vertebra.Endpoint{"raw-a": s.rawA, "raw-b": s.rawB} {
		if ep == nil {
			continue
		}
		es := ep.Stats()
		put(name+".xmpp.iq_sets_sent", es.Sent)
		put(name+".xmpp.iq_sets_received", es.Received)
		put(name+".xmpp.resent", es.Resent)
		put(name+".xmpp.duplicate_ops", es.DuplicateOps)
	}
	if len(out) == 0 {
		return nil
	}
	return out
}

// --- the sides ---------------------------------------------------------------

var echoName = xml.Name{Space: "urn:nanite:bench", Local: "echo"}

// echoIQ answers <echo xmlns="urn:nanite:bench"> IQ-sets with an IQ-result
// carrying the same element.
type echoIQ struct{}

func (echoIQ) HandleIQ(iq stanza.IQ, t xmlstream.TokenReadEncoder, start *xml.StartElement) error {
	inner, err := xmlstream.ReadAll(t)
	if err != nil {
		return err
	}
	toks := append([]xml.Token{start.Copy()}, inner...)
	if e, ok := toks[len(toks)-1].(xml.EndElement); len(toks) == 1 || !ok || e.Name != start.Name {
		toks = append(toks, start.End())
	}
	_, err = xmlstream.Copy(t, iq.Result(&tokens{toks: toks}))
	return err
}

type tokens struct {
	toks []xml.Token
	i    int
}

func (r *tokens) Token() (xml.Token, error) {
	if r.i >= len(r.toks) {
		return nil, io.EOF
	}
	r.i++
	return r.toks[r.i-1], nil
}

// xmppSide is the raw XMPP round trip. It gives SendIQ the run's context,
// not the request's: mellium (v0.22.0) turns a context's end into a write
// deadline in the past, set from a goroutine that may run during another
// goroutine's write, which kills the session (see vertebra's
// Endpoint.write).
type xmppSide struct {
	ctx      context.Context
	s        *xmpp.Session
	from, to jid.JID
}

func (x *xmppSide) Name() string { return SideXMPP }

func (x *xmppSide) Do(_ context.Context, payload []byte) error {
	text, err := rawIQ(x.ctx, x.s, x.from, x.to, echoName, payload)
	if err != nil {
		return fmt.Errorf("raw XMPP echo: %w", err)
	}
	if len(text) != len(payload) {
		return fmt.Errorf("raw XMPP echo: %d bytes came back for %d", len(text), len(payload))
	}
	return nil
}

// rawIQ sends an IQ-set from→to carrying payload as the text of an
// element name and returns the text of the IQ-result.
func rawIQ(ctx context.Context, s *xmpp.Session, from, to jid.JID, name xml.Name, payload []byte) ([]byte, error) {
	iq := stanza.IQ{Type: stanza.SetIQ, From: from, To: to}
	body := &tokens{toks: []xml.Token{xml.StartElement{Name: name}, xml.CharData(payload), xml.EndElement{Name: name}}}
	resp, err := s.SendIQ(ctx, iq.Wrap(body))
	if err != nil {
		return nil, err
	}
	defer resp.Close()
	tok, err := resp.Token()
	if err != nil {
		return nil, err
	}
	if st, ok := tok.(xml.StartElement); !ok || attr(st, "type") != string(stanza.ResultIQ) {
		return nil, fmt.Errorf("answered with %v", tok)
	}
	return readText(resp)
}

// readText returns the text r holds, up to its end.
func readText(r xml.TokenReader) ([]byte, error) {
	var text []byte
	for {
		tok, err := r.Token()
		if err == io.EOF {
			return text, nil
		}
		if err != nil {
			return nil, err
		}
		if cd, ok := tok.(xml.CharData); ok {
			text = append(text, cd...)
		}
	}
}

var relayName = xml.Name{Space: "urn:nanite:bench", Local: "relay"}

// relayIQ is the raw chain's relay at B: it answers a <relay> IQ-set with
// the answer of a raw AMQP RPC at B to the payload, from a goroutine (as a
// raw component must: the session reads nothing while a handler runs).
type relayIQ struct{ s *sites }

func (h relayIQ) HandleIQ(iq stanza.IQ, t xmlstream.TokenReadEncoder, start *xml.StartElement) error {
	payload, err := readText(t)
	if err != nil {
		return err
	}
	to, sess := h.s.chainB.Load(), h.s.rawBSess.Load()
	if to == nil || sess == nil {
		return nil // not set up: the caller times out
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), nb.RequestTimeout)
		defer cancel()
		var res xml.TokenReader
		body, err := to.Call(ctx, payload)
		if err != nil {
			res = iq.Error(stanza.Error{Type: stanza.Cancel, Condition: stanza.InternalServerError})
		} else {
			res = iq.Result(&tokens{toks: []xml.Token{xml.StartElement{Name: relayName}, xml.CharData(body), xml.EndElement{Name: relayName}}})
		}
		_ = sess.Send(context.Background(), res)
	}()
	return nil
}

func attr(st xml.StartElement, local string) string {
	for _, a := range st.Attr {
		if a.Name.Local == local && a.Name.Space == "" {
			return a.Value
		}
	}
	return ""
}

// opSide is a vertebra op to the echo handler.
type opSide struct {
	ep       *vertebra.Endpoint
	from, to jid.JID
}

func (o *opSide) Name() string { return SideOp }

func (o *opSide) Do(ctx context.Context, payload []byte) error {
	res, err := o.ep.Call(ctx, o.to, EchoService, payload, vertebra.WithFrom(o.from))
	if err != nil {
		return err
	}
	if !bytes.Equal(res.Value(), payload) {
		return fmt.Errorf("echo op: %.40q came back for %.40q", res.Value(), payload)
	}
	return nil
}

// naniteSide is an in-cluster nanite request.
type naniteSide struct {
	name, service string
	m             *nanite.Mapper
}

func (n *naniteSide) Name() string { return n.name }

func (n *naniteSide) Do(ctx context.Context, payload []byte) error {
	resp, err := n.m.Request(ctx, n.service, json.RawMessage(payload))
	if err != nil {
		return err
	}
	if len(resp.Results) != 1 || resp.Results[0].Err != nil || !bytes.Equal(resp.Results[0].Payload, payload) {
		return fmt.Errorf("nanite echo answered %+v", resp.Results)
	}
	return nil
}

// crossSide is the cross-site request.
type crossSide struct {
	m     *nanite.Mapper
	proxy string
}

func (c *crossSide) Name() string { return SideCross }

func (c *crossSide) Do(ctx context.Context, payload []byte) error {
	resp, err := c.m.Request(ctx, EchoService, json.RawMessage(payload))
	if err != nil {
		return err
	}
	if len(resp.Results) != 1 {
		return fmt.Errorf("cross-site echo: %d results", len(resp.Results))
	}
	r := resp.Results[0]
	switch {
	case r.Err != nil:
		return r.Err
	case r.Agent != c.proxy:
		return fmt.Errorf("cross-site echo: answered by %s, not by bridge A's proxy %s", r.Agent, c.proxy)
	case !bytes.Equal(r.Payload, payload):
		return fmt.Errorf("cross-site echo: %.40q came back for %.40q", r.Payload, payload)
	}
	return nil
}
