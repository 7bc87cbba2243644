package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestBridgeCheck(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	bad := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(good, []byte(`xmpp:
  server: 127.0.0.1:5347
  domain: nanite.site-a.test
  secret: s3cret
clusters:
  - name: app
    url: amqp://u:p@127.0.0.1:5672/app
    exports:
      - services: ["/echo/*"]
        to: ["*@site-b.test"]
`), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bad, []byte("xmpp:\n  server: 127.0.0.1:5347\n  domian: x\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if r := runCLI(ctx, "", "bridge", "--config", good, "--check"); r.code != 0 || !strings.Contains(r.out, "ok (1 clusters)") {
		t.Errorf("good config: %+v", r)
	}
	r := runCLI(ctx, "", "bridge", "--config", bad, "--check")
	if r.code == 0 || !strings.Contains(r.errOut, "bad.yaml:3:") || !strings.Contains(r.errOut, "domian") {
		t.Errorf("bad config: %+v", r)
	}
	if r := runCLI(ctx, "", "bridge"); r.code == 0 || !strings.Contains(r.errOut, "--config") {
		t.Errorf("no --config: %+v", r)
	}
}
