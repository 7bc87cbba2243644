package bridge

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"mellium.im/xmpp/jid"

	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/security"
	"github.com/nanite-go/nanite/testenv"
	"github.com/nanite-go/nanite/vertebra"
)

// TestVhostIsolation: one bridge joins three clusters, two vhosts on one
// broker (one, two) and a third on another broker (three). Cluster one
// exports /work/* and /only/* to alice and to cluster three, /secret/*
// only to signed ops of cert:ops; two and three both import from one.
// Nothing reaches a cluster that its exports do not open: two never sees
// one's services, ops for one never reach two's agent (which offers the
// same /work/* services), three gets only what one exports to it, and
// unexported services, foreign JIDs, forged and replayed signatures and
// loops are refused before anything is published.
func TestVhostIsolation(t *testing.T) {
	shared := testenv.Rabbit(t)
	other := testenv.RunRabbitMQ(t, testenv.RabbitOptions{Name: "isolation"})
	urlOne, urlTwo, urlThree := shared.NewVhost(t), shared.NewVhost(t), other.NewVhost(t)
	jidOne := vhostJID(t, urlOne, bridgeDom)
	jidTwo := vhostJID(t, urlTwo, bridgeDom)
	p := testenv.RunProsody(t, testenv.ProsodyOptions{
		VirtualHosts: []string{siteDomain},
		Components:   map[string]string{bridgeDom: secret},
		Accounts: []testenv.Account{
			{User: "alice", Host: siteDomain, Password: password},
			{User: "mallory", Host: siteDomain, Password: password},
		},
	})
	site := newPKI(t, "site-a")
	ops, _ := site.issue("ops", security.RoleClient)

	var countOne, countTwo atomic.Int64
	pong := func(id string, n *atomic.Int64) *nanite.Actor {
		return nanite.NewActor("only").Expose("ping", func(ctx context.Context, r *nanite.Request) (any, error) {
			n.Add(1)
			return id + " pong", nil
		})
	}
	secretActor := func(n *atomic.Int64) *nanite.Actor {
		return nanite.NewActor("secret").Expose("get", func(ctx context.Context, r *nanite.Request) (any, error) {
			n.Add(1)
			return "s3cr3t", nil
		})
	}
	siteAgent(t, urlOne, "a1", 0.1, workActor("a1", &countOne), pong("a1", &countOne), secretActor(&countOne))
	siteAgent(t, urlTwo, "a2", 0.1, workActor("a2", &countTwo), secretActor(&countTwo))

	b, _ := runBridge(t, `
xmpp:
  server: `+p.ComponentAddr()+`
  domain: `+bridgeDom+`
  secret: `+secret+`
trust:
  ca_files: [`+site.caFile()+`]
clusters:
  - name: one
    url: `+urlOne+`
    exports:
      - services: ["/work/*", "/only/*"]
        to: ["alice@`+siteDomain+`", "`+vhostJID(t, urlThree, bridgeDom).String()+`"]
      - services: ["/secret/*"]
        to: ["cert:ops"]
        require_signature: true
  - name: two
    url: `+urlTwo+`
    imports:
      - from: `+jidOne.String()+`
        services: ["*"]
  - name: three
    url: `+urlThree+`
    imports:
      - from: `+jidOne.String()+`
        services: ["/work/*", "/only/*", "/secret/*"]
`)
	ctx := t.Context()
	alice, _ := client(t, p, "alice", nil)
	mallory, _ := client(t, p, "mallory", nil)
	if err := b.Mapper("one").WaitForAgents(ctx, "/only/ping", 1); err != nil {
		t.Fatal(err)
	}
	payload := json.RawMessage(`{"k":"v"}`)
	refused := func(ep *vertebra.Endpoint, to string, op string, m *vertebra.Meta, reason string) {
		t.Helper()
		var opts []vertebra.CallOption
		if m != nil {
			opts = append(opts, vertebra.WithMeta(*m))
		}
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		_, err := ep.Call(cctx, mustJID(t, to), op, payload, opts...)
		var oe *vertebra.OpError
		if !errors.As(err, &oe) || !oe.Nack || !strings.HasPrefix(oe.Message, reason+":") {
			t.Errorf("%s %s: %v, want a nack with reason %s", to, op, err, reason)
		}
	}
	value := func(res *vertebra.Result, err error) string {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return string(res.Value())
	}

	// From XMPP: alice reaches one's exported services, nothing of two.
	if got := value(alice.Call(ctx, jidOne, "/work/who", payload)); got != `"a1"` {
		t.Errorf("alice -> one /work/who = %s", got)
	}
	refused(alice, jidTwo.String(), "/work/who", nil, RefuseNotExported)
	refused(alice, jidOne.String(), "/nanite/ping", nil, RefuseNotExported)
	refused(mallory, jidOne.String(), "/work/who", nil, RefusePeer)
	// Signatures: unsigned, forged (signed for another op), replayed.
	sign := func(op, rid string) vertebra.Meta {
		m := vertebra.Meta{RequestID: rid}
		if err := vertebra.Sign(ctx, vertebra.IdentitySigner{Identity: ops}, jidOne, op, payload, &m); err != nil {
			t.Fatal(err)
		}
		return m
	}
	refused(alice, jidOne.String(), "/secret/get", nil, RefuseSignature)
	forged := sign("/secret/other", "r-1")
	refused(alice, jidOne.String(), "/secret/get", &forged, RefuseBadSignature)
	good := sign("/secret/get", "r-2")
	if got := value(alice.Call(ctx, jidOne, "/secret/get", payload, vertebra.WithMeta(good))); got != `"s3cr3t"` {
		t.Errorf("signed /secret/get = %s", got)
	}
	refused(alice, jidOne.String(), "/secret/get", &good, RefuseBadSignature) // replayed
	// A loop: the op says it already crossed this bridge.
	loop := vertebra.Meta{Hops: []vertebra.Hop{{By: domB}, {By: bridgeDom}}}
	refused(alice, jidOne.String(), "/work/who", &loop, RefuseLoop)

	// Between local vhosts: three imports what one exports to it; two gets
	// nothing (one does not export to two).
	reqTwo, reqThree := requester(t, urlTwo), requester(t, urlThree)
	eventually(t, "proxy for one in three", func() error {
		a, ok := proxyOf(reqThree, jidOne)
		if !ok || !offersService(a, "/only/ping") || !offersService(a, "/work/who") {
			return fmt.Errorf("proxy %+v", a)
		}
		if offersService(a, "/secret/get") {
			return fmt.Errorf("proxy in three offers /secret/get, which one exports only to signed ops")
		}
		return nil
	})
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	resp, err := reqThree.Request(rctx, "/only/ping", nil)
	if err != nil {
		t.Fatal(err)
	}
	if s := string(resp.Results[0].Payload); s != `"a1 pong"` {
		t.Errorf("three -> /only/ping = %s", s)
	}
	resp, err = reqThree.Request(rctx, "/work/who", nil, nanite.WithSelector(nanite.SelectAll))
	if err != nil || len(resp.Results) != 1 || resp.Results[0].Agent != nanite.TargetXMPP+jidOne.String()+"/a1" {
		t.Errorf("three -> /work/who all: %v %+v", err, resp)
	}
	if _, err := reqThree.Request(rctx, "/secret/get", nil); !errors.Is(err, nanite.ErrNoAgent) {
		t.Errorf("three -> /secret/get: %v, want ErrNoAgent", err)
	}
	// Give two the time three needed, then check it has no proxy.
	time.Sleep(time.Second)
	if _, ok := proxyOf(reqTwo, jidOne); ok {
		t.Errorf("two has a proxy for one, which exports nothing to it")
	}
	if _, err := reqTwo.Request(rctx, "/only/ping", nil); !errors.Is(err, nanite.ErrNoAgent) {
		t.Errorf("two -> /only/ping: %v, want ErrNoAgent", err)
	}

	// one ran: alice's /work/who, the signed /secret/get, three's
	// /only/ping and /work/who; two's agent ran nothing.
	if n := countOne.Load(); n != 4 {
		t.Errorf("one's agent handled %d requests, want 4", n)
	}
	if n := countTwo.Load(); n != 0 {
		t.Errorf("two's agent handled %d requests, want 0", n)
	}
	st := b.Stats()
	if st.Relayed != 2 || st.RelayedLocal != 2 {
		t.Errorf("stats %+v: want 2 ops relayed from XMPP and 2 requests between vhosts", st)
	}
}

func mustJID(t *testing.T, s string) jid.JID {
	t.Helper()
	j, err := jid.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return j
}
