package testenv_test

import (
	"context"
	"net"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nanite-go/nanite/testenv"
)

// TestFederatedProsody: two servers on their own loopback addresses; a
// component of each; an IQ from the component of A to a JID of B's
// component travels over s2s to B and its answer back.
func TestFederatedProsody(t *testing.T) {
	t.Parallel()
	const secret = "s3cret"
	ps := testenv.RunFederatedProsody(t,
		testenv.ProsodyOptions{
			VirtualHosts: []string{"site-a.test"},
			Components:   map[string]string{"nanite.site-a.test": secret},
			Logger:       testLogger(t),
		},
		testenv.ProsodyOptions{
			VirtualHosts: []string{"site-b.test"},
			Components:   map[string]string{"nanite.site-b.test": secret},
			Logger:       testLogger(t),
		})
	a, b := ps[0], ps[1]
	for _, c := range []struct {
		p    *testenv.Prosody
		host string
	}{{a, "127.0.0.2"}, {b, "127.0.0.3"}} {
		for _, addr := range []string{c.p.C2SAddr(), c.p.ComponentAddr(), c.p.S2SAddr()} {
			if h, _, _ := net.SplitHostPort(addr); h != c.host {
				t.Errorf("%v listens on %s, want %s", c.p, addr, c.host)
			}
		}
	}
	if got, want := a.S2SRoutes(), map[string]string{"site-b.test": b.S2SAddr(), "nanite.site-b.test": b.S2SAddr()}; !reflect.DeepEqual(got, want) {
		t.Errorf("A's routes %v, want %v", got, want)
	}
	if got, want := b.S2SRoutes(), map[string]string{"site-a.test": a.S2SAddr(), "nanite.site-a.test": a.S2SAddr()}; !reflect.DeepEqual(got, want) {
		t.Errorf("B's routes %v, want %v", got, want)
	}

	compA, ok := componentLogin(t, a.ComponentAddr(), "nanite.site-a.test", secret)
	if !ok {
		t.Fatal("component A refused")
	}
	compB, ok := componentLogin(t, b.ComponentAddr(), "nanite.site-b.test", secret)
	if !ok {
		t.Fatal("component B refused")
	}
	roundTrip := func(id string) time.Duration {
		t.Helper()
		start := time.Now()
		compA.send(`<iq type='get' id='%s' from='x@nanite.site-a.test' to='app@nanite.site-b.test'><ping xmlns='urn:xmpp:ping'/></iq>`, id)
		in := compB.next()
		if in.XMLName.Local != "iq" || in.attr("id") != id || in.attr("type") != "get" || in.attr("from") != "x@nanite.site-a.test" {
			t.Fatalf("B got %+v", in)
		}
		compB.send(`<iq type='result' id='%s' from='app@nanite.site-b.test' to='x@nanite.site-a.test'><answer xmlns='urn:testenv'>from B</answer></iq>`, id)
		out := compA.next()
		if out.XMLName.Local != "iq" || out.attr("id") != id || out.attr("type") != "result" ||
			out.attr("from") != "app@nanite.site-b.test" || !strings.Contains(out.Inner, "from B") {
			t.Fatalf("A got %+v", out)
		}
		return time.Since(start)
	}
	first := roundTrip("q1")
	second := roundTrip("q2")
	t.Logf("IQ round trip over s2s: %v with connection setup, %v after", first, second)

	// The servers logged the s2s connections both ways (replies from B to
	// A use B's own outgoing connection).
	for _, c := range []struct {
		p    *testenv.Prosody
		want []string
	}{
		{a, []string{"outgoing nanite.site-a.test->nanite.site-b.test", "incoming nanite.site-b.test->nanite.site-a.test"}},
		{b, []string{"incoming nanite.site-a.test->nanite.site-b.test", "outgoing nanite.site-b.test->nanite.site-a.test"}},
	} {
		var got []string
		for _, l := range c.p.S2SLinks() {
			got = append(got, l.String())
		}
		for _, w := range c.want {
			if !slices.Contains(got, w) {
				t.Errorf("%v: s2s links %v lack %q", c.p, got, w)
			}
		}
	}

	// A domain without a route is unreachable at once (no DNS lookup).
	start := time.Now()
	compA.send(`<iq type='get' id='q3' from='x@nanite.site-a.test' to='app@nanite.site-c.test'><ping xmlns='urn:xmpp:ping'/></iq>`)
	if e := compA.next(); e.attr("type") != "error" || !strings.Contains(e.Inner, "remote-server-not-found") {
		t.Errorf("IQ to an unrouted domain: %+v", e)
	}
	t.Logf("unrouted domain refused in %v", time.Since(start))

	// With B stopped, B's domains are unreachable from A: the stanzas
	// really went through B.
	if err := b.Stop(t.Context()); err != nil {
		t.Fatal(err)
	}
	compA.send(`<iq type='get' id='q4' from='x@nanite.site-a.test' to='app@nanite.site-b.test'><ping xmlns='urn:xmpp:ping'/></iq>`)
	if e := compA.next(); e.attr("type") != "error" || !strings.Contains(e.Inner, "remote-server-not-found") {
		t.Errorf("IQ to B while B is stopped: %+v", e)
	}
}

func TestProsodyOptionsChecked(t *testing.T) {
	t.Parallel()
	testenv.Require(t, "prosody", "prosodyctl")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, c := range []struct {
		name string
		opts testenv.ProsodyOptions
		want string
	}{
		{"not loopback", testenv.ProsodyOptions{Interface: "192.0.2.1"}, "loopback"},
		{"not an address", testenv.ProsodyOptions{Interface: "localhost"}, "loopback"},
		{"routes without s2s", testenv.ProsodyOptions{S2SRoutes: map[string]string{"b.test": "127.0.0.3:5269"}}, "without S2S"},
		{"route to a name", testenv.ProsodyOptions{S2S: true, S2SRoutes: map[string]string{"b.test": "localhost:5269"}}, "not an IP address"},
	} {
		p, err := testenv.StartProsody(ctx, c.opts)
		if err == nil {
			_ = p.Close()
			t.Errorf("%s: started", c.name)
		} else if !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error about %q", c.name, err, c.want)
		}
	}
	_, err := testenv.StartFederatedProsody(ctx, testenv.ProsodyOptions{}, testenv.ProsodyOptions{})
	if err == nil || !strings.Contains(err.Error(), "both serve localhost") {
		t.Errorf("two federated servers for localhost: %v", err)
	}
}
