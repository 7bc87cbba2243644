package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/security"
	"github.com/nanite-go/nanite/testenv"
)

// DevOptions are the flags of "nanite dev".
type DevOptions struct {
	IO       IOStreams
	Settings func() (*Settings, error)

	Agents     int
	ActorsFile string
	Secure     bool
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

With --secure the cluster runs in secure mode (signed packets) with a
throwaway CA, certificates for the mapper and agents and a client
certificate, all in a temporary directory; it prints the NANITE_CERT,
NANITE_KEY and NANITE_CA to use. The agents enforce --policy if given
(reloaded on change and on SIGHUP); without it they allow every caller.

` + examplesHelp,
		Example: `  nanite dev
  nanite dev --agents 5 --actors ./actors.yaml --log-level info
  nanite dev --secure --policy policy.yaml`,
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
	fl.BoolVar(&opts.Secure, "secure", false, "secure mode with a throwaway CA (see above)")
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
	var pki *devPKI // nil: plain mode
	if opts.Secure {
		if pki, err = newDevPKI(ctx, s.Secure.Policy, log); err != nil {
			return err
		}
		defer pki.Close()
	}
	msec, err := pki.participant("dev-mapper", security.RoleMapper)
	if err != nil {
		return err
	}
	m, err := nanite.NewMapper(nanite.MapperConfig{URL: url, Identity: "dev-mapper",
		ServeAgentRequests: true, ServeFailsafe: true, Secure: msec, Logger: log})
	if err != nil {
		return err
	}
	var agents []*nanite.Agent
	for i := range opts.Agents {
		asec, err := pki.participant(fmt.Sprintf("dev-agent-%d", i+1), security.RoleAgent)
		if err != nil {
			return err
		}
		a, err := buildAgent(agentSpec{
			Identity:      fmt.Sprintf("dev-agent-%d", i+1),
			Tags:          devTags(i),
			Examples:      true,
			ActorsFile:    opts.ActorsFile,
			ShutdownGrace: 2 * time.Second,
			Secure:        asec,
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
	if pki != nil {
		fmt.Fprintf(&b, "  secure      signed packets; CA and certificates in %s (removed on exit)\n", filepath.Dir(pki.CACert))
		if p := s.Secure.Policy; p != "" {
			fmt.Fprintf(&b, "  policy      %s (reloaded on change)\n", p)
		} else {
			fmt.Fprintf(&b, "  policy      none: every caller with a certificate of the CA is allowed (see --policy)\n")
		}
	}
	fmt.Fprintf(&b, "\nTry, in another terminal:\n\n")
	fmt.Fprintf(&b, "  export NANITE_URL='%s'\n", url)
	if pki != nil {
		fmt.Fprintf(&b, "  export NANITE_CERT='%s' NANITE_KEY='%s' NANITE_CA='%s'\n", pki.ClientCert, pki.ClientKey, pki.CACert)
	}
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
	if pki == nil {
		fmt.Fprintf(&b, "\nOr without the variable: nanite request --url '%s' /echo/say '\"hi\"'\n", url)
	} else {
		fmt.Fprintf(&b, "\nOr without the variables: nanite request --url '%s' --cert '%s' --key '%s' --ca '%s' --seal /echo/say '\"hi\"'\n",
			url, pki.ClientCert, pki.ClientKey, pki.CACert)
	}
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
