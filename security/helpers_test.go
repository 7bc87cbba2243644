package security

import (
	"crypto/x509"
	"sync"
	"testing"
	"time"
)

const (
	day  = 24 * time.Hour
	year = 365 * day
)

var (
	testCAOnce sync.Once
	testCA     *CA
	testCAErr  error
)

// sharedCA returns one CA for the tests that do not care which.
func sharedCA(t testing.TB) *CA {
	t.Helper()
	testCAOnce.Do(func() { testCA, testCAErr = NewCA("test-ca", 10*year) })
	if testCAErr != nil {
		t.Fatal(testCAErr)
	}
	return testCA
}

func newCA(t testing.TB, name string) *CA {
	t.Helper()
	ca, err := NewCA(name, 10*year)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func issue(t testing.TB, ca *CA, name string, role Role, opts ...IssueOption) *Identity {
	t.Helper()
	id, err := ca.Issue(name, role, year, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// fakeClock is a settable clock for Verifier.Now.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock(t time.Time) *fakeClock { return &fakeClock{t: t} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Set(t time.Time) {
	c.mu.Lock()
	c.t = t
	c.mu.Unlock()
}

func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func newVerifier(t testing.TB, roots *x509.CertPool, mod func(*VerifierConfig)) *Verifier {
	t.Helper()
	cfg := VerifierConfig{Roots: roots}
	if mod != nil {
		mod(&cfg)
	}
	v, err := NewVerifier(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func sign(t testing.TB, id *Identity, body []byte, opts ...SignOption) []byte {
	t.Helper()
	env, err := id.Sign(body, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return env
}

type x509Cert = x509.Certificate

func mustParse(t testing.TB, der []byte) *x509.Certificate {
	t.Helper()
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
