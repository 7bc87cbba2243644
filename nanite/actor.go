package nanite

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"time"
)

// HandlerFunc serves one service. ctx is cancelled at the request's deadline
// or when the agent shuts down. The returned value is encoded as JSON and
// becomes the result; a returned error is sent to the requester as a
// *RemoteError with code handler_error.
type HandlerFunc func(ctx context.Context, req *Request) (any, error)

// Request is what a handler receives.
type Request struct {
	Service  string          // "/actor/method"
	Payload  json.RawMessage // the request payload, JSON (may be empty)
	From     string          // identity of the requester
	Token    string          // unique request token
	Deadline time.Time       // zero when the requester set none
	Tags     []string
	Attempt  int // 0 the first time, n for the nth retry on another agent
	// Hops are the bridges (XMPP domains) the request crossed before it
	// entered this cluster, oldest first (WithHops); empty for local ones.
	Hops []string
	// Selector and Target are the requester's choice of agents as it was
	// sent (empty: least loaded). A gateway agent (a bridge's proxy for a
	// remote cluster) uses them: a Target starting with TargetXMPP names
	// the remote JID to call, SelectAll asks the remote cluster to fan out.
	Selector string
	Target   string
	// Caller and Origin are set in secure mode: the certificate name of
	// who asked (the signer of the origin envelope for a request relayed
	// by a mapper or bridge), and the request as that caller signed it
	// (an envelope, security.ParseEnvelope). A bridge's proxy passes the
	// origin on, so that the far side can check the caller too.
	Caller string
	Origin []byte
	// Persistent: the requester asked for a persistent request.
	Persistent bool

	// Agent is the agent running the handler; handlers use it to make
	// requests of their own through the mappers.
	Agent *Agent

	intermediate func(ctx context.Context, key string, v any) error
	run          *agentRun // the agent's run, which sends intermediate results
}

// Decode unmarshals the payload into v. An empty payload leaves v unchanged.
func (r *Request) Decode(v any) error {
	if len(r.Payload) == 0 {
		return nil
	}
	if err := json.Unmarshal(r.Payload, v); err != nil {
		return fmt.Errorf("nanite: decode payload of %s: %w", r.Service, err)
	}
	return nil
}

// Intermediate sends a streamed, keyed intermediate result to the requester
// before the final one (Nanite's IntermediateMessage). It is a no-op for a
// push, which has nobody to answer.
func (r *Request) Intermediate(ctx context.Context, key string, v any) error {
	switch {
	case r.run != nil:
		return r.run.intermediate(ctx, key, v)
	case r.intermediate != nil:
		return r.intermediate(ctx, key, v)
	}
	return nil
}

// Method is one exposed method of an actor.
type Method struct {
	Handler HandlerFunc
	// Idempotent methods may be retried on another agent when the agent
	// that held the request is lost. Non-idempotent ones never are.
	Idempotent bool
	// Description is shown by introspection and nanite agents.
	Description string
}

// MethodOption configures a method when it is exposed.
type MethodOption func(*Method)

// Idempotent marks a method safe to run more than once for one request, so
// the mapper retries it on another agent when its agent is lost.
func Idempotent() MethodOption { return func(m *Method) { m.Idempotent = true } }

// Describe sets a human description for introspection.
func Describe(s string) MethodOption { return func(m *Method) { m.Description = s } }

// Actor groups methods under a name: method m of actor a is the service
// "/a/m". A request to "/a" alone calls the method "index".
type Actor struct {
	name    string
	methods map[string]*Method
}

// NewActor returns an actor named name (no slashes).
func NewActor(name string) *Actor {
	if name == "" || strings.Contains(name, "/") {
		panic(fmt.Sprintf("nanite: invalid actor name %q", name))
	}
	return &Actor{name: name, methods: map[string]*Method{}}
}

// Name is the actor's name.
func (a *Actor) Name() string { return a.name }

// Expose registers h as method name of the actor and returns the actor for
// chaining. Exposing the same method twice panics, like net/http.
func (a *Actor) Expose(name string, h HandlerFunc, opts ...MethodOption) *Actor {
	if name == "" || strings.Contains(name, "/") {
		panic(fmt.Sprintf("nanite: invalid method name %q", name))
	}
	if h == nil {
		panic("nanite: nil handler for " + a.name + "/" + name)
	}
	if _, dup := a.methods[name]; dup {
		panic(fmt.Sprintf("nanite: method /%s/%s exposed twice", a.name, name))
	}
	m := &Method{Handler: h}
	for _, o := range opts {
		o(m)
	}
	a.methods[name] = m
	return a
}

// Services lists the services of the actor, sorted.
func (a *Actor) Services() []string {
	out := make([]string, 0, len(a.methods))
	for m := range a.methods {
		out = append(out, "/"+a.name+"/"+m)
	}
	sort.Strings(out)
	return out
}

// NormalizeService turns "/actor" into "/actor/index" and checks the form
// "/actor/method".
func NormalizeService(s string) (string, error) {
	if !strings.HasPrefix(s, "/") {
		return "", fmt.Errorf("nanite: service %q must start with /", s)
	}
	actor, method, two := strings.Cut(s[1:], "/")
	switch {
	case !two && actor != "":
		return s + "/index", nil
	case two && actor != "" && method != "" && !strings.Contains(method, "/"):
		return s, nil
	}
	return "", fmt.Errorf("nanite: service %q is not of the form /actor/method", s)
}
