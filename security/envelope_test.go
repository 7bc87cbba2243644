package security

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

// marshalEnvelope encodes e the way Sign does (field order matters for
// IsEnvelope).
func marshalEnvelope(t testing.TB, e *Envelope) []byte {
	t.Helper()
	b, err := json.Marshal(e)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func parse(t testing.TB, raw []byte) *Envelope {
	t.Helper()
	e, err := ParseEnvelope(raw)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func TestSignVerify(t *testing.T) {
	ca := sharedCA(t)
	id := issue(t, ca, "agent-1", RoleAgent)
	v := newVerifier(t, ca.Pool(), nil)
	packet := []byte(`{"v":1,"packet":"request","type":"/ops/restart","token":"t1","from":"agent-1"}`)
	env := sign(t, id, packet)
	if !IsEnvelope(env) || IsEnvelope(packet) {
		t.Fatal("IsEnvelope")
	}
	e := parse(t, env)
	if e.Signer != "agent-1" || !bytes.Equal(e.Cert, id.Cert.Raw) || !bytes.Equal(e.Body, packet) || len(e.Nonce) != 32 {
		t.Errorf("envelope = %+v", e)
	}
	if d := time.Since(time.UnixMilli(e.TS)); d < 0 || d > 5*time.Second {
		t.Errorf("ts %v off", d)
	}
	// json.Marshal of the parsed envelope gives the same bytes as Sign.
	if again := marshalEnvelope(t, e); !bytes.Equal(again, env) {
		t.Errorf("Sign output differs from json.Marshal:\n%s\n%s", env, again)
	}
	body, peer, err := v.VerifyEnvelope(env, RoleAgent)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(body, packet) || peer.Name != "agent-1" || peer.Role != RoleAgent {
		t.Errorf("body %q peer %+v", body, peer)
	}
	// Two signatures of the same body are different envelopes.
	env2 := sign(t, id, packet)
	if bytes.Equal(env, env2) {
		t.Error("two envelopes are identical")
	}
	if _, _, err := v.VerifyEnvelope(env2); err != nil {
		t.Error(err)
	}
	if s := v.Stats(); s.Verified != 2 || s.ReplayEntries != 2 || s.CertCacheMisses != 1 {
		t.Errorf("stats %v", s)
	}
	// Empty body.
	if body, _, err := v.VerifyEnvelope(sign(t, id, nil)); err != nil || len(body) != 0 {
		t.Errorf("empty body: %q, %v", body, err)
	}
}

// TestEnvelopeRejects covers each check of VerifyEnvelope with an envelope
// that only that check rejects.
func TestEnvelopeRejects(t *testing.T) {
	ca := sharedCA(t)
	other := newCA(t, "other-ca")
	id := issue(t, ca, "agent-1", RoleAgent)
	id2 := issue(t, ca, "agent-2", RoleAgent)
	mapper := issue(t, ca, "mapper-1", RoleMapper)
	forged := issue(t, other, "agent-1", RoleAgent) // same name, wrong CA
	body := []byte(`{"v":1,"packet":"request","type":"/a/b","token":"t"}`)

	resign := func(e *Envelope, key ed25519.PrivateKey) []byte {
		e.Sig = ed25519.Sign(key, e.SignedBytes())
		return marshalEnvelope(t, e)
	}
	for _, tc := range []struct {
		name  string
		env   func() []byte
		roles []Role
		want  error
	}{
		{"unsigned plain packet", func() []byte { return body }, nil, ErrUnsigned},
		{"garbage", func() []byte { return []byte("\x00\x01garbage") }, nil, ErrUnsigned},
		{"bad JSON", func() []byte { return []byte(`{"v":1,"alg":"ed25519","signer":`) }, nil, ErrMalformed},
		{"unsupported version", func() []byte {
			e := parse(t, sign(t, id, body))
			e.Version = 2
			return marshalEnvelope(t, e)
		}, nil, ErrUnsupported},
		{"unsupported alg", func() []byte {
			e := parse(t, sign(t, id, body))
			e.Alg = "rsa"
			return marshalEnvelope(t, e)
		}, nil, ErrUnsupported},
		{"short signature", func() []byte {
			e := parse(t, sign(t, id, body))
			e.Sig = e.Sig[:10]
			return marshalEnvelope(t, e)
		}, nil, ErrMalformed},
		{"bad nonce", func() []byte {
			e := parse(t, sign(t, id, body))
			e.Nonce = strings.ToUpper(e.Nonce)
			return marshalEnvelope(t, e)
		}, nil, ErrMalformed},
		{"forged signature", func() []byte {
			e := parse(t, sign(t, id, body))
			e.Sig[0] ^= 1
			return marshalEnvelope(t, e)
		}, nil, ErrBadSignature},
		{"signed by another key with the victim's certificate", func() []byte {
			e := parse(t, sign(t, id, body))
			_, k, _ := ed25519.GenerateKey(rand.Reader)
			return resign(e, k)
		}, nil, ErrBadSignature},
		{"tampered body", func() []byte {
			e := parse(t, sign(t, id, body))
			e.Body = bytes.Replace(e.Body, []byte("/a/b"), []byte("/a/c"), 1)
			return marshalEnvelope(t, e)
		}, nil, ErrBadSignature},
		{"tampered timestamp", func() []byte {
			e := parse(t, sign(t, id, body))
			e.TS--
			return marshalEnvelope(t, e)
		}, nil, ErrBadSignature},
		{"tampered nonce", func() []byte {
			e := parse(t, sign(t, id, body))
			if e.Nonce[0] == '0' {
				e.Nonce = "1" + e.Nonce[1:]
			} else {
				e.Nonce = "0" + e.Nonce[1:]
			}
			return marshalEnvelope(t, e)
		}, nil, ErrBadSignature},
		{"certificate swapped for another valid one", func() []byte {
			e := parse(t, sign(t, id, body))
			e.Cert = id2.Cert.Raw
			e.Signer = "agent-2"
			return marshalEnvelope(t, e)
		}, nil, ErrBadSignature},
		{"wrong CA", func() []byte { return sign(t, forged, body) }, nil, ErrUnknownSigner},
		{"name mismatch", func() []byte {
			// agent-1 signs correctly but claims to be agent-2.
			e := parse(t, sign(t, id, body))
			e.Signer = "agent-2"
			return resign(e, id.keys().sign)
		}, nil, ErrNameMismatch},
		{"wrong role", func() []byte { return sign(t, mapper, body) }, []Role{RoleAgent, RoleClient}, ErrWrongRole},
		{"unknown signer without certificate", func() []byte { return sign(t, id2, body, OmitCert()) }, nil, ErrUnknownSigner},
		{"too old", func() []byte { return sign(t, id, body, SignedAt(time.Now().Add(-DefaultWindow-time.Second))) }, nil, ErrOutsideWindow},
		{"too far in the future", func() []byte { return sign(t, id, body, SignedAt(time.Now().Add(DefaultWindow+time.Second))) }, nil, ErrOutsideWindow},
		{"too large", func() []byte { return sign(t, id, make([]byte, 4<<20)) }, nil, ErrMalformed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := newVerifier(t, ca.Pool(), nil)
			_, _, err := v.VerifyEnvelope(tc.env(), tc.roles...)
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
			var se *Error
			if !errors.As(err, &se) || se.Reason != reasons[tc.want] {
				t.Errorf("error %#v: reason %q, want %q", err, Reason(err), reasons[tc.want])
			}
			if n := v.Stats().Rejected[reasons[tc.want]]; n != 1 {
				t.Errorf("rejected[%s] = %d", reasons[tc.want], n)
			}
		})
	}
}

func TestEnvelopeRevoked(t *testing.T) {
	ca := sharedCA(t)
	id := issue(t, ca, "agent-rev", RoleAgent)
	rl := NewRevocationList(nil, nil)
	v := newVerifier(t, ca.Pool(), func(c *VerifierConfig) { c.Revoked = rl })
	if _, _, err := v.VerifyEnvelope(sign(t, id, []byte("x"))); err != nil {
		t.Fatal(err)
	}
	rl.Set([]string{id.Cert.SerialNumber.Text(16)}, nil)
	if _, _, err := v.VerifyEnvelope(sign(t, id, []byte("x"))); !errors.Is(err, ErrRevoked) {
		t.Fatalf("revoked serial: %v", err)
	}
	if _, _, err := v.VerifyEnvelope(sign(t, id, []byte("x"), OmitCert())); !errors.Is(err, ErrRevoked) {
		t.Fatalf("revoked serial, no certificate in the envelope: %v", err)
	}
	rl.Set(nil, []string{"agent-rev"})
	if _, _, err := v.VerifyEnvelope(sign(t, id, []byte("x"))); !errors.Is(err, ErrRevoked) {
		t.Fatalf("revoked name: %v", err)
	}
}

func TestEnvelopeExpiredCert(t *testing.T) {
	ca := sharedCA(t)
	id := issue(t, ca, "agent-exp", RoleAgent)
	clock := newClock(time.Now())
	v := newVerifier(t, ca.Pool(), func(c *VerifierConfig) { c.Now = clock.Now })
	if _, _, err := v.VerifyEnvelope(sign(t, id, []byte("x"))); err != nil {
		t.Fatal(err)
	}
	after := id.Cert.NotAfter.Add(time.Second)
	clock.Set(after)
	if _, _, err := v.VerifyEnvelope(sign(t, id, []byte("x"), SignedAt(after))); !errors.Is(err, ErrExpired) {
		t.Fatalf("expired certificate: %v", err)
	}
	if _, _, err := v.VerifyEnvelope(sign(t, id, []byte("x"), SignedAt(after), OmitCert())); !errors.Is(err, ErrExpired) && !errors.Is(err, ErrUnknownSigner) {
		t.Fatalf("expired certificate, no certificate in the envelope: %v", err)
	}
	before := id.Cert.NotBefore.Add(-time.Second)
	clock.Set(before)
	if _, _, err := v.VerifyEnvelope(sign(t, id, []byte("x"), SignedAt(before))); !errors.Is(err, ErrNotYetValid) {
		t.Fatalf("not yet valid certificate: %v", err)
	}
}

func TestWindowEdges(t *testing.T) {
	ca := sharedCA(t)
	id := issue(t, ca, "agent-w", RoleAgent)
	now := time.Now().Truncate(time.Millisecond)
	const w = 30 * time.Second
	clock := newClock(now)
	v := newVerifier(t, ca.Pool(), func(c *VerifierConfig) { c.Now = clock.Now; c.Window = w })
	for _, tc := range []struct {
		at time.Time
		ok bool
	}{
		{now.Add(-w), true},
		{now.Add(w), true},
		{now.Add(-w - time.Millisecond), false},
		{now.Add(w + time.Millisecond), false},
		{now, true},
	} {
		_, _, err := v.VerifyEnvelope(sign(t, id, []byte("x"), SignedAt(tc.at)))
		if tc.ok != (err == nil) || (err != nil && !errors.Is(err, ErrOutsideWindow)) {
			t.Errorf("signed at now%+v: %v", tc.at.Sub(now), err)
		}
	}
}

func TestReplay(t *testing.T) {
	ca := sharedCA(t)
	id := issue(t, ca, "agent-rp", RoleAgent)
	clock := newClock(time.Now())
	v := newVerifier(t, ca.Pool(), func(c *VerifierConfig) { c.Now = clock.Now })
	env := sign(t, id, []byte(`{"type":"/ops/delete"}`))
	if _, _, err := v.VerifyEnvelope(env); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		clock.Add(10 * time.Second)
		if _, _, err := v.VerifyEnvelope(env); !errors.Is(err, ErrReplay) {
			t.Fatalf("replay %d: %v, want ErrReplay", i, err)
		}
	}
	// Once outside the window the nonce is forgotten, and the window check
	// still rejects the old envelope.
	clock.Add(DefaultWindow)
	if _, _, err := v.VerifyEnvelope(env); !errors.Is(err, ErrOutsideWindow) {
		t.Fatalf("late replay: %v, want ErrOutsideWindow", err)
	}
	if _, _, err := v.VerifyEnvelope(sign(t, id, []byte("y"), SignedAt(clock.Now()))); err != nil {
		t.Fatal(err)
	}
	if n := v.Stats().ReplayEntries; n != 1 {
		t.Errorf("replay cache holds %d nonces after the window passed, want 1", n)
	}
	// The same nonce from another signer is not a replay.
	other := issue(t, ca, "agent-rp2", RoleAgent)
	e := parse(t, sign(t, id, []byte("z"), SignedAt(clock.Now())))
	if _, _, err := v.VerifyEnvelope(marshalEnvelope(t, e)); err != nil {
		t.Fatal(err)
	}
	e2 := parse(t, sign(t, other, []byte("z"), SignedAt(clock.Now())))
	e2.Nonce = e.Nonce
	e2.Sig = ed25519.Sign(other.keys().sign, e2.SignedBytes())
	if _, _, err := v.VerifyEnvelope(marshalEnvelope(t, e2)); err != nil {
		t.Fatalf("same nonce, other signer: %v", err)
	}
	// A replay that arrives before its original was seen: the first copy
	// wins, the second is a replay.
	env3 := sign(t, id, []byte("w"), SignedAt(clock.Now()))
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, _, errs[i] = v.VerifyEnvelope(env3)
		}()
	}
	wg.Wait()
	ok := 0
	for _, err := range errs {
		if err == nil {
			ok++
		} else if !errors.Is(err, ErrReplay) {
			t.Error(err)
		}
	}
	if ok != 1 {
		t.Errorf("%d of 8 concurrent copies accepted, want 1", ok)
	}
}

