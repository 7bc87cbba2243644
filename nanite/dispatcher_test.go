package nanite

import (
	"context"
	"encoding/json"
	"errors"
	"testing"
)

func TestDispatcher(t *testing.T) {
	d := NewDispatcher(testActor(new(string), nil))
	var steps []string
	res, err := d.Call(t.Context(), "/echo/stream", nil, "me", func(_ context.Context, key string, data json.RawMessage) error {
		steps = append(steps, key+"="+string(data))
		return nil
	})
	if err != nil || string(res) != `"done"` || len(steps) != 3 {
		t.Fatalf("stream: %s %v %v", res, err, steps)
	}
	var re *RemoteError
	if _, err := d.Call(t.Context(), "/echo/panic", nil, "me", nil); !errors.As(err, &re) || re.Code != CodePanic {
		t.Fatalf("panic: %v", err)
	}
	if _, err := d.Call(t.Context(), "/nope", nil, "me", nil); !errors.As(err, &re) || re.Code != CodeUnknown {
		t.Fatalf("unknown: %v", err)
	}
	if !d.Idempotent("/echo/who") || d.Idempotent("/echo/say") {
		t.Fatal("idempotency flags")
	}
}
