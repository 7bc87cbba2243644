package bridge

import (
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"mellium.im/xmlstream"
	"mellium.im/xmpp"
	"mellium.im/xmpp/jid"
	"mellium.im/xmpp/mux"
	"mellium.im/xmpp/stanza"

	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/testenv"
	"github.com/nanite-go/nanite/vertebra"
)

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) != "" {
		os.Exit(runHelperAgent())
	}
	testenv.Main(m)
}

const (
	siteDomain = "site-a.test"
	bridgeDom  = "nanite.site-a.test"
	secret     = "s3cret"
	password   = "pw"
)

// echoAgent runs a nanite agent with /echo/say, /echo/stream and
// /secret/get, counting the requests it handles.
func echoAgent(t *testing.T, brokerURL, id string, count *atomic.Int64) (stop func()) {
	t.Helper()
	a, err := nanite.NewAgent(nanite.AgentConfig{URL: brokerURL, Identity: id, HeartbeatInterval: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	echo := nanite.NewActor("echo").
		Expose("say", func(ctx context.Context, r *nanite.Request) (any, error) {
			count.Add(1)
			return r.Payload, nil
		}).
		Expose("whoami", func(ctx context.Context, r *nanite.Request) (any, error) {
			count.Add(1)
			return id, nil
		}).
		Expose("stream", func(ctx context.Context, r *nanite.Request) (any, error) {
			count.Add(1)
			for i := range 3 {
				if err := r.Intermediate(ctx, "progress", i); err != nil {
					return nil, err
				}
			}
			return "done", nil
		}).
		Expose("fail", func(ctx context.Context, r *nanite.Request) (any, error) {
			count.Add(1)
			return nil, errors.New("it broke")
		})
	a.AddActor(echo)
	a.AddActor(nanite.NewActor("secret").Expose("get", func(ctx context.Context, r *nanite.Request) (any, error) {
		count.Add(1)
		return "leaked", nil
	}))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); <-done }) }
	t.Cleanup(stop)
	rctx, rcancel := context.WithTimeout(ctx, 15*time.Second)
	defer rcancel()
	if err := a.Ready(rctx); err != nil {
		t.Fatal(err)
	}
	return stop
}

type site struct {
	yml        string // the bridge's config
	dir        string // its directory
	stopBridge func()
	bridge     *Bridge
	cluster    jid.JID
	counts     []*atomic.Int64
	stops      []func()
	alice      *vertebra.Endpoint
	mallory    *vertebra.Endpoint
	// aliceConn and malloryConn are the callers' sessions; alice's
	// presence events arrive on presence.
	aliceConn, malloryConn *vertebra.Conn
	presence               chan presenceEvent
}

type presenceEvent struct {
	from   string
	avail  bool
	status string
}

// setupCfg adds to the bridge's test config.
type setupCfg struct {
	top     string // top-level YAML (trust, policy)
	exports string // more exports of the cluster (YAML list items, 6 spaces in)
}

func setup(t *testing.T, sc setupCfg) *site {
	t.Helper()
	brokerURL := testenv.Rabbit(t).NewVhost(t)
	u, _ := url.Parse(brokerURL)
	vhost := strings.TrimPrefix(u.Path, "/")
	p := testenv.RunProsody(t, testenv.ProsodyOptions{
		VirtualHosts: []string{siteDomain},
		Components:   map[string]string{bridgeDom: secret},
		Accounts: []testenv.Account{
			{User: "alice", Host: siteDomain, Password: password},
			{User: "mallory", Host: siteDomain, Password: password},
		},
	})
	s := &site{}
	for _, id := range []string{"agent-1", "agent-2"} {
		c := new(atomic.Int64)
		s.counts = append(s.counts, c)
		s.stops = append(s.stops, echoAgent(t, brokerURL, id, c))
	}
	yml := `
xmpp:
  server: ` + p.ComponentAddr() + `
  domain: ` + bridgeDom + `
  secret: ` + secret + `
clusters:
  - name: app
    url: ` + brokerURL + `
    exports:
      - services: ["/echo/*"]
        to: ["alice@` + siteDomain + `"]
      - services: ["/echo/say"]
        to: ["*@` + siteDomain + `"]
` + sc.exports + sc.top
	s.yml, s.dir = yml, t.TempDir()
	s.stopBridge = s.startBridge(t)
	s.cluster, _ = ClusterJID(vhost, bridgeDom)
	if got := s.bridge.ClusterJIDs()["app"]; !got.Equal(s.cluster) {
		t.Fatalf("cluster JID %s, want %s", got, s.cluster)
	}
	s.presence = make(chan presenceEvent, 100)
	s.alice, s.aliceConn = client(t, p, "alice", s.presence)
	s.mallory, s.malloryConn = client(t, p, "mallory", nil)
	return s
}

