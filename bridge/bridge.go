// Package bridge relays requests between Nanite clusters (RabbitMQ vhosts,
// on one or several brokers) and XMPP: it joins the XMPP server as an
// external component at its domain and each configured cluster as an
// embedded mapper. docs/bridge.md describes the JID scheme, the config and
// the security model at the boundary.
package bridge

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"mellium.im/xmpp"
	"mellium.im/xmpp/jid"

	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/security"
	"github.com/nanite-go/nanite/vertebra"
)

// Refusal reasons: the counters of Stats.Refused and the start of a nack's
// message. docs/bridge.md explains each.
const (
	RefuseUnknownCluster = "unknown_cluster"     // the op's JID names no cluster of this bridge
	RefuseBadRequest     = "bad_request"         // malformed service name or selector
	RefuseNotExported    = "not_exported"        // no export rule of the cluster covers the service
	RefusePeer           = "peer_not_allowed"    // the service is exported, but not to the sender
	RefusePolicy         = "policy"              // the policy file denies the sender
	RefuseBadSignature   = "bad_signature"       // the op's signature does not verify (forged, replayed, unknown CA, ...)
	RefuseSignature      = "signature_required"  // the service is exported only to signed ops
	RefuseLoop           = "loop"                // the op already crossed this bridge
	RefuseHopLimit       = "hop_limit"           // the op crossed too many bridges
	RefuseNoAgent        = "no_agent"            // no agent of the cluster offers the service (or the JID's agent is unknown)
	RefuseBusy           = "busy"                // too many ops in flight
	RefuseShutdown       = "shutdown"            // the bridge is shutting down
	RefuseUnavailable    = "cluster_unavailable" // the bridge is not connected to the cluster's broker now
)

// Nack codes of refusals (besides vertebra's).
const (
	CodeLoop     = "loop_detected"
	CodeHopLimit = "hop_limit"
	CodeNoAgent  = nanite.CodeNoAgent
	CodeBusy     = "busy"
	// CodeUnavailable: the cluster's broker cannot be reached now.
	CodeUnavailable = "cluster_unavailable"
)

// DefaultMaxInFlight bounds the ops relayed at once.
const DefaultMaxInFlight = 10000

// Options are the bridge's runtime options (the rest is in Config).
type Options struct {
	// Logger receives the bridge's events; nil discards them.
	Logger *slog.Logger
	// MaxInFlight bounds the ops relayed at once; past it new ops are
	// refused with code busy (default DefaultMaxInFlight).
	MaxInFlight int
	// Mapper adjusts each cluster's mapper config (tests: Warmup, ...).
	Mapper func(name string, cfg *nanite.MapperConfig)
	// MinBackoff and MaxBackoff of XMPP reconnections (defaults 100 ms
	// and 5 s).
	MinBackoff, MaxBackoff time.Duration
	// PresenceInterval is how often agents' presence is brought up to date
	// (default DefaultPresenceInterval).
	PresenceInterval time.Duration
	// DiscoveryInterval is how often proxies ask remote clusters for their
	// services when no presence change prompts it (default
	// DefaultDiscoveryInterval).
	DiscoveryInterval time.Duration
	// Agent adjusts the config of each proxy agent (tests: heartbeats).
	Agent func(cluster string, cfg *nanite.AgentConfig)
	// DrainTimeout bounds how long a shutdown waits for the ops in flight
	// (default DefaultDrainTimeout).
	DrainTimeout time.Duration
	// Hold is how long the bridge holds an op's first stanzas (the op's
	// echo, its ack, intermediate results) to send them together, in one
	// stanza with the result when the op ends in time (vertebra's
	// Config.Hold; default DefaultHold, negative: never batch).
	Hold time.Duration
}

// DefaultDrainTimeout is how long a shutdown waits for ops in flight.
const DefaultDrainTimeout = 30 * time.Second

// DefaultHold is the bridge's Options.Hold. An op relayed into a cluster
// waits for a broker round trip, which under load often takes longer than
// vertebra's default (2 ms); past the hold, the echo leaves with the ack
// alone and the result needs an IQ-set and its IQ-result of its own, two
// more stanzas through the XMPP server. Holding longer delays only the ack
// and intermediate results, never the result.
const DefaultHold = 20 * time.Millisecond

