package vertebra

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"mellium.im/xmpp/jid"

	"github.com/nanite-go/nanite/security"
)

func issue(t *testing.T, ca *security.CA, name string, role security.Role) *security.Identity {
	t.Helper()
	id, err := ca.Issue(name, role, time.Hour, security.WithKEM(security.KEMX25519))
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// TestXMPPAgentPolicy: an agent enforcing a security policy on the
// caller's JID and on the signature of its ops.
func TestXMPPAgentPolicy(t *testing.T) {
	p := runProsody(t)
	ca, err := security.NewCA("app-ca", 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	other, err := security.NewCA("app-ca", 24*time.Hour) // same name, other key
	if err != nil {
		t.Fatal(err)
	}
	ops1 := issue(t, ca, "ops-1", security.RoleClient)
	intruder := issue(t, ca, "intruder", security.RoleClient)
	forged := issue(t, other, "ops-1", security.RoleClient)
	pol, err := security.ParsePolicy([]byte(`
rules:
  - name: alice
    effect: allow
    callers: ["jid:alice@site-a.test"]
    services: ["/echo/*"]
  - name: ops
    effect: allow
    callers: ["ops-*"]
    services: ["/echo/say"]
`))
	if err != nil {
		t.Fatal(err)
	}
	v, err := security.NewVerifier(security.VerifierConfig{Roots: ca.Pool()})
	if err != nil {
		t.Fatal(err)
	}
	actors := &fakeActors{}
	a := startAgent(t, AgentConfig{Dial: clientDial(t, p, "agent1"), Handler: actors,
		Authorizer: PolicyAuthorizer{Policy: pol},
		Verifier:   IdentityVerifier{Verifier: v, Roles: []security.Role{security.RoleClient}}})
	alice := NewEndpoint(Config{})
	startConn(t, clientDial(t, p, "alice"), alice)
	bob := NewEndpoint(Config{})
	startConn(t, clientDial(t, p, "bob"), bob)
	to := a.JID()
	payload := json.RawMessage(`{"s":"hi"}`)

	call := func(ep *Endpoint, s Signer, op string) error {
		t.Helper()
		c := &Caller{Endpoint: ep, Signer: s}
		_, err := c.Call(ctxTimeout(t, 5*time.Second), CallRequest{Op: op, Payload: payload, To: []jid.JID{to}})
		return err
	}
	refused := func(what string, err error, want string) {
		t.Helper()
		var oe *OpError
		if !errors.Is(err, ErrNotAuthorized) || !errors.As(err, &oe) || !oe.Nack || !strings.Contains(oe.Message, want) {
			t.Fatalf("%s: %v, want a not_authorized nack saying %q", what, err, want)
		}
	}
	runs := func() int64 { return actors.runs.Load() }

	// By JID: alice may, bob may not; the handler never runs for bob.
	if err := call(alice, nil, "/echo/say"); err != nil {
		t.Fatalf("alice: %v", err)
	}
	if err := call(alice, nil, "/echo/stream"); err != nil {
		t.Fatalf("alice, stream: %v", err)
	}
	n := runs()
	refused("bob", call(bob, nil, "/echo/say"), "default deny")
	if runs() != n {
		t.Fatal("the handler ran for bob")
	}

	// By signature: bob's op signed by ops-1 passes where the policy
	// names the certificate, and only there.
	if err := call(bob, IdentitySigner{ops1}, "/echo/say"); err != nil {
		t.Fatalf("bob signed by ops-1: %v", err)
	}
	if runs() != n+1 {
		t.Fatalf("runs %d, want %d", runs(), n+1)
	}
	refused("bob signed by ops-1, other op", call(bob, IdentitySigner{ops1}, "/echo/stream"), "default deny")
	refused("bob signed by intruder", call(bob, IdentitySigner{intruder}, "/echo/say"), "default deny")
	// A certificate of another CA with the same name: forged.
	refused("forged", call(bob, IdentitySigner{forged}, "/echo/say"), "unknown signer")

	// Tampering: a signature of another payload, a flipped signature, a
	// replayed signature.
	var m Meta
	if err := Sign(context.Background(), IdentitySigner{ops1}, to, "/echo/say", payload, &m); err != nil {
		t.Fatal(err)
	}
	_, err = bob.Call(ctxTimeout(t, 5*time.Second), to, "/echo/say", json.RawMessage(`{"s":"evil"}`), WithMeta(m))
	refused("tampered payload", err, "bad signature")
	var env security.Envelope
	if err := json.Unmarshal(m.Signature, &env); err != nil {
		t.Fatal(err)
	}
	env.Sig[0] ^= 1
	flipped := m
	if flipped.Signature, err = json.Marshal(&env); err != nil {
		t.Fatal(err)
	}
	_, err = bob.Call(ctxTimeout(t, 5*time.Second), to, "/echo/say", payload, WithMeta(flipped))
	refused("flipped signature", err, "bad signature")
	if _, err := bob.Call(ctxTimeout(t, 5*time.Second), to, "/echo/say", payload, WithMeta(m)); err != nil {
		t.Fatalf("first use of a signature: %v", err)
	}
	_, err = bob.Call(ctxTimeout(t, 5*time.Second), to, "/echo/say", payload, WithMeta(m))
	refused("replayed signature", err, "replay")
	if runs() != n+2 {
		t.Fatalf("runs %d, want %d: a refused op ran", runs(), n+2)
	}
}

func TestSignerString(t *testing.T) {
	for _, c := range []struct {
		in   string
		role security.Role
		name string
	}{
		{SignerString(security.RoleClient, "ops-1"), security.RoleClient, "ops-1"},
		{"signer-1", "", "signer-1"},
		{"nanite:agent/", "", "nanite:agent/"},
	} {
		r, n := ParseSigner(c.in)
		if r != c.role || n != c.name {
			t.Errorf("ParseSigner(%q) = %q %q", c.in, r, n)
		}
	}
	got := CallerOf("bob@site-a.test/x", "nanite:client/ops-1")
	if got != (security.Caller{Name: "ops-1", Role: security.RoleClient, JID: "bob@site-a.test/x"}) {
		t.Errorf("CallerOf: %+v", got)
	}
	if err := (PolicyAuthorizer{}).Authorize(context.Background(), "a@b", "", "/x"); !errors.Is(err, security.ErrNotAuthorized) {
		t.Errorf("no policy: %v", err)
	}
}
