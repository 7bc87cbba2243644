package security

import (
	"crypto/ecdh"
	"crypto/hpke"
	"crypto/x509"
	"encoding/asn1"
	"encoding/binary"
	"fmt"
	"strings"
)

// KEM names the HPKE key encapsulation mechanism of an identity's sealing
// key. Its value is the HPKE KEM identifier.
type KEM uint16

// The supported KEMs.
const (
	// KEMHybrid is ML-KEM-768 combined with X25519 (MLKEM768-X25519,
	// a.k.a. X-Wing, draft-ietf-hpke-pq): confidential as long as either
	// half holds, so recorded traffic stays safe from a future quantum
	// computer. The default. Public key 1216 bytes, encapsulation 1120.
	KEMHybrid KEM = 0x647a
	// KEMX25519 is DHKEM(X25519, HKDF-SHA256) from RFC 9180. Public key
	// and encapsulation 32 bytes each.
	KEMX25519 KEM = 0x0020
)

// DefaultKEM is the KEM of identities issued without WithKEM.
const DefaultKEM = KEMHybrid

// String returns "mlkem768x25519" or "x25519".
func (k KEM) String() string {
	switch k {
	case KEMHybrid:
		return "mlkem768x25519"
	case KEMX25519:
		return "x25519"
	}
	return fmt.Sprintf("kem(%#04x)", uint16(k))
}

// ParseKEM returns the KEM named s: "hybrid", "mlkem768x25519" or "x-wing"
// for KEMHybrid, "x25519" for KEMX25519.
func ParseKEM(s string) (KEM, error) {
	switch strings.ToLower(s) {
	case "hybrid", "mlkem768x25519", "mlkem768-x25519", "x-wing", "xwing":
		return KEMHybrid, nil
	case "x25519":
		return KEMX25519, nil
	}
	return 0, fmt.Errorf("security: unknown KEM %q (want hybrid or x25519)", s)
}

func (k KEM) hpke() (hpke.KEM, error) {
	switch k {
	case KEMHybrid:
		return hpke.MLKEM768X25519(), nil
	case KEMX25519:
		return hpke.DHKEM(ecdh.X25519()), nil
	}
	return nil, fmt.Errorf("security: unsupported KEM %s", k)
}

// encLen is the size of the KEM's encapsulated key.
func (k KEM) encLen() int {
	switch k {
	case KEMHybrid:
		return 1120
	case KEMX25519:
		return 32
	}
	return 0
}

// SealKey is a recipient's public sealing key, as carried in its
// certificate. The zero SealKey is "no key".
type SealKey struct {
	pub hpke.PublicKey
}

// NewSealKey returns the sealing key of the given KEM from its serialized
// public key.
func NewSealKey(kem KEM, pub []byte) (SealKey, error) {
	k, err := kem.hpke()
	if err != nil {
		return SealKey{}, err
	}
	pk, err := k.NewPublicKey(pub)
	if err != nil {
		return SealKey{}, fmt.Errorf("security: %s public key: %w", kem, err)
	}
	return SealKey{pub: pk}, nil
}

// IsZero reports whether k holds no key.
func (k SealKey) IsZero() bool { return k.pub == nil }

// KEM returns the key's KEM (0 for the zero SealKey).
func (k SealKey) KEM() KEM {
	if k.pub == nil {
		return 0
	}
	return KEM(k.pub.KEM().ID())
}

// Bytes returns the serialized public key.
func (k SealKey) Bytes() []byte {
	if k.pub == nil {
		return nil
	}
	return k.pub.Bytes()
}

// Equal reports whether k and o are the same key.
func (k SealKey) Equal(o SealKey) bool {
	return k.KEM() == o.KEM() && string(k.Bytes()) == string(o.Bytes())
}