func TestReplayCacheFull(t *testing.T) {
	ca := sharedCA(t)
	id := issue(t, ca, "agent-full", RoleAgent)
	clock := newClock(time.Now())
	v := newVerifier(t, ca.Pool(), func(c *VerifierConfig) { c.Now = clock.Now; c.ReplayCacheSize = 3; c.Window = 10 * time.Second })
	for i := 0; i < 3; i++ {
		if _, _, err := v.VerifyEnvelope(sign(t, id, []byte("x"), SignedAt(clock.Now()))); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := v.VerifyEnvelope(sign(t, id, []byte("x"), SignedAt(clock.Now()))); !errors.Is(err, ErrReplayCacheFull) {
		t.Fatalf("full cache: %v, want ErrReplayCacheFull", err)
	}
	// Room again once the first nonces leave the window.
	clock.Add(11*time.Second + time.Second)
	if _, _, err := v.VerifyEnvelope(sign(t, id, []byte("x"), SignedAt(clock.Now()))); err != nil {
		t.Fatalf("after the window: %v", err)
	}
}

func TestOmitCert(t *testing.T) {
	ca := sharedCA(t)
	id := issue(t, ca, "agent-oc", RoleAgent, WithKEM(KEMX25519))
	v := newVerifier(t, ca.Pool(), nil)
	short := sign(t, id, []byte("x"), OmitCert())
	long := sign(t, id, []byte("x"))
	if len(long)-len(short) < 400 {
		t.Errorf("omitting the certificate saves only %d bytes", len(long)-len(short))
	}
	if _, _, err := v.VerifyEnvelope(short); !errors.Is(err, ErrUnknownSigner) {
		t.Fatalf("before the certificate is known: %v", err)
	}
	if _, err := v.VerifyCert(id.Cert.Raw, "agent-oc"); err != nil {
		t.Fatal(err)
	}
	if _, p, err := v.VerifyEnvelope(sign(t, id, []byte("x"), OmitCert())); err != nil || p.Name != "agent-oc" {
		t.Fatalf("after VerifyCert: %v", err)
	}
	// Another identity cannot use agent-oc's cached certificate.
	imp := issue(t, ca, "agent-imp", RoleAgent)
	e := parse(t, sign(t, imp, []byte("x"), OmitCert()))
	e.Signer = "agent-oc"
	e.Sig = ed25519.Sign(imp.keys().sign, e.SignedBytes())
	if _, _, err := v.VerifyEnvelope(marshalEnvelope(t, e)); !errors.Is(err, ErrBadSignature) {
		t.Fatalf("impersonation with a cached certificate: %v", err)
	}
}

func TestIsEnvelope(t *testing.T) {
	for in, want := range map[string]bool{
		`{"v":1,"alg":"ed25519"}`:      true,
		`{"v":12,"alg":"x"}`:           true,
		`{"v":1,"packet":"request"}`:   false,
		` {"v":1,"alg":"ed25519"}`:     false,
		`{"v":,"alg":"ed25519"}`:       false,
		`{"v":123456,"alg":"ed25519"}`: false,
		`{"alg":"ed25519","v":1}`:      false,
		``:                             false,
		`{"v":1`:                       false,
		`{"v":1,"alg"`:                 false,
	} {
		if got := IsEnvelope([]byte(in)); got != want {
			t.Errorf("IsEnvelope(%q) = %v", in, got)
		}
	}
}

func TestSignedBytesLayout(t *testing.T) {
	e := &Envelope{Alg: "ed25519", Signer: "a", TS: 0x0102030405060708, Nonce: "ab", Body: []byte("xyz")}
	want := "nanite-envelope-v1\x00" + "\x00\x07ed25519" + "\x00\x01a" + "\x01\x02\x03\x04\x05\x06\x07\x08" + "\x00\x02ab" + "\x00\x00\x00\x00\x00\x00\x00\x03xyz"
	if got := string(e.SignedBytes()); got != want {
		t.Errorf("SignedBytes = %q\nwant          %q", got, want)
	}
}

func TestVerifyConcurrent(t *testing.T) {
	ca := sharedCA(t)
	ids := []*Identity{issue(t, ca, "c-1", RoleAgent), issue(t, ca, "c-2", RoleMapper)}
	rl := NewRevocationList(nil, nil)
	v := newVerifier(t, ca.Pool(), func(c *VerifierConfig) { c.Revoked = rl; c.CertCacheSize = 1 })
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 50; i++ {
				id := ids[(g+i)%2]
				if _, p, err := v.VerifyEnvelope(sign(t, id, []byte(fmt.Sprint(i)))); err != nil || p.Name != id.Name {
					t.Error(err)
					return
				}
				if i%10 == 0 {
					rl.Set(nil, []string{"nobody"})
					v.Stats()
				}
			}
		}()
	}
	wg.Wait()
	if s := v.Stats(); s.Verified != 400 {
		t.Errorf("stats %v", s)
	}
}

