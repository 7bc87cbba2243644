package main

import (
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/nanite-go/nanite/nanite/benchmark"
	"github.com/nanite-go/nanite/testenv"
)

// newBenchCmd is `nanite bench`: nanite request/reply against a raw AMQP
// baseline, side by side on one broker.
func newBenchCmd() *cobra.Command {
	var (
		amqpURL     string
		cfg         benchmark.Config
		jsonOut     bool
		jsonFile    string
		cpuProfile  string
		memProfile  string
		outstanding []int
		payloads    []int
		brokerPID   int
		only        string
	)
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Measure nanite requests (plain, signed, sealed, session) against a raw AMQP request/reply baseline",
		Long: `Measure, in one run on one broker, at several numbers of outstanding requests
(N goroutines each making sequential requests) and payload sizes, these modes
(--modes):

  raw     a raw amqp091-go request/reply echo (echo consumer with the agent's
          prefetch, replies to the requester's exclusive reply queue by
          correlation id)
  plain   a nanite request through an embedded mapper to one agent serving an
          echo actor
  signed  the same in secure mode: every packet signed and verified, the agent
          checking a one-rule allow policy (identities of one CA)
  sealed  secure mode with sealed payloads (request sealed to the agent, result
          to the mapper)
  session secure mode with session keys: the first request signed with an
          HPKE-sealed session key, then requests and results authenticated
          with HMAC-SHA256 under it (docs/security.md, "Session keys")

"signed", "sealed" and "session" are measured once per KEM of --kem (the KEM
of the identities' sealing keys: "hybrid", ML-KEM-768+X25519, the default of
"nanite pki issue", or "x25519"); "signed:x25519" or "sealed:hybrid" name one.

The modes run interleaved in each cell (raw, plain, signed, ..., signed,
plain, raw) so that drift hits all alike. The table shows p50, p99, req/s
and CPU per request of each mode, its ratios to raw and to plain, and whether
the targets are met (plain: throughput >= 0.8x raw at 64 outstanding, p50 <=
1.25x raw at 1 outstanding; signed and session: throughput >= 0.6x plain at
64 outstanding). These are measurements, not assertions: the exit status is 0
whether targets are met or not. --cpuprofile labels every goroutine with its
mode: go tool pprof -tagfocus=mode=signed:hybrid PROFILE.

Without --amqp a private RabbitMQ node is started (testenv; needs the
rabbitmq-server package) and stopped at the end.`,
		Example: `  nanite bench
  nanite bench --amqp amqp://guest:guest@localhost:5672/ --duration 5s
  nanite bench --requests 20000 --outstanding 64 --payload 100 --json
  nanite bench --modes raw,plain --kem hybrid
  nanite bench --modes plain,signed:hybrid --cpuprofile bench.pprof
  nanite bench --modes raw,plain,signed,session --kem x25519`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			cfg.Outstanding, cfg.Payloads = outstanding, payloads
			switch only {
			case "":
			case "raw":
				cfg.Modes = []string{benchmark.ModeRaw}
			case "nanite":
				cfg.Modes = []string{benchmark.ModePlain}
			default:
				return fmt.Errorf("--only must be raw or nanite, not %q (use --modes)", only)
			}
			if _, err := benchmark.ParseModes(cfg.Modes, cfg.KEMs); err != nil {
				return err
			}
			stderr := cmd.ErrOrStderr()
			cfg.Progress = func(s string) { fmt.Fprintln(stderr, "bench:", s) }
			// The agents' and mappers' logs are discarded unless the global
			// --log-level asks for them.
			if fl := cmd.Flag("log-level"); fl != nil && fl.Value.String() != "" {
				var level slog.Level
				if err := level.UnmarshalText([]byte(fl.Value.String())); err != nil {
					return fmt.Errorf("--log-level: %w", err)
				}
				cfg.Logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
			}

			cfg.URL = amqpURL
			if cfg.URL == "" {
				fmt.Fprintln(stderr, "bench: no --amqp given; starting a private RabbitMQ node")
				t0 := time.Now()
				r, err := testenv.StartRabbitMQ(ctx, testenv.RabbitOptions{Name: "bench"})
				if err != nil {
					return fmt.Errorf("start a private RabbitMQ node (or give --amqp): %w", err)
				}
				defer func() {
					if err := r.Close(); err != nil {
						fmt.Fprintln(stderr, "bench: stopping the private node:", err)
					}
				}()
				fmt.Fprintf(stderr, "bench: %v ready in %v\n", r, time.Since(t0).Round(100*time.Millisecond))
				cfg.URL = r.URL()
				cfg.BrokerNote = "private node started by testenv, management plugin off"
				brokerPID = benchmark.FindProcess("beam.smp", r.Dir())
			}
			if brokerPID > 0 {
				cfg.BrokerCPU = benchmark.ProcessCPU(brokerPID)
			}

			stopProfiles, err := startProfiles(cpuProfile, "")
			defer stopProfiles()
			if err != nil {
				return err
			}

			rep, err := benchmark.Run(ctx, cfg)
			if err != nil {
				return err
			}
			if err := writeMemProfile(memProfile); err != nil {
				return err
			}
			if jsonFile != "" {
				f, err := os.Create(jsonFile)
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
			out := cmd.OutOrStdout()
			if jsonOut {
				return rep.WriteJSON(out)
			}
			return rep.WriteTable(out)
		},
	}
	f := cmd.Flags()
	f.StringVar(&amqpURL, "amqp", "", "broker URL, amqp://user:pass@host:port/vhost (default: start a private RabbitMQ node)")
	f.DurationVar(&cfg.Duration, "duration", benchmark.DefaultDuration, "time each mode runs in each cell")
	f.IntVar(&cfg.Requests, "requests", 0, "requests each mode makes in each cell (replaces --duration)")
	f.DurationVar(&cfg.Warmup, "warmup", benchmark.DefaultWarmup, "unmeasured run of each mode before each cell (negative: none)")
	f.IntVar(&cfg.Rounds, "rounds", benchmark.DefaultRounds, "alternations per cell: 2 runs the modes in order, then in reverse")
	f.IntSliceVar(&outstanding, "outstanding", benchmark.DefaultOutstanding, "outstanding requests (goroutines) per cell")
	f.IntSliceVar(&payloads, "payload", benchmark.DefaultPayloads, "payload sizes in bytes")
	f.IntVar(&cfg.Prefetch, "prefetch", 0, "prefetch of the raw echo consumer and of the agent (default nanite.DefaultPrefetch)")
	f.BoolVar(&cfg.RawSpawn, "raw-spawn", false, "raw echo server handles each message in its own goroutine, as the agent does (default: in its delivery loop)")
	f.StringSliceVar(&cfg.Modes, "modes", benchmark.DefaultModes, "modes to measure: raw, plain, signed, sealed, session, signed:KEM, sealed:KEM, session:KEM")
	f.StringSliceVar(&cfg.KEMs, "kem", benchmark.DefaultKEMs, `KEMs of the secure modes' sealing keys, each measured in turn: "hybrid" (ML-KEM-768+X25519) and/or "x25519"`)
	f.StringVar(&only, "only", "", "run one mode only: raw or nanite (plain)")
	_ = f.MarkDeprecated("only", "use --modes raw or --modes plain")
	f.IntVar(&brokerPID, "broker-pid", 0, "pid of the broker process on this machine, to report its CPU per request (found by itself for a private node)")
	f.BoolVar(&jsonOut, "json", false, "print the report as JSON")
	f.StringVar(&jsonFile, "json-out", "", "also write the report as JSON to this file")
	f.StringVar(&cpuProfile, "cpuprofile", "", "write a CPU profile of the run (requesters, echo server, agents and mappers; label mode=MODE) to this file")
	f.StringVar(&memProfile, "memprofile", "", "write an allocation profile of the run to this file")
	return cmd
}
