package nanite

// This file is the only one that imports amqp091-go. Everything above it
// speaks in messages, deliveries and queue names.

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// message is one outgoing AMQP message.
type message struct {
	Exchange      string
	Key           string
	Body          []byte
	CorrelationID string
	ReplyTo       string
	Type          string         // the packet kind, on state packets only (docs/protocol.md); BundleType
	ContentType   string         // "" for application/json
	Headers       map[string]any // each header costs allocations on both sides: only where needed
	Expiration    time.Duration  // per-message TTL; 0 for none
	Persistent    bool           // delivery mode 2, and wait for the publisher confirm
	Mandatory     bool           // return the message when no queue takes it
}

// delivery is one incoming AMQP message.
type delivery struct {
	Body          []byte
	CorrelationID string
	ReplyTo       string
	Type          string
	Headers       map[string]any
	Redelivered   bool
	DeadLettered  bool   // it came through the dead-letter exchange
	DeathReason   string // "expired", "rejected", "maxlen" when DeadLettered

	ch     *amqp.Channel // nil for auto-acknowledged deliveries
	tag    uint64
	acker  *acker        // when the consumer batches its acknowledgements
	bundle *replyBundler // when the consumer bundles answers (see bundle.go)
}

// Ack acknowledges the delivery (after it has been handled). With a
// batching consumer the acknowledgement may go out a little later, with
// others (see acker); its error, if any, is then logged instead.
func (d *delivery) Ack() error {
	if d.ch == nil {
		return nil
	}
	if d.acker != nil {
		return d.acker.ack(d.tag)
	}
	return d.ch.Ack(d.tag, false)
}

// Nack rejects the delivery, back to its queue when requeue is set.
func (d *delivery) Nack(requeue bool) error {
	if d.ch == nil {
		return nil
	}
	if d.acker != nil {
		d.acker.settle(d.tag)
	}
	return d.ch.Nack(d.tag, false, requeue)
}

// acker sends the acknowledgements of one consumer channel's deliveries,
// several at once with one basic.ack (multiple) where it can. The delivery
// loop tells it which deliveries its Handle is running; their Acks wait
// until the loop is about to wait for the next delivery (or has batch of
// them), so that a burst of quick requests costs one frame and one
// syscall for many acknowledgements. Any other Ack (from a handler that
// runs in a goroutine of its own) goes out at once, with whatever waits.
// A multiple acknowledgement never covers a delivery still being handled:
// deliveries handled behind one that is still open are acknowledged one
// by one, so that a slow handler does not hold back the prefetch window.
type acker struct {
	send  func(tag uint64, multiple bool) error // basic.ack
	log   *slog.Logger
	batch int // send once this many wait

	mu     sync.Mutex
	open   []uint64 // received, neither acked nor nacked; ascending
	inLoop []uint64 // their Handle runs in a delivery loop now
	done   []uint64 // acked by the handler, not sent yet; ascending
}

func newAcker(send func(tag uint64, multiple bool) error, log *slog.Logger, prefetch int) *acker {
	return &acker{send: send, log: log, batch: max(prefetch/2, 1)}
}

// received records a delivery the loop is about to Handle. Tags grow on a
// channel, so open stays sorted.
func (a *acker) received(tag uint64) {
	a.mu.Lock()
	a.open = append(a.open, tag)
	a.inLoop = append(a.inLoop, tag)
	a.mu.Unlock()
}

// handled records that the loop's Handle for tag returned; it sends the
// waiting acknowledgements when there are enough of them.
func (a *acker) handled(tag uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.inLoop = deleteTag(a.inLoop, tag)
	if len(a.done) >= a.batch {
		a.flushLocked()
	}
}

func (a *acker) ack(tag uint64) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.markLocked(tag) || slices.Contains(a.inLoop, tag) {
		return nil // settled already, or the loop sends it
	}
	return a.flushLocked()
}

