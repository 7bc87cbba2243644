package main

import (
	"context"
	"log/slog"
	"time"

	"github.com/spf13/cobra"

	"github.com/nanite-go/nanite/nanite"
)

// MapperOptions are the flags of "nanite mapper".
type MapperOptions struct {
	IO       IOStreams
	Settings func() (*Settings, error)

	Identity       string
	AgentTimeout   time.Duration
	RequestTimeout time.Duration
	ReportInterval time.Duration
}

// NewCmdMapper returns "nanite mapper". runF replaces the run function in
// tests.
func NewCmdMapper(f *Factory, runF func(context.Context, *MapperOptions) error) *cobra.Command {
	opts := &MapperOptions{IO: f.IO, Settings: f.Settings}
	cmd := &cobra.Command{
		Use:   "mapper [flags]",
		Short: "Run a mapper daemon",
		Long: `Run a mapper daemon until SIGINT or SIGTERM. It keeps the cluster state
(registrations, heartbeats; agents silent for --agent-timeout are dropped)
and handles, competing with the other mapper daemons of the vhost so that
each is handled once:

  - requests and pushes made by agents (Agent.Request, Agent.Push);
  - the offline failsafe queue: requests made with --failsafe while no agent
    offered their service, sent on when one appears (or failed at their
    deadline).

Requesters ("nanite request", programs embedding a mapper) do not need a
mapper daemon for their own requests. Every --report-interval the daemon
logs the size of the cluster.

In secure mode (--cert, --key and --ca with a mapper certificate, see
"nanite --help") the identity is the certificate's name and --revoked is
reloaded on SIGHUP.`,
		Example: `  nanite mapper
  nanite mapper --identity mapper-1 --report-interval 1m --log-format json`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if opts.Identity != "" && !nanite.ValidIdentity(opts.Identity) {
				return usageErrorf("invalid --identity %q", opts.Identity)
			}
			if opts.ReportInterval <= 0 || opts.AgentTimeout < 0 || opts.RequestTimeout < 0 {
				return usageErrorf("--report-interval must be positive, --agent-timeout and --request-timeout not negative")
			}
			if runF != nil {
				return runF(cmd.Context(), opts)
			}
			return mapperRun(cmd.Context(), opts)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&opts.Identity, "identity", "", "mapper identity (default: generated)")
	fl.DurationVar(&opts.AgentTimeout, "agent-timeout", 0, "drop agents silent this long (default: three of their heartbeat intervals)")
	fl.DurationVar(&opts.RequestTimeout, "request-timeout", nanite.DefaultRequestTimeout, "deadline of relayed requests that have none")
	fl.DurationVar(&opts.ReportInterval, "report-interval", 30*time.Second, "how often to log the cluster's size")
	return cmd
}

func mapperRun(ctx context.Context, opts *MapperOptions) error {
	s, err := opts.Settings()
	if err != nil {
		return err
	}
	log := s.newLogger(opts.IO.ErrOut, slog.LevelInfo)
	sec, err := s.Secure.load(secureForMapper, log)
	if err != nil {
		return err
	}
	identity := opts.Identity
	var secure *nanite.Secure
	if sec != nil {
		if identity, err = sec.identity(identity); err != nil {
			return err
		}
		secure = sec.Secure
	}
	if err := checkTLS(ctx, s.URL, s.TLS.Config); err != nil {
		return err
	}
	m, err := nanite.NewMapper(nanite.MapperConfig{
		URL:                s.URL,
		TLS:                s.TLS.Config,
		Identity:           identity,
		AgentTimeout:       opts.AgentTimeout,
		RequestTimeout:     opts.RequestTimeout,
		ServeAgentRequests: true,
		ServeFailsafe:      true,
		Secure:             secure,
		Logger:             log,
	})
	if err != nil {
		return err
	}
	log.Info("mapper starting", "mapper", m.Identity(), "url", redactURL(s.URL))
	if sec != nil {
		sec.logStart(log)
		defer sec.startReloads(ctx, 0, log)()
	}
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	t := time.NewTicker(opts.ReportInterval)
	defer t.Stop()
	for {
		select {
		case err := <-done:
			if err != nil {
				return &connectionError{URL: s.URL, Err: err}
			}
			log.Info("mapper stopped", "mapper", m.Identity())
			return nil
		case <-t.C:
			reportCluster(log, m)
		}
	}
}

// reportCluster logs the size of the cluster as the mapper sees it.
func reportCluster(log *slog.Logger, m *nanite.Mapper) {
	agents := m.Agents()
	services := map[string]bool{}
	inflight := 0
	for _, a := range agents {
		inflight += a.InFlight
		for _, s := range a.Services {
			services[s.Name] = true
		}
	}
	st := m.Stats()
	log.Info("cluster", "agents", len(agents), "services", len(services), "in_flight", inflight,
		"relayed", st["relayed"], "failsafe_held", st["failsafe_held"], "dropped", st["agents_dropped"])
}
