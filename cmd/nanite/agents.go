package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/nanite-go/nanite/nanite"
)

// AgentsOptions are the flags of "nanite agents".
type AgentsOptions struct {
	IO       IOStreams
	Settings func() (*Settings, error)
	Now      func() time.Time

	Wait     time.Duration
	Services bool
	JSON     bool
}

// NewCmdAgents returns "nanite agents". runF replaces the run function in
// tests.
func NewCmdAgents(f *Factory, runF func(context.Context, *AgentsOptions) error) *cobra.Command {
	opts := &AgentsOptions{IO: f.IO, Settings: f.Settings, Now: time.Now}
	cmd := &cobra.Command{
		Use:   "agents [flags]",
		Short: "List the agents of the cluster",
		Long: `List the agents of the cluster with their services, tags, load, requests in
flight and when they were last heard from.

An embedded mapper asks every agent to register again when it starts, and
listens for --wait: agents that do not answer within it are not listed.
SERVICES counts the services of each agent without the built-in /nanite/*
introspection services; --services lists them. LOAD is what the agent
reports (its machine's one-minute load average by default).

With --json the mapper's full view is printed: a JSON array of
{"identity", "queue", "services", "tags", "status", "in_flight",
"mapper_in_flight", "version", "last_seen", "registered",
"heartbeat_interval"}.`,
		Example: `  nanite agents
  nanite agents --services
  nanite agents --json | jq -r '.[].identity'
  nanite agents --wait 5s --url amqp://app:secret@rabbit:5672/app`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if opts.Wait <= 0 {
				return usageErrorf("--wait must be positive")
			}
			if runF != nil {
				return runF(cmd.Context(), opts)
			}
			return agentsRun(cmd.Context(), opts)
		},
	}
	fl := cmd.Flags()
	fl.DurationVarP(&opts.Wait, "wait", "w", 1500*time.Millisecond, "how long to listen for registrations")
	fl.BoolVar(&opts.Services, "services", false, "list the services instead of counting them")
	fl.BoolVar(&opts.JSON, "json", false, "print the agents as JSON")
	return cmd
}

func agentsRun(ctx context.Context, opts *AgentsOptions) error {
	s, err := opts.Settings()
	if err != nil {
		return err
	}
	log := s.newLogger(opts.IO.ErrOut, slog.LevelWarn)
	sec, err := s.Secure.load(secureForClient, log)
	if err != nil {
		return err
	}
	c, err := openSecureCluster(ctx, s.URL, s.TLS.Config, sec.nanite(), log)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.gather(ctx, opts.Wait); err != nil {
		return err
	}
	agents := c.m.Agents()
	if len(agents) == 0 {
		// An empty cluster, or credentials the broker has yet to refuse.
		if err := c.explain(ctx, nanite.ErrNoAgent); !errors.Is(err, nanite.ErrNoAgent) {
			return err
		}
	}
	if opts.JSON {
		b, err := json.MarshalIndent(agents, "", "  ")
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(opts.IO.Out, "%s\n", b)
		return err
	}
	if len(agents) == 0 {
		fmt.Fprintf(opts.IO.ErrOut, "no agents registered within %v at %s\n", opts.Wait, redactURL(s.URL))
		return nil
	}
	return writeAgentsTable(opts.IO.Out, agents, opts.Now(), opts.Services)
}

// writeAgentsTable prints the agents as an aligned table.
func writeAgentsTable(w io.Writer, agents []nanite.AgentState, now time.Time, listServices bool) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "IDENTITY\tSERVICES\tTAGS\tLOAD\tIN-FLIGHT\tLAST SEEN\tVERSION")
	for _, a := range agents {
		var svcs []string
		for _, s := range a.Services {
			if !strings.HasPrefix(s.Name, "/"+nanite.BuiltinActor+"/") {
				svcs = append(svcs, s.Name)
			}
		}
		services := strconv.Itoa(len(svcs))
		if listServices {
			services = strings.Join(svcs, ",")
			if services == "" {
				services = "-"
			}
		}
		tags := strings.Join(a.Tags, ",")
		if tags == "" {
			tags = "-"
		}
		version := a.Version
		if version == "" {
			version = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%.2f\t%d\t%s\t%s\n", a.Identity, services, tags, a.Status,
			a.InFlight, ago(now.Sub(a.LastSeen)), version)
	}
	return tw.Flush()
}

// ago formats how long ago something happened, "0.4s ago", "3m12s ago".
func ago(d time.Duration) string {
	switch {
	case d < 0:
		d = 0
	case d >= time.Minute:
		return d.Round(time.Second).String() + " ago"
	}
	return strconv.FormatFloat(d.Seconds(), 'f', 1, 64) + "s ago"
}
