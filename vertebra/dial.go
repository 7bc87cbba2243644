package vertebra

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"

	"mellium.im/sasl"
	"mellium.im/xmpp"
	"mellium.im/xmpp/component"
	"mellium.im/xmpp/jid"
)

// DialConfig says how to open an XMPP session: as a client (c2s, with
// STARTTLS and SASL) or, when Secret is set, as an external component
// (XEP-0114).
type DialConfig struct {
	// JID is the client's address, user@domain or user@domain/resource
	// (the resource is asked for when binding), or the component's domain.
	JID jid.JID
	// Password of the client account.
	Password string
	// Secret of the component; setting it makes this a component.
	Secret string
	// Addr is the server's host:port. Default for a client: the JID's
	// domain, port 5222 (no DNS SRV lookup). Required for a component.
	Addr string
	// TLSConfig is used for STARTTLS; its ServerName defaults to the JID's
	// domain. Set RootCAs (see LoadCAFile) for a private CA.
	TLSConfig *tls.Config
	// AllowPlaintext logs a client in without TLS. It is refused unless
	// the server's address is a loopback address: it exists for tests.
	AllowPlaintext bool
	// TeeIn and TeeOut, when set, get a copy of the XML read and written
	// (after TLS: passwords in PLAIN auth are visible). For debugging.
	TeeIn, TeeOut io.Writer
}

// IsComponent reports whether the config is for a component.
func (c *DialConfig) IsComponent() bool { return c.Secret != "" }

// ErrPlaintext: plaintext was allowed for a server that is not on loopback.
var ErrPlaintext = errors.New("vertebra: plaintext XMPP is allowed only to a loopback address")

// Dial connects and negotiates a session. The returned session is not yet
// served: call its Serve (see Conn, which does it all and reconnects).
func Dial(ctx context.Context, cfg DialConfig) (*xmpp.Session, error) {
	addr := cfg.Addr
	if addr == "" {
		if cfg.IsComponent() {
			return nil, errors.New("vertebra: a component needs the server's component address")
		}
		addr = net.JoinHostPort(cfg.JID.Domainpart(), "5222")
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("vertebra: connect to %s: %w", addr, err)
	}
	s, err := negotiate(ctx, cfg, conn)
	if err != nil {
		_ = conn.Close()
		if isAuthError(err) || errors.Is(err, ErrPlaintext) {
			return nil, fmt.Errorf("%w: log in to %s as %s: %w", ErrAuth, addr, cfg.JID, err)
		}
		if cfg.AllowPlaintext && strings.Contains(err.Error(), "features advertised out of order") {
			// A server that requires TLS offers STARTTLS first, which a
			// plaintext session cannot take.
			return nil, fmt.Errorf("%w: log in to %s as %s without TLS (does the server require TLS?): %w", ErrAuth, addr, cfg.JID, err)
		}
		return nil, fmt.Errorf("vertebra: log in to %s as %s: %w", addr, cfg.JID, err)
	}
	return s, nil
}

func negotiate(ctx context.Context, cfg DialConfig, conn net.Conn) (*xmpp.Session, error) {
	if cfg.IsComponent() {
		if cfg.TeeIn != nil || cfg.TeeOut != nil {
			conn = teeConn{Conn: conn, in: cfg.TeeIn, out: cfg.TeeOut}
		}
		return component.NewSession(ctx, cfg.JID.Domain(), []byte(cfg.Secret), conn)
	}
	var state xmpp.SessionState
	var features []xmpp.StreamFeature
	if cfg.AllowPlaintext {
		ta, ok := conn.RemoteAddr().(*net.TCPAddr)
		if !ok || !ta.IP.IsLoopback() {
			return nil, ErrPlaintext
		}
		// The session must believe it is secure to offer a password.
		state = xmpp.Secure
	} else {
		tc := &tls.Config{MinVersion: tls.VersionTLS12}
		if cfg.TLSConfig != nil {
			tc = cfg.TLSConfig.Clone()
		}
		if tc.ServerName == "" {
			tc.ServerName = cfg.JID.Domainpart()
		}
		features = append(features, xmpp.StartTLS(tc))
	}
	features = append(features,
		xmpp.SASL("", cfg.Password, sasl.ScramSha256Plus, sasl.ScramSha1Plus, sasl.ScramSha256, sasl.ScramSha1, sasl.Plain),
		bindResource(cfg.JID.Resourcepart()),
	)
	return xmpp.NewSession(ctx, cfg.JID.Domain(), cfg.JID, conn, state, xmpp.NewNegotiator(
		func(*xmpp.Session, *xmpp.StreamConfig) xmpp.StreamConfig {
			return xmpp.StreamConfig{Features: features, TeeIn: cfg.TeeIn, TeeOut: cfg.TeeOut}
		}))
}

type teeConn struct {
	net.Conn
	in, out io.Writer
}

func (c teeConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if n > 0 && c.in != nil {
		_, _ = c.in.Write(b[:n])
	}
	return n, err
}

func (c teeConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	if n > 0 && c.out != nil {
		_, _ = c.out.Write(b[:n])
	}
	return n, err
}

// LoadCAFile returns a TLS config that trusts the PEM certificates in file
// (and not the system roots).
func LoadCAFile(file string) (*tls.Config, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("vertebra: CA file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("vertebra: CA file %s: no PEM certificates", file)
	}
	return &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}, nil
}
