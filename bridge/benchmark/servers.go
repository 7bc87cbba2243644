package benchmark

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	nb "github.com/nanite-go/nanite/nanite/benchmark"
	"github.com/nanite-go/nanite/testenv"
)

// ServerOptions says which private servers StartServers starts.
type ServerOptions struct {
	// Brokers is the number of RabbitMQ nodes: 2 (site A and site B each
	// on its own, the default), 1 (two vhosts of one node: faster to
	// start, lighter on the machine) or -1 (none: the caller has brokers).
	Brokers int
	// NoXMPP: start no prosody (the caller has an XMPP server).
	NoXMPP bool
	// Domains are the component domains (default DefaultDomains).
	Domains Domains
	// Logger receives testenv's progress messages; nil discards them.
	Logger *slog.Logger
}

// Servers are private servers for a run (testenv: the rabbitmq-server and
// prosody packages). Fill a Config with Apply; Close stops them.
type Servers struct {
	URLA, URLB       string // empty without brokers
	XMPPAddr, Secret string // empty without prosody
	Domains          Domains
	// Note describes the servers for the report.
	Note string

	rabbits []*testenv.RabbitMQ
	prosody *testenv.Prosody
	cpu     []func() time.Duration
}

// Site vhosts made by StartServers.
const (
	VhostA = "site-a"
	VhostB = "site-b"
)

// StartServers starts the servers in parallel: RabbitMQ nodes with the
// vhosts VhostA and VhostB (guest has all permissions), and one prosody
// with the four component domains (no Nagle, as testenv configures it).
func StartServers(ctx context.Context, opts ServerOptions) (*Servers, error) {
	if opts.Brokers == 0 {
		opts.Brokers = 2
	}
	if opts.Brokers > 2 {
		return nil, fmt.Errorf("benchmark: %d brokers: want 1 or 2", opts.Brokers)
	}
	if opts.Domains == (Domains{}) {
		opts.Domains = DefaultDomains
	}
	var sb [12]byte
	_, _ = rand.Read(sb[:])
	srv := &Servers{Domains: opts.Domains}
	if !opts.NoXMPP {
		srv.Secret = hex.EncodeToString(sb[:])
	}
	n := max(opts.Brokers, 0)
	srv.rabbits = make([]*testenv.RabbitMQ, n)
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	fail := func(err error) {
		mu.Lock()
		errs = append(errs, err)
		mu.Unlock()
	}
	for i := range n {
		wg.Go(func() {
			r, err := testenv.StartRabbitMQ(ctx, testenv.RabbitOptions{Name: fmt.Sprintf("bench-bridge-%d", i), Logger: opts.Logger})
			if err != nil {
				fail(fmt.Errorf("start RabbitMQ: %w", err))
				return
			}
			srv.rabbits[i] = r
			vhosts := []string{VhostA, VhostB}
			if n == 2 {
				vhosts = vhosts[i : i+1]
			}
			for _, v := range vhosts {
				if err := r.AddVhost(ctx, v); err != nil {
					fail(err)
					return
				}
				if err := r.SetPermissions(ctx, v, "guest", ".*", ".*", ".*"); err != nil {
					fail(err)
					return
				}
			}
		})
	}
	if !opts.NoXMPP {
		wg.Go(func() {
			comps := map[string]string{}
			for _, d := range opts.Domains.list() {
				comps[d] = srv.Secret
			}
			p, err := testenv.StartProsody(ctx, testenv.ProsodyOptions{Components: comps, Logger: opts.Logger})
			if err != nil {
				fail(fmt.Errorf("start prosody: %w", err))
				return
			}
			srv.prosody = p
		})
	}
	wg.Wait()
	if len(errs) > 0 {
		_ = srv.Close()
		return nil, errors.Join(errs...)
	}
	var notes []string
	switch n {
	case 2:
		srv.URLA = srv.rabbits[0].VhostURL(VhostA, "guest", "guest")
		srv.URLB = srv.rabbits[1].VhostURL(VhostB, "guest", "guest")
		notes = append(notes, "two private RabbitMQ nodes (site A, site B)")
	case 1:
		srv.URLA = srv.rabbits[0].VhostURL(VhostA, "guest", "guest")
		srv.URLB = srv.rabbits[0].VhostURL(VhostB, "guest", "guest")
		notes = append(notes, "one private RabbitMQ node, a vhost per site")
	}
	for _, r := range srv.rabbits {
		if pid := nb.FindProcess("beam.smp", r.Dir()); pid > 0 {
			srv.cpu = append(srv.cpu, nb.ProcessCPU(pid))
		}
	}
	if srv.prosody != nil {
		srv.XMPPAddr = srv.prosody.ComponentAddr()
		notes = append(notes, "one private prosody (nagle off)")
		if pid := nb.FindProcess("prosody", srv.prosody.Dir()); pid > 0 {
			srv.cpu = append(srv.cpu, nb.ProcessCPU(pid))
		}
	}
	srv.Note = strings.Join(notes, ", ") + ", started by testenv, on loopback"
	return srv, nil
}

// ServerCPU reports the CPU time so far of the servers' processes found
// (0 when none was).
func (s *Servers) ServerCPU() time.Duration {
	var t time.Duration
	for _, f := range s.cpu {
		t += f()
	}
	return t
}

// Apply fills cfg's servers (those it does not name already).
func (s *Servers) Apply(cfg *Config) {
	if cfg.URLA == "" && cfg.URLB == "" && s.URLA != "" {
		cfg.URLA, cfg.URLB = s.URLA, s.URLB
	}
	if cfg.XMPPAddr == "" && s.XMPPAddr != "" {
		cfg.XMPPAddr, cfg.Secret, cfg.Domains = s.XMPPAddr, s.Secret, s.Domains
	}
	if cfg.ServersNote == "" {
		cfg.ServersNote = s.Note
	}
	if cfg.ServerCPU == nil && len(s.cpu) > 0 {
		cfg.ServerCPU = s.ServerCPU
	}
}

// Close stops the servers.
func (s *Servers) Close() error {
	var errs []error
	if s.prosody != nil {
		errs = append(errs, s.prosody.Close())
	}
	for _, r := range s.rabbits {
		if r != nil {
			errs = append(errs, r.Close())
		}
	}
	return errors.Join(errs...)
}
