package security

import (
	"bytes"
	"crypto"
	"crypto/ed25519"
	"crypto/hpke"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// File names used by (*CA).Save and LoadCA.
const (
	CACertFile = "ca.crt"
	CAKeyFile  = "ca.key"
)

// PEM block types. A key file holds a "PRIVATE KEY" block (PKCS #8, the
// Ed25519 signing key) followed, for identities, by a sealing key block.
const (
	pemCert    = "CERTIFICATE"
	pemKey     = "PRIVATE KEY"
	pemSealKey = "NANITE HPKE PRIVATE KEY" // DER of SealKey ::= SEQUENCE { kem INTEGER, key OCTET STRING }
)

// certBackdate is subtracted from NotBefore so that a certificate is usable
// at once on a verifier whose clock is a little behind the CA's.
const certBackdate = time.Minute

// CA is a certificate authority of an application or site: it issues the
// certificates of agents, mappers, bridges and clients. Its private key never
// leaves the machine that holds ca.key; the others only need ca.crt.
//
// The key cannot be read from outside the package, and no fmt verb nor
// LogValue prints it.
type CA struct {
	Name string
	Cert *x509.Certificate

	// key returns the private key. A func, because reflection-based
	// printing (%v of a struct holding a CA, fmt's bad-verb output) shows a
	// func as an address but would dump a key's bytes.
	key func() ed25519.PrivateKey
}

func keyFunc[T any](k T) func() T { return func() T { return k } }

// NewCA creates a CA with a fresh Ed25519 key and a self-signed certificate
// valid for validity (from one minute ago).
func NewCA(name string, validity time.Duration) (*CA, error) {
	if !ValidName(name) {
		return nil, fmt.Errorf("security: invalid CA name %q: use 1-128 letters, digits, '.', '_', ':' or '-'", name)
	}
	if validity <= 0 {
		return nil, fmt.Errorf("security: CA validity must be positive, got %v", validity)
	}
	pub, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("security: CA key: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          newSerial(),
		Subject:               pkix.Name{CommonName: name, Organization: []string{"nanite"}},
		NotBefore:             now.Add(-certBackdate),
		NotAfter:              now.Add(validity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true, // issues leaves only
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, key)
	if err != nil {
		return nil, fmt.Errorf("security: create CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("security: parse CA certificate: %w", err)
	}
	return &CA{Name: name, Cert: cert, key: keyFunc(key)}, nil
}

func newSerial() *big.Int {
	var b [16]byte
	_, _ = rand.Read(b[:]) // never fails
	b[0] &= 0x7f           // positive
	b[0] |= 0x40           // and never zero or short
	return new(big.Int).SetBytes(b[:])
}

// Pool returns a pool holding the CA's certificate, for VerifierConfig.Roots.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.Cert)
	return p
}

// String describes the CA without its key.
func (ca CA) String() string {
	if ca.Cert == nil {
		return "CA(" + ca.Name + ")"
	}
	return fmt.Sprintf("CA %s (serial %s, until %s)", ca.Name, ca.Cert.SerialNumber.Text(16), ca.Cert.NotAfter.UTC().Format(time.RFC3339))
}

// Format prints String for every verb, so that no fmt verb prints the key.
func (ca CA) Format(f fmt.State, verb rune) { io.WriteString(f, ca.String()) }

// LogValue logs the CA without its key.
func (ca CA) LogValue() slog.Value {
	if ca.Cert == nil {
		return slog.StringValue(ca.String())
	}
	return slog.GroupValue(slog.String("name", ca.Name), slog.String("serial", ca.Cert.SerialNumber.Text(16)),
		slog.Time("not_after", ca.Cert.NotAfter))
}

// IssueOption changes how (*CA).Issue makes a certificate.
type IssueOption func(*issueOptions)

type issueOptions struct {
	kem       KEM
	dnsNames  []string
	validFrom time.Time
}

// WithKEM chooses the KEM of the identity's sealing key (default KEMHybrid).
func WithKEM(k KEM) IssueOption { return func(o *issueOptions) { o.kem = k } }

// WithDNSNames adds DNS names to the certificate and the server-auth usage,
// so that it can also serve TLS (an identity is always usable as a TLS client
// certificate).
func WithDNSNames(names ...string) IssueOption {
	return func(o *issueOptions) { o.dnsNames = append(o.dnsNames, names...) }
}

// WithValidFrom sets NotBefore exactly (default: one minute before now). The
// certificate is valid until NotBefore + validity.
func WithValidFrom(t time.Time) IssueOption { return func(o *issueOptions) { o.validFrom = t } }

// Issue creates an identity: a fresh Ed25519 signing key, a fresh HPKE
// sealing key, and a certificate signed by the CA that binds both to name and
// role. The certificate holds:
//
//   - Subject CommonName = name, OrganizationalUnit = [role], Organization = ["nanite"];
//   - a URI SAN "nanite:ROLE/NAME" (e.g. "nanite:agent/agent-7f3a");
//   - KeyUsage digitalSignature, ExtKeyUsage clientAuth (plus serverAuth with WithDNSNames);
//   - the sealing public key in the non-critical extension OIDSealKey.
//
// It fails if the certificate would outlive the CA.
func (ca *CA) Issue(name string, role Role, validity time.Duration, opts ...IssueOption) (*Identity, error) {
	if ca == nil || ca.key == nil || ca.Cert == nil {
		return nil, errors.New("security: CA has no key (make it with NewCA or LoadCA)")
	}
	if !ValidName(name) {
		return nil, fmt.Errorf("security: invalid name %q: use 1-128 letters, digits, '.', '_', ':' or '-'", name)
	}
	if !role.Valid() {
		return nil, fmt.Errorf("security: invalid role %q (want agent, mapper, bridge or client)", role)
	}
	if validity <= 0 {
		return nil, fmt.Errorf("security: validity must be positive, got %v", validity)
	}
	o := issueOptions{kem: DefaultKEM}
	for _, opt := range opts {
		opt(&o)
	}
	hk, err := o.kem.hpke()
	if err != nil {
		return nil, err
	}
	notBefore := time.Now().Add(-certBackdate)
	if !o.validFrom.IsZero() {
		notBefore = o.validFrom
	}
	notAfter := notBefore.Add(validity)
	if o.validFrom.IsZero() {
		notAfter = notAfter.Add(certBackdate)
	}
	if notAfter.After(ca.Cert.NotAfter) {
		return nil, fmt.Errorf("security: certificate for %q would expire %s, after its CA (%s)",
			name, notAfter.UTC().Format(time.RFC3339), ca.Cert.NotAfter.UTC().Format(time.RFC3339))
	}
	signPub, signKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("security: signing key: %w", err)
	}
	sealKey, err := hk.GenerateKey()
	if err != nil {
		return nil, fmt.Errorf("security: sealing key: %w", err)
	}
	ext, err := marshalSealKey(o.kem, sealKey.PublicKey().Bytes())
	if err != nil {
		return nil, fmt.Errorf("security: sealing key extension: %w", err)
	}
	eku := []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	if len(o.dnsNames) > 0 {
		eku = append(eku, x509.ExtKeyUsageServerAuth)
	}
	tmpl := &x509.Certificate{
		SerialNumber: newSerial(),
		Subject: pkix.Name{
			CommonName:         name,
			OrganizationalUnit: []string{string(role)},
			Organization:       []string{"nanite"},
		},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           eku,
		URIs:                  []*url.URL{nameURI(name, role)},
		DNSNames:              o.dnsNames,
		ExtraExtensions:       []pkix.Extension{{Id: OIDSealKey, Value: ext}},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, signPub, ca.key())
	if err != nil {
		return nil, fmt.Errorf("security: create certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("security: parse certificate: %w", err)
	}
	return newIdentity(cert, signKey, sealKey)
}

func nameURI(name string, role Role) *url.URL {
	return &url.URL{Scheme: "nanite", Opaque: string(role) + "/" + name}
}

// CertInfo is what a certificate says, as (*Verifier).VerifyCert and
// "nanite pki show" read it.
type CertInfo struct {
	Name        string // subject CommonName
	Role        Role   // "" for a CA
	IsCA        bool
	Issuer      string // issuer CommonName
	Serial      string // lowercase hex, as in revocation lists
	NotBefore   time.Time
	NotAfter    time.Time
	SealKEM     KEM    // 0 if the certificate has no sealing key
	Fingerprint string // SHA-256 of the DER, lowercase hex
}

// String formats the information one field a line.
func (ci *CertInfo) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "name:        %s\n", ci.Name)
	if ci.IsCA {
		fmt.Fprintf(&b, "kind:        CA\n")
	} else {
		fmt.Fprintf(&b, "role:        %s\n", ci.Role)
	}
	fmt.Fprintf(&b, "issuer:      %s\n", ci.Issuer)
	fmt.Fprintf(&b, "serial:      %s\n", ci.Serial)
	fmt.Fprintf(&b, "not before:  %s\n", ci.NotBefore.UTC().Format(time.RFC3339))
	fmt.Fprintf(&b, "not after:   %s\n", ci.NotAfter.UTC().Format(time.RFC3339))
	if ci.SealKEM != 0 {
		fmt.Fprintf(&b, "sealing key: %s\n", ci.SealKEM)
	}
	fmt.Fprintf(&b, "sha256:      %s\n", ci.Fingerprint)
	return b.String()
}

