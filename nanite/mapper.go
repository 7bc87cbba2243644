package nanite

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nanite-go/nanite/security"
)

// MapperConfig configures a mapper. Only URL is required.
type MapperConfig struct {
	// URL of the broker and vhost.
	URL string
	// TLS configures amqps:// connections.
	TLS *tls.Config
	// Identity of the mapper (default: generated). Its reply queue is named
	// after it.
	Identity string
	// AgentTimeout drops agents silent for this long (default: three of the
	// agent's own heartbeat intervals, at least 1 s).
	AgentTimeout time.Duration
	// RequestTimeout is the default deadline of requests (default 30 s).
	RequestTimeout time.Duration
	// Warmup is how long, after it connects, a mapper waits for agents to
	// (re-)register before it answers "no agent offers ..." (default 1 s).
	// Agents re-register at once when a mapper starts.
	Warmup time.Duration
	// MaxRetries bounds how often a request to an idempotent service is
	// retried on another agent when its agent is lost (default 2).
	MaxRetries int
	// MaxOutstanding bounds the requests in flight; beyond it Request fails
	// at once with ErrBusy (default 100000).
	MaxOutstanding int
	// InflightWeight is what one outstanding request adds to an agent's
	// load for least-loaded selection (default 1).
	InflightWeight float64
	// MaxPayload is the largest packet accepted (default 1 MiB).
	MaxPayload int
	// ServeAgentRequests makes this mapper one of the competing consumers
	// of agent-originated requests (the mapper daemon does).
	ServeAgentRequests bool
	// ServeFailsafe makes this mapper one of the competing consumers of the
	// offline failsafe queue (the mapper daemon does).
	ServeFailsafe bool
	// RelayConcurrency bounds the agent-originated and failsafe requests
	// handled at once (default 256).
	RelayConcurrency int
	// Secure turns on secure mode: signed packets, verified senders,
	// sealed payloads (docs/security.md). Nil: plain mode.
	Secure *Secure
	// Logger receives the mapper's logs (default: discard).
	Logger *slog.Logger
}

// advertiseTTL is the expiration of advertise requests.
const advertiseTTL = 10 * time.Second

// Mapper keeps the cluster state and routes requests to agents. Embed it in a
// requester (NewMapper + Run in a goroutine + Request), or run it as a daemon
// with ServeAgentRequests and ServeFailsafe.
type Mapper struct {
	cfg      MapperConfig
	id       string
	instance string // id plus a per-process suffix: names the mapper's queues
	log      *slog.Logger
	link     *link

	replyQueue string // ReplyQueue(instance)

	mu       sync.Mutex
	reg      *registry
	out      map[string]*mcall // outstanding requests by token
	timeouts *deadlines        // the deadlines of the requests in out
	appeared chan struct{}     // closed and replaced whenever an agent (re)registers
	upSince  time.Time         // when the current connection came up

	running atomic.Bool
	rejects counters        // refused by secure mode, by reason
	linkCtx context.Context // set by Run before the link starts
	stats   mapperStats
	relays  sync.WaitGroup
	sem     chan struct{}
}

type mapperStats struct {
	requests, pushes, results, timeouts, noAgent, retries, lost, notDelivered,
	badPackets, relayed, failsafeHeld, registrations, dropped, advertises atomic.Int64
}

// mcall is the mapper's record of an outstanding request.
type mcall struct {
	call
	pkt      *Packet
	opts     requestOptions
	idem     bool
	tried    idSet // every agent it was sent to (excluded from retries)
	attempts int
	sentTo   idSet // agents holding the request now (for pending accounting)
	viaQueue bool  // sent to the failsafe queue, answered by a mapper daemon
	deadline time.Time
	due      int64 // deadline in Unix nanoseconds, for the heap's comparisons
	slot     int   // in the mapper's deadlines heap; -1 when not in it

	// Most requests go to one agent: their sets need no allocation.
	expectBuf, triedBuf, sentToBuf [1]string
	pktBuf                         Packet // pkt, when the request was made here
}

// setup readies the record of request pkt, to be sent to n agents.
func (mc *mcall) setup(pkt *Packet, svc string, o requestOptions, n int) {
	mc.pkt, mc.opts, mc.slot = pkt, o, -1
	mc.token, mc.service, mc.done, mc.onIntermediate = pkt.Token, svc, make(chan struct{}), o.onIntermediate
	if n <= 1 {
		mc.expect, mc.tried, mc.sentTo = mc.expectBuf[:0], mc.triedBuf[:0], mc.sentToBuf[:0]
	} else {
		mc.expect, mc.tried, mc.sentTo = make(idSet, 0, n), make(idSet, 0, n), make(idSet, 0, n)
	}
}

