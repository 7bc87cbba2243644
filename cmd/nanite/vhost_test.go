package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/nanite-go/nanite/nanite/provision"
	"github.com/nanite-go/nanite/testenv"
)

func TestVhostFlags(t *testing.T) {
	f, _, _ := testFactory("", nil)
	var got *VhostOptions
	capture := func(_ context.Context, o *VhostOptions) error { got = o; return nil }

	err := parse(t, NewCmdVhost(f, capture), "create", "shop", "--agent", "web-1,web-2", "--per-agent",
		"--lock-topology", "--no-bridge", "--rotate", "--out", "c.json", "--management", "http://m:15672",
		"--admin-user", "root", "--admin-password-file", "pw")
	if err != nil {
		t.Fatal(err)
	}
	if got.Action != "create" || got.App != "shop" || !slices.Equal(got.Agents, []string{"web-1", "web-2"}) ||
		!got.PerAgent || !got.LockTopology || !got.NoBridge || !got.Rotate || got.Out != "c.json" ||
		got.Management != "http://m:15672" || got.AdminUser != "root" || got.AdminPasswordFile != "pw" {
		t.Errorf("create options %+v", got)
	}
	if err := parse(t, NewCmdVhost(f, capture), "add-agent", "shop", "web-3", "--json"); err != nil ||
		got.Action != "add-agent" || got.App != "shop" || got.Agent != "web-3" || !got.JSON {
		t.Errorf("add-agent: %v %+v", err, got)
	}
	for _, c := range [][]string{{"delete", "shop"}, {"list"}, {"remove-agent", "shop", "web-3"}} {
		if err := parse(t, NewCmdVhost(f, capture), c...); err != nil || got.Action != c[0] {
			t.Errorf("%v: %v %+v", c, err, got)
		}
	}
	for _, bad := range [][]string{
		{"create"}, {"create", "a", "b"}, {"create", "a.b"}, {"create", "/"}, {"create", "shop", "--agent", "a b"},
		{"add-agent", "shop"}, {"add-agent", "shop", "bad id"}, {"delete"}, {"list", "x"},
		{"create", "shop", "--admin-password", "x", "--admin-password-file", "y"},
		{"create", "shop", "--timeout", "0s"},
	} {
		cmd := NewCmdVhost(f, func(context.Context, *VhostOptions) error { t.Errorf("%v: runF called", bad); return nil })
		if err := parse(t, cmd, bad...); exitCode(err) != exitUsage {
			t.Errorf("%v: %v, want a usage error", bad, err)
		}
	}
}

func TestVhostManagementConfig(t *testing.T) {
	dir := t.TempDir()
	pwFile := writeFile(t, filepath.Join(dir, "pw"), "from-file\n", 0o600)
	settings := func(url string) *Settings { return &Settings{URL: url} }
	for _, c := range []struct {
		name            string
		opts            VhostOptions
		env             map[string]string
		url             string
		mgmt, user, pwd string
	}{
		{"defaults from --url", VhostOptions{}, nil, "amqp://admin:s3cret@rabbit:5672/", "http://rabbit:15672", "admin", "s3cret"},
		{"amqps → https 15671", VhostOptions{}, nil, "amqps://admin:x@rabbit/", "https://rabbit:15671", "admin", "x"},
		{"env over --url", VhostOptions{}, map[string]string{envManagementURL: "http://m:1", envAdminUser: "root", envAdminPassword: "envpw"},
			"amqp://admin:s3cret@rabbit:5672/", "http://m:1", "root", "envpw"},
		{"flags over env", VhostOptions{Management: "http://flag:2", AdminUser: "flaguser", AdminPasswordFile: pwFile},
			map[string]string{envManagementURL: "http://m:1", envAdminUser: "root", envAdminPassword: "envpw"},
			"amqp://admin:s3cret@rabbit:5672/", "http://flag:2", "flaguser", "from-file"},
	} {
		o := c.opts
		o.LookupEnv = func(k string) (string, bool) { v, ok := c.env[k]; return v, ok }
		o.ReadFile = os.ReadFile
		api, err := o.managementConfig(settings(c.url))
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		if api.URL != c.mgmt || api.User != c.user || api.Password != c.pwd {
			t.Errorf("%s: %+v", c.name, api)
		}
	}
	if got := amqpBaseURL("amqps://u:p@rabbit.example/app"); got != "amqps://rabbit.example:5671" {
		t.Errorf("amqpBaseURL: %s", got)
	}
}

