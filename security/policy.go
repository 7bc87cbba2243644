package security

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"go.yaml.in/yaml/v3"
)

// Effect is what a matching rule decides.
type Effect string

// The effects.
const (
	Allow Effect = "allow"
	Deny  Effect = "deny"
)

// Rule is one rule of a policy. A rule matches a call when one of its
// callers matches the caller, one of its services matches the service, and
// the agent carries every one of its tags.
//
// Caller patterns:
//
//	"*"              any authenticated caller
//	"ops-*"          a certificate name, '*' matching any run of characters
//	"name:ops-*"     the same, explicitly (needed for a name that starts
//	                 with "role:" or "jid:")
//	"role:client"    any caller whose certificate has that role
//	"jid:alice@site-b.example"   an XMPP caller (from the bridge); without
//	"jid:*@site-b.example"       a '/', the pattern is matched against the
//	"jid:ops@a.example/laptop"   bare JID, with one, against the full JID;
//	                             JIDs are compared case-insensitively
//
// Service patterns: "*" (any service), an exact service "/ops/restart", or a
// glob "/ops/*" ('*' matches any run of characters, '/' included).
type Rule struct {
	Name     string   `json:"name,omitempty" yaml:"name,omitempty"`
	Effect   Effect   `json:"effect" yaml:"effect"`
	Callers  []string `json:"callers" yaml:"callers"`
	Services []string `json:"services" yaml:"services"`
	Tags     []string `json:"tags,omitempty" yaml:"tags,omitempty"`
}

// policyFile is the file format: {"rules": [...]} in JSON or YAML.
type policyFile struct {
	Version int    `json:"version,omitempty" yaml:"version,omitempty"`
	Rules   []Rule `json:"rules" yaml:"rules"`
}

// Policy is a parsed, validated authorization policy: rules in order, the
// first match wins, and a call no rule matches is denied. A nil *Policy
// denies everything. A Policy is immutable and safe for concurrent use.
type Policy struct {
	rules []compiledRule
}

type compiledRule struct {
	Rule
	label    string // `"name" (#2)` or `#2`
	callers  []callerPattern
	services []string
}

type callerKind int

const (
	callerAny callerKind = iota
	callerName
	callerRole
	callerJID
	callerFullJID
)

type callerPattern struct {
	kind    callerKind
	pattern string
}

// Caller is who asks: the certificate name and role of an envelope's
// signer, or the JID of an XMPP caller relayed by the bridge (Name empty).
type Caller struct {
	Name string
	Role Role
	JID  string
}

func (c Caller) String() string {
	var parts []string
	if c.Name != "" {
		parts = append(parts, fmt.Sprintf("%q", c.Name))
	}
	if c.Role != "" {
		parts = append(parts, "role "+string(c.Role))
	}
	if c.JID != "" {
		parts = append(parts, "jid "+c.JID)
	}
	if len(parts) == 0 {
		return "anonymous caller"
	}
	return strings.Join(parts, ", ")
}

// Decision is the outcome of (*Policy).Decide and says why.
type Decision struct {
	Allowed bool
	// Rule is the deciding rule's name, or "#N" for an unnamed rule, or
	// "default deny".
	Rule string
	// Index is the deciding rule's 1-based position, 0 for default deny.
	Index int
	// Reason is a sentence for operators and logs.
	Reason string
}

// Err returns nil for an allowed call and an *Error wrapping
// ErrNotAuthorized for a denied one.
func (d Decision) Err() error {
	if d.Allowed {
		return nil
	}
	return newError(ErrNotAuthorized, "", nil, "%s", d.Reason)
}

// Rules returns a copy of the policy's rules.
func (p *Policy) Rules() []Rule {
	if p == nil {
		return nil
	}
	out := make([]Rule, len(p.rules))
	for i, r := range p.rules {
		out[i] = r.Rule
	}
	return out
}

