package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"mellium.im/xmpp/jid"

	"github.com/nanite-go/nanite/vertebra"
)

// CallOptions are the flags and arguments of "nanite call".
type CallOptions struct {
	IO       IOStreams
	Settings func() (*Settings, error)
	Factory  *Factory

	Login      xmppFlags
	Target     string // the JID argument
	Op         string
	Payload    string
	HasPayload bool
	Scope      string
	Resources  []string
	To         []string
	Timeout    time.Duration
	JSON       bool
}

// NewCmdCall returns "nanite call". runF replaces the run function in
// tests.
func NewCmdCall(f *Factory, runF func(context.Context, *CallOptions) error) *cobra.Command {
	opts := &CallOptions{IO: f.IO, Settings: f.Settings, Factory: f}
	cmd := &cobra.Command{
		Use:   "call JID /actor/method [payload] [flags]",
		Short: "Call an op on an XMPP agent and print the results",
		Long: `Call an op over XMPP (Vertebra's protocol, docs/xmpp.md) and print its results.

With --scope direct (the default) JID is the agent (or a bridge's cluster
JID). With --scope single or all, JID is a directory ("nanite directory"):
it is asked which JIDs serve the op on the --resource paths (or --to lists
them); single tries them in random order until one accepts the op, all
sends it to every one of them and gathers the results.

` + payloadHelp + `

With --cert and --key (and --ca, which checks them as the agent will),
every op is signed with that certificate, separately for each JID it is
sent to: an agent with --policy then authorizes the certificate's name
and role as well as the JID (docs/xmpp.md).

Intermediate results are printed to stderr as they arrive, as
"[jid] key: value"; results go to stdout (with several JIDs, "jid: value"
per line); with --json one document {"op", "results": [{"jid", "data" |
"error"}], "error"}.

` + xmppHelp + `

` + exitCodesHelp,
		Example: `  nanite call agent1@example.com/agent /echo/say '"hello"'
  nanite call agent1@example.com/agent /echo/stream '{"steps": 5}'
  nanite call directory.example.com /echo/time --scope all --resource /cluster/rd00
  nanite call --timeout 1s agent1@example.com/agent /echo/slow 3000; echo "exit $?"   # 4`,
		Args: args(cobra.RangeArgs(2, 3)),
		RunE: func(cmd *cobra.Command, a []string) error {
			opts.Target, opts.Op = a[0], a[1]
			if len(a) > 2 {
				opts.Payload, opts.HasPayload = a[2], true
			}
			if !strings.HasPrefix(opts.Op, "/") {
				return usageErrorf("invalid op %q: want /actor/method", opts.Op)
			}
			switch opts.Scope {
			case vertebra.ScopeDirect, vertebra.ScopeSingle, vertebra.ScopeAll:
			default:
				return usageErrorf("unknown --scope %q: want direct, single or all", opts.Scope)
			}
			if opts.Timeout <= 0 {
				return usageErrorf("--timeout must be positive")
			}
			if err := checkResources(opts.Resources); err != nil {
				return err
			}
			if opts.Scope == vertebra.ScopeDirect && (len(opts.To) > 0 || len(opts.Resources) > 0) {
				return usageErrorf("--to and --resource need --scope single or all")
			}
			if runF != nil {
				return runF(cmd.Context(), opts)
			}
			return callRun(cmd.Context(), opts)
		},
	}
	fl := cmd.Flags()
	opts.Login.add(fl, false)
	fl.StringVar(&opts.Scope, "scope", vertebra.ScopeDirect, "direct, single or all")
	fl.StringArrayVar(&opts.Resources, "resource", nil, "with single or all: only JIDs serving this resource, e.g. /cluster/rd00 (repeatable: all of them)")
	fl.StringArrayVar(&opts.To, "to", nil, "with single or all: send to this JID instead of asking the directory (repeatable)")
	fl.DurationVarP(&opts.Timeout, "timeout", "t", 10*time.Second, "deadline of the op")
	fl.BoolVar(&opts.JSON, "json", false, "print the results as one JSON document")
	return cmd
}

