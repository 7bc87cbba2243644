package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/testenv"
)

// DevOptions are the flags of "nanite dev".
type DevOptions struct {
	IO       IOStreams
	Settings func() (*Settings, error)

	Agents     int
	ActorsFile string
}

// NewCmdDev returns "nanite dev". runF replaces the run function in tests.
func NewCmdDev(f *Factory, runF func(context.Context, *DevOptions) error) *cobra.Command {
	opts := &DevOptions{IO: f.IO, Settings: f.Settings}
	cmd := &cobra.Command{
		Use:   "dev [flags]",
		Short: "Run a private cluster to try things out",
		Long: `Run a private development cluster in this process: a RabbitMQ node of its
own (from the rabbitmq-server package, in a temporary directory, on free
ports of 127.0.0.1), a mapper daemon and --agents agents serving the example
actor "echo" (and the external actors of --actors) with different tags. It
prints the broker URL and commands to try, runs until Ctrl-C, then stops
everything and removes the node's directory.

The global --url is ignored: the cluster has its own broker. Logs of the
cluster go to stderr (warn and above unless --log-level says otherwise).

` + examplesHelp,
		Example: `  nanite dev
  nanite dev --agents 5 --actors ./actors.yaml --log-level info`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if opts.Agents < 1 || opts.Agents > 50 {
				return usageErrorf("--agents must be between 1 and 50")
			}
			if runF != nil {
				return runF(cmd.Context(), opts)
			}
			return devRun(cmd.Context(), opts)
		},
	}
	fl := cmd.Flags()
	fl.IntVarP(&opts.Agents, "agents", "n", 3, "number of agents")
	fl.StringVar(&opts.ActorsFile, "actors", "", "file of external actors every agent serves too (see nanite agent --help)")
	return cmd
}

// devTags gives the agents of the dev cluster different tags.
func devTags(i int) []string {
	colors := []string{"blue", "green", "red"}
	regions := []string{"eu", "us"}
	return []string{colors[i%len(colors)], regions[i%len(regions)]}
}

func devRun(ctx context.Context, opts *DevOptions) error {
	s, err := opts.Settings()
	if err != nil {
		return err
	}
	log := s.newLogger(opts.IO.ErrOut, slog.LevelWarn)
	out := opts.IO.Out
	if missing := testenv.Missing("rabbitmq-server", "rabbitmqctl"); len(missing) > 0 {
		return fmt.Errorf("nanite dev needs RabbitMQ installed (missing %s): apt-get install -y rabbitmq-server", strings.Join(missing, ", "))
	}
	fmt.Fprintln(out, "Starting a private RabbitMQ node (about 5 s)...")
	r, err := testenv.StartRabbitMQ(ctx, testenv.RabbitOptions{Name: "dev", Management: true, Logger: log})
	if err != nil {
		if ctx.Err() != nil {
			return nil // interrupted while starting
		}
		return fmt.Errorf("start RabbitMQ: %w", err)
	}
	defer func() {
		if err := r.Close(); err != nil {
			log.Warn("stopping RabbitMQ", "err", err)
		}
		fmt.Fprintln(out, "Stopped.")
	}()
	url := r.URL()

	// Build everything first, so that a bad --actors file fails before
	// anything runs.
	m, err := nanite.NewMapper(nanite.MapperConfig{URL: url, Identity: "dev-mapper",
		ServeAgentRequests: true, ServeFailsafe: true, Logger: log})
	if err != nil {
		return err
	}
	var agents []*nanite.Agent
	for i := range opts.Agents {
		a, err := buildAgent(agentSpec{
			Identity:      fmt.Sprintf("dev-agent-%d", i+1),
			Tags:          devTags(i),
			Examples:      true,
			ActorsFile:    opts.ActorsFile,
			ShutdownGrace: 2 * time.Second,
		}, url, log)
		if err != nil {
			return err
		}
		agents = append(agents, a)
	}

	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	var wg sync.WaitGroup
	errs := make(chan error, len(agents)+1)
	run := func(name string, f func(context.Context) error) {
		wg.Go(func() {
			if err := f(runCtx); err != nil {
				errs <- fmt.Errorf("%s: %w", name, &connectionError{URL: url, Err: err})
				stop()
			}
		})
	}
	run("mapper", m.Run)
	for _, a := range agents {
		run(a.Identity(), a.Run)
	}
	defer wg.Wait()
	defer stop()

	wctx, cancel := context.WithTimeout(runCtx, 15*time.Second)
	err = m.WaitForAgents(wctx, "", len(agents))
	cancel()
	if err != nil {
		if ctx.Err() != nil {
			return nil // interrupted while starting
		}
		select {
		case e := <-errs:
			return e
		default:
		}
		return fmt.Errorf("the agents did not register: %w", err)
	}

	var b strings.Builder
	fmt.Fprintf(&b, "\nA Nanite cluster is running.\n\n")
	fmt.Fprintf(&b, "  broker      %s\n", url)
	if mu := r.ManagementURL(); mu != "" {
		fmt.Fprintf(&b, "  management  %s (guest / guest)\n", mu)
	}
	fmt.Fprintf(&b, "  mapper      %s (daemon: agent requests, failsafe queue)\n", m.Identity())
	for i, a := range agents {
		fmt.Fprintf(&b, "  agent       %s (tags %s)\n", a.Identity(), strings.Join(devTags(i), ","))
	}
	fmt.Fprintf(&b, "\nTry, in another terminal:\n\n")
	fmt.Fprintf(&b, "  export NANITE_URL='%s'\n", url)
	for _, c := range []string{
		"nanite agents --services",
		`nanite request /echo/say '"hi"'`,
		"nanite request --selector all /echo/time",
		"nanite request --tag " + devTags(0)[0] + " /echo/stream",
		"nanite request --timeout 1s /echo/slow '{\"ms\": 3000}'; echo \"exit $?\"",
		`nanite request /echo/fail '"boom"'; echo "exit $?"`,
		"nanite request --selector all --json /nanite/info",
	} {
		fmt.Fprintf(&b, "  %s\n", c)
	}
	fmt.Fprintf(&b, "\nOr without the variable: nanite request --url '%s' /echo/say '\"hi\"'\n", url)
	fmt.Fprintf(&b, "\nPress Ctrl-C to stop.\n")
	fmt.Fprint(out, b.String())

	<-runCtx.Done()
	fmt.Fprintln(out, "\nStopping...")
	stop()
	wg.Wait()
	close(errs)
	var all []error
	for e := range errs {
		all = append(all, e)
	}
	return errors.Join(all...)
}
