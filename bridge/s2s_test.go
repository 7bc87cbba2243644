package bridge

import (
	"context"
	"encoding/json"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"mellium.im/xmpp/jid"

	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/testenv"
)

// TestFederationOverS2S: like TestClusterToXMPP, but each site has an XMPP
// server of its own (two prosody servers on 127.0.0.2 and 127.0.0.3 that
// federate over s2s), and bridge A is a component of server A only, bridge
// B of server B only. A requester at A calls B's services through A's
// proxy agent; alice, a plain client of server A, calls B's cluster JID
// directly. Every stanza between the sites crosses s2s.
func TestFederationOverS2S(t *testing.T) {
	rabbit := testenv.Rabbit(t)
	urlA, urlB := rabbit.NewVhost(t), rabbit.NewVhost(t)
	ps := testenv.RunFederatedProsody(t,
		testenv.ProsodyOptions{
			VirtualHosts: []string{siteDomain},
			Components:   map[string]string{domA: secret},
			Accounts:     []testenv.Account{{User: "alice", Host: siteDomain, Password: password}},
		},
		testenv.ProsodyOptions{
			VirtualHosts: []string{"site-b.test"},
			Components:   map[string]string{domB: secret},
		})
	pA, pB := ps[0], ps[1]
	jidA, jidB := vhostJID(t, urlA, domA), vhostJID(t, urlB, domB)
	count := new(atomic.Int64)
	echoAgent(t, urlB, "agent-b", count)

	cfg := func(p *testenv.Prosody, dom, url string, to []string, from jid.JID) string {
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
        to: ["` + strings.Join(to, `", "`) + `"]
    imports:
      - from: ` + from.String() + `
        services: ["/echo/*"]
        as_tags: ["site:remote"]
`
	}
	bB := startBridge(t, cfg(pB, domB, urlB, []string{domA, "alice@" + siteDomain}, jidA))
	bA := startBridge(t, cfg(pA, domA, urlA, []string{domB}, jidB))
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if err := bB.Mapper("app").WaitForAgents(ctx, "/echo/say", 1); err != nil {
		t.Fatal(err)
	}

	// A's proxy agent for B appears once bridge A has read B's exports
	// (disco#info over s2s).
	start := time.Now()
	req := requester(t, urlA)
	wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
	defer wcancel()
	if err := req.WaitForAgents(wctx, "/echo/stream", 1); err != nil {
		t.Fatalf("no proxy agent for B at A (does s2s work?): %v", err)
	}
	var proxy *nanite.AgentState
	for _, a := range req.Agents() {
		if a.Identity == ProxyIdentity(jidB) {
			proxy = &a
		}
	}
	if proxy == nil || !hasAll(proxy.Tags, []string{TagProxy, TagRemotePrefix + domB, "site:remote"}) {
		t.Fatalf("no proxy agent %s with its tags at A: %+v", ProxyIdentity(jidB), req.Agents())
	}
	t.Logf("proxy agent at A after %v", time.Since(start).Round(time.Millisecond))

	// A cross-site call: B's answer, byte for byte.
	payload := json.RawMessage(`{"text":"héllo over s2s","n":[1,2.5,null],"nested":{"a":true}}`)
	start = time.Now()
	resp, err := req.Request(ctx, "/echo/say", payload, nanite.WithTimeout(10*time.Second))
	if err != nil {
		t.Fatalf("/echo/say: %v", err)
	}
	if len(resp.Results) != 1 || resp.Results[0].Err != nil || resp.Results[0].Agent != ProxyIdentity(jidB) {
		t.Fatalf("/echo/say results %+v", resp.Results)
	}
	if string(resp.Results[0].Payload) != string(payload) {
		t.Errorf("payload %s, want byte for byte %s", resp.Results[0].Payload, payload)
	}
	t.Logf("/echo/say through both bridges and s2s: %v", time.Since(start).Round(time.Microsecond))

	// Streaming: the intermediates arrive, in order, before the result.
	var mu sync.Mutex
	var inter []string
	resp, err = req.Request(ctx, "/echo/stream", nil, nanite.WithTimeout(10*time.Second),
		nanite.OnIntermediate(func(in nanite.Intermediate) {
			mu.Lock()
			inter = append(inter, in.Key+"="+string(in.Payload))
			mu.Unlock()
		}))
	if err != nil {
		t.Fatalf("/echo/stream: %v", err)
	}
	var final string
	if err := resp.Decode(&final); err != nil || final != "done" {
		t.Errorf("/echo/stream final %q, %v", final, err)
	}
	mu.Lock()
	if want := []string{"progress=0", "progress=1", "progress=2"}; !reflect.DeepEqual(inter, want) {
		t.Errorf("intermediates %v, want %v", inter, want)
	}
	mu.Unlock()

	// alice, a client of server A, calls B's cluster JID directly.
	alice, _ := client(t, pA, "alice", nil)
	res, err := alice.Call(ctx, jidB, "/echo/say", payload)
	if err != nil {
		t.Fatalf("alice -> %s: %v", jidB, err)
	}
	jsonEqual(t, res.Value(), payload)
	if n := count.Load(); n != 3 {
		t.Errorf("agent at B handled %d requests, want 3", n)
	}
	if st := bA.Stats(); st.RelayedOut != 2 {
		t.Errorf("bridge A stats %+v, want 2 relayed out", st)
	}
	if st := bB.Stats(); st.Relayed != 3 {
		t.Errorf("bridge B stats %+v, want 3 relayed", st)
	}

	// The stanzas went through server B: server A does not serve B's
	// domain, bridge B is connected to server B only, and both servers
	// logged the s2s connections, from bridge A's domain and from alice's.
	links := func(p *testenv.Prosody) []string {
		var s []string
		for _, l := range p.S2SLinks() {
			s = append(s, l.String())
		}
		return s
	}
	for _, c := range []struct {
		p    *testenv.Prosody
		want []string
	}{
		{pA, []string{"outgoing " + domA + "->" + domB, "outgoing " + siteDomain + "->" + domB, "incoming " + domB + "->" + domA}},
		{pB, []string{"incoming " + domA + "->" + domB, "incoming " + siteDomain + "->" + domB, "outgoing " + domB + "->" + domA}},
	} {
		got := links(c.p)
		for _, w := range c.want {
			if !slices.Contains(got, w) {
				t.Errorf("%v: s2s connections %v lack %q", c.p, got, w)
			}
		}
	}
}
