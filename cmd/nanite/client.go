package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"slices"
	"time"

	"github.com/nanite-go/nanite/nanite"
)

// checkBroker tells a broker that cannot be reached at all (nothing
// listening, unknown host) at once, as a connectionError, instead of letting
// the mapper retry in the background until the request's deadline. It only
// opens and closes a TCP connection (and, for amqps://, checks the TLS
// handshake: see checkTLS); credentials and vhost are checked by the mapper
// itself.
func checkBroker(ctx context.Context, raw string, tlsConfig *tls.Config) error {
	u, err := url.Parse(raw)
	if err != nil {
		return usageErrorf("broker URL: %v", err)
	}
	port := "5672"
	switch u.Scheme {
	case "amqp":
	case "amqps":
		port = "5671"
	default:
		return usageErrorf("broker URL %s: the scheme must be amqp or amqps", redactURL(raw))
	}
	host := u.Hostname()
	if host == "" {
		host = "localhost"
	}
	if p := u.Port(); p != "" {
		port = p
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(host, port))
	if err != nil {
		return &connectionError{URL: raw, Err: err}
	}
	_ = conn.Close()
	return checkTLS(ctx, raw, tlsConfig)
}

// cluster is the mapper a one-shot command (request, push, agents) embeds.
type cluster struct {
	m      *nanite.Mapper
	url    string
	secure bool
	cancel context.CancelFunc
	done   chan struct{}
	err    error // Run's result, readable once done is closed

	started time.Time
}

// openCluster checks that the broker is reachable and starts an embedded
// mapper on it. Close it when done.
func openCluster(ctx context.Context, rawURL string, tlsConfig *tls.Config, log *slog.Logger) (*cluster, error) {
	return openSecureCluster(ctx, rawURL, tlsConfig, nil, log)
}

// openSecureCluster is openCluster in secure mode when sec is not nil: the
// embedded mapper runs under the name of sec's certificate (see secure.go).
func openSecureCluster(ctx context.Context, rawURL string, tlsConfig *tls.Config, sec *nanite.Secure, log *slog.Logger) (*cluster, error) {
	if err := checkBroker(ctx, rawURL, tlsConfig); err != nil {
		return nil, err
	}
	cfg := nanite.MapperConfig{URL: rawURL, TLS: tlsConfig, Logger: log}
	if sec != nil {
		cfg.Identity, cfg.Secure = sec.Identity.Name, sec
	}
	m, err := nanite.NewMapper(cfg)
	if err != nil {
		return nil, err
	}
	rctx, cancel := context.WithCancel(ctx)
	c := &cluster{m: m, url: rawURL, secure: sec != nil, cancel: cancel, done: make(chan struct{}), started: time.Now()}
	go func() {
		defer close(c.done)
		c.err = m.Run(rctx)
	}()
	return c, nil
}

// Close stops the mapper and waits for it.
func (c *cluster) Close() {
	c.cancel()
	<-c.done
}

// failed returns the mapper's own failure as a connectionError once it has
// stopped, and nil while it runs.
func (c *cluster) failed() error {
	select {
	case <-c.done:
		if c.err != nil {
			return &connectionError{URL: c.url, Err: c.err}
		}
		return fmt.Errorf("%w: the embedded mapper stopped", nanite.ErrClosed)
	default:
		return nil
	}
}

// authFailureDelay is how long RabbitMQ takes to answer bad credentials or
// a missing vhost: it closes the connection after 3 s, since the client
// library does not ask for an immediate close (the
// authentication_failure_close capability).
const authFailureDelay = 3500 * time.Millisecond

// explain replaces the error of a request by the mapper's own failure (bad
// credentials, unknown vhost) when there is one: that is the real cause.
// When the request found no agent and the mapper has seen no agent at all,
// a refused connection and an empty cluster look alike until RabbitMQ
// answers; explain waits for that (up to authFailureDelay after the start).
func (c *cluster) explain(ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, nanite.ErrNoAgent) || errors.Is(err, nanite.ErrTimeout) || errors.Is(err, nanite.ErrClosed) {
		c.awaitRefusal(ctx)
	}
	if ferr := c.failed(); ferr != nil && !errors.Is(ferr, nanite.ErrClosed) {
		return ferr
	}
	if errors.Is(err, nanite.ErrNoAgent) && len(c.m.Agents()) == 0 {
		// Nothing registered at all: say what was refused. (With agents
		// registered, refusals are routine: heartbeats without their
		// certificate from agents that had not registered yet.)
		if hint := rejectHint(c.m.Stats(), c.secure); hint != "" {
			err = fmt.Errorf("%w; %s", err, hint)
		}
	}
	return err
}

// awaitRefusal waits until authFailureDelay after the start for the mapper
// to fail, unless it has seen an agent (then it is connected).
func (c *cluster) awaitRefusal(ctx context.Context) {
	if len(c.m.Agents()) > 0 {
		return
	}
	t := time.NewTimer(time.Until(c.started.Add(authFailureDelay)))
	defer t.Stop()
	select {
	case <-c.done:
	case <-t.C:
	case <-ctx.Done():
	}
}

// waitAgents waits up to d for the agents offering service (any agent
// when service is "") to register: for the first one, then until no other
// one has registered for settleTime, so that a request to all agents (or to
// the least loaded one) sees the whole cluster, not only the quickest
// agent. It returns early when the mapper fails. Running out of time is
// not an error: the mapper answers "no agent" itself.
func (c *cluster) waitAgents(ctx context.Context, service string, d time.Duration) error {
	wctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	werr := make(chan error, 1)
	go func() {
		err := c.m.WaitForAgents(wctx, service, 1)
		for err == nil {
			sctx, scancel := context.WithTimeout(wctx, settleTime)
			err = c.m.WaitForAgents(sctx, service, c.offering(service)+1)
			scancel()
		}
		werr <- err
	}()
	select {
	case <-c.done:
		cancel()
		<-werr
		return c.failed()
	case <-werr:
	}
	// This call also orders the mapper's start before our requests for the
	// race detector (see the report on Mapper.Run and Mapper.Request).
	_ = c.m.Agents()
	if ctx.Err() != nil {
		return context.Cause(ctx)
	}
	return c.failed()
}

// settleTime is how long waitAgents waits for one more agent after the
// last registration: the answers to the mapper's advertise arrive together.
const settleTime = 150 * time.Millisecond

// offering counts the agents the mapper knows that offer service (all
// agents when service is "").
func (c *cluster) offering(service string) int {
	n := 0
	for _, a := range c.m.Agents() {
		if service == "" || slices.ContainsFunc(a.Services, func(s nanite.ServiceInfo) bool { return s.Name == service }) {
			n++
		}
	}
	return n
}

// gather waits the whole of d for agents to register (the mapper asks all
// agents to advertise when it starts), returning early when the mapper
// fails.
func (c *cluster) gather(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-c.done:
		return c.failed()
	case <-ctx.Done():
		return context.Cause(ctx)
	case <-t.C:
		return nil
	}
}
