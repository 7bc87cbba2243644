package security

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestIssueCertificateContents(t *testing.T) {
	ca := sharedCA(t)
	for _, kem := range []KEM{KEMHybrid, KEMX25519} {
		t.Run(kem.String(), func(t *testing.T) {
			id := issue(t, ca, "agent-1", RoleAgent, WithKEM(kem))
			c := id.Cert
			if c.Subject.CommonName != "agent-1" || len(c.Subject.OrganizationalUnit) != 1 || c.Subject.OrganizationalUnit[0] != "agent" {
				t.Errorf("subject = %v", c.Subject)
			}
			if len(c.URIs) != 1 || c.URIs[0].String() != "nanite:agent/agent-1" {
				t.Errorf("URIs = %v", c.URIs)
			}
			if c.IsCA || c.KeyUsage != x509.KeyUsageDigitalSignature {
				t.Errorf("IsCA %v KeyUsage %v", c.IsCA, c.KeyUsage)
			}
			if len(c.ExtKeyUsage) != 1 || c.ExtKeyUsage[0] != x509.ExtKeyUsageClientAuth {
				t.Errorf("ExtKeyUsage = %v", c.ExtKeyUsage)
			}
			found := false
			for _, e := range c.Extensions {
				if e.Id.Equal(OIDSealKey) {
					found = true
					if e.Critical {
						t.Error("sealing key extension is critical")
					}
				}
			}
			if !found {
				t.Error("no sealing key extension")
			}
			ci, err := InspectCert(c)
			if err != nil {
				t.Fatal(err)
			}
			if ci.Name != "agent-1" || ci.Role != RoleAgent || ci.SealKEM != kem || ci.Issuer != "test-ca" || ci.Serial != c.SerialNumber.Text(16) {
				t.Errorf("info = %+v", ci)
			}
			if id.SealKey().KEM() != kem || id.Name != "agent-1" || id.Role != RoleAgent {
				t.Errorf("identity = %v kem %v", id, id.SealKey().KEM())
			}
			if !strings.Contains(ci.String(), "role:        agent") {
				t.Errorf("CertInfo.String:\n%s", ci)
			}
		})
	}
}

func TestIssueDefaultsAndOptions(t *testing.T) {
	ca := sharedCA(t)
	id := issue(t, ca, "bridge-a", RoleBridge, WithDNSNames("bridge.example"))
	if id.SealKey().KEM() != KEMHybrid {
		t.Errorf("default KEM = %v", id.SealKey().KEM())
	}
	if len(id.Cert.DNSNames) != 1 || len(id.Cert.ExtKeyUsage) != 2 {
		t.Errorf("DNS %v EKU %v", id.Cert.DNSNames, id.Cert.ExtKeyUsage)
	}
	if d := time.Until(id.Cert.NotBefore); d > -30*time.Second || d < -2*time.Minute {
		t.Errorf("NotBefore not backdated by about a minute: %v", d)
	}
	from := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	id2, err := ca.Issue("c", RoleClient, day, WithValidFrom(from))
	if err != nil {
		t.Fatal(err)
	}
	if !id2.Cert.NotBefore.Equal(from) || !id2.Cert.NotAfter.Equal(from.Add(day)) {
		t.Errorf("validity %v - %v", id2.Cert.NotBefore, id2.Cert.NotAfter)
	}
}

func TestIssueRejects(t *testing.T) {
	ca := sharedCA(t)
	for _, tc := range []struct {
		name     string
		role     Role
		validity time.Duration
		opts     []IssueOption
	}{
		{"", RoleAgent, day, nil},
		{"-x", RoleAgent, day, nil},
		{"a/b", RoleAgent, day, nil},
		{strings.Repeat("a", 129), RoleAgent, day, nil},
		{"a", "admin", day, nil},
		{"a", RoleAgent, 0, nil},
		{"a", RoleAgent, 20 * year, nil}, // outlives the CA
		{"a", RoleAgent, day, []IssueOption{WithKEM(0x10)}},
	} {
		if _, err := ca.Issue(tc.name, tc.role, tc.validity, tc.opts...); err == nil {
			t.Errorf("Issue(%q, %q, %v) succeeded", tc.name, tc.role, tc.validity)
		}
	}
	if _, err := NewCA("bad name", year); err == nil {
		t.Error("NewCA accepted a bad name")
	}
	if _, err := NewCA("ca", 0); err == nil {
		t.Error("NewCA accepted zero validity")
	}
}

