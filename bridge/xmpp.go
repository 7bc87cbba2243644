package bridge

import (
	"context"
	"encoding/xml"
	"errors"
	"sort"
	"strings"
	"sync"
	"time"

	"mellium.im/xmlstream"
	"mellium.im/xmpp"
	"mellium.im/xmpp/component"
	"mellium.im/xmpp/disco"
	"mellium.im/xmpp/disco/info"
	"mellium.im/xmpp/disco/items"
	"mellium.im/xmpp/jid"
	"mellium.im/xmpp/mux"
	"mellium.im/xmpp/ping"
	"mellium.im/xmpp/stanza"

	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/vertebra"
)

// DefaultPresenceInterval is how often the bridge compares its clusters'
// agents with the presence it last sent.
const DefaultPresenceInterval = time.Second

// The XMPP side: the bridge keeps its own component session (instead of a
// vertebra.Conn) because it answers disco per JID (cluster, agent) and
// manages presence subscriptions itself, as a component must.

// presenceState is what the bridge told its subscribers.
type presenceState struct {
	mu   sync.Mutex
	subs map[string]map[string]bool              // cluster JID -> subscriber bare JIDs
	sent map[string]map[string]map[string]string // cluster JID -> subscriber -> agent identity -> status sent
}

func newPresenceState() *presenceState {
	return &presenceState{subs: map[string]map[string]bool{}, sent: map[string]map[string]map[string]string{}}
}

// runXMPP connects as a component and serves, reconnecting with backoff,
// until ctx ends (nil) or the server refuses the secret (ErrAuth).
func (b *Bridge) runXMPP(ctx context.Context, dc vertebra.DialConfig) error {
	minB, maxB := b.opts.MinBackoff, b.opts.MaxBackoff
	if minB <= 0 {
		minB = 100 * time.Millisecond
	}
	if maxB < minB {
		maxB = max(5*time.Second, minB)
	}
	backoff := minB
	for {
		s, err := vertebra.Dial(ctx, dc)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, vertebra.ErrAuth) {
				return err
			}
			b.log.Warn("bridge: cannot connect to the XMPP server; will retry", "in", backoff, "err", err)
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return nil
			}
			backoff = min(2*backoff, maxB)
			continue
		}
		backoff = minB
		b.log.Info("bridge: connected", "domain", s.LocalAddr(), "server", s.Conn().RemoteAddr())
		if b.serveSession(ctx, s) {
			return nil
		}
		b.log.Warn("bridge: XMPP connection lost; reconnecting")
	}
}

// serveSession serves s until it ends (false) or ctx ends (true).
func (b *Bridge) serveSession(ctx context.Context, s *xmpp.Session) (stop bool) {
	m := mux.New(component.NSAccept,
		b.ep.Handle(), ping.Handle(),
		mux.IQ(stanza.GetIQ, xml.Name{Space: disco.NSInfo, Local: "query"}, mux.IQHandlerFunc(b.discoInfo)),
		mux.IQ(stanza.GetIQ, xml.Name{Space: disco.NSItems, Local: "query"}, mux.IQHandlerFunc(b.discoItems)),
	)
	// Presence is dispatched here, not by the mux: mellium's mux calls a
	// presence handler once per child element, and never for a presence
	// without children (a bare unavailable or subscribe).
	h := xmpp.HandlerFunc(func(t xmlstream.TokenReadEncoder, start *xml.StartElement) error {
		if start.Name.Local == "presence" {
			return b.onPresence(t, start)
		}
		return m.HandleXMPP(t, start)
	})
	b.sessMu.Lock()
	b.sess = s
	b.sessMu.Unlock()
	b.ep.SetSession(s)
	done := make(chan error, 1)
	go func() { done <- s.Serve(h) }()
	sctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { b.presenceLoop(sctx) })
	b.readyOnce.Do(func() { close(b.ready) })

	var err error
	select {
	case err = <-done:
	case <-ctx.Done():
		stop = true
		cancel()
		wg.Wait()
		b.sayUnavailable(s)
		_ = s.Close()
		t := time.NewTimer(2 * time.Second)
		select {
		case err = <-done:
		case <-t.C:
			_ = s.Conn().Close()
			err = <-done
		}
		t.Stop()
	}
	cancel()
	wg.Wait()
	b.ep.SetSession(nil)
	b.sessMu.Lock()
	b.sess = nil
	b.sessMu.Unlock()
	_ = s.Conn().Close()
	// What we told subscribers is void with the session: send it all again.
	b.pres.mu.Lock()
	b.pres.sent = map[string]map[string]map[string]string{}
	b.pres.mu.Unlock()
	// What we knew of remote presence is void too: the proxies stop until
	// the next session shows the remote side again.
	for _, c := range b.clusters {
		for _, px := range c.imports {
			px.forget()
			px.wake()
		}
	}
	if err != nil && !stop {
		b.log.Debug("bridge: session ended", "err", err)
	}
	return stop
}

