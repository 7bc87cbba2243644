package bridge

import (
	"errors"
	"slices"
	"testing"
	"time"

	"mellium.im/xmpp/jid"

	"github.com/nanite-go/nanite/vertebra"
)

// TestSiteDirectory: the bridge hosts the site's directory. An allowed
// XMPP agent advertises what it serves and is discovered; a discovery of
// an op finds the clusters that export it to the caller; a JID not allowed
// is refused.
func TestSiteDirectory(t *testing.T) {
	s := setup(t, setupCfg{top: "directory:\n  allow: [\"alice@" + siteDomain + "\"]\n"})
	dir, dirJID := s.bridge.Directory()
	if dir == nil || dirJID.String() != "directory@"+bridgeDom {
		t.Fatalf("directory %v at %s", dir, dirJID)
	}
	ctx := t.Context()
	if err := vertebra.Advertise(ctx, s.alice, dirJID, []string{"/inv/query", "/rack/1"}, time.Minute); err != nil {
		t.Fatal(err)
	}
	got, err := vertebra.Discover(ctx, s.alice, dirJID, "/inv/query", []string{"/rack/1"})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].Bare().String() != "alice@"+siteDomain {
		t.Errorf("discover /inv/query on /rack/1: %v", got)
	}
	// The cluster exports /echo/* to alice: found by op.
	got, err = vertebra.Discover(ctx, s.alice, dirJID, "/echo/stream", nil)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(got, func(j jid.JID) bool { return j.Equal(s.cluster) }) {
		t.Errorf("discover /echo/stream: %v, want the cluster %s", got, s.cluster)
	}
	// Nothing exports /secret/get to alice.
	got, err = vertebra.Discover(ctx, s.alice, dirJID, "/secret/get", nil)
	if err != nil || len(got) != 0 {
		t.Errorf("discover /secret/get: %v %v, want nothing", got, err)
	}
	// mallory may not use the directory.
	_, err = vertebra.Discover(ctx, s.mallory, dirJID, "/inv/query", nil)
	var oe *vertebra.OpError
	if !errors.As(err, &oe) || oe.Code != vertebra.CodeUnauthorized {
		t.Errorf("mallory's discovery: %v, want %s", err, vertebra.CodeUnauthorized)
	}
	if err := vertebra.Advertise(ctx, s.mallory, dirJID, []string{"/evil"}, time.Minute); !errors.As(err, &oe) || oe.Code != vertebra.CodeUnauthorized {
		t.Errorf("mallory's advertisement: %v, want %s", err, vertebra.CodeUnauthorized)
	}
	if n := s.bridge.Stats().Refused[RefusePeer]; n != 2 {
		t.Errorf("refused %d directory ops for peer_not_allowed, want 2", n)
	}
}
