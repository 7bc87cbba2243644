package bridge

import (
	"context"
	"slices"
	"testing"
	"time"

	"mellium.im/xmpp/disco"
	"mellium.im/xmpp/disco/items"
	"mellium.im/xmpp/jid"
	"mellium.im/xmpp/stanza"

	"github.com/nanite-go/nanite/vertebra"
)

func discoFeatures(t *testing.T, c *vertebra.Conn, to jid.JID) ([]string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	in, err := disco.GetInfo(ctx, "", to, c.Session())
	if err != nil {
		return nil, err
	}
	var fs []string
	for _, f := range in.Features {
		fs = append(fs, f.Var)
	}
	return fs, nil
}

func discoItems(t *testing.T, c *vertebra.Conn, to jid.JID) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	it := disco.FetchItems(ctx, items.Item{JID: to}, c.Session())
	defer it.Close()
	var out []string
	for it.Next() {
		out = append(out, it.Item().JID.String())
	}
	if err := it.Err(); err != nil {
		t.Fatalf("disco#items %s: %v", to, err)
	}
	slices.Sort(out)
	return out
}

func TestPresenceAndDisco(t *testing.T) {
	s := setup(t, setupCfg{})
	a1, _ := AgentJID(s.cluster, "agent-1")
	a2, _ := AgentJID(s.cluster, "agent-2")

	// disco#items: the agents of the cluster; the clusters of the domain.
	if got, want := discoItems(t, s.aliceConn, s.cluster), []string{a1.String(), a2.String()}; !slices.Equal(got, want) {
		t.Errorf("disco#items %s = %v, want %v", s.cluster, got, want)
	}
	if got := discoItems(t, s.aliceConn, jid.MustParse(bridgeDom)); !slices.Equal(got, []string{s.cluster.String()}) {
		t.Errorf("disco#items %s = %v", bridgeDom, got)
	}
	// disco#info: the exported services the asker may call.
	say, stream, secret := vertebra.ServiceFeature("/echo/say"), vertebra.ServiceFeature("/echo/stream"), vertebra.ServiceFeature("/secret/get")
	fs, err := discoFeatures(t, s.aliceConn, s.cluster)
	if err != nil || !slices.Contains(fs, say) || !slices.Contains(fs, stream) || slices.Contains(fs, secret) {
		t.Errorf("alice: disco#info %s = %v, %v", s.cluster, fs, err)
	}
	fs, err = discoFeatures(t, s.malloryConn, s.cluster)
	if err != nil || !slices.Contains(fs, say) || slices.Contains(fs, stream) || slices.Contains(fs, secret) {
		t.Errorf("mallory: disco#info %s = %v, %v", s.cluster, fs, err)
	}
	fs, err = discoFeatures(t, s.aliceConn, a1)
	if err != nil || !slices.Contains(fs, say) {
		t.Errorf("disco#info %s = %v, %v", a1, fs, err)
	}
	if fs, err := discoFeatures(t, s.aliceConn, jid.MustParse(s.cluster.String()+"/agent-9")); err == nil {
		t.Errorf("disco#info of an unknown agent = %v, want an error", fs)
	}

	// Presence: subscribe, see both agents with their load, then one leaves.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := s.aliceConn.Session().Send(ctx, stanza.Presence{To: s.cluster, Type: stanza.SubscribePresence}.Wrap(nil)); err != nil {
		t.Fatal(err)
	}
	wait := func(from jid.JID, avail bool) presenceEvent {
		t.Helper()
		for {
			select {
			case ev := <-s.presence:
				t.Logf("presence %+v", ev)
				if ev.from == from.String() && ev.avail == avail {
					return ev
				}
			case <-ctx.Done():
				t.Fatalf("no presence (available %v) from %s", avail, from)
			}
		}
	}
	seen := map[string]bool{}
	for len(seen) < 2 {
		select {
		case ev := <-s.presence:
			if ev.avail && (ev.from == a1.String() || ev.from == a2.String()) {
				if _, ok := vertebra.ParseLoad(ev.status); !ok {
					t.Errorf("presence status %q is not a load", ev.status)
				}
				seen[ev.from] = true
			}
		case <-ctx.Done():
			t.Fatalf("available presence seen from %v only", seen)
		}
	}
	start := time.Now()
	s.stops[1]()
	wait(a2, false)
	t.Logf("unavailable %v after the agent stopped", time.Since(start))
	if got := discoItems(t, s.aliceConn, s.cluster); !slices.Equal(got, []string{a1.String()}) {
		t.Errorf("disco#items after agent-2 left = %v", got)
	}
}
