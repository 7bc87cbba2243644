package bridge

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"mellium.im/xmpp"
	"mellium.im/xmpp/disco"
	"mellium.im/xmpp/jid"
	"mellium.im/xmpp/stanza"

	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/security"
	"github.com/nanite-go/nanite/vertebra"
)

// Tags of the proxy agents (cluster → XMPP).
const (
	// TagProxy marks a proxy agent run by a bridge. An op arriving from
	// XMPP is never routed to the bridge's own proxies (that would relay
	// it out again), and proxies are never exported.
	TagProxy = "nanite:proxy"
	// TagRemotePrefix + the remote cluster's domain tags a proxy.
	TagRemotePrefix = "remote:"
)

// ProxyStatus is the load a proxy agent reports while the remote side has
// sent no presence (a peer that does not publish its agents' load). With
// presence, a proxy reports the lowest load among the remote agents it
// stands for.
const ProxyStatus = 100.0

// ProxyPrefetch is how many requests a proxy agent takes from its queue at
// once (nanite's default is 16, for agents that work on a CPU).
const ProxyPrefetch = 512

// DefaultDiscoveryInterval is how often a proxy asks the remote side for
// its services again while nothing else prompts it (remote presence
// changes prompt it at once).
const DefaultDiscoveryInterval = 30 * time.Second

// A proxy that found no matching remote service asks the remote side
// again after proxyDiscoveryMin, doubling up to proxyDiscoveryMax.
const (
	proxyDiscoveryMin = 250 * time.Millisecond
	proxyDiscoveryMax = 10 * time.Second
)

// proxy is the agent that stands, in a local cluster, for one imported
// remote cluster (or XMPP agent).
type proxy struct {
	b      *Bridge
	c      *cluster
	imp    Import
	remote jid.JID  // the imported JID: a bare cluster JID, or a full JID
	local  *cluster // the imported cluster when it is one of this bridge's (a local relay)
	id     string
	ident  *security.Identity // the proxy agent's certificate, in a secure cluster
	kick   chan struct{}

	mu       sync.Mutex
	present  map[string]float64 // remote resources seen available, with their load
	services []string           // what the running proxy agent offers
	agent    *nanite.Agent      // the running proxy agent, or nil
}

// ProxyIdentity is the identity of the proxy agent for the remote cluster
// JID remote: "xmpp." followed by the JID with every character a nanite
// identity cannot hold replaced by "_" (e.g. xmpp.app_nanite.site-b.test;
// an imported full JID keeps its resource: xmpp.bot_site-b.test_r1).
func ProxyIdentity(remote jid.JID) string {
	s := remote.String()
	var b strings.Builder
	b.WriteString("xmpp.")
	for _, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '.', r == '-', r == ':':
			b.WriteRune(r)
		default:
			b.WriteByte('_')
		}
	}
	id := b.String()
	if len(id) > 128 {
		id = id[:128]
	}
	return id
}

// isProxy reports whether a is a proxy agent run by this bridge.
func (c *cluster) isProxy(a nanite.AgentState) bool {
	return c.proxies[a.Identity] && slices.Contains(a.Tags, TagProxy)
}

func newProxy(b *Bridge, c *cluster, imp Import) (*proxy, error) {
	remote, err := jid.Parse(imp.From)
	if err != nil {
		return nil, err
	}
	px := &proxy{b: b, c: c, imp: imp, remote: remote, id: ProxyIdentity(remote),
		kick: make(chan struct{}, 1), present: map[string]float64{}}
	if c.cfg.Secure {
		if imp.Identity == nil || b.secv == nil {
			return nil, errors.New("a proxy agent in a secure cluster needs its identity and trust.ca_files")
		}
		if px.ident, err = security.LoadIdentity(b.cfg.Path(imp.Identity.CertFile), b.cfg.Path(imp.Identity.KeyFile)); err != nil {
			return nil, err
		}
		if px.ident.Name != px.id {
			return nil, fmt.Errorf("the certificate is for %q; the proxy agent's identity is %q", px.ident.Name, px.id)
		}
	}
	return px, nil
}

