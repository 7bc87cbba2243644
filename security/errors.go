package security

import (
	"errors"
	"fmt"
)

// Sentinel errors. Every rejection returned by this package is an *Error that
// wraps exactly one of these, so callers test with errors.Is and count with
// Reason.
var (
	// ErrMalformed: the envelope is not well formed (bad JSON, missing or
	// oversized field, bad encoding).
	ErrMalformed = errors.New("security: malformed envelope")
	// ErrUnsigned: a plain packet arrived where an envelope was required.
	ErrUnsigned = errors.New("security: packet is not signed")
	// ErrUnsupported: the envelope version or signature algorithm is not
	// one this package knows.
	ErrUnsupported = errors.New("security: unsupported envelope version or algorithm")
	// ErrBadCert: the certificate cannot be parsed, or is not one of ours
	// (missing or inconsistent name, role or keys).
	ErrBadCert = errors.New("security: bad certificate")
	// ErrUnknownSigner: the certificate does not chain to a trusted CA, or
	// an envelope without a certificate names a signer this verifier has
	// not seen.
	ErrUnknownSigner = errors.New("security: unknown signer")
	// ErrExpired: the certificate (or its CA) is past its NotAfter date.
	ErrExpired = errors.New("security: certificate expired")
	// ErrNotYetValid: the certificate (or its CA) is before its NotBefore
	// date.
	ErrNotYetValid = errors.New("security: certificate not yet valid")
	// ErrRevoked: the certificate's serial, its CA's serial or its name is
	// on the revocation list.
	ErrRevoked = errors.New("security: certificate revoked")
	// ErrWrongRole: the certificate's role is not one the caller accepts.
	ErrWrongRole = errors.New("security: wrong role")
	// ErrNameMismatch: the certificate's name is not the claimed name (the
	// envelope's signer).
	ErrNameMismatch = errors.New("security: name does not match certificate")
	// ErrBadSignature: the signature does not verify with the
	// certificate's key over the envelope's content.
	ErrBadSignature = errors.New("security: bad signature")
	// ErrOutsideWindow: the envelope's timestamp is too far in the past or
	// the future.
	ErrOutsideWindow = errors.New("security: timestamp outside the acceptance window")
	// ErrReplay: an envelope with the same signer and nonce was accepted
	// before, within the window.
	ErrReplay = errors.New("security: replayed packet")
	// ErrReplayCacheFull: the replay cache holds its maximum number of
	// nonces; the envelope is rejected because it cannot be remembered
	// (failing closed).
	ErrReplayCacheFull = errors.New("security: replay cache full")
	// ErrNotAuthorized: the policy denies the call.
	ErrNotAuthorized = errors.New("security: not authorized")
	// ErrCannotOpen: a sealed payload cannot be opened: it is sealed to
	// another identity, bound to other info, tampered with, or not a
	// sealed payload at all.
	ErrCannotOpen = errors.New("security: cannot open sealed payload")
	// ErrNoSealKey: the peer's certificate carries no sealing key.
	ErrNoSealKey = errors.New("security: peer has no sealing key")
	// ErrBadPolicy: a policy file is invalid.
	ErrBadPolicy = errors.New("security: invalid policy")
	// ErrBadKey: a key file is invalid or does not match its certificate.
	ErrBadKey = errors.New("security: bad key")
	// ErrUnknownSession: a session envelope names a session this receiver
	// does not hold (it restarted, or never accepted it).
	ErrUnknownSession = errors.New("security: unknown session")
	// ErrSessionExpired: a session envelope names a session that has
	// ended.
	ErrSessionExpired = errors.New("security: session expired")
	// ErrBadMAC: a session envelope's MAC does not verify (forged, altered,
	// or made with another session's key).
	ErrBadMAC = errors.New("security: bad session MAC")
	// ErrBadOffer: a session offer is malformed, over, too long, or its key
	// cannot be opened.
	ErrBadOffer = errors.New("security: bad session offer")
	// ErrSessionStoreFull: no room for a new session (failing closed: the
	// initiator goes on signing).
	ErrSessionStoreFull = errors.New("security: session store full")
)

