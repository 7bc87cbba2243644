package security_test

import (
	"errors"
	"fmt"
	"log"
	"time"

	"github.com/nanite-go/nanite/security"
)

// A CA issues an agent and a client; the agent verifies a request the client
// signed, and rejects a replay of it.
func Example() {
	ca, err := security.NewCA("app-ca", 10*365*24*time.Hour)
	if err != nil {
		log.Fatal(err)
	}
	client, err := ca.Issue("ops-cli", security.RoleClient, 24*time.Hour)
	if err != nil {
		log.Fatal(err)
	}

	// The agent's side: trust the CA (in production: security.LoadRoots("ca.crt")).
	verifier, err := security.NewVerifier(security.VerifierConfig{Roots: ca.Pool()})
	if err != nil {
		log.Fatal(err)
	}

	packet := []byte(`{"v":1,"packet":"request","type":"/ops/restart","from":"ops-cli","token":"t1"}`)
	env, err := client.Sign(packet)
	if err != nil {
		log.Fatal(err)
	}

	body, peer, err := verifier.VerifyEnvelope(env, security.RoleClient, security.RoleMapper)
	fmt.Println(peer.Name, peer.Role, string(body) == string(packet), err)

	_, _, err = verifier.VerifyEnvelope(env)
	fmt.Println(errors.Is(err, security.ErrReplay), security.Reason(err))
	// Output:
	// ops-cli client true <nil>
	// true replay
}

// Seal a payload to an agent whose certificate the sender verified; only
// that agent opens it.
func ExampleSeal() {
	ca, _ := security.NewCA("app-ca", 365*24*time.Hour)
	agent, _ := ca.Issue("agent-7f3a", security.RoleAgent, 24*time.Hour) // hybrid ML-KEM-768+X25519 by default
	other, _ := ca.Issue("agent-0000", security.RoleAgent, 24*time.Hour)
	verifier, _ := security.NewVerifier(security.VerifierConfig{Roots: ca.Pool()})

	peer, err := verifier.VerifyCert(agent.Cert.Raw, "agent-7f3a", security.RoleAgent)
	if err != nil {
		log.Fatal(err)
	}
	info := security.SealInfo("ops-cli", "/db/rotate", "token-42")
	sealed, err := security.Seal(peer.SealKey, info, []byte(`{"password":"hunter2"}`))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(peer.SealKey.KEM(), len(sealed)-len(`{"password":"hunter2"}`) == security.SealOverhead(peer.SealKey.KEM()))

	plain, err := agent.OpenSealed(info, sealed)
	fmt.Println(string(plain), err)

	_, err = other.OpenSealed(info, sealed)
	fmt.Println(errors.Is(err, security.ErrCannotOpen))
	// Output:
	// mlkem768x25519 true
	// {"password":"hunter2"} <nil>
	// true
}

func ExamplePolicy_Decide() {
	policy, err := security.ParsePolicy([]byte(`
rules:
  - name: no-prod-shutdown
    effect: deny
    callers: ["*"]
    services: ["/ops/shutdown"]
    tags: ["env:prod"]
  - name: ops
    effect: allow
    callers: ["ops-*", "role:client", "jid:*@site-b.example"]
    services: ["/ops/*"]
`))
	if err != nil {
		log.Fatal(err)
	}
	for _, q := range []struct {
		caller  security.Caller
		service string
		tags    []string
	}{
		{security.Caller{Name: "ops-1", Role: security.RoleAgent}, "/ops/restart", nil},
		{security.Caller{Name: "ops-1", Role: security.RoleAgent}, "/ops/shutdown", []string{"env:prod"}},
		{security.Caller{JID: "alice@site-b.example/laptop"}, "/ops/status", nil},
		{security.Caller{Name: "web-3", Role: security.RoleAgent}, "/ops/restart", nil},
	} {
		d := policy.Decide(q.caller, q.service, q.tags)
		fmt.Printf("%v by %s\n", d.Allowed, d.Rule)
	}
	// Output:
	// true by ops
	// false by no-prod-shutdown
	// true by ops
	// false by default deny
}

func ExampleRevocationList() {
	ca, _ := security.NewCA("app-ca", 365*24*time.Hour)
	agent, _ := ca.Issue("agent-7", security.RoleAgent, 24*time.Hour)
	revoked, _ := security.ParseRevocationList([]byte("# stolen laptop\nname agent-7\n"))
	verifier, _ := security.NewVerifier(security.VerifierConfig{Roots: ca.Pool(), Revoked: revoked})

	_, err := verifier.VerifyCert(agent.Cert.Raw, "agent-7")
	fmt.Println(errors.Is(err, security.ErrRevoked))

	_ = revoked.Set(nil, nil) // e.g. after (*RevocationList).Load on SIGHUP
	_, err = verifier.VerifyCert(agent.Cert.Raw, "agent-7")
	fmt.Println(err)
	// Output:
	// true
	// <nil>
}
