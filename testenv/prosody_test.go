package testenv_test

import (
	"crypto/sha1"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/xml"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/nanite-go/nanite/testenv"
)

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), nil))
}

// xmppConn is just enough raw XMPP to check the server: stream headers,
// SASL PLAIN, STARTTLS and the component handshake.
type xmppConn struct {
	t    *testing.T
	conn net.Conn
	dec  *xml.Decoder
}

func dialXMPP(t *testing.T, addr string) *xmppConn {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	return &xmppConn{t: t, conn: conn, dec: xml.NewDecoder(conn)}
}

func (c *xmppConn) send(format string, args ...any) {
	c.t.Helper()
	if _, err := fmt.Fprintf(c.conn, format, args...); err != nil {
		c.t.Fatal(err)
	}
}

// openStream sends a stream header in namespace ns to domain and returns
// the id of the server's answering stream header.
func (c *xmppConn) openStream(ns, to string) string {
	c.t.Helper()
	c.send(`<?xml version='1.0'?><stream:stream xmlns='%s' xmlns:stream='http://etherx.jabber.org/streams' to='%s' version='1.0'>`, ns, to)
	for {
		tok, err := c.dec.Token()
		if err != nil {
			c.t.Fatalf("reading stream header: %v", err)
		}
		if se, ok := tok.(xml.StartElement); ok {
			if se.Name.Local != "stream" {
				c.t.Fatalf("got <%s>, want a stream header", se.Name.Local)
			}
			for _, a := range se.Attr {
				if a.Name.Local == "id" && a.Value != "" {
					return a.Value
				}
			}
			c.t.Fatal("stream header without id")
		}
	}
}

type element struct {
	XMLName xml.Name
	Attrs   []xml.Attr `xml:",any,attr"`
	Inner   string     `xml:",innerxml"`
}

func (e element) attr(name string) string {
	for _, a := range e.Attrs {
		if a.Name.Local == name {
			return a.Value
		}
	}
	return ""
}

// next returns the next top-level element of the stream.
func (c *xmppConn) next() element {
	c.t.Helper()
	for {
		tok, err := c.dec.Token()
		if err != nil {
			c.t.Fatalf("reading element: %v", err)
		}
		if se, ok := tok.(xml.StartElement); ok {
			var e element
			if err := c.dec.DecodeElement(&e, &se); err != nil {
				c.t.Fatal(err)
			}
			return e
		}
	}
}

// plainAuth opens a client stream to domain and authenticates with SASL
// PLAIN, reporting whether the server accepted.
func plainAuth(t *testing.T, addr, domain, user, pass string) bool {
	t.Helper()
	c := dialXMPP(t, addr)
	c.openStream("jabber:client", domain)
	if f := c.next(); f.XMLName.Local != "features" {
		t.Fatalf("got <%s>, want features", f.XMLName.Local)
	}
	creds := base64.StdEncoding.EncodeToString([]byte("\x00" + user + "\x00" + pass))
	c.send(`<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>%s</auth>`, creds)
	switch e := c.next(); e.XMLName.Local {
	case "success":
		return true
	case "failure":
		return false
	default:
		t.Fatalf("got <%s> after auth", e.XMLName.Local)
		return false
	}
}

// componentHandshake authenticates as a XEP-0114 component.
func componentHandshake(t *testing.T, addr, domain, secret string) bool {
	t.Helper()
	_, ok := componentLogin(t, addr, domain, secret)
	return ok
}

// componentLogin connects as a XEP-0114 component and reports whether the
// server accepted; the connection stays open until the test ends.
func componentLogin(t *testing.T, addr, domain, secret string) (*xmppConn, bool) {
	t.Helper()
	c := dialXMPP(t, addr)
	id := c.openStream("jabber:component:accept", domain)
	sum := sha1.Sum([]byte(id + secret))
	c.send(`<handshake>%s</handshake>`, hex.EncodeToString(sum[:]))
	switch e := c.next(); e.XMLName.Local {
	case "handshake":
		return c, true
	case "error":
		return c, false
	default:
		t.Fatalf("got <%s> after handshake", e.XMLName.Local)
		return c, false
	}
}

func startTLS(t *testing.T, addr, domain, caFile string) {
	t.Helper()
	c := dialXMPP(t, addr)
	c.openStream("jabber:client", domain)
	if f := c.next(); f.XMLName.Local != "features" {
		t.Fatalf("got <%s>, want features", f.XMLName.Local)
	}
	c.send(`<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>`)
	if e := c.next(); e.XMLName.Local != "proceed" {
		t.Fatalf("got <%s>, want proceed", e.XMLName.Local)
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	tc := tls.Client(c.conn, &tls.Config{RootCAs: pool, ServerName: domain, MinVersion: tls.VersionTLS12})
	if err := tc.Handshake(); err != nil {
		t.Fatalf("STARTTLS handshake for %s: %v", domain, err)
	}
}

func TestProsody(t *testing.T) {
	t.Parallel()
	p := testenv.RunProsody(t, testenv.ProsodyOptions{
		VirtualHosts: []string{"site-a.test", "site-b.test"},
		Components:   map[string]string{"nanite.site-a.test": "s3cret"},
		Accounts:     []testenv.Account{{User: "alice", Host: "site-a.test", Password: "pw-a"}},
		Logger:       testLogger(t),
	})
	ctx := t.Context()

	if !componentHandshake(t, p.ComponentAddr(), "nanite.site-a.test", "s3cret") {
		t.Fatal("component handshake refused")
	}
	if componentHandshake(t, p.ComponentAddr(), "nanite.site-a.test", "wrong") {
		t.Fatal("component handshake with a wrong secret accepted")
	}
	if !plainAuth(t, p.C2SAddr(), "site-a.test", "alice", "pw-a") {
		t.Fatal("alice refused")
	}
	if plainAuth(t, p.C2SAddr(), "site-a.test", "alice", "wrong") {
		t.Fatal("wrong password accepted")
	}
	// Accounts added while the server runs work at once.
	if err := p.AddAccount(ctx, testenv.Account{User: "bob", Host: "site-b.test", Password: "pw-b"}); err != nil {
		t.Fatal(err)
	}
	if !plainAuth(t, p.C2SAddr(), "site-b.test", "bob", "pw-b") {
		t.Fatal("bob refused")
	}
	for _, h := range []string{"site-a.test", "site-b.test"} {
		startTLS(t, p.C2SAddr(), h, p.CAFile())
	}

	// Restart keeps ports and accounts.
	c2s, comp := p.C2SAddr(), p.ComponentAddr()
	if err := p.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	if p.C2SAddr() != c2s || p.ComponentAddr() != comp {
		t.Fatal("ports changed on restart")
	}
	if !plainAuth(t, p.C2SAddr(), "site-b.test", "bob", "pw-b") {
		t.Fatal("bob refused after restart")
	}
	if err := p.Kill(); err != nil {
		t.Fatal(err)
	}
	if c, err := net.DialTimeout("tcp", p.C2SAddr(), time.Second); err == nil {
		_ = c.Close()
		t.Fatal("killed server accepts connections")
	}
	if err := p.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if !componentHandshake(t, p.ComponentAddr(), "nanite.site-a.test", "s3cret") {
		t.Fatal("component handshake refused after kill and start")
	}
	if logs := p.Logs(); !strings.Contains(logs, "Hello and welcome to Prosody") {
		t.Fatalf("Logs() lacks prosody's greeting:\n%s", logs)
	}
}