// Bridge relays ops from XMPP into its clusters.
type Bridge struct {
	cfg      *Config
	opts     Options
	log      *slog.Logger
	domain   jid.JID
	ep       *vertebra.Endpoint
	dial     vertebra.DialConfig
	clusters []*cluster
	byLocal  map[string]*cluster // by the cluster JID's (case-folded, escaped) localpart
	policy   *security.PolicyHolder
	verifier vertebra.Verifier  // nil without trust.ca_files
	secv     *security.Verifier // the same, for Nanite envelopes
	identity *security.Identity // the bridge's own (config identity), or nil
	slots    chan struct{}
	dir      *vertebra.Directory // the site directory (config "directory"), or nil
	dirJID   jid.JID
	dirAllow []peer

	sessMu    sync.Mutex
	sess      *xmpp.Session
	ready     chan struct{}
	readyOnce sync.Once
	pres      *presenceState
	stateFile string     // Config.StateFile, resolved; "" for none
	stateMu   sync.Mutex // serialises writes of the state file
	presKick  chan struct{}

	draining     atomic.Bool
	relayed      atomic.Int64
	relayedOut   atomic.Int64
	relayedLocal atomic.Int64
	failed       atomic.Int64
	mu           sync.Mutex
	refused      map[string]int64
}

type cluster struct {
	cfg     *ClusterConfig
	jid     jid.JID
	mapper  *nanite.Mapper
	exports []export
	url     string
	tls     *tls.Config
	proxies map[string]bool // identities of this bridge's proxy agents in the cluster
	imports []*proxy
}

type export struct {
	services   []string
	to         []peer
	requireSig bool
}

// Stats are the bridge's counters.
type Stats struct {
	Relayed      int64            // ops accepted and relayed into a cluster
	RelayedOut   int64            // requests relayed by proxy agents to remote clusters
	RelayedLocal int64            // requests relayed by proxy agents between clusters of this bridge
	Failed       int64            // relayed ops and requests that ended with an error
	Refused      map[string]int64 // ops and proxied requests refused, by reason
	// Proxies sums the counters of the running proxy agents
	// (nanite.Agent.Stats: received, succeeded, bundles_sent...).
	Proxies map[string]int64
}

