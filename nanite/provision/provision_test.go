package provision_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"go/build"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/nanite/provision"
	"github.com/nanite-go/nanite/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// The package repeats the protocol's names instead of importing nanite.
func TestNamesMatchNanite(t *testing.T) {
	for got, want := range map[string]string{
		provision.ExchangeRegistration: nanite.ExchangeRegistration,
		provision.ExchangeHeartbeat:    nanite.ExchangeHeartbeat,
		provision.ExchangeAdvertise:    nanite.ExchangeAdvertise,
		provision.ExchangeDead:         nanite.ExchangeDead,
		provision.QueueMapperRequests:  nanite.QueueMapperRequests,
		provision.QueueOffline:         nanite.QueueOffline,
	} {
		if got != want {
			t.Errorf("provision says %q, nanite %q", got, want)
		}
	}
	for _, id := range []string{"a", "agent-1f2e", "web.1:eu_x-y", "a b", "", ".x", strings.Repeat("x", 129)} {
		if provision.ValidAgentID(id) != nanite.ValidIdentity(id) {
			t.Errorf("ValidAgentID(%q) disagrees with nanite.ValidIdentity", id)
		}
	}
}

// The package speaks HTTP only: no AMQP client, not even through nanite.
func TestNoAMQPImport(t *testing.T) {
	pkg, err := build.ImportDir(".", 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, imp := range pkg.Imports {
		if strings.Contains(imp, "amqp") || strings.HasPrefix(imp, "github.com/nanite-go/") {
			t.Errorf("provision imports %s", imp)
		}
	}
}

// match evaluates a RabbitMQ permission regex with Go's regexp: the
// expressions use only syntax that PCRE and RE2 read alike.
func match(t *testing.T, re, name string) bool {
	t.Helper()
	return regexp.MustCompile(re).MatchString(name)
}

// TestPermissionTable spells out, name by name, what each role may
// configure, write and read. The broker tests in nanite/isolation_test.go
// prove that these are the rights the protocol needs.
func TestPermissionTable(t *testing.T) {
	type row struct {
		name                   string
		configure, write, read bool
	}
	shared := func(configure bool) []row {
		return []row{
			{"nanite.registration", configure, true, false},
			{"nanite.heartbeat", configure, true, false},
			{"nanite.advertise", configure, false, true},
			{"nanite.dead", configure, true, true},
			{"nanite.mapper.requests", configure, false, false},
			{"nanite.offline", configure, false, false},
		}
	}
	agentRows := func(lock bool) []row {
		return append(shared(!lock),
			row{"nanite.agent.a-1", true, true, true},
			row{"nanite.reply.a-1", true, true, true},
			row{"nanite.agent.a-2", false, false, false},
			row{"nanite.reply.a-2", false, false, false},
			row{"nanite.agent.a-10", false, false, false}, // no prefix match
			row{"nanite.agent.a-1x", false, false, false},
			row{"nanite.agent.a.1", false, false, false}, // the dot is quoted
			row{"nanite.mapper.m.registration", false, false, false},
			row{"amq.default", false, true, false},
			row{"amq.topic", false, false, false},
			row{"evil", false, false, false},
			row{"nanite.evil", false, false, false},
		)
	}
	mapperRows := func(lock bool) []row {
		return []row{
			{"nanite.registration", !lock, false, true},
			{"nanite.heartbeat", !lock, false, true},
			{"nanite.advertise", !lock, true, false},
			{"nanite.dead", !lock, !lock, true},
			{"nanite.mapper.requests", !lock, false, true},
			{"nanite.offline", !lock, false, true},
			{"nanite.mapper.mapper-1.registration", true, true, true},
			{"nanite.mapper.mapper-1.heartbeat", true, true, true},
			{"nanite.mapper.mapper-1.other", false, false, false},
			{"nanite.reply.mapper-1", true, true, true},
			{"nanite.agent.a-1", false, false, false},
			{"amq.default", false, true, false},
			{"amq.fanout", false, false, false},
			{"amq.gen-xyz", false, false, false},
			{"evil", false, false, false},
		}
	}
	for _, lock := range []bool{false, true} {
		check := func(who string, p provision.Permissions, rows []row) {
			for _, r := range rows {
				if got := match(t, p.Configure, r.name); got != r.configure {
					t.Errorf("%s (lock %v): configure %s = %v", who, lock, r.name, got)
				}
				if got := match(t, p.Write, r.name); got != r.write {
					t.Errorf("%s (lock %v): write %s = %v", who, lock, r.name, got)
				}
				if got := match(t, p.Read, r.name); got != r.read {
					t.Errorf("%s (lock %v): read %s = %v", who, lock, r.name, got)
				}
			}
		}
		check("agent a-1", provision.AgentPermissions("a-1", lock), agentRows(lock))
		check("mapper", provision.MapperPermissions(lock), mapperRows(lock))
		check("bridge", provision.BridgePermissions(lock), mapperRows(lock))
		// The shared agent user: every agent's queues are "its own".
		shared := provision.AgentPermissions("", lock)
		for _, q := range []string{"nanite.agent.a-2", "nanite.reply.x.y"} {
			if !match(t, shared.Configure, q) || !match(t, shared.Read, q) {
				t.Errorf("shared agent user cannot use %s", q)
			}
		}
		for _, q := range []string{"nanite.mapper.m.registration", "nanite.mapper.requests", "nanite.offline"} {
			if match(t, shared.Read, q) {
				t.Errorf("shared agent user may read %s", q)
			}
		}
	}
}

func TestNames(t *testing.T) {
	for _, c := range []struct {
		role     provision.Role
		id, want string
	}{
		{provision.RoleMapper, "", "shop.mapper"},
		{provision.RoleBridge, "", "shop.bridge"},
		{provision.RoleAgent, "", "shop.agent"},
		{provision.RoleAgent, "web-1", "shop.agent.web-1"},
	} {
		if got := provision.UserName("shop", c.role, c.id); got != c.want {
			t.Errorf("UserName(%s, %q) = %q", c.role, c.id, got)
		}
	}
	for app, ok := range map[string]bool{"shop": true, "shop-eu_2": true, "a.b": false, "/": false, "": false, "-x": false, strings.Repeat("a", 65): false} {
		if provision.ValidApp(app) != ok {
			t.Errorf("ValidApp(%q) != %v", app, ok)
		}
	}
}

// API errors name the status and the API's reason.
func TestAPIError(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.EscapedPath() == "/api/vhosts/shop":
			w.WriteHeader(http.StatusNotFound)
			_, _ = w.Write([]byte(`{"error":"Object Not Found","reason":"Not Found"}`))
		case r.URL.Path == "/api/users" || r.URL.Path == "/api/permissions":
			_, _ = w.Write([]byte(`[]`))
		default:
			w.WriteHeader(http.StatusUnauthorized)
			_, _ = w.Write([]byte(`{"error":"not_authorized","reason":"Login failed"}`))
		}
	}))
	defer srv.Close()
	api := provision.ManagementConfig{URL: srv.URL, User: "admin", Password: "x"}
	_, err := provision.List(t.Context(), api)
	var aerr *provision.APIError
	if !errors.As(err, &aerr) || aerr.Status != 401 || !errors.Is(err, provision.ErrUnauthorized) ||
		!strings.Contains(err.Error(), "401 Unauthorized: not_authorized: Login failed") {
		t.Errorf("List: %v", err)
	}
	err = provision.Delete(t.Context(), api, "shop")
	if err != nil {
		t.Errorf("Delete of a missing vhost: %v", err)
	}
	if _, err := provision.AddAgent(t.Context(), api, "shop", "a-1", provision.Options{}); !errors.Is(err, provision.ErrNotFound) {
		t.Errorf("AddAgent to a missing app: %v", err)
	}
	if _, err := provision.Provision(t.Context(), api, "a.b", provision.Options{}); err == nil || !strings.Contains(err.Error(), "invalid application name") {
		t.Errorf("bad app name: %v", err)
	}
	if _, err := provision.Provision(t.Context(), api, "ok", provision.Options{Agents: []string{"bad id"}}); err == nil || !strings.Contains(err.Error(), "invalid agent identity") {
		t.Errorf("bad agent id: %v", err)
	}
	e := &provision.APIError{Method: "PUT", Path: "/api/queues/shop/nanite.offline", Status: 400,
		ErrorKind: "bad_request", Reason: "inequivalent arg 'durable'"}
	if e.Error() != "management API PUT /api/queues/shop/nanite.offline: 400 Bad Request: bad_request: inequivalent arg 'durable'" {
		t.Errorf("APIError: %s", e)
	}
	if _, err := provision.List(t.Context(), provision.ManagementConfig{URL: "amqp://x"}); err == nil {
		t.Error("amqp:// management URL accepted")
	}
}

