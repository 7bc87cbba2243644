package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/nanite-go/nanite/nanite/provision"
)

// Environment variables of the vhost commands.
const (
	envManagementURL = "NANITE_MANAGEMENT_URL"
	envAdminUser     = "NANITE_ADMIN_USER"
	envAdminPassword = "NANITE_ADMIN_PASSWORD"
)

// VhostOptions are the flags and arguments of "nanite vhost ...".
type VhostOptions struct {
	IO        IOStreams
	Settings  func() (*Settings, error)
	LookupEnv func(string) (string, bool)
	ReadFile  func(string) ([]byte, error)

	// Action is the subcommand: create, delete, list, add-agent or
	// remove-agent.
	Action string
	App    string
	Agent  string // add-agent, remove-agent

	Management        string
	AdminUser         string
	AdminPassword     string
	AdminPasswordFile string
	Timeout           time.Duration

	Agents       []string // create --agent
	PerAgent     bool
	LockTopology bool
	NoBridge     bool
	Rotate       bool
	Out          string
	JSON         bool
}

const vhostHelp = `Each application (cluster) gets its own RabbitMQ vhost, named after it, and
its own users, whose permissions follow the protocol: an agent can declare
and read only its own queues and publish only where agents publish; a mapper
can read the cluster's state and send requests but not read agents' queues;
nobody can declare other exchanges or queues, and no user has any right on
another vhost. See docs/provisioning.md for the permissions and their limits.

  APP.mapper         mapper daemons and requesters ("nanite mapper", "nanite request")
  APP.agent          every agent (omitted with --per-agent)
  APP.agent.ID       only the agent with identity ID (--agent ID, "vhost add-agent")
  APP.bridge         the XMPP bridge (omitted with --no-bridge)

The commands use RabbitMQ's management HTTP API as an administrator:
  --management URL         (env NANITE_MANAGEMENT_URL; default http://HOST:15672,
                           or https://HOST:15671 for amqps, HOST from --url)
  --admin-user NAME        (env NANITE_ADMIN_USER; default: the user of --url)
  --admin-password-file F  or --admin-password, or env NANITE_ADMIN_PASSWORD
                           (default: the password of --url)
An https management URL is verified with --tls-ca when given. The URLs
printed for the users take their scheme, host and port from --url.`

