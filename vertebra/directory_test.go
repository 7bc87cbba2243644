package vertebra

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"mellium.im/xmpp"
	"mellium.im/xmpp/jid"
)

func jids(js []jid.JID) string {
	var s []string
	for _, j := range js {
		s = append(s, j.String())
	}
	return fmt.Sprint(s)
}

func TestDirectoryMatching(t *testing.T) {
	now := time.Unix(1000, 0)
	d := NewDirectory(DirectoryConfig{Now: func() time.Time { return now }})
	a, b, c := jid.MustParse("a@x/1"), jid.MustParse("b@x/1"), jid.MustParse("c@x/1")
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(d.Advertise(a, []string{"/echo", "/cluster/rd00"}, time.Minute))
	must(d.Advertise(b, []string{"/echo/say", "/cluster/rd01", "/web"}, time.Minute))
	must(d.Advertise(c, []string{"/gem/list", "/cluster"}, 10*time.Second))

	for _, q := range []struct {
		op   string
		res  []string
		want string
	}{
		{"/echo/say", nil, "[a@x/1 b@x/1]"},                 // a by ancestor, b exactly
		{"/echo/time", nil, "[a@x/1]"},                      // only a's /echo covers it
		{"/echo", nil, "[a@x/1]"},                           // op matching: ancestors only
		{"", []string{"/cluster"}, "[a@x/1 b@x/1 c@x/1]"},   // descendants of /cluster
		{"", []string{"/cluster/rd00"}, "[a@x/1 c@x/1]"},    // exact, and c's ancestor /cluster
		{"", []string{"/cluster/rd0"}, "[c@x/1]"},           // segments, not string prefixes
		{"/echo/say", []string{"/cluster/rd01"}, "[b@x/1]"}, // intersection of op and resource
		{"/echo/say", []string{"/cluster", "/web"}, "[b@x/1]"},
		{"/gem/list", []string{"/cluster/rd00/db"}, "[c@x/1]"},
		{"/nothing/here", nil, "[]"},
	} {
		got, err := d.Discover(q.op, q.res)
		if err != nil {
			t.Fatal(err)
		}
		if jids(got) != q.want {
			t.Errorf("Discover(%q, %q) = %s, want %s", q.op, q.res, jids(got), q.want)
		}
	}

	// Expiry.
	now = now.Add(11 * time.Second)
	if got, _ := d.Discover("/gem/list", nil); len(got) != 0 {
		t.Errorf("expired entry found: %s", jids(got))
	}
	// TTL 0 withdraws one resource, then all.
	must(d.Advertise(a, []string{"/cluster/rd00"}, 0))
	if got, _ := d.Discover("", []string{"/cluster/rd00"}); len(got) != 0 {
		t.Errorf("withdrawn resource found: %s", jids(got))
	}
	if got, _ := d.Discover("/echo/time", nil); jids(got) != "[a@x/1]" {
		t.Errorf("a's other resource lost: %s", jids(got))
	}
	must(d.Advertise(a, nil, 0))
	if got, _ := d.Discover("/echo/time", nil); len(got) != 0 {
		t.Errorf("withdrawn JID found: %s", jids(got))
	}
	d.Forget(b)
	if got, _ := d.Discover("/echo/say", nil); len(got) != 0 {
		t.Errorf("forgotten JID found: %s", jids(got))
	}
	// Bad input.
	for _, r := range []string{"relative", "/a/../b", "/a/", ""} {
		if err := d.Advertise(a, []string{r}, time.Minute); !errors.Is(err, ErrBadResource) {
			t.Errorf("Advertise(%q): %v", r, err)
		}
	}
	if _, err := d.Discover("", nil); err == nil {
		t.Error("Discover with nothing succeeded")
	}
	small := NewDirectory(DirectoryConfig{MaxResources: 2, MaxJIDs: 1})
	must(small.Advertise(a, []string{"/a", "/b"}, time.Minute))
	if err := small.Advertise(a, []string{"/c"}, time.Minute); err == nil {
		t.Error("more resources than allowed")
	}
	if err := small.Advertise(b, []string{"/a"}, time.Minute); err == nil {
		t.Error("more JIDs than allowed")
	}
}