func TestSaveLoadIdentity(t *testing.T) {
	ca := sharedCA(t)
	dir := t.TempDir()
	for _, kem := range []KEM{KEMHybrid, KEMX25519} {
		id := issue(t, ca, "agent-"+kem.String(), RoleAgent, WithKEM(kem))
		certFile, keyFile := filepath.Join(dir, kem.String()+".crt"), filepath.Join(dir, kem.String()+".key")
		if err := id.Save(certFile, keyFile); err != nil {
			t.Fatal(err)
		}
		for file, want := range map[string]os.FileMode{certFile: 0o644, keyFile: 0o600} {
			fi, err := os.Stat(file)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != want {
				t.Errorf("%s mode %v, want %v", file, fi.Mode().Perm(), want)
			}
		}
		keyPEM, _ := os.ReadFile(keyFile)
		if n := bytes.Count(keyPEM, []byte("-----BEGIN ")); n != 2 {
			t.Errorf("key file has %d PEM blocks, want 2", n)
		}
		got, err := LoadIdentity(certFile, keyFile)
		if err != nil {
			t.Fatal(err)
		}
		if got.Name != id.Name || got.Role != id.Role || !got.SealKey().Equal(id.SealKey()) {
			t.Fatalf("loaded %v, want %v", got, id)
		}
		// The loaded keys work: sign with the loaded identity, open what was
		// sealed to the original.
		v := newVerifier(t, ca.Pool(), nil)
		if _, _, err := v.VerifyEnvelope(sign(t, got, []byte("x"))); err != nil {
			t.Error(err)
		}
		sealed, err := Seal(id.SealKey(), nil, []byte("secret"))
		if err != nil {
			t.Fatal(err)
		}
		if pt, err := got.OpenSealed(nil, sealed); err != nil || string(pt) != "secret" {
			t.Errorf("OpenSealed after load = %q, %v", pt, err)
		}
	}
}