// startBridge starts a bridge with the site's config (a new one after a
// stop: a restart) and waits until it is ready and sees the two agents. The
// function it returns stops it; so does the end of the test.
func (s *site) startBridge(t *testing.T) (stop func()) {
	t.Helper()
	cfg, err := ParseConfig(filepath.Join(s.dir, "test.yaml"), []byte(s.yml))
	if err != nil {
		t.Fatal(err)
	}
	b, err := New(cfg, Options{Logger: nil, MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
		PresenceInterval: 200 * time.Millisecond,
		Mapper:           func(_ string, mc *nanite.MapperConfig) { mc.Warmup = 100 * time.Millisecond }})
	if err != nil {
		t.Fatal(err)
	}
	s.bridge = b
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Bridge.Run: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	rctx, rcancel := context.WithTimeout(ctx, 15*time.Second)
	defer rcancel()
	if err := b.Ready(rctx); err != nil {
		t.Fatal(err)
	}
	if err := b.Mapper("app").WaitForAgents(rctx, "/echo/say", 2); err != nil {
		t.Fatal(err)
	}
	return stop
}

// client is a plain XMPP client (c2s) used as a generic Vertebra caller.
func client(t *testing.T, p *testenv.Prosody, user string, events chan<- presenceEvent) (*vertebra.Endpoint, *vertebra.Conn) {
	t.Helper()
	tc, err := vertebra.LoadCAFile(p.CAFile())
	if err != nil {
		t.Fatal(err)
	}
	ep := vertebra.NewEndpoint(vertebra.Config{})
	cc := vertebra.ConnConfig{Endpoint: ep, Dial: vertebra.DialConfig{
		JID: jid.MustParse(user + "@" + siteDomain + "/test"), Password: password, Addr: p.C2SAddr(), TLSConfig: tc}}
	if events != nil {
		// Initial presence, so that the server delivers presence to us.
		cc.OnConnect = func(ctx context.Context, s *xmpp.Session) {
			_ = s.Send(ctx, stanza.Presence{}.Wrap(nil))
		}
		cc.Options = []mux.Option{
			mux.Presence(stanza.AvailablePresence, xml.Name{Local: "status"}, mux.PresenceHandlerFunc(
				func(pr stanza.Presence, r xmlstream.TokenReadEncoder) error {
					var st string
					for {
						tok, err := r.Token()
						if err != nil {
							break
						}
						if cd, ok := tok.(xml.CharData); ok {
							st += string(cd)
						}
					}
					events <- presenceEvent{from: pr.From.String(), avail: true, status: st}
					return nil
				})),
			mux.Presence(stanza.UnavailablePresence, xml.Name{}, mux.PresenceHandlerFunc(
				func(pr stanza.Presence, _ xmlstream.TokenReadEncoder) error {
					events <- presenceEvent{from: pr.From.String()}
					return nil
				})),
		}
	}
	c := vertebra.NewConn(cc)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done; _ = ep.Close() })
	select {
	case <-c.Ready():
	case err := <-done:
		t.Fatal(err)
	case <-time.After(10 * time.Second):
		t.Fatal("client not connected")
	}
	return ep, c
}

func jsonEqual(t *testing.T, got, want json.RawMessage) {
	t.Helper()
	var g, w any
	if err := json.Unmarshal(got, &g); err != nil {
		t.Fatalf("result %s: %v", got, err)
	}
	_ = json.Unmarshal(want, &w)
	if !reflect.DeepEqual(g, w) {
		t.Errorf("result %s, want %s", got, want)
	}
}