// NewMapper returns a mapper; Run it to connect.
func NewMapper(cfg MapperConfig) (*Mapper, error) {
	if cfg.URL == "" {
		return nil, errors.New("nanite: mapper needs a broker URL")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = DefaultRequestTimeout
	}
	if cfg.Warmup <= 0 {
		cfg.Warmup = time.Second
	}
	if cfg.MaxRetries < 0 {
		cfg.MaxRetries = 0
	} else if cfg.MaxRetries == 0 {
		cfg.MaxRetries = 2
	}
	if cfg.MaxOutstanding <= 0 {
		cfg.MaxOutstanding = 100000
	}
	if cfg.InflightWeight <= 0 {
		cfg.InflightWeight = 1
	}
	if cfg.MaxPayload <= 0 {
		cfg.MaxPayload = DefaultMaxPayload
	}
	if cfg.RelayConcurrency <= 0 {
		cfg.RelayConcurrency = 256
	}
	id := cfg.Identity
	if id == "" {
		id = NewIdentity("mapper")
	}
	if !ValidIdentity(id) {
		return nil, fmt.Errorf("nanite: invalid mapper identity %q", id)
	}
	if err := cfg.Secure.check(id); err != nil {
		return nil, err
	}
	m := &Mapper{
		cfg:      cfg,
		id:       id,
		instance: id + "." + NewIdentity("i")[2:],
		log:      cfg.Logger.With("mapper", id),
		reg:      newRegistry(cfg.InflightWeight),
		out:      map[string]*mcall{},
		timeouts: newDeadlines(),
		appeared: make(chan struct{}),
		sem:      make(chan struct{}, cfg.RelayConcurrency),
	}
	m.replyQueue = ReplyQueue(m.instance)
	m.link = m.newMapperLink()
	return m, nil
}

// Identity is the mapper's identity.
func (m *Mapper) Identity() string { return m.id }

// Ready blocks until the mapper is connected to the broker. It returns an
// error wrapping ErrConnection when the broker refused the mapper for good
// (bad credentials, unknown vhost) or when ctx ends first (naming the last
// connection error).
func (m *Mapper) Ready(ctx context.Context) error { return m.link.awaitUp(ctx) }

// Connected reports whether the mapper is connected to its broker now.
// Requests made while it is not wait for the connection until their
// deadline; a relay that prefers to fail fast (a bridge) checks this first.
func (m *Mapper) Connected() bool { return m.link != nil && m.link.connected() }

// Queue names use the instance name (identity plus a per-process suffix),
// so that several processes can share one identity, as requesters sharing
// one client certificate do.
func (m *Mapper) stateQueue(kind string) string { return "nanite.mapper." + m.instance + "." + kind }

// Run connects and keeps the cluster state until ctx ends. It returns an
// error only when the broker refuses the mapper outright.
func (m *Mapper) Run(ctx context.Context) error {
	if !m.running.CompareAndSwap(false, true) {
		return errors.New("nanite: mapper already running")
	}
	linkCtx, stopLink := context.WithCancel(context.Background())
	defer stopLink()
	m.linkCtx = linkCtx
	linkErr := make(chan error, 1)
	go func() { linkErr <- m.link.run(linkCtx) }()

	reap := time.NewTicker(250 * time.Millisecond)
	defer reap.Stop()
	for {
		select {
		case err := <-linkErr:
			m.failAll(ErrClosed)
			return err
		case <-reap.C:
			m.reap()
		case <-ctx.Done():
			m.link.stopConsuming()
			m.relays.Wait()
			m.failAll(fmt.Errorf("%w: mapper stopped", ErrClosed))
			stopLink()
			<-linkErr
			return nil
		}
	}
}

// newMapperLink builds the mapper's link: its topology and consumers.
func (m *Mapper) newMapperLink() *link {
	consumers := []consumerSpec{
		{Queue: m.stateQueue("registration"), AutoAck: true, Handle: m.handleState},
		{Queue: m.stateQueue("heartbeat"), AutoAck: true, Handle: m.handleState},
		{Queue: ReplyQueue(m.instance), AutoAck: true, Handle: m.handleReply, Bundles: true},
	}
	if m.cfg.ServeAgentRequests {
		consumers = append(consumers, consumerSpec{Queue: QueueMapperRequests, Prefetch: m.cfg.RelayConcurrency, Handle: m.handleRelay})
	}
	if m.cfg.ServeFailsafe {
		consumers = append(consumers, consumerSpec{Queue: QueueOffline, Prefetch: 1000, Handle: m.handleRelay})
	}
	return newLink(linkConfig{
		URL:    m.cfg.URL,
		TLS:    m.cfg.TLS,
		Name:   "nanite-mapper " + m.id,
		Logger: m.log,
		Setup: func(t topology) error {
			if err := declareCommon(t); err != nil {
				return err
			}
			for _, k := range []struct{ q, ex string }{
				{m.stateQueue("registration"), ExchangeRegistration},
				{m.stateQueue("heartbeat"), ExchangeHeartbeat},
			} {
				if err := t.Queue(queueSpec{Name: k.q, Exclusive: true, AutoDelete: true}); err != nil {
					return err
				}
				if err := t.Bind(k.q, k.ex, "", nil); err != nil {
					return err
				}
			}
			return declareReplyQueue(t, m.instance)
		},
		Consumers: consumers,
		OnReturn:  m.handleReturn,
		OnConnect: func() {
			m.mu.Lock()
			m.upSince = time.Now()
			m.mu.Unlock()
			go m.advertiseAll(m.linkCtx)
		},
	})
}