// markLocked moves tag from open to done; false if it was settled already.
func (a *acker) markLocked(tag uint64) bool {
	if !slices.Contains(a.open, tag) {
		return false
	}
	a.open = deleteTag(a.open, tag)
	i, _ := slices.BinarySearch(a.done, tag)
	a.done = slices.Insert(a.done, i, tag)
	return true
}

// inLoopNow reports whether the Handle of tag runs in a delivery loop.
func (a *acker) inLoopNow(tag uint64) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Contains(a.inLoop, tag)
}

// ackAll records that the deliveries of tags are handled, like ack for
// each, without sending anything: the caller flushes.
func (a *acker) ackAll(tags []uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, tag := range tags {
		a.markLocked(tag)
	}
}

// settle forgets a delivery that is nacked.
func (a *acker) settle(tag uint64) {
	a.mu.Lock()
	a.open = deleteTag(a.open, tag)
	a.mu.Unlock()
}

// flush sends the waiting acknowledgements.
func (a *acker) flush() {
	a.mu.Lock()
	_ = a.flushLocked()
	a.mu.Unlock()
}

func (a *acker) flushLocked() error {
	if len(a.done) == 0 {
		return nil
	}
	// Every delivery below the lowest open one is settled: one multiple
	// acknowledgement covers the waiting ones there.
	below := len(a.done)
	if len(a.open) > 0 {
		below, _ = slices.BinarySearch(a.done, a.open[0])
	}
	var err error
	if below > 0 {
		err = a.send(a.done[below-1], below > 1)
	}
	for _, tag := range a.done[below:] {
		if e := a.send(tag, false); err == nil {
			err = e
		}
	}
	a.done = a.done[:0]
	if err != nil {
		a.log.Warn("ack failed; the broker will redeliver and duplicates will be answered from cache", "err", err)
	}
	return err
}

func deleteTag(tags []uint64, tag uint64) []uint64 {
	if i := slices.Index(tags, tag); i >= 0 {
		return slices.Delete(tags, i, i+1)
	}
	return tags
}

// returned is a mandatory message the broker could not route.
type returned struct {
	CorrelationID string
	ReplyTo       string
	Key           string
	Reason        string
	Body          []byte
}

// queueSpec declares a queue.
type queueSpec struct {
	Name       string
	Durable    bool
	Exclusive  bool
	AutoDelete bool
	Args       map[string]any
}

// consumerSpec is a consumer that the link (re)starts after every connect.
type consumerSpec struct {
	Queue    string
	Prefetch int            // 0: no limit
	AutoAck  bool           // the broker forgets the message on delivery
	Handle   func(delivery) // by value: a delivery that stays in the loop is not allocated
	// BatchAcks sends the acknowledgements of deliveries handled in the
	// delivery loop several at a time (see acker). Only with manual acks.
	BatchAcks bool
	// Handoff, when > 0, lets Handle run a delivery to its end in the
	// delivery loop even when that takes long: once Handle has run for
	// Handoff, a new delivery loop takes over the consumer, so that the
	// next deliveries do not wait for it. Handle runs inline, without a
	// goroutine of its own, which is what makes short handlers cheap.
	Handoff time.Duration
	// Bundler gathers the answers Handle makes in the delivery loop, to
	// send several as one message (bundle.go). Only with BatchAcks.
	Bundler *replyBundler
	// Bundles splits a reply bundle into its answers, one Handle each.
	// Only with AutoAck (a bundle's answers are not acknowledged apart).
	Bundles bool
}

// topology declares exchanges, queues and bindings on a fresh connection.
type topology struct{ st *topoState }

type topoState struct {
	ch   *amqp.Channel
	conn *amqp.Connection
}

func newTopology(conn *amqp.Connection, ch *amqp.Channel) topology {
	return topology{&topoState{ch: ch, conn: conn}}
}

// SharedExchange declares an exchange every participant uses. When the
// broker refuses to let this user declare it (a provisioned vhost whose
// topology is locked, docs/provisioning.md), it checks passively that the
// exchange exists instead.
func (t topology) SharedExchange(name, kind string) error {
	err := t.Exchange(name, kind)
	if !isAccessRefused(err) {
		return err
	}
	if err := t.reopen(); err != nil {
		return err
	}
	if err := t.st.ch.ExchangeDeclarePassive(name, kind, true, false, false, false, nil); err != nil {
		return fmt.Errorf("nanite: exchange %s (passive, this user may not declare it): %w", name, err)
	}
	return nil
}

