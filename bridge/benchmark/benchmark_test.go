package benchmark

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/nanite-go/nanite/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

func TestBenchParseSides(t *testing.T) {
	for _, c := range []struct {
		in   []string
		want string
	}{
		{nil, "amqp-a xmpp amqp-b cross"},
		{[]string{"cross", "amqp-a"}, "amqp-a cross"},
		{[]string{"all"}, "amqp-a xmpp amqp-b nanite-a op nanite-b raw-chain cross"},
		{[]string{"op", "all"}, "amqp-a xmpp amqp-b nanite-a op nanite-b raw-chain cross"},
	} {
		got, err := ParseSides(c.in)
		if err != nil || strings.Join(got, " ") != c.want {
			t.Errorf("ParseSides(%q) = %q, %v; want %q", c.in, got, err, c.want)
		}
	}
	if _, err := ParseSides([]string{"nope"}); err == nil {
		t.Error("ParseSides(nope) succeeded")
	}
}

func TestBenchJudge(t *testing.T) {
	res := func(side string, p50, rps float64) Result {
		r := Result{Side: side}
		r.Requests, r.P50us, r.RPS, r.CPUus, r.BrokerCPUus = 10, p50, rps, 1e6/rps, 1e6/rps
		return r
	}
	c := Cell{Outstanding: 1, Results: []Result{res(SideAMQPA, 200, 5000), res(SideXMPP, 200, 5000), res(SideAMQPB, 200, 5000),
		res(SideRawChain, 560, 1750), res(SideCross, 700, 1400)}}
	c.judge()
	if c.SumRawP50us != 600 || c.P50VsSum != 700.0/600 || c.P50Pass == nil || !*c.P50Pass || c.RPSPass != nil ||
		c.P50VsChain != 700.0/560 || c.RPSVsChain != 1400.0/1750 {
		t.Errorf("at 1: %+v", c)
	}
	c = Cell{Outstanding: 64, Results: []Result{res(SideAMQPA, 2000, 30000), res(SideXMPP, 5000, 13000),
		res(SideAMQPB, 2000, 30000), res(SideCross, 20000, 6000)}}
	c.judge()
	if c.RPSVsXMPP != 6000.0/13000 || c.RPSPass == nil || *c.RPSPass || c.P50Pass != nil || c.P50VsSum != 20000.0/9000 ||
		c.CPUBoundVsXMPP != (2e6/13000)/(2e6/6000) {
		t.Errorf("at 64: %+v", c)
	}
}

func TestBenchConfigErrors(t *testing.T) {
	for _, cfg := range []Config{
		{},
		{URLA: "amqp://x/a", URLB: "amqp://x/a", XMPPAddr: "x:1", Secret: "s"},
		{URLA: "amqp://x/a", URLB: "amqp://x/b", XMPPAddr: "x:1", Secret: "s", Payload: 1},
		{URLA: "amqp://x/a", URLB: "amqp://x/b", XMPPAddr: "x:1", Secret: "s", Outstanding: []int{0}},
		{URLA: "amqp://x/a", URLB: "amqp://x/b", XMPPAddr: "x:1", Secret: "s", Sides: []string{"raw"}},
	} {
		if _, err := Run(context.Background(), cfg); err == nil {
			t.Errorf("Run(%+v) succeeded", cfg)
		}
	}
}

// TestBenchRun runs every side at a tiny scale on private servers (one broker)
// and checks that the figures are sane; no timing is asserted.
func TestBenchRun(t *testing.T) {
	if testing.Short() {
		t.Skip("starts RabbitMQ and prosody")
	}
	testenv.Require(t, "prosody", "prosodyctl", "rabbitmq-server", "rabbitmqctl")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	srv, err := StartServers(ctx, ServerOptions{Brokers: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := srv.Close(); err != nil {
			t.Error(err)
		}
	})
	const reqs = 40
	cfg := Config{Payload: 64, Outstanding: []int{1, 8}, Requests: reqs, Warmup: -1, Sides: []string{"all"},
		Progress: func(s string) { t.Log(s) }}
	srv.Apply(&cfg)
	rep, err := Run(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Cells) != 2 {
		t.Fatalf("%d cells", len(rep.Cells))
	}
	for _, c := range rep.Cells {
		if len(c.Results) != len(AllSides) {
			t.Errorf("%d outstanding: %d sides", c.Outstanding, len(c.Results))
		}
		for _, r := range c.Results {
			if r.Errors != 0 || r.FirstErr != "" {
				t.Errorf("%s at %d: %d errors, first %s", r.Side, c.Outstanding, r.Errors, r.FirstErr)
			}
			// Each round makes reqs/rounds requests; none fails.
			if r.Requests != reqs || r.RPS <= 0 || r.P50us <= 0 || r.P99us < r.P50us {
				t.Errorf("%s at %d: %+v", r.Side, c.Outstanding, r.Measure)
			}
		}
		if c.SumRawP50us <= 0 || c.P50VsSum <= 0 || c.RPSVsXMPP <= 0 || c.SumProjectP50us <= 0 || c.P50VsChain <= 0 {
			t.Errorf("%d outstanding: derived figures %+v", c.Outstanding, c)
		}
	}
	if rep.Cells[0].P50Pass == nil || rep.Cells[1].P50Pass != nil {
		t.Errorf("the p50 target is judged at 1 outstanding only: %+v", rep.Cells)
	}
	// Every cross-site request reached B through both bridges: the
	// measured ones, the set-up's ping, none refused or failed.
	crossN := int64(2*reqs + 1)
	if got := rep.Counters["bridge-a.relayed_out"]; got != crossN {
		t.Errorf("bridge A relayed %d requests out, want %d (counters %v)", got, crossN, rep.Counters)
	}
	if got := rep.Counters["bridge-b.relayed"]; got != crossN {
		t.Errorf("bridge B relayed %d ops, want %d (counters %v)", got, crossN, rep.Counters)
	}
	for k := range rep.Counters {
		if strings.Contains(k, "refused") || strings.Contains(k, "failed") {
			t.Errorf("counter %s=%d", k, rep.Counters[k])
		}
	}
	var out bytes.Buffer
	if err := rep.WriteTable(&out); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"sum of raw legs", "sum of project legs", "cross", "x raw-chain p50", "p50<=1.30x sum of raw legs"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, out.String())
		}
	}
	t.Logf("\n%s", out.String())
}