// New returns a bridge for a validated config (LoadConfig); Run starts it.
func New(cfg *Config, opts Options) (*Bridge, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if opts.MaxInFlight <= 0 {
		opts.MaxInFlight = DefaultMaxInFlight
	}
	if opts.Hold == 0 {
		opts.Hold = DefaultHold
	}
	if opts.Hold == 0 {
		opts.Hold = DefaultHold
	}
	domain, err := jid.Parse(cfg.XMPP.Domain)
	if err != nil {
		return nil, fmt.Errorf("xmpp.domain: %w", err)
	}
	secret := cfg.XMPP.Secret
	if cfg.XMPP.SecretFile != "" {
		b, err := os.ReadFile(cfg.Path(cfg.XMPP.SecretFile))
		if err != nil {
			return nil, fmt.Errorf("xmpp.secret_file: %w", err)
		}
		secret = strings.TrimSpace(string(b))
	}
	b := &Bridge{cfg: cfg, opts: opts, log: log, domain: domain, byLocal: map[string]*cluster{},
		refused: map[string]int64{}, slots: make(chan struct{}, opts.MaxInFlight),
		ready: make(chan struct{}), pres: newPresenceState(), presKick: make(chan struct{}, 1)}
	if cfg.Policy != "" {
		if b.policy, err = security.NewPolicyHolder(cfg.Path(cfg.Policy), log); err != nil {
			return nil, fmt.Errorf("policy: %w", err)
		}
	}
	roots, err := cfg.roots()
	if err != nil {
		return nil, fmt.Errorf("trust: %w", err)
	}
	if roots != nil {
		v, err := security.NewVerifier(security.VerifierConfig{Roots: roots, Logger: log})
		if err != nil {
			return nil, fmt.Errorf("trust: %w", err)
		}
		b.verifier = vertebra.IdentityVerifier{Verifier: v}
		b.secv = v
	}
	if cfg.Identity != nil {
		if b.identity, err = security.LoadIdentity(cfg.Path(cfg.Identity.CertFile), cfg.Path(cfg.Identity.KeyFile)); err != nil {
			return nil, fmt.Errorf("identity: %w", err)
		}
		if b.identity.Role != security.RoleBridge {
			return nil, fmt.Errorf("identity: the certificate of %s has the role %s, not %s", b.identity.Name, b.identity.Role, security.RoleBridge)
		}
	}
	for i := range cfg.Clusters {
		cc := &cfg.Clusters[i]
		cj, err := ClusterJID(cc.Vhost, domain.String())
		if err != nil {
			return nil, fmt.Errorf("cluster %s: %w", cc.Name, err)
		}
		u, err := cc.brokerURL(cfg)
		if err != nil {
			return nil, fmt.Errorf("cluster %s: %w", cc.Name, err)
		}
		tc, err := cc.tlsConfig(cfg)
		if err != nil {
			return nil, fmt.Errorf("cluster %s: %w", cc.Name, err)
		}
		mc := nanite.MapperConfig{URL: u, TLS: tc, Logger: log.With("cluster", cc.Name)}
		if cc.Secure {
			if b.identity == nil || b.secv == nil {
				return nil, fmt.Errorf("cluster %s: secure mode needs identity and trust.ca_files", cc.Name)
			}
			mc.Identity = b.identity.Name
			mc.Secure = &nanite.Secure{Identity: b.identity, Verifier: b.secv}
		}
		if opts.Mapper != nil {
			opts.Mapper(cc.Name, &mc)
		}
		m, err := nanite.NewMapper(mc)
		if err != nil {
			return nil, fmt.Errorf("cluster %s: %w", cc.Name, err)
		}
		c := &cluster{cfg: cc, jid: cj, mapper: m, url: u, tls: tc, proxies: map[string]bool{}}
		for _, im := range cc.Imports {
			px, err := newProxy(b, c, im)
			if err != nil {
				return nil, fmt.Errorf("cluster %s: import %s: %w", cc.Name, im.From, err)
			}
			if c.proxies[px.id] {
				return nil, fmt.Errorf("cluster %s: %s is imported twice", cc.Name, im.From)
			}
			c.proxies[px.id] = true
			c.imports = append(c.imports, px)
		}
		for _, e := range cc.Exports {
			ex := export{services: e.Services, requireSig: e.RequireSignature}
			for _, s := range e.To {
				p, err := parsePeer(s)
				if err != nil {
					return nil, fmt.Errorf("cluster %s: %w", cc.Name, err)
				}
				ex.to = append(ex.to, p)
			}
			c.exports = append(c.exports, ex)
		}
		b.clusters = append(b.clusters, c)
		b.byLocal[cj.Localpart()] = c
	}
	if cfg.Directory != nil {
		if err := b.newDirectory(cfg.Directory); err != nil {
			return nil, err
		}
	}
	if cfg.StateFile != "" {
		b.stateFile = cfg.Path(cfg.StateFile)
		kept, err := loadState(b.stateFile)
		if err != nil {
			return nil, err
		}
		b.restoreSubscriptions(kept)
	}
	// Imports of this bridge's own clusters are local relays.
	for _, c := range b.clusters {
		for _, px := range c.imports {
			if strings.EqualFold(px.remote.Domainpart(), domain.Domainpart()) {
				px.local = b.byLocal[px.remote.Localpart()]
				if px.local == nil || px.local == c {
					return nil, fmt.Errorf("cluster %s: import %s: no other cluster of this bridge has that JID", c.cfg.Name, px.remote)
				}
			}
		}
	}
	b.ep = vertebra.NewEndpoint(vertebra.Config{Handler: b, Hold: opts.Hold, Logger: log.With("side", "xmpp")})
	b.dial = vertebra.DialConfig{JID: domain, Secret: secret, Addr: cfg.XMPP.Server}
	return b, nil
}

// Domain is the bridge's component domain.
func (b *Bridge) Domain() jid.JID { return b.domain }

// ClusterJIDs maps each cluster's name to its JID.
func (b *Bridge) ClusterJIDs() map[string]jid.JID {
	m := map[string]jid.JID{}
	for _, c := range b.clusters {
		m[c.cfg.Name] = c.jid
	}
	return m
}

// Endpoint is the bridge's XMPP endpoint.
func (b *Bridge) Endpoint() *vertebra.Endpoint { return b.ep }

