package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"mellium.im/xmpp/jid"

	"github.com/nanite-go/nanite/nanite"
)

// registrationWait bounds how long request and push wait for an agent
// offering the service to register with their embedded mapper.
const registrationWait = 1500 * time.Millisecond

// RequestOptions are the flags and arguments of "nanite request" and
// "nanite push".
type RequestOptions struct {
	IO       IOStreams
	Settings func() (*Settings, error)

	Service    string // normalized, "/actor/method"
	Payload    string // the payload argument as given ("-": stdin)
	HasPayload bool
	Selector   string
	Target     string
	Tags       []string
	MatchAny   bool
	Timeout    time.Duration
	Persistent bool
	Failsafe   bool
	JSON       bool // request only: print the results as one JSON document
}

const payloadHelp = `The payload is a JSON value ('{"ms": 500}', '[1,2]', '42', '"text"'); an
argument that is not valid JSON is sent as a JSON string (hello -> "hello");
'-' reads it from stdin the same way. Without a payload none is sent.`

// NewCmdRequest returns "nanite request". runF replaces the run function in
// tests.
func NewCmdRequest(f *Factory, runF func(context.Context, *RequestOptions) error) *cobra.Command {
	opts := &RequestOptions{IO: f.IO, Settings: f.Settings}
	cmd := &cobra.Command{
		Use:   "request /actor/method [payload] [flags]",
		Short: "Send a request to the cluster and print the results",
		Long: `Send a request to the agents offering a service and print their results.

The request goes through a mapper embedded in this command: it learns the
cluster from the agents' registrations, picks the agent(s) with --selector
(least_loaded by default; all, random or rr), restricted to --target and
--tag, and waits until every chosen agent has answered or --timeout passes.

` + payloadHelp + `

In secure mode (--cert, --key and --ca with a client certificate, see
"nanite --help") the request is signed, and with --seal its payload and
results are sealed end to end; an agent whose policy denies the call
answers not_authorized (exit code 5).

Intermediate results are printed to stderr as they arrive, as
"[agent] key: value". Results go to stdout: the value alone for one agent,
"agent: value" per line for several; with --json one document
{"service", "token", "results": [{"agent", "result" | "error"}], "error"}.

` + exitCodesHelp,
		Example: `  nanite request /echo/say '"hello"'
  nanite request /echo/stream
  nanite request --selector all --json /nanite/info
  nanite request --tag eu --tag web --match-any-tag /echo/time
  nanite request --timeout 1s /echo/slow '{"ms": 3000}'; echo "exit $?"   # 4
  echo '{"ms": 200}' | nanite request /echo/slow -
  nanite request --cert ops.crt --key ops.key --ca ca.crt --seal /ops/restart`,
		Args: args(cobra.RangeArgs(1, 2)),
		RunE: func(cmd *cobra.Command, a []string) error {
			if err := opts.setArgs(a); err != nil {
				return err
			}
			if runF != nil {
				return runF(cmd.Context(), opts)
			}
			return requestRun(cmd.Context(), opts)
		},
	}
	addRequestFlags(cmd, opts)
	cmd.Flags().BoolVar(&opts.JSON, "json", false, "print the results as one JSON document")
	return cmd
}

// NewCmdPush returns "nanite push". runF replaces the run function in
// tests.
func NewCmdPush(f *Factory, runF func(context.Context, *RequestOptions) error) *cobra.Command {
	opts := &RequestOptions{IO: f.IO, Settings: f.Settings}
	cmd := &cobra.Command{
		Use:   "push /actor/method [payload] [flags]",
		Short: "Send a request without waiting for results",
		Long: `Send a push: a request nobody answers (fire and forget). It returns once the
broker has the message (with --persistent, once the broker confirmed it).
Agents are chosen as for "nanite request"; --timeout bounds how long the
push may wait in an agent's queue.

` + payloadHelp + `

` + exitCodesHelp,
		Example: `  nanite push /echo/say '"fire and forget"'
  nanite push --selector all --persistent /ops/reload
  nanite push --failsafe --timeout 10m /ops/rotate-logs`,
		Args: args(cobra.RangeArgs(1, 2)),
		RunE: func(cmd *cobra.Command, a []string) error {
			if err := opts.setArgs(a); err != nil {
				return err
			}
			if runF != nil {
				return runF(cmd.Context(), opts)
			}
			return pushRun(cmd.Context(), opts)
		},
	}
	addRequestFlags(cmd, opts)
	return cmd
}

