package bridge

import (
	"context"
	"encoding/json"
	"errors"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"mellium.im/xmpp/jid"

	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/testenv"
	"github.com/nanite-go/nanite/vertebra"
)

const (
	domA = "nanite.site-a.test"
	domB = "nanite.site-b.test"
)

// startBridge runs a bridge for the YAML config until the test ends.
func startBridge(t *testing.T, yml string) *Bridge {
	t.Helper()
	cfg, err := ParseConfig("test.yaml", []byte(yml))
	if err != nil {
		t.Fatal(err)
	}
	b, err := New(cfg, Options{MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
		PresenceInterval: 200 * time.Millisecond,
		Mapper:           func(_ string, mc *nanite.MapperConfig) { mc.Warmup = 100 * time.Millisecond }})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Bridge.Run %s: %v", b.Domain(), err)
		}
	})
	rctx, rcancel := context.WithTimeout(ctx, 15*time.Second)
	defer rcancel()
	if err := b.Ready(rctx); err != nil {
		t.Fatal(err)
	}
	return b
}

func vhostJID(t *testing.T, brokerURL, domain string) jid.JID {
	t.Helper()
	u, _ := url.Parse(brokerURL)
	j, err := ClusterJID(strings.TrimPrefix(u.Path, "/"), domain)
	if err != nil {
		t.Fatal(err)
	}
	return j
}

