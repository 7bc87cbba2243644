// Package provision sets up an application's RabbitMQ vhost for a nanite
// cluster through the broker's management HTTP API: the vhost (the
// security boundary: one application, one vhost), its shared topology, and
// separate users for the application's mappers, agents and bridge, each
// with permission regular expressions derived from the protocol
// (docs/protocol.md) so that a user can do what its role needs and nothing
// else, and nothing at all in another vhost. docs/provisioning.md explains
// the permissions and their limits.
//
// Users are named after the application: APP.mapper, APP.bridge, APP.agent
// (shared by all agents) and APP.agent.ID (one agent's own user, the
// stricter choice). Application names cannot contain a dot, so that no two
// applications' user names can collide.
//
// The package speaks only HTTP (it does not import an AMQP client).
package provision

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"slices"
	"sort"
	"strings"
)

// Errors matched with errors.Is.
var (
	// ErrExists: a user to be created exists already (Options.Rotate
	// re-issues its password instead).
	ErrExists = errors.New("already exists")
	// ErrNotFound: the vhost or user does not exist; also matched by an
	// APIError with status 404.
	ErrNotFound = errors.New("not found")
	// ErrNotNanite: the vhost exists but was not provisioned by this
	// package (it lacks the "nanite" tag), so it is left alone.
	ErrNotNanite = errors.New("not provisioned by nanite")
)

// Vhost tags this package sets.
const (
	// TagNanite marks a vhost provisioned by this package.
	TagNanite = "nanite"
	// TagLockedTopology marks a vhost whose users may not configure the
	// shared topology (Options.LockTopology).
	TagLockedTopology = "nanite-locked-topology"
)

var (
	appRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$`)
	idRE  = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$`) // nanite.ValidIdentity
)

// ValidApp reports whether app is a valid application name: 1 to 64
// letters, digits, '_' or '-', starting with a letter or digit.
func ValidApp(app string) bool { return appRE.MatchString(app) }

// ValidAgentID reports whether id is a valid agent identity (as nanite's).
func ValidAgentID(id string) bool { return idRE.MatchString(id) }

// UserName returns the name of the user of app for role; agentID names a
// per-agent user (role RoleAgent only).
func UserName(app string, role Role, agentID string) string {
	if role == RoleAgent && agentID != "" {
		return app + ".agent." + agentID
	}
	return app + "." + string(role)
}

// parseUserName is UserName's inverse: ok is false for a user that is not
// one of app's.
func parseUserName(app, name string) (role Role, agentID string, ok bool) {
	rest, found := strings.CutPrefix(name, app+".")
	if !found {
		return "", "", false
	}
	switch {
	case rest == string(RoleMapper) || rest == string(RoleBridge) || rest == string(RoleAgent):
		return Role(rest), "", true
	case strings.HasPrefix(rest, "agent.") && ValidAgentID(rest[len("agent."):]):
		return RoleAgent, rest[len("agent."):], true
	}
	return "", "", false
}

// Options tune Provision and AddAgent.
type Options struct {
	// AMQPURL is the broker's AMQP address used in the credentials' URLs,
	// amqp://host:port or amqps://host:port; its user and path are
	// replaced. Default: the management API's host, port 5672 (amqps and
	// 5671 when the API is https).
	AMQPURL string
	// PerAgent leaves out the shared agent user: then only agents with a
	// user of their own (Agents, AddAgent) can connect. Stricter: an agent
	// can then configure, bind and read only its own two queues.
	PerAgent bool
	// Agents are agent identities that get a user of their own now.
	Agents []string
	// LockTopology denies every user the configure permission on the
	// shared exchanges and queues, which Provision declares itself: no
	// user can then delete them (or re-declare them). Participants must
	// declare the shared topology passively; the current nanite.Agent and
	// nanite.Mapper declare it actively and are refused on such a vhost.
	LockTopology bool
	// Rotate gives users that exist already a new password (and re-applies
	// their permissions) instead of failing with ErrExists.
	Rotate bool
	// NoBridge leaves out the bridge user.
	NoBridge bool
}