// SharedQueue is SharedExchange for the shared queues.
func (t topology) SharedQueue(q queueSpec) error {
	err := t.Queue(q)
	if !isAccessRefused(err) {
		return err
	}
	if err := t.reopen(); err != nil {
		return err
	}
	if _, err := t.st.ch.QueueDeclarePassive(q.Name, q.Durable, q.AutoDelete, q.Exclusive, false, amqp.Table(q.Args)); err != nil {
		return fmt.Errorf("nanite: queue %s (passive, this user may not declare it): %w", q.Name, err)
	}
	return nil
}

// reopen replaces the channel that a refusal closed.
func (t topology) reopen() error {
	ch, err := t.st.conn.Channel()
	if err != nil {
		return fmt.Errorf("nanite: open channel: %w", err)
	}
	_ = t.st.ch.Close()
	t.st.ch = ch
	return nil
}

func isAccessRefused(err error) bool {
	var aerr *amqp.Error
	return errors.As(err, &aerr) && aerr.Code == amqp.AccessRefused
}

func (t topology) Exchange(name, kind string) error {
	if err := t.st.ch.ExchangeDeclare(name, kind, true, false, false, false, nil); err != nil {
		return fmt.Errorf("nanite: declare exchange %s: %w", name, err)
	}
	return nil
}

func (t topology) Queue(q queueSpec) error {
	if _, err := t.st.ch.QueueDeclare(q.Name, q.Durable, q.AutoDelete, q.Exclusive, false, amqp.Table(q.Args)); err != nil {
		return fmt.Errorf("nanite: declare queue %s: %w", q.Name, err)
	}
	return nil
}

func (t topology) Bind(queue, exchange, key string, args map[string]any) error {
	if err := t.st.ch.QueueBind(queue, key, exchange, false, amqp.Table(args)); err != nil {
		return fmt.Errorf("nanite: bind %s to %s: %w", queue, exchange, err)
	}
	return nil
}

// Delete removes a queue (used when an agent leaves for good).
func (t topology) Delete(queue string) error {
	if _, err := t.st.ch.QueueDelete(queue, false, false, false); err != nil {
		return fmt.Errorf("nanite: delete queue %s: %w", queue, err)
	}
	return nil
}

// linkConfig configures a link.
type linkConfig struct {
	URL       string
	Name      string // connection name shown by the broker
	TLS       *tls.Config
	Logger    *slog.Logger
	Heartbeat time.Duration
	// Setup declares the topology after each connect, before consumers start.
	Setup func(topology) error
	// Consumers are started after Setup on every connect.
	Consumers []consumerSpec
	// OnReturn receives mandatory messages that could not be routed.
	OnReturn func(returned)
	// OnConnect is called after every successful (re)connect and setup.
	OnConnect func()
	// OnDisconnect is called when an established connection is lost.
	OnDisconnect func(error)
	// MinBackoff and MaxBackoff bound the reconnect delay.
	MinBackoff, MaxBackoff time.Duration
}

// link is a supervised AMQP connection. Run dials with backoff, declares the
// topology, starts the consumers and starts over when the connection drops.
type link struct {
	cfg linkConfig
	log *slog.Logger

	mu        sync.Mutex
	conn      *amqp.Connection
	consChans []*amqp.Channel
	consTags  []string
	ready     chan struct{} // closed while connected
	stopped   bool
	stopCons  bool

	handlers sync.WaitGroup // delivery loops
	lastExp  atomic.Pointer[expirationString]
	// chans are the publishing channels while connected (nil while not):
	// publishers read them without the mutex.
	chans atomic.Pointer[pubChans]

	failed  chan struct{} // closed when run gave up for good
	failErr error         // why; guarded by mu
	lastErr error         // the last connection error; guarded by mu
}

