package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nanite-go/nanite/bridge"
	"github.com/nanite-go/nanite/nanite"
)

// childEnv carries a child process's role and settings (JSON childSpec):
// the example re-executes itself for its agents and, unless a nanite
// binary is given, for its bridges.
const childEnv = "NANITE_FEDERATION_CHILD"

type childSpec struct {
	Role string // "agent" or "bridge"

	// Agents.
	URL       string
	Name      string
	Load      float64
	Warehouse string         // site B: the inventory agents' warehouse
	Stock     map[string]int // site B: units per SKU
	Coldroom  bool           // site B: this warehouse has a cold room
	Orders    bool           // site A: the local orders agent

	// Bridges (re-executed mode).
	Config string
}

// childMode reports whether this process is one of the example's children.
func childMode() bool { return os.Getenv(childEnv) != "" }

// runChild runs the child described by childEnv until SIGTERM or SIGINT.
func runChild() int {
	var spec childSpec
	if err := json.Unmarshal([]byte(os.Getenv(childEnv)), &spec); err != nil {
		fmt.Fprintln(os.Stderr, "federation child:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	var err error
	switch spec.Role {
	case "agent":
		err = runAgent(ctx, spec)
	case "bridge":
		err = runBridge(ctx, spec.Config)
	default:
		err = fmt.Errorf("unknown role %q", spec.Role)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "federation child:", err)
		return 1
	}
	return 0
}

// runBridge does what `nanite bridge --config FILE` does (cmd/nanite/bridge.go).
func runBridge(ctx context.Context, file string) error {
	cfg, err := bridge.LoadConfig(file)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	return bridge.Serve(ctx, cfg, bridge.Options{Logger: log})
}

type lookupIn struct {
	SKU string `json:"sku"`
}

type stockLine struct {
	SKU       string `json:"sku"`
	Qty       int    `json:"qty"`
	Warehouse string `json:"warehouse,omitempty"`
	Agent     string `json:"agent,omitempty"`
}

type stockTotal struct {
	Agent     string `json:"agent"`
	Warehouse string `json:"warehouse"`
	SKUs      int    `json:"skus"`
	Units     int    `json:"units"`
}

// runAgent is one agent: an inventory agent of site B (/inventory/*, and
// /admin/restock, which site B does not export) or the orders agent of
// site A.
func runAgent(ctx context.Context, spec childSpec) error {
	a, err := nanite.NewAgent(nanite.AgentConfig{URL: spec.URL, Identity: spec.Name,
		HeartbeatInterval: 500 * time.Millisecond, Status: func() float64 { return spec.Load }})
	if err != nil {
		return err
	}
	name := spec.Name
	if spec.Orders {
		a.AddActor(nanite.NewActor("orders").
			Expose("list", func(context.Context, *nanite.Request) (any, error) {
				return []string{"A-1001 widget x3", "A-1002 gizmo x1"}, nil
			}))
		return a.Run(ctx)
	}
	skus := make([]string, 0, len(spec.Stock))
	for s := range spec.Stock {
		skus = append(skus, s)
	}
	sort.Strings(skus)
	inv := nanite.NewActor("inventory").
		Expose("lookup", func(ctx context.Context, r *nanite.Request) (any, error) {
			var in lookupIn
			if err := r.Decode(&in); err != nil || in.SKU == "" {
				return nil, errors.New(`want {"sku": "..."}`)
			}
			return stockLine{SKU: in.SKU, Qty: spec.Stock[in.SKU], Warehouse: spec.Warehouse, Agent: name}, nil
		}, nanite.Idempotent()).
		Expose("stock", func(context.Context, *nanite.Request) (any, error) {
			t := stockTotal{Agent: name, Warehouse: spec.Warehouse, SKUs: len(skus)}
			for _, s := range skus {
				t.Units += spec.Stock[s]
			}
			return t, nil
		}, nanite.Idempotent()).
		Expose("audit", func(ctx context.Context, r *nanite.Request) (any, error) {
			for _, s := range skus {
				if err := r.Intermediate(ctx, "shelf", stockLine{SKU: s, Qty: spec.Stock[s]}); err != nil {
					return nil, err
				}
				select {
				case <-time.After(150 * time.Millisecond):
				case <-ctx.Done():
					return nil, ctx.Err()
				}
			}
			return fmt.Sprintf("%s: %d shelves audited by %s", spec.Warehouse, len(skus), name), nil
		})
	if spec.Coldroom {
		inv.Expose("coldroom", func(context.Context, *nanite.Request) (any, error) {
			return map[string]any{"warehouse": spec.Warehouse, "temp_c": -18, "agent": name}, nil
		})
	}
	a.AddActor(inv)
	a.AddActor(nanite.NewActor("admin").
		Expose("restock", func(context.Context, *nanite.Request) (any, error) {
			return "restocked by " + name, nil
		}))
	return a.Run(ctx)
}

// proc is a child process: an agent or a bridge. Its output goes to a log
// file in the work directory.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{} // closed when it exited
	err  error         // its exit status, once done

	stopping atomic.Bool // stop was called: its exit is expected
}

// procs are the example's children, in start order.
type procs struct {
	mu   sync.Mutex
	list []*proc
}

// start starts a child: argv, with childEnv set to spec when spec is not nil.
func (ps *procs) start(name, logFile string, argv []string, spec *childSpec) (*proc, error) {
	f, err := os.Create(logFile)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = os.Environ()
	if spec != nil {
		raw, _ := json.Marshal(spec)
		cmd.Env = append(cmd.Env, childEnv+"="+string(raw))
	}
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = sysProcAttr()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, log: logFile, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	ps.mu.Lock()
	ps.list = append(ps.list, p)
	ps.mu.Unlock()
	return p, nil
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM and waits for the child to exit (SIGKILL after 15 s).
func (p *proc) stop() error {
	p.stopping.Store(true)
	if p.exited() {
		return p.err
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return p.err
	case <-time.After(15 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
		return fmt.Errorf("%s did not stop within 15 s of SIGTERM; killed", p.name)
	}
}

// dead returns an error for the first child that exited while it should
// run, with the end of its log.
func (ps *procs) dead() error {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	for _, p := range ps.list {
		if !p.stopping.Load() && p.exited() {
			return fmt.Errorf("%s exited (%v); its log ends with:\n%s", p.name, p.err, tail(p.log, 15))
		}
	}
	return nil
}

// stopAll stops the children whose name starts with prefix, all at once.
func (ps *procs) stopAll(prefix string) []error {
	ps.mu.Lock()
	var sel []*proc
	for _, p := range ps.list {
		if strings.HasPrefix(p.name, prefix) {
			sel = append(sel, p)
		}
	}
	ps.mu.Unlock()
	errs := make([]error, len(sel))
	var wg sync.WaitGroup
	for i, p := range sel {
		wg.Go(func() { errs[i] = p.stop() })
	}
	wg.Wait()
	return slices.DeleteFunc(errs, func(err error) bool { return err == nil })
}

// tail returns the last n lines of a file.
func tail(file string, n int) string {
	b, err := os.ReadFile(file)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "      " + strings.Join(lines, "\n      ")
}

// syncWriter serializes writes: intermediate results are printed from the
// mapper's goroutines.
type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}