func (b *Bridge) session() *xmpp.Session {
	b.sessMu.Lock()
	defer b.sessMu.Unlock()
	return b.sess
}

// visible returns the services of agent a that the cluster exports to
// asker, sorted.
func (c *cluster) visible(a nanite.AgentState, asker jid.JID) []string {
	var out []string
	for _, s := range a.Services {
		if c.allowed(s.Name, asker) {
			out = append(out, s.Name)
		}
	}
	sort.Strings(out)
	return out
}

// allowed reports whether service is exported to who (without a
// signature: for discovery).
func (c *cluster) allowed(service string, who jid.JID) bool {
	for _, e := range c.exports {
		match := false
		for _, g := range e.services {
			if matchService(g, service) {
				match = true
				break
			}
		}
		if !match {
			continue
		}
		if e.requireSig {
			continue
		}
		for _, p := range e.to {
			if p.matches(who, "") {
				return true
			}
		}
	}
	return false
}

// exportsTo reports whether the cluster exports anything to who.
func (c *cluster) exportsTo(who jid.JID) bool {
	for _, e := range c.exports {
		if e.requireSig {
			continue
		}
		for _, p := range e.to {
			if p.matches(who, "") {
				return true
			}
		}
	}
	return false
}

// visibleAgents returns the agents with at least one service exported to
// asker, and their visible services.
func (c *cluster) visibleAgents(asker jid.JID) ([]nanite.AgentState, [][]string) {
	var as []nanite.AgentState
	var svcs [][]string
	agents, _ := c.localAgents() // proxies are never exported
	for _, a := range agents {
		if v := c.visible(a, asker); len(v) > 0 {
			as = append(as, a)
			svcs = append(svcs, v)
		}
	}
	return as, svcs
}

func reply(t xmlstream.TokenReadEncoder, iq stanza.IQ, start *xml.StartElement, payload ...xml.TokenReader) error {
	_, err := xmlstream.Copy(t, iq.Result(xmlstream.Wrap(xmlstream.MultiReader(payload...), *start)))
	return err
}

func notFound(t xmlstream.TokenReadEncoder, iq stanza.IQ) error {
	_, err := xmlstream.Copy(t, iq.Error(stanza.Error{Type: stanza.Cancel, Condition: stanza.ItemNotFound}))
	return err
}

func hasNode(start *xml.StartElement) bool {
	for _, a := range start.Attr {
		if a.Name.Local == "node" && a.Value != "" {
			return true
		}
	}
	return false
}