func addRequestFlags(cmd *cobra.Command, opts *RequestOptions) {
	fl := cmd.Flags()
	fl.StringVarP(&opts.Selector, "selector", "s", nanite.SelectLeastLoaded, "least_loaded, all, random or rr")
	fl.StringVar(&opts.Target, "target", "", "send to the agent with this identity only, or to a JID through a bridge (xmpp:app@nanite.site-b.example/agent-x)")
	fl.StringArrayVar(&opts.Tags, "tag", nil, "only agents carrying this tag (repeatable; all of them unless --match-any-tag)")
	fl.BoolVar(&opts.MatchAny, "match-any-tag", false, "agents carrying any one of the --tag tags qualify")
	fl.DurationVarP(&opts.Timeout, "timeout", "t", 10*time.Second, "deadline of the request")
	fl.BoolVar(&opts.Persistent, "persistent", false, "survive a broker restart (persistent message, publisher confirm)")
	fl.BoolVar(&opts.Failsafe, "failsafe", false, "when no agent offers the service, wait in the offline queue until one does (needs a mapper daemon)")
}

// setArgs checks the arguments and flags that need no I/O.
func (o *RequestOptions) setArgs(a []string) error {
	svc, err := nanite.NormalizeService(a[0])
	if err != nil {
		return &usageError{err}
	}
	o.Service = svc
	if len(a) > 1 {
		o.Payload, o.HasPayload = a[1], true
	}
	switch o.Selector {
	case nanite.SelectLeastLoaded, nanite.SelectAll, nanite.SelectRandom, nanite.SelectRoundRobin:
	default:
		return usageErrorf("unknown --selector %q: want least_loaded, all, random or rr", o.Selector)
	}
	if o.Timeout <= 0 {
		return usageErrorf("--timeout must be positive")
	}
	if j, ok := strings.CutPrefix(o.Target, nanite.TargetXMPP); ok {
		if _, err := jid.Parse(j); err != nil || j == "" {
			return usageErrorf("invalid --target %q: not xmpp:<jid>", o.Target)
		}
	} else if o.Target != "" && !nanite.ValidIdentity(o.Target) {
		return usageErrorf("invalid --target %q: not an agent identity or xmpp:<jid>", o.Target)
	}
	return nil
}

// payload returns the request payload: valid JSON as it is, anything else
// as a JSON string; "-" reads stdin. nil means no payload.
func (o *RequestOptions) payload() (json.RawMessage, error) {
	if !o.HasPayload {
		return nil, nil
	}
	text := []byte(o.Payload)
	if o.Payload == "-" {
		b, err := io.ReadAll(o.IO.In)
		if err != nil {
			return nil, fmt.Errorf("read payload from stdin: %w", err)
		}
		text = bytes.TrimSuffix(bytes.TrimSuffix(b, []byte("\n")), []byte("\r"))
		if len(bytes.TrimSpace(text)) == 0 {
			return nil, nil
		}
	}
	return parsePayload(text), nil
}

// parsePayload is valid JSON as it is (without surrounding space), or else
// the text as a JSON string.
func parsePayload(text []byte) json.RawMessage {
	if t := bytes.TrimSpace(text); len(t) > 0 && json.Valid(t) {
		return json.RawMessage(t)
	}
	b, _ := json.Marshal(string(text))
	return b
}

