package main

import (
	"context"
	"encoding/json"
	"encoding/xml"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"mellium.im/xmlstream"
	"mellium.im/xmpp"
	"mellium.im/xmpp/jid"
	"mellium.im/xmpp/mux"
	"mellium.im/xmpp/ping"
	"mellium.im/xmpp/stanza"

	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/nanite/benchmark"
	"github.com/nanite-go/nanite/testenv"
	"github.com/nanite-go/nanite/vertebra"
)

// XMPP benchmark sides.
const (
	xbRaw      = "raw"       // IQ round trip, component to component
	xbRawAgent = "raw-agent" // XEP-0199 ping, component to a c2s (STARTTLS) agent
	xbOp       = "op"        // full op, component to component
	xbOpAgent  = "op-agent"  // full op, component to an XMPP agent (c2s, STARTTLS)
)

var xbAllSides = []string{xbRaw, xbOp, xbRawAgent, xbOpAgent}

// BenchXMPPOptions are the flags of "nanite bench-xmpp".
type BenchXMPPOptions struct {
	Duration    time.Duration
	Warmup      time.Duration
	Rounds      int
	Outstanding []int
	Payload     int
	Only        []string
	JSON        bool
	CPUProfile  string
	Hold        time.Duration
	NoBatch     bool
	NoCompact   bool
	Retry       time.Duration
}

