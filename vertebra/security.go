package vertebra

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/nanite-go/nanite/security"
)

// This file joins the security package to the ops protocol: an identity
// signs ops, a security verifier checks them, and a policy authorizes
// callers by their server-authenticated JID and, when the op carried a
// valid signature, by the signer's certificate name and role.
//
// On the wire, <meta xmlns="urn:nanite:op:0"> carries
//
//	<signature>: a security envelope (JSON, base64 in XML) with its
//	             "body" null and no "cert": the body is SigningBytes of
//	             the op, which the receiver computes itself;
//	<certificate>: the signer's certificate (DER, base64 in XML).
//
// The receiver puts both back into the envelope and verifies it with
// (*security.Verifier).VerifyEnvelope: certificate chain, dates,
// revocation, signature, timestamp window and replay (signer, nonce) all
// apply as for AMQP packets. A caller resending an unconfirmed op sends
// the same stanza, which the responder recognises as a duplicate by
// (sender, token) before verifying anything, so resends are not replays;
// a caller that sends an op again under a new token must sign it again
// (Caller does, for each JID).

// SignerPrefix starts the signer strings of IdentityVerifier: the URI SAN
// of the signer's certificate, "nanite:ROLE/NAME".
const SignerPrefix = "nanite:"

// SignerString returns the signer string of a certificate's role and
// name, "nanite:ROLE/NAME", as IdentityVerifier returns it.
func SignerString(role security.Role, name string) string {
	return SignerPrefix + string(role) + "/" + name
}

// ParseSigner splits a signer string made by SignerString into role and
// name. Any other non-empty string is a bare name with no role.
func ParseSigner(signedBy string) (security.Role, string) {
	if rest, ok := strings.CutPrefix(signedBy, SignerPrefix); ok {
		if role, name, ok := strings.Cut(rest, "/"); ok && name != "" {
			return security.Role(role), name
		}
	}
	return "", signedBy
}

// IdentitySigner signs ops with a security identity (a Signer for Caller
// and Sign).
type IdentitySigner struct {
	Identity *security.Identity
}

// Sign implements Signer: it returns the identity's envelope over signed,
// without its body and certificate, and the identity's certificate.
func (s IdentitySigner) Sign(_ context.Context, signed []byte) (signature, certificate []byte, err error) {
	if s.Identity == nil {
		return nil, nil, errors.New("vertebra: IdentitySigner without an identity")
	}
	raw, err := s.Identity.Sign(signed, security.OmitCert())
	if err != nil {
		return nil, nil, err
	}
	var env security.Envelope
	if err := json.Unmarshal(raw, &env); err != nil {
		return nil, nil, err
	}
	env.Body = nil
	sig, err := json.Marshal(&env)
	if err != nil {
		return nil, nil, err
	}
	return sig, s.Identity.Cert.Raw, nil
}

// IdentityVerifier checks op signatures made by IdentitySigner with a
// security verifier (a Verifier for ActorServer and AgentConfig).
type IdentityVerifier struct {
	Verifier *security.Verifier
	// Roles the signer's certificate may have; none: any role.
	Roles []security.Role
}

// Verify implements Verifier. It returns the signer as
// SignerString(role, name); errors are *security.Error (their Reason says
// why: bad_signature, replay, unknown_signer, ...).
func (v IdentityVerifier) Verify(_ context.Context, signature, certificate, signed []byte) (string, error) {
	if v.Verifier == nil {
		return "", errors.New("vertebra: IdentityVerifier without a verifier")
	}
	var env security.Envelope
	if err := json.Unmarshal(signature, &env); err != nil {
		return "", fmt.Errorf("%w: %v", security.ErrMalformed, err)
	}
	env.Body = signed
	env.Cert = certificate
	raw, err := json.Marshal(&env)
	if err != nil {
		return "", err
	}
	_, peer, err := v.Verifier.VerifyEnvelope(raw, v.Roles...)
	if err != nil {
		return "", err
	}
	return SignerString(peer.Role, peer.Name), nil
}

// Decider is what PolicyAuthorizer asks: *security.Policy and
// *security.PolicyHolder (which reloads its file) satisfy it. Do not put a
// nil *security.PolicyHolder in it.
type Decider interface {
	Decide(caller security.Caller, service string, agentTags []string) security.Decision
}

// PolicyAuthorizer authorizes ops with a security policy (an Authorizer).
// The policy's caller is the JID as the caller's server authenticated it
// (full JID: "jid:" patterns without a '/' match its bare JID) and, when
// the op carried a signature the Verifier accepted, the certificate's
// name and role: a rule naming either allows the op. Without a Verifier,
// only the JID counts.
type PolicyAuthorizer struct {
	Policy Decider
	// Tags are the agent's tags, matched against the rules' tags.
	Tags []string
}

// Authorize implements Authorizer: a denial is an error wrapping
// security.ErrNotAuthorized whose text says which rule decided.
func (p PolicyAuthorizer) Authorize(_ context.Context, caller, signedBy, op string) error {
	if p.Policy == nil {
		return security.Decision{Rule: "default deny", Reason: "no policy: default deny"}.Err()
	}
	return p.Policy.Decide(CallerOf(caller, signedBy), op, p.Tags).Err()
}

// CallerOf returns the policy caller of an op from caller (a JID) and
// signedBy (as an Authorizer receives them).
func CallerOf(caller, signedBy string) security.Caller {
	c := security.Caller{JID: caller}
	if signedBy != "" {
		c.Role, c.Name = ParseSigner(signedBy)
	}
	return c
}