func newLink(cfg linkConfig) *link {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Heartbeat == 0 {
		cfg.Heartbeat = 5 * time.Second
	}
	if cfg.MinBackoff == 0 {
		cfg.MinBackoff = 100 * time.Millisecond
	}
	if cfg.MaxBackoff == 0 {
		cfg.MaxBackoff = 3 * time.Second
	}
	return &link{cfg: cfg, log: cfg.Logger, ready: make(chan struct{}), failed: make(chan struct{})}
}

var errNotConnected = errors.New("nanite: not connected to the broker")

// run keeps the link connected until ctx ends. It returns nil when ctx ends
// and an error only when the first connection fails with an error that
// retrying cannot fix (bad credentials, unknown vhost).
func (l *link) run(ctx context.Context) error {
	backoff := l.cfg.MinBackoff
	first := true
	for {
		conn, closed, err := l.connect()
		if err != nil {
			l.mu.Lock()
			l.lastErr = err
			l.mu.Unlock()
			if first && isPermanent(err) {
				err = fmt.Errorf("%w: %w", ErrConnection, err)
				l.mu.Lock()
				l.failErr = err
				l.mu.Unlock()
				close(l.failed)
				return err
			}
			l.log.Warn("broker connection failed", "err", err, "retry_in", backoff)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(backoff + rand.N(backoff/4+1)):
			}
			backoff = min(backoff*2, l.cfg.MaxBackoff)
			continue
		}
		first = false
		backoff = l.cfg.MinBackoff
		l.log.Info("connected to broker", "name", l.cfg.Name)
		if l.cfg.OnConnect != nil {
			l.cfg.OnConnect()
		}
		select {
		case <-ctx.Done():
			l.shutdown(conn)
			return nil
		case cerr := <-closed:
			l.markDown()
			var err error = errNotConnected
			if cerr != nil {
				err = fmt.Errorf("nanite: broker connection lost: %w", cerr)
			}
			l.log.Warn("broker connection lost", "err", err)
			_ = conn.Close()
			if l.cfg.OnDisconnect != nil {
				l.cfg.OnDisconnect(err)
			}
		}
	}
}

// isPermanent reports errors that retrying cannot fix: refused credentials
// or vhost, and TLS certificates that do not verify.
func isPermanent(err error) bool {
	var aerr *amqp.Error
	if errors.As(err, &aerr) {
		return aerr.Code == amqp.AccessRefused || aerr.Code == amqp.NotAllowed
	}
	var cve *tls.CertificateVerificationError
	var ua x509.UnknownAuthorityError
	var he x509.HostnameError
	var ci x509.CertificateInvalidError
	var alert tls.AlertError
	return errors.As(err, &cve) || errors.As(err, &ua) || errors.As(err, &he) || errors.As(err, &ci) || errors.As(err, &alert)
}

