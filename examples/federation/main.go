// Command federation runs two Nanite sites joined by the XMPP bridge, on
// private servers: site A and site B each have a RabbitMQ node, a prosody
// server (the two federate over s2s) and a bridge (`nanite bridge --config
// FILE`, a child process). Two inventory agents run at site B, an orders
// agent and a requester at site A. The example narrates what the bridges
// do: A's proxy agent standing for B, cross-site calls (least loaded at B,
// a chosen agent of B by JID, a fan-out, streaming), refusals, an agent of B
// leaving, and a plain XMPP client of site A calling B's cluster over s2s.
//
//	go run ./examples/federation                     # bridges: this program, re-executed in bridge mode
//	go run ./examples/federation -nanite bin/nanite  # bridges: the nanite binary (what `make federation` does)
//
// It stops everything and removes its files on exit or Ctrl-C.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"mellium.im/xmpp/disco"
	"mellium.im/xmpp/jid"
	"mellium.im/xmpp/stanza"

	"github.com/nanite-go/nanite/bridge"
	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/testenv"
	"github.com/nanite-go/nanite/vertebra"
)

// The sites' XMPP domains.
const (
	siteA   = "site-a.test"        // prosody A's users (alice)
	siteB   = "site-b.test"        // prosody B's users
	domA    = "nanite.site-a.test" // bridge A's component domain
	domB    = "nanite.site-b.test" // bridge B's component domain
	vhost   = "app"                // each site's cluster: vhost "app" on its RabbitMQ node
	aliceID = "alice@" + siteA
)

// options of run.
type options struct {
	// Nanite is the nanite binary the bridges run as (`nanite bridge
	// --config FILE`); empty: this program re-executed in bridge mode,
	// which runs the same code (bridge.LoadConfig, New, Run).
	Nanite string
	// Keep keeps the work directory (config files, logs) at the end.
	Keep bool
	// Self is the command that re-executes this program (default:
	// os.Args[0]); childEnv tells it what to be.
	Self []string
}

func main() {
	if childMode() {
		os.Exit(runChild())
	}
	var opts options
	flag.StringVar(&opts.Nanite, "nanite", "", "run the bridges as `PATH bridge --config FILE` (default: re-execute this program in bridge mode)")
	flag.BoolVar(&opts.Keep, "keep", false, "keep the work directory (config files, logs) at the end")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Stdout, opts); err != nil {
		if ctx.Err() != nil {
			fmt.Fprintln(os.Stderr, "federation: interrupted")
		} else {
			fmt.Fprintln(os.Stderr, "federation:", err)
		}
		os.Exit(1)
	}
}

// site is one site's servers and names.
type site struct {
	name    string // "A", "B"
	rabbit  *testenv.RabbitMQ
	xmpp    *testenv.Prosody
	url     string // the cluster's AMQP URL (vhost app, user nanite)
	pwFile  string // the broker password, for the bridge's config
	cluster jid.JID
}

type federation struct {
	out    io.Writer
	opts   options
	dir    string
	start  time.Time
	a, b   *site
	procs  procs
	req    *nanite.Mapper // the requester at A
	viewB  *nanite.Mapper // an observer at B (what B's cluster sees)
	alice  *vertebra.Endpoint
	aliceC *vertebra.Conn
	agents map[string]*proc
	stops  []func() // the example's own mappers and XMPP client

	mu           sync.Mutex
	provisioning time.Duration // the longer of the two sites' vhost and user set-up
}

func (f *federation) say(format string, args ...any) { fmt.Fprintf(f.out, format+"\n", args...) }

func (f *federation) step(title string) { fmt.Fprintf(f.out, "\n== %s\n", title) }

