//go:build unix

package nanite

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Defaults of external actors.
const (
	DefaultKillGrace      = 2 * time.Second
	DefaultExternalStderr = 4 << 10
)

// ExternalConfig configures external actors: services served by running an
// executable once per request. See [ExternalActors] for the contract
// between the agent and the executable. In a file (JSON, or YAML converted
// to JSON by the caller) it reads:
//
//	{
//	  "kill_grace": "2s",
//	  "services": {
//	    "/ops/restart": {
//	      "command": "/usr/local/bin/restart-app",
//	      "args": ["--graceful"],
//	      "env": {"APP": "shop"},
//	      "dir": "/srv/shop",
//	      "timeout": "60s",
//	      "idempotent": false,
//	      "description": "restart the application"
//	    }
//	  }
//	}
type ExternalConfig struct {
	// Services maps a service name ("/ops/restart"; "/ops" alone means
	// "/ops/index") to the executable that serves it. Services of one
	// actor name become one Actor.
	Services map[string]ExternalService `json:"services"`
	// KillGrace is how long a child process group has to exit between
	// SIGTERM and SIGKILL when its request ends before it does (default 2 s).
	KillGrace time.Duration `json:"kill_grace"`

	// Dir resolves relative command paths and working directories, usually
	// the directory of the config file (default: the current directory).
	Dir string `json:"-"`
	// MaxValue bounds the size of one JSON value on a child's stdout
	// (default DefaultMaxPayload). A child that writes a larger one is
	// killed.
	MaxValue int `json:"-"`
	// MaxStderr is how many trailing bytes of a child's stderr are kept for
	// the error message (default 4 KiB).
	MaxStderr int `json:"-"`
	// Environ is the environment children inherit (default os.Environ()).
	// Variables starting with NANITE_ are removed from it, so that the
	// agent's own settings (NANITE_URL holds the broker password) do not
	// leak into children.
	Environ []string `json:"-"`
	// Logger receives a line per finished child (default: discard).
	Logger *slog.Logger `json:"-"`
}

// ExternalService is one service of an external actor.
type ExternalService struct {
	// Command is the executable: a path (relative ones are resolved against
	// ExternalConfig.Dir) or a name looked up in $PATH.
	Command string `json:"command"`
	// Args are passed to the command as they are (no shell).
	Args []string `json:"args,omitempty"`
	// Env adds variables to the child's environment.
	Env map[string]string `json:"env,omitempty"`
	// Dir is the child's working directory (relative ones are resolved
	// against ExternalConfig.Dir; default: ExternalConfig.Dir).
	Dir string `json:"dir,omitempty"`
	// Timeout bounds one run in addition to the request's deadline (0: only
	// the request's deadline). A run killed by it fails with code timeout.
	Timeout time.Duration `json:"timeout,omitempty"`
	// Idempotent marks the service safe to retry on another agent.
	Idempotent bool `json:"idempotent,omitempty"`
	// Description is shown by introspection.
	Description string `json:"description,omitempty"`
}

// ParseExternalConfig decodes an ExternalConfig from JSON. Unknown fields
// are errors (a misspelt "comand" must not pass silently); durations are
// strings such as "90s" or numbers of seconds.
func ParseExternalConfig(data []byte) (ExternalConfig, error) {
	var c ExternalConfig
	if err := strictUnmarshal(data, &c); err != nil {
		return ExternalConfig{}, fmt.Errorf("nanite: external actors config: %w", err)
	}
	return c, nil
}

// UnmarshalJSON decodes the config strictly, with durations as strings.
func (c *ExternalConfig) UnmarshalJSON(b []byte) error {
	type plain ExternalConfig
	aux := struct {
		*plain
		KillGrace jsonDuration `json:"kill_grace"`
	}{plain: (*plain)(c), KillGrace: jsonDuration(c.KillGrace)}
	if err := strictUnmarshal(b, &aux); err != nil {
		return err
	}
	c.KillGrace = time.Duration(aux.KillGrace)
	return nil
}

// UnmarshalJSON decodes the service strictly, with durations as strings.
func (s *ExternalService) UnmarshalJSON(b []byte) error {
	type plain ExternalService
	aux := struct {
		*plain
		Timeout jsonDuration `json:"timeout"`
	}{plain: (*plain)(s), Timeout: jsonDuration(s.Timeout)}
	if err := strictUnmarshal(b, &aux); err != nil {
		return err
	}
	s.Timeout = time.Duration(aux.Timeout)
	return nil
}