// connect dials, declares and starts consumers. closed receives when the
// connection or any of its channels fails.
func (l *link) connect() (*amqp.Connection, <-chan *amqp.Error, error) {
	props := amqp.NewConnectionProperties()
	props.SetClientConnectionName(l.cfg.Name)
	conn, err := amqp.DialConfig(l.cfg.URL, amqp.Config{
		Heartbeat:       l.cfg.Heartbeat,
		TLSClientConfig: l.cfg.TLS.Clone(), // the library sets ServerName in it
		Properties:      props,
		Dial:            amqp.DefaultDial(5 * time.Second),
	})
	if err != nil {
		return nil, nil, fmt.Errorf("nanite: dial broker: %w", err)
	}
	fail := func(err error) (*amqp.Connection, <-chan *amqp.Error, error) {
		_ = conn.Close()
		return nil, nil, err
	}
	// closed is ours and never closed; the library closes the channels it
	// is given with NotifyClose, so each gets its own forwarding goroutine.
	closed := make(chan *amqp.Error, 8)
	forward := func(c chan *amqp.Error, always bool) {
		go func() {
			e, ok := <-c
			if (ok && e != nil) || always {
				select {
				case closed <- e:
				default:
				}
			}
		}()
	}
	forward(conn.NotifyClose(make(chan *amqp.Error, 1)), true)
	watch := func(ch *amqp.Channel) { forward(ch.NotifyClose(make(chan *amqp.Error, 1)), false) }

	sch, err := conn.Channel()
	if err != nil {
		return fail(fmt.Errorf("nanite: open channel: %w", err))
	}
	if l.cfg.Setup != nil {
		t := newTopology(conn, sch)
		if err := l.cfg.Setup(t); err != nil {
			return fail(err)
		}
		sch = t.st.ch
	}
	_ = sch.Close()

	pub, err := conn.Channel()
	if err != nil {
		return fail(fmt.Errorf("nanite: open channel: %w", err))
	}
	conf, err := conn.Channel()
	if err != nil {
		return fail(fmt.Errorf("nanite: open channel: %w", err))
	}
	if err := conf.Confirm(false); err != nil {
		return fail(fmt.Errorf("nanite: confirm mode: %w", err))
	}
	watch(pub)
	watch(conf)
	if l.cfg.OnReturn != nil {
		for _, ch := range []*amqp.Channel{pub, conf} {
			rc := ch.NotifyReturn(make(chan amqp.Return, 64))
			go func() {
				for r := range rc {
					l.cfg.OnReturn(returned{CorrelationID: r.CorrelationId, ReplyTo: r.ReplyTo,
						Key: r.RoutingKey, Reason: r.ReplyText, Body: r.Body})
				}
			}()
		}
	}

	var consChans []*amqp.Channel
	var consTags []string
	l.mu.Lock()
	skipConsumers := l.stopCons
	l.mu.Unlock()
	for i, c := range l.cfg.Consumers {
		if skipConsumers {
			break
		}
		ch, err := conn.Channel()
		if err != nil {
			return fail(fmt.Errorf("nanite: open channel: %w", err))
		}
		if c.Prefetch > 0 {
			if err := ch.Qos(c.Prefetch, 0, false); err != nil {
				return fail(fmt.Errorf("nanite: qos: %w", err))
			}
		}
		tag := fmt.Sprintf("%s#%d", l.cfg.Name, i)
		ds, err := ch.Consume(c.Queue, tag, c.AutoAck, false, false, false, nil)
		if err != nil {
			return fail(fmt.Errorf("nanite: consume %s: %w", c.Queue, err))
		}
		watch(ch)
		consChans = append(consChans, ch)
		consTags = append(consTags, tag)
		var ack *acker
		if c.BatchAcks && !c.AutoAck {
			ack = newAcker(ch.Ack, l.log, c.Prefetch)
		}
		l.handlers.Add(1)
		go l.deliver(ch, c, ds, ack)
	}

	l.mu.Lock()
	if l.stopped {
		l.mu.Unlock()
		return fail(ErrClosed)
	}
	l.conn, l.consChans, l.consTags = conn, consChans, consTags
	l.chans.Store(&pubChans{pub: pub, conf: conf})
	close(l.ready)
	l.mu.Unlock()
	return conn, closed, nil
}