// advertiseAll asks every agent to register again, so that a new mapper
// learns the cluster at once instead of one heartbeat at a time.
func (m *Mapper) advertiseAll(ctx context.Context) {
	p := &Packet{Kind: KindAdvertise, From: m.id}
	body, err := p.Encode()
	if err == nil {
		body, err = m.cfg.Secure.wrap(body, false)
	}
	if err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	// A short expiration: an advertise request left in the queue of an
	// agent that is gone must not pile up for its return.
	if err := m.link.publish(ctx, message{Exchange: ExchangeAdvertise, Body: body, Type: string(KindAdvertise), Expiration: advertiseTTL}); err != nil {
		m.log.Warn("advertise request", "err", err)
	}
}

func (m *Mapper) timeoutFor(s *AgentState) time.Duration {
	if m.cfg.AgentTimeout > 0 {
		return m.cfg.AgentTimeout
	}
	hb := s.Heartbeat
	if hb <= 0 {
		hb = DefaultHeartbeatInterval
	}
	return max(3*hb, time.Second)
}

// reap drops agents that have gone silent.
func (m *Mapper) reap() {
	now := time.Now()
	m.mu.Lock()
	ids := m.reg.expired(now, m.timeoutFor)
	m.mu.Unlock()
	for _, id := range ids {
		m.log.Warn("agent timed out", "agent", id)
		m.stats.dropped.Add(1)
		m.dropAgent(id, "stopped sending heartbeats")
	}
}

// dropAgent forgets an agent and deals with the requests it held: retried
// elsewhere when idempotent, failed with ErrAgentLost otherwise.
func (m *Mapper) dropAgent(id, why string) {
	m.mu.Lock()
	if m.reg.remove(id) == nil {
		m.mu.Unlock()
		return
	}
	var affected []*mcall
	for _, mc := range m.out {
		if mc.sentTo.has(id) {
			affected = append(affected, mc)
		}
	}
	m.mu.Unlock()
	for _, mc := range affected {
		m.agentGone(mc, id, CodeAgentLost, fmt.Sprintf("agent %s %s while holding the request; it may or may not have run", id, why))
	}
}

// agentGone handles one request whose agent can no longer answer.
func (m *Mapper) agentGone(mc *mcall, id, code, msg string) {
	m.mu.Lock()
	if !mc.sentTo.has(id) {
		m.mu.Unlock()
		return
	}
	mc.sentTo.del(id)
	m.reg.addPending(id, -1)
	canRetry := mc.idem && mc.opts.selector != SelectAll && mc.opts.target == "" && mc.attempts < m.cfg.MaxRetries
	var next []*agentEntry
	if canRetry {
		next = m.reg.pick(mc.service, &mc.opts, mc.tried.set())
	}
	if len(next) == 1 {
		e := next[0]
		mc.attempts++
		mc.tried.add(e.Identity)
		mc.sentTo.add(e.Identity)
		m.reg.addPending(e.Identity, 1)
		mc.call.mu.Lock()
		mc.expect.del(id)
		mc.expect.add(e.Identity)
		mc.call.mu.Unlock()
		m.mu.Unlock()
		m.stats.retries.Add(1)
		m.log.Info("retrying idempotent request on another agent", "token", mc.token, "service", mc.service, "lost", id, "agent", e.Identity)
		pkt := *mc.pkt
		pkt.Attempt = mc.attempts
		if err := m.send(context.Background(), mc.deadline, &pkt, e.Identity, e.Queue); err != nil {
			m.agentGone(mc, e.Identity, CodeNotDelivered, err.Error())
		}
		return
	}
	m.mu.Unlock()
	if code == CodeAgentLost {
		m.stats.lost.Add(1)
	} else {
		m.stats.notDelivered.Add(1)
	}
	mc.complete(Result{Agent: id, Err: &RemoteError{Agent: id, Code: code, Message: msg}})
}

func (m *Mapper) failAll(err error) {
	m.mu.Lock()
	all := make([]*mcall, 0, len(m.out))
	for _, mc := range m.out {
		all = append(all, mc)
	}
	m.mu.Unlock()
	for _, mc := range all {
		mc.fail(err)
	}
}

