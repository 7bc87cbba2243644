package main

import (
	"context"
	"encoding/json"
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/spf13/cobra"

	"github.com/nanite-go/nanite/nanite"
)

// VersionOptions are the flags of "nanite version".
type VersionOptions struct {
	IO   IOStreams
	JSON bool
}

// NewCmdVersion returns "nanite version". runF replaces the run function in
// tests.
func NewCmdVersion(f *Factory, runF func(context.Context, *VersionOptions) error) *cobra.Command {
	opts := &VersionOptions{IO: f.IO}
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Long: `Print the version of this implementation, the version of the wire protocol
it speaks (agents and mappers accept packets of the same protocol version),
the Go version it was built with and, when known, the source revision.`,
		Example: `  nanite version
  nanite version --json`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if runF != nil {
				return runF(cmd.Context(), opts)
			}
			return versionRun(opts)
		},
	}
	cmd.Flags().BoolVar(&opts.JSON, "json", false, "print as JSON")
	return cmd
}

type versionInfo struct {
	Version  string `json:"version"`
	Protocol int    `json:"protocol"`
	Go       string `json:"go"`
	Platform string `json:"platform"`
	Revision string `json:"revision,omitempty"`
}

func versionRun(opts *VersionOptions) error {
	v := versionInfo{Version: nanite.Version, Protocol: nanite.ProtocolVersion,
		Go: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				v.Revision = s.Value
			}
		}
	}
	if opts.JSON {
		b, err := json.MarshalIndent(v, "", "  ")
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(opts.IO.Out, "%s\n", b)
		return err
	}
	fmt.Fprintf(opts.IO.Out, "nanite %s\nprotocol %d\n%s %s\n", v.Version, v.Protocol, v.Go, v.Platform)
	if v.Revision != "" {
		fmt.Fprintf(opts.IO.Out, "revision %s\n", v.Revision)
	}
	return nil
}
