package nanite

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	"runtime/debug"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nanite-go/nanite/security"
)

// Version is the version of this implementation, reported by agents.
const Version = "0.1.0"

// Defaults.
const (
	DefaultHeartbeatInterval = 2 * time.Second
	DefaultPrefetch          = 16
	DefaultMaxPayload        = 1 << 20
	DefaultShutdownGrace     = 10 * time.Second
	DefaultRequestTimeout    = 30 * time.Second
	DefaultDedupeSize        = 10000
	DefaultDedupeBytes       = 4 << 20
	DefaultClockSkew         = time.Second
)

// AgentConfig configures an agent. Only URL is required.
type AgentConfig struct {
	// URL of the broker and vhost, amqp://user:pass@host:port/vhost.
	URL string
	// TLS configures amqps:// connections.
	TLS *tls.Config
	// Identity of the agent. When empty it is read from (or created in)
	// DataDir, or generated afresh when DataDir is empty too.
	Identity string
	// DataDir keeps the agent's identity across restarts, so that it finds
	// its durable queue again.
	DataDir string
	// Tags describe the agent for tag-filtered requests.
	Tags []string
	// HeartbeatInterval between heartbeats (default 2 s). Mappers drop an
	// agent silent for three intervals.
	HeartbeatInterval time.Duration
	// Prefetch is how many requests the agent holds and runs at once
	// (default 16): one slow agent is never flooded beyond it.
	Prefetch int
	// Status reports the agent's load for least-loaded selection (default:
	// the machine's one-minute load average).
	Status func() float64
	// MaxPayload is the largest packet accepted, in bytes (default 1 MiB).
	MaxPayload int
	// ShutdownGrace is how long running handlers may finish after shutdown
	// begins before their contexts are cancelled (default 10 s).
	ShutdownGrace time.Duration
	// RequestTimeout is the default deadline of requests the agent makes
	// itself (default 30 s).
	RequestTimeout time.Duration
	// ClockSkew is the tolerance applied to request deadlines, which were
	// set by the requester's clock (default 1 s): a request expires here
	// only ClockSkew after its deadline, and its handler runs until then.
	ClockSkew time.Duration
	// DedupeSize bounds the cache of recently handled request tokens
	// (default 10000).
	DedupeSize int
	// DedupeBytes bounds the answers that cache keeps, in bytes (default
	// 4 MiB): beyond it the oldest tokens are forgotten, as beyond
	// DedupeSize. Kept answers are heap the garbage collector walks past
	// and fresh memory every new answer is written to; 10000 answers of
	// 10 KiB each (100 MB) made every request slower.
	DedupeBytes int
	// Secure turns on secure mode: signed packets, policy, sealing
	// (docs/security.md). Nil: plain mode.
	Secure *Secure
	// Logger receives the agent's logs (default: discard).
	Logger *slog.Logger
}

// Agent hosts actors and serves their methods from its queue.
type Agent struct {
	cfg AgentConfig
	id  string
	log *slog.Logger
	// methods are the services by name; replaced whole by SetActors
	// (copy on write), so readers take the map without a lock.
	methods atomic.Pointer[map[string]*agentMethod]
	// reregister asks Run to register again (SetActors).
	reregister chan struct{}
	registerMu sync.Mutex
	started    atomic.Bool
	link       *link
	bundler    *replyBundler // sends answers made together as bundles
	calls      *calls
	dedupe     *dedupe
	stats      agentStats
	rejects    counters // refused by secure mode, by reason
	inflight   atomic.Int64
	start      time.Time

	linkCtx       context.Context // set by Run before the link starts
	handlerCtx    context.Context
	cancelHandler context.CancelCauseFunc
	handlers      sync.WaitGroup
	stopMu        sync.Mutex
	stopping      bool
}

type agentStats struct {
	received, succeeded, failed, panics, badPackets, unknown, expired,
	duplicates, intermediates, pushes, tooLarge, unauthorized atomic.Int64
}