func (o *RequestOptions) requestOptions() []nanite.RequestOption {
	ro := []nanite.RequestOption{nanite.WithSelector(o.Selector), nanite.WithTimeout(o.Timeout)}
	if o.Target != "" {
		ro = append(ro, nanite.WithTarget(o.Target))
	}
	if len(o.Tags) > 0 {
		ro = append(ro, nanite.WithTags(cleanTags(o.Tags)...))
	}
	if o.MatchAny {
		ro = append(ro, nanite.MatchAnyTag())
	}
	if o.Persistent {
		ro = append(ro, nanite.Persistent())
	}
	if o.Failsafe {
		ro = append(ro, nanite.OfflineFailsafe())
	}
	return ro
}

// connect resolves the settings and opens the embedded mapper, waiting for
// an agent offering the service to register (at most registrationWait, and
// never longer than the timeout).
func (o *RequestOptions) connect(ctx context.Context) (*cluster, *slog.Logger, error) {
	s, err := o.Settings()
	if err != nil {
		return nil, nil, err
	}
	log := s.newLogger(o.IO.ErrOut, slog.LevelWarn)
	sec, err := s.Secure.load(secureForClient, log)
	if err != nil {
		return nil, nil, err
	}
	c, err := openSecureCluster(ctx, s.URL, s.TLS.Config, sec.nanite(), log)
	if err != nil {
		return nil, nil, err
	}
	if err := c.waitAgents(ctx, o.Service, min(registrationWait, o.Timeout)); err != nil {
		c.Close()
		return nil, nil, err
	}
	return c, log, nil
}

func requestRun(ctx context.Context, opts *RequestOptions) error {
	payload, err := opts.payload()
	if err != nil {
		return err
	}
	c, _, err := opts.connect(ctx)
	if err != nil {
		return err
	}
	defer c.Close()

	pr := newIntermediatePrinter(opts.IO.ErrOut)
	ro := append(opts.requestOptions(), nanite.OnIntermediate(pr.print))
	var p any
	if payload != nil {
		p = payload
	}
	resp, rerr := c.m.Request(ctx, opts.Service, p, ro...)
	pr.close()
	rerr = c.explain(ctx, rerr)
	if opts.JSON {
		if err := writeResponseJSON(opts.IO.Out, opts.Service, resp, rerr); err != nil {
			return err
		}
	} else if resp != nil && (rerr == nil || len(resp.Results) > 1 || opts.Selector == nanite.SelectAll) {
		writeResponse(opts.IO.Out, opts.IO.ErrOut, resp, opts.Selector == nanite.SelectAll)
	}
	if rerr != nil {
		return rerr
	}
	return failedResults(resp)
}

