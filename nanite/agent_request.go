package nanite

import (
	"context"
	"fmt"
	"time"
)

// Request makes a request through the mappers, from inside the cluster (an
// actor asking for another service). Exactly one mapper daemon handles it,
// however many run; it answers with the results of every agent it reached.
func (a *Agent) Request(ctx context.Context, service string, payload any, opts ...RequestOption) (*Response, error) {
	return a.originate(ctx, KindRequest, service, payload, opts)
}

// Push sends a request through the mappers without waiting for results.
func (a *Agent) Push(ctx context.Context, service string, payload any, opts ...RequestOption) error {
	_, err := a.originate(ctx, KindPush, service, payload, opts)
	return err
}

func (a *Agent) originate(ctx context.Context, kind Kind, service string, payload any, opts []RequestOption) (*Response, error) {
	if !a.started.Load() {
		return nil, fmt.Errorf("%w: agent is not running", ErrClosed)
	}
	o, err := buildOptions(opts)
	if err != nil {
		return nil, err
	}
	svc, err := NormalizeService(service)
	if err != nil {
		return nil, err
	}
	body, err := marshalPayload(payload)
	if err != nil {
		return nil, err
	}
	timeout := o.timeout
	if timeout <= 0 {
		timeout = a.cfg.RequestTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	deadline, _ := ctx.Deadline()
	p := &Packet{Kind: kind, Type: svc, Payload: body, From: a.id, Token: newToken(),
		Selector: o.selector, Target: o.target, Tags: o.tags, TagMatch: o.tagMatch,
		Persistent: o.persistent, Failsafe: o.failsafe, Deadline: unixMilli(deadline), Hops: o.hops}
	if kind == KindRequest {
		p.ReplyTo = ReplyQueue(a.id)
		p.Bundles = true // handleReply's consumer splits bundles
	}
	enc, err := p.Encode()
	if err == nil {
		enc, err = a.cfg.Secure.wrap(enc, false)
	}
	if err != nil {
		return nil, err
	}
	var c *call
	if kind == KindRequest {
		c = &call{token: p.Token, service: svc, done: make(chan struct{}), onIntermediate: o.onIntermediate}
		a.calls.add(c)
		defer a.calls.remove(p.Token)
	}
	m := message{Key: QueueMapperRequests, Body: enc, CorrelationID: p.Token, ReplyTo: p.ReplyTo,
		Persistent: o.persistent, Expiration: time.Until(deadline),
		Headers: map[string]any{HeaderReplyTo: p.ReplyTo}}
	if err := a.link.publish(ctx, m); err != nil {
		return nil, err
	}
	if c == nil {
		return nil, nil
	}
	resp, err := c.wait(ctx)
	if err == nil && o.selector != SelectAll && len(resp.Results) == 1 && resp.Results[0].Err != nil {
		return resp, resp.Results[0].Err
	}
	return resp, err
}
