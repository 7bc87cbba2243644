package benchmark

import (
	"bytes"
	"context"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nanite-go/nanite/security"
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

func res(mode string, rps, p50, cpu float64) Result {
	return Result{Mode: mode, Measure: Measure{Requests: 10, RPS: rps, P50us: p50, CPUus: cpu}}
}

func TestJudge(t *testing.T) {
	c := Cell{Outstanding: 64, Results: []Result{res("raw", 1000, 100, 50), res("plain", 850, 150, 100),
		res("signed:hybrid", 500, 300, 250), res("sealed:x25519", 300, 500, 400), res("signed:x25519", 600, 250, 200)}}
	c.judge()
	raw, plain, signed, sealed, signedX := &c.Results[0], &c.Results[1], &c.Results[2], &c.Results[3], &c.Results[4]
	if raw.Target != "" || raw.Pass != nil || raw.RPSVsRaw != 0 || raw.RPSVsPlain != 0 {
		t.Errorf("raw is judged: %+v", raw)
	}
	if plain.Target != "req/s>=0.80x raw" || plain.Pass == nil || !*plain.Pass || plain.RPSVsRaw != 0.85 ||
		plain.P50VsRaw != 1.5 || plain.CPUVsRaw != 2 || plain.RPSVsPlain != 0 {
		t.Errorf("plain at 64: %+v", plain)
	}
	if signed.Target != "req/s>=0.60x plain" || signed.Pass == nil || *signed.Pass || signed.RPSVsPlain != 500.0/850 ||
		signed.P50VsPlain != 2 || signed.CPUVsPlain != 2.5 || signed.RPSVsRaw != 0.5 {
		t.Errorf("signed at 64, 0.59x plain: %+v", signed)
	}
	if signedX.Pass == nil || !*signedX.Pass {
		t.Errorf("signed:x25519 at 64, 0.71x plain: %+v", signedX)
	}
	if sealed.Target != "" || sealed.Pass != nil || sealed.RPSVsPlain != 300.0/850 {
		t.Errorf("sealed has no target but its ratios: %+v", sealed)
	}
	sc := Cell{Outstanding: 64, Results: []Result{res("plain", 1000, 100, 50), res("session:x25519", 700, 130, 60)}}
	sc.judge()
	if s := sc.Results[1]; s.Target != "req/s>=0.60x plain" || s.Pass == nil || !*s.Pass {
		t.Errorf("session at 64, 0.7x plain: %+v", s)
	}
	if fs := figures([]Cell{sc}); len(fs) != 1 || fs[0].Mode != "session:x25519" {
		t.Errorf("session figures: %+v", fs)
	}
	c.Results[1].BrokerCPUus, c.Results[2].BrokerCPUus = 50, 100
	fs := figures([]Cell{c})
	if fs[0].CPUBound != 150.0/350 || fs[1].CPUBound != 0 {
		t.Errorf("cpu-bound ratios: %+v", fs)
	}
	if len(fs) != 3 || fs[0].Mode != "signed:hybrid" || fs[1].Mode != "sealed:x25519" || fs[0].Pass == nil || fs[1].Pass != nil {
		t.Errorf("figures: %+v", fs)
	}

	c = Cell{Outstanding: 1, Results: []Result{res("raw", 1000, 100, 0), res("plain", 900, 130, 0), res("signed:hybrid", 500, 300, 0)}}
	c.judge()
	if p := c.Result("plain"); p.Target != "p50<=1.25x raw" || p.Pass == nil || *p.Pass {
		t.Errorf("plain at 1, 1.3x: %+v", p)
	}
	if s := c.Result("signed:hybrid"); s.Pass != nil || s.CPUVsPlain != 0 {
		t.Errorf("signed at 1 has no target, and no CPU ratio without CPU: %+v", s)
	}
	c = Cell{Outstanding: 8, Results: []Result{res("raw", 1000, 100, 0), res("plain", 900, 130, 0)}}
	c.judge()
	if c.Results[1].Target != "" || c.Results[1].Pass != nil {
		t.Errorf("8 outstanding has no target: %+v", c)
	}
	// Without plain, a secure mode has no ratio to plain and no verdict.
	c = Cell{Outstanding: 64, Results: []Result{res("raw", 1000, 100, 0), res("signed:hybrid", 500, 300, 0)}}
	c.judge()
	if s := c.Results[1]; s.RPSVsPlain != 0 || s.Pass != nil || s.RPSVsRaw != 0.5 {
		t.Errorf("signed without plain: %+v", s)
	}
	if c.Result("plain") != nil {
		t.Error("Result of a mode that did not run")
	}
}

func TestParseModes(t *testing.T) {
	names := func(ms []Mode) string {
		var s []string
		for _, m := range ms {
			s = append(s, m.Name)
		}
		return strings.Join(s, ",")
	}
	for _, c := range []struct {
		modes, kems []string
		want        string
	}{
		{nil, nil, "raw,plain,signed:hybrid,signed:x25519,sealed:hybrid,sealed:x25519"},
		{[]string{"plain", "signed"}, []string{"x25519"}, "plain,signed:x25519"},
		{[]string{"sealed", "sealed:hybrid", "raw"}, []string{"hybrid"}, "sealed:hybrid,raw"},
		{[]string{"signed:x-wing", " plain "}, nil, "signed:hybrid,plain"},
		{[]string{"raw", "plain", "signed", "session"}, []string{"x25519"}, "raw,plain,signed:x25519,session:x25519"},
	} {
		ms, err := ParseModes(c.modes, c.kems)
		if err != nil || names(ms) != c.want {
			t.Errorf("ParseModes(%q, %q) = %s, %v; want %s", c.modes, c.kems, names(ms), err, c.want)
		}
	}
	ms, _ := ParseModes([]string{"sealed:x25519", "signed:hybrid", "plain"}, nil)
	if m := ms[0]; !m.Secure || !m.Seal || m.KEM != security.KEMX25519 || m.Base() != "sealed" {
		t.Errorf("sealed:x25519 = %+v", m)
	}
	if m := ms[1]; !m.Secure || m.Seal || m.KEM != security.KEMHybrid {
		t.Errorf("signed:hybrid = %+v", m)
	}
	if m := ms[2]; m.Secure || m.Seal || m.Base() != "plain" {
		t.Errorf("plain = %+v", m)
	}
	if ms, _ := ParseModes([]string{"session:hybrid"}, nil); len(ms) != 1 || !ms[0].Secure || ms[0].Seal || !ms[0].Sessions || ms[0].Base() != "session" {
		t.Errorf("session:hybrid = %+v", ms)
	}
	for _, c := range []struct{ modes, kems []string }{
		{[]string{"fast"}, nil}, {[]string{"plain:x25519"}, nil}, {[]string{"sealed:rsa"}, nil},
		{[]string{"signed"}, []string{"p256"}},
	} {
		if _, err := ParseModes(c.modes, c.kems); err == nil {
			t.Errorf("ParseModes(%q, %q) succeeded", c.modes, c.kems)
		}
	}
}

func TestOrder(t *testing.T) {
	if got := order([]string{"raw", "plain", "signed"}, 3); got != "raw, plain, signed; signed, plain, raw; raw, plain, signed" {
		t.Errorf("order = %q", got)
	}
}

func TestModeService(t *testing.T) {
	if got := ModeService("plain"); got != EchoService {
		t.Errorf("plain serves %s", got)
	}
	if got := ModeService("sealed:x25519"); got != "/bench-sealed-x25519/echo" {
		t.Errorf("sealed:x25519 serves %s", got)
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
		{URL: "amqp://x/", Modes: []string{"both"}},
		{URL: "amqp://x/", KEMs: []string{"rsa"}},
	} {
		if _, err := Run(context.Background(), cfg); err == nil {
			t.Errorf("Run(%+v) succeeded", cfg)
		}
	}
}

// TestRun makes a tiny run of every mode on a real broker and checks the
// report's shape (not its numbers).
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
		Payloads: []int{100}, Modes: []string{"raw", "plain", "signed", "sealed:x25519", "session:x25519"}, KEMs: []string{"hybrid"},
		Progress: func(s string) { progress = append(progress, s) }})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Cells) != 2 || len(progress) != 2 {
		t.Fatalf("%d cells, %d progress lines", len(rep.Cells), len(progress))
	}
	if want := []string{"raw", "plain", "signed:hybrid", "sealed:x25519", "session:x25519"}; !slices.Equal(rep.Modes, want) {
		t.Errorf("modes %v, want %v", rep.Modes, want)
	}
	for _, c := range rep.Cells {
		if len(c.Results) != 5 {
			t.Fatalf("cell %d/%d: %d results", c.Payload, c.Outstanding, len(c.Results))
		}
		for _, m := range c.Results {
			if m.Errors != 0 || m.Requests < 40 || m.P50us <= 0 || m.P99us < m.P50us || m.RPS <= 0 {
				t.Errorf("%s cell %d/%d: %+v", m.Mode, c.Payload, c.Outstanding, m)
			}
			if m.Mode != "raw" && (m.P50VsRaw <= 0 || m.RPSVsRaw <= 0) {
				t.Errorf("%s cell %d/%d has no ratios to raw: %+v", m.Mode, c.Payload, c.Outstanding, m)
			}
			if m.Mode != "raw" && m.Mode != "plain" && (m.P50VsPlain <= 0 || m.RPSVsPlain <= 0) {
				t.Errorf("%s cell %d/%d has no ratios to plain: %+v", m.Mode, c.Payload, c.Outstanding, m)
			}
		}
	}
	if p := rep.Cells[0].Result("plain"); p.Target != "p50<=1.25x raw" || p.Pass == nil {
		t.Errorf("plain in the 1-outstanding cell is not judged: %+v", p)
	}
	// Secure mode refused nothing of its own traffic.
	for _, mode := range []string{"signed:hybrid", "sealed:x25519", "session:x25519"} {
		for k, v := range rep.Counters[mode] {
			if strings.HasPrefix(k, "agent.") {
				t.Errorf("%s: %s=%d", mode, k, v)
			}
		}
	}
	// Session mode used its session: set up once, no fallback.
	if c := rep.Counters["session:x25519"]; c["mapper.sessions_established"] != 1 || c["mapper.session_fallbacks"] != 0 ||
		c["mapper.session_requests_sent"] == 0 {
		t.Errorf("session counters %v", c)
	}
	var table, js bytes.Buffer
	if err := rep.WriteTable(&table); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"prefetch 16", "req/s x plain", "signed:hybrid", "sealed:x25519", "100 B", "p50<=1.25x raw"} {
		if !strings.Contains(table.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, table.String())
		}
	}
	if err := rep.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(js.Bytes(), &back); err != nil || len(back.Cells) != 2 || back.Cells[1].Result("sealed:x25519") == nil ||
		back.Cells[1].Result("sealed:x25519").RPS <= 0 {
		t.Errorf("JSON does not round-trip: %v\n%s", err, js.String())
	}
	if strings.Contains(table.String()+js.String(), strings.Split(strings.Split(url, "@")[0], ":")[2]) {
		t.Error("the report shows the broker password")
	}
}

// TestRunFigures runs the 64-outstanding cell briefly and checks that the
// secure figures are reported.
func TestRunFigures(t *testing.T) {
	if testing.Short() {
		t.Skip("needs a broker")
	}
	r := testenv.Rabbit(t)
	url := r.NewVhost(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	rep, err := Run(ctx, Config{URL: url, Requests: 256, Warmup: -1, Outstanding: []int{64},
		Payloads: []int{100}, Modes: []string{"plain", "signed", "sealed"}, KEMs: []string{"x25519"}})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Figures) != 2 || rep.Figures[0].Mode != "signed:x25519" || rep.Figures[0].Pass == nil ||
		rep.Figures[1].Mode != "sealed:x25519" || rep.Figures[1].RPSVsPlain <= 0 {
		t.Errorf("figures: %+v", rep.Figures)
	}
	var table bytes.Buffer
	if err := rep.WriteTable(&table); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(table.String(), "req/s>=0.60x plain") {
		t.Errorf("table lacks the signed verdict:\n%s", table.String())
	}
}