// handleState processes registration-fanout and heartbeat-fanout packets.
func (m *Mapper) handleState(d delivery) {
	in, err := m.cfg.Secure.open(d.Body, m.cfg.MaxPayload, security.RoleAgent)
	p := in.pkt
	if err != nil {
		m.stats.badPackets.Add(1)
		reason := rejectReason(err)
		m.rejects.add(reason)
		level := slog.LevelWarn
		if errors.Is(err, security.ErrUnknownSigner) {
			level = slog.LevelDebug // expected before an agent's registration; handled below
		}
		m.log.Log(context.Background(), level, "rejected state packet", "reason", reason, "err", err)
		if errors.Is(err, security.ErrUnknownSigner) {
			// A heartbeat without its certificate from an agent this
			// mapper has not seen register: ask it to register again.
			if env, perr := security.ParseEnvelope(d.Body); perr == nil && len(env.Cert) == 0 && ValidIdentity(env.Signer) {
				m.stats.advertises.Add(1)
				go m.askAdvertise(env.Signer)
			}
		}
		return
	}
	now := time.Now()
	switch p.Kind {
	case KindRegister:
		if !ValidIdentity(p.Identity) {
			m.stats.badPackets.Add(1)
			m.log.Warn("register with invalid identity", "identity", p.Identity)
			return
		}
		st := AgentState{Identity: p.Identity, Queue: AgentQueue(p.Identity), Services: p.Services, Tags: p.Tags,
			InFlight: p.InFlight, Version: p.AgentVer, Heartbeat: time.Duration(p.Interval) * time.Millisecond}
		if p.Status != nil {
			st.Status = *p.Status
		}
		if in.peer != nil {
			st.sealKey = in.peer.SealKey
		}
		m.mu.Lock()
		isNew := m.reg.upsert(st, now)
		close(m.appeared)
		m.appeared = make(chan struct{})
		m.mu.Unlock()
		m.stats.registrations.Add(1)
		if isNew {
			m.log.Info("agent registered", "agent", p.Identity, "services", len(p.Services), "tags", p.Tags)
		}
	case KindUnregister:
		m.log.Info("agent unregistered", "agent", p.Identity)
		m.dropAgent(p.Identity, "left the cluster")
	case KindHeartbeat:
		status := 0.0
		if p.Status != nil {
			status = *p.Status
		}
		m.mu.Lock()
		known := m.reg.heartbeat(p.Identity, status, p.InFlight, now)
		m.mu.Unlock()
		if !known && ValidIdentity(p.Identity) {
			// Nanite's self-healing: an agent we do not know is asked to
			// advertise itself again.
			m.stats.advertises.Add(1)
			go m.askAdvertise(p.Identity)
		}
	default:
		m.stats.badPackets.Add(1)
	}
}

func (m *Mapper) askAdvertise(id string) {
	body, err := (&Packet{Kind: KindAdvertise, From: m.id}).Encode()
	if err == nil {
		body, err = m.cfg.Secure.wrap(body, false)
	}
	if err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := m.link.publish(ctx, message{Key: AgentQueue(id), Body: body, Type: string(KindAdvertise), Expiration: advertiseTTL}); err != nil {
		m.log.Warn("advertise request", "agent", id, "err", err)
	}
}

// Agents returns the mapper's view of the cluster, sorted by identity.
func (m *Mapper) Agents() []AgentState {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.reg.snapshot()
}

// AnyAgent reports whether some agent offering service satisfies match,
// looking at the agents of that service only and stopping at the first
// match (a relay's "is there an agent other than ..." check, cheap with
// many agents). match runs with the mapper's lock held: it must not call
// the mapper, and must not keep a.
func (m *Mapper) AnyAgent(service string, match func(a *AgentState) bool) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	set := m.reg.services[service]
	if set == nil {
		return false
	}
	for _, e := range set.list {
		if match(&e.AgentState) {
			return true
		}
	}
	return false
}

// Agent returns the state of the agent with identity id.
func (m *Mapper) Agent(id string) (AgentState, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e := m.reg.agents[id]
	if e == nil {
		return AgentState{}, false
	}
	st := e.AgentState
	st.Services = append([]ServiceInfo(nil), st.Services...)
	st.Tags = append([]string(nil), st.Tags...)
	return st, true
}

// WaitForAgents blocks until at least n agents offer service (any agent
// when service is empty), or ctx ends.
func (m *Mapper) WaitForAgents(ctx context.Context, service string, n int) error {
	for {
		m.mu.Lock()
		have := len(m.reg.agents)
		if service != "" {
			have = 0
			if set := m.reg.services[service]; set != nil {
				have = len(set.list)
			}
		}
		ch := m.appeared
		m.mu.Unlock()
		if have >= n {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("nanite: waiting for %d agents offering %q (have %d): %w", n, service, have, ctx.Err())
		}
	}
}