// run is the whole example: start, show, stop. It returns an error when
// something does not behave as narrated.
func run(ctx context.Context, out io.Writer, opts options) (err error) {
	if len(opts.Self) == 0 {
		opts.Self = []string{os.Args[0]}
	}
	if opts.Nanite != "" {
		if opts.Nanite, err = filepath.Abs(opts.Nanite); err != nil {
			return err
		}
	}
	if missing := testenv.Missing("rabbitmq-server", "prosody"); len(missing) > 0 {
		return fmt.Errorf("missing %v: run `make federation` as root, or apt-get install -y rabbitmq-server prosody", missing)
	}
	f := &federation{out: &syncWriter{w: out}, opts: opts, start: time.Now(), agents: map[string]*proc{}}
	f.dir, err = os.MkdirTemp("", "nanite-federation-*")
	if err != nil {
		return err
	}
	f.say("work directory (config files, logs): %s", f.dir)
	defer func() {
		// Logs help when a step failed, not after Ctrl-C.
		if cerr := f.shutdown(err != nil, err != nil && ctx.Err() == nil && !opts.Keep); err == nil {
			err = cerr
		}
	}()
	if err := f.startServers(ctx); err != nil {
		return err
	}
	if err := f.startAgents(ctx); err != nil {
		return err
	}
	if err := f.startBridges(ctx); err != nil {
		return err
	}
	for _, show := range []func(context.Context) error{
		f.showProxy, f.showCalls, f.showRefusals, f.showLeave, f.showXMPPClient,
	} {
		if err := show(ctx); err != nil {
			return err
		}
	}
	return nil
}

// startServers starts both sites' RabbitMQ nodes (in parallel) and the two
// federating prosody servers, then makes each site's vhost and user.
func (f *federation) startServers(ctx context.Context) error {
	f.step("private servers: a RabbitMQ node per site (several seconds), two prosody servers federating over s2s")
	f.a, f.b = &site{name: "A"}, &site{name: "B"}
	var wg sync.WaitGroup
	errs := make([]error, 3)
	for i, s := range []*site{f.a, f.b} {
		wg.Go(func() {
			// With the management plugin, provisioning takes milliseconds
			// (HTTP API) instead of about 5 s of rabbitmqctl calls.
			s.rabbit, errs[i] = testenv.StartRabbitMQ(ctx, testenv.RabbitOptions{Name: "site-" + strings.ToLower(s.name), Management: true})
			if errs[i] == nil {
				errs[i] = f.provision(ctx, s)
			}
		})
	}
	wg.Go(func() {
		var ps []*testenv.Prosody
		ps, errs[2] = testenv.StartFederatedProsody(ctx,
			testenv.ProsodyOptions{VirtualHosts: []string{siteA}, Components: map[string]string{domA: "secret-of-site-a"},
				Accounts: []testenv.Account{{User: "alice", Host: siteA, Password: "alice-password"}}},
			testenv.ProsodyOptions{VirtualHosts: []string{siteB}, Components: map[string]string{domB: "secret-of-site-b"}})
		if errs[2] == nil {
			f.a.xmpp, f.b.xmpp = ps[0], ps[1]
		}
	})
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	for _, s := range []*site{f.a, f.b} {
		var err error
		if s.cluster, err = bridge.ClusterJID(vhost, "nanite."+s.domain()); err != nil {
			return err
		}
		f.say("   site %s: RabbitMQ %s (vhost %s), prosody %s (domain %s, component nanite.%s, s2s %s)",
			s.name, s.rabbit.Addr(), vhost, s.xmpp.C2SAddr(), s.domain(), s.domain(), s.xmpp.S2SAddr())
	}
	f.say("   (%v, of which %v making each node's vhost %s and user nanite)",
		time.Since(f.start).Round(100*time.Millisecond), f.provisioning.Round(10*time.Millisecond), vhost)
	return nil
}

func (s *site) domain() string { return "site-" + strings.ToLower(s.name) + ".test" }

// provision makes the site's vhost and its user "nanite", and writes the
// password file the bridge's config names.
func (f *federation) provision(ctx context.Context, s *site) error {
	t0 := time.Now()
	defer func() {
		f.mu.Lock()
		f.provisioning = max(f.provisioning, time.Since(t0))
		f.mu.Unlock()
	}()
	pw := fmt.Sprintf("pw-%s-%d", strings.ToLower(s.name), time.Now().UnixNano()%1e6)
	if err := s.rabbit.AddVhost(ctx, vhost); err != nil {
		return err
	}
	if err := s.rabbit.AddUser(ctx, "nanite", pw); err != nil {
		return err
	}
	if err := s.rabbit.SetPermissions(ctx, vhost, "nanite", ".*", ".*", ".*"); err != nil {
		return err
	}
	s.url = s.rabbit.VhostURL(vhost, "nanite", pw)
	s.pwFile = filepath.Join(f.dir, "rabbit-"+strings.ToLower(s.name)+".password")
	return os.WriteFile(s.pwFile, []byte(pw+"\n"), 0o600)
}