func TestLoadIdentityMismatch(t *testing.T) {
	ca := sharedCA(t)
	dir := t.TempDir()
	a := issue(t, ca, "a", RoleAgent)
	b := issue(t, ca, "b", RoleAgent)
	a.Save(filepath.Join(dir, "a.crt"), filepath.Join(dir, "a.key"))
	b.Save(filepath.Join(dir, "b.crt"), filepath.Join(dir, "b.key"))
	if _, err := LoadIdentity(filepath.Join(dir, "a.crt"), filepath.Join(dir, "b.key")); !errors.Is(err, ErrBadKey) {
		t.Errorf("a.crt with b.key: %v, want ErrBadKey", err)
	}
	// Right signing key, wrong sealing key.
	akey, _ := os.ReadFile(filepath.Join(dir, "a.key"))
	bkey, _ := os.ReadFile(filepath.Join(dir, "b.key"))
	mixed := append(akey[:bytes.Index(akey, []byte("-----BEGIN NANITE"))], bkey[bytes.Index(bkey, []byte("-----BEGIN NANITE")):]...)
	os.WriteFile(filepath.Join(dir, "mixed.key"), mixed, 0o600)
	if _, err := LoadIdentity(filepath.Join(dir, "a.crt"), filepath.Join(dir, "mixed.key")); !errors.Is(err, ErrBadKey) {
		t.Errorf("mixed sealing key: %v, want ErrBadKey", err)
	}
	// No sealing key at all.
	os.WriteFile(filepath.Join(dir, "nosEAL.key"), akey[:bytes.Index(akey, []byte("-----BEGIN NANITE"))], 0o600)
	if _, err := LoadIdentity(filepath.Join(dir, "a.crt"), filepath.Join(dir, "nosEAL.key")); !errors.Is(err, ErrBadKey) {
		t.Errorf("missing sealing key: %v, want ErrBadKey", err)
	}
	os.WriteFile(filepath.Join(dir, "garbage.key"), []byte("not pem"), 0o600)
	if _, err := LoadIdentity(filepath.Join(dir, "a.crt"), filepath.Join(dir, "garbage.key")); !errors.Is(err, ErrBadKey) {
		t.Errorf("garbage key: %v, want ErrBadKey", err)
	}
	if _, err := LoadIdentity(filepath.Join(dir, "a.key"), filepath.Join(dir, "a.key")); !errors.Is(err, ErrBadCert) {
		t.Errorf("key as cert: %v, want ErrBadCert", err)
	}
	if _, err := LoadIdentity(filepath.Join(dir, "nope.crt"), filepath.Join(dir, "a.key")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
}

func TestCASaveLoad(t *testing.T) {
	ca := newCA(t, "site-ca")
	dir := filepath.Join(t.TempDir(), "pki")
	if err := ca.Save(dir); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]os.FileMode{dir: 0o700, filepath.Join(dir, CACertFile): 0o644, filepath.Join(dir, CAKeyFile): 0o600} {
		fi, err := os.Stat(name)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != want {
			t.Errorf("%s mode %v, want %v", name, fi.Mode().Perm(), want)
		}
	}
	loaded, err := LoadCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	if loaded.Name != "site-ca" || !loaded.Cert.Equal(ca.Cert) {
		t.Errorf("loaded %v", loaded)
	}
	id := issue(t, loaded, "m", RoleMapper)
	roots, err := LoadRoots(filepath.Join(dir, CACertFile))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := newVerifier(t, roots, nil).VerifyCert(id.Cert.Raw, "m", RoleMapper); err != nil {
		t.Errorf("identity issued by the loaded CA: %v", err)
	}
	// A key from another CA does not load.
	other := newCA(t, "other")
	odir := t.TempDir()
	other.Save(odir)
	data, _ := os.ReadFile(filepath.Join(odir, CAKeyFile))
	os.WriteFile(filepath.Join(dir, CAKeyFile), data, 0o600)
	if _, err := LoadCA(dir); !errors.Is(err, ErrBadKey) {
		t.Errorf("CA with foreign key: %v, want ErrBadKey", err)
	}
}

func TestLoadRoots(t *testing.T) {
	dir := t.TempDir()
	ca1, ca2 := newCA(t, "old"), newCA(t, "new")
	ca1.Save(filepath.Join(dir, "1"))
	ca2.Save(filepath.Join(dir, "2"))
	a, _ := os.ReadFile(filepath.Join(dir, "1", CACertFile))
	b, _ := os.ReadFile(filepath.Join(dir, "2", CACertFile))
	both := filepath.Join(dir, "both.crt")
	os.WriteFile(both, append(a, b...), 0o644)
	roots, err := LoadRoots(both)
	if err != nil {
		t.Fatal(err)
	}
	v := newVerifier(t, roots, nil)
	for _, ca := range []*CA{ca1, ca2} {
		if _, err := v.VerifyCert(issue(t, ca, "x", RoleAgent).Cert.Raw, "x"); err != nil {
			t.Errorf("rotation bundle, CA %s: %v", ca.Name, err)
		}
	}
	leaf := issue(t, ca1, "leaf", RoleAgent)
	leaf.Save(filepath.Join(dir, "leaf.crt"), filepath.Join(dir, "leaf.key"))
	if _, err := LoadRoots(filepath.Join(dir, "leaf.crt")); !errors.Is(err, ErrBadCert) {
		t.Errorf("LoadRoots(leaf) = %v, want ErrBadCert", err)
	}
	os.WriteFile(filepath.Join(dir, "empty.crt"), nil, 0o644)
	if _, err := LoadRoots(filepath.Join(dir, "empty.crt")); !errors.Is(err, ErrBadCert) {
		t.Errorf("LoadRoots(empty) = %v, want ErrBadCert", err)
	}
}