// NewCmdVhost returns "nanite vhost" and its subcommands. runF replaces the
// run function in tests.
func NewCmdVhost(f *Factory, runF func(context.Context, *VhostOptions) error) *cobra.Command {
	opts := &VhostOptions{IO: f.IO, Settings: f.Settings, LookupEnv: f.LookupEnv, ReadFile: f.ReadFile}
	run := func(cmd *cobra.Command, action string) error {
		opts.Action = action
		if opts.App != "" && !provision.ValidApp(opts.App) {
			return usageErrorf("invalid application name %q: 1 to 64 letters, digits, '_' or '-' (no dots)", opts.App)
		}
		for _, id := range append([]string{opts.Agent}, opts.Agents...) {
			if id != "" && !provision.ValidAgentID(id) {
				return usageErrorf("invalid agent identity %q: 1 to 128 letters, digits, '.', '_', ':' or '-'", id)
			}
		}
		if opts.AdminPassword != "" && opts.AdminPasswordFile != "" {
			return usageErrorf("give --admin-password or --admin-password-file, not both")
		}
		if opts.Timeout <= 0 {
			return usageErrorf("--timeout must be positive")
		}
		if runF != nil {
			return runF(cmd.Context(), opts)
		}
		return vhostRun(cmd.Context(), opts)
	}
	cmd := &cobra.Command{
		Use:   "vhost <command>",
		Short: "Provision applications' vhosts and users on a RabbitMQ broker",
		Long:  "Provision, list and delete applications on a RabbitMQ broker.\n\n" + vhostHelp,
		Example: `  nanite vhost create shop --url amqp://admin@rabbit.example:5672/ --admin-password-file /etc/nanite/admin-pw --out shop.json
  nanite vhost create shop --per-agent --agent web-1 --agent web-2
  nanite vhost add-agent shop web-3
  nanite vhost list
  nanite vhost delete shop`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	pf := cmd.PersistentFlags()
	pf.StringVar(&opts.Management, "management", "", "management API URL (env NANITE_MANAGEMENT_URL; default from --url)")
	pf.StringVar(&opts.AdminUser, "admin-user", "", "administrator (env NANITE_ADMIN_USER; default: the user of --url)")
	pf.StringVar(&opts.AdminPassword, "admin-password", "", "administrator's password (visible to ps: prefer the file or NANITE_ADMIN_PASSWORD)")
	pf.StringVar(&opts.AdminPasswordFile, "admin-password-file", "", "file holding the administrator's password")
	pf.DurationVar(&opts.Timeout, "timeout", 30*time.Second, "time allowed for the whole operation")

	output := func(c *cobra.Command) {
		c.Flags().StringVar(&opts.Out, "out", "", "write the credentials to this file (JSON, mode 0600) instead of printing them")
		c.Flags().BoolVar(&opts.JSON, "json", false, "print the credentials as JSON")
		c.Flags().BoolVar(&opts.Rotate, "rotate", false, "give users that exist already new passwords instead of failing")
	}

	create := &cobra.Command{
		Use:   "create APP [flags]",
		Short: "Create an application's vhost and users; print their credentials once",
		Long: `Create the vhost APP, declare its exchanges and shared queues, and create its
users with random passwords. The credentials are printed once (or written to
--out with mode 0600): RabbitMQ keeps only password hashes.

Running it again for an existing application fails before changing anything,
unless --rotate (new passwords for all the users named, same permissions).

` + vhostHelp,
		Example: `  nanite vhost create shop --out shop.json
  nanite vhost create shop --per-agent --agent web-1 --agent web-2 --json
  NANITE_ADMIN_PASSWORD=... nanite vhost create shop --url amqps://admin@rabbit.example:5671/ --tls-ca ca.pem`,
		Args: args(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, a []string) error {
			opts.App = a[0]
			return run(cmd, "create")
		},
	}
	create.Flags().StringSliceVar(&opts.Agents, "agent", nil, "also create a user of its own for this agent identity (repeatable)")
	create.Flags().BoolVar(&opts.PerAgent, "per-agent", false, "no shared agent user: only agents with a user of their own connect")
	create.Flags().BoolVar(&opts.LockTopology, "lock-topology", false, "deny every user re-declaring or deleting the shared exchanges and queues (participants must declare them passively)")
	create.Flags().BoolVar(&opts.NoBridge, "no-bridge", false, "no bridge user")
	output(create)

	addAgent := &cobra.Command{
		Use:   "add-agent APP ID [flags]",
		Short: "Create the user of one agent identity; print its credentials once",
		Long: `Create the user APP.agent.ID, which can declare, bind and read only the
queues of the agent with identity ID (nanite.agent.ID, nanite.reply.ID). Run
that agent with --identity ID and this user's URL.`,
		Example: `  nanite vhost add-agent shop web-3 --out web-3.json
  nanite vhost add-agent shop web-3 --rotate`,
		Args: args(cobra.ExactArgs(2)),
		RunE: func(cmd *cobra.Command, a []string) error {
			opts.App, opts.Agent = a[0], a[1]
			return run(cmd, "add-agent")
		},
	}
	output(addAgent)

	removeAgent := &cobra.Command{
		Use:     "remove-agent APP ID",
		Short:   "Delete the user of one agent identity (the broker closes its connections)",
		Example: `  nanite vhost remove-agent shop web-3`,
		Args:    args(cobra.ExactArgs(2)),
		RunE: func(cmd *cobra.Command, a []string) error {
			opts.App, opts.Agent = a[0], a[1]
			return run(cmd, "remove-agent")
		},
	}

	del := &cobra.Command{
		Use:   "delete APP",
		Short: "Delete an application's vhost, with everything in it, and its users",
		Long: `Delete the vhost APP with all its queues and messages, and the application's
users. Only vhosts made by "nanite vhost create" (tagged "nanite") are
deleted. Deleting an application that does not exist is not an error.`,
		Example: `  nanite vhost delete shop`,
		Args:    args(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, a []string) error {
			opts.App = a[0]
			return run(cmd, "delete")
		},
	}

	list := &cobra.Command{
		Use:   "list",
		Short: "List the applications on the broker and their users",
		Long: `List the vhosts made by "nanite vhost create" with every user that has
permissions on them (users not made by nanite, such as administrators, are
shown too). --json adds the permission regexes.`,
		Example: `  nanite vhost list
  nanite vhost list --json`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error { return run(cmd, "list") },
	}
	list.Flags().BoolVar(&opts.JSON, "json", false, "print JSON, with the permissions")

	cmd.AddCommand(create, addAgent, removeAgent, del, list)
	return cmd
}

// managementConfig resolves how to reach the management API.
func (o *VhostOptions) managementConfig(s *Settings) (provision.ManagementConfig, error) {
	env := func(k string) string {
		if o.LookupEnv == nil {
			return ""
		}
		v, _ := o.LookupEnv(k)
		return v
	}
	broker, err := url.Parse(s.URL)
	if err != nil {
		return provision.ManagementConfig{}, usageErrorf("broker URL: %v", err)
	}
	mgmt := firstNonEmpty(o.Management, env(envManagementURL))
	if mgmt == "" {
		host := broker.Hostname()
		if host == "" {
			host = "localhost"
		}
		mgmt = "http://" + net.JoinHostPort(host, "15672")
		if broker.Scheme == "amqps" {
			mgmt = "https://" + net.JoinHostPort(host, "15671")
		}
	}
	m, err := url.Parse(mgmt)
	if err != nil || (m.Scheme != "http" && m.Scheme != "https") || m.Host == "" {
		return provision.ManagementConfig{}, usageErrorf("management URL %q: want http://host:port or https://host:port", mgmt)
	}
	var urlUser, urlPass string
	if broker.User != nil {
		urlUser = broker.User.Username()
		urlPass, _ = broker.User.Password()
	}
	pass := o.AdminPassword
	if o.AdminPasswordFile != "" {
		data, err := o.ReadFile(o.AdminPasswordFile)
		if err != nil {
			return provision.ManagementConfig{}, usageErrorf("admin password file: %v", err)
		}
		pass = strings.TrimRight(string(data), "\r\n")
	}
	cfg := provision.ManagementConfig{
		URL:      mgmt,
		User:     firstNonEmpty(o.AdminUser, env(envAdminUser), urlUser),
		Password: firstNonEmpty(pass, env(envAdminPassword), urlPass),
	}
	if cfg.User == "" {
		return cfg, usageErrorf("no administrator: give --admin-user (or NANITE_ADMIN_USER, or a user in --url)")
	}
	if m.Scheme == "https" && (s.TLS.CA != "" || s.TLS.Cert != "") {
		// The broker's CA (and client certificate) for the management API
		// too; the server name is the management URL's host.
		files := s.TLS.TLSFileConfig
		files.ServerName = ""
		tc, err := buildTLSConfig(files, "", o.ReadFile)
		if err != nil {
			return cfg, err
		}
		cfg.HTTPClient = &http.Client{Timeout: o.Timeout, Transport: &http.Transport{
			Proxy: http.ProxyFromEnvironment, TLSClientConfig: tc}}
	}
	return cfg, nil
}

func vhostRun(ctx context.Context, o *VhostOptions) error {
	s, err := o.Settings()
	if err != nil {
		return err
	}
	api, err := o.managementConfig(s)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	popts := provision.Options{
		AMQPURL:      amqpBaseURL(s.URL),
		PerAgent:     o.PerAgent,
		Agents:       o.Agents,
		LockTopology: o.LockTopology,
		Rotate:       o.Rotate,
		NoBridge:     o.NoBridge,
	}
	out := o.IO.Out
	switch o.Action {
	case "create":
		creds, err := provision.Provision(ctx, api, o.App, popts)
		if err != nil {
			return managementError(api, err)
		}
		return o.writeCredentials(creds, api)
	case "add-agent":
		u, err := provision.AddAgent(ctx, api, o.App, o.Agent, popts)
		if err != nil {
			return managementError(api, err)
		}
		return o.writeCredentials(&provision.Credentials{App: o.App, Vhost: o.App, Users: []provision.User{*u}}, api)
	case "remove-agent":
		if err := provision.RemoveAgent(ctx, api, o.App, o.Agent); err != nil {
			return managementError(api, err)
		}
		fmt.Fprintf(out, "Removed user %s.\n", provision.UserName(o.App, provision.RoleAgent, o.Agent))
		return nil
	case "delete":
		if err := provision.Delete(ctx, api, o.App); err != nil {
			return managementError(api, err)
		}
		fmt.Fprintf(out, "Deleted application %s: its vhost with everything in it, and its users.\n", o.App)
		return nil
	case "list":
		apps, err := provision.List(ctx, api)
		if err != nil {
			return managementError(api, err)
		}
		return o.printApps(apps)
	}
	return fmt.Errorf("unknown vhost action %q", o.Action)
}

// managementError makes refused administrator credentials and an
// unreachable API connection errors (exit code 6).
func managementError(api provision.ManagementConfig, err error) error {
	if errors.Is(err, provision.ErrUnauthorized) {
		return &connectionError{URL: api.URL, Err: err}
	}
	return err
}

// amqpBaseURL is the broker URL without user and vhost: the scheme, host
// and port of the users' URLs.
func amqpBaseURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return ""
	}
	host := u.Host
	if u.Port() == "" {
		port := "5672"
		if u.Scheme == "amqps" {
			port = "5671"
		}
		h := u.Hostname()
		if h == "" {
			h = "localhost"
		}
		host = net.JoinHostPort(h, port)
	}
	return (&url.URL{Scheme: u.Scheme, Host: host}).String()
}