// discoInfo answers disco#info on the domain, a cluster JID and an agent
// JID: the exported services the asker may call, as vertebra features.
func (b *Bridge) discoInfo(iq stanza.IQ, t xmlstream.TokenReadEncoder, start *xml.StartElement) error {
	if hasNode(start) {
		return notFound(t, iq)
	}
	base := []xml.TokenReader{
		info.Feature{Var: disco.NSInfo}.TokenReader(),
		info.Feature{Var: disco.NSItems}.TokenReader(),
	}
	if iq.To.Localpart() == "" {
		base = append(base, info.Identity{Category: "component", Type: "generic", Name: "nanite bridge"}.TokenReader(),
			info.Feature{Var: vertebra.NS}.TokenReader(), info.Feature{Var: ping.NS}.TokenReader())
		return reply(t, iq, start, base...)
	}
	c := b.byLocal[iq.To.Localpart()]
	if c == nil || !c.exportsTo(iq.From) {
		return notFound(t, iq)
	}
	agents, svcs := c.visibleAgents(iq.From)
	set := map[string]bool{}
	found := iq.To.Resourcepart() == ""
	for i, a := range agents {
		if r := iq.To.Resourcepart(); r != "" && r != a.Identity {
			continue
		}
		found = true
		for _, s := range svcs[i] {
			set[s] = true
		}
	}
	if !found {
		return notFound(t, iq)
	}
	name := "nanite cluster " + c.cfg.Name
	if r := iq.To.Resourcepart(); r != "" {
		name = "nanite agent " + r
	}
	base = append(base, info.Identity{Category: "automation", Type: "rpc", Name: name}.TokenReader(),
		info.Feature{Var: vertebra.NS}.TokenReader())
	var list []string
	for s := range set {
		list = append(list, s)
	}
	sort.Strings(list)
	for _, s := range list {
		base = append(base, info.Feature{Var: vertebra.ServiceFeature(s)}.TokenReader())
	}
	return reply(t, iq, start, base...)
}

// discoItems answers disco#items: the domain lists the cluster JIDs that
// export something to the asker, a cluster JID its agents that offer an
// exported service.
func (b *Bridge) discoItems(iq stanza.IQ, t xmlstream.TokenReadEncoder, start *xml.StartElement) error {
	if hasNode(start) {
		return notFound(t, iq)
	}
	var out []xml.TokenReader
	switch {
	case iq.To.Localpart() == "":
		for _, c := range b.clusters {
			if c.exportsTo(iq.From) {
				out = append(out, items.Item{JID: c.jid, Name: c.cfg.Name}.TokenReader())
			}
		}
	case iq.To.Resourcepart() == "":
		c := b.byLocal[iq.To.Localpart()]
		if c == nil || !c.exportsTo(iq.From) {
			return notFound(t, iq)
		}
		agents, _ := c.visibleAgents(iq.From)
		for _, a := range agents {
			aj, err := AgentJID(c.jid, a.Identity)
			if err != nil {
				continue
			}
			out = append(out, items.Item{JID: aj, Name: a.Identity}.TokenReader())
		}
	}
	return reply(t, iq, start, out...)
}

// sendPresence sends a presence stanza (not bound to a context: a write
// cut short would break the stream).
func sendPresence(s *xmpp.Session, p stanza.Presence, status string) error {
	var payload xml.TokenReader
	if status != "" {
		st := xml.StartElement{Name: xml.Name{Local: "status"}}
		payload = xmlstream.Wrap(xmlstream.Token(xml.CharData(status)), st)
	}
	return vertebra.SendStanza(s, p.Wrap(payload))
}

// presenceStanza is a presence as the bridge reads it.
type presenceStanza struct {
	From   string `xml:"from,attr"`
	To     string `xml:"to,attr"`
	Type   string `xml:"type,attr"`
	Status string `xml:"status"`
}

