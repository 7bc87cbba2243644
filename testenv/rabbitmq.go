package testenv

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// RabbitOptions configures a private RabbitMQ node.
type RabbitOptions struct {
	// Name goes into the Erlang node name, which is
	// "nanite-<Name>-<pid>-<random>@localhost". Optional.
	Name string
	// Management enables the rabbitmq_management plugin (the HTTP API on
	// ManagementURL). Provisioning (AddVhost, AddUser, ...) uses the API when
	// it is on, else rabbitmqctl (about 0.4 s a call). [Rabbit] turns it on.
	Management bool
	// TLS, when set, adds an amqps listener (see TLSURL) using these files.
	// The client certificate is verified if one is sent but not required.
	TLS *TLSFiles
	// Logger receives progress messages; nil discards them.
	Logger *slog.Logger
}

// RabbitMQ is a private RabbitMQ node: its own temporary directory (data,
// logs, config, Erlang cookie), node name and ports on 127.0.0.1. The guest
// user (password guest) is an administrator and may log in from loopback.
//
// Start, Stop, Restart and Close must not be called concurrently with each
// other; the other methods may be called at any time from any goroutine.
type RabbitMQ struct {
	opts  RabbitOptions
	log   *slog.Logger
	dir   string
	node  string
	sbin  string
	httpc *http.Client

	// Set by StartRabbitMQ before the first start, then constant.
	port, distPort, mgmtPort, tlsPort int

	mu     sync.Mutex // guards proc and closed
	proc   *proc
	closed bool
}

// StartRabbitMQ starts a private node and waits until it accepts AMQP
// connections (and, with Management, HTTP API calls); it takes about 5 s.
// Close it when done. If the node does not start in time or its ports turn
// out to be taken, the error includes the tail of its log.
func StartRabbitMQ(ctx context.Context, opts RabbitOptions) (*RabbitMQ, error) {
	sbin, err := rabbitSbin()
	if err != nil {
		return nil, err
	}
	dir, err := makeServerDir("rabbitmq")
	if err != nil {
		return nil, err
	}
	name := "nanite"
	if s := sanitize(opts.Name, "_-", 40); s != "" {
		name += "-" + s
	}
	r := &RabbitMQ{
		opts: opts,
		log:  discardIfNil(opts.Logger),
		dir:  dir,
		node: fmt.Sprintf("%s-%d-%s@localhost", name, os.Getpid(), randomHex(3)),
		sbin: sbin,
		httpc: &http.Client{
			Transport: &http.Transport{Proxy: nil, MaxIdleConnsPerHost: 4},
			Timeout:   30 * time.Second,
		},
	}
	if err := r.setup(); err != nil {
		_ = os.RemoveAll(dir)
		return nil, err
	}
	register(r)
	// A port picked as free may be taken by someone else before the node
	// binds it; then the node exits at once and another set of ports is tried.
	for attempt := 1; ; attempt++ {
		if err := r.pickPorts(); err != nil {
			_ = r.Close()
			return nil, err
		}
		err := r.Start(ctx)
		if err == nil {
			return r, nil
		}
		if attempt == 3 || ctx.Err() != nil || !errors.Is(err, errExited) {
			_ = r.Close()
			return nil, err
		}
		r.log.Warn("testenv: rabbitmq node exited while starting; retrying on other ports", "node", r.node, "err", err)
		if err := os.RemoveAll(filepath.Join(dir, "mnesia")); err != nil {
			_ = r.Close()
			return nil, fmt.Errorf("testenv: %w", err)
		}
	}
}

var errExited = errors.New("server process exited")

func (r *RabbitMQ) setup() error {
	home := filepath.Join(r.dir, "home")
	for _, d := range []string{home, filepath.Join(r.dir, "mnesia"), filepath.Join(r.dir, "log")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("testenv: %w", err)
		}
	}
	// The CLI tools and the node authenticate each other with this cookie;
	// Erlang refuses a cookie file that others can read.
	if err := os.WriteFile(filepath.Join(home, ".erlang.cookie"), []byte(strings.ToUpper(randomHex(16))), 0o400); err != nil {
		return fmt.Errorf("testenv: %w", err)
	}
	plugins := "[].\n"
	if r.opts.Management {
		plugins = "[rabbitmq_management].\n"
	}
	if err := os.WriteFile(filepath.Join(r.dir, "enabled_plugins"), []byte(plugins), 0o644); err != nil {
		return fmt.Errorf("testenv: %w", err)
	}
	// An empty environment file shields the node from /etc/rabbitmq/rabbitmq-env.conf.
	if err := os.WriteFile(filepath.Join(r.dir, "rabbitmq-env.conf"), nil, 0o644); err != nil {
		return fmt.Errorf("testenv: %w", err)
	}
	return nil
}

