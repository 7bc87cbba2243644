package testenv

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// ProsodyOptions configures a private prosody server.
type ProsodyOptions struct {
	// VirtualHosts are the XMPP domains served, e.g. "site-a.test". Each gets
	// a certificate signed by the server's CA (see CAFile). Default:
	// "localhost".
	VirtualHosts []string
	// Components maps a component domain (e.g. "nanite.site-a.test") to its
	// secret (XEP-0114). They share ComponentAddr.
	Components map[string]string
	// Accounts are registered before the server starts.
	Accounts []Account
	// LogLevel is prosody's minimum log level: "info" (default) or
	// "debug" (logs every stanza). Readiness is read from prosody's
	// info-level log lines, so quieter levels are refused.
	LogLevel string
	// ExtraConfig is Lua appended to the global section of the
	// configuration, before the host sections.
	ExtraConfig string
	// Logger receives progress messages; nil discards them.
	Logger *slog.Logger

	// Interface is the loopback address the server listens on, e.g.
	// "127.0.0.2" (Linux routes all of 127.0.0.0/8 to the loopback
	// interface). Default: "127.0.0.1". Other addresses are refused: test
	// servers never listen beyond the machine.
	Interface string
	// S2S turns on server-to-server connections (federation): an s2s
	// listener on a private port of Interface ([Prosody.S2SAddr]), STARTTLS
	// with the host certificates (required), authentication by certificate
	// when the peer's CA is the server's own (servers from
	// [StartFederatedProsody] share one CA) and by dialback otherwise.
	// Remote domains are found only through static routes (S2SRoutes,
	// [Prosody.AddS2SRoute]), never through DNS; an unrouted domain is
	// unreachable at once. Without S2S (the default) the server has no s2s
	// at all.
	S2S bool
	// S2SRoutes maps a remote XMPP domain (e.g. "nanite.site-b.test") to
	// the address of the s2s listener that serves it, an IP address and
	// port such as "127.0.0.3:41234". Only with S2S.
	S2SRoutes map[string]string

	// ca, when set, signs the host certificates instead of a CA of the
	// server's own (StartFederatedProsody shares one between its servers).
	ca *certAuthority
}

// Account is an XMPP account: User@Host with Password.
type Account struct{ User, Host, Password string }

// Prosody is a private prosody server: its own temporary directory
// (configuration, data, certificates, logs) and ports on 127.0.0.1 (or
// [ProsodyOptions].Interface). Client connections may authenticate with
// PLAIN without TLS; STARTTLS is offered with certificates signed by CAFile.
// By default there is no s2s: the virtual hosts of one server reach each
// other directly. With [ProsodyOptions].S2S, or from
// [StartFederatedProsody], it federates with other private servers.
//
// Start, Stop, Restart and Close must not be called concurrently with each
// other; the other methods may be called at any time from any goroutine.
type Prosody struct {
	opts    ProsodyOptions
	log     *slog.Logger
	dir     string
	config  string
	binary  string
	ctlPath string

	// Set by StartProsody before the first start, then constant.
	iface                      string
	c2sPort, compPort, s2sPort int

	mu     sync.Mutex // guards proc, closed and routes
	proc   *proc
	closed bool
	routes map[string]netip.AddrPort // s2s routes: domain -> listener
}

