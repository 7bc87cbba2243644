package vertebra

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"mellium.im/xmpp"
	"mellium.im/xmpp/component"
	"mellium.im/xmpp/disco"
	"mellium.im/xmpp/mux"
	"mellium.im/xmpp/ping"
	"mellium.im/xmpp/stanza"
	"mellium.im/xmpp/stream"
)

// ErrAuth: the server refused the credentials (SASL failure, or a
// component's handshake). Conn.Run gives up on it instead of retrying.
var ErrAuth = errors.New("vertebra: authentication failed")

// isAuthError reports whether err is a refusal of our credentials.
func isAuthError(err error) bool {
	var se stream.Error
	if errors.As(err, &se) && se.Err == "not-authorized" {
		return true
	}
	// mellium's SASL failure type is internal; recognise it by name.
	for e := err; e != nil; e = errors.Unwrap(e) {
		if fmt.Sprintf("%T", e) == "saslerr.Error" {
			return true
		}
	}
	return false
}

// ConnConfig configures a Conn.
type ConnConfig struct {
	Dial DialConfig
	// Endpoint is registered on the session (Handle) and given each new
	// session (SetSession). Required.
	Endpoint *Endpoint
	// Options add handlers to the session's mux. The endpoint's, XEP-0199
	// ping and XEP-0030 disco (listing the features of all handlers) are
	// always there.
	Options []mux.Option
	// OnConnect runs in its own goroutine after each (re)connection, while
	// the session is served; its context ends with the session. Agents use
	// it to send presence.
	OnConnect func(ctx context.Context, s *xmpp.Session)
	// Backoff between connection attempts: from MinBackoff doubling to
	// MaxBackoff. Defaults 100 ms and 5 s.
	MinBackoff, MaxBackoff time.Duration
	// Logger receives connection events; nil discards them.
	Logger *slog.Logger
}

// Conn keeps one XMPP session alive: it connects, serves the session and,
// when the server goes away, connects again with backoff, until Run's
// context ends.
type Conn struct {
	cfg ConnConfig
	log *slog.Logger

	readyOnce sync.Once
	ready     chan struct{}

	mu   sync.Mutex
	sess *xmpp.Session
}

// NewConn returns a connection; Run makes it.
func NewConn(cfg ConnConfig) *Conn {
	if cfg.Endpoint == nil {
		panic("vertebra: ConnConfig.Endpoint is required")
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = 100 * time.Millisecond
	}
	if cfg.MaxBackoff < cfg.MinBackoff {
		cfg.MaxBackoff = max(5*time.Second, cfg.MinBackoff)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Conn{cfg: cfg, log: cfg.Logger, ready: make(chan struct{})}
}

// Ready is closed once the first session is up.
func (c *Conn) Ready() <-chan struct{} { return c.ready }

// Session returns the current session, or nil while disconnected.
func (c *Conn) Session() *xmpp.Session {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sess
}

// newMux returns the mux of a session: the endpoint, ping, disco and opts.
func newMux(s *xmpp.Session, ep *Endpoint, opts ...mux.Option) *mux.ServeMux {
	ns := stanza.NSClient
	if s.In().XMLNS == component.NSAccept {
		ns = component.NSAccept
	}
	all := append([]mux.Option{ep.Handle(), ping.Handle(), disco.Handle()}, opts...)
	return mux.New(ns, all...)
}

// ServeSession serves a session made with Dial for ep (and XEP-0199 ping,
// XEP-0030 disco and opts) until it ends or the returned function is
// called, which closes the session and waits for the end. It is for
// short-lived sessions such as a command's; Conn also reconnects.
func ServeSession(s *xmpp.Session, ep *Endpoint, opts ...mux.Option) (closeSession func()) {
	m := newMux(s, ep, opts...)
	ep.SetSession(s)
	done := make(chan error, 1)
	go func() {
		err := s.Serve(m)
		if err != nil && ep.ctx.Err() == nil {
			ep.log.Warn("vertebra: session ended", "jid", s.LocalAddr(), "err", err)
		}
		done <- err
	}()
	var once sync.Once
	return func() {
		once.Do(func() {
			closeServed(s, done)
			ep.SetSession(nil)
		})
	}
}

// closeServed closes our stream and waits (briefly) for Serve to end.
func closeServed(s *xmpp.Session, done <-chan error) error {
	// The server closes its stream in answer, which ends Serve.
	// (Session.SetCloseDeadline would race with Serve.)
	_ = s.Close()
	t := time.NewTimer(2 * time.Second)
	defer t.Stop()
	var err error
	select {
	case err = <-done:
	case <-t.C:
		_ = s.Conn().Close()
		err = <-done
	}
	_ = s.Conn().Close()
	return err
}

// Run connects and serves until ctx ends (then it closes the session and
// returns nil) or the server refuses the credentials (ErrAuth).
func (c *Conn) Run(ctx context.Context) error {
	backoff := c.cfg.MinBackoff
	for {
		s, err := Dial(ctx, c.cfg.Dial)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, ErrAuth) {
				return err
			}
			c.log.Warn("vertebra: cannot connect; will retry", "jid", c.cfg.Dial.JID, "in", backoff, "err", err)
			if sleep(ctx, backoff) != nil {
				return nil
			}
			backoff = min(2*backoff, c.cfg.MaxBackoff)
			continue
		}
		backoff = c.cfg.MinBackoff
		c.log.Info("vertebra: connected", "jid", s.LocalAddr(), "server", s.Conn().RemoteAddr())
		if stop := c.serve(ctx, s); stop {
			return nil
		}
		c.log.Warn("vertebra: connection lost; reconnecting", "jid", c.cfg.Dial.JID)
	}
}

// serve serves s until it ends (false) or ctx ends (true).
func (c *Conn) serve(ctx context.Context, s *xmpp.Session) (stop bool) {
	m := newMux(s, c.cfg.Endpoint, c.cfg.Options...)
	c.mu.Lock()
	c.sess = s
	c.mu.Unlock()
	c.cfg.Endpoint.SetSession(s)
	done := make(chan error, 1)
	go func() { done <- s.Serve(m) }()
	sctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	if c.cfg.OnConnect != nil {
		wg.Go(func() { c.cfg.OnConnect(sctx, s) })
	}
	c.readyOnce.Do(func() { close(c.ready) })

	var err error
	select {
	case err = <-done:
	case <-ctx.Done():
		stop = true
		err = closeServed(s, done)
	}
	cancel()
	c.cfg.Endpoint.SetSession(nil)
	c.mu.Lock()
	c.sess = nil
	c.mu.Unlock()
	_ = s.Conn().Close()
	wg.Wait()
	if err != nil && !stop {
		c.log.Debug("vertebra: session ended", "err", err)
	}
	return stop
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
