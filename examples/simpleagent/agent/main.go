// Command agent is the agent half of the simpleagent example: it hosts the
// actor "simple" and serves its methods until it is interrupted.
//
//	NANITE_URL=amqp://guest:guest@127.0.0.1:5672/ go run ./examples/simpleagent/agent -tags demo
//
// Start as many as you like; the requester spreads its requests over them.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/nanite-go/nanite/nanite"
)

func main() {
	url := flag.String("url", os.Getenv("NANITE_URL"), "broker URL, amqp://user:pass@host:port/vhost (default $NANITE_URL)")
	identity := flag.String("identity", "", "agent identity (default: kept in -data, or generated)")
	dataDir := flag.String("data", "", "directory that keeps the agent's identity across restarts")
	tags := flag.String("tags", "", "comma-separated tags, for requests that select agents by tag")
	flag.Parse()
	if *url == "" {
		fmt.Fprintln(os.Stderr, "agent: no broker URL: set NANITE_URL or pass -url")
		os.Exit(2)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))

	var tagList []string
	if *tags != "" {
		tagList = strings.Split(*tags, ",")
	}
	agent, err := nanite.NewAgent(nanite.AgentConfig{
		URL:      *url,
		Identity: *identity,
		DataDir:  *dataDir,
		Tags:     tagList,
		Logger:   log,
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "agent:", err)
		os.Exit(2)
	}
	agent.AddActor(simpleActor())

	log.Info("agent starting", "identity", agent.Identity(), "tags", tagList)
	if err := agent.Run(ctx); err != nil { // returns after a graceful shutdown
		fmt.Fprintln(os.Stderr, "agent:", err)
		os.Exit(1)
	}
	log.Info("agent stopped")
}

// simpleActor is Nanite's "simple" actor, with a few more methods: the
// services /simple/echo, /simple/time, /simple/count and /simple/slow.
func simpleActor() *nanite.Actor {
	return nanite.NewActor("simple").
		Expose("echo", echo, nanite.Idempotent(), nanite.Describe("answers with its payload")).
		Expose("time", now, nanite.Idempotent(), nanite.Describe("the agent's clock")).
		Expose("count", count, nanite.Describe(`streams 1..{"to":n} as intermediate results, then the total`)).
		Expose("slow", slow, nanite.Describe(`works for {"ms":n} milliseconds, or until the request's deadline`))
}

// echo answers with the payload it got, whatever JSON it is.
func echo(ctx context.Context, r *nanite.Request) (any, error) {
	if len(r.Payload) == 0 {
		return nil, nil
	}
	return json.RawMessage(r.Payload), nil
}

// now answers with the agent's identity and clock. Any JSON-encodable value
// can be a result.
func now(ctx context.Context, r *nanite.Request) (any, error) {
	return map[string]string{"agent": r.Agent.Identity(), "time": time.Now().UTC().Format(time.RFC3339)}, nil
}

// count sends each number as an intermediate result before the final one.
func count(ctx context.Context, r *nanite.Request) (any, error) {
	in := struct {
		To int `json:"to"`
	}{To: 3}
	if err := r.Decode(&in); err != nil {
		return nil, err
	}
	for i := 1; i <= in.To; i++ {
		if err := r.Intermediate(ctx, "count", i); err != nil {
			return nil, err
		}
		select {
		case <-time.After(50 * time.Millisecond):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return map[string]int{"counted": in.To}, nil
}

// slow works for a while, but stops when the requester's deadline passes
// (or the agent shuts down): ctx tells it. The requester then gets a
// timeout error, not a result.
func slow(ctx context.Context, r *nanite.Request) (any, error) {
	var in struct {
		MS int `json:"ms"`
	}
	if err := r.Decode(&in); err != nil {
		return nil, err
	}
	select {
	case <-time.After(time.Duration(in.MS) * time.Millisecond):
		return map[string]any{"agent": r.Agent.Identity(), "slept_ms": in.MS}, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("gave up after part of %d ms: %w", in.MS, ctx.Err())
	}
}
