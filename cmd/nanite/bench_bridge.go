package main

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/nanite-go/nanite/bridge"
	bb "github.com/nanite-go/nanite/bridge/benchmark"
	"github.com/nanite-go/nanite/nanite/benchmark"
)

// BenchBridgeOptions are the flags of "nanite bench-bridge".
type BenchBridgeOptions struct {
	Config     bb.Config
	OneBroker  bool
	Components []string
	ServerPIDs []int
	JSON       bool
	JSONFile   string
	CPUProfile string
	MemProfile string
	Trace      string
	Hold       time.Duration
}

// newBenchBridgeCmd is "nanite bench-bridge".
func newBenchBridgeCmd() *cobra.Command {
	opts := &BenchBridgeOptions{}
	cfg := &opts.Config
	cmd := &cobra.Command{
		Use:   "bench-bridge",
		Short: "Measure a cross-site request through two bridges against its raw AMQP and XMPP legs",
		Long: `Measure, in one run, at several numbers of outstanding requests (N goroutines
each making sequential requests):

  amqp-a    raw AMQP RPC at site A (amqp091-go echo consumer, reply queue)
  xmpp      raw XMPP component round trip (component A -> component B -> back)
  amqp-b    raw AMQP RPC at site B
  cross     the full cross-site request: a nanite requester at A -> bridge A's
            proxy agent -> op over XMPP -> bridge B -> echo agent at B, and back

and, with --sides all, diagnostic sides: three that split cross into what the
project adds on each leg, nanite-a (an in-cluster nanite request at A), op (a
vertebra op between the raw components) and nanite-b (an in-cluster request at
B); and raw-chain, cross's path with nothing of the project in it (a raw AMQP
RPC at A to a raw relay, a raw IQ to a raw relay at B, a raw AMQP RPC at B, and
back), which shows what chaining four processes costs on this machine.

The sum of the raw legs is p50(amqp-a) + p50(xmpp) + p50(amqp-b) in the same
cell. Targets: cross p50 <= 1.3x the sum of the raw legs at 1 outstanding;
cross throughput >= 0.5x xmpp's at 64 outstanding. These are measurements,
not assertions: the exit status is 0 whether targets are met or not. The
sides run interleaved in each cell (ABBA) so that drift hits all alike.

By default private servers are started (testenv; needs the rabbitmq-server
and prosody packages): two RabbitMQ nodes, one per site (--one-broker: one
node with a vhost per site), and one prosody with four component domains.
--amqp-a/--amqp-b and --xmpp/--xmpp-secret/--components use existing ones.
--cpuprofile labels goroutines by side: go tool pprof -tagfocus=mode=cross.`,
		Example: `  nanite bench-bridge
  nanite bench-bridge --one-broker --payload 100 --outstanding 1,8,64 --sides all
  nanite bench-bridge --requests 2000 --outstanding 64 --cpuprofile bridge.pprof --sides cross
  nanite bench-bridge --amqp-a amqp://guest:guest@rabbit-a:5672/a --amqp-b amqp://guest:guest@rabbit-b:5672/b \
      --xmpp 127.0.0.1:5347 --xmpp-secret s --components bridge-a.test,bridge-b.test,raw-a.test,raw-b.test`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if (cfg.URLA == "") != (cfg.URLB == "") {
				return usageErrorf("give both --amqp-a and --amqp-b, or neither")
			}
			if (cfg.XMPPAddr == "") != (cfg.Secret == "") {
				return usageErrorf("give both --xmpp and --xmpp-secret, or neither")
			}
			switch len(opts.Components) {
			case 0:
				if cfg.XMPPAddr != "" {
					return usageErrorf("--xmpp needs --components (four component domains: bridge A, bridge B, raw A, raw B)")
				}
			case 4:
				c := opts.Components
				cfg.Domains = bb.Domains{BridgeA: c[0], BridgeB: c[1], RawA: c[2], RawB: c[3]}
			default:
				return usageErrorf("--components takes four component domains (bridge A, bridge B, raw A, raw B), not %d", len(opts.Components))
			}
			if cfg.Payload < 2 {
				return usageErrorf("--payload must be at least 2")
			}
			for _, n := range cfg.Outstanding {
				if n <= 0 {
					return usageErrorf("--outstanding values must be positive")
				}
			}
			sides, err := bb.ParseSides(cfg.Sides)
			if err != nil {
				return &usageError{err}
			}
			cfg.Sides = sides
			stderr := cmd.ErrOrStderr()
			if fl := cmd.Flag("log-level"); fl != nil && fl.Value.String() != "" {
				var level slog.Level
				if err := level.UnmarshalText([]byte(fl.Value.String())); err != nil {
					return fmt.Errorf("--log-level: %w", err)
				}
				cfg.Logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
			}
			return benchBridgeRun(cmd, opts, cmd.OutOrStdout(), stderr)
		},
	}
	f := cmd.Flags()
	f.IntVar(&cfg.Payload, "payload", bb.DefaultPayload, "payload size in bytes (a JSON string)")
	f.IntSliceVar(&cfg.Outstanding, "outstanding", bb.DefaultOutstanding, "outstanding requests (goroutines) per cell")
	f.DurationVar(&cfg.Duration, "duration", bb.DefaultDuration, "time each side runs in each cell")
	f.IntVar(&cfg.Requests, "requests", 0, "requests each side makes in each cell (replaces --duration)")
	f.DurationVar(&cfg.Warmup, "warmup", bb.DefaultWarmup, "unmeasured run of each side before each cell (negative: none)")
	f.IntVar(&cfg.Rounds, "rounds", bb.DefaultRounds, "alternations per cell: 2 runs the sides in order, then in reverse")
	f.StringSliceVar(&cfg.Sides, "sides", bb.DefaultSides, "sides to measure: "+strings.Join(bb.AllSides, ", ")+", or all")
	f.BoolVar(&opts.OneBroker, "one-broker", false, "start one RabbitMQ node with a vhost per site instead of a node per site")
	f.StringVar(&cfg.URLA, "amqp-a", "", "site A's broker and vhost, amqp://user:pass@host:port/vhost (default: start a private node)")
	f.StringVar(&cfg.URLB, "amqp-b", "", "site B's broker and vhost (with --amqp-a)")
	f.StringVar(&cfg.XMPPAddr, "xmpp", "", "an XMPP server's component listener, host:port (default: start a private prosody)")
	f.StringVar(&cfg.Secret, "xmpp-secret", "", "the secret of the four components (with --xmpp)")
	f.StringSliceVar(&opts.Components, "components", nil, "the four component domains on --xmpp: bridge A, bridge B, raw A, raw B")
	f.DurationVar(&opts.Hold, "hold", 0, "the bridges' hold (bridge.Options.Hold; 0: bridge.DefaultHold, negative: never batch)")
	f.IntSliceVar(&opts.ServerPIDs, "server-pid", nil, "pids of existing server processes on this machine, to report their CPU per request")
	f.BoolVar(&opts.JSON, "json", false, "print the report as JSON")
	f.StringVar(&opts.JSONFile, "json-out", "", "also write the report as JSON to this file")
	f.StringVar(&opts.CPUProfile, "cpuprofile", "", "write a CPU profile of the run (goroutines labelled mode=SIDE) to this file")
	f.StringVar(&opts.MemProfile, "memprofile", "", "write an allocation profile of the run to this file")
	f.StringVar(&opts.Trace, "trace", "", "write an execution trace of the run to this file (go tool trace; -pprof=sched: time goroutines waited to run)")
	return cmd
}