// OIDSealKey identifies the certificate extension carrying the sealing key:
// a non-critical extension whose value is the DER of
//
//	SealKey ::= SEQUENCE { kem INTEGER, -- HPKE KEM id
//	                       key OCTET STRING } -- SerializePublicKey
//
// It is a private OID under the UUID arc 2.25 (ITU-T X.667), 2.25.N.1 with
// N a random number below 2^31 (Go's X.509 parser rejects larger arcs).
// Changing it invalidates every issued certificate's sealing key.
var OIDSealKey = asn1.ObjectIdentifier{2, 25, 1442480903, 1}

type sealKeyASN1 struct {
	KEM int
	Key []byte
}

func marshalSealKey(kem KEM, key []byte) ([]byte, error) {
	return asn1.Marshal(sealKeyASN1{KEM: int(kem), Key: key})
}

func unmarshalSealKey(der []byte) (KEM, []byte, error) {
	var v sealKeyASN1
	rest, err := asn1.Unmarshal(der, &v)
	if err != nil {
		return 0, nil, err
	}
	if len(rest) != 0 {
		return 0, nil, fmt.Errorf("%d trailing bytes", len(rest))
	}
	if v.KEM < 0 || v.KEM > 0xffff {
		return 0, nil, fmt.Errorf("KEM id %d out of range", v.KEM)
	}
	return KEM(v.KEM), v.Key, nil
}

// SealKeyFromCert returns the sealing key carried by cert. It does not verify
// the certificate: take the key from a *Peer returned by a Verifier unless the
// certificate is known to be good. It fails with ErrNoSealKey if cert has
// none and with ErrBadCert if the extension is malformed.
func SealKeyFromCert(cert *x509.Certificate) (SealKey, error) {
	for _, ext := range cert.Extensions {
		if !ext.Id.Equal(OIDSealKey) {
			continue
		}
		kem, key, err := unmarshalSealKey(ext.Value)
		if err != nil {
			return SealKey{}, newError(ErrBadCert, "", err, "sealing key extension")
		}
		sk, err := NewSealKey(kem, key)
		if err != nil {
			return SealKey{}, newError(ErrBadCert, "", err, "sealing key extension")
		}
		return sk, nil
	}
	return SealKey{}, newError(ErrNoSealKey, "", nil, "certificate %q has no sealing key extension", cert.Subject.CommonName)
}

// Sealed payload format (all integers big-endian):
//
//	offset  size  field
//	0       2     magic "NS"
//	2       1     format version, 1
//	3       2     HPKE KEM id (0x647a or 0x0020)
//	5       2     HPKE KDF id (0x0001, HKDF-SHA256)
//	7       2     HPKE AEAD id (0x0002 AES-256-GCM, 0x0003 ChaCha20-Poly1305)
//	9       Nenc  the KEM's encapsulated key (1120 or 32 bytes)
//	9+Nenc  ...   AEAD ciphertext of the plaintext with the 9-byte header as
//	              additional data (plaintext length + 16)
//
// The HPKE info parameter is the caller's info: it is not transmitted, both
// sides must know it.
const (
	sealMagic0  = 'N'
	sealMagic1  = 'S'
	sealVersion = 1
	sealHeader  = 9
)

// SealOverhead returns how many bytes Seal adds to a plaintext sealed to a
// key of the given KEM: 1145 for KEMHybrid, 57 for KEMX25519.
func SealOverhead(kem KEM) int { return sealHeader + kem.encLen() + 16 }

// IsSealed reports whether b starts like a sealed payload. It does not
// check that b can be opened.
func IsSealed(b []byte) bool {
	return len(b) >= sealHeader && b[0] == sealMagic0 && b[1] == sealMagic1 && b[2] == sealVersion
}

// SealInfo builds an unambiguous info string from parts (each is
// length-prefixed). Bind what the payload is for, such as the sender's
// name, the service and the request token:
//
//	info := security.SealInfo(sender, "/ops/restart", token)
//
// so that a sealed payload cut from one packet fails to open in another.
func SealInfo(parts ...string) []byte {
	n := len("nanite-seal-v1")
	for _, p := range parts {
		n += 4 + len(p)
	}
	b := make([]byte, 0, n)
	b = append(b, "nanite-seal-v1"...)
	for _, p := range parts {
		b = binary.BigEndian.AppendUint32(b, uint32(len(p)))
		b = append(b, p...)
	}
	return b
}