// startAgents starts the agents, each its own process, and the mappers of
// the example: the requester at A and an observer at B.
func (f *federation) startAgents(ctx context.Context) error {
	f.step("agents, each its own process")
	for _, c := range []childSpec{
		{Name: "inv-north", Load: 0.6, Warehouse: "north", Stock: map[string]int{"widget": 40, "gadget": 7, "gizmo": 2}},
		{Name: "inv-south", Load: 0.2, Warehouse: "south", Stock: map[string]int{"widget": 12, "gizmo": 30}, Coldroom: true},
		{Name: "orders-a", Orders: true},
	} {
		s := f.b
		if c.Orders {
			s = f.a
		}
		c.Role, c.URL = "agent", s.url
		p, err := f.procs.start("agent "+c.Name, filepath.Join(f.dir, "agent-"+c.Name+".log"), f.opts.Self, &c)
		if err != nil {
			return err
		}
		f.agents[c.Name] = p
		f.say("   site %s: %-9s pid %-7d load %.1f", s.name, c.Name, p.cmd.Process.Pid, c.Load)
	}
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	var err error
	if f.req, err = nanite.NewMapper(nanite.MapperConfig{URL: f.a.url, Logger: logger}); err != nil {
		return err
	}
	if f.viewB, err = nanite.NewMapper(nanite.MapperConfig{URL: f.b.url, Logger: logger}); err != nil {
		return err
	}
	for _, m := range []*nanite.Mapper{f.req, f.viewB} {
		f.goRun(m)
	}
	if err := f.waitFor(ctx, "the agents", 20*time.Second, func() error {
		if len(f.viewB.Agents()) < 2 || len(f.req.Agents()) < 1 {
			return fmt.Errorf("site A has %d agents, site B %d", len(f.req.Agents()), len(f.viewB.Agents()))
		}
		return nil
	}); err != nil {
		return err
	}
	f.say("   site B's cluster (vhost %s on node B):", vhost)
	f.table(f.viewB)
	return nil
}

// goRun runs a mapper until shutdown.
func (f *federation) goRun(m *nanite.Mapper) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = m.Run(ctx) }()
	f.stops = append(f.stops, func() { cancel(); <-done })
}

// configs returns the bridges' config files, as an operator would write
// them (docs/bridge.md).
func (f *federation) configs() (cfgA, cfgB string) {
	cfgA = `# Bridge of site A: B's inventory services become callable in A's cluster.
xmpp:
  server: ` + f.a.xmpp.ComponentAddr() + `      # prosody A's component listener
  domain: ` + domA + `
  secret_file: site-a.secret

clusters:
  - name: app
    url: amqp://nanite@` + f.a.rabbit.Addr() + `/` + vhost + `
    password_file: ` + filepath.Base(f.a.pwFile) + `
    imports:
      - from: ` + f.b.cluster.String() + `     # B's cluster JID, reached over s2s
        # /admin/* too: B decides what crosses (it exports only /inventory/*)
        services: ["/inventory/*", "/admin/*"]
        as_tags: ["site:b"]
`
	cfgB = `# Bridge of site B: exports B's inventory services to site A.
xmpp:
  server: ` + f.b.xmpp.ComponentAddr() + `      # prosody B's component listener
  domain: ` + domB + `
  secret_file: site-b.secret

clusters:
  - name: app
    url: amqp://nanite@` + f.b.rabbit.Addr() + `/` + vhost + `
    password_file: ` + filepath.Base(f.b.pwFile) + `
    exports:
      - services: ["/inventory/*"]            # not /admin/*: that stays inside site B
        to: ["` + domA + `", "` + aliceID + `"]   # A's bridge and alice, a user of site A
`
	return cfgA, cfgB
}