func TestErrorFormat(t *testing.T) {
	err := newError(ErrReplay, "agent-1", errors.New("cause"), "nonce %s", "ab")
	if got := err.Error(); got != `security: replayed packet (signer "agent-1"): nonce ab: cause` {
		t.Errorf("Error() = %q", got)
	}
	if !errors.Is(err, ErrReplay) || errors.Is(err, ErrBadSignature) || Reason(err) != "replay" {
		t.Error("Is/Reason")
	}
	if Reason(nil) != "" || Reason(errors.New("x")) != "error" || Reason(fmt.Errorf("wrapped: %w", err)) != "replay" {
		t.Error("Reason of other errors")
	}
	for s := range reasons {
		if !strings.HasPrefix(s.Error(), "security: ") {
			t.Errorf("sentinel %q lacks the prefix", s)
		}
	}
	// An *Error made as a literal by another package (it has no sentinel)
	// prints its reason, not a panic.
	var lit error = &Error{Reason: ReasonBadSignature, Signer: "x", Detail: "origin envelope"}
	if got := fmt.Sprint(lit); got != `security: bad_signature (signer "x"): origin envelope` || Reason(lit) != ReasonBadSignature {
		t.Errorf("literal *Error prints %q", got)
	}
	if errors.Is(lit, ErrBadSignature) || errors.Unwrap(lit) != nil {
		t.Error("a literal *Error has no sentinel")
	}
}

