package main

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	bb "github.com/nanite-go/nanite/bridge/benchmark"
	"github.com/nanite-go/nanite/testenv"
)

func TestBenchBridgeFlags(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--amqp-a", "amqp://x/a"}, "both --amqp-a and --amqp-b"},
		{[]string{"--xmpp", "127.0.0.1:5347"}, "both --xmpp and --xmpp-secret"},
		{[]string{"--xmpp", "127.0.0.1:5347", "--xmpp-secret", "s"}, "--xmpp needs --components"},
		{[]string{"--components", "a,b,c"}, "four component domains"},
		{[]string{"--payload", "1"}, "--payload"},
		{[]string{"--outstanding", "0"}, "--outstanding"},
		{[]string{"--sides", "raw"}, "unknown side"},
	} {
		r := runCLI(context.Background(), "", append([]string{"bench-bridge"}, c.args...)...)
		if r.code != exitUsage || !strings.Contains(r.errOut, c.want) {
			t.Errorf("bench-bridge %v: exit %d, %q; want exit %d and %q", c.args, r.code, r.errOut, exitUsage, c.want)
		}
	}
}

func TestBenchBridgeSmoke(t *testing.T) {
	testenv.Require(t, "prosody", "prosodyctl", "rabbitmq-server", "rabbitmqctl")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	r := runCLI(ctx, "", "bench-bridge", "--one-broker", "--requests", "20", "--warmup", "-1s", "--outstanding", "1,8", "--json")
	var rep bb.Report
	if r.code != 0 || json.Unmarshal([]byte(r.out), &rep) != nil || len(rep.Cells) != 2 {
		t.Fatalf("%+v", r)
	}
	for _, c := range rep.Cells {
		if len(c.Results) != len(bb.DefaultSides) || c.P50VsSum <= 0 || c.RPSVsXMPP <= 0 {
			t.Errorf("%d outstanding: %+v", c.Outstanding, c)
		}
		for _, m := range c.Results {
			if m.Requests != 20 || m.Errors != 0 {
				t.Errorf("%s at %d: %+v", m.Side, c.Outstanding, m.Measure)
			}
		}
	}
}