// Run connects to every cluster and to the XMPP server and relays until ctx
// ends, then shuts down gracefully: new ops are refused (nack shutdown),
// the proxy agents leave their clusters (letting the requests they run
// finish), the ops in flight are drained (at most Options.DrainTimeout),
// the agents are said unavailable to subscribers, and the connections
// close. Run returns an error when a broker or the XMPP server refuses the
// bridge outright (credentials, vhost).
func (b *Bridge) Run(ctx context.Context) error {
	runCtx, cancelRun := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelRun()
	proxyCtx, cancelProxies := context.WithCancel(runCtx)
	defer cancelProxies()
	errs := make(chan error, len(b.clusters)+1+b.proxyCount())
	fail := func(err error) {
		errs <- err
		cancelRun()
	}
	var wg, proxies sync.WaitGroup
	for _, c := range b.clusters {
		wg.Go(func() {
			if err := c.mapper.Run(runCtx); err != nil {
				fail(fmt.Errorf("cluster %s: %w", c.cfg.Name, err))
			}
		})
	}
	for _, c := range b.clusters {
		for _, px := range c.imports {
			proxies.Go(func() {
				if err := px.run(proxyCtx); err != nil {
					fail(fmt.Errorf("cluster %s: proxy for %s: %w", c.cfg.Name, px.remote, err))
				}
			})
		}
	}
	wg.Go(func() {
		if err := b.runXMPP(runCtx, b.dial); err != nil {
			fail(fmt.Errorf("xmpp: %w", err))
		}
	})
	select {
	case <-ctx.Done():
		b.drain(cancelProxies, &proxies)
	case <-runCtx.Done(): // a fatal error
	}
	cancelRun()
	proxies.Wait()
	wg.Wait()
	_ = b.ep.Close()
	close(errs)
	var all []error
	for err := range errs {
		all = append(all, err)
	}
	return errors.Join(all...)
}

func (b *Bridge) proxyCount() int {
	n := 0
	for _, c := range b.clusters {
		n += len(c.imports)
	}
	return n
}

// drain stops taking ops and waits for those in flight.
func (b *Bridge) drain(stopProxies context.CancelFunc, proxies *sync.WaitGroup) {
	b.draining.Store(true)
	b.log.Info("bridge: shutting down", "in_flight", len(b.slots))
	stopProxies()
	proxies.Wait() // each proxy agent lets its running requests finish
	timeout := b.opts.DrainTimeout
	if timeout <= 0 {
		timeout = DefaultDrainTimeout
	}
	deadline := time.Now().Add(timeout)
	for len(b.slots) > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := len(b.slots); n > 0 {
		b.log.Warn("bridge: ops still in flight at shutdown", "in_flight", n)
	}
}

// Ready blocks until every cluster's mapper and the XMPP session are up.
func (b *Bridge) Ready(ctx context.Context) error {
	for _, c := range b.clusters {
		if err := c.mapper.Ready(ctx); err != nil {
			return fmt.Errorf("cluster %s: %w", c.cfg.Name, err)
		}
	}
	select {
	case <-b.ready:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("xmpp: %w", ctx.Err())
	}
}

// Mapper returns the mapper of the named cluster (nil if none).
func (b *Bridge) Mapper(name string) *nanite.Mapper {
	for _, c := range b.clusters {
		if c.cfg.Name == name {
			return c.mapper
		}
	}
	return nil
}

// Stats returns the bridge's counters.
func (b *Bridge) Stats() Stats {
	b.mu.Lock()
	defer b.mu.Unlock()
	r := make(map[string]int64, len(b.refused))
	for k, v := range b.refused {
		r[k] = v
	}
	px := map[string]int64{}
	for _, c := range b.clusters {
		for _, p := range c.imports {
			p.mu.Lock()
			a := p.agent
			p.mu.Unlock()
			if a == nil {
				continue
			}
			for k, v := range a.Stats() {
				px[k] += v
			}
		}
	}
	return Stats{Relayed: b.relayed.Load(), RelayedOut: b.relayedOut.Load(), RelayedLocal: b.relayedLocal.Load(), Failed: b.failed.Load(), Refused: r, Proxies: px}
}

// count counts a refusal.
func (b *Bridge) count(reason string) {
	b.mu.Lock()
	b.refused[reason]++
	b.mu.Unlock()
}

