package bridge

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/security"
	"github.com/nanite-go/nanite/testenv"
	"github.com/nanite-go/nanite/vertebra"
)

// pki is a site's CA and where its files are.
type pki struct {
	t   *testing.T
	ca  *security.CA
	dir string
}

func newPKI(t *testing.T, name string) *pki {
	t.Helper()
	ca, err := security.NewCA(name, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := ca.Save(dir); err != nil {
		t.Fatal(err)
	}
	return &pki{t: t, ca: ca, dir: dir}
}

func (p *pki) caFile() string { return filepath.Join(p.dir, security.CACertFile) }

// issue issues a certificate, saves it and returns it with YAML naming its
// files ({cert_file: ..., key_file: ...}).
func (p *pki) issue(name string, role security.Role) (*security.Identity, string) {
	p.t.Helper()
	id, err := p.ca.Issue(name, role, time.Hour)
	if err != nil {
		p.t.Fatal(err)
	}
	cert, key := filepath.Join(p.dir, name+".crt"), filepath.Join(p.dir, name+".key")
	if err := id.Save(cert, key); err != nil {
		p.t.Fatal(err)
	}
	return id, "{cert_file: " + cert + ", key_file: " + key + "}"
}

// TestSignedAcrossSites: both sites run in secure mode. A requester at A
// (certificate "ops") calls a service at B through A's proxy; bridge A
// signs the op as itself with the requester's own signed request as its
// origin; bridge B verifies both and relays on the requester's behalf, so
// that B's agent applies its policy to "ops" itself. Another requester at
// A ("intruder") is refused by that policy. Ops that claim an origin but
// are signed by a client, carry another payload than the origin, or replay
// an origin are refused by bridge B before anything is published.
func TestSignedAcrossSites(t *testing.T) {
	rabbit := testenv.Rabbit(t)
	urlA, urlB := rabbit.NewVhost(t), rabbit.NewVhost(t)
	p := testenv.RunProsody(t, testenv.ProsodyOptions{
		VirtualHosts: []string{siteDomain},
		Components:   map[string]string{domA: secret, domB: secret},
		Accounts:     []testenv.Account{{User: "alice", Host: siteDomain, Password: password}},
	})
	jidB := vhostJID(t, urlB, domB)
	siteA, siteB := newPKI(t, "site-a"), newPKI(t, "site-b")
	roots := x509.NewCertPool()
	roots.AddCert(siteA.ca.Cert)
	roots.AddCert(siteB.ca.Cert)
	verifier := func() *security.Verifier {
		v, err := security.NewVerifier(security.VerifierConfig{Roots: roots})
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	ops, _ := siteA.issue("ops", security.RoleClient)
	intruder, _ := siteA.issue("intruder", security.RoleClient)
	bridgeA, bridgeAFiles := siteA.issue("bridge-a", security.RoleBridge)
	_, proxyFiles := siteA.issue(ProxyIdentity(jidB), security.RoleAgent)
	_, bridgeBFiles := siteB.issue("bridge-b", security.RoleBridge)
	b1, _ := siteB.issue("b1", security.RoleAgent)

	// B's agent: secure, its policy lets only "ops" call /work/*.
	policy, err := security.ParsePolicy([]byte("rules:\n  - effect: allow\n    callers: [\"ops\"]\n    services: [\"/work/*\"]\n"))
	if err != nil {
		t.Fatal(err)
	}
	var count atomic.Int64
	agent, err := nanite.NewAgent(nanite.AgentConfig{URL: urlB, Identity: "b1", HeartbeatInterval: 300 * time.Millisecond,
		Secure: &nanite.Secure{Identity: b1, Verifier: verifier(), Policy: policy}})
	if err != nil {
		t.Fatal(err)
	}
	agent.AddActor(workActor("b1", &count))
	actx, acancel := context.WithCancel(context.Background())
	adone := make(chan error, 1)
	go func() { adone <- agent.Run(actx) }()
	t.Cleanup(func() { acancel(); <-adone })

	trust := "trust:\n  ca_files: [" + siteA.caFile() + ", " + siteB.caFile() + "]\n"
	bB, _ := runBridge(t, `
xmpp:
  server: `+p.ComponentAddr()+`
  domain: `+domB+`
  secret: `+secret+`
identity: `+bridgeBFiles+`
`+trust+`clusters:
  - name: app
    url: `+urlB+`
    secure: true
    exports:
      - services: ["/work/*"]
        to: ["`+domA+`", "alice@`+siteDomain+`"]
`)
	runBridge(t, `
xmpp:
  server: `+p.ComponentAddr()+`
  domain: `+domA+`
  secret: `+secret+`
identity: `+bridgeAFiles+`
`+trust+`clusters:
  - name: app
    url: `+urlA+`
    secure: true
    imports:
      - from: `+jidB.String()+`
        services: ["/work/*"]
        identity: `+proxyFiles+`
`)
	secureRequester := func(id *security.Identity) *nanite.Mapper {
		m, err := nanite.NewMapper(nanite.MapperConfig{URL: urlA, Identity: id.Name, Warmup: 100 * time.Millisecond,
			Secure: &nanite.Secure{Identity: id, Verifier: verifier()}})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- m.Run(ctx) }()
		t.Cleanup(func() { cancel(); <-done })
		return m
	}
	asOps, asIntruder := secureRequester(ops), secureRequester(intruder)
	ctx := t.Context()
	wctx, wcancel := context.WithTimeout(ctx, 15*time.Second)
	defer wcancel()
	if err := asOps.WaitForAgents(wctx, "/work/echo", 1); err != nil {
		t.Fatal(err)
	}

	payload := json.RawMessage(`{"n":1,"s":"x"}`)
	resp, err := asOps.Request(wctx, "/work/echo", payload)
	if err != nil {
		t.Fatal(err)
	}
	jsonEqual(t, resp.Results[0].Payload, payload)
	if err := asIntruder.WaitForAgents(wctx, "/work/echo", 1); err != nil {
		t.Fatal(err)
	}
	_, err = asIntruder.Request(wctx, "/work/echo", payload)
	var re *nanite.RemoteError
	if !errors.As(err, &re) || re.Code != nanite.CodeUnauthorized || !strings.Contains(re.Message, "intruder") {
		t.Errorf("intruder's request: %v, want %s naming intruder (B's agent judges the caller, not the bridges)", err, nanite.CodeUnauthorized)
	}

	// Ops with an origin, sent by hand from alice's client.
	alice, _ := client(t, p, "alice", nil)
	origin := func(token string, body json.RawMessage) []byte {
		pkt := &nanite.Packet{Kind: nanite.KindRequest, Type: "/work/echo", From: ops.Name, Token: token, ReplyTo: nanite.ReplyQueue(ops.Name),
			Payload: body, Deadline: time.Now().Add(time.Minute).UnixMilli()}
		b, err := pkt.Encode()
		if err != nil {
			t.Fatal(err)
		}
		env, err := ops.Sign(b)
		if err != nil {
			t.Fatal(err)
		}
		return env
	}
	send := func(signer *security.Identity, org []byte, rid string) error {
		m := vertebra.Meta{RequestID: rid, Origin: org}
		if err := vertebra.Sign(ctx, vertebra.IdentitySigner{Identity: signer}, jidB, "/work/echo", payload, &m); err != nil {
			t.Fatal(err)
		}
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		_, err := alice.Call(cctx, jidB, "/work/echo", payload, vertebra.WithMeta(m))
		return err
	}
	refusedWith := func(err error, what string) {
		t.Helper()
		var oe *vertebra.OpError
		if !errors.As(err, &oe) || !oe.Nack || !strings.HasPrefix(oe.Message, RefuseBadSignature+":") {
			t.Errorf("%s: %v, want a nack %s", what, err, RefuseBadSignature)
		}
	}
	good := origin("tok-1", payload)
	if err := send(bridgeA, good, "r-1"); err != nil {
		t.Errorf("a valid relayed op: %v", err)
	}
	refusedWith(send(bridgeA, good, "r-2"), "a replayed origin")
	refusedWith(send(intruder, origin("tok-2", payload), "r-3"), "an origin relayed by a client")
	refusedWith(send(bridgeA, origin("tok-3", json.RawMessage(`{"n":2}`)), "r-4"), "an origin for another payload")

	// B's agent ran: ops' request and the valid relayed op; the intruder's
	// request was refused by its policy before the handler; nothing else
	// reached it.
	if n := count.Load(); n != 2 {
		t.Errorf("B's agent ran %d requests, want 2", n)
	}
	if n := bB.Stats().Refused[RefuseBadSignature]; n != 3 {
		t.Errorf("bridge B refused %d ops for bad signatures, want 3", n)
	}
}
