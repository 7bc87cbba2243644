package main

import (
	"context"
	"crypto/tls"
	"log/slog"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/nanite-go/nanite/nanite"
)

// externalHelp documents the external-actor contract in --help. The
// reference is the doc comment of nanite.ExternalActors.
const externalHelp = `External actors (--actors FILE, YAML or JSON):
  services:
    /ops/restart:                   # service name: /actor/method
      command: ./restart.sh         # path (relative to the file) or name in $PATH; no shell
      args: [--graceful]
      env: {APP: shop}              # added to the agent's environment (minus NANITE_*)
      dir: /srv/shop                # working directory (default: the file's directory)
      timeout: 60s                  # besides the request's deadline (default: none)
      idempotent: false             # may the mapper retry it on another agent?
      description: restart the app
  kill_grace: 2s                    # SIGTERM -> SIGKILL delay when a run is cut short

  Each request runs the command once, in its own process group:
  - stdin:  the request payload as JSON and a newline ("null" when there is none);
  - env:    NANITE_SERVICE, NANITE_TOKEN, NANITE_FROM, NANITE_AGENT, NANITE_ATTEMPT,
            NANITE_DEADLINE (RFC 3339 UTC; empty when none);
  - stdout: a sequence of JSON values, usually one per line (logs go to stderr).
            {"intermediate": KEY, "data": VALUE} is sent at once as an intermediate
            result with that key; of the other values the last is the final result
            and the earlier ones are sent as intermediate results keyed "stdout".
            No value at all gives null.
  - failure: a non-zero exit fails the request with the trimmed stderr (last 4 KiB)
            as the message; so does output that is not JSON. At the deadline (or
            timeout, or agent shutdown) the process group gets SIGTERM, then
            SIGKILL after kill_grace, and the request fails naming the deadline.`

// AgentOptions are the flags of "nanite agent".
type AgentOptions struct {
	IO       IOStreams
	Settings func() (*Settings, error)
	// Given reports whether a flag was given on the command line (flags
	// win over the config file's agent section).
	Given func(flag string) bool

	Identity      string
	DataDir       string
	Tags          []string
	Heartbeat     time.Duration
	Prefetch      int
	ActorsFile    string
	NoExamples    bool
	ShutdownGrace time.Duration
	PolicyWatch   time.Duration // secure mode: how often to check --policy for changes
}

// NewCmdAgent returns "nanite agent". runF replaces the run function in
// tests.
func NewCmdAgent(f *Factory, runF func(context.Context, *AgentOptions) error) *cobra.Command {
	opts := &AgentOptions{IO: f.IO, Settings: f.Settings}
	cmd := &cobra.Command{
		Use:   "agent [flags]",
		Short: "Run an agent serving the example actor and external actors",
		Long: `Run an agent: it registers with the cluster, sends heartbeats with its load,
and serves its services until SIGINT or SIGTERM. Then it stops taking
requests, lets running ones finish (up to --shutdown-grace), unregisters and
disconnects. A second signal kills it at once.

Without --identity the identity is kept in --data-dir (so that the agent
finds its durable queue again after a restart), or is fresh on each start.
Flags left out fall back to the config file's "agent" section.

In secure mode (--cert, --key and --ca with an agent certificate, see
"nanite --help") the identity is the certificate's name, every packet is
signed and verified, and --policy decides which callers may call which
services; the policy is reloaded on SIGHUP and when its file changes
(checked every --policy-watch), --revoked on SIGHUP.

` + examplesHelp + `

` + externalHelp,
		Example: `  nanite agent --tags web,eu
  nanite agent --identity web-1 --data-dir /var/lib/nanite --actors /etc/nanite/actors.yaml --no-examples
  NANITE_URL=amqp://app:secret@rabbit:5672/app nanite agent --tags db --tags us
  nanite agent --cert web-1.crt --key web-1.key --ca ca.crt --policy policy.yaml`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			opts.Given = cmd.Flags().Changed
			if opts.Identity != "" && !nanite.ValidIdentity(opts.Identity) {
				return usageErrorf("invalid --identity %q: 1 to 128 letters, digits, '.', '_', ':' or '-'", opts.Identity)
			}
			if opts.Prefetch < 0 || opts.Heartbeat < 0 || opts.ShutdownGrace < 0 || opts.PolicyWatch < 0 {
				return usageErrorf("--prefetch, --heartbeat, --shutdown-grace and --policy-watch must not be negative")
			}
			if runF != nil {
				return runF(cmd.Context(), opts)
			}
			return agentRun(cmd.Context(), opts)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&opts.Identity, "identity", "", "agent identity (default: kept in --data-dir, else generated)")
	fl.StringVar(&opts.DataDir, "data-dir", "", "directory that keeps the agent's identity across restarts")
	fl.StringSliceVar(&opts.Tags, "tags", nil, "tags of the agent (repeatable, or a comma list)")
	fl.DurationVar(&opts.Heartbeat, "heartbeat", nanite.DefaultHeartbeatInterval, "interval between heartbeats")
	fl.IntVar(&opts.Prefetch, "prefetch", nanite.DefaultPrefetch, "requests held and run at once")
	fl.StringVar(&opts.ActorsFile, "actors", "", "file of external actors (YAML or JSON, see above)")
	fl.BoolVar(&opts.NoExamples, "no-examples", false, `do not serve the example actor "echo"`)
	fl.DurationVar(&opts.ShutdownGrace, "shutdown-grace", nanite.DefaultShutdownGrace, "how long running requests may finish on shutdown")
	fl.DurationVar(&opts.PolicyWatch, "policy-watch", defaultPolicyWatch, "secure mode: how often to check the --policy file for changes (0: only on SIGHUP)")
	return cmd
}

