package main

import (
	"context"
	"log/slog"
	"time"

	"github.com/spf13/cobra"
	"mellium.im/xmpp/jid"

	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/security"
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
	// RequireSignature refuses unsigned ops (needs --ca).
	RequireSignature bool
	PolicyWatch      time.Duration
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

With --policy FILE (the security policy of "nanite agent", docs/security.md)
the policy decides instead of --allow: its "jid:" caller patterns match the
caller's JID (bare JID for a pattern without '/'), and, when the op carries
a signature ("nanite call --cert --key") that verifies against --ca (and
--revoked), its name and "role:" patterns match the signer's certificate.
An op with a bad, forged, expired, revoked or replayed signature is refused
(nack not_authorized) whatever the policy says; --require-signature also
refuses unsigned ops. The policy is reloaded on SIGHUP and when the file
changes. --cert and --key are optional for the agent (it signs nothing); if
given, they must be an agent certificate issued by --ca.

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
	fl.BoolVar(&opts.RequireSignature, "require-signature", false, "refuse ops without a valid signature (needs --ca)")
	fl.DurationVar(&opts.PolicyWatch, "policy-watch", defaultPolicyWatch, "how often to look for a change of --policy (0: only on SIGHUP)")
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
	sec, err := loadXMPPAgentSecurity(s.Secure, opts, log)
	if err != nil {
		return err
	}
	allow := opts.Allow
	var authz vertebra.Authorizer
	if sec != nil && sec.policy != nil {
		authz = vertebra.PolicyAuthorizer{Policy: sec.policy}
		allow = nil
	} else {
		if len(allow) == 0 {
			allow = []string{"*@" + dc.JID.Domainpart()}
		}
		authz = vertebra.AllowJIDs(allow...)
	}
	var verifier vertebra.Verifier
	if sec != nil {
		if sec.Verifier != nil {
			verifier = vertebra.IdentityVerifier{Verifier: sec.Verifier, Roles: xmppCallerRoles}
		}
		defer sec.startReloads(ctx, opts.PolicyWatch, log)()
	}
	d := nanite.NewDispatcher(actors...)
	a, err := vertebra.NewAgent(vertebra.AgentConfig{
		Dial:             dc,
		Handler:          dispatcherHandler{d},
		Authorizer:       authz,
		Verifier:         verifier,
		RequireSignature: opts.RequireSignature,
		Load:             nanite.LoadAverage,
		Directory:        dir,
		Resources:        opts.Resources,
		AdvertiseTTL:     opts.TTL,
		Logger:           log,
	})
	if err != nil {
		return usageErrorf("%v", err)
	}
	attrs := []any{"jid", dc.JID, "server", describeServer(dc), "services", d.Services()}
	if allow != nil {
		attrs = append(attrs, "allow", allow)
	}
	if sec != nil {
		if sec.policy != nil {
			attrs = append(attrs, "policy", sec.policy.Path(), "rules", len(sec.policy.Current().Rules()))
		}
		if sec.Verifier != nil {
			attrs = append(attrs, "ca", s.Secure.CA, "require_signature", opts.RequireSignature)
		}
	}
	log.Info("xmpp agent starting", attrs...)
	if err := a.Run(ctx); err != nil {
		return wrapXMPP(err, describeServer(dc))
	}
	log.Info("xmpp agent stopped", "jid", a.JID())
	return nil
}

// xmppCallerRoles are the certificate roles whose signatures an XMPP agent
// accepts on ops: clients, mappers and bridges.
var xmppCallerRoles = []security.Role{security.RoleClient, security.RoleMapper, security.RoleBridge}

// loadXMPPAgentSecurity loads the secure settings of "nanite xmpp-agent":
// --policy (authorization by JID and signer), --ca and --revoked (signature
// checks). Unlike an AMQP agent, an XMPP agent needs no certificate of its
// own (it signs nothing): with --cert and --key it loads them as "nanite
// agent" does (checked against --ca), without them it takes --policy, --ca
// and --revoked alone. nil when none is given.
func loadXMPPAgentSecurity(s SecureSettings, opts *XMPPAgentOptions, log *slog.Logger) (*secureMode, error) {
	if s.Seal {
		return nil, usageErrorf("--seal is not supported by nanite xmpp-agent")
	}
	if s.Policy != "" && len(opts.Allow) > 0 {
		return nil, usageErrorf("--allow and --policy exclude each other: write the JIDs in the policy (callers: [\"jid:user@domain\"])")
	}
	if opts.RequireSignature && s.CA == "" {
		return nil, usageErrorf("--require-signature needs --ca, the CA whose certificates may sign ops")
	}
	if s.Enabled() {
		return s.load(secureUse{"nanite xmpp-agent", []security.Role{security.RoleAgent}, true}, log)
	}
	if s.Policy == "" && s.CA == "" && s.Revoked == "" && s.ReplayWindow == 0 {
		return nil, nil
	}
	if s.CA == "" && (s.Revoked != "" || s.ReplayWindow != 0) {
		return nil, usageErrorf("--revoked and --replay-window check signatures: give --ca too")
	}
	m := &secureMode{Secure: &nanite.Secure{}, settings: s}
	if s.CA != "" {
		roots, err := security.LoadRoots(s.CA)
		if err != nil {
			return nil, usageErrorf("--ca %s: %v", s.CA, err)
		}
		if s.Revoked != "" {
			if m.revoked, err = security.LoadRevocationList(s.Revoked); err != nil {
				return nil, usageErrorf("--revoked %s: %v", s.Revoked, err)
			}
		}
		v, err := security.NewVerifier(security.VerifierConfig{Roots: roots, Revoked: m.revoked, Window: s.ReplayWindow, Logger: log})
		if err != nil {
			return nil, usageErrorf("--ca: %v", err)
		}
		m.Verifier = v
	}
	if s.Policy != "" {
		h, err := security.NewPolicyHolder(s.Policy, log)
		if err != nil {
			return nil, usageErrorf("--policy: %v", err)
		}
		m.policy = h
	}
	return m, nil
}