// Stats returns the mapper's counters.
func (m *Mapper) Stats() map[string]int64 {
	s := &m.stats
	m.mu.Lock()
	agents, outstanding := len(m.reg.agents), len(m.out)
	m.mu.Unlock()
	out := map[string]int64{
		"agents": int64(agents), "outstanding": int64(outstanding),
		"requests": s.requests.Load(), "pushes": s.pushes.Load(), "results": s.results.Load(),
		"timeouts": s.timeouts.Load(), "no_agent": s.noAgent.Load(), "retries": s.retries.Load(),
		"agent_lost": s.lost.Load(), "not_delivered": s.notDelivered.Load(), "bad_packets": s.badPackets.Load(),
		"relayed": s.relayed.Load(), "failsafe_held": s.failsafeHeld.Load(), "registrations": s.registrations.Load(),
		"agents_dropped": s.dropped.Load(), "advertise_requests": s.advertises.Load(),
	}
	m.rejects.into(out, "rejected_")
	m.cfg.Secure.sessionStats(out)
	return out
}

// Request sends a request for service and waits for its results. With the
// default selector it goes to the least-loaded agent; SelectAll collects one
// result per agent. It returns a *TimeoutError (with the results that did
// arrive) when the deadline passes, ErrNoAgent at once when no agent offers
// the service (unless OfflineFailsafe), and a *RemoteError when the single
// chosen agent answered with an error.
func (m *Mapper) Request(ctx context.Context, service string, payload any, opts ...RequestOption) (*Response, error) {
	o, err := buildOptions(opts)
	if err != nil {
		return nil, err
	}
	body, err := marshalPayload(payload)
	if err != nil {
		return nil, err
	}
	if len(o.origin) > 0 {
		env, err := security.ParseEnvelope(o.origin)
		if err != nil {
			return nil, fmt.Errorf("nanite: origin: %w", err)
		}
		orig, err := DecodePacket(env.Body, m.cfg.MaxPayload)
		if err != nil {
			return nil, fmt.Errorf("nanite: origin: %w", err)
		}
		return m.request(ctx, KindRequest, service, body, o, orig.From, orig.Token, o.origin, false)
	}
	return m.request(ctx, KindRequest, service, body, o, m.id, "", nil, false)
}

// Push sends a request without waiting for any result (fire and forget). It
// returns once the broker has it (for a persistent push, once confirmed).
func (m *Mapper) Push(ctx context.Context, service string, payload any, opts ...RequestOption) error {
	o, err := buildOptions(opts)
	if err != nil {
		return err
	}
	body, err := marshalPayload(payload)
	if err != nil {
		return err
	}
	_, err = m.request(ctx, KindPush, service, body, o, m.id, "", nil, false)
	return err
}

