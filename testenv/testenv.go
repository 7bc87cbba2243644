package testenv

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Timeouts used by the test helpers (Rabbit, RunRabbitMQ, RunProsody) and by
// Close, which have no caller context.
const (
	startTimeout = 2 * time.Minute
	closeTimeout = 30 * time.Second
	// failureLogLines is how many lines of server log a failed test shows.
	failureLogLines = 60
)

// server is what the process-wide registry knows about a running server.
type server interface {
	Kill() error
	Close() error
	String() string
}

// registry is the only package state: the shared RabbitMQ node and the set of
// servers that are alive, so that Main and the signal handler can stop them.
//
// Lock order: sharedMu before liveMu (liveMu is never held while calling out).
var registry struct {
	sharedMu  sync.Mutex
	rabbit    *RabbitMQ
	rabbitErr error

	liveMu sync.Mutex
	live   map[server]struct{}

	sweepOnce sync.Once
}

func register(s server) {
	registry.liveMu.Lock()
	defer registry.liveMu.Unlock()
	if registry.live == nil {
		registry.live = make(map[server]struct{})
	}
	registry.live[s] = struct{}{}
}

func unregister(s server) {
	registry.liveMu.Lock()
	defer registry.liveMu.Unlock()
	delete(registry.live, s)
}

func liveServers() []server {
	registry.liveMu.Lock()
	defer registry.liveMu.Unlock()
	out := make([]server, 0, len(registry.live))
	for s := range registry.live {
		out = append(out, s)
	}
	return out
}

// Main runs the tests of a package and then stops the servers that are still
// running: the shared RabbitMQ node of [Rabbit] and any server a test forgot
// to close. It also stops them (by SIGKILL, then removing their directories)
// if the test binary gets SIGINT or SIGTERM. Use it from TestMain:
//
//	func TestMain(m *testing.M) { testenv.Main(m) }
//
// Server processes also get SIGTERM from the kernel when the test binary dies
// in any other way (for example a -timeout panic, on Linux); their temporary
// directories (os.TempDir()/nanite-testenv-*) are then removed by the next
// test process that starts a server.
func Main(m *testing.M) {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	done := make(chan struct{})
	go func() {
		select {
		case sig := <-sigs:
			fmt.Fprintf(os.Stderr, "testenv: got %v, killing test servers\n", sig)
			for _, s := range liveServers() {
				_ = s.Kill()
				_ = s.Close()
			}
			os.Exit(2)
		case <-done:
		}
	}()

	code := m.Run()

	signal.Stop(sigs)
	close(done)
	if err := closeShared(); err != nil {
		fmt.Fprintln(os.Stderr, err)
	}
	for _, s := range liveServers() {
		fmt.Fprintf(os.Stderr, "testenv: %v was not closed by its test; closing it\n", s)
		if err := s.Close(); err != nil {
			fmt.Fprintln(os.Stderr, err)
		}
	}
	os.Exit(code)
}

func closeShared() error {
	registry.sharedMu.Lock()
	defer registry.sharedMu.Unlock()
	r := registry.rabbit
	registry.rabbit, registry.rabbitErr = nil, nil
	if r == nil {
		return nil
	}
	return r.Close()
}

// Rabbit returns the RabbitMQ node shared by all tests of the package, with
// the management plugin on. The first call starts it (about 5 s); [Main]
// stops it. Tests that change the node's state in ways others could see
// (stopping it, killing it, changing the default vhost) must use
// [RunRabbitMQ] instead; to isolate tests from each other on the shared
// node, give each its own vhost with [RabbitMQ.NewVhost].
//
// Rabbit skips the test when RabbitMQ is not installed (fails it under CI,
// see [Require]) and fails it when the node cannot start. If the test fails,
// the tail of the node's log is added to the test output.
func Rabbit(t testing.TB) *RabbitMQ {
	t.Helper()
	Require(t, "rabbitmq-server", "rabbitmqctl")
	r, err := sharedRabbit()
	if err != nil {
		t.Fatalf("testenv: shared RabbitMQ node: %v", err)
	}
	logOnFailure(t, r)
	return r
}

func sharedRabbit() (*RabbitMQ, error) {
	registry.sharedMu.Lock()
	defer registry.sharedMu.Unlock()
	if registry.rabbit != nil || registry.rabbitErr != nil {
		return registry.rabbit, registry.rabbitErr
	}
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	registry.rabbit, registry.rabbitErr = StartRabbitMQ(ctx, RabbitOptions{Name: "shared", Management: true})
	return registry.rabbit, registry.rabbitErr
}