func (l *link) deliver(ch *amqp.Channel, c consumerSpec, ds <-chan amqp.Delivery, ack *acker) {
	defer l.handlers.Done()
	// With a handoff, one loop at a time receives from ds. Each loop has a
	// standby goroutine, started by the loop itself so that it inherits its
	// pprof labels; when a Handle outlasts c.Handoff, the loop's watch
	// wakes the standby, which becomes the next loop, and this one ends
	// after its Handle returns. At most one loop waits on ds, so the number
	// of goroutines in Handle stays bounded by the deliveries in flight
	// (the prefetch).
	var watch *handoffWatch
	if c.Handoff > 0 {
		watch = newHandoffWatch(c.Handoff)
		l.handlers.Add(1) // this loop is counted, so the Add cannot race Wait
		go func() {
			if watch.wait() {
				l.handlers.Add(1)
				l.deliver(ch, c, ds, ack)
			}
			l.handlers.Done()
		}()
		defer watch.stop()
	}
	var bundler *replyBundler
	if ack != nil {
		bundler = c.Bundler
	}
	for {
		d, ok := l.next(ds, ack, bundler)
		if !ok {
			return
		}
		if c.Bundles && c.AutoAck && d.Type == BundleType {
			l.deliverBundle(ch, c, d)
			continue
		}
		dv := l.delivery(ch, c, d)
		if ack != nil {
			dv.acker, dv.bundle = ack, bundler
			ack.received(d.DeliveryTag)
		}
		if watch != nil {
			watch.begin()
		}
		c.Handle(dv)
		if ack != nil {
			ack.handled(d.DeliveryTag)
			if bundler != nil && bundler.full() {
				bundler.flush()
				ack.flush()
			}
		}
		if watch != nil && watch.end() {
			// The standby has taken over.
			if ack != nil {
				bundler.flush()
				ack.flush()
			}
			return
		}
	}
}

// deliverBundle hands each answer of a reply bundle to Handle as a delivery
// of its own.
func (l *link) deliverBundle(ch *amqp.Channel, c consumerSpec, d amqp.Delivery) {
	dv := l.delivery(ch, c, d)
	err := splitBundle(d.Body, func(corr string, body []byte) {
		part := dv
		part.Body, part.CorrelationID, part.Type = body, corr, ""
		c.Handle(part)
	})
	if err != nil {
		l.log.Warn("dropped a malformed reply bundle", "queue", c.Queue, "bytes", len(d.Body))
	}
}

// handoffWatch tells a delivery loop's standby to take over when a Handle
// outlasts the budget. It keeps no time per delivery: a timer ticks every
// budget while deliveries come in (and rests after a budget without any),
// and a Handle that is still running at the second tick after it began has
// run for at least one budget (at most two). Setting a timer around every
// delivery instead would wake the runtime's network poller thread each
// time (setting a timer earlier than the poller sleeps for does that),
// which slowed every request on two cores shared with the broker.
type handoffWatch struct {
	budget   time.Duration
	takeover chan bool // true: take over; false: the loop ended without
	timer    *time.Timer

	epoch   atomic.Uint64 // ticks so far
	began   atomic.Uint64 // epoch+1 when the running Handle began; 0: none runs
	seen    atomic.Bool   // a Handle began since the last tick
	ticking atomic.Bool
	done    atomic.Bool // taken over, or the loop ended
	mu      sync.Mutex  // tick and stop
}

func newHandoffWatch(budget time.Duration) *handoffWatch {
	w := &handoffWatch{budget: budget, takeover: make(chan bool, 1)}
	w.timer = time.AfterFunc(time.Hour, w.tick)
	w.timer.Stop()
	return w
}

// begin records that a Handle begins.
func (w *handoffWatch) begin() {
	w.began.Store(w.epoch.Load() + 1)
	w.seen.Store(true)
	if !w.ticking.Load() && w.ticking.CompareAndSwap(false, true) {
		w.timer.Reset(w.budget)
	}
}

// end records that the Handle returned; it reports whether the standby has
// taken over meanwhile (the loop must then end).
func (w *handoffWatch) end() bool {
	w.began.Store(0)
	return w.done.Load()
}

// stop ends the watch when its loop ends (unless it was taken over).
func (w *handoffWatch) stop() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.done.CompareAndSwap(false, true) {
		w.timer.Stop()
		w.takeover <- false
	}
}

// wait blocks the standby until it must take over (true) or the loop ended
// (false).
func (w *handoffWatch) wait() bool { return <-w.takeover }

func (w *handoffWatch) tick() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.done.Load() {
		return
	}
	e := w.epoch.Add(1)
	switch began := w.began.Load(); {
	case began != 0 && began < e:
		// Running since before the previous tick: a whole budget at least.
		w.done.Store(true)
		w.takeover <- true
	case began != 0 || w.seen.Swap(false):
		w.timer.Reset(w.budget) // deliveries come in: keep ticking
	default:
		w.ticking.Store(false) // a whole budget without one: rest
		if w.seen.Load() && w.ticking.CompareAndSwap(false, true) {
			w.timer.Reset(w.budget) // one began meanwhile
		}
	}
}

