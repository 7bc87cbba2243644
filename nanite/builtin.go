package nanite

import (
	"context"
	"time"
)

// BuiltinActor is the name of the introspection actor every agent serves:
// /nanite/ping, /nanite/info (also /nanite), /nanite/services,
// /nanite/tags, /nanite/load, /nanite/version and /nanite/stats.
const BuiltinActor = "nanite"

// AgentInfo is the answer of /nanite/info.
type AgentInfo struct {
	Identity string           `json:"identity"`
	Services []ServiceInfo    `json:"services"`
	Tags     []string         `json:"tags"`
	Load     float64          `json:"load"`
	InFlight int64            `json:"in_flight"`
	Version  string           `json:"version"`
	Uptime   string           `json:"uptime"`
	Stats    map[string]int64 `json:"stats"`
}

func (a *Agent) info() AgentInfo {
	tags := a.cfg.Tags
	if tags == nil {
		tags = []string{}
	}
	return AgentInfo{
		Identity: a.id,
		Services: a.Services(),
		Tags:     tags,
		Load:     a.cfg.Status(),
		InFlight: a.inflight.Load(),
		Version:  Version,
		Uptime:   time.Since(a.start).Round(time.Second).String(),
		Stats:    a.Stats(),
	}
}

func (a *Agent) builtinActor() *Actor {
	idem := Idempotent()
	return NewActor(BuiltinActor).
		Expose("ping", func(context.Context, *Request) (any, error) {
			return map[string]any{"pong": a.id, "time": time.Now().UTC().Format(time.RFC3339Nano)}, nil
		}, idem, Describe("answers pong with the agent's identity")).
		Expose("info", func(context.Context, *Request) (any, error) { return a.info(), nil },
			idem, Describe("identity, services, tags, load, version and counters")).
		Expose("index", func(context.Context, *Request) (any, error) { return a.info(), nil }, idem).
		Expose("services", func(context.Context, *Request) (any, error) { return a.Services(), nil }, idem).
		Expose("tags", func(context.Context, *Request) (any, error) { return a.info().Tags, nil }, idem).
		Expose("load", func(context.Context, *Request) (any, error) { return a.cfg.Status(), nil }, idem).
		Expose("version", func(context.Context, *Request) (any, error) {
			return map[string]string{"version": Version, "protocol": "1"}, nil
		}, idem).
		Expose("stats", func(context.Context, *Request) (any, error) { return a.Stats(), nil }, idem)
}