// Reasons: the short machine-readable strings carried by *Error, one per
// sentinel, for counters and logs.
const (
	ReasonMalformed       = "malformed"
	ReasonUnsigned        = "unsigned"
	ReasonUnsupported     = "unsupported"
	ReasonBadCert         = "bad_cert"
	ReasonUnknownSigner   = "unknown_signer"
	ReasonExpired         = "cert_expired"
	ReasonNotYetValid     = "cert_not_yet_valid"
	ReasonRevoked         = "revoked"
	ReasonWrongRole       = "wrong_role"
	ReasonNameMismatch    = "name_mismatch"
	ReasonBadSignature    = "bad_signature"
	ReasonOutsideWindow   = "outside_window"
	ReasonReplay          = "replay"
	ReasonReplayCacheFull = "replay_cache_full"
	ReasonNotAuthorized   = "not_authorized"
	ReasonCannotOpen      = "cannot_open"
	ReasonNoSealKey       = "no_seal_key"
	ReasonBadPolicy       = "bad_policy"
	ReasonBadKey          = "bad_key"
	ReasonUnknownSession  = "unknown_session"
	ReasonSessionExpired  = "session_expired"
	ReasonBadMAC          = "bad_mac"
	ReasonBadOffer        = "bad_session_offer"
	ReasonSessionFull     = "session_store_full"
)

var reasons = map[error]string{
	ErrMalformed:        ReasonMalformed,
	ErrUnsigned:         ReasonUnsigned,
	ErrUnsupported:      ReasonUnsupported,
	ErrBadCert:          ReasonBadCert,
	ErrUnknownSigner:    ReasonUnknownSigner,
	ErrExpired:          ReasonExpired,
	ErrNotYetValid:      ReasonNotYetValid,
	ErrRevoked:          ReasonRevoked,
	ErrWrongRole:        ReasonWrongRole,
	ErrNameMismatch:     ReasonNameMismatch,
	ErrBadSignature:     ReasonBadSignature,
	ErrOutsideWindow:    ReasonOutsideWindow,
	ErrReplay:           ReasonReplay,
	ErrReplayCacheFull:  ReasonReplayCacheFull,
	ErrNotAuthorized:    ReasonNotAuthorized,
	ErrCannotOpen:       ReasonCannotOpen,
	ErrNoSealKey:        ReasonNoSealKey,
	ErrBadPolicy:        ReasonBadPolicy,
	ErrBadKey:           ReasonBadKey,
	ErrUnknownSession:   ReasonUnknownSession,
	ErrSessionExpired:   ReasonSessionExpired,
	ErrBadMAC:           ReasonBadMAC,
	ErrBadOffer:         ReasonBadOffer,
	ErrSessionStoreFull: ReasonSessionFull,
}

// Error is the error returned for every rejection. It wraps one sentinel
// (errors.Is(err, ErrReplay)) and, where there is one, the underlying cause
// (an *x509.CertificateInvalidError, a JSON syntax error, ...).
type Error struct {
	// Reason is the short machine reason of the sentinel, such as
	// "bad_signature" or "replay" (the Reason* constants).
	Reason string
	// Signer is the name the packet claimed, when it got that far.
	Signer string
	// Detail says what exactly was wrong, for humans.
	Detail string

	sentinel error
	cause    error
}

func newError(sentinel error, signer string, cause error, format string, args ...any) *Error {
	return &Error{
		Reason:   reasons[sentinel],
		Signer:   signer,
		Detail:   fmt.Sprintf(format, args...),
		sentinel: sentinel,
		cause:    cause,
	}
}

func (e *Error) Error() string {
	s := "security: " + e.Reason // an *Error made as a literal, outside this package
	if e.sentinel != nil {
		s = e.sentinel.Error()
	}
	if e.Signer != "" {
		s += fmt.Sprintf(" (signer %q)", e.Signer)
	}
	if e.Detail != "" {
		s += ": " + e.Detail
	}
	if e.cause != nil {
		s += ": " + e.cause.Error()
	}
	return s
}

// Unwrap returns the sentinel and, if any, the underlying cause.
func (e *Error) Unwrap() []error {
	var errs []error
	for _, err := range []error{e.sentinel, e.cause} {
		if err != nil {
			errs = append(errs, err)
		}
	}
	return errs
}

// Reason returns the machine reason of err: the Reason of the first *Error in
// its chain, "" for a nil error, and "error" for any other error.
func Reason(err error) string {
	if err == nil {
		return ""
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Reason
	}
	return "error"
}