// User is one user's credentials.
type User struct {
	Role        Role        `json:"role"`
	Agent       string      `json:"agent,omitempty"` // the agent identity of a per-agent user
	Name        string      `json:"user"`
	Password    string      `json:"password"`
	URL         string      `json:"url"` // AMQP URL with the credentials and the vhost
	Permissions Permissions `json:"permissions"`
}

// Credentials are what Provision created: shown once, never stored by the
// broker in clear.
type Credentials struct {
	App   string `json:"app"`
	Vhost string `json:"vhost"`
	Users []User `json:"users"`
}

// User returns the user of role (agentID for a per-agent user), or nil.
func (c *Credentials) User(role Role, agentID string) *User {
	for i := range c.Users {
		if c.Users[i].Role == role && c.Users[i].Agent == agentID {
			return &c.Users[i]
		}
	}
	return nil
}

// App is a provisioned application as List reports it.
type App struct {
	Name           string     `json:"app"`
	Vhost          string     `json:"vhost"`
	LockedTopology bool       `json:"locked_topology,omitempty"`
	Users          []UserInfo `json:"users"`
}

// UserInfo is a user with permissions on an application's vhost.
type UserInfo struct {
	Name        string      `json:"user"`
	Role        Role        `json:"role,omitempty"` // "" for a user this package did not make
	Agent       string      `json:"agent,omitempty"`
	Permissions Permissions `json:"permissions"`
}

type userSpec struct {
	role  Role
	agent string
}

func checkApp(app string) error {
	if !ValidApp(app) {
		return fmt.Errorf("provision: invalid application name %q: 1 to 64 letters, digits, '_' or '-'", app)
	}
	return nil
}

func checkAgentID(id string) error {
	if !ValidAgentID(id) {
		return fmt.Errorf("provision: invalid agent identity %q: 1 to 128 letters, digits, '.', '_', ':' or '-'", id)
	}
	return nil
}

// Provision creates the vhost of app (named app), declares its shared
// topology, and creates its users with fresh random passwords: APP.mapper,
// APP.bridge (unless NoBridge), APP.agent (unless PerAgent) and
// APP.agent.ID for each of opts.Agents. The users get permissions on this
// vhost only.
//
// Running it again is safe: the vhost, topology and permissions are set
// again; users that exist already make it fail with ErrExists before
// anything is changed, unless opts.Rotate (then they get new passwords).
// A user name taken by a user with permissions on another vhost is never
// touched.
func Provision(ctx context.Context, api ManagementConfig, app string, opts Options) (*Credentials, error) {
	if err := checkApp(app); err != nil {
		return nil, err
	}
	specs := []userSpec{{role: RoleMapper}}
	if !opts.NoBridge {
		specs = append(specs, userSpec{role: RoleBridge})
	}
	if !opts.PerAgent {
		specs = append(specs, userSpec{role: RoleAgent})
	}
	for _, id := range opts.Agents {
		if err := checkAgentID(id); err != nil {
			return nil, err
		}
		if !slices.Contains(specs, userSpec{RoleAgent, id}) {
			specs = append(specs, userSpec{RoleAgent, id})
		}
	}
	c, err := newClient(api)
	if err != nil {
		return nil, err
	}
	amqpBase, err := amqpBase(opts.AMQPURL, c.base)
	if err != nil {
		return nil, err
	}
	vhost := app

	// Check every user before changing anything.
	if err := c.checkUsers(ctx, vhost, specs, app, opts.Rotate); err != nil {
		return nil, err
	}

	// RabbitMQ gives the administrator who creates a vhost full permissions
	// on it; those are taken back after the declarations unless it had
	// them before.
	hadAccess, err := c.hasAccess(ctx, vhost)
	if err != nil {
		return nil, err
	}
	tags := []string{TagNanite}
	if opts.LockTopology {
		tags = append(tags, TagLockedTopology)
	}
	if err := c.putVhost(ctx, vhost, "nanite application "+app, tags); err != nil {
		return nil, fmt.Errorf("provision: create vhost %q: %w", vhost, err)
	}
	if err := c.declareTopology(ctx, vhost, hadAccess); err != nil {
		return nil, err
	}
	creds := &Credentials{App: app, Vhost: vhost}
	for _, s := range specs {
		u, err := c.makeUser(ctx, vhost, app, s, opts.LockTopology, amqpBase)
		if err != nil {
			return nil, err
		}
		creds.Users = append(creds.Users, *u)
	}
	return creds, nil
}