func (r *RabbitMQ) pickPorts() error {
	ports, err := freePorts(4)
	if err != nil {
		return err
	}
	r.port, r.distPort, r.mgmtPort, r.tlsPort = ports[0], ports[1], ports[2], ports[3]
	if !r.opts.Management {
		r.mgmtPort = 0
	}
	if r.opts.TLS == nil {
		r.tlsPort = 0
	}
	return r.writeConfig()
}

func (r *RabbitMQ) writeConfig() error {
	var b strings.Builder
	fmt.Fprintf(&b, "listeners.tcp.default = 127.0.0.1:%d\n", r.port)
	b.WriteString("loopback_users = none\n")
	b.WriteString("log.console = false\n")
	b.WriteString("log.file.level = info\n")
	if r.opts.Management {
		fmt.Fprintf(&b, "management.tcp.port = %d\n", r.mgmtPort)
		b.WriteString("management.tcp.ip = 127.0.0.1\n")
	}
	if f := r.opts.TLS; f != nil {
		fmt.Fprintf(&b, "listeners.ssl.default = 127.0.0.1:%d\n", r.tlsPort)
		fmt.Fprintf(&b, "ssl_options.cacertfile = %s\n", f.CACert)
		fmt.Fprintf(&b, "ssl_options.certfile = %s\n", f.Cert)
		fmt.Fprintf(&b, "ssl_options.keyfile = %s\n", f.Key)
		b.WriteString("ssl_options.verify = verify_peer\n")
		b.WriteString("ssl_options.fail_if_no_peer_cert = false\n")
	}
	if err := os.WriteFile(filepath.Join(r.dir, "rabbitmq.conf"), []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("testenv: %w", err)
	}
	return nil
}

func (r *RabbitMQ) env() []string {
	return append(envWithout("RABBITMQ_", "HOME", "LANG", "LC_"),
		"HOME="+filepath.Join(r.dir, "home"),
		"LANG=C.UTF-8",
		"LC_ALL=C.UTF-8",
		"RABBITMQ_NODENAME="+r.node,
		"RABBITMQ_NODE_IP_ADDRESS=127.0.0.1",
		"RABBITMQ_NODE_PORT="+strconv.Itoa(r.port),
		"RABBITMQ_DIST_PORT="+strconv.Itoa(r.distPort),
		"RABBITMQ_MNESIA_BASE="+filepath.Join(r.dir, "mnesia"),
		"RABBITMQ_LOG_BASE="+filepath.Join(r.dir, "log"),
		"RABBITMQ_CONFIG_FILE="+filepath.Join(r.dir, "rabbitmq.conf"),
		"RABBITMQ_ADVANCED_CONFIG_FILE="+filepath.Join(r.dir, "advanced.config"),
		"RABBITMQ_ENABLED_PLUGINS_FILE="+filepath.Join(r.dir, "enabled_plugins"),
		"RABBITMQ_PID_FILE="+filepath.Join(r.dir, "rabbitmq.pid"),
		"RABBITMQ_CONF_ENV_FILE="+filepath.Join(r.dir, "rabbitmq-env.conf"),
		// Don't pin Erlang schedulers to CPUs: several nodes share them.
		"RABBITMQ_SCHEDULER_BIND_TYPE=u",
	)
}

// String returns the node name.
func (r *RabbitMQ) String() string { return "rabbitmq node " + r.node }

// Node returns the Erlang node name (for rabbitmqctl -n).
func (r *RabbitMQ) Node() string { return r.node }

// Dir returns the node's temporary directory.
func (r *RabbitMQ) Dir() string { return r.dir }

// Port returns the AMQP port on 127.0.0.1.
func (r *RabbitMQ) Port() int { return r.port }

// Addr returns the AMQP listener's address, 127.0.0.1:port.
func (r *RabbitMQ) Addr() string { return hostPort(r.port) }

// URL returns the AMQP URL of the default vhost "/" for user guest.
func (r *RabbitMQ) URL() string {
	return fmt.Sprintf("amqp://guest:guest@%s/", r.Addr())
}

// VhostURL returns the AMQP URL of vhost for user and pass, escaping them
// as needed (vhost "/" becomes %2F).
func (r *RabbitMQ) VhostURL(vhost, user, pass string) string {
	return amqpURL("amqp", r.Addr(), vhost, user, pass)
}

