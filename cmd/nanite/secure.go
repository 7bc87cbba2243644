package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/security"
)

// Environment variables of the secure-mode settings.
const (
	envCert         = "NANITE_CERT"
	envKey          = "NANITE_KEY"
	envCA           = "NANITE_CA"
	envRevoked      = "NANITE_REVOKED"
	envPolicy       = "NANITE_POLICY"
	envSeal         = "NANITE_SEAL"
	envReplayWindow = "NANITE_REPLAY_WINDOW"
)

// secureHelp documents the secure-mode settings in the root command's
// --help.
const secureHelp = `Secure mode (signed packets; see docs/security.md and "nanite pki --help"):
  --cert FILE, --key FILE  this participant's certificate and key (nanite pki issue);
                           giving them turns secure mode on (env NANITE_CERT, NANITE_KEY)
  --ca FILE                the application CA's certificate, to verify everyone else
                           (env NANITE_CA; required in secure mode)
  --revoked FILE           revocation list, lines "serial HEX" or "name NAME"
                           (env NANITE_REVOKED)
  --policy FILE            agents: authorization policy, default deny (env NANITE_POLICY;
                           without it every caller with a valid certificate is allowed)
  --seal                   requesters and mappers: seal payloads to the agent, so that
                           neither the broker nor a bridge can read them (env NANITE_SEAL)
  --replay-window D        accept packets signed at most D before or after this clock
                           (env NANITE_REPLAY_WINDOW; default 60s)
  In secure mode an agent's or mapper's identity is its certificate's name
  (leave --identity out); agents need an agent certificate, mapper daemons a
  mapper one, request, push and agents a client (or mapper) one. Agents reload
  --policy on SIGHUP and when the file changes, and agents and mapper daemons
  reload --revoked on SIGHUP; a bad file keeps the previous one. Each setting is
  taken from the flag, else the environment, else the config file:

    secure:
      cert: agent-1.crt      # relative to the config file
      key: agent-1.key
      ca: ca.crt
      revoked: revoked.txt
      policy: policy.yaml
      seal: true
      replay_window: 60s`

// SecureFileConfig is the secure section of the config file.
type SecureFileConfig struct {
	Cert         string   `json:"cert"`
	Key          string   `json:"key"`
	CA           string   `json:"ca"`
	Revoked      string   `json:"revoked"`
	Policy       string   `json:"policy"`
	Seal         bool     `json:"seal"`
	ReplayWindow duration `json:"replay_window"`
}

// absPaths makes the file names of the section absolute with abs.
func (c SecureFileConfig) absPaths(abs func(string) string) SecureFileConfig {
	c.Cert, c.Key, c.CA, c.Revoked, c.Policy = abs(c.Cert), abs(c.Key), abs(c.CA), abs(c.Revoked), abs(c.Policy)
	return c
}

// SecureSettings are the resolved secure-mode settings: file names and
// options, nothing read yet (see load).
type SecureSettings struct {
	Cert, Key    string
	CA           string
	Revoked      string
	Policy       string
	Seal         bool
	ReplayWindow time.Duration // 0: security.DefaultWindow
}

// Enabled reports whether secure mode is on: a certificate and key are
// given.
func (s SecureSettings) Enabled() bool { return s.Cert != "" && s.Key != "" }

// addSecureFlags adds the secure-mode flags to the root's persistent flags.
func addSecureFlags(pf *pflag.FlagSet) {
	pf.String("cert", "", "this participant's certificate, turns secure mode on (env NANITE_CERT)")
	pf.String("key", "", "the key file of --cert (env NANITE_KEY)")
	pf.String("ca", "", "the application CA's certificate, to verify others in secure mode (env NANITE_CA)")
	pf.String("revoked", "", "revocation list file, secure mode (env NANITE_REVOKED)")
	pf.String("policy", "", "authorization policy file of agents, secure mode (env NANITE_POLICY)")
	pf.Bool("seal", false, "seal request payloads to the agent, secure mode (env NANITE_SEAL)")
	pf.Duration("replay-window", 0, "accept signed packets at most this far from now, both ways (env NANITE_REPLAY_WINDOW; default 60s)")
}

