package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"text/tabwriter"
	"unicode"

	"github.com/spf13/cobra"

	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/security"
)

// PolicyCheckOptions are the flags and arguments of "nanite policy check".
type PolicyCheckOptions struct {
	IO       IOStreams
	Settings func() (*Settings, error)

	Caller  security.Caller // from CALLER, --role and --jid
	Service string          // normalized
	Tags    []string        // the agent's tags
	JSON    bool
}

// deniedError is the policy's "deny" (exit code 7).
type deniedError struct{ d security.Decision }

func (e *deniedError) Error() string {
	if e.d.Index == 0 {
		return "the policy denies the call: no rule matches (default deny)"
	}
	return "the policy denies the call: rule " + ruleLabel(e.d)
}

// NewCmdPolicy returns "nanite policy" with its subcommands. runF replaces
// the run function of "policy check" in tests.
func NewCmdPolicy(f *Factory, runF func(context.Context, *PolicyCheckOptions) error) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "policy <command>",
		Short: "Test and validate authorization policies",
		Long: `Test and validate the authorization policy that agents enforce in secure mode
(--policy FILE, see docs/security.md): rules in order, the first that matches
decides, and a call no rule matches is denied.

  rules:
    - name: ops                      # optional; decisions name it
      effect: allow                  # allow | deny
      callers: ["ops-*", "role:client", "jid:*@site-b.example"]
      services: ["/ops/*"]           # exact, glob ('*' crosses '/') or "*"
      tags: ["env:prod"]             # optional: the agent must carry all of them

The policy file is --policy, else NANITE_POLICY, else the config file's
secure.policy.`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	cmd.AddCommand(newCmdPolicyCheck(f, runF), newCmdPolicyValidate(f))
	return cmd
}