// request is the common path of requests, pushes and relays. from is the
// original requester; token is reused when relaying (empty: new). When
// holdForAgent is set, a missing agent is waited for until the deadline (the
// failsafe queue's consumer does this).
func (m *Mapper) request(ctx context.Context, kind Kind, service string, body json.RawMessage, o requestOptions, from, token string, origin json.RawMessage, holdForAgent bool) (*Response, error) {
	if !m.running.Load() || m.link == nil {
		return nil, fmt.Errorf("%w: mapper is not running", ErrClosed)
	}
	svc, err := NormalizeService(service)
	if err != nil {
		return nil, err
	}
	if len(body) > m.cfg.MaxPayload {
		return nil, fmt.Errorf("%w: %d bytes exceeds the limit of %d", ErrTooLarge, len(body), m.cfg.MaxPayload)
	}
	timeout := o.timeout
	if timeout <= 0 {
		timeout = m.cfg.RequestTimeout
	}
	// The deadline: the earlier of ctx's and the timeout. The request's
	// wait ends there through m.timeouts (one timer for every request), and
	// a context with this deadline is made only where something may wait
	// for the broker.
	deadline := time.Now().Add(timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	if err := ctx.Err(); err != nil {
		// As wait would say, without sending anything.
		if errors.Is(err, context.DeadlineExceeded) {
			m.stats.timeouts.Add(1)
			return nil, &TimeoutError{Service: svc}
		}
		return nil, fmt.Errorf("nanite: request %s: %w", svc, context.Cause(ctx))
	}
	if token == "" {
		token = newToken()
	}
	// A request's record holds its packet: one allocation for both.
	var mc *mcall
	var pkt *Packet
	if kind == KindRequest {
		mc = new(mcall)
		pkt = &mc.pktBuf
	} else {
		pkt = new(Packet)
	}
	*pkt = Packet{Kind: kind, Type: svc, Payload: body, From: from, Token: token,
		Selector: o.selector, Target: o.target, Tags: o.tags, TagMatch: o.tagMatch,
		Persistent: o.persistent, Deadline: unixMilli(deadline), Origin: origin, Hops: o.hops}
	if kind == KindRequest {
		pkt.ReplyTo = m.replyQueue
		pkt.Bundles = true // handleReply's consumer splits bundles
		m.stats.requests.Add(1)
	} else {
		m.stats.pushes.Add(1)
	}

	m.mu.Lock()
	if kind == KindRequest && len(m.out) >= m.cfg.MaxOutstanding {
		m.mu.Unlock()
		return nil, fmt.Errorf("%w (%d)", ErrBusy, m.cfg.MaxOutstanding)
	}
	var buf [1]*agentEntry
	targets, err := m.pickLocked(ctx, deadline, buf[:0], svc, &o, holdForAgent)
	if err != nil {
		m.mu.Unlock()
		if errors.Is(err, ErrNoAgent) {
			m.stats.noAgent.Add(1)
			if o.failsafe && !holdForAgent {
				return m.toFailsafe(ctx, deadline, pkt, o)
			}
		}
		return nil, err
	}
	var idBuf, queueBuf [1]string
	ids, queues := idBuf[:0], queueBuf[:0]
	for _, e := range targets {
		ids, queues = append(ids, e.Identity), append(queues, e.Queue)
	}
	if mc != nil {
		mc.setup(pkt, svc, o, len(ids))
		mc.byAgent = true
		mc.idem = targets[0].idem[svc]
		mc.deadline = deadline
		for _, id := range ids {
			mc.expect.add(id)
			mc.tried.add(id)
			mc.sentTo.add(id)
			m.reg.addPending(id, 1)
		}
		m.out[token] = mc
	}
	m.mu.Unlock()
	if mc != nil {
		m.timeouts.add(mc)
		defer m.finishCall(mc)
	}

	for i, id := range ids {
		if err := m.send(ctx, deadline, pkt, id, queues[i]); err != nil {
			if mc == nil {
				return nil, err
			}
			m.agentGone(mc, id, CodeNotDelivered, err.Error())
		}
	}
	if mc == nil {
		return nil, nil
	}
	resp, err := mc.wait(ctx)
	if err != nil {
		var te *TimeoutError
		if errors.As(err, &te) {
			m.stats.timeouts.Add(1)
		}
		return resp, err
	}
	if o.selector != SelectAll && len(resp.Results) == 1 && resp.Results[0].Err != nil {
		return resp, resp.Results[0].Err
	}
	return resp, nil
}

// pickLocked selects targets, appending them to dst; with holdForAgent (or
// during warmup) it waits for an agent to appear, until deadline at most.
// m.mu is held on entry and on return.
func (m *Mapper) pickLocked(ctx context.Context, deadline time.Time, dst []*agentEntry, svc string, o *requestOptions, holdForAgent bool) ([]*agentEntry, error) {
	if targets := m.reg.pickInto(dst, svc, o, nil); len(targets) > 0 {
		return targets, nil
	}
	ctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	for {
		var wait <-chan time.Time
		if !holdForAgent {
			warm := time.Until(m.upSince.Add(m.cfg.Warmup))
			if m.upSince.IsZero() {
				warm = m.cfg.Warmup
			}
			if warm <= 0 {
				break
			}
			wait = time.After(warm)
		}
		ch := m.appeared
		m.mu.Unlock()
		select {
		case <-ch:
			m.mu.Lock()
			if targets := m.reg.pickInto(dst, svc, o, nil); len(targets) > 0 {
				return targets, nil
			}
			continue
		case <-wait:
			m.mu.Lock()
			if targets := m.reg.pickInto(dst, svc, o, nil); len(targets) > 0 {
				return targets, nil
			}
		case <-ctx.Done():
			m.mu.Lock()
			return nil, &TimeoutError{Service: svc, Detail: "no agent offering it appeared"}
		}
		break
	}
	what := "registered agent offers " + svc
	if strings.HasPrefix(o.target, TargetXMPP) {
		what = fmt.Sprintf("gateway agent (a bridge's proxy) reaches %s with %s", o.target, svc)
	} else if o.target != "" {
		what = fmt.Sprintf("agent with identity %s offers %s", o.target, svc)
	}
	if len(o.tags) > 0 {
		what += fmt.Sprintf(" with tags %v (%s)", o.tags, o.tagMatch)
	}
	return nil, fmt.Errorf("%w: no %s", ErrNoAgent, what)
}

// send publishes a request or push packet to one agent's queue, waiting
// for the broker (while disconnected, or for a persistent request's
// confirm) until deadline at most.
func (m *Mapper) send(ctx context.Context, deadline time.Time, pkt *Packet, agent, queue string) error {
	if sec := m.cfg.Secure; sec != nil {
		// Signed for this agent only; sealed to it when asked.
		cp := *pkt
		cp.To = agent
		if sec.Seal && len(cp.Payload) > 0 {
			m.mu.Lock()
			var key security.SealKey
			if e := m.reg.agents[agent]; e != nil {
				key = e.sealKey
			}
			m.mu.Unlock()
			sealed, err := sealPayload(key, cp.Payload, cp.Token, cp.Type, agent)
			if err != nil {
				return fmt.Errorf("nanite: seal request for agent %s: %w", agent, err)
			}
			cp.Sealed, cp.Payload = sealed, nil
		}
		pkt = &cp
	}
	var body []byte
	var err error
	if m.cfg.Secure == nil {
		// The encoding goes to a buffer of a pool: nothing holds on to it
		// once it is published.
		buf := sendBuffers.Get().(*[]byte)
		defer func() {
			if cap(*buf) <= maxPooledSendBuffer {
				sendBuffers.Put(buf)
			}
		}()
		body, err = appendMarshalPacket((*buf)[:0], pkt)
		if err == nil {
			*buf = body[:0]
		}
	} else {
		body, err = m.cfg.Secure.encodeRequest(pkt, agent)
	}
	if err != nil {
		return err
	}
	// No nanite-reply-to header (docs/protocol.md): a request that expires
	// in an agent's queue expires at its deadline, when this mapper stops
	// waiting for it anyway, so routing it back would tell nothing; and
	// the header table is the costliest property to encode and decode.
	msg := message{Key: queue, Body: body, CorrelationID: pkt.Token, ReplyTo: pkt.ReplyTo,
		Persistent: pkt.Persistent, Mandatory: true,
		Expiration: time.Until(deadline)}
	return m.link.publishBy(ctx, deadline, 0, msg)
}

// sendBuffers are the buffers Mapper.send encodes requests into; buffers
// that grew beyond maxPooledSendBuffer are left to the garbage collector.
var sendBuffers = sync.Pool{New: func() any { return new([]byte) }}

const maxPooledSendBuffer = 64 << 10

// toFailsafe parks a request in the offline queue, where a mapper daemon
// holds it until an agent offering the service appears.
func (m *Mapper) toFailsafe(ctx context.Context, deadline time.Time, pkt *Packet, o requestOptions) (*Response, error) {
	ctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	pkt.Failsafe = true
	body, err := pkt.encodeTrusted()
	if err == nil {
		body, err = m.cfg.Secure.wrap(body, false)
	}
	if err != nil {
		return nil, err
	}
	var mc *mcall
	if pkt.Kind == KindRequest {
		mc = new(mcall)
		mc.setup(pkt, pkt.Type, o, 1)
		mc.viaQueue = true
		mc.deadline = deadline
		m.mu.Lock()
		m.out[pkt.Token] = mc
		m.mu.Unlock()
		defer m.finishCall(mc)
	}
	msg := message{Key: QueueOffline, Body: body, CorrelationID: pkt.Token, ReplyTo: pkt.ReplyTo,
		Persistent: pkt.Persistent, Mandatory: true,
		Expiration: time.Until(deadline)}
	if pkt.ReplyTo != "" {
		// Expired there, it comes back through nanite.dead (handleReply).
		msg.Headers = map[string]any{HeaderReplyTo: pkt.ReplyTo}
	}
	if err := m.link.publish(ctx, msg); err != nil {
		return nil, err
	}
	m.log.Info("request held in the offline failsafe queue", "service", pkt.Type, "token", pkt.Token)
	if mc == nil {
		return nil, nil
	}
	resp, err := mc.wait(ctx)
	var te *TimeoutError
	if errors.As(err, &te) {
		te.Detail = "held in the offline failsafe queue; no agent offering it appeared"
		m.stats.timeouts.Add(1)
	}
	if err == nil && len(resp.Results) == 1 && resp.Results[0].Err != nil && o.selector != SelectAll {
		return resp, resp.Results[0].Err
	}
	return resp, err
}

// finishCall removes a finished call and releases its pending counts.
func (m *Mapper) finishCall(mc *mcall) {
	m.timeouts.remove(mc)
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.out, mc.token)
	for _, id := range mc.sentTo {
		m.reg.addPending(id, -1)
	}
	mc.sentTo = nil
}