// InspectCert reads what cert says and checks that it is well formed for
// this package: for a leaf, a valid name, exactly one valid role, the
// matching "nanite:ROLE/NAME" URI SAN, an Ed25519 public key and, if present,
// a well-formed sealing key. It does not verify the chain or the dates; use
// a Verifier for that. Errors wrap ErrBadCert.
func InspectCert(cert *x509.Certificate) (*CertInfo, error) {
	ci, _, err := inspect(cert)
	return ci, err
}

func inspect(cert *x509.Certificate) (*CertInfo, SealKey, error) {
	fp := sha256.Sum256(cert.Raw)
	ci := &CertInfo{
		Name:        cert.Subject.CommonName,
		IsCA:        cert.IsCA,
		Issuer:      cert.Issuer.CommonName,
		Serial:      cert.SerialNumber.Text(16),
		NotBefore:   cert.NotBefore,
		NotAfter:    cert.NotAfter,
		Fingerprint: hex.EncodeToString(fp[:]),
	}
	bad := func(format string, args ...any) (*CertInfo, SealKey, error) {
		return ci, SealKey{}, newError(ErrBadCert, "", nil, format, args...)
	}
	if cert.IsCA {
		return ci, SealKey{}, nil
	}
	if !ValidName(ci.Name) {
		return bad("invalid name %q", ci.Name)
	}
	if len(cert.Subject.OrganizationalUnit) != 1 {
		return bad("%q: want exactly one role (OU), have %d", ci.Name, len(cert.Subject.OrganizationalUnit))
	}
	ci.Role = Role(cert.Subject.OrganizationalUnit[0])
	if !ci.Role.Valid() {
		return bad("%q: invalid role %q", ci.Name, ci.Role)
	}
	want := nameURI(ci.Name, ci.Role).String()
	found := 0
	for _, u := range cert.URIs {
		if u.Scheme != "nanite" {
			continue
		}
		if u.String() != want {
			return bad("%q: URI SAN %q disagrees with name and role (want %q)", ci.Name, u.String(), want)
		}
		found++
	}
	if found != 1 {
		return bad("%q: want one URI SAN %q, have %d", ci.Name, want, found)
	}
	if _, ok := cert.PublicKey.(ed25519.PublicKey); !ok {
		return bad("%q: public key is %T, want Ed25519", ci.Name, cert.PublicKey)
	}
	sk, err := SealKeyFromCert(cert)
	switch {
	case err == nil:
		ci.SealKEM = sk.KEM()
	case errors.Is(err, ErrNoSealKey):
	default:
		return ci, SealKey{}, err
	}
	return ci, sk, nil
}