// agentSpec is an agent's configuration after precedence.
type agentSpec struct {
	Identity      string
	DataDir       string
	Tags          []string
	Heartbeat     time.Duration
	Prefetch      int
	ActorsFile    string
	Examples      bool
	ShutdownGrace time.Duration
	TLS           *tls.Config    // for amqps:// URLs
	Secure        *nanite.Secure // secure mode (see secure.go); nil: plain
}

// resolve applies flags > config file > defaults to the agent's settings.
func (o *AgentOptions) resolve(file AgentFileConfig) agentSpec {
	given := o.Given
	if given == nil {
		given = func(string) bool { return false }
	}
	tags := o.Tags
	if !given("tags") && len(file.Tags) > 0 {
		tags = file.Tags
	}
	return agentSpec{
		Identity:      pick(given("identity"), o.Identity, file.Identity),
		DataDir:       pick(given("data-dir"), o.DataDir, file.DataDir),
		Tags:          cleanTags(tags),
		Heartbeat:     pick(given("heartbeat"), o.Heartbeat, time.Duration(file.Heartbeat)),
		Prefetch:      pick(given("prefetch"), o.Prefetch, file.Prefetch),
		ActorsFile:    pick(given("actors"), o.ActorsFile, file.Actors),
		Examples:      !pick(given("no-examples"), o.NoExamples, file.NoExamples),
		ShutdownGrace: o.ShutdownGrace,
	}
}

// cleanTags trims tags and drops empty and repeated ones.
func cleanTags(in []string) []string {
	var out []string
	seen := map[string]bool{}
	for _, t := range in {
		for _, p := range strings.Split(t, ",") {
			p = strings.TrimSpace(p)
			if p != "" && !seen[p] {
				seen[p] = true
				out = append(out, p)
			}
		}
	}
	return out
}

func agentRun(ctx context.Context, opts *AgentOptions) error {
	s, err := opts.Settings()
	if err != nil {
		return err
	}
	log := s.newLogger(opts.IO.ErrOut, slog.LevelInfo)
	spec := opts.resolve(s.File.Agent)
	spec.TLS = s.TLS.Config
	sec, err := s.Secure.load(secureForAgent, log)
	if err != nil {
		return err
	}
	if sec != nil {
		if spec.Identity, err = sec.identity(spec.Identity); err != nil {
			return err
		}
		spec.Secure = sec.Secure
	}
	if err := checkTLS(ctx, s.URL, spec.TLS); err != nil {
		return err
	}
	a, err := buildAgent(spec, s.URL, log)
	if err != nil {
		return err
	}
	log.Info("agent starting", "agent", a.Identity(), "url", redactURL(s.URL), "services", len(a.Services()), "tags", spec.Tags)
	if sec != nil {
		sec.logStart(log)
		if sec.policy == nil {
			log.Warn("secure mode without --policy: every caller with a valid certificate may call every service")
		}
		defer sec.startReloads(ctx, opts.PolicyWatch, log)()
	}
	if err := a.Run(ctx); err != nil {
		return &connectionError{URL: s.URL, Err: err}
	}
	log.Info("agent stopped", "agent", a.Identity())
	return nil
}

// buildAgent makes an agent with the example actor (unless turned off) and
// the external actors of spec.ActorsFile.
func buildAgent(spec agentSpec, url string, log *slog.Logger) (*nanite.Agent, error) {
	a, err := nanite.NewAgent(nanite.AgentConfig{
		URL:               url,
		TLS:               spec.TLS,
		Identity:          spec.Identity,
		DataDir:           spec.DataDir,
		Tags:              spec.Tags,
		HeartbeatInterval: spec.Heartbeat,
		Prefetch:          spec.Prefetch,
		ShutdownGrace:     spec.ShutdownGrace,
		Secure:            spec.Secure,
		Logger:            log,
	})
	if err != nil {
		return nil, err
	}
	if spec.Examples {
		a.AddActor(exampleActor())
	}
	if spec.ActorsFile != "" {
		actors, err := loadExternalActors(spec.ActorsFile, log.With("agent", a.Identity()))
		if err != nil {
			return nil, err
		}
		for _, act := range actors {
			if spec.Examples && act.Name() == "echo" {
				return nil, usageErrorf("actors file %s: the actor name \"echo\" is taken by the example actor; use --no-examples or rename it", spec.ActorsFile)
			}
			a.AddActor(act)
		}
	}
	if !spec.Examples && spec.ActorsFile == "" {
		log.Warn("agent serves only the built-in /nanite/* services (no examples, no --actors)")
	}
	return a, nil
}
