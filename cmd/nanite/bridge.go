package main

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/spf13/cobra"
	"mellium.im/xmpp/jid"

	"github.com/nanite-go/nanite/bridge"
)

// BridgeOptions are the options of "nanite bridge".
type BridgeOptions struct {
	IO       IOStreams
	Settings func() (*Settings, error)
	Config   string
	Check    bool
}

// NewCmdBridge returns "nanite bridge". runF replaces the run function in
// tests.
func NewCmdBridge(f *Factory, runF func(context.Context, *BridgeOptions) error) *cobra.Command {
	opts := &BridgeOptions{IO: f.IO, Settings: f.Settings}
	cmd := &cobra.Command{
		Use:   "bridge --config FILE [--check]",
		Short: "Relay requests between Nanite clusters and XMPP",
		Long: `Run the bridge: an XMPP component at its domain and a mapper in each
configured cluster (vhost). Ops sent to a cluster JID (<escaped vhost>@<domain>)
or an agent JID (<cluster JID>/<agent>) are checked against the cluster's
export rules, the hop limit and the policy, and relayed as Nanite requests.
The config file is documented in docs/bridge.md; --check only validates it.`,
		Example: `  nanite bridge --config /etc/nanite/bridge.yaml
  nanite bridge --config bridge.yaml --check`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if opts.Config == "" {
				return usageErrorf("--config is required")
			}
			if runF != nil {
				return runF(cmd.Context(), opts)
			}
			return bridgeRun(cmd.Context(), opts)
		},
	}
	cmd.Flags().StringVar(&opts.Config, "config", "", "the bridge's config file (YAML)")
	cmd.Flags().BoolVar(&opts.Check, "check", false, "validate the config file and exit")
	return cmd
}

func bridgeRun(ctx context.Context, opts *BridgeOptions) error {
	s, err := opts.Settings()
	if err != nil {
		return err
	}
	log := s.newLogger(opts.IO.ErrOut, slog.LevelInfo)
	cfg, err := bridge.LoadConfig(opts.Config)
	if err != nil {
		return err
	}
	if opts.Check {
		b, err := bridge.New(cfg, bridge.Options{Logger: log})
		if err != nil {
			return err
		}
		fmt.Fprintf(opts.IO.Out, "%s: ok (%d clusters)\n", opts.Config, len(cfg.Clusters))
		jids := b.ClusterJIDs()
		for _, cc := range cfg.Clusters {
			fmt.Fprintf(opts.IO.Out, "  cluster %s: %s\n", cc.Name, jids[cc.Name])
			for _, im := range cc.Imports {
				if j, err := jid.Parse(im.From); err == nil {
					fmt.Fprintf(opts.IO.Out, "    import %s: proxy agent %s\n", im.From, bridge.ProxyIdentity(j))
				}
			}
		}
		return nil
	}
	return bridge.Serve(ctx, cfg, bridge.Options{Logger: log})
}