// resolveSecure applies flag > environment > config file > default to the
// secure-mode settings. It reads no file: commands load what they need
// (SecureSettings.load), so that a config file shared by agents and
// requesters works for both.
func resolveSecure(in settingsInput, file SecureFileConfig) (SecureSettings, error) {
	env := func(k string) string {
		if in.LookupEnv == nil {
			return ""
		}
		v, _ := in.LookupEnv(k)
		return v
	}
	s := SecureSettings{
		Cert:    firstNonEmpty(in.Flags["cert"], env(envCert), file.Cert),
		Key:     firstNonEmpty(in.Flags["key"], env(envKey), file.Key),
		CA:      firstNonEmpty(in.Flags["ca"], env(envCA), file.CA),
		Revoked: firstNonEmpty(in.Flags["revoked"], env(envRevoked), file.Revoked),
		Policy:  firstNonEmpty(in.Flags["policy"], env(envPolicy), file.Policy),
		Seal:    file.Seal,
	}
	if v, ok := in.Flags["seal"]; ok {
		s.Seal, _ = strconv.ParseBool(v) // pflag checked it
	} else if v := env(envSeal); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return s, usageErrorf("%s=%q: want true or false", envSeal, v)
		}
		s.Seal = b
	}
	window := time.Duration(file.ReplayWindow)
	if v := firstNonEmpty(in.Flags["replay-window"], env(envReplayWindow)); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			return s, usageErrorf("replay window %q: %v", v, err)
		}
		window = d
	}
	if window < 0 {
		return s, usageErrorf("the replay window must be positive, not %v", window)
	}
	s.ReplayWindow = window
	if (s.Cert == "") != (s.Key == "") {
		return s, usageErrorf("secure mode needs both --cert and --key (or %s and %s, or cert and key in the config file's secure section)", envCert, envKey)
	}
	return s, nil
}

// secureUse is what a command needs of secure mode.
type secureUse struct {
	command string          // for messages: "nanite agent"
	roles   []security.Role // the roles its own certificate may have
	policy  bool            // it enforces --policy (agents)
}

var (
	secureForAgent  = secureUse{"nanite agent", []security.Role{security.RoleAgent}, true}
	secureForMapper = secureUse{"nanite mapper", []security.Role{security.RoleMapper}, false}
	// Agents accept requests from clients, mappers and bridges.
	secureForClient = secureUse{"nanite request, push and agents", []security.Role{security.RoleClient, security.RoleMapper}, false}
)

// secureMode is a command's loaded secure mode: the nanite.Secure given to
// its agent or mapper, and the files it can reload.
type secureMode struct {
	*nanite.Secure
	settings SecureSettings
	revoked  *security.RevocationList // nil without --revoked
	policy   *security.PolicyHolder   // nil without --policy or for non-agents
}