// wake makes the proxy look at the remote side again now.
func (p *proxy) wake() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// status is the proxy agent's load: the lowest load among the remote
// agents seen available, ProxyStatus without presence.
func (p *proxy) status() float64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	best, seen := ProxyStatus, false
	for _, l := range p.present {
		if !seen || l < best {
			best, seen = l, true
		}
	}
	return best
}

// presence records a remote resource's presence; it reports whether the
// set of available resources changed.
func (p *proxy) presence(resource string, available bool, load float64) bool {
	if r := p.remote.Resourcepart(); r != "" && r != resource {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	_, had := p.present[resource]
	if available {
		p.present[resource] = load
		return !had
	}
	delete(p.present, resource)
	return had
}

// forget drops what the proxy knew of the remote presence (the XMPP
// session ended).
func (p *proxy) forget() {
	p.mu.Lock()
	clear(p.present)
	p.mu.Unlock()
}

// Services returns what the proxy agent offers now.
func (p *proxy) offered() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.services
}

// run follows the remote side until ctx ends: it subscribes to its
// presence (from the local cluster JID, which the remote bridge exports
// to), asks disco#info for its services (the remote bridge lists what it
// exports to us, from agents present), and runs the proxy agent offering
// the services the import's globs cover. When the set changes (remote
// agents come and go: presence prompts a new discovery at once) the agent
// is restarted with the new set; when nothing matches or the XMPP session
// is down, no proxy agent runs, so local requests fail at once with
// no_agent (or wait in the failsafe queue when they asked for it).
func (p *proxy) run(ctx context.Context) error {
	if p.local != nil {
		return p.runLocal(ctx)
	}
	iv := p.b.opts.DiscoveryInterval
	if iv <= 0 {
		iv = DefaultDiscoveryInterval
	}
	var (
		agentStop func()
		agentErr  chan error
		lastSess  *xmpp.Session
		wait      = proxyDiscoveryMin
	)
	stopAgent := func() {
		if agentStop != nil {
			agentStop()
			agentStop, agentErr = nil, nil
		}
	}
	defer stopAgent()
	for {
		select {
		case <-p.b.ready:
		case <-ctx.Done():
			return nil
		}
		if svcs, keep := p.discover(ctx, &lastSess); !keep {
			if err := p.offer(svcs, &agentStop, &agentErr); err != nil {
				return err
			}
		}
		next := iv
		if len(p.offered()) == 0 {
			next, wait = wait, min(2*wait, proxyDiscoveryMax)
		} else {
			wait = proxyDiscoveryMin
		}
		t := time.NewTimer(next)
		select {
		case <-t.C:
		case <-p.kick:
			wait = proxyDiscoveryMin
		case err := <-agentErr:
			t.Stop()
			agentStop, agentErr = nil, nil
			return err
		case <-ctx.Done():
			t.Stop()
			return nil
		}
		t.Stop()
	}
}

// discover subscribes to the remote presence (again on each new session)
// and asks the remote side for its services. keep is set when the answer
// says nothing (a timeout): the proxy keeps what it offers.
func (p *proxy) discover(ctx context.Context, lastSess **xmpp.Session) (svcs []string, keep bool) {
	s := p.b.session()
	if s == nil {
		return nil, false
	}
	p.mu.Lock()
	noPresence := len(p.present) == 0
	p.mu.Unlock()
	if s != *lastSess || noPresence {
		*lastSess = s
		// Subscribe, then probe: a peer that already had us as subscriber
		// sends everything again. Again whenever we know of no remote
		// agent: the peer bridge may have restarted and forgotten us.
		to := p.remote.Bare()
		_ = sendPresence(s, stanza.Presence{From: p.c.jid, To: to, Type: stanza.SubscribePresence}, "")
		_ = sendPresence(s, stanza.Presence{From: p.c.jid, To: to, Type: stanza.ProbePresence}, "")
	}
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	info, err := disco.GetInfoIQ(dctx, "", stanza.IQ{To: p.remote, From: p.c.jid}, s)
	cancel()
	if err != nil {
		if ctx.Err() != nil {
			return nil, true
		}
		var se stanza.Error
		if errors.As(err, &se) {
			// The remote side answered: it has nothing for us (gone,
			// unknown, not exported).
			p.b.log.Debug("proxy discovery", "remote", p.remote, "error", err)
			return nil, false
		}
		p.b.log.Debug("proxy discovery: no answer", "remote", p.remote, "error", err)
		return nil, true
	}
	svcs = p.match(info)
	p.b.log.Debug("proxy discovery", "remote", p.remote, "services", svcs)
	return svcs, false
}

