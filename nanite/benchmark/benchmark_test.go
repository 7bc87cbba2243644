package benchmark

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/nanite-go/nanite/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

func TestPercentile(t *testing.T) {
	var s []time.Duration
	for i := 1; i <= 100; i++ {
		s = append(s, time.Duration(i))
	}
	for _, c := range []struct {
		p    float64
		want time.Duration
	}{{0.5, 50}, {0.99, 99}, {1, 100}, {0.001, 1}} {
		if got := Percentile(s, c.p); got != c.want {
			t.Errorf("Percentile(1..100, %v) = %v, want %v", c.p, got, c.want)
		}
	}
	if got := Percentile([]time.Duration{7}, 0.5); got != 7 {
		t.Errorf("Percentile of one = %v", got)
	}
	if got := Percentile(nil, 0.5); got != 0 {
		t.Errorf("Percentile of none = %v", got)
	}
}

func TestMakePayload(t *testing.T) {
	for _, n := range []int{2, 100, 10240} {
		p := makePayload(n)
		if len(p) != n || !json.Valid(p) {
			t.Errorf("makePayload(%d): %d bytes, valid %v", n, len(p), json.Valid(p))
		}
	}
}

func TestJudge(t *testing.T) {
	c := Cell{Outstanding: 64, Raw: &Measure{Requests: 10, RPS: 1000, P50us: 100},
		Nanite: &Measure{Requests: 10, RPS: 850, P50us: 150}}
	c.judge()
	if c.Target != "throughput" || c.Pass == nil || !*c.Pass || c.ThroughputRatio != 0.85 || c.P50Ratio != 1.5 {
		t.Errorf("64 outstanding: %+v", c)
	}
	c = Cell{Outstanding: 1, Raw: &Measure{Requests: 10, RPS: 1000, P50us: 100},
		Nanite: &Measure{Requests: 10, RPS: 900, P50us: 130}}
	c.judge()
	if c.Target != "p50" || c.Pass == nil || *c.Pass {
		t.Errorf("1 outstanding, 1.3x: %+v", c)
	}
	c = Cell{Outstanding: 8, Raw: &Measure{Requests: 10, RPS: 1000, P50us: 100},
		Nanite: &Measure{Requests: 10, RPS: 900, P50us: 130}}
	c.judge()
	if c.Target != "" || c.Pass != nil {
		t.Errorf("8 outstanding has no target: %+v", c)
	}
}

func TestRedactURL(t *testing.T) {
	if got := RedactURL("amqp://u:secret@h:5672/v"); strings.Contains(got, "secret") {
		t.Errorf("RedactURL kept the password: %s", got)
	}
}

func TestConfigErrors(t *testing.T) {
	for _, cfg := range []Config{
		{},
		{URL: "amqp://x/", Outstanding: []int{0}},
		{URL: "amqp://x/", Payloads: []int{1}},
		{URL: "amqp://x/", Only: "both"},
	} {
		if _, err := Run(context.Background(), cfg); err == nil {
			t.Errorf("Run(%+v) succeeded", cfg)
		}
	}
}

// TestRun makes a tiny run on a real broker and checks the report's shape
// (not its numbers).
func TestRun(t *testing.T) {
	if testing.Short() {
		t.Skip("needs a broker")
	}
	r := testenv.Rabbit(t)
	url := r.NewVhost(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var progress []string
	rep, err := Run(ctx, Config{URL: url, Requests: 40, Warmup: -1, Outstanding: []int{1, 4},
		Payloads: []int{100}, Progress: func(s string) { progress = append(progress, s) }})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Cells) != 2 || len(progress) != 2 {
		t.Fatalf("%d cells, %d progress lines", len(rep.Cells), len(progress))
	}
	for _, c := range rep.Cells {
		for name, m := range map[string]*Measure{"raw": c.Raw, "nanite": c.Nanite} {
			if m == nil || m.Errors != 0 || m.Requests < 40 || m.P50us <= 0 || m.P99us < m.P50us || m.RPS <= 0 {
				t.Errorf("%s cell %d/%d: %+v", name, c.Payload, c.Outstanding, m)
			}
		}
		if c.P50Ratio <= 0 || c.ThroughputRatio <= 0 {
			t.Errorf("cell %d/%d has no ratios: %+v", c.Payload, c.Outstanding, c)
		}
	}
	if rep.Cells[0].Target != "p50" || rep.Cells[0].Pass == nil {
		t.Errorf("the 1-outstanding cell is not judged: %+v", rep.Cells[0])
	}
	var table, js bytes.Buffer
	if err := rep.WriteTable(&table); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"prefetch 16", "raw p50", "nanite p50", "100 B", "p50<=1.25x"} {
		if !strings.Contains(table.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, table.String())
		}
	}
	if err := rep.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(js.Bytes(), &back); err != nil || len(back.Cells) != 2 || back.Cells[1].Nanite == nil {
		t.Errorf("JSON does not round-trip: %v\n%s", err, js.String())
	}
	if strings.Contains(table.String()+js.String(), strings.Split(strings.Split(url, "@")[0], ":")[2]) {
		t.Error("the report shows the broker password")
	}
}