// RunRabbitMQ starts a private RabbitMQ node for one test and closes it when
// the test ends. Use it for tests that stop, restart or kill the node, or
// need more than one node; otherwise the shared [Rabbit] is cheaper. Like
// Rabbit it calls [Require] and shows the node's log if the test fails.
func RunRabbitMQ(t testing.TB, opts RabbitOptions) *RabbitMQ {
	t.Helper()
	Require(t, "rabbitmq-server", "rabbitmqctl")
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	r, err := StartRabbitMQ(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Error(err)
		}
	})
	logOnFailure(t, r) // registered after Close, so it runs before it
	return r
}

// RunProsody starts a private prosody server for one test and closes it when
// the test ends. It calls [Require] and shows the server's log if the test
// fails. (It is not called Prosody because that is the type's name.)
func RunProsody(t testing.TB, opts ProsodyOptions) *Prosody {
	t.Helper()
	Require(t, "prosody", "prosodyctl")
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	p, err := StartProsody(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Error(err)
		}
	})
	logOnFailure(t, p)
	return p
}

// RunFederatedProsody starts private prosody servers that federate over
// s2s, one per options (see [StartFederatedProsody]), for one test, and
// closes them when the test ends. It calls [Require] and shows the servers'
// logs if the test fails.
//
//	ps := testenv.RunFederatedProsody(t,
//		testenv.ProsodyOptions{VirtualHosts: []string{"site-a.test"}, Components: map[string]string{"nanite.site-a.test": "s3cret"}},
//		testenv.ProsodyOptions{VirtualHosts: []string{"site-b.test"}, Components: map[string]string{"nanite.site-b.test": "s3cret"}})
//	a, b := ps[0], ps[1] // on 127.0.0.2 and 127.0.0.3
func RunFederatedProsody(t testing.TB, opts ...ProsodyOptions) []*Prosody {
	t.Helper()
	Require(t, "prosody", "prosodyctl")
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	ps, err := StartFederatedProsody(ctx, opts...)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range ps {
		t.Cleanup(func() {
			if err := p.Close(); err != nil {
				t.Error(err)
			}
		})
		logOnFailure(t, p)
	}
	return ps
}

type logger interface {
	Logs() string
	String() string
}

func logOnFailure(t testing.TB, s logger) {
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("testenv: last lines of the logs of %v:\n%s", s, s.Logs())
		}
	})
}