// NewAgent returns an agent; AddActor its actors, then Run it.
func NewAgent(cfg AgentConfig) (*Agent, error) {
	if cfg.URL == "" {
		return nil, errors.New("nanite: agent needs a broker URL")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.HeartbeatInterval <= 0 {
		cfg.HeartbeatInterval = DefaultHeartbeatInterval
	}
	if cfg.Prefetch <= 0 {
		cfg.Prefetch = DefaultPrefetch
	}
	if cfg.MaxPayload <= 0 {
		cfg.MaxPayload = DefaultMaxPayload
	}
	if cfg.ShutdownGrace <= 0 {
		cfg.ShutdownGrace = DefaultShutdownGrace
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = DefaultRequestTimeout
	}
	if cfg.ClockSkew == 0 {
		cfg.ClockSkew = DefaultClockSkew
	} else if cfg.ClockSkew < 0 {
		cfg.ClockSkew = 0
	}
	if cfg.DedupeSize <= 0 {
		cfg.DedupeSize = DefaultDedupeSize
	}
	if cfg.DedupeBytes <= 0 {
		cfg.DedupeBytes = DefaultDedupeBytes
	}
	if cfg.Status == nil {
		cfg.Status = LoadAverage
	}
	id := cfg.Identity
	if id == "" && cfg.DataDir != "" {
		var err error
		if id, err = LoadIdentity(cfg.DataDir, "agent"); err != nil {
			return nil, err
		}
	}
	if id == "" {
		id = NewIdentity("agent")
	}
	if !ValidIdentity(id) {
		return nil, fmt.Errorf("nanite: invalid agent identity %q", id)
	}
	if err := cfg.Secure.check(id); err != nil {
		return nil, err
	}
	a := &Agent{
		cfg:        cfg,
		id:         id,
		log:        cfg.Logger.With("agent", id),
		calls:      newCalls(),
		dedupe:     newDedupe(cfg.DedupeSize, cfg.DedupeBytes),
		reregister: make(chan struct{}, 1),
	}
	a.methods.Store(&map[string]*agentMethod{})
	a.AddActor(a.builtinActor())
	a.bundler = newReplyBundler(nil, a.log, a.cfg.RequestTimeout)
	a.link = a.newAgentLink()
	a.bundler.link = a.link
	return a, nil
}

// Identity is the agent's identity.
func (a *Agent) Identity() string { return a.id }

// Ready blocks until the agent is connected (and has declared its queue).
// It returns an error wrapping ErrConnection when the broker refused the
// agent for good or when ctx ends first.
func (a *Agent) Ready(ctx context.Context) error { return a.link.awaitUp(ctx) }

// AddActor adds the methods of actor to the agent. It panics when a service
// is already registered or when the agent is already running.
func (a *Agent) AddActor(actor *Actor) {
	if a.started.Load() {
		panic("nanite: AddActor after Run")
	}
	addMethods(*a.methods.Load(), actor)
}

func addMethods(methods map[string]*agentMethod, actor *Actor) {
	for name, m := range actor.methods {
		svc := "/" + actor.name + "/" + name
		if _, dup := methods[svc]; dup {
			panic("nanite: service " + svc + " registered twice")
		}
		am := &agentMethod{Method: m}
		am.slow.Store(true) // until a run shows it quick
		methods[svc] = am
	}
}

// SetActors replaces the agent's actors (the built-in /nanite/* services
// stay), also while it runs: it then registers again, so that mappers
// route by the new set at once. A request already queued for a service
// that is gone is answered unknown_service. It panics when a service is
// given twice. (A bridge's proxy agent follows the remote services so.)
func (a *Agent) SetActors(actors ...*Actor) {
	m := map[string]*agentMethod{}
	for name, meth := range *a.methods.Load() {
		if strings.HasPrefix(name, "/"+BuiltinActor+"/") {
			m[name] = meth
		}
	}
	for _, act := range actors {
		addMethods(m, act)
	}
	a.methods.Store(&m)
	select {
	case a.reregister <- struct{}{}:
	default:
	}
}

// Handlers run in the agent queue's delivery loop while they are quick
// (quickHandler: their last run took no longer); a method runs in
// goroutines of its own, as every request did before, until a run shows it
// quick and again after a run that was not, so that handlers that wait (on
// I/O, on other services) still run up to Prefetch at once. When a quick
// method's run keeps the loop longer than handoffBudget after all, the
// loop hands the consumer to a new one within one or two budgets (see
// consumerSpec.Handoff and handoffWatch). The budget weighs how long the
// requests behind such a run wait against how often the watch's timer
// ticks while requests come in: each tick costs a wakeup, and at 5 ms that
// still made quick requests some 3% slower at one outstanding request on
// two cores shared with the broker; at 20 ms it no longer showed.
const (
	quickHandler  = 200 * time.Microsecond
	handoffBudget = 20 * time.Millisecond
)

// agentMethod is a method as one agent serves it.
type agentMethod struct {
	*Method
	// slow is set until a run of the method's handler took at most
	// quickHandler, and whenever one took longer.
	slow atomic.Bool
}

// Services lists the services the agent offers, sorted.
func (a *Agent) Services() []ServiceInfo {
	methods := *a.methods.Load()
	out := make([]ServiceInfo, 0, len(methods))
	for name, m := range methods {
		out = append(out, ServiceInfo{Name: name, Idempotent: m.Idempotent})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Stats returns the agent's counters.
func (a *Agent) Stats() map[string]int64 {
	s := &a.stats
	out := map[string]int64{
		"received":          s.received.Load(),
		"succeeded":         s.succeeded.Load(),
		"failed":            s.failed.Load(),
		"panics":            s.panics.Load(),
		"bad_packets":       s.badPackets.Load(),
		"unknown_service":   s.unknown.Load(),
		"expired":           s.expired.Load(),
		"duplicates":        s.duplicates.Load(),
		"intermediate_sent": s.intermediates.Load(),
		"pushes":            s.pushes.Load(),
		"too_large":         s.tooLarge.Load(),
		"in_flight":         a.inflight.Load(),
		"unauthorized":      s.unauthorized.Load(),
		"bundles_sent":      a.bundler.bundles.Load(),
		"bundled_results":   a.bundler.bundled.Load(),
	}
	a.rejects.into(out, "rejected_")
	a.cfg.Secure.sessionStats(out)
	return out
}

// Run connects, registers and serves until ctx ends, then shuts down
// gracefully: it stops taking requests, lets running handlers finish within
// ShutdownGrace, unregisters and disconnects. Run returns an error only when
// the broker refuses the agent outright (bad credentials or vhost).
func (a *Agent) Run(ctx context.Context) error {
	if !a.started.CompareAndSwap(false, true) {
		return errors.New("nanite: agent already running")
	}
	a.start = time.Now()
	a.handlerCtx, a.cancelHandler = context.WithCancelCause(context.Background())
	linkCtx, stopLink := context.WithCancel(context.Background())
	defer stopLink()

	a.linkCtx = linkCtx
	linkErr := make(chan error, 1)
	go func() { linkErr <- a.link.run(linkCtx) }()

	hb := time.NewTicker(a.cfg.HeartbeatInterval)
	defer hb.Stop()
	for {
		select {
		case err := <-linkErr:
			a.cancelHandler(ErrClosed)
			return err
		case <-hb.C:
			a.heartbeat(linkCtx)
		case <-a.reregister:
			a.log.Debug("services changed", "connected", a.link.connected())
			if a.link.connected() {
				go a.register(linkCtx)
			}
		case <-ctx.Done():
			a.shutdown(linkCtx)
			stopLink()
			<-linkErr
			return nil
		}
	}
}

// newAgentLink builds the agent's link: its topology and consumers.
func (a *Agent) newAgentLink() *link {
	return newLink(linkConfig{
		URL:    a.cfg.URL,
		TLS:    a.cfg.TLS,
		Name:   "nanite-agent " + a.id,
		Logger: a.log,
		Setup: func(t topology) error {
			if err := declareCommon(t); err != nil {
				return err
			}
			if err := t.Queue(agentQueueSpec(a.id)); err != nil {
				return err
			}
			if err := t.Bind(AgentQueue(a.id), ExchangeAdvertise, "", nil); err != nil {
				return err
			}
			return declareReplyQueue(t, a.id)
		},
		Consumers: []consumerSpec{
			{Queue: AgentQueue(a.id), Prefetch: a.cfg.Prefetch, Handle: a.handleDelivery, Handoff: handoffBudget, BatchAcks: true, Bundler: a.bundler},
			{Queue: ReplyQueue(a.id), AutoAck: true, Handle: a.handleReply, Bundles: true},
		},
		OnConnect: func() { go a.register(a.linkCtx) },
	})
}

func (a *Agent) shutdown(linkCtx context.Context) {
	a.log.Info("agent shutting down", "in_flight", a.inflight.Load())
	a.stopMu.Lock()
	a.stopping = true
	a.stopMu.Unlock()
	a.link.stopConsuming()
	done := make(chan struct{})
	go func() { a.handlers.Wait(); close(done) }()
	// Heartbeats go on while running handlers finish, so that mappers
	// keep waiting for their results instead of declaring the agent lost.
	hb := time.NewTicker(a.cfg.HeartbeatInterval)
	defer hb.Stop()
	grace := time.NewTimer(a.cfg.ShutdownGrace)
	defer grace.Stop()
wait:
	for {
		select {
		case <-done:
			break wait
		case <-hb.C:
			a.heartbeat(linkCtx)
		case <-grace.C:
			a.cancelHandler(fmt.Errorf("%w: agent shutting down", ErrClosed))
			<-done
			break wait
		}
	}
	a.cancelHandler(ErrClosed)
	if a.link.connected() {
		ctx, cancel := context.WithTimeout(linkCtx, 2*time.Second)
		defer cancel()
		a.publishState(ctx, KindUnregister, ExchangeRegistration)
	}
	// Whatever is still waiting for a mapper's answer ends now.
	for _, c := range a.calls.all() {
		c.fail(fmt.Errorf("%w: agent shutting down", ErrClosed))
	}
}

func (a *Agent) statePacket(kind Kind) *Packet {
	st := a.cfg.Status()
	p := &Packet{Kind: kind, Identity: a.id, From: a.id, Status: &st,
		InFlight: int(a.inflight.Load()), SentAtUnix: time.Now().UnixMilli()}
	if kind == KindRegister {
		p.Queue = AgentQueue(a.id)
		p.Services = a.Services()
		p.Tags = a.cfg.Tags
		p.Interval = a.cfg.HeartbeatInterval.Milliseconds()
		p.AgentVer = Version
	}
	return p
}

func (a *Agent) publishState(ctx context.Context, kind Kind, exchange string) {
	body, err := a.statePacket(kind).Encode()
	if err == nil {
		body, err = a.cfg.Secure.wrap(body, kind == KindHeartbeat)
	}
	if err != nil {
		a.log.Error("encode state packet", "err", err)
		return
	}
	if err := a.link.publish(ctx, message{Exchange: exchange, Body: body, Type: string(kind)}); err != nil {
		a.log.Warn("publish "+string(kind), "err", err)
	}
}

func (a *Agent) register(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	// One at a time, each built when it is sent: the last registration
	// mappers see holds the current services (SetActors).
	a.registerMu.Lock()
	defer a.registerMu.Unlock()
	a.log.Debug("registering", "services", len(*a.methods.Load()))
	a.publishState(ctx, KindRegister, ExchangeRegistration)
}

func (a *Agent) heartbeat(ctx context.Context) {
	if !a.link.connected() {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, a.cfg.HeartbeatInterval)
	defer cancel()
	a.publishState(ctx, KindHeartbeat, ExchangeHeartbeat)
}

// handleDelivery runs for every message on the agent's queue, in the
// consumer's delivery loop. It runs the handler there too, unless the
// method was slow last time (then in a goroutine of its own); a handler that
// turns out slow makes the loop hand the consumer over (handoffBudget).
// Either way at most Prefetch handlers run at once.
func (a *Agent) handleDelivery(dv delivery) {
	// The run of a request holds the delivery and the packet: one
	// allocation for the three.
	r := &agentRun{a: a, d: dv}
	d := &r.d
	sec := a.cfg.Secure
	in, err := sec.openRequestInto(&r.pkt, d.Body, a.cfg.MaxPayload, security.RoleMapper, security.RoleClient, security.RoleBridge)
	p := in.pkt
	if err != nil && sec != nil && !errors.Is(err, errBadPacket) && !errors.Is(err, ErrTooLarge) {
		// Refused by secure mode: counted, logged, and the requester told
		// where it can be.
		reason := rejectReason(err)
		a.rejects.add(reason)
		a.log.Warn("refused packet", "reason", reason, "err", err)
		if token, replyTo := peekRequest(d.Body); token != "" && replyTo != "" {
			a.reply(&Packet{Kind: KindRequest, Token: token, ReplyTo: replyTo}, security.SealKey{}, nil,
				&ErrorBody{Code: rejectCode(err), Message: fmt.Sprintf("agent %s refused the request (%s): %v", a.id, reason, err)})
		}
		_ = d.Ack()
		return
	}
	if err != nil {
		a.stats.badPackets.Add(1)
		code := CodeBadRequest
		if errors.Is(err, ErrTooLarge) {
			a.stats.tooLarge.Add(1)
			code = CodeTooLarge
			p = &Packet{Kind: KindRequest, Token: d.CorrelationID, ReplyTo: d.ReplyTo}
		}
		a.log.Warn("rejected packet", "err", err)
		if p != nil && p.Token != "" && p.ReplyTo != "" {
			a.reply(p, security.SealKey{}, nil, &ErrorBody{Code: code, Message: err.Error()})
		} else if d.ReplyTo != "" && d.CorrelationID != "" {
			a.reply(&Packet{Token: d.CorrelationID, ReplyTo: d.ReplyTo}, security.SealKey{}, nil, &ErrorBody{Code: code, Message: err.Error()})
		}
		_ = d.Ack()
		return
	}
	switch p.Kind {
	case KindAdvertise:
		a.register(a.handlerCtx)
		_ = d.Ack()
		return
	case KindRequest, KindPush:
	default:
		a.stats.badPackets.Add(1)
		a.log.Warn("unexpected packet on agent queue", "packet", p.Kind)
		_ = d.Ack()
		return
	}
	a.stats.received.Add(1)
	if p.Kind == KindPush {
		a.stats.pushes.Add(1)
	}
	if p.To != "" && p.To != a.id {
		// Signed for another agent: a broker (or a mapper) delivered it
		// to the wrong queue.
		a.rejects.add("misdelivered")
		a.log.Warn("refused packet", "reason", "misdelivered", "to", p.To)
		a.finish(d, p, security.SealKey{}, nil, &ErrorBody{Code: CodeUnauthorized, Message: fmt.Sprintf("request for %s delivered to %s", p.To, a.id)})
		return
	}
	var sealTo security.SealKey
	if p.Sealed != nil {
		if sec == nil {
			a.stats.badPackets.Add(1)
			a.finish(d, p, sealTo, nil, &ErrorBody{Code: CodeBadRequest, Message: "sealed payload sent to an agent not in secure mode"})
			return
		}
		payload, err := sec.Identity.OpenSealed(security.SealInfo(p.Token, p.Type, a.id), p.Sealed)
		if err != nil {
			reason := rejectReason(err)
			a.rejects.add(reason)
			a.log.Warn("refused packet", "reason", reason, "err", err)
			a.finish(d, p, sealTo, nil, &ErrorBody{Code: CodeUnauthorized, Message: fmt.Sprintf("agent %s cannot open the sealed payload: %v", a.id, err)})
			return
		}
		p.Payload, p.Sealed = payload, nil
		sealTo = in.peer.SealKey
	}

	// Duplicates: a redelivered or retried request already handled here.
	// A new token is remembered as running from here on.
	if cached, state := a.dedupe.checkBegin(p.Token, p.ReplyTo); p.Token != "" && state != dedupeNew {
		a.stats.duplicates.Add(1)
		a.log.Info("duplicate request", "token", p.Token, "service", p.Type, "done", state == dedupeDone)
		if state == dedupeDone && cached != nil && p.ReplyTo != "" {
			_ = a.link.publish(a.handlerCtx, message{Key: p.ReplyTo, Body: sec.forAnyone(cached), CorrelationID: p.Token})
		}
		_ = d.Ack()
		return
	}

	svc, err := NormalizeService(p.Type)
	var m *agentMethod
	if err == nil {
		m = (*a.methods.Load())[svc]
	}
	if m == nil {
		a.stats.unknown.Add(1)
		a.log.Warn("request for unknown service", "service", p.Type, "from", p.From)
		a.finish(d, p, sealTo, nil, &ErrorBody{Code: CodeUnknown, Message: fmt.Sprintf("agent %s does not offer %s", a.id, p.Type)})
		return
	}
	if sec != nil && sec.Policy != nil {
		// The policy decides on the original caller (for a relayed
		// request, the signer of its origin), before anything runs.
		dec := sec.Policy.Decide(security.Caller{Name: in.caller.Name, Role: in.caller.Role}, svc, a.cfg.Tags)
		if !dec.Allowed {
			a.stats.unauthorized.Add(1)
			a.rejects.add("not_authorized")
			a.log.Warn("request not authorized", "caller", in.caller.Name, "role", in.caller.Role, "service", svc, "rule", dec.Rule)
			a.finish(d, p, sealTo, nil, &ErrorBody{Code: CodeUnauthorized, Message: fmt.Sprintf("%s may not call %s on %s: %s", in.caller.Name, svc, a.id, dec.Reason)})
			return
		}
	}
	deadline := p.deadlineTime()
	if !deadline.IsZero() {
		// Clocks differ between machines: the deadline is honoured with
		// ClockSkew of tolerance both ways (see docs/protocol.md).
		deadline = deadline.Add(a.cfg.ClockSkew)
	}
	if !deadline.IsZero() && time.Now().After(deadline) {
		a.stats.expired.Add(1)
		a.finish(d, p, sealTo, nil, &ErrorBody{Code: CodeExpired, Message: fmt.Sprintf("deadline passed %v before %s ran", time.Since(deadline).Round(time.Millisecond), svc)})
		return
	}
	// Handlers may start only while the agent is not stopping, so that
	// shutdown's Wait never races an Add.
	a.stopMu.Lock()
	if a.stopping {
		a.stopMu.Unlock()
		a.dedupe.forget(p.Token)
		_ = d.Nack(true) // back to the queue for after the restart
		return
	}
	a.handlers.Add(1)
	a.stopMu.Unlock()
	a.inflight.Add(1)
	r.p, r.sealTo = p, sealTo
	if sec != nil {
		r.from.caller = in.caller
		r.from.envelope = p.Origin
		if len(r.from.envelope) == 0 {
			r.from.envelope = d.Body
		}
	}
	if m.slow.Load() {
		go a.run(r, svc, m, deadline)
		return
	}
	a.run(r, svc, m, deadline)
}

// agentRun is one request as the agent runs it: the handler's Request and
// context and what answering needs, in one allocation.
type agentRun struct {
	req    Request
	ctx    reqContext
	a      *Agent
	d      delivery
	pkt    Packet  // decoded here
	p      *Packet // &pkt
	sealTo security.SealKey
	from   origin
}

// origin is who asked, in secure mode: the signer of the request (of its
// origin envelope for a relayed one) and that envelope.
type origin struct {
	caller   *security.Peer
	envelope []byte
}

// intermediate sends an intermediate result of the run (Request.Intermediate).
func (r *agentRun) intermediate(ctx context.Context, key string, v any) error {
	a, p := r.a, r.p
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("nanite: encode intermediate result: %w", err)
	}
	ip := &Packet{Kind: KindIntermediate, Token: p.Token, From: a.id, Key: key, Payload: b}
	if !r.sealTo.IsZero() {
		if ip.Sealed, err = sealPayload(r.sealTo, b, p.Token, "intermediate", a.id, key); err != nil {
			return err
		}
		ip.Payload = nil
	}
	body, err := ip.Encode()
	if err == nil {
		body, err = a.cfg.Secure.wrapReply(p, body)
	}
	if err != nil {
		return err
	}
	a.stats.intermediates.Add(1)
	return a.link.publish(ctx, message{Key: p.ReplyTo, Body: body, CorrelationID: p.Token})
}

func (a *Agent) run(r *agentRun, svc string, m *agentMethod, deadline time.Time) {
	defer a.handlers.Done()
	defer a.inflight.Add(-1)
	d, p, sealTo := &r.d, r.p, r.sealTo
	r.ctx.init(a.handlerCtx, deadline)
	defer r.ctx.release()
	r.req = Request{Service: svc, Payload: p.Payload, From: p.From, Token: p.Token,
		Deadline: deadline, Tags: p.Tags, Attempt: p.Attempt, Hops: p.Hops,
		Selector: p.Selector, Target: p.Target, Origin: r.from.envelope, Persistent: p.Persistent, Agent: a}
	if r.from.caller != nil {
		r.req.Caller = r.from.caller.Name
	}
	if p.Kind == KindRequest {
		r.req.run = r
	}
	// Only the handler's own time counts: publishing the answer can wait
	// for the broker, or for the CPU on a busy machine, however quick the
	// handler is.
	start := time.Now()
	res, herr := a.call(&r.ctx, m.Method, &r.req)
	m.slow.Store(time.Since(start) > quickHandler)
	var payload json.RawMessage
	var ebody *ErrorBody
	if mr, ok := res.(MultiResult); ok && herr == nil {
		a.stats.succeeded.Add(1)
		a.finishMulti(d, p, sealTo, mr)
		return
	}
	switch {
	case herr != nil:
		ebody = herr
	default:
		if rm, ok := res.(json.RawMessage); ok && validJSON(rm) {
			payload = rm
			break
		}
		b, err := json.Marshal(res)
		if err != nil {
			ebody = &ErrorBody{Code: CodeHandler, Message: "result is not JSON-encodable: " + err.Error()}
		} else {
			payload = b
		}
	}
	if ebody != nil {
		a.stats.failed.Add(1)
	} else {
		a.stats.succeeded.Add(1)
	}
	a.finish(d, p, sealTo, payload, ebody)
}

// finishMulti answers with the results of several agents at once (a
// gateway's MultiResult). They cannot be sealed: a sealed request gets an
// error instead.
func (a *Agent) finishMulti(d *delivery, p *Packet, sealTo security.SealKey, mr MultiResult) {
	if !sealTo.IsZero() {
		a.finish(d, p, sealTo, nil, &ErrorBody{Code: CodeHandler, Message: "the results of several agents cannot be sealed to the requester"})
		return
	}
	rs := make([]ResultRecord, len(mr))
	for i, r := range mr {
		rs[i] = r
		if r.Error == nil && (len(r.Payload) == 0 || !validJSON(r.Payload)) {
			rs[i].Payload = json.RawMessage("null")
		}
	}
	a.finishPacket(d, p, &Packet{Kind: KindResult, Token: p.Token, From: a.id, Results: rs})
}

// call runs the handler, turning a panic or a context end into an error.
func (a *Agent) call(ctx context.Context, m *Method, req *Request) (res any, ebody *ErrorBody) {
	defer func() {
		if r := recover(); r != nil {
			a.stats.panics.Add(1)
			a.log.Error("handler panicked", "service", req.Service, "panic", r, "stack", string(debug.Stack()))
			res, ebody = nil, &ErrorBody{Code: CodePanic, Message: fmt.Sprintf("handler for %s panicked: %v", req.Service, r)}
		}
	}()
	res, err := m.Handler(ctx, req)
	if err != nil {
		switch {
		case ctx.Err() != nil && errors.Is(context.Cause(ctx), ErrClosed):
			return nil, &ErrorBody{Code: CodeShutdown, Message: fmt.Sprintf("agent %s stopped while running %s: %v", a.id, req.Service, err)}
		case errors.Is(ctx.Err(), context.DeadlineExceeded):
			return nil, &ErrorBody{Code: CodeTimeout, Message: fmt.Sprintf("%s did not finish before its deadline: %v", req.Service, err)}
		}
		var re *RemoteError
		if errors.As(err, &re) {
			return nil, &ErrorBody{Code: re.Code, Message: re.Message}
		}
		return nil, &ErrorBody{Code: CodeHandler, Message: err.Error()}
	}
	return res, nil
}

// finish answers the request (unless it is a push), remembers the answer
// for duplicates, and only then acknowledges the delivery.
func (a *Agent) finish(d *delivery, p *Packet, sealTo security.SealKey, payload json.RawMessage, ebody *ErrorBody) {
	var body []byte
	answer := p.Kind == KindRequest && p.ReplyTo != ""
	if answer {
		body = a.buildReply(p, sealTo, payload, ebody)
	}
	a.finishBody(d, p, answer, body)
}

// finishPacket is finish with a ready answer packet (signed, not sealed).
func (a *Agent) finishPacket(d *delivery, p *Packet, rp *Packet) {
	var body []byte
	answer := p.Kind == KindRequest && p.ReplyTo != ""
	if answer {
		b, err := rp.Encode()
		if err == nil {
			b, err = a.cfg.Secure.wrapReply(p, b)
		}
		if err != nil {
			a.log.Error("encode result", "err", err)
		} else {
			body = b
		}
	}
	a.finishBody(d, p, answer, body)
}

func (a *Agent) finishBody(d *delivery, p *Packet, answer bool, body []byte) {
	// Remember the answer before sending it, so that a copy arriving the
	// moment after the requester got it is answered from the cache.
	var waiters []string
	if p.Token != "" {
		waiters = a.dedupe.done(p.Token, body)
	}
	bundled := false
	if answer && body != nil {
		if p.Bundles && !p.Persistent && d.bundle != nil {
			until := a.replyUntil(p)
			bundled = d.bundle.add(d, p.ReplyTo, p.Token, body, until) ||
				d.bundle.sendNow(d, p.ReplyTo, p.Token, body, until, a.inflight.Load() > 1)
		}
		if !bundled {
			a.sendReply(p, body)
		}
	}
	for _, replyTo := range waiters {
		// Copies that arrived while it ran, from another requester
		// (a mapper daemon that took over a relay), get the answer too.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = a.link.publish(ctx, message{Key: replyTo, Body: a.cfg.Secure.forAnyone(body), CorrelationID: p.Token})
		cancel()
	}
	if bundled {
		return // acknowledged once its answer is sent
	}
	if err := d.Ack(); err != nil {
		a.log.Warn("ack failed; the broker will redeliver and the duplicate will be answered from cache", "token", p.Token, "err", err)
	}
}

// reply answers a request: signed in secure mode, sealed to sealTo when the
// request was sealed.
func (a *Agent) reply(p *Packet, sealTo security.SealKey, payload json.RawMessage, ebody *ErrorBody) []byte {
	body := a.buildReply(p, sealTo, payload, ebody)
	if body != nil {
		a.sendReply(p, body)
	}
	return body
}

// buildReply encodes (and in secure mode seals and signs) an answer.
func (a *Agent) buildReply(p *Packet, sealTo security.SealKey, payload json.RawMessage, ebody *ErrorBody) []byte {
	rp := &Packet{Kind: KindResult, Token: p.Token, From: a.id, Payload: payload, Error: ebody}
	var err error
	if !sealTo.IsZero() && len(payload) > 0 {
		if rp.Sealed, err = sealPayload(sealTo, payload, p.Token, "result", a.id); err != nil {
			a.log.Error("seal result", "err", err)
			return nil
		}
		rp.Payload = nil
	}
	body, err := rp.encodeTrusted()
	if err == nil {
		body, err = a.cfg.Secure.wrapReply(p, body)
	}
	if err != nil {
		a.log.Error("encode result", "err", err)
		return nil
	}
	return body
}

// sendReply publishes an answer to the request's reply queue.
func (a *Agent) sendReply(p *Packet, body []byte) {
	// The answer to a persistent request is persistent too, so a broker
	// restart between answer and pick-up does not lose it.
	if err := a.link.publishBy(context.Background(), a.replyUntil(p), a.cfg.RequestTimeout, message{Key: p.ReplyTo, Body: body, CorrelationID: p.Token, Persistent: p.Persistent}); err != nil {
		a.log.Warn("could not send result", "token", p.Token, "err", err)
	}
}

// replyUntil is how long an answer to p may wait for the connection: the
// requester stops waiting at its deadline, and a little slack lets an answer
// that raced the deadline still reach it. Zero when p has no deadline.
func (a *Agent) replyUntil(p *Packet) time.Time {
	if dl := p.deadlineTime(); !dl.IsZero() {
		return dl.Add(5 * time.Second)
	}
	return time.Time{}
}

// handleReply receives answers to requests the agent made itself.
func (a *Agent) handleReply(d delivery) {
	var p *Packet
	if d.DeadLettered {
		var err error
		if p, err = a.cfg.Secure.openOwn(d.Body, a.cfg.MaxPayload); err != nil {
			a.rejects.add(rejectReason(err))
			return
		}
	} else {
		in, err := a.cfg.Secure.open(d.Body, a.cfg.MaxPayload, security.RoleMapper, security.RoleBridge)
		if err != nil {
			a.rejects.add(rejectReason(err))
			a.log.Warn("rejected reply", "err", err)
			return
		}
		p = in.pkt
	}
	if d.DeadLettered {
		if c := a.calls.get(p.Token); c != nil {
			c.fail(fmt.Errorf("%w: no mapper took %s before its deadline", ErrTimeout, p.Type))
		}
		return
	}
	a.calls.handleReply(p)
}

// dedupe remembers recently handled request tokens and their answers: the
// last max tokens whose answers add up to maxBytes at most, in a ring that
// reuses its slots (no allocation per request once it is full). The nth
// token remembered (counting from 0) is in slot n % max.
//
// Little of it is for the garbage collector to follow, which walks it at
// every cycle: the map goes from a hash of the token to its slot (no
// pointers), a token of up to 32 bytes (a Go requester's is 32 hex digits)
// is kept in its slot, and a slot whose answer is recorded keeps only the
// answer. Two tokens with the same hash (64 bits, seeded) are told apart by
// the token kept; the older one is then forgotten early.
type dedupe struct {
	mu       sync.Mutex
	max      int
	maxBytes int
	seed     maphash.Seed
	m        map[uint64]int32 // hash of a token -> its slot in ring
	ring     []dedupeEntry    // grows to max, then the oldest slot is reused
	seq      int              // tokens remembered so far
	oldest   int              // the seq of the oldest slot that may hold one
	bytes    int              // of the answers in the ring
}

type dedupeEntry struct {
	hash    uint64
	used    bool
	done    bool
	short   uint8    // the length of a token kept in tok; 0: in long
	tok     [32]byte // a short token
	long    string   // a token longer than tok
	body    []byte
	replyTo string   // of the copy that runs, until done
	waiters []string // other reply queues that sent the same token meanwhile
}

func (en *dedupeEntry) is(token string) bool {
	if en.short > 0 {
		return string(en.tok[:en.short]) == token
	}
	return en.used && en.long == token
}

type dedupeState int

const (
	dedupeNew dedupeState = iota
	dedupeRunning
	dedupeDone
)

func newDedupe(max, maxBytes int) *dedupe {
	return &dedupe{max: max, maxBytes: maxBytes, seed: maphash.MakeSeed(), m: map[uint64]int32{}}
}

// check looks a token up. For a copy that arrives while the first one runs,
// it remembers replyTo when it differs, so that done can answer it too.
func (c *dedupe) check(token, replyTo string) ([]byte, dedupeState) {
	return c.lookup(token, replyTo, false)
}

// checkBegin is check that also begins a token it does not know (dedupeNew).
func (c *dedupe) checkBegin(token, replyTo string) ([]byte, dedupeState) {
	return c.lookup(token, replyTo, true)
}

func (c *dedupe) lookup(token, replyTo string, begin bool) ([]byte, dedupeState) {
	if token == "" {
		return nil, dedupeNew
	}
	h := maphash.String(c.seed, token)
	c.mu.Lock()
	defer c.mu.Unlock()
	i := c.findLocked(h, token)
	if i < 0 {
		if begin {
			c.insertLocked(h, token, replyTo)
		}
		return nil, dedupeNew
	}
	en := &c.ring[i]
	if en.done {
		return en.body, dedupeDone
	}
	if replyTo != "" && replyTo != en.replyTo && !slices.Contains(en.waiters, replyTo) {
		en.waiters = append(en.waiters, replyTo)
	}
	return nil, dedupeRunning
}

// findLocked returns the slot of token (of hash h), or -1.
func (c *dedupe) findLocked(h uint64, token string) int {
	if i, ok := c.m[h]; ok && c.ring[i].is(token) {
		return int(i)
	}
	return -1
}

func (c *dedupe) begin(token, replyTo string) {
	h := maphash.String(c.seed, token)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.beginLocked(h, token, replyTo)
}

func (c *dedupe) beginLocked(h uint64, token, replyTo string) int {
	if i := c.findLocked(h, token); i >= 0 {
		return i
	}
	return c.insertLocked(h, token, replyTo)
}

// insertLocked remembers a token that is not there, forgetting the oldest
// when the ring is full.
func (c *dedupe) insertLocked(h uint64, token, replyTo string) int {
	i := c.seq % c.max
	if len(c.ring) < c.max {
		c.ring = append(c.ring, dedupeEntry{})
	} else {
		c.evictLocked(i)
	}
	c.seq++
	c.oldest = max(c.oldest, c.seq-c.max)
	en := &c.ring[i]
	*en = dedupeEntry{hash: h, used: true, replyTo: replyTo}
	if len(token) <= len(en.tok) {
		en.short = uint8(copy(en.tok[:], token))
	} else {
		en.long = token
	}
	c.m[h] = int32(i) // a token of the same hash, if any, is forgotten
	return i
}

// evictLocked forgets the token in slot i, if any.
func (c *dedupe) evictLocked(i int) {
	en := &c.ring[i]
	if en.used {
		if j, ok := c.m[en.hash]; ok && int(j) == i {
			delete(c.m, en.hash)
		}
	}
	c.bytes -= len(en.body)
	*en = dedupeEntry{}
}

// trimLocked forgets the oldest tokens until their answers fit maxBytes.
func (c *dedupe) trimLocked() {
	for c.bytes > c.maxBytes && c.oldest < c.seq {
		c.evictLocked(c.oldest % c.max)
		c.oldest++
	}
}

// forget drops a token that began but will not run here (the agent is
// stopping and gives the request back to the queue).
func (c *dedupe) forget(token string) {
	if token == "" {
		return
	}
	h := maphash.String(c.seed, token)
	c.mu.Lock()
	defer c.mu.Unlock()
	if i := c.findLocked(h, token); i >= 0 && !c.ring[i].done {
		c.evictLocked(i)
	}
}

// done records the answer and returns the reply queues still waiting for it.
func (c *dedupe) done(token string, body []byte) []string {
	h := maphash.String(c.seed, token)
	c.mu.Lock()
	defer c.mu.Unlock()
	en := &c.ring[c.beginLocked(h, token, "")]
	en.done, en.body, en.replyTo = true, body, ""
	c.bytes += len(body)
	w := en.waiters
	en.waiters = nil
	c.trimLocked() // may forget this one too, when its answer alone is too large
	if body == nil {
		return nil
	}
	return w
}