func newCmdPolicyCheck(f *Factory, runF func(context.Context, *PolicyCheckOptions) error) *cobra.Command {
	opts := &PolicyCheckOptions{IO: f.IO, Settings: f.Settings}
	var role, jid string
	cmd := &cobra.Command{
		Use:   "check CALLER SERVICE [flags]",
		Short: "Say whether the policy lets a caller call a service, and which rule decides",
		Long: `Say whether the policy allows CALLER to call SERVICE on an agent carrying the
--tag tags, as an agent would decide, and which rule decided: it prints
"allow" or "deny", the rule and the reason.

CALLER is a certificate name (give its role with --role: without it, rules
that name a role do not match), or jid:JID for an XMPP caller relayed by the
bridge. SERVICE is /actor/method.

Exit codes: 0 allow, 7 deny, 2 a bad argument or an invalid policy file
(the error names the rule and field).`,
		Example: `  nanite policy check --policy policy.yaml ops-1 /ops/restart --role client
  nanite policy check web-3 /db/drop --role agent --tag env:prod; echo "exit $?"   # 7 when denied
  nanite policy check jid:alice@site-b.example /ops/status --json`,
		Args: args(cobra.ExactArgs(2)),
		RunE: func(cmd *cobra.Command, a []string) error {
			c, err := parseCaller(a[0], role, jid)
			if err != nil {
				return err
			}
			svc, err := nanite.NormalizeService(a[1])
			if err != nil {
				return &usageError{err}
			}
			opts.Caller, opts.Service, opts.Tags = c, svc, cleanTags(opts.Tags)
			if runF != nil {
				return runF(cmd.Context(), opts)
			}
			return policyCheckRun(opts)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&role, "role", "", "the caller's role: agent, mapper, bridge or client")
	fl.StringVar(&jid, "jid", "", "the caller's JID, as the bridge asserts it")
	fl.StringArrayVar(&opts.Tags, "tag", nil, "a tag of the agent called (repeatable)")
	fl.BoolVar(&opts.JSON, "json", false, "print the decision as JSON")
	return cmd
}

// parseCaller builds the caller of "policy check" from its arguments.
func parseCaller(arg, role, jid string) (security.Caller, error) {
	var c security.Caller
	if j, ok := strings.CutPrefix(arg, "jid:"); ok {
		if jid != "" && jid != j {
			return c, usageErrorf("CALLER jid:%s and --jid %s disagree", j, jid)
		}
		jid = j
	} else {
		if !security.ValidName(arg) {
			return c, usageErrorf("invalid caller %q: a certificate name (1 to 128 letters, digits, '.', '_', ':' or '-') or jid:JID", arg)
		}
		c.Name = arg
	}
	if strings.ContainsFunc(jid, unicode.IsSpace) {
		return c, usageErrorf("invalid JID %q", jid)
	}
	c.JID = jid
	if role != "" {
		r, err := security.ParseRole(role)
		if err != nil {
			return c, &usageError{err}
		}
		c.Role = r
	}
	return c, nil
}

// policyFile returns the policy file named by the settings.
func policyFile(settings func() (*Settings, error)) (string, error) {
	s, err := settings()
	if err != nil {
		return "", err
	}
	if s.Secure.Policy == "" {
		return "", usageErrorf("no policy file: give --policy FILE (or %s, or secure.policy in the config file)", envPolicy)
	}
	return s.Secure.Policy, nil
}

// loadPolicyFile reads a policy; an invalid one is a usage error (exit 2)
// whose message names the rule and field.
func loadPolicyFile(path string) (*security.Policy, error) {
	p, err := security.LoadPolicy(path)
	if err != nil {
		return nil, &usageError{err} // names the file, the rule and the field
	}
	return p, nil
}

// ruleLabel names the deciding rule: `"ops" (#2)`, "#3" (a rule without
// a name) or "default deny" (no rule matched).
func ruleLabel(d security.Decision) string {
	if d.Index == 0 || d.Rule == fmt.Sprintf("#%d", d.Index) {
		return d.Rule
	}
	return fmt.Sprintf("%q (#%d)", d.Rule, d.Index)
}

type callerJSON struct {
	Name string `json:"name,omitempty"`
	Role string `json:"role,omitempty"`
	JID  string `json:"jid,omitempty"`
}

type policyDecisionJSON struct {
	Decision string     `json:"decision"` // "allow" or "deny"
	Rule     string     `json:"rule"`     // name, "#N" or "default deny"
	Index    int        `json:"index"`    // 1-based; 0 for default deny
	Reason   string     `json:"reason"`
	Caller   callerJSON `json:"caller"`
	Service  string     `json:"service"`
	Tags     []string   `json:"tags"`
	Policy   string     `json:"policy"`
}

func policyCheckRun(opts *PolicyCheckOptions) error {
	path, err := policyFile(opts.Settings)
	if err != nil {
		return err
	}
	p, err := loadPolicyFile(path)
	if err != nil {
		return err
	}
	d := p.Decide(opts.Caller, opts.Service, opts.Tags)
	verdict := "deny"
	if d.Allowed {
		verdict = "allow"
	}
	if opts.JSON {
		tags := opts.Tags
		if tags == nil {
			tags = []string{}
		}
		b, err := json.MarshalIndent(policyDecisionJSON{Decision: verdict, Rule: d.Rule, Index: d.Index, Reason: d.Reason,
			Caller: callerJSON{opts.Caller.Name, string(opts.Caller.Role), opts.Caller.JID}, Service: opts.Service, Tags: tags, Policy: path}, "", "  ")
		if err != nil {
			return err
		}
		fmt.Fprintf(opts.IO.Out, "%s\n", b)
	} else {
		fmt.Fprintf(opts.IO.Out, "%s\nrule:   %s\nreason: %s\n", verdict, ruleLabel(d), d.Reason)
	}
	if !d.Allowed {
		return &deniedError{d}
	}
	return nil
}

func newCmdPolicyValidate(f *Factory) *cobra.Command {
	return &cobra.Command{
		Use:   "validate [FILE]",
		Short: "Check a policy file and list its rules",
		Long: `Check a policy file (FILE, else --policy, NANITE_POLICY or the config file's
secure.policy) and list its rules in the order they are tried. An invalid
file exits with code 2 and an error naming the rule and field.`,
		Example: `  nanite policy validate /etc/nanite/policy.yaml`,
		Args:    args(cobra.MaximumNArgs(1)),
		RunE: func(cmd *cobra.Command, a []string) error {
			var path string
			if len(a) == 1 {
				path = a[0]
			} else {
				var err error
				if path, err = policyFile(f.Settings); err != nil {
					return err
				}
			}
			p, err := loadPolicyFile(path)
			if err != nil {
				return err
			}
			rules := p.Rules()
			fmt.Fprintf(f.IO.Out, "%s: valid, %d rules (tried in order, the first match decides; no match: deny)\n", path, len(rules))
			tw := tabwriter.NewWriter(f.IO.Out, 0, 4, 2, ' ', 0)
			for i, r := range rules {
				name := r.Name
				if name == "" {
					name = "-"
				}
				tags := strings.Join(r.Tags, ",")
				if tags == "" {
					tags = "-"
				}
				fmt.Fprintf(tw, "  #%d\t%s\t%s\tcallers %s\tservices %s\ttags %s\n", i+1, name, r.Effect,
					strings.Join(r.Callers, ","), strings.Join(r.Services, ","), tags)
			}
			return tw.Flush()
		},
	}
}