// startAgent runs the proxy agent offering svcs.
func (p *proxy) startAgent(svcs []string) (stop func(), errc chan error, err error) {
	tags := append([]string{TagProxy, TagRemotePrefix + p.remote.Domainpart(), nanite.GatewayTag(p.remote.String())}, p.imp.AsTags...)
	// A proxy waits on the XMPP leg, not on a CPU: it takes many requests
	// at once (a WAN round trip would otherwise cap an import at
	// prefetch / RTT requests a second).
	cfg := nanite.AgentConfig{URL: p.c.url, TLS: p.c.tls, Identity: p.id, Tags: tags,
		Status: p.status, Prefetch: ProxyPrefetch, Logger: p.b.log.With("proxy", p.id)}
	if p.ident != nil {
		cfg.Secure = &nanite.Secure{Identity: p.ident, Verifier: p.b.secv}
	}
	if p.b.opts.Agent != nil {
		p.b.opts.Agent(p.c.cfg.Name, &cfg)
	}
	a, err := nanite.NewAgent(cfg)
	if err != nil {
		return nil, nil, err
	}
	a.SetActors(p.actors(svcs)...)
	p.b.log.Info("proxy agent", "cluster", p.c.cfg.Name, "remote", p.remote, "identity", p.id, "services", svcs)
	ctx, cancel := context.WithCancel(context.Background())
	errc = make(chan error, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := a.Run(ctx); err != nil {
			errc <- err
		}
	}()
	p.mu.Lock()
	p.agent = a
	p.mu.Unlock()
	return func() {
		cancel()
		<-done
		p.mu.Lock()
		p.agent = nil
		p.mu.Unlock()
	}, errc, nil
}

// actors are the proxy agent's actors for svcs, every method relayed.
func (p *proxy) actors(svcs []string) []*nanite.Actor {
	byName := map[string]*nanite.Actor{}
	var out []*nanite.Actor
	for _, s := range svcs {
		name, method, _ := strings.Cut(strings.TrimPrefix(s, "/"), "/")
		act := byName[name]
		if act == nil {
			act = nanite.NewActor(name)
			byName[name] = act
			out = append(out, act)
		}
		act.Expose(method, p.handle)
	}
	return out
}

// offer makes the proxy offer svcs: it starts the proxy agent, changes its
// services in place (it stays registered: no gap for requesters), or
// stops it when svcs is empty.
func (p *proxy) offer(svcs []string, stop *func(), errc *chan error) error {
	if slices.Equal(svcs, p.offered()) {
		return nil
	}
	p.mu.Lock()
	p.services = svcs
	a := p.agent
	p.mu.Unlock()
	switch {
	case len(svcs) == 0:
		if *stop != nil {
			(*stop)()
			*stop, *errc = nil, nil
		}
	case a != nil:
		a.SetActors(p.actors(svcs)...)
		p.b.log.Info("proxy agent services", "cluster", p.c.cfg.Name, "remote", p.remote, "identity", p.id, "services", svcs)
	default:
		st, ec, err := p.startAgent(svcs)
		if err != nil {
			return err
		}
		*stop, *errc = st, ec
	}
	return nil
}