// next receives the next delivery; before it waits for one, it sends the
// answers (bundler) and then the acknowledgements that wait.
func (l *link) next(ds <-chan amqp.Delivery, ack *acker, bundler *replyBundler) (amqp.Delivery, bool) {
	if ack != nil {
		select {
		case d, ok := <-ds:
			if ok {
				return d, true
			}
		default:
		}
		if bundler.burst() {
			// The next delivery may be on its way (amqp091-go's reader
			// waits in the run queue behind this loop): let it come, to
			// go in the same bundle.
			runtime.Gosched()
			select {
			case d, ok := <-ds:
				if ok {
					return d, true
				}
			default:
			}
		}
		bundler.flush()
		ack.flush()
	}
	d, ok := <-ds
	if !ok && ack != nil {
		// The consumer was cancelled: the channel may still take them.
		bundler.flush()
		ack.flush()
	}
	return d, ok
}

// delivery converts an amqp091 delivery.
func (l *link) delivery(ch *amqp.Channel, c consumerSpec, d amqp.Delivery) delivery {
	dv := delivery{
		Body:          d.Body,
		CorrelationID: d.CorrelationId,
		ReplyTo:       d.ReplyTo,
		Type:          d.Type,
		Headers:       d.Headers,
		Redelivered:   d.Redelivered,
	}
	if deaths, ok := d.Headers["x-death"].([]any); ok && len(deaths) > 0 {
		dv.DeadLettered = true
		if t, ok := deaths[0].(amqp.Table); ok {
			dv.DeathReason, _ = t["reason"].(string)
		}
	}
	if !c.AutoAck {
		dv.ch, dv.tag = ch, d.DeliveryTag
	}
	return dv
}

func (l *link) markDown() {
	l.mu.Lock()
	defer l.mu.Unlock()
	select {
	case <-l.ready:
		l.ready = make(chan struct{})
	default:
	}
	l.conn, l.consChans, l.consTags = nil, nil, nil
	l.chans.Store(nil)
}

func (l *link) shutdown(conn *amqp.Connection) {
	l.mu.Lock()
	l.stopped = true
	l.mu.Unlock()
	l.markDown()
	_ = conn.Close()
}

// stopConsuming cancels every consumer so that no new deliveries arrive;
// messages already delivered can still be acknowledged.
func (l *link) stopConsuming() {
	l.mu.Lock()
	chans, tags := l.consChans, l.consTags
	l.stopCons = true
	l.mu.Unlock()
	for i, ch := range chans {
		_ = ch.Cancel(tags[i], false)
	}
}

// pubChans are a connection's publishing channels.
type pubChans struct{ pub, conf *amqp.Channel }

// connected reports whether the link is up right now.
func (l *link) connected() bool { return l.chans.Load() != nil }

// awaitUp blocks until the link is connected, the broker refused it for
// good, or ctx ends; then it says why not, naming the last connection
// error.
func (l *link) awaitUp(ctx context.Context) error {
	l.mu.Lock()
	ready := l.ready
	l.mu.Unlock()
	select {
	case <-ready:
		return nil
	case <-l.failed:
		l.mu.Lock()
		defer l.mu.Unlock()
		return l.failErr
	case <-ctx.Done():
		l.mu.Lock()
		defer l.mu.Unlock()
		if l.lastErr != nil {
			return fmt.Errorf("%w: %w (%w)", ErrConnection, l.lastErr, context.Cause(ctx))
		}
		return fmt.Errorf("%w: not connected yet: %w", ErrConnection, context.Cause(ctx))
	}
}

// waitReady blocks until the link is connected or ctx ends.
func (l *link) waitReady(ctx context.Context) error {
	l.mu.Lock()
	ready := l.ready
	l.mu.Unlock()
	select {
	case <-ready:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("%w: %w", errNotConnected, context.Cause(ctx))
	}
}

