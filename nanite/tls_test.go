package nanite_test

import (
	"context"
	"crypto/tls"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/testenv"
)

// TestTLS runs an agent and a mapper over amqps:// against a RabbitMQ TLS
// listener that verifies client certificates when sent, and checks that a
// broker certificate from another CA, and a client certificate from another
// CA, are refused with an error that says so.
func TestTLS(t *testing.T) {
	files, err := testenv.GenerateTLS(filepath.Join(t.TempDir(), "good"))
	if err != nil {
		t.Fatal(err)
	}
	r := testenv.RunRabbitMQ(t, testenv.RabbitOptions{Name: "tls", TLS: files})
	url := r.TLSURL()
	if !strings.HasPrefix(url, "amqps://") {
		t.Fatalf("TLS URL %q", url)
	}
	// Each participant gets its own *tls.Config: amqp091-go writes the
	// server name into the one it is given (see the report on the link).
	clientConfig := func(f *testenv.TLSFiles) *tls.Config {
		cfg, err := f.ClientConfig()
		if err != nil {
			t.Fatal(err)
		}
		return cfg
	}

	t.Run("round trip", func(t *testing.T) {
		a, err := nanite.NewAgent(nanite.AgentConfig{URL: url, TLS: clientConfig(files), Identity: "tls-agent",
			Logger: isoLogger(t), HeartbeatInterval: 300 * time.Millisecond, Status: func() float64 { return 0 }})
		if err != nil {
			t.Fatal(err)
		}
		a.AddActor(nanite.NewActor("echo").Expose("say", func(_ context.Context, r *nanite.Request) (any, error) {
			var s string
			err := r.Decode(&s)
			return "over TLS: " + s, err
		}))
		isoRun(t, "agent", a.Run)
		m := isoMapper(t, nanite.MapperConfig{URL: url, TLS: clientConfig(files)})
		isoWaitAgents(t, m, 1)
		resp, err := m.Request(t.Context(), "/echo/say", "hi", nanite.WithTimeout(10*time.Second), nanite.Persistent())
		if err != nil {
			t.Fatal(err)
		}
		var got string
		if err := resp.Decode(&got); err != nil || got != "over TLS: hi" {
			t.Fatalf("got %q %v", got, err)
		}
		// The broker saw TLS connections with the client certificate.
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		defer cancel()
		out, err := r.Ctl(ctx, "list_connections", "client_properties", "ssl", "peer_cert_subject")
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, line := range strings.Split(out, "\n") {
			if strings.Contains(line, "nanite-") {
				n++
				if !strings.Contains(line, "true") || !strings.Contains(line, "CN=testenv-client") {
					t.Errorf("connection not over TLS with the client certificate: %s", line)
				}
			}
		}
		if n < 2 {
			t.Errorf("broker lists %d nanite connections:\n%s", n, out)
		}
	})

	other, err := testenv.GenerateTLS(filepath.Join(t.TempDir(), "other"))
	if err != nil {
		t.Fatal(err)
	}
	// refused runs an agent with cfg and checks that it does not connect,
	// with an error wrapping ErrConnection that contains want.
	refused := func(t *testing.T, cfg *tls.Config, want string) {
		a, err := nanite.NewAgent(nanite.AgentConfig{URL: url, TLS: cfg, Logger: isoLogger(t)})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- a.Run(ctx) }()
		rctx, rcancel := context.WithTimeout(t.Context(), 3*time.Second)
		defer rcancel()
		err = a.Ready(rctx)
		cancel()
		// Run ends with nil (the link kept retrying) or with the refusal
		// (were TLS failures treated as permanent).
		if rerr := <-done; rerr != nil && !errors.Is(rerr, nanite.ErrConnection) {
			t.Errorf("Run: %v", rerr)
		}
		if err == nil {
			t.Fatal("connected")
		}
		if !errors.Is(err, nanite.ErrConnection) || !strings.Contains(err.Error(), want) {
			t.Fatalf("got %v, want ErrConnection saying %q", err, want)
		}
		t.Logf("refused as it should: %v", err)
	}

	t.Run("broker certificate from another CA", func(t *testing.T) {
		cfg := clientConfig(files)
		pool, err := other.CertPool()
		if err != nil {
			t.Fatal(err)
		}
		cfg.RootCAs = pool
		refused(t, cfg, "certificate signed by unknown authority")
	})

	t.Run("no CA at all", func(t *testing.T) {
		// The system's roots do not know the private CA either.
		refused(t, &tls.Config{MinVersion: tls.VersionTLS12}, "certificate signed by unknown authority")
	})

	t.Run("server name mismatch", func(t *testing.T) {
		cfg := clientConfig(files)
		cfg.ServerName = "rabbit.example"
		refused(t, cfg, "certificate is valid for")
	})

	t.Run("client certificate from another CA", func(t *testing.T) {
		cfg := clientConfig(files)
		bad := clientConfig(other)
		cfg.Certificates = bad.Certificates
		// With TLS 1.3 the broker judges the client certificate after the
		// client's handshake has finished, and the client sees either its
		// alert or a reset connection, whichever comes first; with TLS 1.2
		// the handshake itself fails with the broker's alert.
		cfg.MaxVersion = tls.VersionTLS12
		refused(t, cfg, "remote error: tls: unknown certificate authority")
	})
}