// Decide returns whether caller may call service on an agent carrying
// agentTags, and which rule decided.
func (p *Policy) Decide(caller Caller, service string, agentTags []string) Decision {
	if p != nil {
		for i := range p.rules {
			r := &p.rules[i]
			if !r.matchCaller(caller) || !r.matchService(service) || !hasAll(agentTags, r.Tags) {
				continue
			}
			verb := "allows"
			if r.Effect == Deny {
				verb = "denies"
			}
			return Decision{
				Allowed: r.Effect == Allow,
				Rule:    r.ruleName(i),
				Index:   i + 1,
				Reason:  fmt.Sprintf("rule %s %s %s to call %s", r.label, verb, caller, service),
			}
		}
	}
	return Decision{
		Rule:   "default deny",
		Reason: fmt.Sprintf("no rule matches %s calling %s: default deny", caller, service),
	}
}

func (r *compiledRule) ruleName(i int) string {
	if r.Name != "" {
		return r.Name
	}
	return fmt.Sprintf("#%d", i+1)
}

func (r *compiledRule) matchCaller(c Caller) bool {
	for _, p := range r.callers {
		switch p.kind {
		case callerAny:
			return true
		case callerName:
			if c.Name != "" && glob(p.pattern, c.Name) {
				return true
			}
		case callerRole:
			if c.Role != "" && string(c.Role) == p.pattern {
				return true
			}
		case callerJID:
			bare, _, _ := strings.Cut(c.JID, "/")
			if bare != "" && glob(p.pattern, strings.ToLower(bare)) {
				return true
			}
		case callerFullJID:
			if c.JID != "" && glob(p.pattern, strings.ToLower(c.JID)) {
				return true
			}
		}
	}
	return false
}

func (r *compiledRule) matchService(s string) bool {
	for _, p := range r.services {
		if glob(p, s) {
			return true
		}
	}
	return false
}

