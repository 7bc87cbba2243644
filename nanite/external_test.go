//go:build unix

package nanite

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// script writes an executable shell script into dir and returns its path.
func script(t *testing.T, dir, name, body string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

type sentIntermediate struct {
	Key  string
	Data string
}

// callExternal builds the actors of cfg and calls service's handler
// directly, collecting intermediate results.
func callExternal(t *testing.T, ctx context.Context, cfg ExternalConfig, service string, payload string) (string, error, []sentIntermediate) {
	t.Helper()
	actors, err := ExternalActors(cfg)
	if err != nil {
		t.Fatalf("ExternalActors: %v", err)
	}
	actorName, method, _ := strings.Cut(strings.TrimPrefix(service, "/"), "/")
	var m *Method
	for _, a := range actors {
		if a.Name() == actorName {
			m = a.methods[method]
		}
	}
	if m == nil {
		t.Fatalf("no handler for %s", service)
	}
	var mu sync.Mutex
	var got []sentIntermediate
	req := &Request{Service: service, Payload: json.RawMessage(payload), From: "tester", Token: "tok-1"}
	req.intermediate = func(_ context.Context, key string, v any) error {
		b, err := json.Marshal(v)
		if err != nil {
			return err
		}
		mu.Lock()
		got = append(got, sentIntermediate{key, string(b)})
		mu.Unlock()
		return nil
	}
	res, herr := m.Handler(ctx, req)
	var out string
	if herr == nil {
		b, err := json.Marshal(res)
		if err != nil {
			t.Fatalf("result not JSON-encodable: %v", err)
		}
		out = string(b)
	}
	mu.Lock()
	defer mu.Unlock()
	return out, herr, got
}

func TestExternalSuccess(t *testing.T) {
	dir := t.TempDir()
	script(t, dir, "echo.sh", `
read -r payload
printf '{"payload":%s,"service":"%s","token":"%s","from":"%s","attempt":"%s","deadline":"%s","secret":"%s","extra":"%s","pwd":"%s"}\n' \
  "$payload" "$NANITE_SERVICE" "$NANITE_TOKEN" "$NANITE_FROM" "$NANITE_ATTEMPT" "$NANITE_DEADLINE" "$NANITE_URL" "$EXTRA" "$(pwd)"
`)
	work := filepath.Join(dir, "work")
	if err := os.Mkdir(work, 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := ExternalConfig{
		Dir:     dir,
		Environ: []string{"PATH=" + os.Getenv("PATH"), "NANITE_URL=amqp://secret"},
		Services: map[string]ExternalService{
			"/ext/echo": {Command: "./echo.sh", Env: map[string]string{"EXTRA": "x1"}, Dir: "work"},
		},
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	dl, _ := ctx.Deadline()
	out, err, inter := callExternal(t, ctx, cfg, "/ext/echo", `{"a":[1,2]}`)
	if err != nil {
		t.Fatal(err)
	}
	if len(inter) != 0 {
		t.Errorf("unexpected intermediate results %v", inter)
	}
	var got map[string]any
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("result %s: %v", out, err)
	}
	want := map[string]any{
		"payload": map[string]any{"a": []any{1.0, 2.0}}, "service": "/ext/echo", "token": "tok-1",
		"from": "tester", "attempt": "0", "secret": "", "extra": "x1", "pwd": work,
		"deadline": dl.UTC().Format("2006-01-02T15:04:05.000Z07:00"),
	}
	for k, v := range want {
		if g, _ := json.Marshal(got[k]); string(g) != mustJSON(t, v) {
			t.Errorf("%s = %s, want %s", k, g, mustJSON(t, v))
		}
	}
}

func mustJSON(t *testing.T, v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestExternalNoPayloadNoOutput(t *testing.T) {
	dir := t.TempDir()
	script(t, dir, "quiet.sh", `read -r p; [ "$p" = null ] || { echo "stdin was $p" >&2; exit 1; }`)
	cfg := ExternalConfig{Dir: dir, Services: map[string]ExternalService{"/ext": {Command: "./quiet.sh"}}}
	out, err, _ := callExternal(t, t.Context(), cfg, "/ext/index", "")
	if err != nil {
		t.Fatal(err)
	}
	if out != "null" {
		t.Errorf("result %s, want null", out)
	}
}

func TestExternalIntermediate(t *testing.T) {
	dir := t.TempDir()
	script(t, dir, "steps.sh", `
echo '{"intermediate":"progress","data":{"step":1}}'
echo '"plain line"'
echo '{"intermediate":"progress","data":{"step":2}}'
echo '{"key":"k","data":1}'
echo '{'
echo '  "done": true'
echo '}'
`)
	cfg := ExternalConfig{Dir: dir, Services: map[string]ExternalService{"/ext/steps": {Command: "./steps.sh", Idempotent: true}}}
	out, err, inter := callExternal(t, t.Context(), cfg, "/ext/steps", `1`)
	if err != nil {
		t.Fatal(err)
	}
	if out != `{"done":true}` {
		t.Errorf("final %s", out)
	}
	want := []sentIntermediate{
		{"progress", `{"step":1}`},
		{"progress", `{"step":2}`},
		{"stdout", `"plain line"`},
		{"stdout", `{"key":"k","data":1}`},
	}
	if mustJSON(t, inter) != mustJSON(t, want) {
		t.Errorf("intermediate results\n got %v\nwant %v", inter, want)
	}
	actors, _ := ExternalActors(cfg)
	if !actors[0].methods["steps"].Idempotent {
		t.Error("idempotent flag lost")
	}
}

func TestExternalNonZeroExit(t *testing.T) {
	dir := t.TempDir()
	script(t, dir, "fail.sh", `echo '{"partial":1}'; echo "  some noise" >&2; echo "boom: disk full  " >&2; exit 3`)
	script(t, dir, "silent.sh", `exit 4`)
	script(t, dir, "loud.sh", `i=0; while [ $i -lt 2000 ]; do echo "line $i of noise" >&2; i=$((i+1)); done; echo "the real reason" >&2; exit 1`)
	cfg := ExternalConfig{Dir: dir, Services: map[string]ExternalService{
		"/ext/fail":   {Command: "./fail.sh"},
		"/ext/silent": {Command: "./silent.sh"},
		"/ext/loud":   {Command: "./loud.sh"},
	}}
	_, err, _ := callExternal(t, t.Context(), cfg, "/ext/fail", "")
	if err == nil || err.Error() != "some noise\nboom: disk full" {
		t.Errorf("error %q, want the trimmed stderr", err)
	}
	_, err, _ = callExternal(t, t.Context(), cfg, "/ext/silent", "")
	if err == nil || !strings.Contains(err.Error(), "exit status 4") {
		t.Errorf("error %q, want exit status 4", err)
	}
	_, err, _ = callExternal(t, t.Context(), cfg, "/ext/loud", "")
	if err == nil || !strings.HasSuffix(err.Error(), "the real reason") || !strings.HasPrefix(err.Error(), "[...] ") ||
		len(err.Error()) > DefaultExternalStderr+10 {
		t.Errorf("error of %d bytes: %.80q...", len(err.Error()), err)
	}
}

func TestExternalInvalidOutput(t *testing.T) {
	dir := t.TempDir()
	script(t, dir, "text.sh", `echo '"ok"'; echo "Restarting the app..."; echo '{"done":true}'`)
	cfg := ExternalConfig{Dir: dir, Services: map[string]ExternalService{"/ext/text": {Command: "./text.sh"}}}
	_, err, _ := callExternal(t, t.Context(), cfg, "/ext/text", "")
	if err == nil || !strings.Contains(err.Error(), "not a sequence of JSON values") {
		t.Errorf("error %v", err)
	}
}

func TestExternalValueTooLarge(t *testing.T) {
	dir := t.TempDir()
	script(t, dir, "big.sh", `printf '"'; while :; do printf 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'; done`)
	cfg := ExternalConfig{Dir: dir, MaxValue: 64 << 10, KillGrace: 100 * time.Millisecond,
		Services: map[string]ExternalService{"/ext/big": {Command: "./big.sh"}}}
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	_, err, _ := callExternal(t, ctx, cfg, "/ext/big", "")
	if err == nil || !strings.Contains(err.Error(), "larger than 65536 bytes") || !strings.Contains(err.Error(), "killed") {
		t.Errorf("error %v", err)
	}
}

// dead reports whether pid is gone or a zombie.
func dead(pid int) bool {
	if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
		return true
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return os.IsNotExist(err)
	}
	// pid (comm) S ...: the state follows the last ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && i+2 < len(s) && (s[i+2] == 'Z' || s[i+2] == 'X')
}

func TestExternalDeadlineKill(t *testing.T) {
	dir := t.TempDir()
	pids := filepath.Join(dir, "pids")
	// The child ignores SIGTERM and leaves a grandchild in its group.
	script(t, dir, "stuck.sh", `
trap '' TERM
sleep 300 &
echo "$$ $!" > `+pids+`
echo '{"intermediate":"progress","data":"started"}'
while :; do sleep 1; done
`)
	cfg := ExternalConfig{Dir: dir, KillGrace: 300 * time.Millisecond,
		Services: map[string]ExternalService{"/ext/stuck": {Command: "./stuck.sh"}}}
	ctx, cancel := context.WithTimeout(t.Context(), 700*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err, inter := callExternal(t, ctx, cfg, "/ext/stuck", "")
	took := time.Since(start)
	if err == nil || !strings.Contains(err.Error(), "killed at the request deadline") {
		t.Fatalf("error %v", err)
	}
	if took > 700*time.Millisecond+300*time.Millisecond+time.Second {
		t.Errorf("took %v; the kill grace is 300ms", took)
	}
	if len(inter) != 1 || inter[0].Data != `"started"` {
		t.Errorf("intermediate results %v", inter)
	}
	b, rerr := os.ReadFile(pids)
	if rerr != nil {
		t.Fatal(rerr)
	}
	for _, f := range strings.Fields(string(b)) {
		pid, _ := strconv.Atoi(f)
		// SIGKILL is sent to the group before the call returns; on a busy
		// machine the kernel may take a moment to finish the processes.
		for end := time.Now().Add(5 * time.Second); !dead(pid) && time.Now().Before(end); {
			time.Sleep(10 * time.Millisecond)
		}
		if !dead(pid) {
			t.Errorf("process %d is still alive 5 s after the kill", pid)
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

func TestExternalServiceTimeout(t *testing.T) {
	dir := t.TempDir()
	script(t, dir, "slow.sh", `echo "working" >&2; exec sleep 30`)
	cfg := ExternalConfig{Dir: dir, KillGrace: 200 * time.Millisecond,
		Services: map[string]ExternalService{"/ext/slow": {Command: "./slow.sh", Timeout: 200 * time.Millisecond}}}
	_, err, _ := callExternal(t, t.Context(), cfg, "/ext/slow", "")
	var re *RemoteError
	if !errors.As(err, &re) || re.Code != CodeTimeout || !errors.Is(err, ErrTimeout) {
		t.Fatalf("error %v, want a RemoteError with code timeout", err)
	}
	if !strings.Contains(re.Message, "timeout of 200ms") || !strings.Contains(re.Message, "working") {
		t.Errorf("message %q", re.Message)
	}
}

func TestExternalCancel(t *testing.T) {
	dir := t.TempDir()
	script(t, dir, "wait.sh", `exec sleep 30`)
	cfg := ExternalConfig{Dir: dir, Services: map[string]ExternalService{"/ext/wait": {Command: "./wait.sh"}}}
	ctx, cancel := context.WithCancelCause(t.Context())
	time.AfterFunc(100*time.Millisecond, func() { cancel(ErrClosed) })
	_, err, _ := callExternal(t, ctx, cfg, "/ext/wait", "")
	if err == nil || !strings.Contains(err.Error(), "killed after") || !strings.Contains(err.Error(), "nanite: closed") {
		t.Errorf("error %v", err)
	}
}

func TestExternalConfigErrors(t *testing.T) {
	dir := t.TempDir()
	script(t, dir, "ok.sh", "echo 1")
	if err := os.WriteFile(filepath.Join(dir, "noexec.sh"), []byte("echo 1"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := ExternalConfig{Dir: dir, Services: map[string]ExternalService{
		"/ops/ok":       {Command: "./ok.sh"},
		"/ops/missing":  {Command: "./nope.sh"},
		"/ops/nopath":   {Command: "no-such-program-nanite"},
		"/ops/noexec":   {Command: "noexec.sh"},
		"ops/bad":       {Command: "./ok.sh"},
		"/nanite/x":     {Command: "./ok.sh"},
		"/ops/empty":    {},
		"/ops/baddir":   {Command: "./ok.sh", Dir: "nodir"},
		"/ops/negative": {Command: "./ok.sh", Timeout: -time.Second},
		"/dup":          {Command: "./ok.sh"},
		"/dup/index":    {Command: "./ok.sh"},
	}}
	_, err := ExternalActors(cfg)
	if err == nil {
		t.Fatal("no error")
	}
	for _, want := range []string{
		`"/ops/missing": command "./nope.sh"`,
		`"/ops/nopath": command "no-such-program-nanite"`,
		`"/ops/noexec": command "noexec.sh"`,
		`"ops/bad": not a service name`,
		`"/nanite/x": the actor name "nanite" is reserved`,
		`"/ops/empty": no command`,
		`"/ops/baddir": working directory`,
		`"/ops/negative": negative timeout`,
		`"/dup/index": same service as "/dup"`,
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not mention %s:\n%v", want, err)
		}
	}
	if strings.Contains(err.Error(), `"/ops/ok"`) {
		t.Errorf("error mentions the good entry:\n%v", err)
	}
	if _, err := ExternalActors(ExternalConfig{}); err == nil {
		t.Error("empty config accepted")
	}
}

func TestExternalParseConfig(t *testing.T) {
	c, err := ParseExternalConfig([]byte(`{"kill_grace":"1.5s","services":{"/a/b":{"command":"x","args":["-v"],"timeout":90,"idempotent":true}}}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.KillGrace != 1500*time.Millisecond || c.Services["/a/b"].Timeout != 90*time.Second ||
		!c.Services["/a/b"].Idempotent || c.Services["/a/b"].Args[0] != "-v" {
		t.Errorf("parsed %+v", c)
	}
	for _, bad := range []string{
		`{"services":{"/a/b":{"comand":"x"}}}`,
		`{"servces":{}}`,
		`{"services":{"/a/b":{"command":"x","timeout":"soon"}}}`,
		`{"services":{}} {}`,
	} {
		if _, err := ParseExternalConfig([]byte(bad)); err == nil {
			t.Errorf("accepted %s", bad)
		}
	}
}

func TestExternalGroupsActors(t *testing.T) {
	dir := t.TempDir()
	script(t, dir, "ok.sh", "echo 1")
	actors, err := ExternalActors(ExternalConfig{Dir: dir, Services: map[string]ExternalService{
		"/ops/a": {Command: "./ok.sh"}, "/ops/b": {Command: "./ok.sh"}, "/db": {Command: "./ok.sh"},
	}})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, a := range actors {
		got = append(got, a.Services()...)
	}
	if strings.Join(got, " ") != "/db/index /ops/a /ops/b" {
		t.Errorf("services %v", got)
	}
}