func randomApp(prefix string) string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// TestLifecycle: create, refuse to create twice, rotate, list, add and
// remove an agent, delete (twice), against a real broker.
func TestLifecycle(t *testing.T) {
	r := testenv.Rabbit(t)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	api := provision.ManagementConfig{URL: r.ManagementURL(), User: "guest", Password: "guest"}
	app := randomApp("life-")
	t.Cleanup(func() { _ = provision.Delete(context.Background(), api, app) })

	creds, err := provision.Provision(ctx, api, app, provision.Options{Agents: []string{"web-1"}, AMQPURL: "amqp://" + r.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	if creds.Vhost != app || len(creds.Users) != 4 {
		t.Fatalf("credentials %+v", creds)
	}
	for _, u := range creds.Users {
		if len(u.Password) < 40 || !strings.HasPrefix(u.URL, "amqp://"+u.Name+":") || !strings.HasSuffix(u.URL, r.Addr()+"/"+app) {
			t.Errorf("user %+v", u)
		}
	}
	// The administrator was given no lasting access to the vhost.
	var perms []map[string]string
	if err := r.API(ctx, "GET", "/api/vhosts/"+app+"/permissions", nil, &perms); err != nil {
		t.Fatal(err)
	}
	if len(perms) != 4 {
		t.Errorf("permissions on the vhost: %v", perms)
	}
	// Only on their own vhost.
	for _, u := range creds.Users {
		var up []map[string]string
		if err := r.API(ctx, "GET", "/api/users/"+u.Name+"/permissions", nil, &up); err != nil {
			t.Fatal(err)
		}
		if len(up) != 1 || up[0]["vhost"] != app {
			t.Errorf("%s has permissions %v", u.Name, up)
		}
	}
	// The topology is there, exactly as participants declare it.
	var q struct {
		Durable   bool           `json:"durable"`
		Arguments map[string]any `json:"arguments"`
	}
	if err := r.API(ctx, "GET", "/api/queues/"+app+"/nanite.mapper.requests", nil, &q); err != nil || !q.Durable ||
		q.Arguments["x-dead-letter-exchange"] != "nanite.dead" {
		t.Errorf("shared queue: %+v %v", q, err)
	}

	// Twice: refused before anything changes; with Rotate: new passwords.
	if _, err := provision.Provision(ctx, api, app, provision.Options{}); !errors.Is(err, provision.ErrExists) {
		t.Fatalf("second Provision: %v", err)
	}
	again, err := provision.Provision(ctx, api, app, provision.Options{Agents: []string{"web-1"}, Rotate: true, AMQPURL: "amqp://" + r.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	if again.User(provision.RoleMapper, "").Password == creds.User(provision.RoleMapper, "").Password {
		t.Error("Rotate kept the password")
	}

	// AddAgent, then List shows every user with its role.
	u, err := provision.AddAgent(ctx, api, app, "web-2", provision.Options{AMQPURL: "amqp://" + r.Addr()})
	if err != nil || u.Name != app+".agent.web-2" || u.Agent != "web-2" {
		t.Fatalf("AddAgent: %+v %v", u, err)
	}
	if _, err := provision.AddAgent(ctx, api, app, "web-2", provision.Options{}); !errors.Is(err, provision.ErrExists) {
		t.Errorf("AddAgent twice: %v", err)
	}
	apps, err := provision.List(ctx, api)
	if err != nil {
		t.Fatal(err)
	}
	var found *provision.App
	for i := range apps {
		if apps[i].Name == app {
			found = &apps[i]
		}
	}
	if found == nil {
		t.Fatalf("List: %s missing from %+v", app, apps)
	}
	roles := map[string]string{}
	for _, u := range found.Users {
		roles[u.Name] = string(u.Role) + "/" + u.Agent
	}
	want := map[string]string{app + ".mapper": "mapper/", app + ".bridge": "bridge/", app + ".agent": "agent/",
		app + ".agent.web-1": "agent/web-1", app + ".agent.web-2": "agent/web-2"}
	if len(roles) != len(want) {
		t.Errorf("List users %v, want %v", roles, want)
	}
	for k, v := range want {
		if roles[k] != v {
			t.Errorf("List: %s is %q, want %q", k, roles[k], v)
		}
	}
	if err := provision.RemoveAgent(ctx, api, app, "web-2"); err != nil {
		t.Fatal(err)
	}
	if err := r.API(ctx, "GET", "/api/users/"+app+".agent.web-2", nil, nil); err == nil {
		t.Error("RemoveAgent left the user")
	}

	// A vhost nanite did not make is not deleted.
	other := randomApp("foreign-")
	if err := r.AddVhost(ctx, other); err != nil {
		t.Fatal(err)
	}
	defer r.DeleteVhost(context.Background(), other)
	if err := provision.Delete(ctx, api, other); !errors.Is(err, provision.ErrNotNanite) {
		t.Errorf("Delete of a foreign vhost: %v", err)
	}
	// A user named like the app's but with rights elsewhere is not touched.
	if err := r.AddUser(ctx, app+".agent.x", "pw"); err != nil {
		t.Fatal(err)
	}
	defer r.DeleteUser(context.Background(), app+".agent.x")
	if err := r.SetPermissions(ctx, other, app+".agent.x", ".*", ".*", ".*"); err != nil {
		t.Fatal(err)
	}
	if _, err := provision.AddAgent(ctx, api, app, "x", provision.Options{Rotate: true}); err == nil || !strings.Contains(err.Error(), "refusing") {
		t.Errorf("AddAgent over a foreign user: %v", err)
	}

	if err := provision.Delete(ctx, api, app); err != nil {
		t.Fatal(err)
	}
	for _, u := range again.Users {
		if err := r.API(ctx, "GET", "/api/users/"+u.Name, nil, nil); err == nil {
			t.Errorf("Delete left user %s", u.Name)
		}
	}
	if err := r.API(ctx, "GET", "/api/users/"+app+".agent.x", nil, nil); err != nil {
		t.Errorf("Delete removed a user with rights elsewhere: %v", err)
	}
	if err := provision.Delete(ctx, api, app); err != nil {
		t.Errorf("Delete again: %v", err)
	}

	// Wrong administrator password: a clear 401.
	bad := api
	bad.Password = "wrong"
	if _, err := provision.Provision(ctx, bad, randomApp("x-"), provision.Options{}); !errors.Is(err, provision.ErrUnauthorized) ||
		!strings.Contains(err.Error(), "401") {
		t.Errorf("wrong admin password: %v", err)
	}
}
