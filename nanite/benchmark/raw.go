package benchmark

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// rawSide is the baseline: a plain amqp091-go RPC written the way a careful
// user would, with nothing nanite does that a bare echo does not need
// (no envelope, no TTL, no mandatory flag), and nothing taken away that a
// fair comparison needs (prefetch like the agent's, ack after replying,
// per-request timeout).
type rawSide struct {
	srvConn *amqp.Connection
	cliConn *amqp.Connection
	queue   string
	reply   string
	pub     *amqp.Channel // the requester's publishing channel

	seq     atomic.Uint64
	mu      sync.Mutex
	pending map[string]chan []byte

	done sync.WaitGroup
}

func (r *rawSide) name() string { return "raw" }

func dial(url, name string) (*amqp.Connection, error) {
	props := amqp.NewConnectionProperties()
	props.SetClientConnectionName(name)
	conn, err := amqp.DialConfig(url, amqp.Config{
		Heartbeat:  5 * time.Second, // as nanite's link
		Properties: props,
		Dial:       amqp.DefaultDial(5 * time.Second),
	})
	if err != nil {
		return nil, fmt.Errorf("benchmark: dial broker: %w", err)
	}
	return conn, nil
}

func newRawSide(ctx context.Context, url string, prefetch int, spawn bool) (*rawSide, error) {
	return newRawRelay(ctx, url, prefetch, spawn, nil)
}

// newRawRelay is newRawSide whose server answers with what relay returns
// for the request's body (each in its own goroutine: relay waits on
// something else) instead of echoing it; nil relay echoes.
func newRawRelay(ctx context.Context, url string, prefetch int, spawn bool, relay func(context.Context, []byte) ([]byte, error)) (_ *rawSide, err error) {
	var b [6]byte
	_, _ = rand.Read(b[:])
	r := &rawSide{queue: "nanite.bench.echo." + hex.EncodeToString(b[:]), pending: map[string]chan []byte{}}
	defer func() {
		if err != nil {
			_ = r.close()
		}
	}()

	// The echo server: its own connection, a consuming channel with qos
	// like the agent's, a publishing channel for replies.
	if r.srvConn, err = dial(url, "nanite-bench raw-server"); err != nil {
		return nil, err
	}
	sch, err := r.srvConn.Channel()
	if err != nil {
		return nil, err
	}
	if _, err := sch.QueueDeclare(r.queue, false, true, false, false, nil); err != nil {
		return nil, fmt.Errorf("benchmark: declare echo queue: %w", err)
	}
	if err := sch.Qos(prefetch, 0, false); err != nil {
		return nil, err
	}
	spub, err := r.srvConn.Channel()
	if err != nil {
		return nil, err
	}
	ds, err := sch.Consume(r.queue, "", false, false, false, false, nil)
	if err != nil {
		return nil, fmt.Errorf("benchmark: consume echo queue: %w", err)
	}
	r.done.Add(1)
	go func() {
		defer r.done.Done()
		// By default echo in the delivery loop: for a handler this cheap a
		// goroutine per message would only add cost; the prefetch window
		// keeps the pipeline full. With spawn, each message is handled in
		// its own goroutine, as nanite's agent does.
		var handlers sync.WaitGroup
		defer handlers.Wait()
		echo := func(d amqp.Delivery) {
			body := d.Body
			if relay != nil {
				var err error
				if body, err = relay(context.Background(), d.Body); err != nil {
					body = nil // the requester counts an error
				}
			}
			err := spub.Publish("", d.ReplyTo, false, false, amqp.Publishing{
				ContentType: "application/json", CorrelationId: d.CorrelationId, Body: body})
			if err != nil {
				_ = d.Nack(false, true)
				return
			}
			_ = d.Ack(false)
		}
		for d := range ds {
			if spawn || relay != nil {
				handlers.Add(1)
				go func() {
					defer handlers.Done()
					echo(d)
				}()
				continue
			}
			echo(d)
		}
	}()

	// The requester: its own connection, an exclusive auto-ack reply queue
	// and a dispatcher that hands each reply to its waiting goroutine.
	if r.cliConn, err = dial(url, "nanite-bench raw-client"); err != nil {
		return nil, err
	}
	cch, err := r.cliConn.Channel()
	if err != nil {
		return nil, err
	}
	q, err := cch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		return nil, fmt.Errorf("benchmark: declare reply queue: %w", err)
	}
	r.reply = q.Name
	replies, err := cch.Consume(r.reply, "", true, true, false, false, nil)
	if err != nil {
		return nil, fmt.Errorf("benchmark: consume reply queue: %w", err)
	}
	r.done.Add(1)
	go func() {
		defer r.done.Done()
		for d := range replies {
			r.mu.Lock()
			ch := r.pending[d.CorrelationId]
			delete(r.pending, d.CorrelationId)
			r.mu.Unlock()
			if ch != nil {
				ch <- d.Body
			}
		}
	}()
	if r.pub, err = r.cliConn.Channel(); err != nil {
		return nil, err
	}
	// One round trip proves the path before measuring.
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := r.do(ctx, []byte(`"ping"`)); err != nil {
		return nil, fmt.Errorf("benchmark: raw echo does not answer: %w", err)
	}
	return r, nil
}

func (r *rawSide) do(ctx context.Context, payload []byte) error {
	body, err := r.call(ctx, payload)
	if err == nil && len(body) != len(payload) {
		err = fmt.Errorf("benchmark: raw echo answered %d bytes for %d", len(body), len(payload))
	}
	return err
}

// call makes one request and returns the answer's body.
func (r *rawSide) call(ctx context.Context, payload []byte) ([]byte, error) {
	id := strconv.FormatUint(r.seq.Add(1), 36)
	ch := make(chan []byte, 1)
	r.mu.Lock()
	r.pending[id] = ch
	r.mu.Unlock()
	err := r.pub.PublishWithContext(ctx, "", r.queue, false, false, amqp.Publishing{
		ContentType: "application/json", CorrelationId: id, ReplyTo: r.reply, Body: payload})
	if err == nil {
		select {
		case body := <-ch:
			return body, nil
		case <-ctx.Done():
			err = ctx.Err()
		}
	}
	r.mu.Lock()
	delete(r.pending, id)
	r.mu.Unlock()
	return nil, err
}

func (r *rawSide) close() error {
	var errs []error
	for _, c := range []*amqp.Connection{r.cliConn, r.srvConn} {
		if c != nil {
			if err := c.Close(); err != nil && !errors.Is(err, amqp.ErrClosed) {
				errs = append(errs, err)
			}
		}
	}
	r.done.Wait()
	return errors.Join(errs...)
}
