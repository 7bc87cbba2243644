package main

import (
	"context"
	"log/slog"
	"time"

	"github.com/spf13/cobra"
	"mellium.im/xmpp/jid"

	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/vertebra"
)

// XMPPAgentOptions are the flags of "nanite xmpp-agent".
type XMPPAgentOptions struct {
	IO       IOStreams
	Settings func() (*Settings, error)
	Factory  *Factory

	Login      xmppFlags
	Allow      []string
	Directory  string
	Resources  []string
	TTL        time.Duration
	ActorsFile string
	NoExamples bool
}

// NewCmdXMPPAgent returns "nanite xmpp-agent". runF replaces the run
// function in tests.
func NewCmdXMPPAgent(f *Factory, runF func(context.Context, *XMPPAgentOptions) error) *cobra.Command {
	opts := &XMPPAgentOptions{IO: f.IO, Settings: f.Settings, Factory: f}
	cmd := &cobra.Command{
		Use:   "xmpp-agent --jid JID [flags]",
		Short: "Run an agent on XMPP serving the example actor and external actors",
		Long: `Run an XMPP agent: it logs in as an XMPP client (STARTTLS and SASL) and
serves the same actors as "nanite agent" as Vertebra ops (docs/xmpp.md):
"nanite call JID /echo/say hello" from any other account calls it. Its
presence shows its load; disco#info lists its services; it answers XEP-0199
pings; it reconnects when the server goes away, keeping its full JID (give
the JID a resource).

Callers are authorized by their JID (as their server authenticated it):
--allow user@domain (any resource), a full JID, '*@domain' or '*'. Without
--allow, accounts of the agent's own domain may call.

With --directory, the agent advertises its services and --resource paths
there (TTL --ttl, refreshed at half of it) and sends it its presence, so
that "nanite call --scope single|all" finds it.

` + xmppHelp + `

` + examplesHelp + `

` + exitCodesHelp,
		Example: `  nanite xmpp-agent --jid agent1@example.com/agent --password-file ~/.agent1.pw
  nanite xmpp-agent --jid agent1@site-a.test/a --password-file pw --server 127.0.0.1:5222 \
      --ca-file ca.pem --allow alice@site-a.test --directory directory.site-a.test --resource /cluster/rd00`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if opts.TTL <= 0 {
				return usageErrorf("--ttl must be positive")
			}
			if err := checkResources(opts.Resources); err != nil {
				return err
			}
			if runF != nil {
				return runF(cmd.Context(), opts)
			}
			return xmppAgentRun(cmd.Context(), opts)
		},
	}
	fl := cmd.Flags()
	opts.Login.add(fl, false)
	fl.StringArrayVar(&opts.Allow, "allow", nil, "JID allowed to call: user@domain, a full JID, '*@domain' or '*' (repeatable; default '*@' + the agent's domain)")
	fl.StringVar(&opts.Directory, "directory", "", "JID of a directory to advertise to (see nanite directory)")
	fl.StringArrayVar(&opts.Resources, "resource", nil, "resource advertised besides the services, e.g. /cluster/rd00 (repeatable)")
	fl.DurationVar(&opts.TTL, "ttl", time.Minute, "TTL of the advertisement")
	fl.StringVar(&opts.ActorsFile, "actors", "", "file of external actors (YAML or JSON, see nanite agent --help)")
	fl.BoolVar(&opts.NoExamples, "no-examples", false, `do not serve the example actor "echo"`)
	return cmd
}

func xmppAgentRun(ctx context.Context, opts *XMPPAgentOptions) error {
	s, err := opts.Settings()
	if err != nil {
		return err
	}
	log := s.newLogger(opts.IO.ErrOut, slog.LevelInfo)
	dc, err := opts.Login.dialConfig(opts.Factory)
	if err != nil {
		return err
	}
	var dir jid.JID
	if opts.Directory != "" {
		if dir, err = parseJIDArg("--directory", opts.Directory); err != nil {
			return err
		}
	}
	var actors []*nanite.Actor
	if !opts.NoExamples {
		actors = append(actors, exampleActor())
	}
	if opts.ActorsFile != "" {
		ext, err := loadExternalActors(opts.ActorsFile, log)
		if err != nil {
			return err
		}
		for _, a := range ext {
			if !opts.NoExamples && a.Name() == "echo" {
				return usageErrorf("actors file %s: the actor name \"echo\" is taken by the example actor; use --no-examples or rename it", opts.ActorsFile)
			}
		}
		actors = append(actors, ext...)
	}
	if len(actors) == 0 {
		return usageErrorf("nothing to serve: --no-examples and no --actors")
	}
	allow := opts.Allow
	if len(allow) == 0 {
		allow = []string{"*@" + dc.JID.Domainpart()}
	}
	d := nanite.NewDispatcher(actors...)
	a, err := vertebra.NewAgent(vertebra.AgentConfig{
		Dial:         dc,
		Handler:      dispatcherHandler{d},
		Authorizer:   vertebra.AllowJIDs(allow...),
		Load:         nanite.LoadAverage,
		Directory:    dir,
		Resources:    opts.Resources,
		AdvertiseTTL: opts.TTL,
		Logger:       log,
	})
	if err != nil {
		return usageErrorf("%v", err)
	}
	log.Info("xmpp agent starting", "jid", dc.JID, "server", describeServer(dc), "services", d.Services(), "allow", allow)
	if err := a.Run(ctx); err != nil {
		return wrapXMPP(err, describeServer(dc))
	}
	log.Info("xmpp agent stopped", "jid", a.JID())
	return nil
}