func TestXMPPToCluster(t *testing.T) {
	s := setup(t, setupCfg{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	total := func() int64 { return s.counts[0].Load() + s.counts[1].Load() }

	t.Run("cluster", func(t *testing.T) {
		payload := json.RawMessage(`{"name":"x","list":[1,-2,3.5,"s",true,false,null],"nested":{"k":"v"},"big":12345678901}`)
		res, err := s.alice.Call(ctx, s.cluster, "/echo/say", payload)
		if err != nil {
			t.Fatal(err)
		}
		jsonEqual(t, res.Value(), payload)
		t.Logf("sent %s, got %s", payload, res.Value())
	})
	t.Run("agent", func(t *testing.T) {
		for _, id := range []string{"agent-1", "agent-2"} {
			to, _ := AgentJID(s.cluster, id)
			res, err := s.alice.Call(ctx, to, "/echo/whoami", nil)
			if err != nil {
				t.Fatal(err)
			}
			jsonEqual(t, res.Value(), json.RawMessage(`"`+id+`"`))
		}
	})
	t.Run("stream", func(t *testing.T) {
		var inter []string
		res, err := s.alice.Call(ctx, s.cluster, "/echo/stream", nil, vertebra.OnData(func(d vertebra.Data) {
			if d.Intermediate {
				inter = append(inter, d.Key+"="+string(d.Payload))
			}
		}))
		if err != nil {
			t.Fatal(err)
		}
		jsonEqual(t, res.Value(), json.RawMessage(`"done"`))
		if want := []string{"progress=0", "progress=1", "progress=2"}; !reflect.DeepEqual(inter, want) {
			t.Errorf("intermediates %v, want %v", inter, want)
		}
	})
	t.Run("error", func(t *testing.T) {
		_, err := s.alice.Call(ctx, s.cluster, "/echo/fail", nil)
		var oe *vertebra.OpError
		if !errors.As(err, &oe) || oe.Nack || oe.Code != nanite.CodeHandler || !strings.Contains(oe.Message, "it broke") {
			t.Fatalf("err %v (%#v), want an error with code handler_error", err, oe)
		}
	})

	before := total()
	refusal := func(t *testing.T, ep *vertebra.Endpoint, to jid.JID, op, code, reason string, opts ...vertebra.CallOption) {
		t.Helper()
		_, err := ep.Call(ctx, to, op, json.RawMessage(`{}`), opts...)
		var oe *vertebra.OpError
		if !errors.As(err, &oe) || !oe.Nack || oe.Code != code || !strings.HasPrefix(oe.Message, reason+":") {
			t.Fatalf("err %v, want a nack %s with reason %s", err, code, reason)
		}
	}
	t.Run("not exported", func(t *testing.T) {
		refusal(t, s.alice, s.cluster, "/secret/get", vertebra.CodeUnauthorized, RefuseNotExported)
		to, _ := AgentJID(s.cluster, "agent-1")
		refusal(t, s.alice, to, "/secret/get", vertebra.CodeUnauthorized, RefuseNotExported)
	})
	t.Run("peer not allowed", func(t *testing.T) {
		refusal(t, s.mallory, s.cluster, "/echo/stream", vertebra.CodeUnauthorized, RefusePeer)
		// mallory may call /echo/say (exported to the whole domain).
		if _, err := s.mallory.Call(ctx, s.cluster, "/echo/say", json.RawMessage(`1`)); err != nil {
			t.Fatal(err)
		}
		before++
	})
	t.Run("loop and hops", func(t *testing.T) {
		refusal(t, s.alice, s.cluster, "/echo/say", CodeLoop, RefuseLoop,
			vertebra.WithMeta(vertebra.Meta{Hops: []vertebra.Hop{{By: "nanite.site-b.test"}, {By: bridgeDom}}}))
		var hops []vertebra.Hop
		for range DefaultHopLimit {
			hops = append(hops, vertebra.Hop{By: "nanite.elsewhere.test"})
		}
		refusal(t, s.alice, s.cluster, "/echo/say", CodeHopLimit, RefuseHopLimit, vertebra.WithMeta(vertebra.Meta{Hops: hops}))
	})
	t.Run("unknown", func(t *testing.T) {
		refusal(t, s.alice, jid.MustParse("nosuch@"+bridgeDom), "/echo/say", vertebra.CodeUnknown, RefuseUnknownCluster)
		to, _ := AgentJID(s.cluster, "agent-9")
		refusal(t, s.alice, to, "/echo/say", CodeNoAgent, RefuseNoAgent)
	})
	if got := total(); got != before {
		t.Errorf("refused ops reached the agents: %d requests handled, want %d", got, before)
	}
	st := s.bridge.Stats()
	t.Logf("stats %+v", st)
	for reason, n := range map[string]int64{RefuseNotExported: 2, RefusePeer: 1, RefuseLoop: 1, RefuseHopLimit: 1, RefuseUnknownCluster: 1, RefuseNoAgent: 1} {
		if st.Refused[reason] != n {
			t.Errorf("refused[%s] = %d, want %d", reason, st.Refused[reason], n)
		}
	}
}
