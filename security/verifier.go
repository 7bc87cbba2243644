package security

import (
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// Defaults of VerifierConfig.
const (
	// DefaultWindow is how far an envelope's timestamp may be from the
	// receiver's clock, into the past and into the future. 60 s absorbs
	// ordinary NTP-synchronised skew and broker queueing delays; Choria
	// rejected messages a few seconds in the future and broke real fleets.
	DefaultWindow = 60 * time.Second
	// DefaultReplayCacheSize is the number of (signer, nonce) pairs
	// remembered: enough for about 34,000 envelopes a second to one
	// receiver with the default window, at about 34 bytes each (70 MiB when
	// full; memory follows traffic).
	DefaultReplayCacheSize = 1 << 21
	// DefaultCertCacheSize is the number of verified certificates
	// remembered.
	DefaultCertCacheSize = 4096
	// DefaultMaxEnvelopeSize is the largest envelope accepted: a 1 MiB
	// packet grows by a third in base64, plus a certificate.
	DefaultMaxEnvelopeSize = 4 << 20
)

// VerifierConfig configures a Verifier. Only Roots is required.
type VerifierConfig struct {
	// Roots are the CA certificates to trust (LoadRoots, (*CA).Pool).
	Roots *x509.CertPool
	// Revoked, if set, is consulted on every verification, cached or not,
	// so changing it takes effect at once.
	Revoked *RevocationList
	// Now is the clock (default time.Now).
	Now func() time.Time
	// Window is the acceptance window for envelope timestamps, both ways
	// (default DefaultWindow). It also bounds how long a nonce is
	// remembered.
	Window time.Duration
	// ReplayCacheSize bounds the replay cache (default
	// DefaultReplayCacheSize). When it is full of nonces that are still
	// inside the window, new envelopes are rejected with
	// ErrReplayCacheFull: failing closed.
	ReplayCacheSize int
	// CertCacheSize bounds the verified-certificate cache (default
	// DefaultCertCacheSize).
	CertCacheSize int
	// MaxEnvelopeSize is the largest envelope accepted, in bytes (default
	// DefaultMaxEnvelopeSize).
	MaxEnvelopeSize int
	// NotBefore, if set, rejects envelopes signed before it
	// (ErrOutsideWindow). The replay cache lives in memory, so a process
	// that restarts could accept again what its predecessor accepted less
	// than Window ago; setting NotBefore to the process start time closes
	// that gap, at the price of rejecting envelopes that were signed before
	// the start and waited in a queue.
	NotBefore time.Time
	// Logger receives debug records for newly verified certificates and a
	// warning when the replay cache is full (default: discard). Rejections
	// are returned, not logged.
	Logger *slog.Logger
}

// Peer is a verified remote identity. Peers returned by a Verifier are
// shared: do not modify them.
type Peer struct {
	Name    string
	Role    Role
	Cert    *x509.Certificate
	SealKey SealKey // zero if the certificate has none
}

// Verifier checks certificates and envelopes against a CA, a revocation
// list, a time window and a replay cache. It is safe for concurrent use.
//
// Verified certificates are cached by the SHA-256 of their DER, with the
// time span in which the whole chain is valid, so a packet from a known
// sender costs a hash and a map lookup instead of an X.509 chain
// verification. The revocation list, the claimed name and the role are
// checked on every call.
type Verifier struct {
	roots         *x509.CertPool
	revoked       *RevocationList
	now           func() time.Time
	window        time.Duration
	notBefore     int64 // Unix ms, 0 for none
	maxEnvelope   int
	certCacheSize int
	log           *slog.Logger
	replay        *replayCache

	mu     sync.RWMutex // guards byHash and byName
	byHash map[[32]byte]*certEntry
	byName map[string]*certEntry

	verified        atomic.Uint64
	sessionVerified atomic.Uint64
	rejected        map[string]*atomic.Uint64 // by reason; the map is never written after NewVerifier
	certHits        atomic.Uint64
	certMisses      atomic.Uint64
	lastWarn        atomic.Int64
}

// certEntry is a certificate whose chain verified.
type certEntry struct {
	peer        *Peer
	hash        [32]byte
	pub         ed25519.PublicKey
	from, until time.Time // when every certificate of the chain is valid
	serials     []string  // leaf then CA serials, normalized
}

// NewVerifier returns a Verifier for cfg.
func NewVerifier(cfg VerifierConfig) (*Verifier, error) {
	if cfg.Roots == nil {
		return nil, errors.New("security: VerifierConfig.Roots is required")
	}
	if cfg.Window < 0 || cfg.ReplayCacheSize < 0 || cfg.CertCacheSize < 0 || cfg.MaxEnvelopeSize < 0 {
		return nil, errors.New("security: VerifierConfig: negative window or size")
	}
	v := &Verifier{
		roots:         cfg.Roots,
		revoked:       cfg.Revoked,
		now:           cfg.Now,
		window:        cfg.Window,
		maxEnvelope:   cfg.MaxEnvelopeSize,
		certCacheSize: cfg.CertCacheSize,
		log:           cfg.Logger,
		byHash:        make(map[[32]byte]*certEntry),
		byName:        make(map[string]*certEntry),
		rejected:      make(map[string]*atomic.Uint64, len(reasons)+1),
	}
	if v.now == nil {
		v.now = time.Now
	}
	if !cfg.NotBefore.IsZero() {
		v.notBefore = cfg.NotBefore.UnixMilli()
	}
	if v.window == 0 {
		v.window = DefaultWindow
	}
	if v.maxEnvelope == 0 {
		v.maxEnvelope = DefaultMaxEnvelopeSize
	}
	if v.certCacheSize == 0 {
		v.certCacheSize = DefaultCertCacheSize
	}
	if v.log == nil {
		v.log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	size := cfg.ReplayCacheSize
	if size == 0 {
		size = DefaultReplayCacheSize
	}
	v.replay = newReplayCache(size, v.window)
	for _, r := range reasons {
		v.rejected[r] = new(atomic.Uint64)
	}
	v.rejected["error"] = new(atomic.Uint64)
	return v, nil
}

// Window returns the acceptance window.
func (v *Verifier) Window() time.Duration { return v.window }

// VerifyCert verifies a peer's certificate (DER) and returns the peer. It
// checks, in order: that it parses and is one of ours (ErrBadCert), its
// validity dates (ErrNotYetValid, ErrExpired), its chain to the configured
// roots with the client-auth usage (ErrUnknownSigner), the revocation list
// for its serial, its CA's serial and its name (ErrRevoked), that its name is
// claimedName (ErrNameMismatch; an empty claimedName accepts any name) and
// that its role is one of roles (ErrWrongRole; no roles accepts any role).
func (v *Verifier) VerifyCert(der []byte, claimedName string, roles ...Role) (*Peer, error) {
	e, err := v.certEntry(der, claimedName, v.now())
	if err == nil {
		err = v.checkEntry(e, claimedName, roles)
	}
	if err != nil {
		v.count(err)
		return nil, err
	}
	return e.peer, nil
}

// FlushCertCache forgets every verified certificate.
func (v *Verifier) FlushCertCache() {
	v.mu.Lock()
	clear(v.byHash)
	clear(v.byName)
	v.mu.Unlock()
}

// certEntry returns the verified entry for der, from the cache or by
// verifying it.
func (v *Verifier) certEntry(der []byte, signer string, now time.Time) (*certEntry, error) {
	h := sha256.Sum256(der)
	v.mu.RLock()
	cached := v.byHash[h]
	v.mu.RUnlock()
	if cached != nil && !now.Before(cached.from) && !now.After(cached.until) {
		v.certHits.Add(1)
		return cached, nil
	}
	v.certMisses.Add(1)
	e, err := v.verifyChain(der, signer, now)
	if err != nil {
		if cached != nil {
			v.forget(cached)
		}
		return nil, err
	}
	e.hash = h
	v.mu.Lock()
	if len(v.byHash) >= v.certCacheSize {
		for _, old := range v.byHash { // evict an arbitrary entry
			v.forgetLocked(old)
			break
		}
	}
	v.byHash[h] = e
	v.byName[e.peer.Name] = e
	v.mu.Unlock()
	v.log.Debug("security: certificate verified", "name", e.peer.Name, "role", string(e.peer.Role),
		"serial", e.serials[0], "not_after", e.peer.Cert.NotAfter)
	return e, nil
}

// entryByName returns the cached certificate of signer, for envelopes
// without a certificate.
func (v *Verifier) entryByName(signer string, now time.Time) (*certEntry, error) {
	v.mu.RLock()
	e := v.byName[signer]
	v.mu.RUnlock()
	if e == nil {
		return nil, newError(ErrUnknownSigner, signer, nil, "envelope has no certificate and the signer's is not cached")
	}
	if now.Before(e.from) || now.After(e.until) {
		// Run the full check again to report the right error.
		return v.certEntry(e.peer.Cert.Raw, signer, now)
	}
	v.certHits.Add(1)
	return e, nil
}

func (v *Verifier) forget(e *certEntry) {
	v.mu.Lock()
	v.forgetLocked(e)
	v.mu.Unlock()
}

func (v *Verifier) forgetLocked(e *certEntry) {
	if v.byHash[e.hash] == e {
		delete(v.byHash, e.hash)
	}
	if v.byName[e.peer.Name] == e {
		delete(v.byName, e.peer.Name)
	}
}

func (v *Verifier) verifyChain(der []byte, signer string, now time.Time) (*certEntry, error) {
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, newError(ErrBadCert, signer, err, "parse")
	}
	if cert.IsCA {
		return nil, newError(ErrBadCert, signer, nil, "%q is a CA certificate", cert.Subject.CommonName)
	}
	ci, sk, err := inspect(cert)
	if err != nil {
		var se *Error
		if errors.As(err, &se) {
			se.Signer = signer
		}
		return nil, err
	}
	if now.Before(cert.NotBefore) {
		return nil, newError(ErrNotYetValid, signer, nil, "%q is valid from %s, now is %s", ci.Name,
			cert.NotBefore.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}
	if now.After(cert.NotAfter) {
		return nil, newError(ErrExpired, signer, nil, "%q expired %s, now is %s", ci.Name,
			cert.NotAfter.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}
	if cert.KeyUsage&x509.KeyUsageDigitalSignature == 0 {
		return nil, newError(ErrBadCert, signer, nil, "%q lacks the digitalSignature key usage", ci.Name)
	}
	chains, err := cert.Verify(x509.VerifyOptions{
		Roots:       v.roots,
		CurrentTime: now,
		KeyUsages:   []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		var unknown x509.UnknownAuthorityError
		var invalid x509.CertificateInvalidError
		switch {
		case errors.As(err, &unknown):
			return nil, newError(ErrUnknownSigner, signer, err, "%q is not issued by a trusted CA", ci.Name)
		case errors.As(err, &invalid) && invalid.Reason == x509.Expired:
			return nil, newError(ErrExpired, signer, err, "the CA of %q is outside its validity", ci.Name)
		default:
			return nil, newError(ErrBadCert, signer, err, "chain of %q", ci.Name)
		}
	}
	e := &certEntry{
		peer:    &Peer{Name: ci.Name, Role: ci.Role, Cert: cert, SealKey: sk},
		pub:     cert.PublicKey.(ed25519.PublicKey), // checked by inspect
		from:    cert.NotBefore,
		until:   cert.NotAfter,
		serials: []string{ci.Serial},
	}
	for _, chain := range chains {
		for _, c := range chain[1:] {
			if c.NotBefore.After(e.from) {
				e.from = c.NotBefore
			}
			if c.NotAfter.Before(e.until) {
				e.until = c.NotAfter
			}
			e.serials = append(e.serials, c.SerialNumber.Text(16))
		}
	}
	return e, nil
}

// checkEntry runs the checks that are not cached: revocation, name, role.
func (v *Verifier) checkEntry(e *certEntry, claimedName string, roles []Role) error {
	p := e.peer
	for i, s := range e.serials {
		if v.revoked.serialRevoked(s) {
			what := "certificate"
			if i > 0 {
				what = "CA certificate"
			}
			return newError(ErrRevoked, claimedName, nil, "%s serial %s of %q", what, s, p.Name)
		}
	}
	if v.revoked.NameRevoked(p.Name) {
		return newError(ErrRevoked, claimedName, nil, "name %q", p.Name)
	}
	if claimedName != "" && claimedName != p.Name {
		return newError(ErrNameMismatch, claimedName, nil, "certificate is for %q", p.Name)
	}
	if len(roles) > 0 {
		ok := false
		for _, r := range roles {
			if r == p.Role {
				ok = true
				break
			}
		}
		if !ok {
			return newError(ErrWrongRole, claimedName, nil, "%q is a %s, want %v", p.Name, p.Role, roles)
		}
	}
	return nil
}

func (v *Verifier) count(err error) {
	c := v.rejected[Reason(err)]
	if c == nil {
		c = v.rejected["error"]
	}
	c.Add(1)
}

// VerifierStats are a Verifier's counters since it was made.
type VerifierStats struct {
	Verified         uint64            // envelopes accepted
	SessionVerified  uint64            // session envelopes accepted
	Rejected         map[string]uint64 // rejections (envelopes and VerifyCert) by reason, zero counts omitted
	CertCacheHits    uint64
	CertCacheMisses  uint64 // full X.509 verifications
	CertCacheEntries int
	ReplayEntries    int // nonces remembered now
}

// Stats returns the verifier's counters.
func (v *Verifier) Stats() VerifierStats {
	s := VerifierStats{
		Verified:        v.verified.Load(),
		SessionVerified: v.sessionVerified.Load(),
		Rejected:        make(map[string]uint64),
		CertCacheHits:   v.certHits.Load(),
		CertCacheMisses: v.certMisses.Load(),
		ReplayEntries:   v.replay.len(),
	}
	for r, c := range v.rejected {
		if n := c.Load(); n > 0 {
			s.Rejected[r] = n
		}
	}
	v.mu.RLock()
	s.CertCacheEntries = len(v.byHash)
	v.mu.RUnlock()
	return s
}

func (s VerifierStats) String() string {
	return fmt.Sprintf("verified=%d session_verified=%d rejected=%v cert_cache=%d hits=%d misses=%d replay_entries=%d",
		s.Verified, s.SessionVerified, s.Rejected, s.CertCacheEntries, s.CertCacheHits, s.CertCacheMisses, s.ReplayEntries)
}