// load reads the files of the secure-mode settings for a command. It
// returns nil (plain mode) when no certificate is given, and a usage error
// when settings that only secure mode can honour are given without one, so
// that nobody believes a policy is enforced when it is not. It checks this
// participant's own certificate as the others will (chain to --ca, dates,
// revocation) and its role, so that a wrong file fails here and not as
// silence from the cluster.
func (s SecureSettings) load(use secureUse, log *slog.Logger) (*secureMode, error) {
	if !s.Enabled() {
		var set []string
		for _, x := range []struct {
			on   bool
			name string
		}{{s.CA != "", "--ca"}, {s.Revoked != "", "--revoked"}, {use.policy && s.Policy != "", "--policy"},
			{s.Seal, "--seal"}, {s.ReplayWindow != 0, "--replay-window"}} {
			if x.on {
				set = append(set, x.name)
			}
		}
		if len(set) > 0 {
			return nil, usageErrorf("%s given without --cert and --key: secure mode needs this participant's certificate and key (see nanite pki issue)",
				strings.Join(set, ", "))
		}
		return nil, nil
	}
	if s.CA == "" {
		return nil, usageErrorf("secure mode (--cert, --key) needs --ca, the certificate of the CA that issued the cluster's certificates")
	}
	id, err := security.LoadIdentity(s.Cert, s.Key)
	if err != nil {
		return nil, usageErrorf("secure mode: certificate %s with key %s: %v", s.Cert, s.Key, err)
	}
	roots, err := security.LoadRoots(s.CA)
	if err != nil {
		return nil, usageErrorf("secure mode: --ca %s: %v", s.CA, err)
	}
	m := &secureMode{settings: s}
	if s.Revoked != "" {
		if m.revoked, err = security.LoadRevocationList(s.Revoked); err != nil {
			return nil, usageErrorf("secure mode: --revoked %s: %v", s.Revoked, err)
		}
	}
	v, err := security.NewVerifier(security.VerifierConfig{Roots: roots, Revoked: m.revoked, Window: s.ReplayWindow, Logger: log})
	if err != nil {
		return nil, usageErrorf("secure mode: %v", err)
	}
	if _, err := v.VerifyCert(id.Cert.Raw, id.Name); err != nil {
		return nil, usageErrorf("secure mode: the certificate %s (%s %q) fails the verification the cluster will apply to it with --ca %s: %v",
			s.Cert, id.Role, id.Name, s.CA, err)
	}
	if !slices.Contains(use.roles, id.Role) {
		want := make([]string, len(use.roles))
		for i, r := range use.roles {
			want[i] = string(r)
		}
		return nil, usageErrorf("%s needs a certificate with the role %s; %s is the %s certificate of %q (issue one with: nanite pki issue NAME --role %s)",
			use.command, strings.Join(want, " or "), s.Cert, id.Role, id.Name, want[0])
	}
	m.Secure = &nanite.Secure{Identity: id, Verifier: v, Seal: s.Seal}
	if use.policy && s.Policy != "" {
		h, err := security.NewPolicyHolder(s.Policy, log)
		if err != nil {
			return nil, usageErrorf("--policy: %v", err) // names the file, the rule and the field
		}
		m.policy = h
		m.Secure.Policy = h // only when set: a nil *PolicyHolder in the interface would not be nil
	}
	return m, nil
}

// nanite returns the configuration of nanite's secure mode, nil for plain
// mode (m nil).
func (m *secureMode) nanite() *nanite.Secure {
	if m == nil {
		return nil
	}
	return m.Secure
}

// identity returns the identity a participant runs under in secure mode:
// its certificate's name. given is the identity asked for (flag or config
// file), "" for none; any other name than the certificate's is an error.
func (m *secureMode) identity(given string) (string, error) {
	name := m.Identity.Name
	if given != "" && given != name {
		return "", usageErrorf("--identity %q is not the name of the certificate %s (%q): in secure mode the identity is the certificate's name; leave --identity out or use the certificate of %q",
			given, m.settings.Cert, name, given)
	}
	return name, nil
}

// logStart logs what secure mode a daemon runs with (never a key).
func (m *secureMode) logStart(log *slog.Logger) {
	attrs := []any{"identity", m.Identity.Name, "role", m.Identity.Role, "ca", m.settings.CA,
		"replay_window", m.Verifier.Window(), "seal", m.Seal}
	if m.revoked != nil {
		attrs = append(attrs, "revoked", m.settings.Revoked, "revoked_entries", m.revoked.Len())
	}
	if m.policy != nil {
		attrs = append(attrs, "policy", m.policy.Path(), "rules", len(m.policy.Current().Rules()))
	}
	log.Info("secure mode", attrs...)
}

// defaultPolicyWatch is how often an agent looks for a change of its
// policy file (--policy-watch).
const defaultPolicyWatch = 2 * time.Second

// startReloads reloads the policy and the revocation list on SIGHUP, and
// the policy when its file changes (checked every watch; 0: never), until
// ctx ends or stop is called (stop waits for the reloaders). A file that
// fails to load is logged and the previous contents stay. Without anything
// to reload it does nothing, and SIGHUP keeps its default effect.
func (m *secureMode) startReloads(ctx context.Context, watch time.Duration, log *slog.Logger) (stop func()) {
	if m == nil || (m.policy == nil && m.revoked == nil) {
		return func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
				m.reload(log)
			}
		}
	})
	if m.policy != nil && watch > 0 {
		wg.Go(func() { _ = m.policy.Watch(ctx, watch) }) // logged by the holder
	}
	return func() {
		signal.Stop(hup)
		cancel()
		wg.Wait()
	}
}