func strictUnmarshal(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return errors.New("trailing data after the JSON value")
	}
	return nil
}

// jsonDuration is a duration written as "1m30s" or as a number of seconds.
type jsonDuration time.Duration

func (d *jsonDuration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		v, err := time.ParseDuration(s)
		if err != nil {
			return err
		}
		*d = jsonDuration(v)
		return nil
	}
	var secs float64
	if err := json.Unmarshal(b, &secs); err != nil {
		return fmt.Errorf("duration must be a string such as \"30s\" or a number of seconds, not %s", b)
	}
	*d = jsonDuration(secs * float64(time.Second))
	return nil
}

// ExternalActors returns the actors of an external-actors config, one per
// actor name, ready for Agent.AddActor. It checks the whole config first and
// returns every problem at once, each naming its service: bad service names,
// the reserved actor "nanite", missing or non-executable commands, missing
// working directories, negative timeouts.
//
// # The contract with the executable
//
// For each request the agent starts the command (no shell) in its own
// process group, with:
//
//   - stdin: the request payload as JSON followed by a newline ("null" when
//     the request has none), then end of file;
//   - environment: the agent's own (minus NANITE_* variables), the
//     service's env, and NANITE_SERVICE (the service, "/ops/restart"),
//     NANITE_TOKEN (the request token, stable across retries),
//     NANITE_FROM (the requester's identity), NANITE_AGENT (this agent's
//     identity), NANITE_ATTEMPT (0, or n for the nth retry) and
//     NANITE_DEADLINE (RFC 3339 UTC time at which the child is killed,
//     empty when there is none).
//
// Its stdout must be a sequence of JSON values (one per line is usual;
// values may span lines). Write logs to stderr.
//
//   - A value of the exact form {"intermediate": KEY, "data": VALUE} (a
//     string KEY, nothing else in the object) is sent to the requester at
//     once as an intermediate result with that key.
//   - Of the other values, the last one is the final result. The ones
//     before it are sent as intermediate results with the key "stdout" as
//     soon as the next value shows they are not the last.
//   - No value at all gives the result null.
//
// The request fails (the requester gets a *RemoteError) when:
//
//   - the child exits with a non-zero status: the message is its stderr,
//     trimmed, the last 4 KiB at most (or "exit status N" when stderr is
//     empty);
//   - stdout is not a sequence of JSON values, or one value is larger than
//     MaxValue (the child is then killed);
//   - the request's deadline passes or the service's timeout elapses (code
//     timeout), or the agent shuts down: the child's process group gets
//     SIGTERM, and SIGKILL after KillGrace; the message names the deadline.
//
// A child that exits on its own leaves anything it started in the
// background alone. The handler returns only after the child has been
// reaped and, when it was killed, after its process group is gone (or has
// been sent SIGKILL).
func ExternalActors(cfg ExternalConfig) ([]*Actor, error) {
	if len(cfg.Services) == 0 {
		return nil, errors.New("nanite: external actors: no services configured")
	}
	if cfg.KillGrace < 0 {
		return nil, fmt.Errorf("nanite: external actors: negative kill_grace %v", cfg.KillGrace)
	}
	if cfg.KillGrace == 0 {
		cfg.KillGrace = DefaultKillGrace
	}
	if cfg.MaxValue <= 0 {
		cfg.MaxValue = DefaultMaxPayload
	}
	if cfg.MaxStderr <= 0 {
		cfg.MaxStderr = DefaultExternalStderr
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Environ == nil {
		cfg.Environ = os.Environ()
	}
	base := make([]string, 0, len(cfg.Environ))
	for _, kv := range cfg.Environ {
		if !strings.HasPrefix(kv, "NANITE_") {
			base = append(base, kv)
		}
	}
	if cfg.Dir == "" {
		wd, err := os.Getwd()
		if err != nil {
			return nil, fmt.Errorf("nanite: external actors: %w", err)
		}
		cfg.Dir = wd
	}

	names := make([]string, 0, len(cfg.Services))
	for name := range cfg.Services {
		names = append(names, name)
	}
	sort.Strings(names)

	var errs []error
	seen := map[string]string{}
	actors := map[string]*Actor{}
	var order []string
	for _, name := range names {
		x, err := newExternal(name, cfg.Services[name], &cfg, base)
		if err != nil {
			errs = append(errs, fmt.Errorf("nanite: external service %q: %w", name, err))
			continue
		}
		if prev, dup := seen[x.service]; dup {
			errs = append(errs, fmt.Errorf("nanite: external service %q: same service as %q", name, prev))
			continue
		}
		seen[x.service] = name
		actorName, method, _ := strings.Cut(x.service[1:], "/")
		a := actors[actorName]
		if a == nil {
			a = NewActor(actorName)
			actors[actorName] = a
			order = append(order, actorName)
		}
		opts := []MethodOption{Describe(x.spec.Description)}
		if x.spec.Idempotent {
			opts = append(opts, Idempotent())
		}
		a.Expose(method, x.serve, opts...)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	out := make([]*Actor, 0, len(order))
	for _, n := range order {
		out = append(out, actors[n])
	}
	return out, nil
}

// external is one checked, ready-to-run external service.
type external struct {
	service string
	spec    ExternalService
	path    string // resolved executable
	dir     string // resolved working directory
	env     []string
	grace   time.Duration
	maxVal  int
	maxErr  int
	log     *slog.Logger
}

func newExternal(name string, spec ExternalService, cfg *ExternalConfig, base []string) (*external, error) {
	svc, err := NormalizeService(name)
	if err != nil {
		return nil, errors.New("not a service name of the form /actor/method")
	}
	if actor, _, _ := strings.Cut(svc[1:], "/"); actor == BuiltinActor {
		return nil, fmt.Errorf("the actor name %q is reserved for the built-in introspection actor", BuiltinActor)
	}
	if spec.Command == "" {
		return nil, errors.New("no command")
	}
	if spec.Timeout < 0 {
		return nil, fmt.Errorf("negative timeout %v", spec.Timeout)
	}
	path, err := resolveCommand(spec.Command, cfg.Dir)
	if err != nil {
		return nil, err
	}
	dir := cfg.Dir
	if spec.Dir != "" {
		dir = spec.Dir
		if !filepath.IsAbs(dir) {
			dir = filepath.Join(cfg.Dir, dir)
		}
		st, err := os.Stat(dir)
		if err != nil {
			return nil, fmt.Errorf("working directory: %w", err)
		}
		if !st.IsDir() {
			return nil, fmt.Errorf("working directory %s is not a directory", dir)
		}
	}
	env := slices.Clone(base)
	keys := make([]string, 0, len(spec.Env))
	for k := range spec.Env {
		if k == "" || strings.ContainsAny(k, "=\x00") {
			return nil, fmt.Errorf("invalid environment variable name %q", k)
		}
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		env = append(env, k+"="+spec.Env[k])
	}
	return &external{service: svc, spec: spec, path: path, dir: dir, env: env,
		grace: cfg.KillGrace, maxVal: cfg.MaxValue, maxErr: cfg.MaxStderr,
		log: cfg.Logger.With("service", svc)}, nil
}

// resolveCommand finds the executable: a path when it contains a slash
// (relative to dir), else a name in $PATH.
func resolveCommand(command, dir string) (string, error) {
	if !strings.Contains(command, "/") {
		p, err := exec.LookPath(command)
		if err != nil {
			return "", fmt.Errorf("command %q: %w", command, err)
		}
		return p, nil
	}
	p := command
	if !filepath.IsAbs(p) {
		p = filepath.Join(dir, p)
	}
	st, err := os.Stat(p)
	switch {
	case err != nil:
		return "", fmt.Errorf("command %q: %w", command, err)
	case st.IsDir():
		return "", fmt.Errorf("command %q: %s is a directory", command, p)
	case st.Mode().Perm()&0o111 == 0:
		return "", fmt.Errorf("command %q: %s is not executable", command, p)
	}
	return p, nil
}

// Causes of an early end of a child, beyond the request's own context.
var (
	errServiceTimeout = errors.New("service timeout")
	errValueTooLarge  = errors.New("stdout value too large")
)

// serve runs the child for one request.
func (x *external) serve(ctx context.Context, req *Request) (any, error) {
	start := time.Now()
	if x.spec.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeoutCause(ctx, x.spec.Timeout, errServiceTimeout)
		defer cancel()
	}
	ctx, abort := context.WithCancelCause(ctx)
	defer abort(nil)

	payload := []byte(req.Payload)
	if len(bytes.TrimSpace(payload)) == 0 {
		payload = []byte("null")
	}
	deadline := ""
	if dl, ok := ctx.Deadline(); ok {
		deadline = dl.UTC().Format("2006-01-02T15:04:05.000Z07:00")
	}
	agentID := ""
	if req.Agent != nil {
		agentID = req.Agent.Identity()
	}

	cmd := exec.Command(x.path, x.spec.Args...)
	cmd.Dir = x.dir
	cmd.Env = append(slices.Clone(x.env),
		"NANITE_SERVICE="+req.Service,
		"NANITE_TOKEN="+req.Token,
		"NANITE_FROM="+req.From,
		"NANITE_AGENT="+agentID,
		"NANITE_ATTEMPT="+strconv.Itoa(req.Attempt),
		"NANITE_DEADLINE="+deadline,
	)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Stdin = bytes.NewReader(append(payload, '\n'))
	stderr := &tailBuffer{max: x.maxErr}
	cmd.Stderr = stderr
	// Bounds the wait for stderr (and stdin) after the child exits, when
	// something it left behind still holds them.
	cmd.WaitDelay = x.grace
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", x.service, err)
	}
	cmd.Stdout = pw
	if err := cmd.Start(); err != nil {
		pr.Close()
		pw.Close()
		return nil, fmt.Errorf("%s: start %s: %w", x.service, x.path, err)
	}
	pw.Close()
	pgid := cmd.Process.Pid

	// Read stdout.
	out := &stdoutReader{x: x, req: req, ctx: ctx, abort: abort}
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		out.read(pr)
	}()

	// Kill the process group when the request ends first.
	exited := make(chan struct{})
	killDone := make(chan struct{})
	var killed bool // written by the killer before killDone closes
	go func() {
		defer close(killDone)
		select {
		case <-exited:
			return
		case <-ctx.Done():
		}
		select {
		case <-exited: // it finished on its own just now: leave it be
			return
		default:
		}
		killed = true
		killGroup(pgid, x.grace, exited)
	}()

	werr := cmd.Wait()
	close(exited)
	<-killDone
	// stdout reaches EOF when every holder of the pipe is gone; something
	// the child left running may still hold it.
	select {
	case <-readDone:
	case <-time.After(x.grace):
		pr.Close()
		<-readDone
	}
	pr.Close()

	elapsed := time.Since(start).Round(time.Millisecond)
	errText := stderr.text()
	if killed {
		cause := context.Cause(ctx)
		x.log.Warn("external command killed", "token", req.Token, "elapsed", elapsed, "cause", cause)
		suffix := ""
		if errText != "" {
			suffix = "; stderr: " + errText
		}
		switch {
		case errors.Is(cause, errServiceTimeout):
			return nil, &RemoteError{Code: CodeTimeout,
				Message: fmt.Sprintf("%s: killed after its timeout of %v%s", x.service, x.spec.Timeout, suffix)}
		case errors.Is(cause, errValueTooLarge):
			return nil, fmt.Errorf("%s: killed: %w", x.service, out.err)
		case errors.Is(cause, context.DeadlineExceeded):
			return nil, fmt.Errorf("%s: killed at the request deadline %s (after %v)%s", x.service, deadline, elapsed, suffix)
		default:
			return nil, fmt.Errorf("%s: killed after %v: %v%s", x.service, elapsed, cause, suffix)
		}
	}
	if werr != nil {
		var ee *exec.ExitError
		if !errors.As(werr, &ee) {
			if errors.Is(werr, exec.ErrWaitDelay) && out.err == nil {
				// Exited fine, but left something holding stderr.
				werr = nil
			} else {
				return nil, fmt.Errorf("%s: %w", x.service, werr)
			}
		} else {
			x.log.Info("external command failed", "token", req.Token, "elapsed", elapsed, "status", ee.ProcessState.String())
			if errText == "" {
				errText = fmt.Sprintf("%s: %s", filepath.Base(x.path), ee.ProcessState.String())
			}
			return nil, errors.New(errText)
		}
	}
	if out.err != nil {
		return nil, fmt.Errorf("%s: %w", x.service, out.err)
	}
	x.log.Debug("external command done", "token", req.Token, "elapsed", elapsed, "stderr", errText)
	if out.final == nil {
		return nil, nil
	}
	return out.final, nil
}

