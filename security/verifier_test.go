package security

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"net/url"
	"strings"
	"testing"
	"time"
)

// selfSignedCA returns a CA certificate with the given key usage.
func selfSignedCA(t testing.TB, usage x509.KeyUsage) []byte {
	t.Helper()
	pub, key, _ := ed25519.GenerateKey(rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber:          newSerial(),
		Subject:               pkix.Name{CommonName: "ca-with-ds", OrganizationalUnit: []string{"agent"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              usage,
		URIs:                  []*url.URL{nameURI("ca-with-ds", RoleAgent)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func TestVerifyCert(t *testing.T) {
	ca := sharedCA(t)
	id := issue(t, ca, "agent-1", RoleAgent)
	v := newVerifier(t, ca.Pool(), nil)
	p, err := v.VerifyCert(id.Cert.Raw, "agent-1", RoleAgent, RoleMapper)
	if err != nil {
		t.Fatal(err)
	}
	if p.Name != "agent-1" || p.Role != RoleAgent || !p.SealKey.Equal(id.SealKey()) || !p.Cert.Equal(id.Cert) {
		t.Errorf("peer = %+v", p)
	}
	if _, err := v.VerifyCert(id.Cert.Raw, ""); err != nil {
		t.Errorf("empty claimed name, no roles: %v", err)
	}
}

func TestVerifyCertRejects(t *testing.T) {
	ca := sharedCA(t)
	other := newCA(t, "other-ca")
	now := time.Now()
	good := issue(t, ca, "agent-1", RoleAgent)
	for _, tc := range []struct {
		name    string
		der     []byte
		claimed string
		roles   []Role
		now     time.Time
		want    error
	}{
		{"wrong CA", issue(t, other, "agent-1", RoleAgent).Cert.Raw, "agent-1", nil, now, ErrUnknownSigner},
		{"expired", good.Cert.Raw, "agent-1", nil, good.Cert.NotAfter.Add(time.Second), ErrExpired},
		{"not yet valid", good.Cert.Raw, "agent-1", nil, good.Cert.NotBefore.Add(-time.Second), ErrNotYetValid},
		{"CA not yet valid", good.Cert.Raw, "agent-1", nil, ca.Cert.NotBefore.Add(-time.Second), ErrNotYetValid},
		{"name mismatch", good.Cert.Raw, "agent-2", nil, now, ErrNameMismatch},
		{"wrong role", good.Cert.Raw, "agent-1", []Role{RoleMapper, RoleBridge}, now, ErrWrongRole},
		{"garbage", []byte("not a certificate"), "agent-1", nil, now, ErrBadCert},
		{"CA as peer", ca.Cert.Raw, "test-ca", nil, now, ErrBadCert},
		{"invalid name", makeCert(t, ca, func(c *x509.Certificate) {
			c.Subject.CommonName = "bad name"
			c.URIs = []*url.URL{nameURI("bad name", RoleAgent)}
		}), "", nil, now, ErrBadCert},
		{"CA with digitalSignature as peer", selfSignedCA(t, x509.KeyUsageCertSign|x509.KeyUsageDigitalSignature), "", nil, now, ErrBadCert},
		{"no role", makeCert(t, ca, func(c *x509.Certificate) { c.Subject.OrganizationalUnit = nil }), "odd", nil, now, ErrBadCert},
		{"two roles", makeCert(t, ca, func(c *x509.Certificate) { c.Subject.OrganizationalUnit = []string{"agent", "mapper"} }), "odd", nil, now, ErrBadCert},
		{"unknown role", makeCert(t, ca, func(c *x509.Certificate) {
			c.Subject.OrganizationalUnit = []string{"admin"}
			c.URIs = []*url.URL{{Scheme: "nanite", Opaque: "admin/odd"}}
		}), "odd", nil, now, ErrBadCert},
		{"URI disagrees", makeCert(t, ca, func(c *x509.Certificate) { c.URIs = []*url.URL{nameURI("odd", RoleMapper)} }), "odd", nil, now, ErrBadCert},
		{"no URI", makeCert(t, ca, func(c *x509.Certificate) { c.URIs = nil }), "odd", nil, now, ErrBadCert},
		{"server auth only", makeCert(t, ca, func(c *x509.Certificate) { c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth} }), "odd", nil, now, ErrBadCert},
		{"no digitalSignature", makeCert(t, ca, func(c *x509.Certificate) { c.KeyUsage = x509.KeyUsageKeyEncipherment }), "odd", nil, now, ErrBadCert},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clock := newClock(tc.now)
			roots := ca.Pool()
			if strings.HasPrefix(tc.name, "CA ") {
				roots.AddCert(mustParse(t, tc.der))
			}
			v := newVerifier(t, roots, func(c *VerifierConfig) { c.Now = clock.Now })
			_, err := v.VerifyCert(tc.der, tc.claimed, tc.roles...)
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
			if Reason(err) != reasons[tc.want] {
				t.Errorf("Reason = %q, want %q", Reason(err), reasons[tc.want])
			}
			if tc.name == "expired" && !strings.Contains(err.Error(), `"agent-1" expired`) {
				t.Errorf("unclear message: %v", err)
			}
			if v.Stats().Rejected[reasons[tc.want]] != 1 {
				t.Errorf("stats = %v", v.Stats())
			}
		})
	}
	// The well-formed odd certificate is accepted, so the cases above fail
	// for the reason they name.
	v := newVerifier(t, ca.Pool(), nil)
	if _, err := v.VerifyCert(makeCert(t, ca, func(*x509.Certificate) {}), "odd", RoleAgent); err != nil {
		t.Errorf("control certificate: %v", err)
	}
}

func TestVerifyCertRevocation(t *testing.T) {
	ca := sharedCA(t)
	id := issue(t, ca, "agent-r", RoleAgent)
	other := issue(t, ca, "agent-ok", RoleAgent)
	rl := NewRevocationList(nil, nil)
	v := newVerifier(t, ca.Pool(), func(c *VerifierConfig) { c.Revoked = rl })
	mustOK := func(what string) {
		t.Helper()
		if _, err := v.VerifyCert(id.Cert.Raw, "agent-r"); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	mustRevoked := func(what string) {
		t.Helper()
		if _, err := v.VerifyCert(id.Cert.Raw, "agent-r"); !errors.Is(err, ErrRevoked) {
			t.Fatalf("%s: %v, want ErrRevoked", what, err)
		}
		if _, err := v.VerifyCert(other.Cert.Raw, "agent-ok"); err != nil {
			t.Fatalf("%s: other identity: %v", what, err)
		}
	}
	mustOK("before revocation") // now cached
	serial := id.Cert.SerialNumber.Text(16)
	if err := rl.Set([]string{serial}, nil); err != nil {
		t.Fatal(err)
	}
	mustRevoked("revoked serial (cached certificate)")
	rl.Set(nil, nil)
	mustOK("unrevoked")
	rl.Set([]string{"0x" + "00" + serial}, nil) // normalized
	mustRevoked("revoked serial, other spelling")
	rl.Set(nil, []string{"agent-r"})
	mustRevoked("revoked name")
	rl.Set(nil, nil)
	mustOK("unrevoked again")
	rl.Set([]string{ca.Cert.SerialNumber.Text(16)}, nil)
	if _, err := v.VerifyCert(id.Cert.Raw, "agent-r"); !errors.Is(err, ErrRevoked) {
		t.Fatalf("revoked CA: %v, want ErrRevoked", err)
	}
	if err := rl.Set([]string{"xyz"}, nil); err == nil {
		t.Error("Set accepted an invalid serial")
	}
}

func TestCertCache(t *testing.T) {
	ca := sharedCA(t)
	id := issue(t, ca, "agent-c", RoleAgent)
	clock := newClock(time.Now())
	v := newVerifier(t, ca.Pool(), func(c *VerifierConfig) { c.Now = clock.Now; c.CertCacheSize = 2 })
	for i := 0; i < 5; i++ {
		if _, err := v.VerifyCert(id.Cert.Raw, "agent-c"); err != nil {
			t.Fatal(err)
		}
	}
	if s := v.Stats(); s.CertCacheMisses != 1 || s.CertCacheHits != 4 {
		t.Errorf("stats after 5 calls: %v", s)
	}
	// A cached certificate still expires.
	clock.Set(id.Cert.NotAfter.Add(time.Millisecond))
	if _, err := v.VerifyCert(id.Cert.Raw, "agent-c"); !errors.Is(err, ErrExpired) {
		t.Fatalf("cached certificate after NotAfter: %v, want ErrExpired", err)
	}
	if s := v.Stats(); s.CertCacheEntries != 0 {
		t.Errorf("expired entry still cached: %v", s)
	}
	// Bounded.
	clock.Set(time.Now())
	for i, name := range []string{"c1", "c2", "c3", "c4"} {
		if _, err := v.VerifyCert(issue(t, ca, name, RoleAgent).Cert.Raw, name); err != nil {
			t.Fatal(i, err)
		}
	}
	if s := v.Stats(); s.CertCacheEntries != 2 {
		t.Errorf("cache holds %d entries, limit 2", s.CertCacheEntries)
	}
	v.FlushCertCache()
	if s := v.Stats(); s.CertCacheEntries != 0 {
		t.Errorf("after flush: %v", s)
	}
}

func TestNewVerifierConfig(t *testing.T) {
	if _, err := NewVerifier(VerifierConfig{}); err == nil {
		t.Error("no roots accepted")
	}
	if _, err := NewVerifier(VerifierConfig{Roots: x509.NewCertPool(), Window: -time.Second}); err == nil {
		t.Error("negative window accepted")
	}
	v := newVerifier(t, x509.NewCertPool(), nil)
	if v.Window() != DefaultWindow {
		t.Errorf("default window %v", v.Window())
	}
}