// refuse nacks the op and counts the reason.
func (b *Bridge) refuse(ctx context.Context, req *vertebra.Request, w *vertebra.Reply, reason, code, format string, args ...any) error {
	b.mu.Lock()
	b.refused[reason]++
	b.mu.Unlock()
	msg := reason + ": " + fmt.Sprintf(format, args...)
	b.log.Info("op refused", "from", req.From, "to", req.To, "op", req.Type, "reason", reason, "message", msg)
	return w.Nack(ctx, code, msg)
}

// ServeOp implements vertebra.OpHandler: the XMPP → cluster flow. Every
// check happens before anything is published to a broker.
func (b *Bridge) ServeOp(ctx context.Context, req *vertebra.Request, w *vertebra.Reply) error {
	if b.draining.Load() {
		return b.refuse(ctx, req, w, RefuseShutdown, nanite.CodeShutdown, "bridge %s is shutting down", b.domain)
	}
	if b.dir != nil && req.To.Bare().Equal(b.dirJID) {
		return b.serveDirectory(ctx, req, w)
	}
	c := b.byLocal[req.To.Localpart()]
	if req.To.Localpart() == "" || c == nil {
		return b.refuse(ctx, req, w, RefuseUnknownCluster, vertebra.CodeUnknown, "%s is not a cluster of this bridge", req.To.Bare())
	}
	service, err := nanite.NormalizeService(req.Type)
	if err != nil {
		return b.refuse(ctx, req, w, RefuseBadRequest, vertebra.CodeBadRequest, "%v", err)
	}
	// Loops and hop limit.
	for _, h := range req.Meta.Hops {
		if hj, err := jid.Parse(h.By); err == nil && hj.Domainpart() == b.domain.Domainpart() {
			return b.refuse(ctx, req, w, RefuseLoop, CodeLoop, "the op already crossed bridge %s", b.domain)
		}
	}
	if len(req.Meta.Hops) >= b.cfg.HopLimit {
		return b.refuse(ctx, req, w, RefuseHopLimit, CodeHopLimit, "the op crossed %d bridges, the limit is %d", len(req.Meta.Hops), b.cfg.HopLimit)
	}
	// Signature: checked when present and the bridge trusts CAs.
	signedBy, signer := "", ""
	if len(req.Meta.Signature) > 0 && b.verifier != nil {
		by, err := b.verifier.Verify(ctx, req.Meta.Signature, req.Meta.Certificate,
			vertebra.SigningBytes(req.To, req.Type, req.Payload, req.Meta))
		if err != nil {
			return b.refuse(ctx, req, w, RefuseBadSignature, vertebra.CodeUnauthorized, "%v", err)
		}
		signedBy = by
		_, signer = vertebra.ParseSigner(by)
	}
	// An origin: a bridge relays for a caller of its cluster. The caller's
	// own signed request must verify too, and be this op; from then on the
	// caller is who the export rules and the policy judge.
	if len(req.Meta.Origin) > 0 {
		if signedBy == "" {
			return b.refuse(ctx, req, w, RefuseBadSignature, vertebra.CodeUnauthorized, "an op with an origin must be signed by the bridge that relays it (and trust.ca_files set here)")
		}
		if role, _ := vertebra.ParseSigner(signedBy); role != security.RoleBridge {
			return b.refuse(ctx, req, w, RefuseBadSignature, vertebra.CodeUnauthorized, "only bridges relay ops on behalf of callers, not %s", signedBy)
		}
		orig, peer, err := nanite.OpenOrigin(b.secv, req.Meta.Origin, 0, security.RoleClient, security.RoleMapper, security.RoleAgent)
		if err != nil {
			return b.refuse(ctx, req, w, RefuseBadSignature, vertebra.CodeUnauthorized, "origin: %v", err)
		}
		if err := sameRequest(orig, service, req.Payload); err != nil {
			return b.refuse(ctx, req, w, RefuseBadSignature, vertebra.CodeUnauthorized, "origin: %v", err)
		}
		signedBy, signer = vertebra.SignerString(peer.Role, peer.Name), peer.Name
	}
	// Export rules.
	exported, allowed, needSig := false, false, false
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
		exported = true
		if e.requireSig && signedBy == "" {
			needSig = true
			continue
		}
		for _, p := range e.to {
			if p.matches(req.From, signer) {
				allowed = true
				break
			}
		}
		if allowed {
			break
		}
	}
	if !exported {
		return b.refuse(ctx, req, w, RefuseNotExported, vertebra.CodeUnauthorized, "%s is not exported by %s", service, c.jid)
	}
	if !allowed && needSig {
		return b.refuse(ctx, req, w, RefuseSignature, vertebra.CodeUnauthorized, "%s of %s is exported only to signed ops", service, c.jid)
	}
	if !allowed {
		return b.refuse(ctx, req, w, RefusePeer, vertebra.CodeUnauthorized, "%s of %s is not exported to %s", service, c.jid, req.From.Bare())
	}
	if b.policy != nil {
		pa := vertebra.PolicyAuthorizer{Policy: b.policy}
		if err := pa.Authorize(ctx, req.From.String(), signedBy, service); err != nil {
			return b.refuse(ctx, req, w, RefusePolicy, vertebra.CodeUnauthorized, "%v", err)
		}
	}
	// Request options.
	var ropts []nanite.RequestOption
	selector := req.Meta.Selector
	switch selector {
	case "", nanite.SelectLeastLoaded, nanite.SelectAll, nanite.SelectRandom, nanite.SelectRoundRobin:
	default:
		return b.refuse(ctx, req, w, RefuseBadRequest, vertebra.CodeBadRequest, "unknown selector %q", selector)
	}
	target := req.To.Resourcepart()
	if target != "" {
		if selector != "" && selector != nanite.SelectLeastLoaded {
			return b.refuse(ctx, req, w, RefuseBadRequest, vertebra.CodeBadRequest, "selector %q with an agent JID", selector)
		}
		ropts = append(ropts, nanite.WithTarget(target))
	} else if selector != "" {
		ropts = append(ropts, nanite.WithSelector(selector))
	}
	if len(req.Meta.Tags) > 0 {
		ropts = append(ropts, nanite.WithTags(req.Meta.Tags...))
	}
	if req.Meta.Persistent {
		ropts = append(ropts, nanite.Persistent())
	}
	// An op from XMPP never goes to this bridge's own proxy agents (it
	// would be relayed out again: loops). When proxies offer the service
	// too, the bridge picks the agent itself among the others.
	if !c.offersLocally(service, target, req.Meta.Tags) {
		if target != "" {
			return b.refuse(ctx, req, w, RefuseNoAgent, CodeNoAgent, "agent %s of %s does not offer %s", target, c.jid, service)
		}
		if c.proxyOffers(service, req.Meta.Tags) {
			return b.refuse(ctx, req, w, RefuseNoAgent, CodeNoAgent, "no agent of %s offers %s (only proxies for remote clusters, which an op from XMPP never goes through)", c.jid, service)
		}
		return b.refuse(ctx, req, w, RefuseNoAgent, CodeNoAgent, "no agent of %s offers %s", c.jid, service)
	}
	if target == "" && selector != nanite.SelectAll && c.proxyOffers(service, req.Meta.Tags) {
		agents, _ := c.localAgents()
		target = pickAgent(agents, service, req.Meta.Tags, selector)
		ropts = append(ropts, nanite.WithTarget(target))
	}
	hops := make([]string, 0, len(req.Meta.Hops)+1)
	for _, h := range req.Meta.Hops {
		hops = append(hops, h.By)
	}
	ropts = append(ropts, nanite.WithHops(append(hops, b.domain.Domainpart())...))
	if c.cfg.Secure && len(req.Meta.Origin) > 0 {
		// The cluster's agents check the caller's signature and apply
		// their policy to the caller, not to this bridge.
		ropts = append(ropts, nanite.WithOrigin(req.Meta.Origin))
	}
	if !c.mapper.Connected() {
		return b.refuse(ctx, req, w, RefuseUnavailable, CodeUnavailable, "the broker of %s cannot be reached now", c.jid)
	}
	select {
	case b.slots <- struct{}{}:
		defer func() { <-b.slots }()
	default:
		return b.refuse(ctx, req, w, RefuseBusy, CodeBusy, "%d ops in flight", cap(b.slots))
	}

	// Accepted: ack, then relay.
	b.relayed.Add(1)
	if err := w.Ack(ctx); err != nil {
		return err
	}
	q := newStream(ctx, w)
	ropts = append(ropts, nanite.WithTimeout(time.Until(req.Deadline)), nanite.OnIntermediate(q.push))
	payload := req.Payload
	if payload == nil {
		payload = json.RawMessage("null")
	}
	resp, err := c.mapper.Request(ctx, service, payload, ropts...)
	if serr := q.close(); serr != nil {
		return serr
	}
	if err != nil {
		b.failed.Add(1)
		code, msg := errorCode(err)
		return w.Fail(ctx, code, msg)
	}
	var okN int
	var lastErr error
	for _, r := range resp.Results {
		if c.proxies[r.Agent] {
			continue // selector all: this bridge's proxies refuse (loop)
		}
		agent := r.Agent
		if aj, err := AgentJID(c.jid, r.Agent); err == nil {
			agent = aj.String()
		}
		if r.Err != nil {
			lastErr = r.Err
			if selector == nanite.SelectAll {
				// One agent of a fan-out failed: said, and the op goes on.
				code, msg := errorCode(r.Err)
				if err := w.FailedFor(ctx, agent, code, msg); err != nil {
					return err
				}
			}
			continue
		}
		okN++
		if err := w.DataFrom(ctx, agent, r.Payload); err != nil {
			return err
		}
	}
	if okN == 0 && lastErr != nil && selector != nanite.SelectAll {
		b.failed.Add(1)
		code, msg := errorCode(lastErr)
		return w.Fail(ctx, code, msg)
	}
	return w.Final(ctx)
}