// killGroup sends SIGTERM to the process group, waits up to grace for the
// leader and then the rest of the group to exit, and sends SIGKILL to
// whatever is left.
func killGroup(pgid int, grace time.Duration, leaderDone <-chan struct{}) {
	_ = syscall.Kill(-pgid, syscall.SIGTERM)
	deadline := time.Now().Add(grace)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-leaderDone:
	case <-t.C:
	}
	for time.Now().Before(deadline) {
		if err := syscall.Kill(-pgid, 0); errors.Is(err, syscall.ESRCH) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
}

// stdoutReader turns a child's stdout into intermediate results and the
// final result.
type stdoutReader struct {
	x     *external
	req   *Request
	ctx   context.Context
	abort context.CancelCauseFunc

	final json.RawMessage // the last plain value so far
	n     int             // values read
	err   error           // first problem with the output
}

func (s *stdoutReader) read(r io.Reader) {
	cr := &countingReader{r: r, limit: int64(s.x.maxVal)}
	dec := json.NewDecoder(cr)
	for {
		var v json.RawMessage
		err := dec.Decode(&v)
		if err == io.EOF {
			return
		}
		if err != nil {
			switch {
			case errors.Is(err, errValueTooLarge):
				s.err = fmt.Errorf("a JSON value on stdout is larger than %d bytes", s.x.maxVal)
				s.abort(errValueTooLarge)
			case errors.Is(err, os.ErrClosed):
				return
			default:
				s.err = fmt.Errorf("stdout is not a sequence of JSON values (after %d values): %v", s.n, err)
			}
			// Keep the pipe drained so that the child is not blocked.
			_, _ = io.Copy(io.Discard, r)
			return
		}
		s.n++
		cr.mark = dec.InputOffset()
		if key, data, ok := intermediateValue(v); ok {
			s.send(key, data)
			continue
		}
		if s.final != nil {
			s.send("stdout", s.final)
		}
		s.final = v
	}
}