func hasAll(have, want []string) bool {
	for _, w := range want {
		found := false
		for _, h := range have {
			if h == w {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// glob reports whether s matches pattern, where '*' matches any run of
// characters (including none and '/') and every other byte matches itself.
func glob(pattern, s string) bool {
	p, i := 0, 0
	star, mark := -1, 0
	for i < len(s) {
		switch {
		case p < len(pattern) && pattern[p] == '*':
			star, mark = p, i
			p++
		case p < len(pattern) && pattern[p] == s[i]:
			p++
			i++
		case star >= 0:
			p = star + 1
			mark++
			i = mark
		default:
			return false
		}
	}
	for p < len(pattern) && pattern[p] == '*' {
		p++
	}
	return p == len(pattern)
}

// LoadPolicy reads and validates a policy file (see ParsePolicy).
func LoadPolicy(path string) (*Policy, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("security: read policy: %w", err)
	}
	p, err := ParsePolicy(data)
	if err != nil {
		return nil, fmt.Errorf("%w (%s)", err, path)
	}
	return p, nil
}

// ParsePolicy parses and validates a policy, JSON if it starts with '{',
// YAML otherwise:
//
//	rules:
//	  - name: no-prod-shutdown
//	    effect: deny
//	    callers: ["*"]
//	    services: ["/ops/shutdown"]
//	    tags: ["env:prod"]
//	  - name: ops
//	    effect: allow
//	    callers: ["ops-*", "role:client", "jid:*@site-b.example"]
//	    services: ["/ops/*"]
//	  - name: introspection
//	    effect: allow
//	    callers: ["*"]
//	    services: ["/nanite/*"]
//
// Unknown fields are errors. Errors wrap ErrBadPolicy and name the rule
// (1-based) and field.
func ParsePolicy(data []byte) (*Policy, error) {
	var f policyFile
	trimmed := bytes.TrimLeft(data, " \t\r\n")
	if len(trimmed) > 0 && trimmed[0] == '{' {
		dec := json.NewDecoder(bytes.NewReader(data))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&f); err != nil {
			return nil, newError(ErrBadPolicy, "", err, "JSON")
		}
		if _, err := dec.Token(); err != io.EOF {
			return nil, newError(ErrBadPolicy, "", nil, "JSON: trailing data after the policy object")
		}
	} else {
		dec := yaml.NewDecoder(bytes.NewReader(data))
		dec.KnownFields(true)
		if err := dec.Decode(&f); err != nil && !errors.Is(err, io.EOF) {
			return nil, newError(ErrBadPolicy, "", err, "YAML")
		}
	}
	if f.Version != 0 && f.Version != 1 {
		return nil, newError(ErrBadPolicy, "", nil, "version %d (want 1)", f.Version)
	}
	return NewPolicy(f.Rules)
}

// NewPolicy validates rules and returns the policy they make.
func NewPolicy(rules []Rule) (*Policy, error) {
	p := &Policy{rules: make([]compiledRule, 0, len(rules))}
	names := make(map[string]int)
	for i, r := range rules {
		bad := func(format string, args ...any) (*Policy, error) {
			where := fmt.Sprintf("rule %d", i+1)
			if r.Name != "" {
				where += fmt.Sprintf(" (%q)", r.Name)
			}
			return nil, newError(ErrBadPolicy, "", nil, "%s: %s", where, fmt.Sprintf(format, args...))
		}
		cr := compiledRule{Rule: r}
		cr.Callers = append([]string(nil), r.Callers...)
		cr.Services = append([]string(nil), r.Services...)
		cr.Tags = append([]string(nil), r.Tags...)
		if r.Name != "" {
			if j, dup := names[r.Name]; dup {
				return bad("name: %q is also the name of rule %d", r.Name, j)
			}
			names[r.Name] = i + 1
			cr.label = fmt.Sprintf("%q (#%d)", r.Name, i+1)
		} else {
			cr.label = fmt.Sprintf("#%d", i+1)
		}
		if r.Effect != Allow && r.Effect != Deny {
			return bad("effect: %q, want allow or deny", r.Effect)
		}
		if len(r.Callers) == 0 {
			return bad("callers: empty (use \"*\" for any caller)")
		}
		for j, c := range r.Callers {
			cp, err := parseCallerPattern(c)
			if err != nil {
				return bad("callers[%d]: %v", j, err)
			}
			cr.callers = append(cr.callers, cp)
		}
		if len(r.Services) == 0 {
			return bad("services: empty (use \"*\" for any service)")
		}
		for j, s := range r.Services {
			if s != "*" && (!strings.HasPrefix(s, "/") || strings.ContainsAny(s, " \t\r\n")) {
				return bad("services[%d]: %q, want \"*\" or a service such as \"/ops/restart\" or \"/ops/*\"", j, s)
			}
			cr.services = append(cr.services, s)
		}
		for j, t := range r.Tags {
			if strings.TrimSpace(t) == "" {
				return bad("tags[%d]: empty tag", j)
			}
		}
		p.rules = append(p.rules, cr)
	}
	return p, nil
}

func parseCallerPattern(c string) (callerPattern, error) {
	switch {
	case c == "*":
		return callerPattern{kind: callerAny}, nil
	case strings.HasPrefix(c, "role:"):
		r := Role(strings.TrimPrefix(c, "role:"))
		if !r.Valid() {
			return callerPattern{}, fmt.Errorf("unknown role %q (want agent, mapper, bridge or client)", r)
		}
		return callerPattern{kind: callerRole, pattern: string(r)}, nil
	case strings.HasPrefix(c, "jid:"):
		j := strings.ToLower(strings.TrimPrefix(c, "jid:"))
		if j == "" || strings.ContainsAny(j, " \t\r\n") {
			return callerPattern{}, fmt.Errorf("invalid JID pattern %q", c)
		}
		if strings.Contains(j, "/") {
			return callerPattern{kind: callerFullJID, pattern: j}, nil
		}
		return callerPattern{kind: callerJID, pattern: j}, nil
	}
	n := strings.TrimPrefix(c, "name:")
	if !validNamePattern(n) {
		return callerPattern{}, fmt.Errorf("invalid caller %q: want \"*\", a name pattern such as \"ops-*\", \"role:ROLE\" or \"jid:PATTERN\"", c)
	}
	return callerPattern{kind: callerName, pattern: n}, nil
}

func validNamePattern(s string) bool {
	if s == "" || len(s) > 256 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("._:-*", c) >= 0) {
			return false
		}
	}
	return true
}