// StartProsody starts a private prosody server and waits until it listens
// on its client and component ports (about 0.1 s). Close it when done.
func StartProsody(ctx context.Context, opts ProsodyOptions) (*Prosody, error) {
	binary, err := lookProgram("prosody")
	if err != nil {
		return nil, err
	}
	ctlPath, err := lookProgram("prosodyctl")
	if err != nil {
		return nil, err
	}
	if len(opts.VirtualHosts) == 0 {
		opts.VirtualHosts = []string{"localhost"}
	}
	switch opts.LogLevel {
	case "":
		opts.LogLevel = "info"
	case "info", "debug":
	default:
		return nil, fmt.Errorf("testenv: prosody LogLevel %q: use \"info\" or \"debug\" (readiness is read from info-level log lines)", opts.LogLevel)
	}
	iface, err := loopbackInterface(opts.Interface)
	if err != nil {
		return nil, err
	}
	routes, err := parseS2SRoutes(opts.S2S, opts.S2SRoutes)
	if err != nil {
		return nil, err
	}
	dir, err := makeServerDir("prosody")
	if err != nil {
		return nil, err
	}
	p := &Prosody{
		opts:    opts,
		log:     discardIfNil(opts.Logger),
		dir:     dir,
		config:  filepath.Join(dir, "prosody.cfg.lua"),
		binary:  binary,
		ctlPath: ctlPath,
		iface:   iface,
		routes:  routes,
	}
	if err := p.setup(); err != nil {
		_ = os.RemoveAll(dir)
		return nil, err
	}
	register(p)
	for attempt := 1; ; attempt++ {
		nports := 2
		if opts.S2S {
			nports = 3
		}
		ports, err := freePortsOn(iface, nports)
		if err != nil {
			_ = p.Close()
			return nil, err
		}
		p.c2sPort, p.compPort = ports[0], ports[1]
		if opts.S2S {
			p.s2sPort = ports[2]
		}
		if err := p.writeConfig(); err != nil {
			_ = p.Close()
			return nil, err
		}
		if attempt == 1 {
			for _, a := range opts.Accounts {
				if err := p.AddAccount(ctx, a); err != nil {
					_ = p.Close()
					return nil, err
				}
			}
		}
		err = p.Start(ctx)
		if err == nil {
			return p, nil
		}
		if attempt == 3 || ctx.Err() != nil || !errors.Is(err, errPortBusy) {
			_ = p.Close()
			return nil, err
		}
		p.log.Warn("testenv: prosody port taken; retrying on other ports", "err", err)
	}
}

var errPortBusy = errors.New("port in use")

func (p *Prosody) setup() error {
	for _, d := range []string{"data", "certs"} {
		if err := os.MkdirAll(filepath.Join(p.dir, d), 0o750); err != nil {
			return fmt.Errorf("testenv: %w", err)
		}
	}
	ca := p.opts.ca
	if ca == nil {
		var err error
		if ca, err = newCA("testenv prosody CA"); err != nil {
			return err
		}
	}
	if err := writePEM(p.CAFile(), "CERTIFICATE", ca.cert.Raw, 0o644); err != nil {
		return err
	}
	// Prosody looks for <host>.crt and <host>.key in its certificates dir.
	// Components get their own too, for s2s (prosody would otherwise use
	// the parent domain's, which does not name them). Servers present them
	// as client certificates on outgoing s2s connections.
	for _, h := range p.Domains() {
		base := filepath.Join(p.dir, "certs", h)
		if err := ca.issue(base+".crt", base+".key", h, []string{h},
			x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth); err != nil {
			return err
		}
	}
	if p.opts.S2S {
		return p.setupS2S()
	}
	return nil
}

func (p *Prosody) writeConfig() error {
	q := luaString
	var b strings.Builder
	b.WriteString("-- Written by github.com/nanite-go/nanite/testenv.\n")
	b.WriteString("run_as_root = true\n")
	fmt.Fprintf(&b, "pidfile = %s\n", q(filepath.Join(p.dir, "prosody.pid")))
	fmt.Fprintf(&b, "data_path = %s\n", q(filepath.Join(p.dir, "data")))
	fmt.Fprintf(&b, "certificates = %s\n", q(filepath.Join(p.dir, "certs")))
	fmt.Fprintf(&b, "log = { { levels = { min = %s }; to = \"file\"; filename = %s } }\n", q(p.opts.LogLevel), q(p.logPath()))
	for _, opt := range []string{"interfaces", "local_interfaces", "c2s_interfaces", "component_interfaces", "s2s_interfaces"} {
		fmt.Fprintf(&b, "%s = { %s }\n", opt, q(p.iface))
	}
	fmt.Fprintf(&b, "c2s_ports = { %d }\n", p.c2sPort)
	fmt.Fprintf(&b, "component_ports = { %d }\n", p.compPort)
	b.WriteString(`c2s_direct_tls_ports = { }
legacy_ssl_ports = { }
s2s_direct_tls_ports = { }
http_ports = { }
https_ports = { }
`)
	if p.opts.S2S {
		p.writeS2SConfig(&b)
	} else {
		b.WriteString(`s2s_ports = { }
modules_enabled = { "roster"; "saslauth"; "tls"; "disco"; "ping"; "posix" }
modules_disabled = { "s2s"; "s2s_auth_certs" }
`)
	}
	b.WriteString(`authentication = "internal_hashed"
storage = "internal"
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
-- Without this a 10 KB stanza takes ~90 ms (Nagle); with it ~1 ms.
network_settings = { nagle = false; min_wait = 0.00001 }
c2s_stanza_size_limit = 16*1024*1024
component_stanza_size_limit = 16*1024*1024
c2s_max_child_elements = 1000000
-- Only mod_limits (not loaded) rate-limits; generous in case it is enabled.
limits = { c2s = { rate = "1024mb/s"; burst = "2s" }; s2sin = { rate = "1024mb/s"; burst = "2s" } }
`)
	if p.opts.ExtraConfig != "" {
		b.WriteString(p.opts.ExtraConfig)
		b.WriteString("\n")
	}
	for _, h := range p.opts.VirtualHosts {
		fmt.Fprintf(&b, "\nVirtualHost %s\n", q(h))
	}
	for _, c := range p.Domains()[len(p.opts.VirtualHosts):] {
		fmt.Fprintf(&b, "\nComponent %s\n\tcomponent_secret = %s\n", q(c), q(p.opts.Components[c]))
	}
	if err := os.WriteFile(p.config, []byte(b.String()), 0o600); err != nil {
		return fmt.Errorf("testenv: %w", err)
	}
	return nil
}