func (s *stdoutReader) send(key string, data json.RawMessage) {
	if err := s.req.Intermediate(s.ctx, key, data); err != nil {
		s.x.log.Warn("could not send intermediate result", "token", s.req.Token, "err", err)
	}
}

// intermediateValue recognises {"intermediate": KEY, "data": VALUE}.
func intermediateValue(v json.RawMessage) (string, json.RawMessage, bool) {
	if len(v) == 0 || v[0] != '{' {
		return "", nil, false
	}
	var m map[string]json.RawMessage
	if json.Unmarshal(v, &m) != nil || len(m) != 2 {
		return "", nil, false
	}
	data, ok := m["data"]
	if !ok {
		return "", nil, false
	}
	var key string
	if json.Unmarshal(m["intermediate"], &key) != nil || key == "" {
		return "", nil, false
	}
	return key, data, true
}

// countingReader fails once more than limit bytes have been read past mark
// (the end of the last complete value), bounding the decoder's buffer.
type countingReader struct {
	r     io.Reader
	n     int64
	mark  int64
	limit int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	if c.n-c.mark > c.limit {
		return 0, errValueTooLarge
	}
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu        sync.Mutex
	max       int
	buf       []byte
	truncated bool
}

func (b *tailBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf = append(b.buf, p...)
	if len(b.buf) > 2*b.max {
		b.buf = append(b.buf[:0], b.buf[len(b.buf)-b.max:]...)
		b.truncated = true
	}
	return len(p), nil
}

// text is the kept tail, trimmed, valid UTF-8, marked when cut.
func (b *tailBuffer) text() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.buf
	cut := b.truncated
	if len(s) > b.max {
		s = s[len(s)-b.max:]
		cut = true
	}
	t := strings.TrimSpace(strings.ToValidUTF8(string(s), "\uFFFD"))
	if cut {
		if i := strings.IndexByte(t, '\n'); i >= 0 && i < len(t)-1 {
			t = t[i+1:]
		}
		t = "[...] " + t
	}
	return t
}