// Require skips t unless every named program is installed. When the
// environment variable CI is "true" or "1" it fails t instead, because a CI
// run that silently skips its integration tests proves nothing.
//
// The names "rabbitmq-server" and "rabbitmqctl" are looked up where this
// package runs them from (/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin);
// other names are looked up in PATH.
func Require(t testing.TB, programs ...string) {
	t.Helper()
	missing := Missing(programs...)
	if len(missing) == 0 {
		return
	}
	msg := fmt.Sprintf("testenv: %s not installed; install with `apt-get install -y rabbitmq-server prosody` (or run `make test`)",
		strings.Join(missing, ", "))
	if isCI() {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// Missing returns those of the named programs that are not installed (see
// [Require] for how they are looked up).
func Missing(programs ...string) []string {
	var missing []string
	for _, p := range programs {
		if _, err := lookProgram(p); err != nil {
			missing = append(missing, p)
		}
	}
	return missing
}

func isCI() bool {
	v := strings.ToLower(strings.TrimSpace(os.Getenv("CI")))
	return v == "true" || v == "1"
}

func lookProgram(name string) (string, error) {
	switch name {
	case "rabbitmq-server", "rabbitmqctl":
		sbin, err := rabbitSbin()
		if err != nil {
			return "", err
		}
		path := filepath.Join(sbin, name)
		if _, err := os.Stat(path); err != nil {
			return "", fmt.Errorf("testenv: %w", err)
		}
		return path, nil
	}
	path, err := exec.LookPath(name)
	if err != nil {
		return "", fmt.Errorf("testenv: %w", err)
	}
	return path, nil
}

// rabbitSbin finds the sbin directory of the installed RabbitMQ release
// (the newest when there are several).
func rabbitSbin() (string, error) {
	dirs, err := filepath.Glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin")
	if err != nil {
		return "", fmt.Errorf("testenv: %w", err)
	}
	if len(dirs) == 0 {
		return "", errors.New("testenv: no /usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin (is rabbitmq-server installed?)")
	}
	return dirs[len(dirs)-1], nil
}

// freePorts returns n distinct TCP ports that were free on 127.0.0.1 a
// moment ago. All listeners are held open until all ports are picked so the
// ports differ from each other.
func freePorts(n int) ([]int, error) { return freePortsOn("127.0.0.1", n) }

// freePortsOn is freePorts on another local address.
func freePortsOn(host string, n int) ([]int, error) {
	ports := make([]int, 0, n)
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			_ = l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
		if err != nil {
			return nil, fmt.Errorf("testenv: picking a free port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func randomHex(nbytes int) string {
	b := make([]byte, nbytes)
	_, _ = rand.Read(b) // never fails (crypto/rand documents it)
	return hex.EncodeToString(b)
}

// sanitize keeps letters, digits and the given extra characters of s,
// replaces everything else by '-', and cuts the result to max bytes.
func sanitize(s, extra string, max int) string {
	var b strings.Builder
	for _, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', strings.ContainsRune(extra, r):
			b.WriteRune(r)
		default:
			b.WriteByte('-')
		}
		if b.Len() >= max {
			break
		}
	}
	return strings.Trim(b.String(), "-")
}

// envWithout returns os.Environ() without the variables whose names have one
// of the given prefixes (or equal one of them).
func envWithout(prefixes ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		drop := false
		for _, p := range prefixes {
			if strings.HasPrefix(name, p) {
				drop = true
				break
			}
		}
		if !drop {
			env = append(env, kv)
		}
	}
	return env
}

// tailFile returns the last n lines of a file, or a note saying why it can't.
func tailFile(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Sprintf("(%v)\n", err)
	}
	defer f.Close()
	const maxRead = 256 << 10
	st, err := f.Stat()
	if err != nil {
		return fmt.Sprintf("(%v)\n", err)
	}
	off := max(st.Size()-maxRead, 0)
	if _, err := f.Seek(off, io.SeekStart); err != nil {
		return fmt.Sprintf("(%v)\n", err)
	}
	data, err := io.ReadAll(f)
	if err != nil {
		return fmt.Sprintf("(%v)\n", err)
	}
	lines := strings.SplitAfter(string(data), "\n")
	if len(lines) > 0 && lines[len(lines)-1] == "" {
		lines = lines[:len(lines)-1]
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	s := strings.Join(lines, "")
	if s != "" && !strings.HasSuffix(s, "\n") {
		s += "\n"
	}
	return s
}

// tails formats the tails of several log files like tail(1) does.
func tails(n int, paths ...string) string {
	var b strings.Builder
	for _, p := range paths {
		if st, err := os.Stat(p); err != nil || st.Size() == 0 {
			continue
		}
		fmt.Fprintf(&b, "==> %s <==\n%s", p, tailFile(p, n))
	}
	if b.Len() == 0 {
		return "(no logs)\n"
	}
	return b.String()
}

// dialOK reports whether something accepts TCP connections at addr.
func dialOK(ctx context.Context, addr string) bool {
	d := net.Dialer{Timeout: time.Second}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return false
	}
	_ = c.Close()
	return true
}

func hostPort(port int) string {
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
}

func discardIfNil(l *slog.Logger) *slog.Logger {
	if l == nil {
		return slog.New(slog.DiscardHandler)
	}
	return l
}

// pollInterval is how often readiness is checked while a server starts.
const pollInterval = 50 * time.Millisecond

// sleepCtx waits d or until ctx is done.
func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// ownerFile, in a server's directory, holds the pid of the test process that
// owns it, so that a later process can remove the directory once both the
// owner and the server are gone (see sweepStale).
const ownerFile = "owner.pid"

// makeServerDir creates a server's temporary directory, marked with the
// owner's pid. Once per process it first removes the directories of dead
// owners.
func makeServerDir(kind string) (string, error) {
	registry.sweepOnce.Do(sweepStale)
	dir, err := os.MkdirTemp("", "nanite-testenv-"+kind+"-*")
	if err != nil {
		return "", fmt.Errorf("testenv: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, ownerFile), []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
		_ = os.RemoveAll(dir)
		return "", fmt.Errorf("testenv: %w", err)
	}
	return dir, nil
}

// sweepStale removes the directories that test processes which died without
// cleaning up (for example on a -timeout panic) left in os.TempDir, when
// neither their owner nor their server process is alive any more.
func sweepStale() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), "nanite-testenv-*"))
	for _, d := range dirs {
		owner, ok := readPid(filepath.Join(d, ownerFile))
		if !ok || alive(owner) {
			continue
		}
		busy := false
		for _, f := range []string{"server.pid", "rabbitmq.pid"} {
			if pid, ok := readPid(filepath.Join(d, f)); ok && alive(pid) {
				busy = true
			}
		}
		if !busy {
			_ = os.RemoveAll(d)
		}
	}
}

func readPid(path string) (int, bool) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	return pid, err == nil && pid > 0
}

func alive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}
