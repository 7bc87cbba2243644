package bridge

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"mellium.im/xmpp/disco"
	"mellium.im/xmpp/jid"
	"mellium.im/xmpp/stanza"

	"github.com/nanite-go/nanite/nanite"
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

// ProxyStatus is the load a proxy agent reports. TODO: the remote
// cluster's load, from the presence of its cluster JID (subscribe to it);
// until then a constant that makes local agents win least-loaded picks.
const ProxyStatus = 100.0

// A proxy that found no matching remote service asks the remote cluster
// again after proxyDiscoveryMin, doubling up to proxyDiscoveryMax.
const (
	proxyDiscoveryMin = 250 * time.Millisecond
	proxyDiscoveryMax = 10 * time.Second
)

// proxy is the agent that stands, in a local cluster, for one imported
// remote cluster.
type proxy struct {
	b      *Bridge
	c      *cluster
	imp    Import
	remote jid.JID
	id     string
}

// ProxyIdentity is the identity of the proxy agent for the remote cluster
// JID remote: "xmpp." followed by the JID with every character a nanite
// identity cannot hold replaced by "_" (e.g. xmpp.app_nanite.site-b.test).
func ProxyIdentity(remote jid.JID) string {
	s := remote.Bare().String()
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
	return &proxy{b: b, c: c, imp: imp, remote: remote.Bare(), id: ProxyIdentity(remote)}, nil
}

// run discovers the remote services (disco#info of the remote cluster JID,
// asked from the local cluster JID: the remote bridge lists what it
// exports to us), then serves them as a nanite agent until ctx ends.
// TODO: re-discover periodically and follow the remote set as it changes.
func (p *proxy) run(ctx context.Context) error {
	var svcs []string
	wait := proxyDiscoveryMin
	for {
		select {
		case <-p.b.ready:
		case <-ctx.Done():
			return nil
		}
		if s := p.b.session(); s != nil {
			dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			info, err := disco.GetInfoIQ(dctx, "", stanza.IQ{To: p.remote, From: p.c.jid}, s)
			cancel()
			if err == nil {
				svcs = p.match(info)
			} else if ctx.Err() == nil {
				p.b.log.Debug("proxy discovery", "remote", p.remote, "error", err)
			}
		}
		if len(svcs) > 0 {
			break
		}
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return nil
		}
		wait = min(2*wait, proxyDiscoveryMax)
	}
	tags := append([]string{TagProxy, TagRemotePrefix + p.remote.Domainpart()}, p.imp.AsTags...)
	a, err := nanite.NewAgent(nanite.AgentConfig{URL: p.c.url, TLS: p.c.tls, Identity: p.id, Tags: tags,
		Status: func() float64 { return ProxyStatus }, Logger: p.b.log.With("proxy", p.id)})
	if err != nil {
		return err
	}
	actors := map[string]*nanite.Actor{}
	for _, s := range svcs {
		name, method, _ := strings.Cut(strings.TrimPrefix(s, "/"), "/")
		act := actors[name]
		if act == nil {
			act = nanite.NewActor(name)
			actors[name] = act
		}
		act.Expose(method, p.handle)
	}
	for _, act := range actors {
		a.AddActor(act)
	}
	p.b.log.Info("proxy agent", "cluster", p.c.cfg.Name, "remote", p.remote, "identity", p.id, "services", svcs)
	return a.Run(ctx)
}

// match returns the remote services of info that the import's globs cover.
func (p *proxy) match(info disco.Info) []string {
	var out []string
	for _, f := range info.Features {
		s, ok := strings.CutPrefix(f.Var, vertebra.ServiceFeature(""))
		if !ok {
			continue
		}
		svc, err := nanite.NormalizeService(s)
		if err != nil || svc != s || strings.HasPrefix(svc, "/"+nanite.BuiltinActor+"/") {
			continue
		}
		for _, g := range p.imp.Services {
			if matchService(g, svc) {
				out = append(out, svc)
				break
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
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
	payload := r.Payload
	if len(payload) == 0 {
		payload = json.RawMessage("null")
	}
	p.b.relayedOut.Add(1)
	var ierr error
	res, err := p.b.ep.Call(ctx, p.remote, r.Service, payload,
		vertebra.WithFrom(p.c.jid),
		vertebra.WithMeta(vertebra.Meta{Hops: hops}),
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
		return nil, &nanite.RemoteError{Code: nanite.CodeNotDelivered, Message: fmt.Sprintf("%s: %v", p.remote, err)}
	}
	if ierr != nil {
		return nil, ierr
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
