package security

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const testPolicy = `
rules:
  - name: no-prod-shutdown
    effect: deny
    callers: ["*"]
    services: ["/ops/shutdown"]
    tags: ["env:prod"]
  - name: ops
    effect: allow
    callers: ["ops-*", "role:client"]
    services: ["/ops/*"]
  - name: remote-site
    effect: allow
    callers: ["jid:*@site-b.example", "jid:admin@site-c.example/console"]
    services: ["/ops/status", "/nanite/*"]
  - effect: deny
    callers: ["mapper-evil"]
    services: ["*"]
  - name: mappers
    effect: allow
    callers: ["role:mapper"]
    services: ["*"]
  - name: gpu
    effect: allow
    callers: ["*"]
    services: ["/ml/train"]
    tags: ["gpu", "region:eu"]
`

func mustPolicy(t testing.TB, src string) *Policy {
	t.Helper()
	p, err := ParsePolicy([]byte(src))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestPolicyDecide(t *testing.T) {
	p := mustPolicy(t, testPolicy)
	ops := Caller{Name: "ops-1", Role: RoleAgent}
	for _, tc := range []struct {
		caller  Caller
		service string
		tags    []string
		allowed bool
		rule    string
	}{
		{ops, "/ops/restart", nil, true, "ops"},
		{ops, "/ops/deep/path", nil, true, "ops"}, // '*' crosses '/'
		{ops, "/opsx/restart", nil, false, "default deny"},
		{ops, "/ops/shutdown", []string{"env:prod"}, false, "no-prod-shutdown"}, // first match wins
		{ops, "/ops/shutdown", []string{"env:dev"}, true, "ops"},                // tags must match
		{Caller{Name: "dev-1", Role: RoleAgent}, "/ops/restart", nil, false, "default deny"},
		{Caller{Name: "cli", Role: RoleClient}, "/ops/restart", nil, true, "ops"},
		{Caller{Name: "cli", Role: RoleClient}, "/db/drop", nil, false, "default deny"},
		{Caller{Name: "mapper-1", Role: RoleMapper}, "/db/drop", nil, true, "mappers"},
		{Caller{Name: "mapper-evil", Role: RoleMapper}, "/db/drop", nil, false, "#4"},
		{Caller{JID: "alice@site-b.example/laptop"}, "/ops/status", nil, true, "remote-site"},
		{Caller{JID: "Alice@Site-B.example"}, "/nanite/info", nil, true, "remote-site"},
		{Caller{JID: "alice@site-b.example.evil"}, "/ops/status", nil, false, "default deny"},
		{Caller{JID: "alice@site-b.example"}, "/ops/restart", nil, false, "default deny"},
		{Caller{JID: "admin@site-c.example/console"}, "/ops/status", nil, true, "remote-site"},
		{Caller{JID: "admin@site-c.example/phone"}, "/ops/status", nil, false, "default deny"},
		{Caller{JID: "admin@site-c.example"}, "/ops/status", nil, false, "default deny"},
		{Caller{JID: "ops-1@site-x.example"}, "/ops/restart", nil, false, "default deny"}, // name patterns need a name
		{Caller{Name: "x"}, "/ml/train", []string{"gpu", "region:eu", "big"}, true, "gpu"},
		{Caller{Name: "x"}, "/ml/train", []string{"gpu"}, false, "default deny"},
		{Caller{JID: "bob@anywhere"}, "/ml/train", []string{"region:eu", "gpu"}, true, "gpu"}, // "*" matches any caller
	} {
		d := p.Decide(tc.caller, tc.service, tc.tags)
		if d.Allowed != tc.allowed || d.Rule != tc.rule {
			t.Errorf("%v calling %s %v: %+v, want allowed=%v rule %q", tc.caller, tc.service, tc.tags, d, tc.allowed, tc.rule)
		}
		if (d.Err() == nil) != tc.allowed || (!tc.allowed && !errors.Is(d.Err(), ErrNotAuthorized)) {
			t.Errorf("Err() = %v", d.Err())
		}
	}
	d := p.Decide(ops, "/ops/shutdown", []string{"env:prod"})
	if d.Index != 1 || !strings.Contains(d.Reason, `rule "no-prod-shutdown" (#1) denies`) {
		t.Errorf("reason %+v", d)
	}
	d = p.Decide(Caller{Name: "z"}, "/x/y", nil)
	if d.Index != 0 || !strings.Contains(d.Reason, "default deny") || Reason(d.Err()) != ReasonNotAuthorized {
		t.Errorf("default deny %+v", d)
	}
}

func TestPolicyDefaultDeny(t *testing.T) {
	var nilPolicy *Policy
	for _, p := range []*Policy{nilPolicy, mustPolicy(t, ""), mustPolicy(t, "rules: []"), mustPolicy(t, `{"rules":[]}`)} {
		if d := p.Decide(Caller{Name: "root", Role: RoleMapper}, "/a/b", nil); d.Allowed || d.Rule != "default deny" {
			t.Errorf("%+v", d)
		}
	}
}

func TestPolicyNamePatternsNeedName(t *testing.T) {
	p := mustPolicy(t, `{"rules":[{"effect":"allow","callers":["name:*","**"],"services":["*"]}]}`)
	if d := p.Decide(Caller{JID: "a@b.example"}, "/a/b", nil); d.Allowed {
		t.Errorf("a name pattern matched a caller without a name: %+v", d)
	}
	if d := p.Decide(Caller{Name: "n"}, "/a/b", nil); !d.Allowed {
		t.Errorf("control: %+v", d)
	}
}

func TestPolicyOrder(t *testing.T) {
	allowFirst := mustPolicy(t, `{"rules":[
		{"effect":"allow","callers":["*"],"services":["/a/*"]},
		{"effect":"deny","callers":["*"],"services":["/a/b"]}]}`)
	denyFirst := mustPolicy(t, `{"rules":[
		{"effect":"deny","callers":["*"],"services":["/a/b"]},
		{"effect":"allow","callers":["*"],"services":["/a/*"]}]}`)
	c := Caller{Name: "n"}
	if d := allowFirst.Decide(c, "/a/b", nil); !d.Allowed || d.Index != 1 {
		t.Errorf("allow first: %+v", d)
	}
	if d := denyFirst.Decide(c, "/a/b", nil); d.Allowed || d.Index != 1 {
		t.Errorf("deny first: %+v", d)
	}
	if d := denyFirst.Decide(c, "/a/c", nil); !d.Allowed || d.Index != 2 {
		t.Errorf("deny first, other service: %+v", d)
	}
}

func TestPolicyJSONEqualsYAML(t *testing.T) {
	y := mustPolicy(t, testPolicy)
	j := mustPolicy(t, `{"version":1,"rules":[
		{"name":"no-prod-shutdown","effect":"deny","callers":["*"],"services":["/ops/shutdown"],"tags":["env:prod"]},
		{"name":"ops","effect":"allow","callers":["ops-*","role:client"],"services":["/ops/*"]}]}`)
	for i, r := range j.Rules() {
		yr := y.Rules()[i]
		if r.Name != yr.Name || r.Effect != yr.Effect || strings.Join(r.Callers, ",") != strings.Join(yr.Callers, ",") {
			t.Errorf("rule %d: %+v vs %+v", i, r, yr)
		}
	}
}

func TestGlob(t *testing.T) {
	for _, tc := range []struct {
		p, s string
		want bool
	}{
		{"*", "", true}, {"*", "/a/b", true}, {"", "", true}, {"", "a", false},
		{"ops-*", "ops-1", true}, {"ops-*", "ops-", true}, {"ops-*", "op-1", false},
		{"*-prod", "db-prod", true}, {"*-prod", "db-prod2", false},
		{"a*b*c", "abc", true}, {"a*b*c", "aXbYc", true}, {"a*b*c", "aXbY", false}, {"a*b*c", "acbc", true},
		{"/ops/*", "/ops/x", true}, {"/ops/*", "/ops", false}, {"/ops/*", "/ops/a/b", true},
		{"*@site-b.example", "u@site-b.example", true}, {"*@site-b.example", "u@site-b.example.evil", false},
		{"a**b", "ab", true}, {"exact", "exact", true}, {"exact", "exacT", false},
	} {
		if got := glob(tc.p, tc.s); got != tc.want {
			t.Errorf("glob(%q, %q) = %v", tc.p, tc.s, got)
		}
	}
}

func TestPolicyInvalid(t *testing.T) {
	for _, tc := range []struct{ src, want string }{
		{"rules:\n  - effect: permit\n    callers: ['*']\n    services: ['*']", `rule 1: effect: "permit"`},
		{"rules:\n  - name: r\n    effect: allow\n    services: ['*']", `rule 1 ("r"): callers: empty`},
		{"rules:\n  - effect: allow\n    callers: ['*']", "rule 1: services: empty"},
		{"rules:\n  - {effect: allow, callers: ['*'], services: ['*']}\n  - {effect: allow, callers: ['role:admin'], services: ['*']}", `rule 2: callers[0]: unknown role "admin"`},
		{"rules:\n  - {effect: allow, callers: ['*', 'a b'], services: ['*']}", "rule 1: callers[1]: invalid caller"},
		{"rules:\n  - {effect: allow, callers: ['jid:'], services: ['*']}", "rule 1: callers[0]: invalid JID pattern"},
		{"rules:\n  - {effect: allow, callers: ['*'], services: ['ops/x']}", `rule 1: services[0]: "ops/x"`},
		{"rules:\n  - {effect: allow, callers: ['*'], services: ['*'], tags: ['']}", "rule 1: tags[0]: empty tag"},
		{"rules:\n  - {name: a, effect: allow, callers: ['*'], services: ['*']}\n  - {name: a, effect: deny, callers: ['*'], services: ['*']}", `rule 2 ("a"): name: "a" is also the name of rule 1`},
		{"rules:\n  - {effect: allow, caller: ['*'], services: ['*']}", "field caller not found"},
		{`{"rules":[{"effect":"allow","callers":["*"],"services":["*"],"extra":1}]}`, `unknown field "extra"`},
		{`{"rules":[]} {}`, "trailing data"},
		{`{"rules":`, "JSON"},
		{"rules: [", "YAML"},
		{"version: 2\nrules: []", "version 2"},
	} {
		_, err := ParsePolicy([]byte(tc.src))
		if !errors.Is(err, ErrBadPolicy) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParsePolicy(%q) = %v, want ErrBadPolicy mentioning %q", tc.src, err, tc.want)
		}
	}
	if _, err := LoadPolicy(filepath.Join(t.TempDir(), "missing.yaml")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
}

func TestPolicyHolderReload(t *testing.T) {
	path := filepath.Join(t.TempDir(), "policy.yaml")
	write := func(s string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	allowA := "rules:\n  - {name: a, effect: allow, callers: ['*'], services: ['/a/*']}\n"
	allowB := "rules:\n  - {name: b, effect: allow, callers: ['*'], services: ['/b/*']}\n"
	c := Caller{Name: "x"}
	if _, err := NewPolicyHolder(path, nil); err == nil {
		t.Fatal("NewPolicyHolder with no file succeeded")
	}
	write(allowA)
	h, err := NewPolicyHolder(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !h.Decide(c, "/a/x", nil).Allowed || h.Decide(c, "/b/x", nil).Allowed {
		t.Fatal("initial policy")
	}
	write("rules:\n  - {effect: maybe}\n")
	if err := h.Reload(); !errors.Is(err, ErrBadPolicy) {
		t.Fatalf("Reload of a bad file: %v", err)
	}
	if !h.Decide(c, "/a/x", nil).Allowed {
		t.Fatal("bad file replaced the policy")
	}
	os.Remove(path)
	if err := h.Reload(); err == nil || !h.Decide(c, "/a/x", nil).Allowed {
		t.Fatalf("missing file: %v", err)
	}
	write(allowB)
	if err := h.Reload(); err != nil {
		t.Fatal(err)
	}
	if h.Decide(c, "/a/x", nil).Allowed || !h.Decide(c, "/b/x", nil).Allowed {
		t.Fatal("reloaded policy not in force")
	}
}

func TestPolicyHolderWatch(t *testing.T) {
	path := filepath.Join(t.TempDir(), "policy.json")
	os.WriteFile(path, []byte(`{"rules":[{"effect":"allow","callers":["*"],"services":["/a/*"]}]}`), 0o644)
	h, err := NewPolicyHolder(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- h.Watch(ctx, 5*time.Millisecond) }()
	c := Caller{Name: "x"}
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	// A bad file is ignored ...
	os.WriteFile(path, []byte(`{"rules":[{"effect":"allow"}]}`), 0o644)
	time.Sleep(50 * time.Millisecond)
	if !h.Decide(c, "/a/x", nil).Allowed {
		t.Fatal("bad file replaced the policy")
	}
	// ... and a good one picked up (size differs from the bad one).
	os.WriteFile(path, []byte(`{"rules":[{"effect":"allow","callers":["*"],"services":["/b/*"]}]}`), 0o644)
	waitFor("the new policy", func() bool { return h.Decide(c, "/b/x", nil).Allowed })
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("Watch returned %v", err)
	}
}