// AddAgent creates the user of one agent identity of app (APP.agent.ID),
// allowed to configure, bind and read only that agent's queues. The vhost
// must have been provisioned. Only opts.AMQPURL and opts.Rotate are used;
// whether the topology is locked is read from the vhost.
func AddAgent(ctx context.Context, api ManagementConfig, app, id string, opts Options) (*User, error) {
	if err := checkApp(app); err != nil {
		return nil, err
	}
	if err := checkAgentID(id); err != nil {
		return nil, err
	}
	c, err := newClient(api)
	if err != nil {
		return nil, err
	}
	amqpBase, err := amqpBase(opts.AMQPURL, c.base)
	if err != nil {
		return nil, err
	}
	v, err := c.naniteVhost(ctx, app)
	if err != nil {
		return nil, err
	}
	s := userSpec{RoleAgent, id}
	if err := c.checkUsers(ctx, app, []userSpec{s}, app, opts.Rotate); err != nil {
		return nil, err
	}
	return c.makeUser(ctx, app, app, s, v.hasTag(TagLockedTopology), amqpBase)
}

// RemoveAgent deletes the user of one agent identity of app; its open
// connections are closed by the broker. Removing a user that does not
// exist is not an error.
func RemoveAgent(ctx context.Context, api ManagementConfig, app, id string) error {
	if err := checkApp(app); err != nil {
		return err
	}
	if err := checkAgentID(id); err != nil {
		return err
	}
	c, err := newClient(api)
	if err != nil {
		return err
	}
	name := UserName(app, RoleAgent, id)
	if err := c.checkOwned(ctx, name, app); err != nil {
		return err
	}
	if err := c.deleteUser(ctx, name); err != nil {
		return fmt.Errorf("provision: delete user %q: %w", name, err)
	}
	return nil
}

// Delete deletes the vhost of app with everything in it, and the app's
// users. It refuses a vhost that Provision did not create (ErrNotNanite).
// Deleting an application that does not exist is not an error; running it
// again after a partial failure finishes the job.
func Delete(ctx context.Context, api ManagementConfig, app string) error {
	if err := checkApp(app); err != nil {
		return err
	}
	c, err := newClient(api)
	if err != nil {
		return err
	}
	_, err = c.naniteVhost(ctx, app)
	switch {
	case errors.Is(err, ErrNotFound):
		// Gone already; users may be left from an interrupted Delete.
	case err != nil:
		return err
	}
	users, err := c.appUsers(ctx, app)
	if err != nil {
		return err
	}
	if err := c.deleteVhost(ctx, app); err != nil && !isNotFound(err) {
		return fmt.Errorf("provision: delete vhost %q: %w", app, err)
	}
	for _, u := range users {
		if err := c.deleteUser(ctx, u); err != nil {
			return fmt.Errorf("provision: delete user %q: %w", u, err)
		}
	}
	return nil
}

// List returns the applications provisioned on the broker (vhosts with the
// "nanite" tag), each with every user that has permissions on its vhost —
// including users this package did not make (Role ""), such as an
// administrator.
func List(ctx context.Context, api ManagementConfig) ([]App, error) {
	c, err := newClient(api)
	if err != nil {
		return nil, err
	}
	vhosts, err := c.listVhosts(ctx)
	if err != nil {
		return nil, fmt.Errorf("provision: list vhosts: %w", err)
	}
	perms, err := c.listPermissions(ctx)
	if err != nil {
		return nil, fmt.Errorf("provision: list permissions: %w", err)
	}
	var apps []App
	for _, v := range vhosts {
		if !v.hasTag(TagNanite) {
			continue
		}
		a := App{Name: v.Name, Vhost: v.Name, LockedTopology: v.hasTag(TagLockedTopology), Users: []UserInfo{}}
		for _, p := range perms {
			if p.Vhost != v.Name {
				continue
			}
			ui := UserInfo{Name: p.User, Permissions: p.Permissions}
			if role, id, ok := parseUserName(v.Name, p.User); ok {
				ui.Role, ui.Agent = role, id
			}
			a.Users = append(a.Users, ui)
		}
		sort.Slice(a.Users, func(i, j int) bool { return a.Users[i].Name < a.Users[j].Name })
		apps = append(apps, a)
	}
	sort.Slice(apps, func(i, j int) bool { return apps[i].Name < apps[j].Name })
	return apps, nil
}