// Identity is an agent's, mapper's, bridge's or client's own identity: its
// certificate and its two private keys (Ed25519 for signing, HPKE for opening
// sealed payloads). Name and Role are copies of what the certificate says;
// the methods use the certificate's values, so changing the fields has no
// effect. An Identity is safe for concurrent use.
//
// The keys cannot be read from outside the package, and String, Format (every
// fmt verb) and LogValue never print them.
type Identity struct {
	Name string
	Role Role
	Cert *x509.Certificate

	// secret returns the keys; a func for the reason given on CA.key.
	secret func() *identityKeys
}

func (id *Identity) keys() *identityKeys {
	if id == nil || id.secret == nil {
		return nil
	}
	return id.secret()
}

var errNoKeys = errors.New("security: identity has no keys (make it with (*CA).Issue or LoadIdentity)")

type identityKeys struct {
	name    string
	role    Role
	sign    ed25519.PrivateKey
	seal    hpke.PrivateKey // nil if the certificate has no sealing key
	sealPub SealKey
	certB64 string // base64 of Cert.Raw, as it goes in envelopes
}

func newIdentity(cert *x509.Certificate, sign ed25519.PrivateKey, seal hpke.PrivateKey) (*Identity, error) {
	ci, sk, err := inspect(cert)
	if err != nil {
		return nil, err
	}
	if ci.IsCA {
		return nil, newError(ErrBadCert, "", nil, "%q is a CA certificate, not an identity", ci.Name)
	}
	if !bytes.Equal(sign.Public().(ed25519.PublicKey), cert.PublicKey.(ed25519.PublicKey)) {
		return nil, newError(ErrBadKey, "", nil, "signing key does not match the certificate of %q", ci.Name)
	}
	switch {
	case sk.IsZero() && seal != nil:
		return nil, newError(ErrBadKey, "", nil, "key file has a sealing key but the certificate of %q has none", ci.Name)
	case !sk.IsZero() && seal == nil:
		return nil, newError(ErrBadKey, "", nil, "certificate of %q has a sealing key but the key file has none", ci.Name)
	case seal != nil && !bytes.Equal(seal.PublicKey().Bytes(), sk.Bytes()):
		return nil, newError(ErrBadKey, "", nil, "sealing key does not match the certificate of %q", ci.Name)
	}
	return &Identity{
		Name: ci.Name,
		Role: ci.Role,
		Cert: cert,
		secret: keyFunc(&identityKeys{
			name:    ci.Name,
			role:    ci.Role,
			sign:    sign,
			seal:    seal,
			sealPub: sk,
			certB64: base64.StdEncoding.EncodeToString(cert.Raw),
		}),
	}, nil
}

