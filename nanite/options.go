package nanite

import (
	"encoding/json"
	"fmt"
	"time"
)

// RequestOption configures one request or push.
type RequestOption func(*requestOptions)

type requestOptions struct {
	selector       string
	target         string
	tags           []string
	tagMatch       string
	timeout        time.Duration
	persistent     bool
	failsafe       bool
	onIntermediate func(Intermediate)
	hops           []string
	origin         json.RawMessage
}

// WithSelector picks how agents are chosen: SelectLeastLoaded (default),
// SelectAll, SelectRandom or SelectRoundRobin.
func WithSelector(s string) RequestOption { return func(o *requestOptions) { o.selector = s } }

// WithTarget sends the request to the agent with this identity only. A
// target starting with TargetXMPP names an XMPP JID reached through a
// gateway agent (a bridge's proxy): see TargetXMPP.
func WithTarget(identity string) RequestOption {
	return func(o *requestOptions) { o.target = identity }
}

// WithTags restricts the candidates to agents carrying the tags: all of them
// by default, any of them with MatchAnyTag.
func WithTags(tags ...string) RequestOption {
	return func(o *requestOptions) { o.tags = append(o.tags, tags...) }
}

// MatchAnyTag makes WithTags match agents carrying at least one of the tags.
func MatchAnyTag() RequestOption { return func(o *requestOptions) { o.tagMatch = MatchAny } }

// WithTimeout sets the request's deadline relative to now. The context's own
// deadline applies too; the earlier one wins.
func WithTimeout(d time.Duration) RequestOption { return func(o *requestOptions) { o.timeout = d } }

// Persistent makes the request survive a broker restart: persistent message
// in durable queues, published with a publisher confirm.
func Persistent() RequestOption { return func(o *requestOptions) { o.persistent = true } }

// OfflineFailsafe holds the request in the durable offline queue when no
// agent offers the service, until one appears or the deadline passes.
func OfflineFailsafe() RequestOption { return func(o *requestOptions) { o.failsafe = true } }

// OnIntermediate receives streamed intermediate results as they arrive. It
// is called from the reply-consuming goroutine and must not block.
func OnIntermediate(f func(Intermediate)) RequestOption {
	return func(o *requestOptions) { o.onIntermediate = f }
}

// WithHops records the bridges (their XMPP domains) the request crossed
// before it entered the cluster; handlers see them as Request.Hops. Bridges
// set it so that a request that already crossed them is not relayed again.
func WithHops(hops ...string) RequestOption {
	return func(o *requestOptions) { o.hops = append(o.hops, hops...) }
}

// WithOrigin relays, in secure mode, a request on behalf of its original
// caller: origin is the request as the caller signed it (an envelope, e.g.
// a bridge's Request.Origin from the far side). The request keeps the
// origin's token and requester, and agents verify the origin's signature
// and apply their policy to its signer (docs/security.md). Only mappers
// and bridges may relay; the caller of WithOrigin must have checked the
// origin (OpenOrigin) and that the payload is the one it signed.
func WithOrigin(origin []byte) RequestOption {
	return func(o *requestOptions) { o.origin = origin }
}

func buildOptions(opts []RequestOption) (requestOptions, error) {
	var o requestOptions
	if len(opts) > 0 {
		// Only then does o escape (to the options).
		po := new(requestOptions)
		for _, f := range opts {
			f(po)
		}
		o = *po
	}
	switch o.selector {
	case "":
		o.selector = SelectLeastLoaded
	case SelectLeastLoaded, SelectAll, SelectRandom, SelectRoundRobin:
	default:
		return o, fmt.Errorf("nanite: unknown selector %q (want least_loaded, all, random or rr)", o.selector)
	}
	switch o.tagMatch {
	case "":
		o.tagMatch = MatchAll
	case MatchAll, MatchAny:
	default:
		return o, fmt.Errorf("nanite: unknown tag match %q", o.tagMatch)
	}
	return o, nil
}

func (o *requestOptions) fromPacket(p *Packet) {
	o.selector = p.Selector
	if o.selector == "" {
		o.selector = SelectLeastLoaded
	}
	o.target = p.Target
	o.tags = p.Tags
	o.tagMatch = p.TagMatch
	if o.tagMatch == "" {
		o.tagMatch = MatchAll
	}
	o.persistent = p.Persistent
	o.failsafe = p.Failsafe
	o.hops = p.Hops
}

// marshalPayload encodes a payload: json.RawMessage and []byte holding JSON
// are sent as they are, nil as no payload, anything else through
// encoding/json.
func marshalPayload(v any) (json.RawMessage, error) {
	switch x := v.(type) {
	case nil:
		return nil, nil
	case json.RawMessage:
		if len(x) == 0 {
			return nil, nil
		}
		if !validJSON(x) {
			return nil, fmt.Errorf("nanite: payload is not valid JSON")
		}
		return x, nil
	}
	b, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("nanite: encode payload: %w", err)
	}
	return b, nil
}