// TestKeysNeverPrinted formats identities and CAs every usual way and checks
// that no encoding of a private key appears.
func TestKeysNeverPrinted(t *testing.T) {
	ca := sharedCA(t)
	id := issue(t, ca, "agent-secret", RoleAgent, WithKEM(KEMX25519))
	sealRaw, _ := id.keys().seal.Bytes()
	secrets := []string{
		hex.EncodeToString(id.keys().sign.Seed()), hex.EncodeToString(sealRaw),
		base64.StdEncoding.EncodeToString(id.keys().sign.Seed()), base64.StdEncoding.EncodeToString(sealRaw),
		hex.EncodeToString(ca.key().Seed()), base64.StdEncoding.EncodeToString(ca.key().Seed()),
		fmt.Sprint([]byte(id.keys().sign)), fmt.Sprint([]byte(ca.key())),
	}
	var out bytes.Buffer
	type holder struct {
		ID  Identity
		CA  CA
		id  Identity
		ca  CA
		pid *Identity
	}
	h := holder{*id, *ca, *id, *ca, id}
	for _, v := range []any{id, *id, ca, *ca, h, &h} {
		fmt.Fprintf(&out, "%v %+v %#v %s %x %q %d\n", v, v, v, v, v, v, v)
	}
	slog.New(slog.NewJSONHandler(&out, nil)).Info("x", "id", id, "ca", ca)
	slog.New(slog.NewTextHandler(&out, nil)).Info("x", "id", id, "ca", ca)
	js, _ := json.Marshal(id)
	out.Write(js)
	for _, s := range secrets {
		if bytes.Contains(out.Bytes(), []byte(s)) {
			t.Fatalf("a private key appears in formatted output:\n%s", out.String())
		}
	}
	if !strings.Contains(out.String(), "agent-secret") {
		t.Errorf("the name should appear:\n%s", out.String())
	}
}

// makeCert signs an arbitrary template with ca's key, for malformed
// certificates.
func makeCert(t testing.TB, ca *CA, mod func(*x509.Certificate)) []byte {
	t.Helper()
	pub, _, _ := ed25519.GenerateKey(rand.Reader)
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          newSerial(),
		Subject:               pkix.Name{CommonName: "odd", OrganizationalUnit: []string{"agent"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(time.Hour),
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		URIs:                  []*url.URL{nameURI("odd", RoleAgent)},
	}
	mod(tmpl)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, pub, ca.key())
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func TestZeroIdentity(t *testing.T) {
	var id Identity
	if _, err := id.Sign([]byte("x")); err == nil {
		t.Error("zero identity signed")
	}
	if _, err := id.OpenSealed(nil, []byte("x")); err == nil {
		t.Error("zero identity opened")
	}
	if err := id.Save(filepath.Join(t.TempDir(), "c"), filepath.Join(t.TempDir(), "k")); err == nil {
		t.Error("zero identity saved")
	}
	if !id.SealKey().IsZero() || id.Peer() == nil || id.String() != "Identity()" {
		t.Errorf("zero identity: %v", id)
	}
}

func TestEnvelopeOverhead(t *testing.T) {
	ca := sharedCA(t)
	body := bytes.Repeat([]byte("x"), 150)
	for _, kem := range []KEM{KEMX25519, KEMHybrid} {
		id := issue(t, ca, "agent-12345678", RoleAgent, WithKEM(kem))
		full := sign(t, id, body)
		short := sign(t, id, body, OmitCert())
		t.Logf("%s: certificate %d bytes DER; 150-byte body: envelope %d bytes (+%d), without certificate %d (+%d)",
			kem, len(id.Cert.Raw), len(full), len(full)-len(body), len(short), len(short)-len(body))
	}
}