// SealKey returns the identity's public sealing key.
func (id *Identity) SealKey() SealKey {
	if k := id.keys(); k != nil {
		return k.sealPub
	}
	return SealKey{}
}

// Peer returns the identity as others see it after verifying its
// certificate.
func (id *Identity) Peer() *Peer {
	if id.keys() == nil {
		return &Peer{Name: id.Name, Role: id.Role, Cert: id.Cert}
	}
	k := id.keys()
	return &Peer{Name: k.name, Role: k.role, Cert: id.Cert, SealKey: k.sealPub}
}

// OpenSealed decrypts a payload sealed to this identity with Seal and the
// same info. It fails with ErrCannotOpen if the payload was sealed to another
// identity, bound to other info, or modified.
func (id *Identity) OpenSealed(info, sealed []byte) ([]byte, error) {
	if id.keys() == nil {
		return nil, errNoKeys
	}
	if id.keys().seal == nil {
		return nil, newError(ErrNoSealKey, "", nil, "identity %q has no sealing key", id.keys().name)
	}
	return openSealed(id.keys().seal, info, sealed)
}

// TLSCertificate returns the identity as a TLS certificate, for amqps://
// client authentication (Ed25519 needs TLS 1.3 on the server).
func (id *Identity) TLSCertificate() tls.Certificate {
	if id.keys() == nil {
		return tls.Certificate{}
	}
	return tls.Certificate{Certificate: [][]byte{id.Cert.Raw}, PrivateKey: id.keys().sign, Leaf: id.Cert}
}