// naniteVhost returns the vhost of app, ErrNotFound when there is none and
// ErrNotNanite when it lacks the nanite tag.
func (c *client) naniteVhost(ctx context.Context, app string) (*vhostInfo, error) {
	v, err := c.getVhost(ctx, app)
	if isNotFound(err) {
		return nil, fmt.Errorf("provision: vhost %q: %w", app, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("provision: vhost %q: %w", app, err)
	}
	if !v.hasTag(TagNanite) {
		return nil, fmt.Errorf("provision: vhost %q has no %q tag: %w; refusing to touch it", app, TagNanite, ErrNotNanite)
	}
	return v, nil
}

// checkOwned fails when user has permissions on a vhost other than vhost:
// then it is not (only) the application's, whatever its name says.
func (c *client) checkOwned(ctx context.Context, user, vhost string) error {
	ps, err := c.userPermissions(ctx, user)
	if isNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("provision: permissions of user %q: %w", user, err)
	}
	for _, p := range ps {
		if p.Vhost != vhost {
			return fmt.Errorf("provision: user %q has permissions on vhost %q too; refusing to touch it", user, p.Vhost)
		}
	}
	return nil
}

// checkUsers fails when one of the users exists (unless rotate) or belongs
// to another vhost.
func (c *client) checkUsers(ctx context.Context, vhost string, specs []userSpec, app string, rotate bool) error {
	var existing []string
	for _, s := range specs {
		name := UserName(app, s.role, s.agent)
		ok, err := c.userExists(ctx, name)
		if err != nil {
			return fmt.Errorf("provision: look up user %q: %w", name, err)
		}
		if !ok {
			continue
		}
		if err := c.checkOwned(ctx, name, vhost); err != nil {
			return err
		}
		existing = append(existing, name)
	}
	if len(existing) > 0 && !rotate {
		return fmt.Errorf("provision: user %s %w (rotate to issue new passwords, or delete the application first)",
			strings.Join(existing, ", "), ErrExists)
	}
	return nil
}

// appUsers returns the users named after app that have no permissions
// outside app's vhost.
func (c *client) appUsers(ctx context.Context, app string) ([]string, error) {
	var users []struct {
		Name string `json:"name"`
	}
	if err := c.do(ctx, "GET", "/api/users", nil, &users); err != nil {
		return nil, fmt.Errorf("provision: list users: %w", err)
	}
	perms, err := c.listPermissions(ctx)
	if err != nil {
		return nil, fmt.Errorf("provision: list permissions: %w", err)
	}
	foreign := map[string]bool{}
	for _, p := range perms {
		if p.Vhost != app {
			foreign[p.User] = true
		}
	}
	var out []string
	for _, u := range users {
		if _, _, ok := parseUserName(app, u.Name); ok && !foreign[u.Name] {
			out = append(out, u.Name)
		}
	}
	return out, nil
}

// hasAccess reports whether the administrator has permissions on vhost.
func (c *client) hasAccess(ctx context.Context, vhost string) (bool, error) {
	ps, err := c.userPermissions(ctx, c.user)
	if err != nil {
		return false, fmt.Errorf("provision: permissions of %q: %w", c.user, err)
	}
	return slices.ContainsFunc(ps, func(p permissionInfo) bool { return p.Vhost == vhost }), nil
}

