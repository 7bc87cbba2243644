package main

import (
	"context"
	"log/slog"
	"time"

	"github.com/spf13/cobra"
	"mellium.im/xmpp/mux"

	"github.com/nanite-go/nanite/vertebra"
)

// DirectoryOptions are the flags of "nanite directory".
type DirectoryOptions struct {
	IO       IOStreams
	Settings func() (*Settings, error)
	Factory  *Factory

	Login  xmppFlags
	MaxTTL time.Duration
}

// NewCmdDirectory returns "nanite directory". runF replaces the run
// function in tests.
func NewCmdDirectory(f *Factory, runF func(context.Context, *DirectoryOptions) error) *cobra.Command {
	opts := &DirectoryOptions{IO: f.IO, Settings: f.Settings, Factory: f}
	cmd := &cobra.Command{
		Use:   "directory (--component DOMAIN --secret-file FILE --server HOST:PORT | --jid JID ...) [flags]",
		Short: "Run a resource directory (Herault) on XMPP",
		Long: `Run a directory of resources over XMPP, as Vertebra's Herault: agents
advertise the ops and resources they serve with a TTL (/security/advertise),
callers discover the JIDs that serve an op on resources (/security/discover).
Resources match by path segments: "/cluster" covers "/cluster/rd00" and
asking for "/cluster" finds the agents of "/cluster/rd00"; several resources
must all match; entries expire after their TTL, TTL 0 withdraws them, and an
agent that goes offline (its directed presence turns unavailable) is
forgotten. The ops' arguments are documented in docs/xmpp.md.

It runs as an external component (--component, the usual way: any JID of
the domain reaches it) or logs in as a client (--jid).

` + xmppHelp + `
  --component DOMAIN --secret-file FILE   NANITE_XMPP_SECRET   XEP-0114 instead of a client`,
		Example: `  nanite directory --component directory.example.com --secret-file dir.secret --server 127.0.0.1:5347
  nanite directory --jid directory@example.com/herault --password-file dir.pw`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if opts.MaxTTL <= 0 {
				return usageErrorf("--max-ttl must be positive")
			}
			if runF != nil {
				return runF(cmd.Context(), opts)
			}
			return directoryRun(cmd.Context(), opts)
		},
	}
	fl := cmd.Flags()
	opts.Login.add(fl, true)
	fl.DurationVar(&opts.MaxTTL, "max-ttl", 24*time.Hour, "longest TTL accepted")
	return cmd
}

func directoryRun(ctx context.Context, opts *DirectoryOptions) error {
	s, err := opts.Settings()
	if err != nil {
		return err
	}
	log := s.newLogger(opts.IO.ErrOut, slog.LevelInfo)
	dc, err := opts.Login.dialConfig(opts.Factory)
	if err != nil {
		return err
	}
	dir := vertebra.NewDirectory(vertebra.DirectoryConfig{MaxTTL: opts.MaxTTL})
	ep := vertebra.NewEndpoint(vertebra.Config{Handler: dir, Logger: log,
		Features: func() []string {
			return []string{vertebra.ServiceFeature(vertebra.OpAdvertise), vertebra.ServiceFeature(vertebra.OpDiscover)}
		}})
	defer ep.Close()
	conn := vertebra.NewConn(vertebra.ConnConfig{Dial: dc, Endpoint: ep, Logger: log,
		Options: []mux.Option{dir.HandlePresence()}})
	log.Info("directory starting", "jid", dc.JID, "server", describeServer(dc), "component", dc.IsComponent())
	if err := conn.Run(ctx); err != nil {
		return wrapXMPP(err, describeServer(dc))
	}
	log.Info("directory stopped")
	return nil
}