// handleReply processes results, intermediate results and dead-lettered
// requests arriving on the mapper's reply queue.
func (m *Mapper) handleReply(d delivery) {
	var p *Packet
	if d.DeadLettered {
		var err error
		if p, err = m.cfg.Secure.openOwn(d.Body, m.cfg.MaxPayload); err != nil {
			m.rejects.add(rejectReason(err))
			return
		}
	} else {
		// Nothing keeps the packet once the reply is handled (results copy
		// what they need): it comes from a pool.
		pp := replyPackets.Get().(*Packet)
		defer func() {
			*pp = Packet{}
			replyPackets.Put(pp)
		}()
		in, err := m.cfg.Secure.openResultInto(pp, d.Body, m.cfg.MaxPayload, security.RoleAgent, security.RoleMapper, security.RoleBridge)
		if err != nil {
			m.stats.badPackets.Add(1)
			reason := rejectReason(err)
			m.rejects.add(reason)
			m.log.Warn("rejected reply", "reason", reason, "err", err)
			return
		}
		p = in.pkt
		if m.sessionReply(in) {
			return
		}
		if p.Sealed != nil {
			if m.cfg.Secure == nil {
				return
			}
			info := security.SealInfo(p.Token, "result", p.From)
			if p.Kind == KindIntermediate {
				info = security.SealInfo(p.Token, "intermediate", p.From, p.Key)
			}
			payload, err := m.cfg.Secure.Identity.OpenSealed(info, p.Sealed)
			if err != nil {
				m.rejects.add(rejectReason(err))
				m.log.Warn("cannot open sealed reply", "from", p.From, "err", err)
				return
			}
			p.Payload, p.Sealed = payload, nil
		}
	}
	m.mu.Lock()
	mc := m.out[p.Token]
	if mc != nil && !d.DeadLettered && p.Kind == KindResult && len(p.Results) == 0 &&
		(p.Error == nil || p.Error.Code != CodeShutdown) && mc.sentTo.has(p.From) {
		// The agent's answer: it no longer holds the request (under the
		// same lock as the lookup, the common case).
		mc.sentTo.del(p.From)
		m.reg.addPending(p.From, -1)
	}
	m.mu.Unlock()
	if mc == nil {
		return // late answer to a finished request
	}
	if d.DeadLettered || p.Kind == KindRequest {
		// The request expired in a queue without reaching an agent.
		if mc.viaQueue {
			mc.fail(&TimeoutError{Service: mc.service, Detail: "held in the offline failsafe queue; no agent offering it appeared"})
			return
		}
		for _, id := range m.holders(mc) {
			m.agentGone(mc, id, CodeNotDelivered, fmt.Sprintf("request expired (%s) in the queue of agent %s", d.DeathReason, id))
		}
		return
	}
	switch p.Kind {
	case KindIntermediate:
		if mc.onIntermediate != nil {
			mc.onIntermediate(Intermediate{Agent: p.From, Key: p.Key, Payload: p.Payload})
		}
	case KindResult:
		m.stats.results.Add(1)
		if p.Error != nil && p.Error.Code == CodeShutdown && len(p.Results) == 0 {
			// The agent stopped before running it: retry when idempotent.
			m.agentGone(mc, p.From, CodeShutdown, p.Error.Message)
			return
		}
		m.mu.Lock()
		if mc.sentTo.has(p.From) {
			mc.sentTo.del(p.From)
			m.reg.addPending(p.From, -1)
		}
		m.mu.Unlock()
		if len(p.Results) > 0 {
			if mc.completeFor(p.From, p.Results) {
				return // a gateway answered for several agents (MultiResult)
			}
			rs := make([]Result, 0, len(p.Results))
			for _, r := range p.Results {
				rs = append(rs, Result{Agent: r.Agent, Payload: r.Payload, Err: remoteErr(r.Agent, r.Error)})
			}
			mc.completeAll(rs)
			return
		}
		mc.complete(Result{Agent: p.From, Payload: p.Payload, Err: remoteErr(p.From, p.Error)})
	}
}

