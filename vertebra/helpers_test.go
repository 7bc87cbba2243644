package vertebra

import (
	"context"
	"log/slog"
	"os"
	"testing"
	"time"

	"mellium.im/xmpp/jid"

	"github.com/nanite-go/nanite/testenv"
)

const (
	testDomain     = "site-a.test"
	testComponent  = "nanite.site-a.test"
	testComponent2 = "other.site-a.test"
	testSecret     = "s3cret"
	testPassword   = "pw"
)

// testUsers get accounts on every test server.
var testUsers = []string{"alice", "bob", "carol", "dave", "agent1", "agent2", "agent3", "dir"}

func runProsody(t testing.TB) *testenv.Prosody {
	t.Helper()
	var accts []testenv.Account
	for _, u := range testUsers {
		accts = append(accts, testenv.Account{User: u, Host: testDomain, Password: testPassword})
	}
	return testenv.RunProsody(t, testenv.ProsodyOptions{
		VirtualHosts: []string{testDomain},
		Components:   map[string]string{testComponent: testSecret, testComponent2: testSecret},
		Accounts:     accts,
	})
}

func testLogger(t testing.TB) *slog.Logger {
	if os.Getenv("VERTEBRA_TEST_LOG") == "" {
		return nil
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func clientDial(t testing.TB, p *testenv.Prosody, user string) DialConfig {
	t.Helper()
	tc, err := LoadCAFile(p.CAFile())
	if err != nil {
		t.Fatal(err)
	}
	return DialConfig{
		JID:       jid.MustParse(user + "@" + testDomain + "/test"),
		Password:  testPassword,
		Addr:      p.C2SAddr(),
		TLSConfig: tc,
	}
}

func componentDial(p *testenv.Prosody) DialConfig {
	return DialConfig{JID: jid.MustParse(testComponent), Secret: testSecret, Addr: p.ComponentAddr()}
}

// startConn runs a Conn for the endpoint until the test ends and waits
// until it is connected.
func startConn(t testing.TB, dc DialConfig, ep *Endpoint, mod ...func(*ConnConfig)) *Conn {
	t.Helper()
	cfg := ConnConfig{Dial: dc, Endpoint: ep, Logger: testLogger(t), MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond}
	for _, f := range mod {
		f(&cfg)
	}
	c := NewConn(cfg)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Conn.Run: %v", err)
		}
		_ = ep.Close()
	})
	select {
	case <-c.Ready():
	case err := <-done:
		t.Fatalf("Conn.Run: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("not connected after 10 s")
	}
	return c
}

func ctxTimeout(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