// startBridges writes the config files, checks them and starts the bridges
// (B first, then A).
func (f *federation) startBridges(ctx context.Context) error {
	f.step("the bridges' config files, in " + f.dir)
	cfgA, cfgB := f.configs()
	files := map[string]string{
		"site-a.yaml": cfgA, "site-b.yaml": cfgB,
		"site-a.secret": "secret-of-site-a\n", "site-b.secret": "secret-of-site-b\n",
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(f.dir, name), []byte(content), 0o600); err != nil {
			return err
		}
	}
	for _, name := range []string{"site-a.yaml", "site-b.yaml"} {
		f.say("--- %s", name)
		fmt.Fprint(f.out, files[name])
	}
	f.say("---")
	for _, name := range []string{"site-a.yaml", "site-b.yaml"} {
		file := filepath.Join(f.dir, name)
		if f.opts.Nanite != "" {
			out, err := exec.CommandContext(ctx, f.opts.Nanite, "bridge", "--config", file, "--check").CombinedOutput()
			if err != nil {
				return fmt.Errorf("nanite bridge --check %s: %v\n%s", name, err, out)
			}
			f.say("   nanite bridge --config %s --check: %s", name, strings.TrimSpace(string(out)))
			continue
		}
		cfg, err := bridge.LoadConfig(file)
		if err != nil {
			return err
		}
		f.say("   %s: ok (%d clusters)", name, len(cfg.Clusters))
	}

	f.step("starting the bridges, each its own process")
	for _, s := range []string{"b", "a"} {
		file := filepath.Join(f.dir, "site-"+s+".yaml")
		argv, spec := f.opts.Self, &childSpec{Role: "bridge", Config: file}
		if f.opts.Nanite != "" {
			argv, spec = []string{f.opts.Nanite, "bridge", "--config", file}, nil
		}
		p, err := f.procs.start("bridge "+strings.ToUpper(s), filepath.Join(f.dir, "bridge-"+s+".log"), argv, spec)
		if err != nil {
			return err
		}
		how := "this program in bridge mode, the code of `nanite bridge`"
		if f.opts.Nanite != "" {
			how = f.opts.Nanite
		}
		f.say("   nanite bridge --config site-%s.yaml   pid %-7d (%s)", s, p.cmd.Process.Pid, how)
	}
	return nil
}

// showProxy waits for A's proxy agent standing for B: B's exported
// services, and B's lowest load from B's presence.
func (f *federation) showProxy(ctx context.Context) error {
	f.step("site A's proxy agent for " + f.b.cluster.String())
	t0 := time.Now()
	if err := f.waitFor(ctx, "A's proxy agent with B's services and load", 30*time.Second, func() error {
		p, ok := f.proxy()
		if !ok {
			return errors.New("no proxy agent at A")
		}
		if !offers(p, "/inventory/lookup") || !offers(p, "/inventory/coldroom") || p.Status != 0.2 {
			return fmt.Errorf("proxy %s: load %v, services %v", p.Identity, p.Status, serviceNames(p))
		}
		return nil
	}); err != nil {
		return err
	}
	f.say("   it appeared %v after the bridges started; site A's cluster now:", time.Since(t0).Round(10*time.Millisecond))
	f.table(f.req)
	p, _ := f.proxy()
	if offers(p, "/admin/restock") {
		return errors.New("A's proxy offers /admin/restock, which B does not export")
	}
	f.say("   %s offers what B exports to A (not /admin/*, although A imports it),", p.Identity)
	f.say("   with load 0.2: inv-south's, B's least-loaded agent, from B's presence over s2s.")
	return nil
}

// showCalls: calls from the requester at A.
func (f *federation) showCalls(ctx context.Context) error {
	f.step("a local service at A: the orders agent answers, nothing crosses")
	if _, err := f.call(ctx, "/orders/list", nil, "orders-a"); err != nil {
		return err
	}

	f.step("a service only at B: A's mapper picks the proxy, B's bridge picks B's least-loaded agent")
	if _, err := f.call(ctx, "/inventory/lookup", lookupIn{SKU: "widget"}, "inv-south"); err != nil {
		return err
	}

	target := nanite.TargetXMPP + f.b.cluster.String() + "/inv-north"
	f.step("a specific agent at B, by its JID: WithTarget(" + fmt.Sprintf("%q", target) + ")")
	if _, err := f.call(ctx, "/inventory/lookup", lookupIn{SKU: "widget"}, "inv-north", nanite.WithTarget(target)); err != nil {
		return err
	}

	f.step("fan-out (selector all): one result per agent at B, each named by its JID")
	if err := f.fanOut(ctx, "inv-north", "inv-south"); err != nil {
		return err
	}

	f.step("streamed intermediate results: B's agent sends a shelf at a time, A's requester sees each as it comes")
	var shelves int
	resp, err := f.call(ctx, "/inventory/audit", nil, "", nanite.OnIntermediate(func(in nanite.Intermediate) {
		shelves++
		f.say("   ... %s %s=%s", in.Agent, in.Key, in.Payload)
	}))
	if err != nil {
		return err
	}
	var s string
	if err := resp.Decode(&s); err != nil || shelves != 2 || !strings.Contains(s, "inv-south") {
		return fmt.Errorf("/inventory/audit: %d intermediates, result %q (%v); want 2 from inv-south", shelves, s, err)
	}
	return nil
}

