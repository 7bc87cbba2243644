package security

import (
	"bytes"
	"crypto/hpke"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
)

func TestSealRoundTrip(t *testing.T) {
	ca := sharedCA(t)
	for _, kem := range []KEM{KEMHybrid, KEMX25519} {
		t.Run(kem.String(), func(t *testing.T) {
			id := issue(t, ca, "agent-s", RoleAgent, WithKEM(kem))
			v := newVerifier(t, ca.Pool(), nil)
			peer, err := v.VerifyCert(id.Cert.Raw, "agent-s")
			if err != nil {
				t.Fatal(err)
			}
			info := SealInfo("client-1", "/ops/restart", "token-1")
			for _, n := range []int{0, 1, 100, 10 << 10} {
				pt := bytes.Repeat([]byte{'p'}, n)
				sealed, err := Seal(peer.SealKey, info, pt)
				if err != nil {
					t.Fatal(err)
				}
				if len(sealed) != n+SealOverhead(kem) || !IsSealed(sealed) {
					t.Errorf("%d bytes sealed to %d, overhead %d", n, len(sealed), SealOverhead(kem))
				}
				if got := KEM(binary.BigEndian.Uint16(sealed[3:])); got != kem {
					t.Errorf("header KEM %v", got)
				}
				if bytes.Contains(sealed, []byte("pppp")) {
					t.Error("plaintext visible")
				}
				out, err := id.OpenSealed(info, sealed)
				if err != nil || !bytes.Equal(out, pt) {
					t.Fatalf("open: %q, %v", out, err)
				}
			}
		})
	}
	if got := SealOverhead(KEMHybrid); got != 1145 {
		t.Errorf("hybrid overhead %d", got)
	}
	if got := SealOverhead(KEMX25519); got != 57 {
		t.Errorf("x25519 overhead %d", got)
	}
}

func TestOpenSealedRejects(t *testing.T) {
	ca := sharedCA(t)
	alice := issue(t, ca, "alice", RoleAgent)
	bob := issue(t, ca, "bob", RoleAgent)
	carol := issue(t, ca, "carol", RoleAgent, WithKEM(KEMX25519))
	info := SealInfo("client", "/svc/m", "tok")
	sealed, err := Seal(alice.SealKey(), info, []byte("for alice only"))
	if err != nil {
		t.Fatal(err)
	}
	flip := func(i int) []byte {
		b := bytes.Clone(sealed)
		b[i] ^= 1
		return b
	}
	for _, tc := range []struct {
		name   string
		id     *Identity
		info   []byte
		sealed []byte
		msg    string
	}{
		{"wrong identity, same KEM", bob, info, sealed, "another identity"},
		{"wrong identity, other KEM", carol, info, sealed, "mlkem768x25519 key"},
		{"wrong info", alice, SealInfo("client", "/svc/m", "tok2"), sealed, "other info"},
		{"info parts shifted", alice, SealInfo("client/svc", "m", "tok"), sealed, "other info"},
		{"tampered ciphertext", alice, info, flip(len(sealed) - 1), "tampered"},
		{"tampered encapsulation", alice, info, flip(sealHeader + 5), ""},
		{"AEAD id changed", alice, info, func() []byte {
			b := bytes.Clone(sealed)
			binary.BigEndian.PutUint16(b[7:], hpke.ChaCha20Poly1305().ID())
			return b
		}(), ""},
		{"unknown AEAD", alice, info, func() []byte {
			b := bytes.Clone(sealed)
			binary.BigEndian.PutUint16(b[7:], 0xffff)
			return b
		}(), "AEAD"},
		{"unknown KDF", alice, info, func() []byte {
			b := bytes.Clone(sealed)
			binary.BigEndian.PutUint16(b[5:], hpke.HKDFSHA512().ID())
			return b
		}(), "KDF"},
		{"truncated", alice, info, sealed[:sealHeader+100], "truncated"},
		{"truncated tag", alice, info, sealed[:sealHeader+KEMHybrid.encLen()+10], "truncated"},
		{"not sealed", alice, info, []byte("plain text payload"), "not a sealed payload"},
		{"empty", alice, info, nil, "not a sealed payload"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := tc.id.OpenSealed(tc.info, tc.sealed)
			if !errors.Is(err, ErrCannotOpen) || out != nil {
				t.Fatalf("got %q, %v; want ErrCannotOpen", out, err)
			}
			if Reason(err) != ReasonCannotOpen || !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("error %q (reason %s), want mention of %q", err, Reason(err), tc.msg)
			}
		})
	}
	if out, err := alice.OpenSealed(info, sealed); err != nil || string(out) != "for alice only" {
		t.Fatalf("control: %q, %v", out, err)
	}
}

// TestOpenChaCha checks that a payload sealed with ChaCha20-Poly1305 (by
// another implementation) opens.
func TestOpenChaCha(t *testing.T) {
	id := issue(t, sharedCA(t), "agent-cc", RoleAgent, WithKEM(KEMX25519))
	hdr := []byte{'N', 'S', 1, 0, 0x20, 0, 1, 0, 3}
	enc, s, err := hpke.NewSender(id.SealKey().pub, hpke.HKDFSHA256(), hpke.ChaCha20Poly1305(), []byte("i"))
	if err != nil {
		t.Fatal(err)
	}
	ct, _ := s.Seal(hdr, []byte("chacha"))
	out, err := id.OpenSealed([]byte("i"), append(append(hdr, enc...), ct...))
	if err != nil || string(out) != "chacha" {
		t.Fatalf("%q, %v", out, err)
	}
}

func TestSealKeys(t *testing.T) {
	if _, err := Seal(SealKey{}, nil, []byte("x")); !errors.Is(err, ErrNoSealKey) {
		t.Errorf("zero key: %v", err)
	}
	if _, err := NewSealKey(KEMX25519, []byte("short")); err == nil {
		t.Error("bad public key accepted")
	}
	if _, err := NewSealKey(0x9999, make([]byte, 32)); err == nil {
		t.Error("unknown KEM accepted")
	}
	id := issue(t, sharedCA(t), "agent-k", RoleAgent, WithKEM(KEMX25519))
	k, err := NewSealKey(KEMX25519, id.SealKey().Bytes())
	if err != nil || !k.Equal(id.SealKey()) || k.IsZero() || (SealKey{}).KEM() != 0 {
		t.Errorf("NewSealKey: %v", err)
	}
	// A certificate without the extension.
	der := makeCert(t, sharedCA(t), func(c *x509Cert) {})
	cert := mustParse(t, der)
	if _, err := SealKeyFromCert(cert); !errors.Is(err, ErrNoSealKey) {
		t.Errorf("no extension: %v", err)
	}
	for s, want := range map[string]KEM{"hybrid": KEMHybrid, "X25519": KEMX25519, "x-wing": KEMHybrid} {
		if k, err := ParseKEM(s); err != nil || k != want {
			t.Errorf("ParseKEM(%q) = %v, %v", s, k, err)
		}
	}
	if _, err := ParseKEM("rsa"); err == nil {
		t.Error("ParseKEM(rsa)")
	}
}