// String describes the identity without its keys.
func (id Identity) String() string {
	if id.secret == nil || id.Cert == nil {
		return "Identity(" + id.Name + ")"
	}
	return fmt.Sprintf("%s %s (serial %s, until %s)", id.keys().role, id.keys().name,
		id.Cert.SerialNumber.Text(16), id.Cert.NotAfter.UTC().Format(time.RFC3339))
}

// Format prints String for every verb, so that no fmt verb prints a key.
func (id Identity) Format(f fmt.State, verb rune) { io.WriteString(f, id.String()) }

// LogValue logs the identity without its keys.
func (id Identity) LogValue() slog.Value {
	if id.secret == nil || id.Cert == nil {
		return slog.StringValue(id.String())
	}
	return slog.GroupValue(
		slog.String("name", id.keys().name),
		slog.String("role", string(id.keys().role)),
		slog.String("serial", id.Cert.SerialNumber.Text(16)),
		slog.String("seal_kem", id.keys().sealPub.KEM().String()),
		slog.Time("not_after", id.Cert.NotAfter))
}

// Save writes the certificate (PEM, mode 0644) to certFile and both private
// keys (PEM, mode 0600) to keyFile. Each file is written to a temporary file
// in the same directory and renamed into place.
func (id *Identity) Save(certFile, keyFile string) error {
	if id.keys() == nil {
		return errNoKeys
	}
	keyPEM, err := marshalKeys(id.keys().sign, id.keys().seal)
	if err != nil {
		return err
	}
	if err := writeFileAtomic(keyFile, keyPEM, 0o600); err != nil {
		return err
	}
	return writeFileAtomic(certFile, pem.EncodeToMemory(&pem.Block{Type: pemCert, Bytes: id.Cert.Raw}), 0o644)
}

func marshalKeys(sign ed25519.PrivateKey, seal hpke.PrivateKey) ([]byte, error) {
	p8, err := x509.MarshalPKCS8PrivateKey(sign)
	if err != nil {
		return nil, fmt.Errorf("security: marshal signing key: %w", err)
	}
	out := pem.EncodeToMemory(&pem.Block{Type: pemKey, Bytes: p8})
	if seal != nil {
		raw, err := seal.Bytes()
		if err != nil {
			return nil, fmt.Errorf("security: marshal sealing key: %w", err)
		}
		der, err := marshalSealKey(KEM(seal.KEM().ID()), raw)
		if err != nil {
			return nil, fmt.Errorf("security: marshal sealing key: %w", err)
		}
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: pemSealKey, Bytes: der})...)
	}
	return out, nil
}

func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*") // created 0600
	if err != nil {
		return fmt.Errorf("security: write %s: %w", path, err)
	}
	tmp := f.Name()
	fail := func(err error) error {
		f.Close()
		os.Remove(tmp)
		return fmt.Errorf("security: write %s: %w", path, err)
	}
	if err := f.Chmod(mode); err != nil {
		return fail(err)
	}
	if _, err := f.Write(data); err != nil {
		return fail(err)
	}
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("security: write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("security: write %s: %w", path, err)
	}
	return nil
}

// LoadIdentity reads an identity written by (*Identity).Save and checks that
// the keys match the certificate. It does not verify the certificate against
// a CA.
func LoadIdentity(certFile, keyFile string) (*Identity, error) {
	certs, err := LoadCertificates(certFile)
	if err != nil {
		return nil, err
	}
	data, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, fmt.Errorf("security: read key: %w", err)
	}
	sign, seal, err := parseKeys(data, keyFile)
	if err != nil {
		return nil, err
	}
	return newIdentity(certs[0], sign, seal)
}

