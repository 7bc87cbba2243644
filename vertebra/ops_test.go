package vertebra

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"mellium.im/xmpp/jid"
	"mellium.im/xmpp/stanza"
)

// streamHandler echoes its payload after n intermediate results.
func streamHandler(runs *atomic.Int64) OpHandler {
	return OpHandlerFunc(func(ctx context.Context, req *Request, w *Reply) error {
		if runs != nil {
			runs.Add(1)
		}
		switch req.Type {
		case "/test/echo":
			return w.Data(ctx, req.Payload)
		case "/test/stream":
			for i := 1; i <= 3; i++ {
				if err := w.Intermediate(ctx, "progress", json.RawMessage(fmt.Sprintf(`{"step":%d}`, i))); err != nil {
					return err
				}
			}
			return w.Data(ctx, json.RawMessage(`"done"`))
		case "/test/raw": // a result whose JSON has a carriage return between values
			return w.Data(ctx, json.RawMessage("[1,\r2]"))
		case "/test/none": // no result: ack and final
			return nil
		case "/test/fail":
			if err := w.Ack(ctx); err != nil {
				return err
			}
			return &Error{Code: "boom", Message: "failed as asked"}
		case "/test/slow":
			if err := w.Ack(ctx); err != nil {
				return err
			}
			<-ctx.Done()
			return ctx.Err()
		}
		return w.Nack(ctx, CodeUnknown, "no such op "+req.Type)
	})
}

func TestOpLifecycleBetweenClients(t *testing.T) {
	p := runProsody(t)
	var runs atomic.Int64
	server := NewEndpoint(Config{Handler: streamHandler(&runs), Logger: testLogger(t)})
	startConn(t, clientDial(t, p, "bob"), server)
	client := NewEndpoint(Config{Logger: testLogger(t)})
	startConn(t, clientDial(t, p, "alice"), client)
	bob := server.LocalAddr()

	t.Run("echo", func(t *testing.T) {
		for _, payload := range []string{`{"a":1,"b":[true,null,"x"]}`, `"text"`, `[1,2.5]`, `{}`, `null`, ``} {
			res, err := client.Call(ctxTimeout(t, 10*time.Second), bob, "/test/echo", json.RawMessage(payload))
			if err != nil {
				t.Fatalf("%s: %v", payload, err)
			}
			want := payload
			if want == "" {
				want = "null" // no arguments: the handler's nil payload
			}
			if string(res.Value()) != want && !(payload == "" && res.Value() == nil) {
				t.Errorf("echo %s = %s", payload, res.Value())
			}
			if !res.From.Equal(bob) {
				t.Errorf("result from %v, want %v", res.From, bob)
			}
		}
	})

	t.Run("stream", func(t *testing.T) {
		var got []string
		res, err := client.Call(ctxTimeout(t, 10*time.Second), bob, "/test/stream", nil, OnData(func(d Data) {
			got = append(got, fmt.Sprintf("%v %s %s", d.Intermediate, d.Key, d.Payload))
		}))
		if err != nil {
			t.Fatal(err)
		}
		want := []string{`true progress {"step":1}`, `true progress {"step":2}`, `true progress {"step":3}`, `false  "done"`}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("data %q, want %q", got, want)
		}
		if len(res.Data) != 1 || string(res.Data[0]) != `"done"` {
			t.Errorf("results %s", res.Data)
		}
	})

	t.Run("error", func(t *testing.T) {
		_, err := client.Call(ctxTimeout(t, 10*time.Second), bob, "/test/fail", nil)
		var oe *OpError
		if !errors.As(err, &oe) || oe.Nack || oe.Code != "boom" || oe.Message != "failed as asked" || !errors.Is(err, ErrRemote) {
			t.Fatalf("err = %v", err)
		}
	})

	t.Run("nack", func(t *testing.T) {
		_, err := client.Call(ctxTimeout(t, 10*time.Second), bob, "/test/nothing", nil)
		var oe *OpError
		if !errors.As(err, &oe) || !oe.Nack || oe.Code != CodeUnknown || !errors.Is(err, ErrNack) {
			t.Fatalf("err = %v", err)
		}
	})

	t.Run("deadline", func(t *testing.T) {
		t0 := time.Now()
		_, err := client.Call(ctxTimeout(t, 300*time.Millisecond), bob, "/test/slow", nil)
		var de *DeadlineError
		if !errors.As(err, &de) || de.Stage != "final" || !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("err = %v", err)
		}
		if d := time.Since(t0); d > time.Second {
			t.Errorf("took %v", d)
		}
	})

	t.Run("offline JID", func(t *testing.T) {
		to := bob
		to, _ = to.WithResource("nobody")
		_, err := client.Call(ctxTimeout(t, 5*time.Second), to, "/test/echo", nil)
		var se *StanzaError
		if !errors.As(err, &se) || !errors.Is(err, ErrUnavailable) || !errors.Is(err, stanza.Error{Condition: stanza.ServiceUnavailable}) {
			t.Fatalf("err = %v", err)
		}
	})

	st := client.Stats()
	if st.Resent != 0 || st.DuplicateStanzas != 0 {
		t.Errorf("client stats %+v: resends on a healthy server", st)
	}
	t.Logf("client %+v\nserver %+v", st, server.Stats())
}

// TestPayloadsSurviveTheServer sends payloads through prosody and back
// (the server parses and re-serialises every stanza).
func TestPayloadsSurviveTheServer(t *testing.T) {
	p := runProsody(t)
	server := NewEndpoint(Config{Handler: streamHandler(nil)})
	startConn(t, clientDial(t, p, "bob"), server)
	client := NewEndpoint(Config{})
	startConn(t, componentDial(p), client)
	for _, payload := range []string{
		`"carriage\rreturn and\r\nCRLF"`, `"\ttab\nnewline  "`, `"  leading and trailing  "`, `"]]> <!-- --> &amp; <x/>"`,
		`"'quotes' \"double\""`, `"ünïcødé ☃ 😀 \u2028"`, `{"a b":{"":[null,true,false,-0.0,1e-7,9007199254740993]}}`,
		`[2147483647,-2147483648,2147483648,1.10]`, `{"x":1,"x":2}`, `""`, `"\u007f\u0085"`,
		`{"key\twith\r\ncontrols":"v","k2":{"inner\nkey":"\r"}}`,
	} {
		res, err := client.Call(ctxTimeout(t, 5*time.Second), server.LocalAddr(), "/test/echo", json.RawMessage(payload),
			WithFrom(jid.MustParse("caller@"+testComponent)))
		if err != nil {
			t.Fatalf("%s: %v", payload, err)
		}
		var sent, got any
		_ = json.Unmarshal([]byte(payload), &sent)
		_ = json.Unmarshal(res.Value(), &got)
		if !reflect.DeepEqual(sent, got) || !bytes.Equal(canonicalJSON(t, payload), canonicalJSON(t, string(res.Value()))) {
			t.Errorf("sent %+q, got back %+q", payload, res.Value())
		}
	}
}

// canonicalJSON re-encodes JSON keeping member order and number texts.
func canonicalJSON(t *testing.T, s string) []byte {
	t.Helper()
	d := json.NewDecoder(strings.NewReader(s))
	d.UseNumber()
	var b bytes.Buffer
	for {
		tok, err := d.Token()
		if err != nil {
			return b.Bytes()
		}
		enc, _ := json.Marshal(tok)
		if dl, ok := tok.(json.Delim); ok {
			enc = []byte(dl.String())
		}
		b.Write(enc)
		b.WriteByte(' ')
	}
}