// newBenchXMPPCmd is "nanite bench-xmpp".
func newBenchXMPPCmd() *cobra.Command {
	opts := &BenchXMPPOptions{}
	cmd := &cobra.Command{
		Use:   "bench-xmpp",
		Short: "Measure ops over XMPP against a raw IQ round trip",
		Long: `Measure, in one run on one private prosody (testenv; needs the prosody package):

  raw        an IQ round trip between two components (XEP-0114): the baseline
  op         a full op between two components: op -> echo, ack, data, final,
             each confirmed (the echo actor's /echo/say, through vertebra)
  raw-agent  an XEP-0199 ping from a component to an XMPP agent (c2s, STARTTLS)
  op-agent   a full op from a component to that agent ("nanite xmpp-agent")

at several numbers of outstanding requests (N goroutines each making
sequential requests), alternating the sides (ABBA) so that drift hits all.
It prints p50, p99, throughput, this process's CPU and prosody's CPU per
request, stanzas per request, and the ratios op/raw and op-agent/raw-agent.
These are measurements, not assertions.`,
		Example: `  nanite bench-xmpp
  nanite bench-xmpp --duration 5s --outstanding 1,64 --only raw,op --json`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if opts.Duration <= 0 || opts.Rounds <= 0 || opts.Payload < 2 {
				return usageErrorf("--duration and --rounds must be positive, --payload at least 2")
			}
			for _, n := range opts.Outstanding {
				if n <= 0 {
					return usageErrorf("--outstanding values must be positive")
				}
			}
			for _, s := range opts.Only {
				if !slices.Contains(xbAllSides, s) {
					return usageErrorf("unknown side %q in --only (want %s)", s, strings.Join(xbAllSides, ", "))
				}
			}
			return benchXMPPRun(cmd.Context(), opts, cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	fl := cmd.Flags()
	fl.DurationVar(&opts.Duration, "duration", 3*time.Second, "measuring time per side, cell and round")
	fl.DurationVar(&opts.Warmup, "warmup", 300*time.Millisecond, "unmeasured time before each side in each cell")
	fl.IntVar(&opts.Rounds, "rounds", 2, "rounds per cell (sides alternate: ABBA)")
	fl.IntSliceVar(&opts.Outstanding, "outstanding", []int{1, 8, 64}, "numbers of outstanding requests")
	fl.IntVar(&opts.Payload, "payload", 100, "payload bytes (a JSON string of that size)")
	fl.StringSliceVar(&opts.Only, "only", nil, "sides to run (default all): "+strings.Join(xbAllSides, ", "))
	fl.BoolVar(&opts.JSON, "json", false, "print the report as JSON")
	fl.StringVar(&opts.CPUProfile, "cpuprofile", "", "write a CPU profile of the measured slices to this file")
	fl.BoolVar(&opts.NoBatch, "no-batch", false, "callers do not offer batching (ops as a plain Vertebra peer makes them)")
	fl.BoolVar(&opts.NoCompact, "no-compact", false, "callers offer batching but not the compact forms <done> and <call> (docs/xmpp.md)")
	fl.DurationVar(&opts.Hold, "hold", 0, "how long responders hold stanzas to batch them (0: the default, 2 ms)")
	fl.DurationVar(&opts.Retry, "retry", 0, "first resend timeout (0: the default, 1 s)")
	return cmd
}

// XBMeasure is one side of a cell.
type XBMeasure struct {
	Requests       int     `json:"requests"`
	Errors         int     `json:"errors"`
	RPS            float64 `json:"req_per_s"`
	P50us          float64 `json:"p50_us"`
	P99us          float64 `json:"p99_us"`
	CPUus          float64 `json:"cpu_us_per_req"`         // this process (both ends)
	ServerCPUus    float64 `json:"prosody_cpu_us_per_req"` // prosody
	StanzasPerReq  float64 `json:"stanzas_per_req"`
	ResentPerReq   float64 `json:"resent_per_req,omitempty"`
	FirstErr       string  `json:"first_error,omitempty"`
	seconds        float64
	latencies      []time.Duration
	cpu, serverCPU time.Duration
	stanzas        int64
	resent         int64
}

// XBCell is one number of outstanding requests.
type XBCell struct {
	Outstanding int                   `json:"outstanding"`
	Sides       map[string]*XBMeasure `json:"sides"`
}

// XBReport is the result of bench-xmpp.
type XBReport struct {
	Server     string   `json:"server"`
	GoVersion  string   `json:"go_version"`
	NumCPU     int      `json:"num_cpu"`
	PayloadB   int      `json:"payload_bytes"`
	DurationS  float64  `json:"duration_per_side_s"`
	Rounds     int      `json:"rounds"`
	Cells      []XBCell `json:"cells"`
	TimeSpentN string   `json:"where_time_goes"`
}

// xbSide makes one kind of request; stanzas reports the stanzas through
// the server so far (0 when not counted) and the resends.
type xbSide interface {
	do(ctx context.Context, payload []byte) error
	stanzas() (total, resent int64)
}

func benchXMPPRun(ctx context.Context, opts *BenchXMPPOptions, out, errOut io.Writer) error {
	progress := func(format string, a ...any) { fmt.Fprintf(errOut, "bench-xmpp: "+format+"\n", a...) }
	sides := opts.Only
	if len(sides) == 0 {
		sides = xbAllSides
	}
	const domain = "bench.test"
	comps := map[string]string{"raw-a." + domain: "s", "raw-b." + domain: "s", "op-a." + domain: "s", "op-b." + domain: "s"}
	progress("starting a private prosody")
	sctx, scancel := context.WithTimeout(ctx, 30*time.Second)
	p, err := testenv.StartProsody(sctx, testenv.ProsodyOptions{VirtualHosts: []string{domain}, Components: comps,
		Accounts: []testenv.Account{{User: "agent", Host: domain, Password: "pw"}}})
	scancel()
	if err != nil {
		return fmt.Errorf("start prosody (needs the prosody package): %w", err)
	}
	defer p.Close()
	serverCPU := func() time.Duration { return 0 }
	if pid := benchmark.FindProcess("prosody", p.Dir()); pid > 0 {
		serverCPU = benchmark.ProcessCPU(pid)
	}
	selfCPU := benchmark.ProcessCPU(os.Getpid())

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var closers []func()
	defer func() {
		for i := len(closers) - 1; i >= 0; i-- {
			closers[i]()
		}
	}()
	dialComp := func(name string, ep *vertebra.Endpoint, opts ...mux.Option) (*xmpp.Session, error) {
		s, err := vertebra.Dial(ctx, vertebra.DialConfig{JID: jid.MustParse(name), Secret: "s", Addr: p.ComponentAddr()})
		if err != nil {
			return nil, err
		}
		if ep == nil {
			ep = vertebra.NewEndpoint(vertebra.Config{})
		}
		closers = append(closers, vertebra.ServeSession(s, ep, opts...))
		return s, nil
	}

	impl := map[string]xbSide{}
	// raw: an echo IQ between two components.
	if _, err := dialComp("raw-b."+domain, nil, mux.IQ(stanza.SetIQ, xml.Name{Space: "urn:nanite:bench", Local: "echo"}, xbEcho{})); err != nil {
		return err
	}
	rawA, err := dialComp("raw-a."+domain, nil)
	if err != nil {
		return err
	}
	impl[xbRaw] = &xbRawSide{ctx: ctx, s: rawA, from: jid.MustParse("raw-a." + domain), to: jid.MustParse("echo@raw-b." + domain)}

	// op: an endpoint serving the echo actor on a component, called from
	// another.
	handler := dispatcherHandler{nanite.NewDispatcher(exampleActor())}
	blog := slog.New(slog.NewTextHandler(errOut, &slog.HandlerOptions{Level: slog.LevelWarn}))
	ecfg := vertebra.Config{Hold: opts.Hold, NoBatch: opts.NoBatch, NoCompact: opts.NoCompact, RetryInitial: opts.Retry, Logger: blog}
	opBcfg := ecfg
	opBcfg.Handler = &vertebra.ActorServer{Handler: handler}
	opB := vertebra.NewEndpoint(opBcfg)
	if _, err := dialComp("op-b."+domain, opB); err != nil {
		return err
	}
	opA := vertebra.NewEndpoint(ecfg)
	if _, err := dialComp("op-a."+domain, opA); err != nil {
		return err
	}
	impl[xbOp] = &xbOpSide{caller: opA, to: jid.MustParse("echo@op-b." + domain), from: jid.MustParse("bench@op-a." + domain),
		peer: opB}

	// The agent: nanite xmpp-agent's code, logged in with STARTTLS.
	if slices.Contains(sides, xbRawAgent) || slices.Contains(sides, xbOpAgent) {
		tc, err := vertebra.LoadCAFile(p.CAFile())
		if err != nil {
			return err
		}
		a, err := vertebra.NewAgent(vertebra.AgentConfig{
			Dial:    vertebra.DialConfig{JID: jid.MustParse("agent@" + domain + "/bench"), Password: "pw", Addr: p.C2SAddr(), TLSConfig: tc},
			Handler: handler, Load: func() float64 { return 0 }, StatusInterval: time.Hour, Endpoint: ecfg,
		})
		if err != nil {
			return err
		}
		actx, acancel := context.WithCancel(ctx)
		adone := make(chan error, 1)
		go func() { adone <- a.Run(actx) }()
		closers = append(closers, func() { acancel(); <-adone })
		select {
		case <-a.Ready():
		case err := <-adone:
			return err
		case <-time.After(10 * time.Second):
			return fmt.Errorf("the agent did not connect")
		}
		impl[xbRawAgent] = &xbPingSide{ctx: ctx, s: rawA, from: jid.MustParse("raw-a." + domain), to: a.JID()}
		impl[xbOpAgent] = &xbOpSide{caller: opA, to: a.JID(), from: jid.MustParse("bench@op-a." + domain), peer: a.Endpoint()}
	}

	payload := make([]byte, opts.Payload)
	payload[0], payload[len(payload)-1] = '"', '"'
	for i := 1; i < len(payload)-1; i++ {
		payload[i] = "abcdefghijklmnopqrstuvwxyz0123456789"[i%36]
	}

	stopProfiles, err := startProfiles(opts.CPUProfile, "")
	defer stopProfiles()
	if err != nil {
		return err
	}
	rep := &XBReport{Server: "prosody (private, testenv) on loopback", GoVersion: runtime.Version(), NumCPU: runtime.NumCPU(),
		PayloadB: opts.Payload, DurationS: opts.Duration.Seconds(), Rounds: opts.Rounds}
	for _, n := range opts.Outstanding {
		cell := XBCell{Outstanding: n, Sides: map[string]*XBMeasure{}}
		for r := range opts.Rounds {
			order := slices.Clone(sides)
			if r%2 == 1 {
				slices.Reverse(order)
			}
			for _, name := range order {
				progress("%d outstanding, round %d: %s", n, r+1, name)
				s := impl[name]
				if opts.Warmup > 0 {
					if _, err := xbSlice(ctx, s, payload, n, opts.Warmup, selfCPU, serverCPU); err != nil {
						return err
					}
				}
				m, err := xbSlice(ctx, s, payload, n, opts.Duration, selfCPU, serverCPU)
				if err != nil {
					return err
				}
				if prev := cell.Sides[name]; prev != nil {
					prev.merge(m)
				} else {
					cell.Sides[name] = m
				}
			}
		}
		for _, m := range cell.Sides {
			m.finish()
		}
		rep.Cells = append(rep.Cells, cell)
	}
	rep.TimeSpentN = xbWhereTimeGoes(rep)
	if opts.JSON {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	return rep.writeTable(out, sides)
}

func xbSlice(ctx context.Context, s xbSide, payload []byte, n int, d time.Duration, selfCPU, serverCPU func() time.Duration) (*XBMeasure, error) {
	m := &XBMeasure{}
	var (
		mu       sync.Mutex
		errs     atomic.Int64
		firstErr atomic.Value
		wg       sync.WaitGroup
	)
	st0, rs0 := s.stanzas()
	cpu0, srv0 := selfCPU(), serverCPU()
	start := time.Now()
	end := start.Add(d)
	for range n {
		wg.Go(func() {
			lat := make([]time.Duration, 0, 1024)
			for ctx.Err() == nil && time.Now().Before(end) {
				t0 := time.Now()
				rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				err := s.do(rctx, payload)
				cancel()
				if err != nil {
					if errs.Add(1) == 1 {
						firstErr.Store(err.Error())
					}
					continue
				}
				lat = append(lat, time.Since(t0))
			}
			mu.Lock()
			m.latencies = append(m.latencies, lat...)
			mu.Unlock()
		})
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	m.seconds = time.Since(start).Seconds()
	m.cpu, m.serverCPU = selfCPU()-cpu0, serverCPU()-srv0
	st1, rs1 := s.stanzas()
	m.stanzas, m.resent = st1-st0, rs1-rs0
	m.Requests, m.Errors = len(m.latencies), int(errs.Load())
	if e, ok := firstErr.Load().(string); ok {
		m.FirstErr = e
	}
	if m.Requests == 0 {
		return nil, fmt.Errorf("bench-xmpp: every request failed: %s", m.FirstErr)
	}
	return m, nil
}

func (m *XBMeasure) merge(o *XBMeasure) {
	m.latencies = append(m.latencies, o.latencies...)
	m.Requests += o.Requests
	m.Errors += o.Errors
	m.seconds += o.seconds
	m.cpu += o.cpu
	m.serverCPU += o.serverCPU
	m.stanzas += o.stanzas
	m.resent += o.resent
	if m.FirstErr == "" {
		m.FirstErr = o.FirstErr
	}
}

func (m *XBMeasure) finish() {
	us := func(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
	n := float64(m.Requests)
	m.RPS = n / m.seconds
	m.CPUus = us(m.cpu) / n
	m.ServerCPUus = us(m.serverCPU) / n
	m.StanzasPerReq = float64(m.stanzas) / n
	m.ResentPerReq = float64(m.resent) / n
	slices.Sort(m.latencies)
	m.P50us = us(benchmark.Percentile(m.latencies, 0.5))
	m.P99us = us(benchmark.Percentile(m.latencies, 0.99))
	m.latencies = nil
}

func (r *XBReport) writeTable(w io.Writer, sides []string) error {
	fmt.Fprintf(w, "XMPP ops vs raw IQ round trips: %s, %s, %d CPUs, payload %d B, %v per side x %d rounds\n\n",
		r.Server, r.GoVersion, r.NumCPU, r.PayloadB, time.Duration(r.DurationS*float64(time.Second)), r.Rounds)
	tw := tabwriter.NewWriter(w, 2, 8, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "outstanding\tside\tp50\tp99\treq/s\tCPU/req\tprosody CPU/req\tstanzas/req\terrors\t")
	for _, c := range r.Cells {
		for _, name := range sides {
			m := c.Sides[name]
			if m == nil {
				continue
			}
			fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%.0f\t%s\t%s\t%.1f\t%d\t\n", c.Outstanding, name, benchmark.FormatMicros(m.P50us),
				benchmark.FormatMicros(m.P99us), m.RPS, benchmark.FormatMicros(m.CPUus), benchmark.FormatMicros(m.ServerCPUus),
				m.StanzasPerReq, m.Errors)
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(w, "\nratios (op / its raw baseline):")
	tw = tabwriter.NewWriter(w, 2, 8, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "outstanding\tpair\tp50\tthroughput\t")
	for _, c := range r.Cells {
		for _, pair := range [][2]string{{xbOp, xbRaw}, {xbOpAgent, xbRawAgent}, {xbOpAgent, xbRaw}} {
			a, b := c.Sides[pair[0]], c.Sides[pair[1]]
			if a == nil || b == nil {
				continue
			}
			fmt.Fprintf(tw, "%d\t%s/%s\t%.2fx\t%.2fx\t\n", c.Outstanding, pair[0], pair[1], a.P50us/b.P50us, a.RPS/b.RPS)
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if r.TimeSpentN != "" {
		fmt.Fprintf(w, "\nwhere the time goes: %s\n", r.TimeSpentN)
	}
	return nil
}

// xbWhereTimeGoes explains the cost of an op from the measurements of the
// last cell.
func xbWhereTimeGoes(r *XBReport) string {
	if len(r.Cells) == 0 {
		return ""
	}
	c := r.Cells[len(r.Cells)-1]
	raw, op, opa := c.Sides[xbRaw], c.Sides[xbOp], c.Sides[xbOpAgent]
	if raw == nil || op == nil {
		return ""
	}
	var b strings.Builder
	fmt.Fprintf(&b, "at %d outstanding, an op to a component is %.1f stanzas through the server (its echo carries ack, data and final)",
		c.Outstanding, op.StanzasPerReq)
	if opa != nil {
		fmt.Fprintf(&b, ", to an XMPP agent %.1f (echo, then one batch and its confirmation)", opa.StanzasPerReq)
	}
	fmt.Fprintf(&b, ", against %.1f for a raw IQ. Prosody parses and re-serialises every element: it spends %s per op against %s per raw IQ. "+
		"This process (both ends) spends %s per op against %s per raw IQ: typed values to and from JSON, more XML to encode and parse, "+
		"the responder's goroutine and hold timer, and the garbage they make. Both share the machine's CPUs, so throughput follows "+
		"the sum: %s per op against %s per raw IQ (%.2fx).",
		raw.StanzasPerReq, benchmark.FormatMicros(op.ServerCPUus), benchmark.FormatMicros(raw.ServerCPUus),
		benchmark.FormatMicros(op.CPUus), benchmark.FormatMicros(raw.CPUus),
		benchmark.FormatMicros(op.CPUus+op.ServerCPUus), benchmark.FormatMicros(raw.CPUus+raw.ServerCPUus),
		(raw.CPUus+raw.ServerCPUus)/(op.CPUus+op.ServerCPUus))
	return b.String()
}

// xbEcho answers <echo xmlns="urn:nanite:bench"> IQs with their payload.
type xbEcho struct{}

func (xbEcho) HandleIQ(iq stanza.IQ, t xmlstream.TokenReadEncoder, start *xml.StartElement) error {
	inner, err := xmlstream.ReadAll(t)
	if err != nil {
		return err
	}
	toks := append([]xml.Token{start.Copy()}, inner...)
	if len(toks) == 1 || !isEnd(toks[len(toks)-1], start.Name) {
		toks = append(toks, start.End())
	}
	_, err = xmlstream.Copy(t, iq.Result(&sliceReader{toks: toks}))
	return err
}

func isEnd(t xml.Token, n xml.Name) bool {
	e, ok := t.(xml.EndElement)
	return ok && e.Name == n
}

type sliceReader struct {
	toks []xml.Token
	i    int
}

func (r *sliceReader) Token() (xml.Token, error) {
	if r.i >= len(r.toks) {
		return nil, io.EOF
	}
	r.i++
	return r.toks[r.i-1], nil
}

// The raw sides give SendIQ the run's context, not the request's: mellium
// (v0.22.0) turns a context's end into a write deadline in the past set
// from a goroutine that may run after SendIQ's write, during another
// goroutine's, which kills the session (see vertebra's Endpoint.write).
type xbRawSide struct {
	ctx      context.Context
	s        *xmpp.Session
	from, to jid.JID
	count    atomic.Int64
}

func (r *xbRawSide) do(_ context.Context, payload []byte) error {
	name := xml.Name{Space: "urn:nanite:bench", Local: "echo"}
	iq := stanza.IQ{Type: stanza.SetIQ, From: r.from, To: r.to}
	body := &sliceReader{toks: []xml.Token{xml.StartElement{Name: name}, xml.CharData(payload), xml.EndElement{Name: name}}}
	resp, err := r.s.SendIQ(r.ctx, iq.Wrap(body))
	if err != nil {
		return err
	}
	defer resp.Close()
	if _, err := xmlstream.Copy(xmlstream.Discard(), resp); err != nil {
		return err
	}
	r.count.Add(2)
	return nil
}

func (r *xbRawSide) stanzas() (int64, int64) { return r.count.Load(), 0 }

type xbPingSide struct {
	ctx      context.Context
	s        *xmpp.Session
	from, to jid.JID
	count    atomic.Int64
}

func (r *xbPingSide) do(ctx context.Context, _ []byte) error {
	resp, err := r.s.SendIQ(r.ctx, ping.IQ{IQ: stanza.IQ{Type: stanza.GetIQ, From: r.from, To: r.to}}.TokenReader())
	if err != nil {
		return err
	}
	defer resp.Close()
	_, err = xmlstream.Copy(xmlstream.Discard(), resp)
	r.count.Add(2)
	return err
}

func (r *xbPingSide) stanzas() (int64, int64) { return r.count.Load(), 0 }

type xbOpSide struct {
	caller   *vertebra.Endpoint
	peer     *vertebra.Endpoint
	from, to jid.JID
}

func (o *xbOpSide) do(ctx context.Context, payload []byte) error {
	res, err := o.caller.Call(ctx, o.to, "/echo/say", payload, vertebra.WithFrom(o.from))
	if err != nil {
		return err
	}
	if len(res.Value()) != len(payload) {
		return fmt.Errorf("echo of %d bytes came back as %d", len(payload), len(res.Value()))
	}
	return nil
}

// stanzas: every IQ-set either end sent has its IQ-result.
func (o *xbOpSide) stanzas() (int64, int64) {
	a, b := o.caller.Stats(), o.peer.Stats()
	return 2 * (a.Sent + b.Sent), a.Resent + b.Resent
}