// publish sends m, waiting for a connection while ctx allows. A persistent
// message is acknowledged by the broker (publisher confirm) before publish
// returns. A publish that fails because the connection dropped is retried on
// the next connection until ctx ends.
func (l *link) publish(ctx context.Context, m message) error {
	contentType := m.ContentType
	if contentType == "" {
		contentType = "application/json"
	}
	pub := amqp.Publishing{
		Headers:       amqp.Table(m.Headers),
		ContentType:   contentType,
		CorrelationId: m.CorrelationID,
		ReplyTo:       m.ReplyTo,
		Type:          m.Type,
		Body:          m.Body,
	}
	if m.Expiration > 0 {
		pub.Expiration = l.expiration(m.Expiration)
	}
	if m.Persistent {
		pub.DeliveryMode = amqp.Persistent
	}
	for {
		var ch *amqp.Channel
		if c := l.chans.Load(); c != nil {
			ch = c.pub
			if m.Persistent {
				ch = c.conf
			}
		}
		if ch == nil {
			if err := l.waitReady(ctx); err != nil {
				return err
			}
			continue
		}
		var err error
		if m.Persistent {
			var dc *amqp.DeferredConfirmation
			dc, err = ch.PublishWithDeferredConfirmWithContext(ctx, m.Exchange, m.Key, m.Mandatory, false, pub)
			if err == nil {
				var ok bool
				ok, err = dc.WaitContext(ctx)
				if err == nil && !ok {
					return fmt.Errorf("nanite: broker refused message for %s", m.Key)
				}
				if err != nil && ctx.Err() != nil {
					return fmt.Errorf("nanite: waiting for publisher confirm: %w", err)
				}
			}
		} else {
			err = ch.PublishWithContext(ctx, m.Exchange, m.Key, m.Mandatory, false, pub)
		}
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("nanite: publish to %q: %w", m.Key, err)
		}
		if !errors.Is(err, amqp.ErrClosed) && !ch.IsClosed() {
			return fmt.Errorf("nanite: publish to %q: %w", m.Key, err)
		}
		// The channel went away under us: wait for the next connection.
		select {
		case <-ctx.Done():
			return fmt.Errorf("nanite: publish to %q: %w", m.Key, err)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// expiration is the AMQP expiration property for ttl: milliseconds, at
// least 1, in decimal. Requests sent within the same millisecond with the
// same timeout share one string (the last one made is kept).
func (l *link) expiration(ttl time.Duration) string {
	ms := max(ttl.Milliseconds(), 1)
	if last := l.lastExp.Load(); last != nil && last.ms == ms {
		return last.s
	}
	e := &expirationString{ms: ms, s: strconv.FormatInt(ms, 10)}
	l.lastExp.Store(e)
	return e.s
}

type expirationString struct {
	ms int64
	s  string
}

// publishBy publishes m, waiting for a connection while ctx allows and
// until deadline at most (a zero deadline waits up to fallback). It builds a
// context only when it has to wait, which keeps the hot path free of
// timers.
func (l *link) publishBy(ctx context.Context, deadline time.Time, fallback time.Duration, m message) error {
	if l.connected() && !m.Persistent && ctx.Err() == nil { // a confirm wait needs a deadline
		err := l.publish(context.Background(), m)
		if err == nil || !errors.Is(err, amqp.ErrClosed) {
			return err
		}
	}
	if deadline.IsZero() {
		deadline = time.Now().Add(fallback)
	}
	ctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	return l.publish(ctx, m)
}

// declare runs f on a fresh channel of the current connection.
func (l *link) declare(ctx context.Context, f func(topology) error) error {
	if err := l.waitReady(ctx); err != nil {
		return err
	}
	l.mu.Lock()
	conn := l.conn
	l.mu.Unlock()
	if conn == nil {
		return errNotConnected
	}
	ch, err := conn.Channel()
	if err != nil {
		return fmt.Errorf("nanite: open channel: %w", err)
	}
	defer ch.Close()
	return f(newTopology(conn, ch))
}