// writeCredentials prints the credentials, or writes them to o.Out.
func (o *VhostOptions) writeCredentials(c *provision.Credentials, api provision.ManagementConfig) error {
	out := o.IO.Out
	if o.Out != "" {
		data, err := json.MarshalIndent(c, "", "  ")
		if err != nil {
			return err
		}
		if err := writeSecretFile(o.Out, append(data, '\n')); err != nil {
			return err
		}
		fmt.Fprintf(out, "Application %s on %s: credentials of %d users written to %s (mode 0600).\n",
			c.App, api.URL, len(c.Users), o.Out)
		return nil
	}
	if o.JSON {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(c)
	}
	fmt.Fprintf(out, "Application %s: vhost %q on %s.\n", c.App, c.Vhost, api.URL)
	fmt.Fprintln(out, "These passwords are shown only this once (RabbitMQ keeps only their hashes):")
	fmt.Fprintln(out)
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ROLE\tAGENT\tUSER\tPASSWORD\tURL")
	for _, u := range c.Users {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", u.Role, dash(u.Agent), u.Name, u.Password, u.URL)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(out)
	fmt.Fprintln(out, "Give each program only its own URL (NANITE_URL or --url).")
	return nil
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// writeSecretFile writes data to path with mode 0600, through a temporary
// file in the same directory, so that the secret is never readable by
// others, not even for a moment, and a file that was there is replaced
// whole.
func writeSecretFile(path string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // after a successful rename there is nothing to remove
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// printApps prints the list.
func (o *VhostOptions) printApps(apps []provision.App) error {
	out := o.IO.Out
	if o.JSON {
		if apps == nil {
			apps = []provision.App{}
		}
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(apps)
	}
	if len(apps) == 0 {
		fmt.Fprintln(out, "No applications (vhosts made by \"nanite vhost create\").")
		return nil
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "APP\tUSER\tROLE\tAGENT")
	for _, a := range apps {
		name := a.Name
		if a.LockedTopology {
			name += " (locked topology)"
		}
		if len(a.Users) == 0 {
			fmt.Fprintf(tw, "%s\t-\t-\t-\n", name)
		}
		for _, u := range a.Users {
			role := string(u.Role)
			if role == "" {
				role = "other (not made by nanite)"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", name, u.Name, role, dash(u.Agent))
		}
	}
	return tw.Flush()
}