// showRefusals: what B does not export never leaves A.
func (f *federation) showRefusals(ctx context.Context) error {
	f.step("a service B does not export: /admin/restock")
	_, err := f.call(ctx, "/admin/restock", nil, "")
	if !errors.Is(err, nanite.ErrNoAgent) {
		return fmt.Errorf("/admin/restock from A: %v, want no agent", err)
	}
	f.say("   and addressed to B's cluster, WithTarget(%q):", nanite.TargetXMPP+f.b.cluster.String())
	_, err = f.call(ctx, "/admin/restock", nil, "", nanite.WithTarget(nanite.TargetXMPP+f.b.cluster.String()))
	if !errors.Is(err, nanite.ErrNoAgent) {
		return fmt.Errorf("/admin/restock to %s: %v, want no agent", f.b.cluster, err)
	}
	f.say("   refused at A at once: no agent of A's cluster offers it (B's agents have it, but B's bridge")
	f.say("   does not export it, so A's proxy does not offer it); nothing was sent to B.")
	f.say("   (a plain XMPP client asking B directly is refused by B's bridge: see alice below)")
	return nil
}

// showLeave: inv-south stops; B's bridge says so, A's proxy follows.
func (f *federation) showLeave(ctx context.Context) error {
	f.step("inv-south leaves (SIGTERM): B's bridge tells A, A's routing follows")
	t0 := time.Now()
	if err := f.agents["inv-south"].stop(); err != nil {
		return fmt.Errorf("inv-south: %w", err)
	}
	if err := f.waitFor(ctx, "A's proxy to follow inv-south's leaving", 20*time.Second, func() error {
		p, ok := f.proxy()
		if !ok || offers(p, "/inventory/coldroom") || p.Status != 0.6 {
			return fmt.Errorf("proxy %+v", p)
		}
		return nil
	}); err != nil {
		return err
	}
	p, _ := f.proxy()
	f.say("   after %v A's proxy has load %.1f (inv-north's) and no /inventory/coldroom (only inv-south had one):",
		time.Since(t0).Round(10*time.Millisecond), p.Status)
	f.table(f.req)
	if _, err := f.call(ctx, "/inventory/lookup", lookupIn{SKU: "widget"}, "inv-north"); err != nil {
		return err
	}
	if _, err := f.call(ctx, "/inventory/coldroom", nil, ""); !errors.Is(err, nanite.ErrNoAgent) {
		return fmt.Errorf("/inventory/coldroom after inv-south left: %v, want no agent", err)
	}
	return f.fanOut(ctx, "inv-north")
}