// TLSURL returns the amqps URL of the default vhost for user guest, or ""
// when the node has no TLS listener. The server certificate is valid for
// 127.0.0.1 (see [GenerateTLS] and [TLSFiles.ClientConfig]).
func (r *RabbitMQ) TLSURL() string {
	if r.tlsPort == 0 {
		return ""
	}
	return amqpURL("amqps", hostPort(r.tlsPort), "/", "guest", "guest")
}

// TLSPort returns the amqps port, or 0 when the node has no TLS listener.
func (r *RabbitMQ) TLSPort() int { return r.tlsPort }

// ManagementURL returns the HTTP API's base URL (http://127.0.0.1:port), or
// "" when the management plugin is off. User guest, password guest.
func (r *RabbitMQ) ManagementURL() string {
	if r.mgmtPort == 0 {
		return ""
	}
	return "http://" + hostPort(r.mgmtPort)
}

func amqpURL(scheme, addr, vhost, user, pass string) string {
	u := url.URL{
		Scheme:  scheme,
		User:    url.UserPassword(user, pass),
		Host:    addr,
		Path:    "/" + vhost,
		RawPath: "/" + url.PathEscape(vhost),
	}
	return u.String()
}

func (r *RabbitMQ) current() *proc {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.proc
}

// Running reports whether the node's process is running.
func (r *RabbitMQ) Running() bool {
	p := r.current()
	return p != nil && !p.exited()
}

// Start starts the node after Stop or Kill, on the same ports, node name and
// data directory, so durable queues and persistent messages survive. It
// returns once the node accepts connections.
func (r *RabbitMQ) Start(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("testenv: starting %v: %w", r, err)
	}
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return fmt.Errorf("testenv: %v: closed", r)
	}
	if r.proc != nil && !r.proc.exited() {
		r.mu.Unlock()
		return fmt.Errorf("testenv: %v: already running", r)
	}
	begin := time.Now()
	p, err := startProc(filepath.Join(r.sbin, "rabbitmq-server"), nil, r.env(), r.dir, r.stdoutPath())
	if err != nil {
		r.mu.Unlock()
		return err
	}
	r.proc = p
	r.mu.Unlock()

	if err := r.waitReady(ctx, p); err != nil {
		_ = p.killGroup()
		return fmt.Errorf("testenv: %v did not start: %w\n%s", r, err, r.tail(30))
	}
	r.log.Info("testenv: rabbitmq node ready", "node", r.node, "amqp", r.Addr(),
		"management", r.ManagementURL(), "took", time.Since(begin).Round(time.Millisecond))
	return nil
}

func (r *RabbitMQ) waitReady(ctx context.Context, p *proc) error {
	amqpOK, httpOK := false, !r.opts.Management
	for {
		if p.exited() {
			return fmt.Errorf("%w: %v", errExited, p.exitError())
		}
		if !amqpOK {
			amqpOK = r.amqpReady(ctx) == nil && (r.tlsPort == 0 || dialOK(ctx, hostPort(r.tlsPort)))
		}
		if amqpOK && !httpOK {
			httpOK = r.api(ctx, http.MethodGet, "/api/overview", nil, nil) == nil
		}
		if amqpOK && httpOK {
			return nil
		}
		if err := sleepCtx(ctx, pollInterval); err != nil {
			return err
		}
	}
}

// amqpReady opens an AMQP connection far enough to read the server's
// Connection.Start, and checks that it comes from this node (whose name is
// in the default cluster name), not from a stranger on a reused port.
func (r *RabbitMQ) amqpReady(ctx context.Context) error {
	d := net.Dialer{Timeout: time.Second}
	c, err := d.DialContext(ctx, "tcp", r.Addr())
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte("AMQP\x00\x00\x09\x01")); err != nil {
		return err
	}
	var hdr [7]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return err
	}
	size := binary.BigEndian.Uint32(hdr[3:])
	if hdr[0] != 1 || size > 1<<20 {
		return errors.New("not an AMQP 0-9-1 Connection.Start")
	}
	payload := make([]byte, size)
	if _, err := io.ReadFull(c, payload); err != nil {
		return err
	}
	// The default cluster name is <node name>@<FQDN>, not @localhost.
	id, _, _ := strings.Cut(r.node, "@")
	if !bytes.Contains(payload, []byte(id+"@")) {
		return fmt.Errorf("the broker on %s is not node %s", r.Addr(), r.node)
	}
	return nil
}