// sameRequest checks that the origin orig is the request for service with
// payload (as the op carries it: canonical JSON of its typed values).
func sameRequest(orig *nanite.Packet, service string, payload json.RawMessage) error {
	svc, err := nanite.NormalizeService(orig.Type)
	if err != nil || svc != service {
		return fmt.Errorf("the caller asked for %q, the op is %s", orig.Type, service)
	}
	if len(orig.Sealed) > 0 {
		return errors.New("the caller's payload is sealed to the proxy: sealed requests do not cross bridges")
	}
	want := orig.Payload
	if len(want) == 0 {
		want = json.RawMessage("null")
	}
	a, err1 := vertebra.CanonicalPayload(want)
	got := payload
	if len(got) == 0 {
		got = json.RawMessage("null")
	}
	b, err2 := vertebra.CanonicalPayload(got)
	if err1 != nil || err2 != nil || !bytes.Equal(a, b) {
		return errors.New("the payload is not the one the caller signed")
	}
	return nil
}

// offers reports whether an agent matching target and tags offers service.
func offers(agents []nanite.AgentState, service, target string, tags []string) bool {
	for _, a := range agents {
		if target != "" && a.Identity != target {
			continue
		}
		if !hasAll(a.Tags, tags) {
			continue
		}
		for _, s := range a.Services {
			if s.Name == service {
				return true
			}
		}
	}
	return false
}