// TestDiscoveryAndScopes runs a directory on a component, three agents
// advertising to it, and callers using scopes single and all.
func TestDiscoveryAndScopes(t *testing.T) {
	p := runProsody(t)
	dir := NewDirectory(DirectoryConfig{})
	dirEP := NewEndpoint(Config{Handler: dir})
	startConn(t, componentDial(p), dirEP, func(c *ConnConfig) { c.Options = append(c.Options, dir.HandlePresence()) })
	dirJID := jid.MustParse("directory@" + testComponent)

	actors := &fakeActors{}
	var agents []*Agent
	for i, user := range []string{"agent1", "agent2", "agent3"} {
		auth := AllowJIDs("*")
		if i == 0 {
			auth = AllowJIDs("nobody@" + testDomain) // refuses everyone: single must skip it
		}
		res := []string{fmt.Sprintf("/cluster/rd%02d", i)}
		agents = append(agents, startAgent(t, AgentConfig{Dial: clientDial(t, p, user), Handler: actors,
			Authorizer: auth, Directory: dirJID, Resources: res, AdvertiseTTL: time.Minute}))
	}
	alice := NewEndpoint(Config{})
	startConn(t, clientDial(t, p, "alice"), alice)
	caller := &Caller{Endpoint: alice, Directory: dirJID}

	// Wait for the three advertisements.
	var found []jid.JID
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		var err error
		found, err = Discover(ctxTimeout(t, 5*time.Second), alice, dirJID, "/echo/say", nil)
		if err != nil {
			t.Fatal(err)
		}
		if len(found) == 3 {
			break
		}
	}
	if jids(found) != "[agent1@site-a.test/test agent2@site-a.test/test agent3@site-a.test/test]" {
		t.Fatalf("discovered %s", jids(found))
	}
	got, err := Discover(ctxTimeout(t, 5*time.Second), alice, dirJID, "/echo/say", []string{"/cluster/rd01"})
	if err != nil || jids(got) != "[agent2@site-a.test/test]" {
		t.Fatalf("discover on /cluster/rd01: %s %v", jids(got), err)
	}

	t.Run("single", func(t *testing.T) {
		for range 5 { // whatever the order, agent1's refusal is skipped
			outs, err := caller.Call(ctxTimeout(t, 5*time.Second), CallRequest{Op: "/echo/say", Scope: ScopeSingle,
				Payload: json.RawMessage(`"x"`), Resources: []string{"/cluster"}})
			if err != nil {
				t.Fatalf("single: %v (%+v)", err, outs)
			}
			last := outs[len(outs)-1]
			if last.JID.Equal(agents[0].JID()) || string(last.Result.Value()) != `"x"` || !last.Acked {
				t.Errorf("single ended at %v with %s", last.JID, last.Result.Value())
			}
			for _, o := range outs[:len(outs)-1] {
				if !o.JID.Equal(agents[0].JID()) || !errors.Is(o.Err, ErrNack) {
					t.Errorf("skipped %v: %v", o.JID, o.Err)
				}
			}
		}
	})

	t.Run("single with one resource", func(t *testing.T) {
		outs, err := caller.Call(ctxTimeout(t, 5*time.Second), CallRequest{Op: "/echo/say", Scope: ScopeSingle,
			Resources: []string{"/cluster/rd02"}})
		if err != nil || len(outs) != 1 || !outs[0].JID.Equal(agents[2].JID()) {
			t.Fatalf("%+v %v", outs, err)
		}
	})

	t.Run("all", func(t *testing.T) {
		var mu sync.Mutex
		var from []string
		outs, err := caller.Call(ctxTimeout(t, 5*time.Second), CallRequest{Op: "/echo/stream", Scope: ScopeAll,
			OnData: func(d Data) {
				mu.Lock()
				defer mu.Unlock()
				if !d.Intermediate {
					from = append(from, d.From.String())
				}
			}})
		if len(outs) != 3 {
			t.Fatalf("%d outcomes", len(outs))
		}
		if !errors.Is(err, ErrNack) {
			t.Errorf("err = %v, want agent1's nack", err)
		}
		ok := 0
		for _, o := range outs {
			if o.Err == nil {
				ok++
			}
		}
		slices.Sort(from)
		if ok != 2 || fmt.Sprint(from) != "[agent2@site-a.test/test agent3@site-a.test/test]" {
			t.Errorf("%d ok, results from %v", ok, from)
		}
	})

	t.Run("no target", func(t *testing.T) {
		_, err := caller.Call(ctxTimeout(t, 5*time.Second), CallRequest{Op: "/nothing/here", Scope: ScopeSingle})
		if !errors.Is(err, ErrNoTarget) {
			t.Fatalf("err = %v", err)
		}
	})

	t.Run("expiry and withdrawal over XMPP", func(t *testing.T) {
		ctx := ctxTimeout(t, 5*time.Second)
		if err := Advertise(ctx, alice, dirJID, []string{"/tmp/x"}, 300*time.Millisecond); err != nil {
			t.Fatal(err)
		}
		if got, _ := Discover(ctx, alice, dirJID, "", []string{"/tmp"}); jids(got) != "[alice@site-a.test/test]" {
			t.Fatalf("after advertise: %s", jids(got))
		}
		time.Sleep(400 * time.Millisecond)
		if got, _ := Discover(ctx, alice, dirJID, "", []string{"/tmp"}); len(got) != 0 {
			t.Fatalf("after expiry: %s", jids(got))
		}
		if err := Advertise(ctx, alice, dirJID, []string{"/tmp/y"}, time.Minute); err != nil {
			t.Fatal(err)
		}
		if err := Advertise(ctx, alice, dirJID, []string{"/tmp/y"}, 0); err != nil {
			t.Fatal(err)
		}
		if got, _ := Discover(ctx, alice, dirJID, "", []string{"/tmp"}); len(got) != 0 {
			t.Fatalf("after TTL 0: %s", jids(got))
		}
		// Advertising another client's JID is refused.
		b, _ := json.Marshal(AdvertiseArgs{Resources: []string{"/x"}, TTL: 60, JID: "bob@" + testDomain + "/x"})
		if _, err := alice.Call(ctx, dirJID, OpAdvertise, b); !errors.Is(err, ErrNotAuthorized) {
			t.Errorf("advertising for bob: %v", err)
		}
	})

	t.Run("an agent going offline is forgotten", func(t *testing.T) {
		// carol advertises and sends the directory her presence, then
		// disconnects: her unavailable presence reaches the directory.
		ctx, cancel := context.WithCancel(context.Background())
		tmp := NewEndpoint(Config{})
		c := NewConn(ConnConfig{Dial: clientDial(t, p, "carol"), Endpoint: tmp,
			OnConnect: func(ctx context.Context, s *xmpp.Session) {
				_ = sendPresence(ctx, s, dirJID, 0)
				_ = Advertise(ctx, tmp, dirJID, []string{"/carol"}, time.Minute)
			}})
		done := make(chan error, 1)
		go func() { done <- c.Run(ctx) }()
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			if got, _ := dir.Discover("", []string{"/carol"}); len(got) == 1 {
				break
			}
		}
		if got, _ := dir.Discover("", []string{"/carol"}); len(got) != 1 {
			t.Fatalf("carol not advertised")
		}
		cancel()
		<-done
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			if got, _ := dir.Discover("", []string{"/carol"}); len(got) == 0 {
				break
			}
		}
		if got, _ := dir.Discover("", []string{"/carol"}); len(got) != 0 {
			t.Errorf("carol still known after going offline")
		}
	})
}