// replyPackets are the packets Mapper.handleReply decodes into.
var replyPackets = sync.Pool{New: func() any { return new(Packet) }}

func (m *Mapper) holders(mc *mcall) []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]string(nil), mc.sentTo...)
}

// handleReturn deals with a request the broker could not route (the agent's
// queue is gone).
func (m *Mapper) handleReturn(r returned) {
	m.mu.Lock()
	mc := m.out[r.CorrelationID]
	m.mu.Unlock()
	if mc == nil {
		return
	}
	if r.Key == QueueOffline {
		mc.fail(fmt.Errorf("%w: offline failsafe queue missing: %s", ErrNotDelivered, r.Reason))
		return
	}
	const prefix = "nanite.agent."
	if len(r.Key) > len(prefix) {
		id := r.Key[len(prefix):]
		m.agentGone(mc, id, CodeNotDelivered, fmt.Sprintf("queue of agent %s is gone (%s)", id, r.Reason))
	}
}

// idSet is a small set of agent identities; requests usually involve one.
type idSet []string

func (s idSet) has(id string) bool { return slices.Contains(s, id) }

func (s *idSet) add(id string) {
	if !s.has(id) {
		*s = append(*s, id)
	}
}

func (s *idSet) del(id string) {
	if i := slices.Index(*s, id); i >= 0 {
		*s = slices.Delete(*s, i, i+1)
	}
}

// set returns the identities as a map, for the rare retry path.
func (s idSet) set() map[string]bool {
	m := make(map[string]bool, len(s))
	for _, id := range s {
		m[id] = true
	}
	return m
}
