package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nanite-go/nanite/nanite"
)

// examplesHelp documents the example actor in --help.
const examplesHelp = `Example actor "echo" (turn it off with --no-examples):
  /echo/say     returns the payload as it is
  /echo/time    returns the agent's time: {"time": RFC 3339, "unix_ms": N, "agent": ID}
  /echo/stream  sends 3 intermediate results keyed "progress" ({"step": 1, "of": 3}, ...)
                100 ms apart, then {"steps": 3, "agent": ID}; payload
                {"steps": N, "interval_ms": M} changes both (N <= 100)
  /echo/slow    sleeps for the payload's milliseconds (a number or {"ms": N}), then
                returns {"slept_ms": N, "agent": ID}; it stops early at the deadline
  /echo/fail    fails with the payload (a string) as the error message`

// exampleActor returns the built-in example actor "echo".
func exampleActor() *nanite.Actor {
	idem := nanite.Idempotent()
	return nanite.NewActor("echo").
		Expose("say", echoSay, idem, nanite.Describe("returns the payload")).
		Expose("time", echoTime, idem, nanite.Describe("returns the agent's time")).
		Expose("stream", echoStream, idem, nanite.Describe(`streams 3 intermediate results keyed "progress", then a final one`)).
		Expose("slow", echoSlow, idem, nanite.Describe("sleeps for the requested milliseconds, honouring the deadline")).
		Expose("fail", echoFail, nanite.Describe("fails with the payload as the error message"))
}

func agentID(req *nanite.Request) string {
	if req.Agent == nil {
		return ""
	}
	return req.Agent.Identity()
}

func echoSay(_ context.Context, req *nanite.Request) (any, error) {
	if len(req.Payload) == 0 {
		return nil, nil
	}
	return req.Payload, nil
}

func echoTime(_ context.Context, req *nanite.Request) (any, error) {
	now := time.Now()
	return map[string]any{"time": now.Format(time.RFC3339Nano), "unix_ms": now.UnixMilli(), "agent": agentID(req)}, nil
}

func echoStream(ctx context.Context, req *nanite.Request) (any, error) {
	p := struct {
		Steps      int `json:"steps"`
		IntervalMS int `json:"interval_ms"`
	}{Steps: 3, IntervalMS: 100}
	if err := req.Decode(&p); err != nil {
		return nil, err
	}
	if p.Steps < 0 || p.Steps > 100 || p.IntervalMS < 0 {
		return nil, fmt.Errorf("steps must be 0..100 and interval_ms >= 0, got %d and %d", p.Steps, p.IntervalMS)
	}
	for i := 1; i <= p.Steps; i++ {
		if i > 1 {
			if err := sleepCtx(ctx, time.Duration(p.IntervalMS)*time.Millisecond); err != nil {
				return nil, err
			}
		}
		if err := req.Intermediate(ctx, "progress", map[string]int{"step": i, "of": p.Steps}); err != nil {
			return nil, err
		}
	}
	return map[string]any{"steps": p.Steps, "agent": agentID(req)}, nil
}

func echoSlow(ctx context.Context, req *nanite.Request) (any, error) {
	var ms int64
	if err := json.Unmarshal(req.Payload, &ms); err != nil {
		var p struct {
			MS int64 `json:"ms"`
		}
		if err := req.Decode(&p); err != nil {
			return nil, errors.New(`payload must be a number of milliseconds or {"ms": N}`)
		}
		ms = p.MS
	}
	if ms < 0 {
		return nil, fmt.Errorf("negative duration %d ms", ms)
	}
	if err := sleepCtx(ctx, time.Duration(ms)*time.Millisecond); err != nil {
		return nil, err
	}
	return map[string]any{"slept_ms": ms, "agent": agentID(req)}, nil
}

func echoFail(_ context.Context, req *nanite.Request) (any, error) {
	msg := "failed as asked"
	var s string
	if json.Unmarshal(req.Payload, &s) == nil && s != "" {
		msg = s
	}
	return nil, errors.New(msg)
}

// sleepCtx sleeps for d or until ctx ends.
func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}