func TestParseEnvelopeBase64(t *testing.T) {
	// Non-canonical base64 in a field is rejected by the JSON decoder, not
	// silently accepted as other bytes.
	ca := sharedCA(t)
	id := issue(t, ca, "agent-b64", RoleAgent)
	env := sign(t, id, []byte("hello"))
	body := base64.StdEncoding.EncodeToString([]byte("hello"))
	bad := bytes.Replace(env, []byte(`"body":"`+body+`"`), []byte(`"body":"!!!!"`), 1)
	if _, err := ParseEnvelope(bad); !errors.Is(err, ErrMalformed) {
		t.Errorf("bad base64: %v", err)
	}
}

func TestParseEnvelopeForm(t *testing.T) {
	ca := sharedCA(t)
	id := issue(t, ca, "agent-form", RoleAgent)
	base := parse(t, sign(t, id, []byte("x")))
	for name, mod := range map[string]func(e *Envelope){
		"empty signer":      func(e *Envelope) { e.Signer = "" },
		"signer with space": func(e *Envelope) { e.Signer = "agent form" },
		"long signer":       func(e *Envelope) { e.Signer = strings.Repeat("a", 129) },
		"zero timestamp":    func(e *Envelope) { e.TS = 0 },
		"negative ts":       func(e *Envelope) { e.TS = -1 },
		"huge certificate":  func(e *Envelope) { e.Cert = make([]byte, maxCertSize+1) },
		"short nonce":       func(e *Envelope) { e.Nonce = e.Nonce[:30] },
	} {
		e := *base
		mod(&e)
		if _, err := ParseEnvelope(marshalEnvelope(t, &e)); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v, want ErrMalformed", name, err)
		}
	}
	if _, err := ParseEnvelope(marshalEnvelope(t, base)); err != nil {
		t.Errorf("control: %v", err)
	}
}