// luaString quotes s as a Lua string literal.
func luaString(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '"' || c == '\\':
			b.WriteByte('\\')
			b.WriteByte(c)
		case c < 0x20 || c == 0x7f:
			fmt.Fprintf(&b, "\\%03d", c)
		default:
			b.WriteByte(c)
		}
	}
	b.WriteByte('"')
	return b.String()
}

// String describes the server.
func (p *Prosody) String() string { return "prosody in " + p.dir }

// Dir returns the server's temporary directory.
func (p *Prosody) Dir() string { return p.dir }

// ConfigFile returns the path of the configuration (for prosodyctl --config).
func (p *Prosody) ConfigFile() string { return p.config }

// CAFile returns the PEM file of the CA that signed the virtual hosts'
// certificates, for STARTTLS clients.
func (p *Prosody) CAFile() string { return filepath.Join(p.dir, "ca.pem") }

// C2SAddr returns the client-to-server address, 127.0.0.1:port (or the
// server's Interface instead of 127.0.0.1).
func (p *Prosody) C2SAddr() string { return p.addr(p.c2sPort) }

// ComponentAddr returns the XEP-0114 component address, 127.0.0.1:port (or
// the server's Interface instead of 127.0.0.1).
func (p *Prosody) ComponentAddr() string { return p.addr(p.compPort) }

func (p *Prosody) addr(port int) string { return net.JoinHostPort(p.iface, strconv.Itoa(port)) }

// Domains returns the server's XMPP domains, its virtual hosts and then its
// component domains (sorted).
func (p *Prosody) Domains() []string {
	comps := make([]string, 0, len(p.opts.Components))
	for c := range p.opts.Components {
		comps = append(comps, c)
	}
	slices.Sort(comps)
	return append(slices.Clone(p.opts.VirtualHosts), comps...)
}

// AddAccount registers an account (or changes its password) with prosodyctl
// (about 0.1 s). It works whether the server runs or not.
func (p *Prosody) AddAccount(ctx context.Context, a Account) error {
	_, err := p.Ctl(ctx, "register", a.User, a.Host, a.Password)
	return err
}

// Ctl runs prosodyctl with the server's configuration and returns its
// combined output.
func (p *Prosody) Ctl(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, p.ctlPath, append([]string{"--config", p.config}, args...)...)
	cmd.Dir = p.dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("testenv: prosodyctl %s: %w: %s", args[0], err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

func (p *Prosody) current() *proc {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.proc
}

// Running reports whether the server's process is running.
func (p *Prosody) Running() bool {
	pr := p.current()
	return pr != nil && !pr.exited()
}

// Start starts the server after Stop or Kill, on the same ports and data.
func (p *Prosody) Start(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("testenv: starting %v: %w", p, err)
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return fmt.Errorf("testenv: %v: closed", p)
	}
	if p.proc != nil && !p.proc.exited() {
		p.mu.Unlock()
		return fmt.Errorf("testenv: %v: already running", p)
	}
	begin := time.Now()
	logStart := fileSize(p.logPath())
	pr, err := startProc(p.binary, []string{"--config", p.config, "-F"}, os.Environ(), p.dir, p.stdoutPath())
	if err != nil {
		p.mu.Unlock()
		return err
	}
	p.proc = pr
	p.mu.Unlock()

	if err := p.waitReady(ctx, pr, logStart); err != nil {
		_ = pr.killGroup()
		return fmt.Errorf("testenv: %v did not start: %w\n%s", p, err, p.tail(30))
	}
	attrs := []any{"c2s", p.C2SAddr(), "component", p.ComponentAddr()}
	if p.opts.S2S {
		attrs = append(attrs, "s2s", p.S2SAddr())
	}
	p.log.Info("testenv: prosody ready", append(attrs, "took", time.Since(begin).Round(time.Millisecond))...)
	return nil
}

