package vertebra

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"

	"mellium.im/xmpp/jid"
)

// Caller sends ops with a scope: to one JID (direct), to one of several
// until one accepts (single), or to all (all), the JIDs being given or
// found in a directory.
type Caller struct {
	Endpoint  *Endpoint
	Directory jid.JID // where single and all find JIDs when none are given
	From      jid.JID // the JID to send from (components); default the endpoint's
	// Signer, when set, signs every op, separately for each JID it is
	// sent to (the signature covers the target; see SigningBytes).
	Signer Signer
}

// CallRequest is an op to send with a scope.
type CallRequest struct {
	Op      string
	Payload json.RawMessage
	// Scope is ScopeDirect (the default), ScopeSingle or ScopeAll.
	Scope string
	// To: for direct, the one JID; for single and all, the candidates
	// (when empty they are discovered: Op on Resources).
	To        []jid.JID
	Resources []string
	Meta      Meta
	// OnData receives every data element as it arrives (Data.From says
	// from whom); calls are never concurrent.
	OnData func(Data)
}

// Outcome is the end of an op at one JID.
type Outcome struct {
	JID    jid.JID
	Result *Result // on success
	Err    error
	Acked  bool // the JID accepted the op (it ran there, even if it failed)
}

// Call sends req and returns an outcome per JID tried. The error is nil
// when an op ended with final (for all: when every op did); otherwise, for
// direct and single, it is the (last) op's error, and for all an error
// joining the failures. ErrNoTarget when there is no JID to send to.
func (c *Caller) Call(ctx context.Context, req CallRequest) ([]Outcome, error) {
	if c.Endpoint == nil {
		return nil, errors.New("vertebra: Caller.Endpoint is nil")
	}
	scope := req.Scope
	if scope == "" {
		scope = ScopeDirect
	}
	targets := req.To
	switch scope {
	case ScopeDirect:
		if len(targets) != 1 {
			return nil, fmt.Errorf("vertebra: scope direct needs exactly one JID, got %d", len(targets))
		}
	case ScopeSingle, ScopeAll:
		if len(targets) == 0 {
			if c.Directory.String() == "" {
				return nil, fmt.Errorf("vertebra: scope %s needs JIDs or a directory", scope)
			}
			var opts []CallOption
			if c.From.String() != "" {
				opts = append(opts, WithFrom(c.From))
			}
			js, err := Discover(ctx, c.Endpoint, c.Directory, req.Op, req.Resources, opts...)
			if err != nil {
				return nil, fmt.Errorf("vertebra: discover %s: %w", req.Op, err)
			}
			targets = js
		}
		if len(targets) == 0 {
			return nil, fmt.Errorf("%w: %s on %v", ErrNoTarget, req.Op, req.Resources)
		}
	default:
		return nil, fmt.Errorf("vertebra: unknown scope %q (want direct, single or all)", scope)
	}

	var mu sync.Mutex // serializes OnData
	one := func(to jid.JID) Outcome {
		out := Outcome{JID: to}
		meta := req.Meta
		if c.Signer != nil {
			if out.Err = Sign(ctx, c.Signer, to, req.Op, req.Payload, &meta); out.Err != nil {
				out.Err = fmt.Errorf("vertebra: sign %s to %s: %w", req.Op, to, out.Err)
				return out
			}
		}
		opts := []CallOption{WithMeta(meta), WithScope(scope), OnAck(func(jid.JID) { out.Acked = true })}
		if c.From.String() != "" {
			opts = append(opts, WithFrom(c.From))
		}
		if req.OnData != nil {
			opts = append(opts, OnData(func(d Data) {
				mu.Lock()
				defer mu.Unlock()
				req.OnData(d)
			}))
		}
		out.Result, out.Err = c.Endpoint.Call(ctx, to, req.Op, req.Payload, opts...)
		return out
	}

	switch scope {
	case ScopeDirect:
		o := one(targets[0])
		return []Outcome{o}, o.Err
	case ScopeSingle:
		order := append([]jid.JID(nil), targets...)
		rand.Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
		var outs []Outcome
		for _, to := range order {
			o := one(to)
			outs = append(outs, o)
			if o.Err == nil || o.Acked || ctx.Err() != nil {
				return outs, o.Err
			}
		}
		return outs, fmt.Errorf("vertebra: no JID accepted %s (tried %d): %w", req.Op, len(outs), outs[len(outs)-1].Err)
	}
	outs := make([]Outcome, len(targets))
	var wg sync.WaitGroup
	for i, to := range targets {
		wg.Go(func() { outs[i] = one(to) })
	}
	wg.Wait()
	var errs []error
	for _, o := range outs {
		if o.Err != nil {
			errs = append(errs, o.Err)
		}
	}
	return outs, errors.Join(errs...)
}
