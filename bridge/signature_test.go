package bridge

import (
	"context"
	"encoding/json"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nanite-go/nanite/security"
	"github.com/nanite-go/nanite/vertebra"
)

func TestSignatures(t *testing.T) {
	ca, err := security.NewCA("site-b", 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := ca.Save(dir); err != nil {
		t.Fatal(err)
	}
	ops, err := ca.Issue("ops", security.RoleClient, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	other, err := ca.Issue("intruder", security.RoleClient, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	rogueCA, _ := security.NewCA("rogue", 24*time.Hour)
	rogue, err := rogueCA.Issue("ops", security.RoleClient, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	s := setup(t, setupCfg{
		exports: `      - services: ["/secret/*"]
        to: ["cert:ops"]
        require_signature: true
`,
		top: "trust:\n  ca_files: [" + filepath.Join(dir, security.CACertFile) + "]\n",
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	payload := json.RawMessage(`{"k":"v"}`)
	sign := func(id *security.Identity, op string) vertebra.Meta {
		var m vertebra.Meta
		m.RequestID = "r-" + op
		if err := vertebra.Sign(ctx, vertebra.IdentitySigner{Identity: id}, s.cluster, op, payload, &m); err != nil {
			t.Fatal(err)
		}
		return m
	}
	refused := func(m *vertebra.Meta, reason string) {
		t.Helper()
		var opts []vertebra.CallOption
		if m != nil {
			opts = append(opts, vertebra.WithMeta(*m))
		}
		_, err := s.alice.Call(ctx, s.cluster, "/secret/get", payload, opts...)
		var oe *vertebra.OpError
		if !errors.As(err, &oe) || !oe.Nack || !strings.HasPrefix(oe.Message, reason+":") {
			t.Fatalf("err %v, want a nack with reason %s", err, reason)
		}
		t.Logf("refused: %s", oe.Message)
	}

	refused(nil, RefuseSignature)
	good := sign(ops, "/secret/get")
	res, err := s.alice.Call(ctx, s.cluster, "/secret/get", payload, vertebra.WithMeta(good))
	if err != nil {
		t.Fatal(err)
	}
	if string(res.Value()) != `"leaked"` {
		t.Errorf("result %s", res.Value())
	}
	refused(&good, RefuseBadSignature) // replayed
	forged := sign(ops, "/secret/other")
	refused(&forged, RefuseBadSignature) // signed for another op
	wrongName := sign(other, "/secret/get")
	refused(&wrongName, RefusePeer) // valid, but not cert:ops
	untrusted := sign(rogue, "/secret/get")
	refused(&untrusted, RefuseBadSignature)

	if n := s.counts[0].Load() + s.counts[1].Load(); n != 1 {
		t.Errorf("agents handled %d requests, want 1", n)
	}
	// Discovery does not show what only signed ops may call.
	fs, err := discoFeatures(t, s.aliceConn, s.cluster)
	if err != nil || strings.Contains(strings.Join(fs, " "), "/secret/") {
		t.Errorf("disco#info = %v, %v", fs, err)
	}
}