func callRun(ctx context.Context, opts *CallOptions) error {
	s, err := opts.Settings()
	if err != nil {
		return err
	}
	log := s.newLogger(opts.IO.ErrOut, slog.LevelWarn)
	dc, err := opts.Login.dialConfig(opts.Factory)
	if err != nil {
		return err
	}
	target, err := parseJIDArg("JID", opts.Target)
	if err != nil {
		return err
	}
	var to []jid.JID
	for _, t := range opts.To {
		j, err := parseJIDArg("--to", t)
		if err != nil {
			return err
		}
		to = append(to, j)
	}
	var signer vertebra.Signer
	if s.Secure.Seal {
		log.Warn("nanite call does not seal payloads over XMPP (--seal ignored): they are signed only")
	}
	sec, err := s.Secure.load(secureUse{"nanite call", xmppCallerRoles, false}, log)
	if err != nil {
		return err
	}
	if sec != nil {
		signer = vertebra.IdentitySigner{Identity: sec.Identity}
	}
	ro := &RequestOptions{IO: opts.IO, Payload: opts.Payload, HasPayload: opts.HasPayload}
	payload, err := ro.payload()
	if err != nil {
		return err
	}
	server := describeServer(dc)

	ctx, cancel := context.WithTimeout(ctx, opts.Timeout)
	defer cancel()
	sess, err := vertebra.Dial(ctx, dc)
	if err != nil {
		if ctx.Err() != nil {
			return wrapXMPP(fmt.Errorf("%w: %w", vertebra.ErrDeadline, err), server)
		}
		return wrapXMPP(err, server)
	}
	ep := vertebra.NewEndpoint(vertebra.Config{Logger: log})
	defer ep.Close()
	defer vertebra.ServeSession(sess, ep)()

	req := vertebra.CallRequest{Op: opts.Op, Payload: payload, Scope: opts.Scope, Resources: opts.Resources,
		OnData: func(d vertebra.Data) {
			if d.Intermediate && !opts.JSON {
				fmt.Fprintf(opts.IO.ErrOut, "[%s] %s: %s\n", d.From, d.Key, d.Payload)
			}
		}}
	c := &vertebra.Caller{Endpoint: ep, Signer: signer}
	if opts.Scope == vertebra.ScopeDirect {
		req.To = []jid.JID{target}
	} else {
		req.To = to
		c.Directory = target
	}
	outs, err := c.Call(ctx, req)
	printOutcomes(opts.IO.Out, opts.Op, opts.Scope, outs, err, opts.JSON)
	return wrapXMPP(err, server)
}

func printOutcomes(w io.Writer, op, scope string, outs []vertebra.Outcome, err error, asJSON bool) {
	if asJSON {
		type item struct {
			JID   string            `json:"jid"`
			Data  []json.RawMessage `json:"data,omitempty"`
			Error string            `json:"error,omitempty"`
		}
		doc := struct {
			Op      string `json:"op"`
			Results []item `json:"results"`
			Error   string `json:"error,omitempty"`
		}{Op: op, Results: []item{}}
		for _, o := range outs {
			it := item{JID: o.JID.String()}
			if o.Err != nil {
				it.Error = o.Err.Error()
			} else if o.Result != nil {
				it.Data = o.Result.Data
			}
			doc.Results = append(doc.Results, it)
		}
		if err != nil {
			doc.Error = err.Error()
		}
		b, _ := json.MarshalIndent(doc, "", "  ")
		fmt.Fprintln(w, string(b))
		return
	}
	prefix := scope == vertebra.ScopeAll
	for _, o := range outs {
		if o.Result == nil {
			continue
		}
		for _, d := range o.Result.Data {
			if prefix {
				fmt.Fprintf(w, "%s: %s\n", o.JID, d)
			} else {
				fmt.Fprintf(w, "%s\n", d)
			}
		}
	}
}