// requester runs a plain nanite mapper in a vhost (the local requester).
func requester(t *testing.T, brokerURL string) *nanite.Mapper {
	t.Helper()
	m, err := nanite.NewMapper(nanite.MapperConfig{URL: brokerURL, Warmup: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	rctx, rcancel := context.WithTimeout(ctx, 15*time.Second)
	defer rcancel()
	if err := m.Ready(rctx); err != nil {
		t.Fatal(err)
	}
	return m
}

// TestClusterToXMPP: two sites (one prosody with two component domains,
// two vhosts, two bridges); an echo agent only at B; a requester at A
// calls B's services through A's proxy agent, XMPP and bridge B.
func TestClusterToXMPP(t *testing.T) {
	rabbit := testenv.Rabbit(t)
	urlA, urlB := rabbit.NewVhost(t), rabbit.NewVhost(t)
	p := testenv.RunProsody(t, testenv.ProsodyOptions{
		VirtualHosts: []string{siteDomain},
		Components:   map[string]string{domA: secret, domB: secret},
	})
	jidA, jidB := vhostJID(t, urlA, domA), vhostJID(t, urlB, domB)
	count := new(atomic.Int64)
	stopAgent := echoAgent(t, urlB, "agent-b", count)

	// A imports B's /echo/*; B imports A's /echo/* too (a loop of imports:
	// A's proxy is never exported, so B finds nothing to proxy), and each
	// exports /echo/* to the other.
	cfg := func(dom, url string, peer string, from jid.JID) string {
		return `
xmpp:
  server: ` + p.ComponentAddr() + `
  domain: ` + dom + `
  secret: ` + secret + `
clusters:
  - name: app
    url: ` + url + `
    exports:
      - services: ["/echo/*"]
        to: ["` + peer + `"]
    imports:
      - from: ` + from.String() + `
        services: ["/echo/*"]
        as_tags: ["site:remote"]
`
	}
	bB := startBridge(t, cfg(domB, urlB, domA, jidA))
	bA := startBridge(t, cfg(domA, urlA, domB, jidB))
	if err := bB.Mapper("app").WaitForAgents(t.Context(), "/echo/say", 1); err != nil {
		t.Fatal(err)
	}

	req := requester(t, urlA)
	wctx, wcancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer wcancel()
	if err := req.WaitForAgents(wctx, "/echo/fail", 1); err != nil {
		t.Fatal(err)
	}
	var proxyState nanite.AgentState
	for _, a := range req.Agents() {
		if a.Identity == ProxyIdentity(jidB) {
			proxyState = a
		}
	}
	if proxyState.Identity == "" {
		t.Fatalf("no proxy agent %s at A: %+v", ProxyIdentity(jidB), req.Agents())
	}
	for _, tag := range []string{TagProxy, TagRemotePrefix + domB, "site:remote"} {
		if !hasAll(proxyState.Tags, []string{tag}) {
			t.Errorf("proxy tags %v lack %q", proxyState.Tags, tag)
		}
	}
	var svcs []string
	for _, s := range proxyState.Services {
		svcs = append(svcs, s.Name)
	}
	// /secret/get is not exported by B, /nanite/* are the proxy's own.
	for _, s := range svcs {
		if !strings.HasPrefix(s, "/echo/") && !strings.HasPrefix(s, "/nanite/") {
			t.Errorf("proxy offers %s", s)
		}
	}

	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()

	// The cross-site call: the payload comes back as the same JSON.
	payload := json.RawMessage(`{"text":"héllo","n":[1,2.5,null],"nested":{"a":true}}`)
	resp, err := req.Request(ctx, "/echo/say", payload, nanite.WithTimeout(10*time.Second))
	if err != nil {
		t.Fatalf("/echo/say: %v", err)
	}
	if len(resp.Results) != 1 || resp.Results[0].Err != nil || resp.Results[0].Agent != ProxyIdentity(jidB) {
		t.Fatalf("/echo/say results %+v", resp.Results)
	}
	jsonEqual(t, resp.Results[0].Payload, payload)
	if string(resp.Results[0].Payload) != string(payload) {
		t.Errorf("payload %s, want byte for byte %s", resp.Results[0].Payload, payload)
	}

	// Streaming.
	var mu sync.Mutex
	var inter []nanite.Intermediate
	resp, err = req.Request(ctx, "/echo/stream", nil, nanite.WithTimeout(10*time.Second),
		nanite.OnIntermediate(func(in nanite.Intermediate) { mu.Lock(); inter = append(inter, in); mu.Unlock() }))
	if err != nil {
		t.Fatalf("/echo/stream: %v", err)
	}
	var final string
	if err := resp.Decode(&final); err != nil || final != "done" {
		t.Errorf("/echo/stream final %q, %v", final, err)
	}
	mu.Lock()
	if len(inter) != 3 {
		t.Errorf("intermediates %+v, want 3", inter)
	}
	for i, in := range inter {
		if in.Key != "progress" || string(in.Payload) != string(rune('0'+i)) {
			t.Errorf("intermediate %d: %s %s", i, in.Key, in.Payload)
		}
	}
	mu.Unlock()

	// A remote handler error arrives with its code.
	resp, err = req.Request(ctx, "/echo/fail", nil, nanite.WithTimeout(10*time.Second))
	var re *nanite.RemoteError
	if err == nil && len(resp.Results) == 1 {
		err = resp.Results[0].Err
	}
	if !errors.As(err, &re) || re.Code != nanite.CodeHandler || !strings.Contains(re.Message, "it broke") {
		t.Errorf("/echo/fail: %v (%#v), want %s with the handler's message", err, re, nanite.CodeHandler)
	}
	if n := count.Load(); n != 3 {
		t.Errorf("agent at B handled %d requests, want 3", n)
	}

	// A request that already crossed A is refused by A's proxy (loop), and
	// one past the hop limit too; neither reaches B.
	remoteCode := func(err error) string {
		var re *nanite.RemoteError
		if errors.As(err, &re) {
			return re.Code
		}
		return ""
	}
	_, err = req.Request(ctx, "/echo/say", payload, nanite.WithTimeout(10*time.Second), nanite.WithHops(domB, domA))
	if remoteCode(err) != CodeLoop {
		t.Errorf("request with hops through A: %v, want %s", err, CodeLoop)
	}
	_, err = req.Request(ctx, "/echo/say", payload, nanite.WithTimeout(10*time.Second),
		nanite.WithHops("n1.test", "n2.test", "n3.test", "n4.test"))
	if remoteCode(err) != CodeHopLimit {
		t.Errorf("request past the hop limit: %v, want %s", err, CodeHopLimit)
	}
	if n := count.Load(); n != 3 {
		t.Errorf("agent at B handled %d requests, want 3", n)
	}

	// An op from XMPP (B calling A) is never routed to A's own proxy, even
	// though it offers the service: refused, no ping-pong.
	_, err = bB.Endpoint().Call(ctx, jidA, "/echo/say", payload, vertebra.WithFrom(jidB),
		vertebra.WithMeta(vertebra.Meta{Hops: []vertebra.Hop{{By: domB}}}))
	var oe *vertebra.OpError
	if !errors.As(err, &oe) || !oe.Nack || oe.Code != CodeNoAgent || !strings.Contains(oe.Message, "proxies") {
		t.Errorf("op from B to A's proxy-only service: %v, want a no_agent nack", err)
	}

	// The loop of imports with the agent gone: A's proxy → B, which has
	// only its own proxy for A (or nothing): a clear refusal, fast.
	stopAgent()
	start := time.Now()
	_, err = req.Request(ctx, "/echo/say", payload, nanite.WithTimeout(10*time.Second))
	if remoteCode(err) != CodeNoAgent || time.Since(start) > 5*time.Second {
		t.Errorf("request with the agent gone: %v after %v, want a prompt %s", err, time.Since(start), CodeNoAgent)
	}
	if n := count.Load(); n != 3 {
		t.Errorf("agent at B handled %d requests, want 3", n)
	}

	stA, stB := bA.Stats(), bB.Stats()
	if stA.RelayedOut != 4 || stA.Refused[RefuseLoop] != 1 || stA.Refused[RefuseHopLimit] != 1 || stA.Refused[RefuseNoAgent] != 1 {
		t.Errorf("bridge A stats %+v", stA)
	}
	if stB.Relayed != 3 || stB.Refused[RefuseNoAgent] != 1 {
		t.Errorf("bridge B stats %+v", stB)
	}
}