func pushRun(ctx context.Context, opts *RequestOptions) error {
	payload, err := opts.payload()
	if err != nil {
		return err
	}
	c, log, err := opts.connect(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	var p any
	if payload != nil {
		p = payload
	}
	if err := c.m.Push(ctx, opts.Service, p, opts.requestOptions()...); err != nil {
		return c.explain(ctx, err)
	}
	log.Info("pushed", "service", opts.Service)
	return nil
}

// failedResults turns failed results among several (selector all) into one
// error that wraps the first remote error, so that the exit code says 5.
func failedResults(resp *nanite.Response) error {
	if resp == nil {
		return nil
	}
	var first error
	n := 0
	for _, r := range resp.Results {
		if r.Err != nil {
			n++
			if first == nil {
				first = r.Err
			}
		}
	}
	if n == 0 {
		return nil
	}
	return fmt.Errorf("%d of %d agents answered with an error; the first: %w", n, len(resp.Results), first)
}

// writeResponse prints results: the value alone for a single agent, one
// "agent: value" line per agent otherwise. Failed results go to errOut.
func writeResponse(out, errOut io.Writer, resp *nanite.Response, perAgent bool) {
	rs := slices.Clone(resp.Results)
	if len(rs) > 1 {
		perAgent = true
		slices.SortStableFunc(rs, func(a, b nanite.Result) int { return strings.Compare(a.Agent, b.Agent) })
	}
	for _, r := range rs {
		switch {
		case r.Err != nil:
			fmt.Fprintf(errOut, "%s: error: %v\n", r.Agent, remoteMessage(r.Err))
		case perAgent:
			fmt.Fprintf(out, "%s: %s\n", r.Agent, compactJSON(r.Payload))
		default:
			fmt.Fprintln(out, indentJSON(r.Payload))
		}
	}
}

// remoteMessage shortens a remote error to "code: message".
func remoteMessage(err error) string {
	var re *nanite.RemoteError
	if errors.As(err, &re) {
		return re.Code + ": " + re.Message
	}
	return err.Error()
}

type jsonResult struct {
	Agent  string            `json:"agent"`
	Result json.RawMessage   `json:"result,omitempty"`
	Error  *nanite.ErrorBody `json:"error,omitempty"`
}

type jsonResponse struct {
	Service string       `json:"service"`
	Token   string       `json:"token,omitempty"`
	Results []jsonResult `json:"results"`
	Error   string       `json:"error,omitempty"`
}

// writeResponseJSON prints the response as one JSON document, including
// the results that did arrive when the request failed.
func writeResponseJSON(out io.Writer, service string, resp *nanite.Response, rerr error) error {
	doc := jsonResponse{Service: service, Results: []jsonResult{}}
	if resp != nil {
		doc.Token = resp.Token
		for _, r := range resp.Results {
			jr := jsonResult{Agent: r.Agent}
			if r.Err != nil {
				var re *nanite.RemoteError
				if errors.As(r.Err, &re) {
					jr.Error = &nanite.ErrorBody{Code: re.Code, Message: re.Message}
				} else {
					jr.Error = &nanite.ErrorBody{Code: nanite.CodeInternal, Message: r.Err.Error()}
				}
			} else {
				jr.Result = r.Payload
				if len(jr.Result) == 0 {
					jr.Result = json.RawMessage("null")
				}
			}
			doc.Results = append(doc.Results, jr)
		}
	}
	if rerr != nil {
		doc.Error = rerr.Error()
	}
	b, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(out, "%s\n", b)
	return err
}

func compactJSON(b json.RawMessage) string {
	if len(b) == 0 {
		return "null"
	}
	var buf bytes.Buffer
	if json.Compact(&buf, b) != nil {
		return string(b)
	}
	return buf.String()
}

func indentJSON(b json.RawMessage) string {
	if len(b) == 0 {
		return "null"
	}
	var buf bytes.Buffer
	if json.Indent(&buf, b, "", "  ") != nil {
		return string(b)
	}
	return buf.String()
}

// intermediatePrinter prints intermediate results on a goroutine of its
// own: the mapper calls OnIntermediate from its reply consumer, which must
// not block on a slow terminal.
type intermediatePrinter struct {
	w       io.Writer
	mu      sync.Mutex
	ch      chan nanite.Intermediate
	closed  bool
	dropped int
	done    chan struct{}
}

func newIntermediatePrinter(w io.Writer) *intermediatePrinter {
	p := &intermediatePrinter{w: w, ch: make(chan nanite.Intermediate, 1024), done: make(chan struct{})}
	go func() {
		defer close(p.done)
		for im := range p.ch {
			fmt.Fprintf(p.w, "[%s] %s: %s\n", im.Agent, im.Key, compactJSON(im.Payload))
		}
	}()
	return p
}

func (p *intermediatePrinter) print(im nanite.Intermediate) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	select {
	case p.ch <- im:
	default:
		p.dropped++
	}
}

// close flushes the printer; later intermediate results are ignored.
func (p *intermediatePrinter) close() {
	p.mu.Lock()
	p.closed = true
	close(p.ch)
	dropped := p.dropped
	p.mu.Unlock()
	<-p.done
	if dropped > 0 {
		fmt.Fprintf(p.w, "(%d intermediate results not shown: the terminal was too slow)\n", dropped)
	}
}