func parseKeys(data []byte, file string) (ed25519.PrivateKey, hpke.PrivateKey, error) {
	var sign ed25519.PrivateKey
	var seal hpke.PrivateKey
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			break
		}
		switch b.Type {
		case pemKey:
			if sign != nil {
				return nil, nil, newError(ErrBadKey, "", nil, "%s: two signing keys", file)
			}
			k, err := x509.ParsePKCS8PrivateKey(b.Bytes)
			if err != nil {
				return nil, nil, newError(ErrBadKey, "", err, "%s: signing key", file)
			}
			var ok bool
			if sign, ok = k.(ed25519.PrivateKey); !ok {
				return nil, nil, newError(ErrBadKey, "", nil, "%s: signing key is %T, want Ed25519", file, k)
			}
		case pemSealKey:
			if seal != nil {
				return nil, nil, newError(ErrBadKey, "", nil, "%s: two sealing keys", file)
			}
			kem, raw, err := unmarshalSealKey(b.Bytes)
			if err != nil {
				return nil, nil, newError(ErrBadKey, "", err, "%s: sealing key", file)
			}
			hk, err := kem.hpke()
			if err != nil {
				return nil, nil, newError(ErrBadKey, "", err, "%s: sealing key", file)
			}
			if seal, err = hk.NewPrivateKey(raw); err != nil {
				return nil, nil, newError(ErrBadKey, "", err, "%s: sealing key", file)
			}
		}
	}
	if sign == nil {
		return nil, nil, newError(ErrBadKey, "", nil, "%s: no %q PEM block", file, pemKey)
	}
	return sign, seal, nil
}

// LoadCertificates reads every CERTIFICATE block of a PEM file, in order.
func LoadCertificates(path string) ([]*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("security: read certificate: %w", err)
	}
	var certs []*x509.Certificate
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			break
		}
		if b.Type != pemCert {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, newError(ErrBadCert, "", err, "%s", path)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, newError(ErrBadCert, "", nil, "%s: no CERTIFICATE PEM block", path)
	}
	return certs, nil
}

// LoadRoots reads the CA certificates to trust from a PEM file (one or more
// CA certificates, e.g. the old and the new CA during a rotation).
func LoadRoots(caFile string) (*x509.CertPool, error) {
	certs, err := LoadCertificates(caFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	for _, c := range certs {
		if !c.IsCA {
			return nil, newError(ErrBadCert, "", nil, "%s: %q is not a CA certificate", caFile, c.Subject.CommonName)
		}
		pool.AddCert(c)
	}
	return pool, nil
}

// Save writes ca.crt (mode 0644) and ca.key (mode 0600) into dir, creating
// dir with mode 0700 if needed.
func (ca *CA) Save(dir string) error {
	if ca == nil || ca.key == nil || ca.Cert == nil {
		return errors.New("security: CA has no key (make it with NewCA or LoadCA)")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("security: CA directory: %w", err)
	}
	keyPEM, err := marshalKeys(ca.key(), nil)
	if err != nil {
		return err
	}
	if err := writeFileAtomic(filepath.Join(dir, CAKeyFile), keyPEM, 0o600); err != nil {
		return err
	}
	return writeFileAtomic(filepath.Join(dir, CACertFile),
		pem.EncodeToMemory(&pem.Block{Type: pemCert, Bytes: ca.Cert.Raw}), 0o644)
}

// LoadCA reads a CA written by (*CA).Save from dir.
func LoadCA(dir string) (*CA, error) {
	certFile, keyFile := filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	certs, err := LoadCertificates(certFile)
	if err != nil {
		return nil, err
	}
	cert := certs[0]
	if !cert.IsCA {
		return nil, newError(ErrBadCert, "", nil, "%s is not a CA certificate", certFile)
	}
	data, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, fmt.Errorf("security: read CA key: %w", err)
	}
	key, _, err := parseKeys(data, keyFile)
	if err != nil {
		return nil, err
	}
	pub, ok := cert.PublicKey.(ed25519.PublicKey)
	if !ok || !pub.Equal(key.Public().(crypto.PublicKey)) {
		return nil, newError(ErrBadKey, "", nil, "%s does not match %s", keyFile, certFile)
	}
	return &CA{Name: cert.Subject.CommonName, Cert: cert, key: keyFunc(key)}, nil
}