// match returns the remote services of info that the import's globs cover.
func (p *proxy) match(info disco.Info) []string {
	var list []string
	for _, f := range info.Features {
		if svc, ok := strings.CutPrefix(f.Var, vertebra.ServiceFeature("")); ok {
			list = append(list, svc)
		}
	}
	return p.matchList(list)
}

// matchList returns the services of list that the import's globs cover
// (never the built-in /nanite/* ones), sorted, without duplicates.
func (p *proxy) matchList(list []string) []string {
	var out []string
	for _, s := range list {
		svc, err := nanite.NormalizeService(s)
		if err != nil || svc != s || strings.HasPrefix(svc, "/"+nanite.BuiltinActor+"/") {
			continue
		}
		if p.imported(svc) {
			out = append(out, svc)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// imported reports whether the import's globs cover svc.
func (p *proxy) imported(svc string) bool {
	for _, g := range p.imp.Services {
		if matchService(g, svc) {
			return true
		}
	}
	return false
}

// runLocal follows a cluster of this bridge (a local relay): the services
// its exports allow to the importing cluster, from the agents present, and
// their lowest load, looked at every presence interval.
func (p *proxy) runLocal(ctx context.Context) error {
	iv := p.b.opts.PresenceInterval
	if iv <= 0 {
		iv = DefaultPresenceInterval
	}
	var (
		agentStop func()
		agentErr  chan error
	)
	defer func() {
		if agentStop != nil {
			agentStop()
		}
	}()
	t := time.NewTicker(iv)
	defer t.Stop()
	for {
		agents, vis := p.local.visibleAgents(p.c.jid)
		var list []string
		present := map[string]float64{}
		for i, a := range agents {
			if m := p.matchList(vis[i]); len(m) > 0 {
				list = append(list, m...)
				present[a.Identity] = a.Status
			}
		}
		svcs := p.matchList(list)
		p.mu.Lock()
		p.present = present
		p.mu.Unlock()
		if err := p.offer(svcs, &agentStop, &agentErr); err != nil {
			return err
		}
		select {
		case <-t.C:
		case err := <-agentErr:
			agentStop = nil
			return err
		case <-ctx.Done():
			return nil
		}
	}
}

// relayLocal relays a request into another cluster of this bridge, when
// that cluster's exports allow the service to the importing cluster (and
// the policy to its JID): the same checks as an op from XMPP, without the
// XMPP leg.
func (p *proxy) relayLocal(ctx context.Context, r *nanite.Request) (any, error) {
	dst, svc := p.local, r.Service
	if !p.imported(svc) || !dst.allowed(svc, p.c.jid) {
		p.b.count(RefuseNotExported)
		return nil, &nanite.RemoteError{Code: vertebra.CodeUnauthorized,
			Message: fmt.Sprintf("%s: %s of %s is not exported to %s", RefuseNotExported, svc, dst.jid, p.c.jid)}
	}
	if p.b.policy != nil {
		pa := vertebra.PolicyAuthorizer{Policy: p.b.policy}
		if err := pa.Authorize(ctx, p.c.jid.String(), "", svc); err != nil {
			p.b.count(RefusePolicy)
			return nil, &nanite.RemoteError{Code: vertebra.CodeUnauthorized, Message: fmt.Sprintf("%s: %v", RefusePolicy, err)}
		}
	}
	target := ""
	if strings.HasPrefix(r.Target, nanite.TargetXMPP) {
		if j, err := jid.Parse(strings.TrimPrefix(r.Target, nanite.TargetXMPP)); err == nil {
			target = j.Resourcepart()
		}
	}
	if !dst.mapper.Connected() {
		p.b.count(RefuseUnavailable)
		return nil, &nanite.RemoteError{Code: CodeUnavailable, Message: fmt.Sprintf("%s: the broker of %s cannot be reached now", RefuseUnavailable, dst.jid)}
	}
	if !dst.offersLocally(svc, target, nil) {
		p.b.count(RefuseNoAgent)
		return nil, &nanite.RemoteError{Code: CodeNoAgent, Message: fmt.Sprintf("%s: no agent of %s offers %s", RefuseNoAgent, dst.jid, svc)}
	}
	// The hop record gets this bridge's domain, as for an op from XMPP,
	// so that the other cluster's proxies never relay it further.
	opts := []nanite.RequestOption{nanite.WithHops(append(slices.Clone(r.Hops), p.b.domain.Domainpart())...),
		nanite.OnIntermediate(func(in nanite.Intermediate) { _ = r.Intermediate(ctx, in.Key, in.Payload) })}
	if !r.Deadline.IsZero() {
		opts = append(opts, nanite.WithTimeout(time.Until(r.Deadline)))
	}
	if dst.cfg.Secure && len(r.Origin) > 0 {
		opts = append(opts, nanite.WithOrigin(r.Origin))
	}
	fanOut := r.Selector == nanite.SelectAll && target == ""
	switch {
	case target != "":
		opts = append(opts, nanite.WithTarget(target))
	case fanOut:
		opts = append(opts, nanite.WithSelector(nanite.SelectAll))
	case dst.proxyOffers(svc, nil):
		agents, _ := dst.localAgents()
		opts = append(opts, nanite.WithTarget(pickAgent(agents, svc, nil, r.Selector)))
	}
	payload := r.Payload
	if len(payload) == 0 {
		payload = json.RawMessage("null")
	}
	p.b.relayedLocal.Add(1)
	resp, err := dst.mapper.Request(ctx, svc, payload, opts...)
	if err != nil {
		p.b.failed.Add(1)
		code, msg := errorCode(err)
		return nil, &nanite.RemoteError{Code: code, Message: msg}
	}
	if fanOut {
		out := make(nanite.MultiResult, 0, len(resp.Results))
		for _, res := range resp.Results {
			if dst.proxies[res.Agent] {
				continue
			}
			name := res.Agent
			if aj, err := AgentJID(dst.jid, res.Agent); err == nil {
				name = nanite.TargetXMPP + aj.String()
			}
			rec := nanite.ResultRecord{Agent: name, Payload: res.Payload}
			if res.Err != nil {
				code, msg := errorCode(res.Err)
				rec.Payload, rec.Error = nil, &nanite.ErrorBody{Code: code, Message: msg}
			}
			out = append(out, rec)
		}
		return out, nil
	}
	res := resp.Results[0]
	if res.Err != nil {
		code, msg := errorCode(res.Err)
		return nil, &nanite.RemoteError{Code: code, Message: msg}
	}
	return res.Payload, nil
}

// handle relays one request of the local cluster to the remote cluster as
// a vertebra op: deadline kept, hop record extended by this bridge's
// domain, intermediate results streamed back, the result (or the remote
// error code) returned.
func (p *proxy) handle(ctx context.Context, r *nanite.Request) (any, error) {
	dom := p.b.domain.Domainpart()
	for _, h := range r.Hops {
		if hopDomain(h) == dom {
			p.b.count(RefuseLoop)
			return nil, &nanite.RemoteError{Code: CodeLoop, Message: fmt.Sprintf("%s: the request already crossed bridge %s (hops %v)", RefuseLoop, dom, r.Hops)}
		}
	}
	if len(r.Hops) >= p.b.cfg.HopLimit {
		p.b.count(RefuseHopLimit)
		return nil, &nanite.RemoteError{Code: CodeHopLimit, Message: fmt.Sprintf("%s: the request crossed %d bridges, the limit is %d", RefuseHopLimit, len(r.Hops), p.b.cfg.HopLimit)}
	}
	hops := make([]vertebra.Hop, 0, len(r.Hops)+1)
	for _, h := range r.Hops {
		hops = append(hops, vertebra.Hop{By: h})
	}
	hops = append(hops, vertebra.Hop{By: dom, At: time.Now()})
	select {
	case p.b.slots <- struct{}{}:
		defer func() { <-p.b.slots }()
	default:
		p.b.count(RefuseBusy)
		return nil, &nanite.RemoteError{Code: CodeBusy, Message: fmt.Sprintf("%s: %d ops in flight", RefuseBusy, cap(p.b.slots))}
	}
	if p.local != nil {
		return p.relayLocal(ctx, r)
	}
	to := p.remote
	if strings.HasPrefix(r.Target, nanite.TargetXMPP) {
		j, err := jid.Parse(strings.TrimPrefix(r.Target, nanite.TargetXMPP))
		if err != nil || !(j.Equal(p.remote) || (p.remote.Resourcepart() == "" && j.Bare().Equal(p.remote))) {
			return nil, &nanite.RemoteError{Code: nanite.CodeBadRequest, Message: fmt.Sprintf("target %q is not reached through %s", r.Target, p.remote)}
		}
		to = j
	}
	meta := vertebra.Meta{Hops: hops, Persistent: r.Persistent}
	fanOut := r.Selector == nanite.SelectAll && to.Resourcepart() == ""
	if fanOut {
		meta.Selector = nanite.SelectAll
	}
	payload := r.Payload
	if len(payload) == 0 {
		payload = json.RawMessage("null")
	}
	if p.b.identity != nil {
		// Signed as this bridge, on behalf of the caller: its own signed
		// request goes along (secure clusters) for the far side to check.
		meta.RequestID, meta.Origin = r.Token, r.Origin
		if err := vertebra.Sign(ctx, vertebra.IdentitySigner{Identity: p.b.identity}, to, r.Service, payload, &meta); err != nil {
			p.b.failed.Add(1)
			return nil, &nanite.RemoteError{Code: nanite.CodeInternal, Message: fmt.Sprintf("sign the op: %v", err)}
		}
	}
	p.b.relayedOut.Add(1)
	var ierr error
	res, err := p.b.ep.Call(ctx, to, r.Service, payload,
		vertebra.WithFrom(p.c.jid),
		vertebra.WithMeta(meta),
		vertebra.OnData(func(d vertebra.Data) {
			if d.Intermediate && ierr == nil {
				ierr = r.Intermediate(ctx, d.Key, json.RawMessage(d.Payload))
			}
		}))
	if err != nil {
		p.b.failed.Add(1)
		var oe *vertebra.OpError
		var de *vertebra.DeadlineError
		switch {
		case errors.As(err, &oe):
			return nil, &nanite.RemoteError{Code: oe.Code, Message: oe.Message}
		case errors.As(err, &de):
			return nil, &nanite.RemoteError{Code: nanite.CodeTimeout, Message: err.Error()}
		}
		return nil, &nanite.RemoteError{Code: nanite.CodeNotDelivered, Message: fmt.Sprintf("%s: %v", to, err)}
	}
	if ierr != nil {
		return nil, ierr
	}
	if fanOut {
		// One result per remote agent, named by its JID.
		out := make(nanite.MultiResult, 0, len(res.Items))
		for _, it := range res.Items {
			agent := it.Agent
			if agent == "" {
				agent = res.From.String()
			}
			rec := nanite.ResultRecord{Agent: nanite.TargetXMPP + agent}
			if it.Failed {
				var eb vertebra.ErrorBody
				_ = json.Unmarshal(it.Payload, &eb)
				rec.Error = &nanite.ErrorBody{Code: eb.Code, Message: eb.Message}
			} else {
				rec.Payload = it.Payload
			}
			out = append(out, rec)
		}
		return out, nil
	}
	switch len(res.Data) {
	case 0:
		return nil, nil
	case 1:
		return res.Data[0], nil
	}
	return res.Data, nil
}

// hopDomain is the domain of a hop (a bridge's domain or JID).
func hopDomain(h string) string {
	if j, err := jid.Parse(h); err == nil {
		return j.Domainpart()
	}
	return h
}