// onPresence dispatches a presence stanza: subscription requests and
// probes for the bridge's clusters, and the availability of the remote
// agents its proxies stand for.
func (b *Bridge) onPresence(t xmlstream.TokenReadEncoder, start *xml.StartElement) error {
	var ps presenceStanza
	d := xml.NewTokenDecoder(xmlstream.MultiReader(xmlstream.Token(*start), t))
	if err := d.Decode(&ps); err != nil {
		b.log.Debug("bridge: bad presence", "err", err)
		return nil
	}
	from, err1 := jid.Parse(ps.From)
	to, err2 := jid.Parse(ps.To)
	if err1 != nil || err2 != nil {
		return nil
	}
	p := stanza.Presence{From: from, To: to, Type: stanza.PresenceType(ps.Type)}
	switch p.Type {
	case stanza.SubscribePresence:
		return b.onSubscribe(p, t)
	case stanza.UnsubscribePresence:
		return b.onUnsubscribe(p, t)
	case stanza.ProbePresence:
		return b.onProbe(p, t)
	case stanza.AvailablePresence, stanza.UnavailablePresence:
		if p.Type == stanza.UnavailablePresence && b.dir != nil {
			b.dir.Forget(p.From) // a directory entry goes with its JID
		}
		b.onRemotePresence(p, strings.TrimSpace(ps.Status))
	}
	return nil
}

// onRemotePresence records the presence of a remote agent for the proxies
// that import its cluster (or it), and prompts them to look again when
// the set of available agents changed.
func (b *Bridge) onRemotePresence(p stanza.Presence, status string) {
	c := b.byLocal[p.To.Localpart()]
	if c == nil {
		return
	}
	load, ok := vertebra.ParseLoad(status)
	if !ok {
		load = ProxyStatus
	}
	available := p.Type == stanza.AvailablePresence
	for _, px := range c.imports {
		if !px.remote.Bare().Equal(p.From.Bare()) {
			continue
		}
		if p.From.Resourcepart() == "" {
			// The remote cluster JID itself: unavailable means all of it.
			if !available {
				px.forget()
				px.wake()
			}
			continue
		}
		if px.presence(p.From.Resourcepart(), available, load) {
			px.wake()
		}
	}
}

// onSubscribe approves subscriptions to a cluster JID from peers it exports
// to (and refuses the others), then sends them its agents' presence.
func (b *Bridge) onSubscribe(p stanza.Presence, _ xmlstream.TokenReadEncoder) error {
	s := b.session()
	if s == nil {
		return nil
	}
	c := b.byLocal[p.To.Localpart()]
	sub := p.From.Bare()
	if c == nil || p.To.Resourcepart() != "" || !c.exportsTo(p.From) {
		b.log.Info("bridge: subscription refused", "from", p.From, "to", p.To)
		return sendPresence(s, stanza.Presence{From: p.To.Bare(), To: sub, Type: stanza.UnsubscribedPresence}, "")
	}
	b.pres.mu.Lock()
	k := c.jid.String()
	if b.pres.subs[k] == nil {
		b.pres.subs[k] = map[string]bool{}
	}
	added := !b.pres.subs[k][sub.String()]
	b.pres.subs[k][sub.String()] = true
	b.pres.mu.Unlock()
	if added {
		b.saveSubscriptions()
	}
	if err := sendPresence(s, stanza.Presence{From: c.jid, To: sub, Type: stanza.SubscribedPresence}, ""); err != nil {
		return nil
	}
	b.kickPresence()
	return nil
}

func (b *Bridge) onUnsubscribe(p stanza.Presence, _ xmlstream.TokenReadEncoder) error {
	c := b.byLocal[p.To.Localpart()]
	if c == nil {
		return nil
	}
	sub := p.From.Bare().String()
	b.pres.mu.Lock()
	removed := b.pres.subs[c.jid.String()][sub]
	delete(b.pres.subs[c.jid.String()], sub)
	sent := b.pres.sent[c.jid.String()][sub]
	delete(b.pres.sent[c.jid.String()], sub)
	b.pres.mu.Unlock()
	if removed {
		b.saveSubscriptions()
	}
	if s := b.session(); s != nil {
		for id := range sent {
			if aj, err := AgentJID(c.jid, id); err == nil {
				_ = sendPresence(s, stanza.Presence{From: aj, To: p.From.Bare(), Type: stanza.UnavailablePresence}, "")
			}
		}
		_ = sendPresence(s, stanza.Presence{From: c.jid, To: p.From.Bare(), Type: stanza.UnsubscribedPresence}, "")
	}
	return nil
}