// TestVhostCommands provisions an application with the CLI, runs an agent
// and a requester with the printed credentials, checks that another
// application's credentials cannot reach it, and deletes it.
func TestVhostCommands(t *testing.T) {
	r := testenv.Rabbit(t)
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	app, other := "cli-"+hex.EncodeToString(b), "cli-other-"+hex.EncodeToString(b)
	dir := t.TempDir()
	pwFile := writeFile(t, filepath.Join(dir, "admin-pw"), "guest\n", 0o600)
	admin := []string{"--url", "amqp://" + r.Addr() + "/", "--management", r.ManagementURL(),
		"--admin-user", "guest", "--admin-password-file", pwFile}
	vhost := func(args ...string) result {
		return runCLI(t.Context(), "", append(append([]string{"vhost"}, args...), admin...)...)
	}
	t.Cleanup(func() {
		vhost("delete", app)
		vhost("delete", other)
	})

	// create --out: a 0600 file, nothing secret on stdout.
	out := filepath.Join(dir, "creds.json")
	res := vhost("create", app, "--agent", "web-1", "--out", out)
	if res.code != 0 {
		t.Fatalf("create: exit %d: %s %s", res.code, res.out, res.errOut)
	}
	st, err := os.Stat(out)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("credentials file: %v %v", st, err)
	}
	var creds provision.Credentials
	data, _ := os.ReadFile(out)
	if err := json.Unmarshal(data, &creds); err != nil || len(creds.Users) != 4 {
		t.Fatalf("credentials file: %v\n%s", err, data)
	}
	for _, u := range creds.Users {
		if strings.Contains(res.out, u.Password) {
			t.Errorf("stdout shows a password: %s", res.out)
		}
	}
	url := func(c *provision.Credentials, role provision.Role, id string) string {
		u := c.User(role, id)
		if u == nil {
			t.Fatalf("no %s %s user", role, id)
		}
		return u.URL
	}

	// Again: refused, nothing changed.
	if res := vhost("create", app); res.code != exitError || !strings.Contains(res.errOut, "already exists") {
		t.Errorf("create twice: exit %d: %s", res.code, res.errOut)
	}

	// The other application, printed as a table once.
	res = vhost("create", other)
	if res.code != 0 || !strings.Contains(res.out, "shown only this once") || !strings.Contains(res.out, other+".agent") {
		t.Fatalf("create %s: exit %d\n%s%s", other, res.code, res.out, res.errOut)
	}
	res = vhost("add-agent", other, "x-1", "--json")
	var added provision.Credentials
	if res.code != 0 || json.Unmarshal([]byte(res.out), &added) != nil || len(added.Users) != 1 {
		t.Fatalf("add-agent: exit %d\n%s%s", res.code, res.out, res.errOut)
	}

	// The cluster runs on the provisioned credentials.
	startDaemon(t, "agent", "--url", url(&creds, provision.RoleAgent, "web-1"), "--identity", "web-1",
		"--heartbeat", "500ms", "--shutdown-grace", "1s")
	startDaemon(t, "agent", "--url", url(&creds, provision.RoleAgent, ""), "--identity", "shared-1",
		"--heartbeat", "500ms", "--shutdown-grace", "1s")
	mapperURL := url(&creds, provision.RoleMapper, "")
	waitAgents(t, mapperURL, "web-1", "shared-1")
	for _, target := range []string{"web-1", "shared-1"} {
		res := runCLI(t.Context(), "", "request", "--url", mapperURL, "--target", target, "/echo/say", "hello")
		if res.code != 0 || res.out != "\"hello\"\n" {
			t.Errorf("request to %s: exit %d %q %s", target, res.code, res.out, res.errOut)
		}
	}
	// The per-agent user cannot run an agent under another identity.
	res = runCLI(t.Context(), "", "agent", "--url", url(&creds, provision.RoleAgent, "web-1"), "--identity", "web-2")
	if res.code != exitConnection || !strings.Contains(res.errOut, "ACCESS_REFUSED") {
		t.Errorf("agent web-2 with web-1's user: exit %d: %s", res.code, res.errOut)
	}
	// Another application's requester cannot reach this vhost.
	otherAgent := url(&added, provision.RoleAgent, "x-1")
	crossed := strings.TrimSuffix(otherAgent, "/"+other) + "/" + app
	res = runCLI(t.Context(), "", "request", "--url", crossed, "/echo/say", "hello")
	if res.code != exitConnection || !strings.Contains(res.errOut, "NOT_ALLOWED") {
		t.Errorf("request with %s's credentials on %s: exit %d: %s", other, app, res.code, res.errOut)
	}

	// list
	res = vhost("list", "--json")
	var apps []provision.App
	if res.code != 0 || json.Unmarshal([]byte(res.out), &apps) != nil {
		t.Fatalf("list: exit %d\n%s%s", res.code, res.out, res.errOut)
	}
	names := map[string]int{}
	for _, a := range apps {
		names[a.Name] = len(a.Users)
	}
	if names[app] != 4 || names[other] != 4 {
		t.Errorf("list: %v", names)
	}
	if res := vhost("list"); res.code != 0 || !strings.Contains(res.out, app+".agent.web-1") {
		t.Errorf("list: %s %s", res.out, res.errOut)
	}

	// remove-agent, delete, delete again.
	if res := vhost("remove-agent", other, "x-1"); res.code != 0 {
		t.Errorf("remove-agent: %s", res.errOut)
	}
	for range 2 {
		if res := vhost("delete", app); res.code != 0 {
			t.Errorf("delete: exit %d %s", res.code, res.errOut)
		}
	}
	if res := vhost("list"); strings.Contains(res.out, app+" ") {
		t.Errorf("list after delete: %s", res.out)
	}

	// A wrong administrator password: exit 6 with the API's answer.
	res = runCLI(t.Context(), "", "vhost", "list", "--management", r.ManagementURL(), "--admin-user", "guest", "--admin-password", "wrong")
	if res.code != exitConnection || !strings.Contains(res.errOut, "401 Unauthorized") {
		t.Errorf("wrong admin password: exit %d: %s", res.code, res.errOut)
	}
}