// reload reads the policy and revocation list files again.
func (m *secureMode) reload(log *slog.Logger) {
	log.Info("SIGHUP: reloading the secure-mode files")
	if m.policy != nil {
		_ = m.policy.Reload() // logged by the holder
	}
	if m.revoked != nil {
		if err := m.revoked.Load(m.settings.Revoked); err != nil {
			log.Warn("revocation list not reloaded, keeping the previous one", "path", m.settings.Revoked, "err", err)
		} else {
			log.Info("revocation list loaded", "path", m.settings.Revoked, "entries", m.revoked.Len())
		}
	}
}

// rejectHint explains, from an embedded mapper's counters, why a requester
// may see no agent: packets of the cluster that it refused. "" when it
// refused none.
func rejectHint(stats map[string]int64, secure bool) string {
	var reasons []string
	total := int64(0)
	for k, n := range stats {
		if r, ok := strings.CutPrefix(k, "rejected_"); ok && n > 0 {
			reasons = append(reasons, fmt.Sprintf("%s %d", r, n))
			total += n
		}
	}
	if total == 0 {
		return ""
	}
	sort.Strings(reasons)
	hint := fmt.Sprintf("%d packets from the cluster were refused (%s)", total, strings.Join(reasons, ", "))
	switch {
	case !secure:
		hint += ": are the agents in secure mode? Then give --cert, --key and --ca"
	case stats["rejected_unknown_signer"] > 0:
		hint += ": is --ca the CA that issued the agents' certificates?"
	case stats["rejected_unsigned"] > 0:
		hint += ": agents in plain mode do not talk to secure requesters"
	case stats["rejected_outside_window"] > 0:
		hint += ": are the clocks synchronised?"
	}
	return hint
}

// devPKI is the secure mode of "nanite dev --secure": a throwaway CA and
// identities in a temporary directory, removed by Close. A nil *devPKI is
// plain mode.
type devPKI struct {
	dir    string
	ca     *security.CA
	policy *security.PolicyHolder // --policy, shared by the agents; nil: none
	reload func()                 // stops the policy's reloads

	CACert, ClientCert, ClientKey string // for the printed commands
}

// newDevPKI makes the CA and the client identity "dev-client", and loads
// policyFile (if any) for the agents, reloading it on change and SIGHUP.
func newDevPKI(ctx context.Context, policyFile string, log *slog.Logger) (*devPKI, error) {
	dir, err := os.MkdirTemp("", "nanite-dev-pki-")
	if err != nil {
		return nil, err
	}
	d := &devPKI{dir: dir, reload: func() {}}
	fail := func(err error) (*devPKI, error) { d.Close(); return nil, err }
	if d.ca, err = security.NewCA("dev-ca", 7*24*time.Hour); err != nil {
		return fail(err)
	}
	if err := d.ca.Save(filepath.Join(dir, "ca")); err != nil {
		return fail(err)
	}
	d.CACert = filepath.Join(dir, "ca", security.CACertFile)
	client, err := d.ca.Issue("dev-client", security.RoleClient, 24*time.Hour)
	if err != nil {
		return fail(err)
	}
	d.ClientCert, d.ClientKey = filepath.Join(dir, "dev-client.crt"), filepath.Join(dir, "dev-client.key")
	if err := client.Save(d.ClientCert, d.ClientKey); err != nil {
		return fail(err)
	}
	if policyFile != "" {
		if d.policy, err = security.NewPolicyHolder(policyFile, log); err != nil {
			return fail(usageErrorf("--policy: %v", err))
		}
		d.reload = (&secureMode{policy: d.policy}).startReloads(ctx, defaultPolicyWatch, log)
	}
	return d, nil
}

// participant issues the identity of a mapper or agent of the dev cluster
// and returns its secure mode (nil for a nil d).
func (d *devPKI) participant(name string, role security.Role) (*nanite.Secure, error) {
	if d == nil {
		return nil, nil
	}
	id, err := d.ca.Issue(name, role, 24*time.Hour)
	if err != nil {
		return nil, err
	}
	v, err := security.NewVerifier(security.VerifierConfig{Roots: d.ca.Pool()})
	if err != nil {
		return nil, err
	}
	s := &nanite.Secure{Identity: id, Verifier: v}
	if role == security.RoleAgent && d.policy != nil {
		s.Policy = d.policy
	}
	return s, nil
}

// Close stops the reloads and removes the directory.
func (d *devPKI) Close() {
	if d == nil {
		return
	}
	d.reload()
	_ = os.RemoveAll(d.dir)
}