func benchBridgeRun(cmd *cobra.Command, opts *BenchBridgeOptions, out, stderr io.Writer) error {
	ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cfg := opts.Config
	if opts.Hold != 0 {
		cfg.BridgeOptions = func(_ string, o *bridge.Options) { o.Hold = opts.Hold }
	}
	cfg.Progress = func(s string) { fmt.Fprintln(stderr, "bench-bridge:", s) }

	if cfg.URLA == "" || cfg.XMPPAddr == "" {
		so := bb.ServerOptions{Brokers: 2, NoXMPP: cfg.XMPPAddr != "", Domains: cfg.Domains}
		if opts.OneBroker {
			so.Brokers = 1
		}
		if cfg.URLA != "" {
			so.Brokers = -1
		}
		var what []string
		if so.Brokers > 0 {
			what = append(what, fmt.Sprintf("%d RabbitMQ node(s)", so.Brokers))
		}
		if !so.NoXMPP {
			what = append(what, "prosody")
		}
		fmt.Fprintf(stderr, "bench-bridge: starting private servers: %s\n", strings.Join(what, " and "))
		t0 := time.Now()
		srv, err := bb.StartServers(ctx, so)
		if err != nil {
			return fmt.Errorf("start private servers (or give --amqp-a/--amqp-b and --xmpp): %w", err)
		}
		defer func() {
			if err := srv.Close(); err != nil {
				fmt.Fprintln(stderr, "bench-bridge: stopping the private servers:", err)
			}
		}()
		fmt.Fprintf(stderr, "bench-bridge: servers ready in %v\n", time.Since(t0).Round(100*time.Millisecond))
		srv.Apply(&cfg)
	}
	if len(opts.ServerPIDs) > 0 {
		var fs []func() time.Duration
		if cfg.ServerCPU != nil {
			fs = append(fs, cfg.ServerCPU)
		}
		for _, pid := range opts.ServerPIDs {
			fs = append(fs, benchmark.ProcessCPU(pid))
		}
		cfg.ServerCPU = func() time.Duration {
			var t time.Duration
			for _, f := range fs {
				t += f()
			}
			return t
		}
	}

	stopProfiles, err := startProfiles(opts.CPUProfile, opts.Trace)
	defer stopProfiles()
	if err != nil {
		return err
	}
	rep, err := bb.Run(ctx, cfg)
	if err != nil {
		return err
	}
	if err := writeMemProfile(opts.MemProfile); err != nil {
		return err
	}
	if opts.JSONFile != "" {
		f, err := os.Create(opts.JSONFile)
		if err != nil {
			return err
		}
		err = rep.WriteJSON(f)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	}
	if opts.JSON {
		return rep.WriteJSON(out)
	}
	return rep.WriteTable(out)
}