// showXMPPClient: alice, a user of site A's XMPP server, calls B's cluster
// JID; her op crosses s2s to server B and bridge B.
func (f *federation) showXMPPClient(ctx context.Context) error {
	f.step("a plain XMPP client: alice@site-a.test (c2s to server A) calls " + f.b.cluster.String() + " over s2s")
	tc, err := vertebra.LoadCAFile(f.a.xmpp.CAFile())
	if err != nil {
		return err
	}
	f.alice = vertebra.NewEndpoint(vertebra.Config{})
	f.aliceC = vertebra.NewConn(vertebra.ConnConfig{Endpoint: f.alice, Dial: vertebra.DialConfig{
		JID: jid.MustParse(aliceID + "/cli"), Password: "alice-password", Addr: f.a.xmpp.C2SAddr(), TLSConfig: tc}})
	cctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.aliceC.Run(cctx) }()
	f.stops = append(f.stops, func() { cancel(); <-done; _ = f.alice.Close() })
	select {
	case <-f.aliceC.Ready():
	case err := <-done:
		return fmt.Errorf("alice: %w", err)
	case <-time.After(10 * time.Second):
		return errors.New("alice: not connected after 10 s")
	case <-ctx.Done():
		return ctx.Err()
	}

	dctx, dcancel := context.WithTimeout(ctx, 10*time.Second)
	info, err := disco.GetInfoIQ(dctx, "", stanza.IQ{To: f.b.cluster}, f.aliceC.Session())
	dcancel()
	if err != nil {
		return fmt.Errorf("alice: disco#info of %s: %w", f.b.cluster, err)
	}
	var svcs []string
	for _, feat := range info.Features {
		if s, ok := strings.CutPrefix(feat.Var, vertebra.ServiceFeature("")); ok {
			svcs = append(svcs, s)
		}
	}
	f.say("   disco#info: what B lets alice call: %s", strings.Join(svcs, " "))

	call := func(op string, payload string) (*vertebra.Result, error) {
		c, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		t0 := time.Now()
		res, err := f.alice.Call(c, f.b.cluster, op, json.RawMessage(payload))
		took := time.Since(t0).Round(100 * time.Microsecond)
		if err != nil {
			f.say("   alice -> %s %s: %v  (%v)", op, payload, err, took)
		} else {
			f.say("   alice -> %s %s: %s from %s  (%v)", op, payload, res.Value(), res.From, took)
		}
		return res, err
	}
	res, err := call("/inventory/lookup", `{"sku":"gizmo"}`)
	if err != nil {
		return err
	}
	var line stockLine
	if err := json.Unmarshal(res.Value(), &line); err != nil || line.Agent != "inv-north" {
		return fmt.Errorf("alice's lookup: %s (%v), want inv-north's answer", res.Value(), err)
	}
	_, err = call("/admin/restock", `null`)
	var oe *vertebra.OpError
	if !errors.As(err, &oe) || !oe.Nack || !strings.HasPrefix(oe.Message, bridge.RefuseNotExported) {
		return fmt.Errorf("alice's /admin/restock: %v, want a nack %s", err, bridge.RefuseNotExported)
	}
	f.say("   refused by B's bridge before anything reached B's cluster (code %s, reason %s).", oe.Code, bridge.RefuseNotExported)

	var links []string
	for _, l := range f.a.xmpp.S2SLinks() {
		links = append(links, l.String())
	}
	f.say("   s2s connections in server A's log: %s", strings.Join(links, ", "))
	if !slices.Contains(links, "outgoing "+siteA+"->"+domB) || !slices.Contains(links, "outgoing "+domA+"->"+domB) {
		return fmt.Errorf("server A logged no s2s connection from %s or %s to %s: %v", siteA, domA, domB, links)
	}
	return nil
}

// shutdown stops everything in order and removes the work directory.
func (f *federation) shutdown(failed, showLogs bool) error {
	f.step("shutting down")
	if showLogs {
		for _, n := range []string{"bridge-a.log", "bridge-b.log"} {
			if _, err := os.Stat(filepath.Join(f.dir, n)); err == nil {
				f.say("   %s (last lines):\n%s", n, tail(filepath.Join(f.dir, n), 20))
			}
		}
	}
	t0 := time.Now()
	var errs []error
	// Bridges first: they drain, and tell their peers that their agents are
	// gone; then the agents; then the example's own mappers and client.
	for _, prefix := range []string{"bridge ", "agent "} {
		errs = append(errs, f.procs.stopAll(prefix)...)
	}
	for _, stop := range f.stops {
		stop()
	}
	var servers []interface{ Close() error }
	for _, s := range []*site{f.a, f.b} {
		if s != nil && s.rabbit != nil {
			servers = append(servers, s.rabbit)
		}
		if s != nil && s.xmpp != nil {
			servers = append(servers, s.xmpp)
		}
	}
	serr := make([]error, len(servers))
	var wg sync.WaitGroup
	for i, s := range servers {
		wg.Go(func() { serr[i] = s.Close() })
	}
	wg.Wait()
	errs = append(errs, serr...)
	what := "removed"
	if f.opts.Keep {
		what = "kept"
	} else {
		errs = append(errs, os.RemoveAll(f.dir))
	}
	err := errors.Join(errs...)
	if err == nil {
		f.say("   bridges, agents, RabbitMQ nodes and prosody servers stopped, %s %s (%v)", f.dir, what, time.Since(t0).Round(100*time.Millisecond))
		if !failed {
			f.say("\ndone in %v.", time.Since(f.start).Round(100*time.Millisecond))
		}
	}
	return err
}

