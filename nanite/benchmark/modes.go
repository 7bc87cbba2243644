package benchmark

import (
	"fmt"
	"slices"
	"strings"

	"github.com/nanite-go/nanite/security"
)

// The modes a run can measure (Config.Modes).
const (
	// ModeRaw is the amqp091-go request/reply baseline.
	ModeRaw = "raw"
	// ModePlain is a nanite request in plain mode.
	ModePlain = "plain"
	// ModeSigned is a nanite request in secure mode (docs/security.md):
	// every packet signed and verified, the agent checking a one-rule
	// allow policy, payloads in the clear.
	ModeSigned = "signed"
	// ModeSealed is secure mode with sealed payloads (Secure.Seal):
	// requests sealed to the agent, results sealed back to the mapper.
	ModeSealed = "sealed"
	// ModeSession is secure mode with session keys (Secure.Sessions):
	// the first request signed with a session offer (the key sealed to
	// the agent), then every request and result authenticated with an
	// HMAC under the session key; payloads in the clear, policy checked.
	ModeSession = "session"
)

// DefaultModes and DefaultKEMs are what a run measures by default: the raw
// baseline, plain mode, and secure mode signed and sealed, each with both
// KEMs (hybrid first: it is the default KEM of security.CA.Issue).
var (
	DefaultModes = []string{ModeRaw, ModePlain, ModeSigned, ModeSealed}
	DefaultKEMs  = []string{"hybrid", "x25519"}
)

// Mode is one way of making the echo request.
type Mode struct {
	// Name is "raw", "plain", or "signed", "sealed" or "session"
	// followed by ":" and the KEM of the identities' sealing keys
	// ("sealed:x25519").
	Name string
	// Secure, Seal and Sessions configure nanite.Secure; KEM is the
	// sealing KEM of the identities (it also sets the size of the
	// certificate that every envelope carries).
	Secure, Seal, Sessions bool
	KEM                    security.KEM
}

// Base is the mode's name without its KEM: raw, plain, signed, sealed or
// session.
func (m Mode) Base() string {
	base, _, _ := strings.Cut(m.Name, ":")
	return base
}

// KEMName is the short name of a KEM: "hybrid" or "x25519".
func KEMName(k security.KEM) string {
	switch k {
	case security.KEMHybrid:
		return "hybrid"
	case security.KEMX25519:
		return "x25519"
	}
	return k.String()
}

// ParseModes expands mode names into modes. "raw" and "plain" stand for
// themselves; "signed", "sealed" and "session" are measured once per KEM of
// kems (in that order), and "signed:KEM", "sealed:KEM" or "session:KEM"
// name one KEM ("hybrid" or "x25519", see security.ParseKEM). Duplicates
// are dropped.
func ParseModes(names, kems []string) ([]Mode, error) {
	if len(names) == 0 {
		names = DefaultModes
	}
	if len(kems) == 0 {
		kems = DefaultKEMs
	}
	var ks []security.KEM
	for _, s := range kems {
		k, err := security.ParseKEM(strings.TrimSpace(s))
		if err != nil {
			return nil, fmt.Errorf("benchmark: --kem: %w", err)
		}
		if !slices.Contains(ks, k) {
			ks = append(ks, k)
		}
	}
	var modes []Mode
	add := func(m Mode) {
		if !slices.ContainsFunc(modes, func(o Mode) bool { return o.Name == m.Name }) {
			modes = append(modes, m)
		}
	}
	for _, name := range names {
		base, kem, hasKEM := strings.Cut(strings.TrimSpace(name), ":")
		switch base {
		case ModeRaw, ModePlain:
			if hasKEM {
				return nil, fmt.Errorf("benchmark: mode %q takes no KEM", name)
			}
			add(Mode{Name: base})
			continue
		case ModeSigned, ModeSealed, ModeSession:
		default:
			return nil, fmt.Errorf("benchmark: unknown mode %q (want raw, plain, signed, sealed, session, or one of the last three with :KEM)", name)
		}
		these := ks
		if hasKEM {
			k, err := security.ParseKEM(kem)
			if err != nil {
				return nil, fmt.Errorf("benchmark: mode %q: %w", name, err)
			}
			these = []security.KEM{k}
		}
		for _, k := range these {
			add(Mode{Name: base + ":" + KEMName(k), Secure: true, Seal: base == ModeSealed, Sessions: base == ModeSession, KEM: k})
		}
	}
	return modes, nil
}