// onProbe answers a probe of a subscriber with everything again.
func (b *Bridge) onProbe(p stanza.Presence, _ xmlstream.TokenReadEncoder) error {
	c := b.byLocal[p.To.Localpart()]
	if c == nil {
		return nil
	}
	b.pres.mu.Lock()
	if b.pres.subs[c.jid.String()][p.From.Bare().String()] {
		delete(b.pres.sent[c.jid.String()], p.From.Bare().String())
	}
	b.pres.mu.Unlock()
	b.kickPresence()
	return nil
}

func (b *Bridge) kickPresence() {
	select {
	case b.presKick <- struct{}{}:
	default:
	}
}

// presenceLoop keeps subscribers' view of each cluster's agents current:
// available with the load as status, unavailable when an agent leaves or
// stops exporting anything to them.
func (b *Bridge) presenceLoop(ctx context.Context) {
	iv := b.opts.PresenceInterval
	if iv <= 0 {
		iv = DefaultPresenceInterval
	}
	tk := time.NewTicker(iv)
	defer tk.Stop()
	for {
		b.syncPresence()
		select {
		case <-ctx.Done():
			return
		case <-tk.C:
		case <-b.presKick:
		}
	}
}

type presenceUpdate struct {
	p      stanza.Presence
	status string
}

func (b *Bridge) syncPresence() {
	s := b.session()
	if s == nil {
		return
	}
	var ups []presenceUpdate
	b.pres.mu.Lock()
	for _, c := range b.clusters {
		k := c.jid.String()
		for sub := range b.pres.subs[k] {
			sj, err := jid.Parse(sub)
			if err != nil {
				continue
			}
			agents, _ := c.visibleAgents(sj)
			if b.pres.sent[k] == nil {
				b.pres.sent[k] = map[string]map[string]string{}
			}
			prev := b.pres.sent[k][sub]
			now := map[string]string{}
			for _, a := range agents {
				st := vertebra.FormatLoad(a.Status)
				now[a.Identity] = st
				if prev[a.Identity] != st {
					if aj, err := AgentJID(c.jid, a.Identity); err == nil {
						ups = append(ups, presenceUpdate{stanza.Presence{From: aj, To: sj}, st})
					}
				}
			}
			for id := range prev {
				if _, ok := now[id]; !ok {
					if aj, err := AgentJID(c.jid, id); err == nil {
						ups = append(ups, presenceUpdate{p: stanza.Presence{From: aj, To: sj, Type: stanza.UnavailablePresence}})
					}
				}
			}
			b.pres.sent[k][sub] = now
		}
	}
	b.pres.mu.Unlock()
	for _, u := range ups {
		if err := sendPresence(s, u.p, u.status); err != nil {
			b.log.Debug("bridge: presence", "to", u.p.To, "err", err)
			return
		}
	}
}

// sayUnavailable tells every subscriber that the agents it was shown are
// gone (graceful shutdown).
func (b *Bridge) sayUnavailable(s *xmpp.Session) {
	b.pres.mu.Lock()
	var ups []stanza.Presence
	for _, c := range b.clusters {
		for sub, sent := range b.pres.sent[c.jid.String()] {
			sj, err := jid.Parse(sub)
			if err != nil {
				continue
			}
			for id := range sent {
				if aj, err := AgentJID(c.jid, id); err == nil {
					ups = append(ups, stanza.Presence{From: aj, To: sj, Type: stanza.UnavailablePresence})
				}
			}
		}
	}
	b.pres.mu.Unlock()
	for _, p := range ups {
		_ = sendPresence(s, p, "")
	}
}