// offersLocally reports whether an agent of the cluster other than this
// bridge's proxies (the one named target, when given) offers service with
// tags; it looks only at the agents of that service.
func (c *cluster) offersLocally(service, target string, tags []string) bool {
	return c.mapper.AnyAgent(service, func(a *nanite.AgentState) bool {
		return (target == "" || a.Identity == target) && !c.isProxy(*a) && hasAll(a.Tags, tags)
	})
}

// proxyOffers reports whether one of this bridge's proxies in the cluster
// offers service with tags.
func (c *cluster) proxyOffers(service string, tags []string) bool {
	for id := range c.proxies {
		if a, ok := c.mapper.Agent(id); ok && c.isProxy(a) && offers([]nanite.AgentState{a}, service, "", tags) {
			return true
		}
	}
	return false
}

// localAgents splits the cluster's agents into the others and this
// bridge's proxies.
func (c *cluster) localAgents() (agents, proxies []nanite.AgentState) {
	for _, a := range c.mapper.Agents() {
		if c.isProxy(a) {
			proxies = append(proxies, a)
		} else {
			agents = append(agents, a)
		}
	}
	return agents, proxies
}

// pickAgent chooses among agents offering service with tags: the least
// loaded (status, then requests outstanding), or a random one for the
// selectors random and rr.
func pickAgent(agents []nanite.AgentState, service string, tags []string, selector string) string {
	var cands []nanite.AgentState
	for _, a := range agents {
		if offers([]nanite.AgentState{a}, service, "", tags) {
			cands = append(cands, a)
		}
	}
	if len(cands) == 0 {
		return ""
	}
	if selector == nanite.SelectRandom || selector == nanite.SelectRoundRobin {
		return cands[rand.IntN(len(cands))].Identity
	}
	best := cands[0]
	for _, a := range cands[1:] {
		if a.Status < best.Status || (a.Status == best.Status && a.Pending < best.Pending) {
			best = a
		}
	}
	return best.Identity
}