// declareTopology declares the exchanges and shared queues of the protocol
// (docs/protocol.md, "Topology"), exactly as participants declare them, so
// that none of them has to create them (creating a queue with a dead-letter
// exchange needs read permission on the queue, which agents must not have
// on the shared queues).
//
// The management API applies the administrator's own permissions on the
// vhost: unless keepAccess, the administrator has permissions there only
// for the time of the declarations.
func (c *client) declareTopology(ctx context.Context, vhost string, keepAccess bool) (err error) {
	if !keepAccess {
		has, err := c.hasAccess(ctx, vhost)
		if err != nil {
			return err
		}
		if !has {
			all := Permissions{Configure: ".*", Write: ".*", Read: ".*"}
			if err := c.putPermissions(ctx, vhost, c.user, all); err != nil {
				return fmt.Errorf("provision: give %q permissions on vhost %q for the declarations: %w", c.user, vhost, err)
			}
		}
		defer func() {
			derr := c.do(context.WithoutCancel(ctx), "DELETE", "/api/permissions/"+seg(vhost)+"/"+seg(c.user), nil, nil)
			if derr != nil && !isNotFound(derr) && err == nil {
				err = fmt.Errorf("provision: take back the permissions of %q on vhost %q: %w", c.user, vhost, derr)
			}
		}()
	}
	for _, e := range []struct{ name, kind string }{
		{ExchangeRegistration, "fanout"},
		{ExchangeHeartbeat, "fanout"},
		{ExchangeAdvertise, "fanout"},
		{ExchangeDead, "headers"},
	} {
		if err := c.putExchange(ctx, vhost, e.name, e.kind); err != nil {
			return fmt.Errorf("provision: declare exchange %s: %w", e.name, err)
		}
	}
	for _, q := range []string{QueueMapperRequests, QueueOffline} {
		if err := c.putQueue(ctx, vhost, q, map[string]any{"x-dead-letter-exchange": ExchangeDead}); err != nil {
			return fmt.Errorf("provision: declare queue %s: %w", q, err)
		}
	}
	return nil
}

// makeUser creates or updates one user with a new password and its
// permissions on vhost.
func (c *client) makeUser(ctx context.Context, vhost, app string, s userSpec, lock bool, amqpBase *url.URL) (*User, error) {
	name := UserName(app, s.role, s.agent)
	pass, err := newPassword()
	if err != nil {
		return nil, err
	}
	perms := PermissionsFor(s.role, s.agent, lock)
	if err := c.putUser(ctx, name, pass); err != nil {
		return nil, fmt.Errorf("provision: create user %q: %w", name, err)
	}
	if err := c.putPermissions(ctx, vhost, name, perms); err != nil {
		return nil, fmt.Errorf("provision: set permissions of %q on vhost %q: %w", name, vhost, err)
	}
	return &User{Role: s.role, Agent: s.agent, Name: name, Password: pass,
		URL: amqpURL(amqpBase, vhost, name, pass), Permissions: perms}, nil
}

// newPassword returns 256 random bits, URL-safe.
func newPassword() (string, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("provision: random password: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}

// amqpBase returns the AMQP address for credentials: raw, or one derived
// from the management API's URL.
func amqpBase(raw, mgmt string) (*url.URL, error) {
	if raw == "" {
		m, err := url.Parse(mgmt)
		if err != nil {
			return nil, fmt.Errorf("provision: management API URL: %w", err)
		}
		scheme, port := "amqp", "5672"
		if m.Scheme == "https" {
			scheme, port = "amqps", "5671"
		}
		host := m.Hostname()
		if strings.Contains(host, ":") {
			host = "[" + host + "]"
		}
		return &url.URL{Scheme: scheme, Host: host + ":" + port}, nil
	}
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("provision: AMQP URL: %w", err)
	}
	if u.Scheme != "amqp" && u.Scheme != "amqps" {
		return nil, fmt.Errorf("provision: AMQP URL %q: the scheme must be amqp or amqps", u.Redacted())
	}
	return u, nil
}

// amqpURL is base with user, password and vhost.
func amqpURL(base *url.URL, vhost, user, pass string) string {
	u := *base
	u.User = url.UserPassword(user, pass)
	u.Path = "/" + vhost
	u.RawPath = "/" + url.PathEscape(vhost)
	return u.String()
}