// TestOmitCertExpired: a certificate cached by name still expires.
func TestOmitCertExpired(t *testing.T) {
	ca := sharedCA(t)
	id := issue(t, ca, "agent-oce", RoleAgent)
	clock := newClock(time.Now())
	v := newVerifier(t, ca.Pool(), func(c *VerifierConfig) { c.Now = clock.Now })
	if _, _, err := v.VerifyEnvelope(sign(t, id, []byte("x"))); err != nil {
		t.Fatal(err)
	}
	after := id.Cert.NotAfter.Add(time.Second)
	clock.Set(after)
	if _, _, err := v.VerifyEnvelope(sign(t, id, []byte("x"), SignedAt(after), OmitCert())); !errors.Is(err, ErrExpired) {
		t.Fatalf("expired certificate cached by name: %v, want ErrExpired", err)
	}
}

func TestVerifierNotBefore(t *testing.T) {
	ca := sharedCA(t)
	id := issue(t, ca, "agent-nb", RoleAgent)
	start := time.Now().Truncate(time.Millisecond)
	v := newVerifier(t, ca.Pool(), func(c *VerifierConfig) { c.NotBefore = start })
	if _, _, err := v.VerifyEnvelope(sign(t, id, []byte("x"), SignedAt(start.Add(-time.Millisecond)))); !errors.Is(err, ErrOutsideWindow) {
		t.Errorf("signed before NotBefore: %v", err)
	}
	if _, _, err := v.VerifyEnvelope(sign(t, id, []byte("x"), SignedAt(start))); err != nil {
		t.Errorf("signed at NotBefore: %v", err)
	}
}