func hasAll(have, want []string) bool {
	for _, w := range want {
		found := false
		for _, h := range have {
			if h == w {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// errorCode maps a nanite error to the code and message of an XMPP error.
func errorCode(err error) (code, msg string) {
	var ce interface {
		ErrorCode() string
		ErrorMessage() string
	}
	if errors.As(err, &ce) {
		return ce.ErrorCode(), ce.ErrorMessage()
	}
	switch {
	case errors.Is(err, nanite.ErrTimeout), errors.Is(err, context.DeadlineExceeded):
		return nanite.CodeTimeout, err.Error()
	case errors.Is(err, nanite.ErrNoAgent):
		return nanite.CodeNoAgent, err.Error()
	case errors.Is(err, nanite.ErrNotDelivered):
		return nanite.CodeNotDelivered, err.Error()
	case errors.Is(err, nanite.ErrAgentLost):
		return nanite.CodeAgentLost, err.Error()
	case errors.Is(err, nanite.ErrBusy):
		return CodeBusy, err.Error()
	case errors.Is(err, nanite.ErrTooLarge):
		return nanite.CodeTooLarge, err.Error()
	case errors.Is(err, nanite.ErrClosed):
		return nanite.CodeShutdown, err.Error()
	}
	return nanite.CodeInternal, err.Error()
}

// stream forwards a mapper's intermediate results to the XMPP caller in
// order, without blocking the mapper's reply goroutine (push never blocks;
// the queue is bounded by the mapper's payload limits and the deadline).
// Its goroutine starts with the first intermediate result: most requests
// have none, and a goroutine started and woken per op is latency on every
// relayed request.
type stream struct {
	ctx     context.Context
	w       *vertebra.Reply
	mu      sync.Mutex
	q       []nanite.Intermediate
	wake    chan struct{}
	done    chan struct{}
	started bool
	shut    bool
	err     error
}

func newStream(ctx context.Context, w *vertebra.Reply) *stream {
	return &stream{ctx: ctx, w: w, wake: make(chan struct{}, 1), done: make(chan struct{})}
}

func (s *stream) push(in nanite.Intermediate) {
	s.mu.Lock()
	if s.shut {
		s.mu.Unlock()
		return
	}
	s.q = append(s.q, in)
	start := !s.started
	s.started = true
	s.mu.Unlock()
	if start {
		go s.run()
		return
	}
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *stream) run() {
	defer close(s.done)
	for {
		s.mu.Lock()
		q := s.q
		s.q = nil
		shut := s.shut
		s.mu.Unlock()
		for _, in := range q {
			if s.err != nil {
				break
			}
			s.err = s.w.Intermediate(s.ctx, in.Key, in.Payload)
		}
		if shut {
			s.mu.Lock()
			empty := len(s.q) == 0
			s.mu.Unlock()
			if empty {
				return
			}
			continue
		}
		<-s.wake
	}
}

// close waits until every queued intermediate result is sent.
func (s *stream) close() error {
	s.mu.Lock()
	s.shut = true
	started := s.started
	s.mu.Unlock()
	if !started {
		return nil
	}
	select {
	case s.wake <- struct{}{}:
	default:
	}
	<-s.done
	return s.err
}

// Serve runs the bridge for cfg until ctx ends, logging its clusters and
// its start and stop to opts.Logger: what "nanite bridge --config FILE"
// does once the config is loaded.
func Serve(ctx context.Context, cfg *Config, opts Options) error {
	b, err := New(cfg, opts)
	if err != nil {
		return err
	}
	for name, j := range b.ClusterJIDs() {
		b.log.Info("cluster", "name", name, "jid", j)
	}
	b.log.Info("bridge starting", "domain", b.Domain(), "server", cfg.XMPP.Server)
	if err := b.Run(ctx); err != nil {
		return err
	}
	b.log.Info("bridge stopped")
	return nil
}