// call makes a request from A's requester and prints its results. wantAgent,
// when set, is the agent (identity in the result's "agent" field, or the
// agent that answered) the single result must come from.
func (f *federation) call(ctx context.Context, svc string, payload any, wantAgent string, opts ...nanite.RequestOption) (*nanite.Response, error) {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	t0 := time.Now()
	resp, err := f.req.Request(cctx, svc, payload, opts...)
	took := time.Since(t0).Round(10 * time.Microsecond)
	arg := ""
	if payload != nil {
		b, _ := json.Marshal(payload)
		arg = " " + string(b)
	}
	if resp != nil {
		for _, r := range resp.Results {
			if r.Err != nil {
				f.say("   %s%s -> %s: error: %v  (%v)", svc, arg, r.Agent, r.Err, took)
			} else {
				f.say("   %s%s -> %s: %s  (%v)", svc, arg, r.Agent, r.Payload, took)
			}
		}
	}
	if err != nil {
		if resp == nil || len(resp.Results) == 0 {
			f.say("   %s%s -> error: %v  (%v)", svc, arg, err, took)
		}
		return resp, err
	}
	if wantAgent != "" {
		if got := answeredBy(resp.Results[0]); got != wantAgent {
			return resp, fmt.Errorf("%s answered by %s, want %s", svc, got, wantAgent)
		}
	}
	return resp, nil
}

// fanOut calls /inventory/stock on all agents of B; want are their names.
func (f *federation) fanOut(ctx context.Context, want ...string) error {
	resp, err := f.call(ctx, "/inventory/stock", nil, "", nanite.WithSelector(nanite.SelectAll))
	if err != nil {
		return err
	}
	var got []string
	for _, r := range resp.Results {
		if r.Err != nil {
			return fmt.Errorf("fan-out: %s: %w", r.Agent, r.Err)
		}
		want := nanite.TargetXMPP + f.b.cluster.String() + "/" + answeredBy(r)
		if r.Agent != want {
			return fmt.Errorf("fan-out result named %s, want %s", r.Agent, want)
		}
		got = append(got, answeredBy(r))
	}
	slices.Sort(got)
	if !slices.Equal(got, want) {
		return fmt.Errorf("fan-out answered by %v, want %v", got, want)
	}
	return nil
}

// answeredBy is the agent a result names in its payload ("agent"), else
// the agent that returned it.
func answeredBy(r nanite.Result) string {
	var v struct{ Agent string }
	if json.Unmarshal(r.Payload, &v) == nil && v.Agent != "" {
		return v.Agent
	}
	return r.Agent
}

func (f *federation) proxy() (nanite.AgentState, bool) {
	for _, a := range f.req.Agents() {
		if a.Identity == bridge.ProxyIdentity(f.b.cluster) {
			return a, true
		}
	}
	return nanite.AgentState{}, false
}

func offers(a nanite.AgentState, svc string) bool { return slices.Contains(serviceNames(a), svc) }

func serviceNames(a nanite.AgentState) []string {
	var s []string
	for _, svc := range a.Services {
		s = append(s, svc.Name)
	}
	slices.Sort(s)
	return s
}

// table prints the agents a mapper sees.
func (f *federation) table(m *nanite.Mapper) {
	w := tabwriter.NewWriter(f.out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "   IDENTITY\tLOAD\tTAGS\tSERVICES (besides /nanite/*)")
	agents := m.Agents()
	slices.SortFunc(agents, func(a, b nanite.AgentState) int { return strings.Compare(a.Identity, b.Identity) })
	for _, a := range agents {
		tags := strings.Join(a.Tags, ",")
		if tags == "" {
			tags = "-"
		}
		svcs := slices.DeleteFunc(serviceNames(a), func(s string) bool { return strings.HasPrefix(s, "/"+nanite.BuiltinActor+"/") })
		fmt.Fprintf(w, "   %s\t%.1f\t%s\t%s\n", a.Identity, a.Status, tags, strings.Join(svcs, " "))
	}
	_ = w.Flush()
}

// waitFor polls check until it returns nil, a child dies, ctx ends or
// timeout passes.
func (f *federation) waitFor(ctx context.Context, what string, timeout time.Duration, check func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := check()
		if err == nil {
			return nil
		}
		if derr := f.procs.dead(); derr != nil {
			return fmt.Errorf("waiting for %s: %w", what, derr)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("waiting for %s: still %v after %v", what, err, timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}