// Seal encrypts plaintext to the holder of the private half of to with HPKE
// (base mode, HKDF-SHA256, AES-256-GCM), bound to info. Only that holder can
// open it, with (*Identity).OpenSealed and the same info. Seal does not
// authenticate the sender: put the sealed bytes in a signed envelope, and
// include the sender's name in info.
func Seal(to SealKey, info, plaintext []byte) ([]byte, error) {
	if to.IsZero() {
		return nil, newError(ErrNoSealKey, "", nil, "cannot seal to the zero key")
	}
	kem := to.KEM()
	if kem.encLen() == 0 {
		return nil, fmt.Errorf("security: unsupported KEM %s", kem)
	}
	kdf, aead := hpke.HKDFSHA256(), hpke.AES256GCM()
	hdr := [sealHeader]byte{sealMagic0, sealMagic1, sealVersion}
	binary.BigEndian.PutUint16(hdr[3:], uint16(kem))
	binary.BigEndian.PutUint16(hdr[5:], kdf.ID())
	binary.BigEndian.PutUint16(hdr[7:], aead.ID())
	enc, s, err := hpke.NewSender(to.pub, kdf, aead, info)
	if err != nil {
		return nil, fmt.Errorf("security: seal: %w", err)
	}
	if len(enc) != kem.encLen() {
		return nil, fmt.Errorf("security: seal: %s encapsulation is %d bytes, want %d", kem, len(enc), kem.encLen())
	}
	out := make([]byte, 0, sealHeader+len(enc)+len(plaintext)+16)
	out = append(out, hdr[:]...)
	out = append(out, enc...)
	ct, err := s.Seal(hdr[:], plaintext)
	if err != nil {
		return nil, fmt.Errorf("security: seal: %w", err)
	}
	return append(out, ct...), nil
}

// openSealed is (*Identity).OpenSealed.
func openSealed(priv hpke.PrivateKey, info, sealed []byte) ([]byte, error) {
	if !IsSealed(sealed) {
		return nil, newError(ErrCannotOpen, "", nil, "not a sealed payload")
	}
	kem := KEM(binary.BigEndian.Uint16(sealed[3:]))
	own := KEM(priv.KEM().ID())
	if kem != own {
		return nil, newError(ErrCannotOpen, "", nil, "sealed to a %s key, this identity has a %s key", kem, own)
	}
	kdfID := binary.BigEndian.Uint16(sealed[5:])
	if kdfID != hpke.HKDFSHA256().ID() {
		return nil, newError(ErrCannotOpen, "", nil, "unsupported KDF %#04x", kdfID)
	}
	var aead hpke.AEAD
	switch id := binary.BigEndian.Uint16(sealed[7:]); id {
	case hpke.AES256GCM().ID():
		aead = hpke.AES256GCM()
	case hpke.ChaCha20Poly1305().ID():
		aead = hpke.ChaCha20Poly1305()
	default:
		return nil, newError(ErrCannotOpen, "", nil, "unsupported AEAD %#04x", id)
	}
	n := kem.encLen()
	if len(sealed) < sealHeader+n+16 {
		return nil, newError(ErrCannotOpen, "", nil, "sealed payload truncated (%d bytes)", len(sealed))
	}
	r, err := hpke.NewRecipient(sealed[sealHeader:sealHeader+n], priv, hpke.HKDFSHA256(), aead, info)
	if err != nil {
		return nil, newError(ErrCannotOpen, "", err, "decapsulation failed")
	}
	pt, err := r.Open(sealed[:sealHeader], sealed[sealHeader+n:])
	if err != nil {
		return nil, newError(ErrCannotOpen, "", nil, "sealed to another identity, bound to other info, or tampered with")
	}
	return pt, nil
}
