package nanite

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
)

// Dispatcher runs actors' methods without any transport: it is how the same
// actor code is served over AMQP (by an Agent) and over XMPP (by the
// vertebra package, which accepts anything with these methods).
type Dispatcher struct {
	methods map[string]*Method
}

// NewDispatcher returns a dispatcher for the actors. It panics on a service
// registered twice, like Agent.AddActor.
func NewDispatcher(actors ...*Actor) *Dispatcher {
	d := &Dispatcher{methods: map[string]*Method{}}
	for _, a := range actors {
		for name, m := range a.methods {
			svc := "/" + a.name + "/" + name
			if _, dup := d.methods[svc]; dup {
				panic("nanite: service " + svc + " registered twice")
			}
			d.methods[svc] = m
		}
	}
	return d
}

// Services lists the services, sorted.
func (d *Dispatcher) Services() []string {
	out := make([]string, 0, len(d.methods))
	for s := range d.methods {
		out = append(out, s)
	}
	sort.Strings(out)
	return out
}

// Idempotent reports whether service is marked idempotent.
func (d *Dispatcher) Idempotent(service string) bool {
	m := d.methods[service]
	return m != nil && m.Idempotent
}

// Call runs service with payload for the requester from. emit, when not nil,
// receives intermediate results. A handler panic is returned as a
// *RemoteError with code handler_panic; an unknown service as one with code
// unknown_service.
func (d *Dispatcher) Call(ctx context.Context, service string, payload json.RawMessage, from string,
	emit func(ctx context.Context, key string, data json.RawMessage) error) (res json.RawMessage, err error) {
	svc, nerr := NormalizeService(service)
	var m *Method
	if nerr == nil {
		m = d.methods[svc]
	}
	if m == nil {
		return nil, &RemoteError{Code: CodeUnknown, Message: fmt.Sprintf("no service %s here", service)}
	}
	req := &Request{Service: svc, Payload: payload, From: from}
	if dl, ok := ctx.Deadline(); ok {
		req.Deadline = dl
	}
	if emit != nil {
		req.intermediate = func(ctx context.Context, key string, v any) error {
			b, err := json.Marshal(v)
			if err != nil {
				return fmt.Errorf("nanite: encode intermediate result: %w", err)
			}
			return emit(ctx, key, b)
		}
	}
	defer func() {
		if r := recover(); r != nil {
			res, err = nil, &RemoteError{Code: CodePanic, Message: fmt.Sprintf("handler for %s panicked: %v", svc, r)}
		}
	}()
	v, herr := m.Handler(ctx, req)
	if herr != nil {
		var re *RemoteError
		if errors.As(herr, &re) {
			return nil, herr
		}
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return nil, &RemoteError{Code: CodeTimeout, Message: fmt.Sprintf("%s did not finish before its deadline: %v", svc, herr)}
		}
		return nil, &RemoteError{Code: CodeHandler, Message: herr.Error()}
	}
	b, merr := json.Marshal(v)
	if merr != nil {
		return nil, &RemoteError{Code: CodeHandler, Message: "result is not JSON-encodable: " + merr.Error()}
	}
	return b, nil
}