// Stop stops the node gracefully and waits for its process to exit (about
// 1.5 s), keeping its data for Start. If ctx ends first the node is killed.
// Stopping a stopped node does nothing.
func (r *RabbitMQ) Stop(ctx context.Context) error {
	p := r.current()
	if p == nil || p.exited() {
		return nil
	}
	_ = p.signalGroup(syscall.SIGCONT) // a frozen node cannot stop
	begin := time.Now()
	if r.opts.Management {
		// RabbitMQ 3.10 spends 5 s of its shutdown in the management agent's
		// event handler (fixed upstream in 3.13, rabbitmq-server#11070);
		// removing the handler first avoids the wait.
		hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err := r.Ctl(hctx, "eval", "gen_event:delete_handler(rabbit_event, rabbit_mgmt_db_handler, []).")
		cancel()
		if err != nil {
			r.log.Warn("testenv: could not remove the management event handler; stop will take 5 s longer", "node", r.node, "err", err)
		}
	}
	// The rabbitmq-server script traps SIGTERM and stops the node cleanly.
	if err := p.signal(syscall.SIGTERM); err != nil {
		return err
	}
	if err := p.wait(ctx); err != nil {
		_ = p.killGroup()
		return fmt.Errorf("testenv: stopping %v: %w; killed it", r, err)
	}
	r.log.Info("testenv: rabbitmq node stopped", "node", r.node, "took", time.Since(begin).Round(time.Millisecond))
	return nil
}

// Restart stops the node and starts it again (see Stop and Start).
func (r *RabbitMQ) Restart(ctx context.Context) error {
	if err := r.Stop(ctx); err != nil {
		return err
	}
	return r.Start(ctx)
}

// Freeze stops the node's processes (SIGSTOP to its process group) without
// closing anything: its connections stay open and silent, as a broker that
// hangs or a network that drops everything. Thaw resumes it; Stop, Kill and
// Close thaw it first.
func (r *RabbitMQ) Freeze() error {
	p := r.current()
	if p == nil {
		return fmt.Errorf("testenv: %s is not running", r)
	}
	if err := p.signalGroup(syscall.SIGSTOP); err != nil {
		return err
	}
	r.log.Info("testenv: rabbitmq node frozen", "node", r.node)
	return nil
}

// Thaw resumes a frozen node (SIGCONT); on a node not frozen it does
// nothing.
func (r *RabbitMQ) Thaw() error {
	p := r.current()
	if p == nil {
		return nil
	}
	return p.signalGroup(syscall.SIGCONT)
}

// Kill crashes the node: SIGKILL to its process group (the Erlang VM and the
// rabbitmq-server script), without any shutdown. Start brings it back on
// the same data. Killing a stopped node does nothing.
func (r *RabbitMQ) Kill() error {
	p := r.current()
	if p == nil || p.exited() {
		return nil
	}
	if err := p.killGroup(); err != nil {
		return err
	}
	r.log.Info("testenv: rabbitmq node killed", "node", r.node)
	return nil
}

// Close stops the node (killing it if it does not stop within 30 s) and
// removes its directory. It is safe to call more than once.
func (r *RabbitMQ) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	r.mu.Unlock()
	defer unregister(r)
	ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
	defer cancel()
	var errs []error
	if err := r.Stop(ctx); err != nil {
		errs = append(errs, err)
	}
	if err := r.Kill(); err != nil {
		errs = append(errs, err)
	}
	r.httpc.CloseIdleConnections()
	if err := os.RemoveAll(r.dir); err != nil {
		errs = append(errs, fmt.Errorf("testenv: %w", err))
	}
	return errors.Join(errs...)
}

func (r *RabbitMQ) logPath() string    { return filepath.Join(r.dir, "log", r.node+".log") }
func (r *RabbitMQ) stdoutPath() string { return filepath.Join(r.dir, "log", "stdout.log") }

func (r *RabbitMQ) tail(n int) string { return tails(n, r.stdoutPath(), r.logPath()) }

// Logs returns the last lines of the node's log and of the output of its
// start script, for diagnostics.
func (r *RabbitMQ) Logs() string { return r.tail(failureLogLines) }

// Ctl runs rabbitmqctl against the node (about 0.4 s a call) and returns its
// combined output.
func (r *RabbitMQ) Ctl(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, filepath.Join(r.sbin, "rabbitmqctl"), append([]string{"-n", r.node}, args...)...)
	cmd.Env = r.env()
	cmd.Dir = r.dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("testenv: rabbitmqctl %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return string(out), nil
}