// waitReady waits until prosody logs that it listens on its ports (which
// proves the listeners are its own), they accept connections and, with s2s,
// the routing plugin is loaded.
func (p *Prosody) waitReady(ctx context.Context, pr *proc, logStart int64) error {
	want := []string{fmt.Sprintf("Activated service 'c2s' on [%s]:%d", p.iface, p.c2sPort)}
	addrs := []string{p.C2SAddr()}
	if len(p.opts.Components) > 0 {
		want = append(want, fmt.Sprintf("Activated service 'component' on [%s]:%d", p.iface, p.compPort))
		addrs = append(addrs, p.ComponentAddr())
	}
	if p.opts.S2S {
		want = append(want, fmt.Sprintf("Activated service 's2s' on [%s]:%d", p.iface, p.s2sPort), s2sRoutesLoaded)
		addrs = append(addrs, p.S2SAddr())
	}
	for {
		if pr.exited() {
			return fmt.Errorf("%w: %v", errExited, pr.exitError())
		}
		log := readFrom(p.logPath(), logStart)
		if strings.Contains(log, "Failed to open server port") {
			return errPortBusy
		}
		if p.opts.S2S && (strings.Contains(log, s2sRoutesFailed) || strings.Contains(log, s2sRoutesModuleError)) {
			return errors.New("testenv's s2s routing module for prosody failed (written for prosody 0.12)")
		}
		ready := true
		for _, w := range want {
			ready = ready && strings.Contains(log, w)
		}
		for _, a := range addrs {
			ready = ready && dialOK(ctx, a)
		}
		if ready {
			return nil
		}
		if err := sleepCtx(ctx, pollInterval); err != nil {
			return err
		}
	}
}

// Stop stops the server (SIGTERM) and waits for it to exit; if ctx ends
// first it is killed. Stopping a stopped server does nothing.
func (p *Prosody) Stop(ctx context.Context) error {
	pr := p.current()
	if pr == nil || pr.exited() {
		return nil
	}
	if err := pr.signal(syscall.SIGTERM); err != nil {
		return err
	}
	if err := pr.wait(ctx); err != nil {
		_ = pr.killGroup()
		return fmt.Errorf("testenv: stopping %v: %w; killed it", p, err)
	}
	return nil
}

// Restart stops the server and starts it again on the same ports.
func (p *Prosody) Restart(ctx context.Context) error {
	if err := p.Stop(ctx); err != nil {
		return err
	}
	return p.Start(ctx)
}

// Kill crashes the server with SIGKILL. Killing a stopped server does nothing.
func (p *Prosody) Kill() error {
	pr := p.current()
	if pr == nil {
		return nil
	}
	return pr.killGroup()
}

// Close stops the server and removes its directory. It is safe to call more
// than once.
func (p *Prosody) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	p.mu.Unlock()
	defer unregister(p)
	ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
	defer cancel()
	var errs []error
	if err := p.Stop(ctx); err != nil {
		errs = append(errs, err)
	}
	if err := p.Kill(); err != nil {
		errs = append(errs, err)
	}
	if err := os.RemoveAll(p.dir); err != nil {
		errs = append(errs, fmt.Errorf("testenv: %w", err))
	}
	return errors.Join(errs...)
}

func (p *Prosody) logPath() string    { return filepath.Join(p.dir, "prosody.log") }
func (p *Prosody) stdoutPath() string { return filepath.Join(p.dir, "stdout.log") }
func (p *Prosody) tail(n int) string  { return tails(n, p.stdoutPath(), p.logPath()) }

// Logs returns the last lines of the server's log and output.
func (p *Prosody) Logs() string { return p.tail(failureLogLines) }

func fileSize(path string) int64 {
	st, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return st.Size()
}

// readFrom returns the contents of path from offset on ("" on error).
func readFrom(path string, offset int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	if _, err := f.Seek(offset, 0); err != nil {
		return ""
	}
	var b bytes.Buffer
	_, _ = b.ReadFrom(f)
	return b.String()
}
