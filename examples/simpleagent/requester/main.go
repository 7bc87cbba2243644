// Command requester is the requester half of the simpleagent example: it
// embeds a mapper, waits for agents offering the "simple" actor, and calls
// each of its services with a different selector, printing what comes back.
//
//	NANITE_URL=amqp://guest:guest@127.0.0.1:5672/ go run ./examples/simpleagent/requester
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nanite-go/nanite/nanite"
)

func main() {
	url := flag.String("url", os.Getenv("NANITE_URL"), "broker URL, amqp://user:pass@host:port/vhost (default $NANITE_URL)")
	agents := flag.Int("agents", 1, "wait for this many agents offering /simple/echo")
	wait := flag.Duration("wait", 30*time.Second, "how long to wait for them")
	flag.Parse()
	if *url == "" {
		fmt.Fprintln(os.Stderr, "requester: no broker URL: set NANITE_URL or pass -url")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *url, *agents, *wait, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "requester:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, url string, agents int, wait time.Duration, out io.Writer) error {
	// The mapper keeps the cluster state (who offers what, and how loaded
	// they are) and routes our requests. It runs until ctx ends.
	m, err := nanite.NewMapper(nanite.MapperConfig{URL: url})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	mapperDone := make(chan error, 1)
	go func() { mapperDone <- m.Run(ctx) }()
	defer func() { cancel(); <-mapperDone }()

	wctx, wcancel := context.WithTimeout(ctx, wait)
	defer wcancel()
	if err := m.WaitForAgents(wctx, "/simple/echo", agents); err != nil {
		return err
	}
	fmt.Fprintln(out, "agents:")
	for _, a := range m.Agents() {
		fmt.Fprintf(out, "  %s load=%.2f tags=%v services=%d\n", a.Identity, a.Status, a.Tags, len(a.Services))
	}

	// 1. Nanite's README: the least-loaded agent echoes the payload.
	resp, err := m.Request(ctx, "/simple/echo", "hello nanite :)")
	if err != nil {
		return err
	}
	var s string
	if err := resp.Decode(&s); err != nil {
		return err
	}
	fmt.Fprintf(out, "/simple/echo (least_loaded) from %s: %q\n", resp.Results[0].Agent, s)

	// 2. Every agent answers: one result each.
	resp, err = m.Request(ctx, "/simple/time", nil, nanite.WithSelector(nanite.SelectAll))
	if err != nil {
		return err
	}
	for _, r := range resp.Results {
		var t struct{ Agent, Time string }
		if err := r.Decode(&t); err != nil {
			return err
		}
		fmt.Fprintf(out, "/simple/time (all) from %s: %s\n", r.Agent, t.Time)
	}

	// 3. Streamed results: intermediate results arrive before the final one.
	// The callback runs on the mapper's reply goroutine: keep it short.
	var mu sync.Mutex
	var counted []string
	resp, err = m.Request(ctx, "/simple/count", map[string]int{"to": 3},
		nanite.WithSelector(nanite.SelectRandom),
		nanite.OnIntermediate(func(i nanite.Intermediate) {
			mu.Lock()
			defer mu.Unlock()
			counted = append(counted, i.Key+"="+string(i.Payload))
		}))
	if err != nil {
		return err
	}
	mu.Lock()
	fmt.Fprintf(out, "/simple/count (random) from %s: intermediate %s, final %s\n",
		resp.Results[0].Agent, strings.Join(counted, " "), resp.Results[0].Payload)
	mu.Unlock()

	// 4. Round robin, with time to finish.
	resp, err = m.Request(ctx, "/simple/slow", map[string]int{"ms": 200}, nanite.WithSelector(nanite.SelectRoundRobin))
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "/simple/slow (rr, 200 ms) from %s: %s\n", resp.Results[0].Agent, resp.Results[0].Payload)

	// 5. A deadline shorter than the work: the request ends with a timeout
	// error at the deadline, and the agent's handler sees its ctx end.
	_, err = m.Request(ctx, "/simple/slow", map[string]int{"ms": 5000}, nanite.WithTimeout(300*time.Millisecond))
	switch {
	case errors.Is(err, nanite.ErrTimeout):
		fmt.Fprintf(out, "/simple/slow (5000 ms, 300 ms deadline): timed out as expected: %v\n", err)
	case err != nil:
		return err
	default:
		return errors.New("/simple/slow finished 5 s of work in 300 ms")
	}

	// 6. Only agents carrying a tag (start one with -tags demo).
	resp, err = m.Request(ctx, "/simple/echo", "tagged", nanite.WithTags("demo"))
	switch {
	case errors.Is(err, nanite.ErrNoAgent):
		fmt.Fprintln(out, "/simple/echo (tag demo): no agent has the tag demo")
	case err != nil:
		return err
	default:
		fmt.Fprintf(out, "/simple/echo (tag demo) from %s: %s\n", resp.Results[0].Agent, resp.Results[0].Payload)
	}

	// 7. One agent by identity, asking the introspection actor every agent
	// serves.
	target := m.Agents()[0].Identity
	resp, err = m.Request(ctx, "/nanite/info", nil, nanite.WithTarget(target))
	if err != nil {
		return err
	}
	var info nanite.AgentInfo
	if err := resp.Decode(&info); err != nil {
		return err
	}
	var names []string
	for _, svc := range info.Services {
		names = append(names, svc.Name)
	}
	fmt.Fprintf(out, "/nanite/info (target %s): version %s, services %s\n", target, info.Version, strings.Join(names, " "))

	// 8. A service nobody offers fails at once.
	_, err = m.Request(ctx, "/simple/nothing", nil)
	if !errors.Is(err, nanite.ErrNoAgent) {
		return fmt.Errorf("/simple/nothing: got %v, want ErrNoAgent", err)
	}
	fmt.Fprintf(out, "/simple/nothing: %v\n", err)
	return nil
}
