package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nanite-go/nanite/testenv"
)

// TestMain lets the test binary be the example's children (agents and
// bridges): run re-executes it with childEnv set.
func TestMain(m *testing.M) {
	if childMode() {
		os.Exit(runChild())
	}
	testenv.Main(m)
}

// TestFederation runs the example against real servers: run checks every
// step it narrates (least loaded at B, the agent chosen by JID, the
// fan-out, the stream, the refusals, the proxy following an agent that
// leaves, alice over s2s) and fails when one does not behave. The test
// checks the narration's landmarks and that nothing is left behind.
func TestFederation(t *testing.T) {
	testenv.Require(t, "rabbitmq-server", "prosody")
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	var out bytes.Buffer
	start := time.Now()
	err := run(ctx, &out, options{Self: []string{os.Args[0]}})
	t.Logf("run took %v; its output:\n%s", time.Since(start).Round(100*time.Millisecond), out.String())
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	got := out.String()
	for _, want := range []string{
		"--- site-a.yaml",
		"from: app@nanite.site-b.test",
		"--- site-b.yaml",
		`to: ["nanite.site-a.test", "alice@site-a.test"]`,
		"site-a.yaml: ok (1 clusters)",
		"xmpp.app_nanite.site-b.test  0.2",
		`"agent":"inv-south"`,
		`-> xmpp:app@nanite.site-b.test/inv-north: {"agent":"inv-north"`,
		`-> xmpp:app@nanite.site-b.test/inv-south: {"agent":"inv-south"`,
		`shelf={"sku":"gizmo","qty":30}`,
		"/admin/restock -> error: nanite: no agent available",
		"xmpp.app_nanite.site-b.test  0.6",
		"/inventory/coldroom -> error: nanite: no agent available",
		"disco#info: what B lets alice call: /inventory/audit /inventory/lookup /inventory/stock",
		"not_authorized: not_exported: /admin/restock",
		"outgoing site-a.test->nanite.site-b.test",
		"stopped",
		"done in",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("output lacks %q", want)
		}
	}

	// Nothing left behind: the work directory is gone, the children too.
	dir := regexp.MustCompile(`work directory \(config files, logs\): (\S+)`).FindStringSubmatch(got)
	if dir == nil {
		t.Fatal("no work directory in the output")
	}
	if _, err := os.Stat(dir[1]); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("work directory %s: %v, want it removed", dir[1], err)
	}
	pids := regexp.MustCompile(`pid (\d+)`).FindAllStringSubmatch(got, -1)
	if len(pids) != 5 {
		t.Errorf("%d child pids in the output, want 5 (3 agents, 2 bridges)", len(pids))
	}
	for _, m := range pids {
		pid, _ := strconv.Atoi(m[1])
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("child %d still exists (kill 0: %v)", pid, err)
		}
	}
}
