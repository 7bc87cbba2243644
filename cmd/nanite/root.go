package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// IOStreams are the standard streams of a command.
type IOStreams struct {
	In     io.Reader
	Out    io.Writer
	ErrOut io.Writer
}

// Factory carries what every command shares: the streams, the environment
// and, once the root command has parsed its flags, the global settings.
type Factory struct {
	IO        IOStreams
	LookupEnv func(string) (string, bool)
	ReadFile  func(string) ([]byte, error)

	global *pflag.FlagSet // the root's persistent flags; nil outside the root
}

func newFactory() *Factory {
	return &Factory{
		IO:        IOStreams{In: os.Stdin, Out: os.Stdout, ErrOut: os.Stderr},
		LookupEnv: os.LookupEnv,
		ReadFile:  os.ReadFile,
	}
}

// Settings resolves the global settings (see resolveSettings).
func (f *Factory) Settings() (*Settings, error) {
	in := settingsInput{Flags: map[string]string{}, LookupEnv: f.LookupEnv, ReadFile: f.ReadFile}
	if in.ReadFile == nil {
		in.ReadFile = os.ReadFile
	}
	if f.global != nil {
		// Cobra parses the persistent flags into the subcommand's flag set,
		// so only the shared Flag's Changed says whether one was given.
		f.global.VisitAll(func(fl *pflag.Flag) {
			if fl.Changed {
				in.Flags[fl.Name] = fl.Value.String()
			}
		})
	}
	return resolveSettings(in)
}

// NewCmdRoot returns the nanite command with all its subcommands.
func NewCmdRoot(f *Factory) *cobra.Command {
	root := &cobra.Command{
		Use:   "nanite <command> [flags]",
		Short: "Run and talk to Nanite agent clusters over RabbitMQ",
		Long: `nanite runs and talks to Nanite clusters: agents host actors whose methods
are services named /actor/method; mappers know the cluster and send each
request to the least-loaded agent offering the service (or to all of them,
a random one, round-robin, one by identity, filtered by tags). One RabbitMQ
vhost is one cluster.

` + configHelp + `

` + tlsHelp + `

` + secureHelp + `

` + exitCodesHelp,
		Example: `  # try it out: a private broker, a mapper and three agents
  nanite dev

  # in another terminal
  export NANITE_URL=amqp://guest:guest@127.0.0.1:5672/
  nanite agents
  nanite request /echo/say '"hello"'`,
		Args:          cobra.ArbitraryArgs,
		SilenceErrors: true,
		SilenceUsage:  true,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				msg := fmt.Sprintf("unknown command %q", args[0])
				if s := cmd.SuggestionsFor(args[0]); len(s) > 0 {
					msg += fmt.Sprintf("; did you mean %q?", s[0])
				}
				return usageErrorf("%s", msg)
			}
			return cmd.Help()
		},
	}
	pf := root.PersistentFlags()
	pf.String("url", "", "broker and vhost, amqp://user:pass@host:port/vhost (env NANITE_URL; default "+DefaultURL+")")
	pf.String("config", "", "config file, YAML or JSON (env NANITE_CONFIG; default $XDG_CONFIG_HOME/nanite/config.yaml if it exists)")
	pf.String("log-level", "", "debug, info, warn or error (env NANITE_LOG_LEVEL; default info for daemons, warn otherwise)")
	pf.String("log-format", "", "text or json (env NANITE_LOG_FORMAT; default text)")
	addTLSFlags(pf)
	addSecureFlags(pf)
	f.global = pf
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return &usageError{err} })

	root.AddCommand(
		NewCmdAgent(f, nil),
		NewCmdMapper(f, nil),
		NewCmdRequest(f, nil),
		NewCmdPush(f, nil),
		NewCmdAgents(f, nil),
		NewCmdVersion(f, nil),
		NewCmdDev(f, nil),
		NewCmdXMPPAgent(f, nil),
		NewCmdCall(f, nil),
		NewCmdDirectory(f, nil),
		NewCmdVhost(f, nil),
		NewCmdPKI(f),
		NewCmdPolicy(f, nil),
		NewCmdBridge(f, nil),
	)
	// Commands defined by other files of this package: add one constructor
	// per line. (bench.go registers newBenchCmd here.)
	for _, newCmd := range []func() *cobra.Command{
		newBenchCmd,
		newBenchXMPPCmd,
		newBenchBridgeCmd,
	} {
		root.AddCommand(newCmd())
	}
	return root
}

// execute runs the command line args and returns the exit code. Errors are
// printed here, once.
func execute(ctx context.Context, f *Factory, args []string) int {
	root := NewCmdRoot(f)
	root.SetArgs(args)
	root.SetIn(f.IO.In)
	root.SetOut(f.IO.Out)
	root.SetErr(f.IO.ErrOut)
	cmd, err := root.ExecuteContextC(ctx)
	if err != nil {
		msg := err.Error()
		if !strings.HasPrefix(msg, "nanite") {
			msg = "nanite: " + msg
		}
		fmt.Fprintln(f.IO.ErrOut, msg)
		if exitCode(err) == exitUsage && cmd != nil {
			fmt.Fprintf(f.IO.ErrOut, "Run '%s --help' for usage.\n", cmd.CommandPath())
		}
	}
	return exitCode(err)
}

// args wraps a cobra argument validator so that its errors are usage
// errors (exit code 2).
func args(v cobra.PositionalArgs) cobra.PositionalArgs {
	return func(cmd *cobra.Command, a []string) error {
		if err := v(cmd, a); err != nil {
			return &usageError{err}
		}
		return nil
	}
}
