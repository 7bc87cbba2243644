package bridge

import (
	"context"
	"encoding/json"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
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

// TestSubscriptionsSurviveRestart: with a state file, a plain client that
// subscribed to a cluster sees its agents again after the bridge restarts,
// without subscribing again; an unsubscription is kept too; entries the
// config no longer allows are dropped; a corrupt file stops the start.
func TestSubscriptionsSurviveRestart(t *testing.T) {
	s := setup(t, setupCfg{top: "state_file: state.json\n"})
	a1, _ := AgentJID(s.cluster, "agent-1")
	alice := "alice@" + siteDomain
	statePath := filepath.Join(s.dir, "state.json")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	wait := func(what string, avail bool) {
		t.Helper()
		for {
			select {
			case ev := <-s.presence:
				if ev.from == a1.String() && ev.avail == avail {
					return
				}
			case <-ctx.Done():
				t.Fatalf("%s: no presence (available %v) from %s", what, avail, a1)
			}
		}
	}
	kept := func() map[string][]string {
		t.Helper()
		subs, err := loadState(statePath)
		if err != nil {
			t.Fatal(err)
		}
		return subs
	}
	send := func(typ stanza.PresenceType) {
		t.Helper()
		if err := s.aliceConn.Session().Send(ctx, stanza.Presence{To: s.cluster, Type: typ}.Wrap(nil)); err != nil {
			t.Fatal(err)
		}
	}

	send(stanza.SubscribePresence)
	wait("subscribed", true)
	if got := kept()[s.cluster.String()]; !slices.Equal(got, []string{alice}) {
		t.Fatalf("state file keeps %v for %s, want [%s]", got, s.cluster, alice)
	}

	// A restart: unavailable while it is down, available again after.
	s.stopBridge()
	wait("bridge stopped", false)
	s.stopBridge = s.startBridge(t)
	wait("bridge restarted", true)

	// Entries the config no longer allows are dropped at the start.
	st := stateFile{Version: stateVersion, Subscriptions: map[string][]string{
		s.cluster.String():             {alice, "eve@elsewhere.test"},
		"gone@" + bridgeDom:            {alice},
		"app@nanite.someone-else.test": {alice},
	}}
	b, _ := json.Marshal(st)
	s.stopBridge()
	if err := os.WriteFile(statePath, b, 0o600); err != nil {
		t.Fatal(err)
	}
	s.stopBridge = s.startBridge(t)
	s.bridge.pres.mu.Lock()
	restored := maps.Clone(s.bridge.pres.subs)
	s.bridge.pres.mu.Unlock()
	if len(restored) != 1 || len(restored[s.cluster.String()]) != 1 || !restored[s.cluster.String()][alice] {
		t.Fatalf("restored %v, want only %s subscribed to %s", restored, alice, s.cluster)
	}

	// An unsubscription is kept: not subscribed after a restart.
	send(stanza.UnsubscribePresence)
	deadline := time.Now().Add(10 * time.Second)
	for len(kept()[s.cluster.String()]) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("state file still keeps %v after the unsubscription", kept())
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.stopBridge()
	s.stopBridge = s.startBridge(t)
	s.bridge.pres.mu.Lock()
	n := len(s.bridge.pres.subs[s.cluster.String()])
	s.bridge.pres.mu.Unlock()
	if n != 0 {
		t.Fatalf("%d subscribers restored after the unsubscription", n)
	}

	// A corrupt state file: the bridge does not start, and says which file.
	if err := os.WriteFile(statePath, []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := ParseConfig(filepath.Join(s.dir, "test.yaml"), []byte(s.yml))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := New(cfg, Options{}); err == nil || !strings.Contains(err.Error(), statePath) {
		t.Fatalf("New with a corrupt state file: %v, want an error naming %s", err, statePath)
	}
}
