// Package security holds the identities, certificates, signatures, sealed
// payloads, replay protection and authorization policy of a nanite
// federation. It imports no other package of the project; the cluster
// (package nanite), the bridge and the CLI use it. docs/security.md is the
// design and threat model; this comment is the map.
//
// # Identities
//
// Every agent, mapper, bridge and client has an *Identity: an X.509
// certificate issued by the application's or site's *CA, an Ed25519 signing
// key and an HPKE sealing key. The certificate binds the identity's name
// (subject CommonName and URI SAN "nanite:ROLE/NAME"), its Role (subject
// OrganizationalUnit) and its public sealing key (extension OIDSealKey), so
// whoever verifies a certificate learns whom it may seal payloads to. The
// sealing key is hybrid ML-KEM-768+X25519 by default (KEMHybrid), or X25519
// (WithKEM(KEMX25519)).
//
//	ca, _ := security.NewCA("app-ca", 10*365*24*time.Hour)
//	id, _ := ca.Issue("agent-7f3a", security.RoleAgent, 365*24*time.Hour)
//	_ = id.Save("agent.crt", "agent.key") // key file 0600: two PEM blocks
//
// # Envelopes (secure mode)
//
// (*Identity).Sign wraps a packet in a JSON envelope carrying the signer's
// name and certificate, a timestamp, a random nonce and an Ed25519 signature
// over all of them and the packet (see Envelope and SignedBytes). A
// receiver's *Verifier checks, in order: form, certificate (chain to the
// configured roots, dates, revocation, name = signer, role), signature,
// timestamp window (DefaultWindow, 60 s both ways) and replay (a bounded
// cache of (signer, nonce) pairs, failing closed when full). Verified
// certificates are cached by SHA-256, so the steady-state cost of a packet
// is one JSON decode, one hash and one Ed25519 verification.
//
//	env, _ := id.Sign(packet)
//	body, peer, err := verifier.VerifyEnvelope(env, security.RoleAgent)
//
// # Sealing
//
// Seal encrypts a payload to a peer's SealKey with HPKE (RFC 9180; KEM from
// the certificate, HKDF-SHA256, AES-256-GCM); only that identity's
// OpenSealed opens it. Seal sealed payloads inside signed envelopes: HPKE
// base mode does not say who sealed. Bind the context with SealInfo
// (sender, service, token).
//
// # Policy
//
// A *Policy is a list of rules, first match wins, default deny, deciding
// whether a Caller (certificate name and role, or a JID relayed by the
// bridge) may call a service on an agent with given tags. *PolicyHolder
// reloads it from its file on demand or on change, keeping the old policy
// when the new file is bad.
//
// # Errors
//
// Every rejection is an *Error wrapping one sentinel (ErrBadSignature,
// ErrReplay, ...) and carrying a short Reason ("bad_signature", "replay")
// for counters; Reason(err) extracts it from any error.
package security
