package testenv_test

import (
	"context"
	"errors"
	"net/http"
	"net/url"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/nanite-go/nanite/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

func dial(t *testing.T, url string) *amqp.Connection {
	t.Helper()
	conn, err := amqp.DialConfig(url, amqp.Config{
		Properties: amqp.Table{"connection_name": t.Name()},
		Dial:       amqp.DefaultDial(5 * time.Second),
	})
	if err != nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

func channel(t *testing.T, conn *amqp.Connection) *amqp.Channel {
	t.Helper()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	return ch
}

// publishConfirmed publishes a persistent message to queue q and waits for
// the broker's confirm, after which the message is on disk.
func publishConfirmed(t *testing.T, ch *amqp.Channel, q, body string) {
	t.Helper()
	if err := ch.Confirm(false); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	dc, err := ch.PublishWithDeferredConfirmWithContext(ctx, "", q, true, false, amqp.Publishing{
		DeliveryMode: amqp.Persistent,
		Body:         []byte(body),
	})
	if err != nil {
		t.Fatal(err)
	}
	ok, err := dc.WaitContext(ctx)
	if err != nil || !ok {
		t.Fatalf("publish %q: acked=%v err=%v", body, ok, err)
	}
}

func getOne(t *testing.T, ch *amqp.Channel, q string) string {
	t.Helper()
	d, ok, err := ch.Get(q, true)
	if err != nil {
		t.Fatal(err)
	}
	if !ok {
		t.Fatalf("queue %s is empty", q)
	}
	return string(d.Body)
}

// TestSharedNode groups the checks of the shared node in one parallel test,
// so that they take one -parallel slot while the node starts.
func TestSharedNode(t *testing.T) {
	t.Parallel()
	r := testenv.Rabbit(t)
	if r2 := testenv.Rabbit(t); r2 != r {
		t.Fatal("Rabbit returned two different shared nodes")
	}
	t.Run("NewVhost", testNewVhost)
	t.Run("DefaultVhost", testDefaultVhost)
}

func testNewVhost(t *testing.T) {
	r := testenv.Rabbit(t)

	u := r.NewVhost(t)
	uri, err := amqp.ParseURI(u)
	if err != nil {
		t.Fatal(err)
	}
	ch := channel(t, dial(t, u))
	if _, err := ch.QueueDeclare("q", false, true, false, false, nil); err != nil {
		t.Fatal(err)
	}
	publishConfirmed(t, ch, "q", "hello")
	if got := getOne(t, ch, "q"); got != "hello" {
		t.Fatalf("got %q, want hello", got)
	}

	// The vhost is visible in the management API.
	var vh struct{ Name string }
	if err := r.API(t.Context(), http.MethodGet, "/api/vhosts/"+url.PathEscape(uri.Vhost), nil, &vh); err != nil {
		t.Fatal(err)
	}
	if vh.Name != uri.Vhost {
		t.Fatalf("API vhost name %q, want %q", vh.Name, uri.Vhost)
	}

	// A user without permissions on the vhost is refused, and so is a wrong
	// password.
	stranger := "stranger-" + uri.Username
	if err := r.AddUser(t.Context(), stranger, "pw"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.DeleteUser(context.Background(), stranger) })
	if c, err := amqp.Dial(r.VhostURL(uri.Vhost, stranger, "pw")); err == nil {
		_ = c.Close()
		t.Fatal("user without permissions could open the vhost")
	}
	if c, err := amqp.Dial(r.VhostURL(uri.Vhost, uri.Username, "wrong")); err == nil {
		_ = c.Close()
		t.Fatal("wrong password accepted")
	}
	// Nor may it open the default vhost.
	if c, err := amqp.Dial(r.VhostURL("/", stranger, "pw")); err == nil {
		_ = c.Close()
		t.Fatal("user without permissions could open /")
	}
}

func testDefaultVhost(t *testing.T) {
	r := testenv.Rabbit(t)
	for _, u := range []string{r.URL(), r.VhostURL("/", "guest", "guest")} {
		uri, err := amqp.ParseURI(u)
		if err != nil {
			t.Fatal(err)
		}
		if uri.Vhost != "/" || uri.Port != r.Port() {
			t.Fatalf("%s: vhost %q port %d", u, uri.Vhost, uri.Port)
		}
		_ = channel(t, dial(t, u))
	}
	if r.ManagementURL() == "" {
		t.Fatal("shared node has no management URL")
	}
	var overview struct {
		Node string `json:"node"`
	}
	if err := r.API(t.Context(), http.MethodGet, "/api/overview", nil, &overview); err != nil {
		t.Fatal(err)
	}
	if overview.Node != r.Node() {
		t.Fatalf("overview node %q, want %q", overview.Node, r.Node())
	}
}

// TestOwnNode runs a second node beside the shared one, without management
// (so provisioning goes through rabbitmqctl) and with a TLS listener, and
// checks that durable data survives a restart and a crash.
func TestOwnNode(t *testing.T) {
	t.Parallel()
	tlsFiles, err := testenv.GenerateTLS(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	r := testenv.RunRabbitMQ(t, testenv.RabbitOptions{Name: "own", TLS: tlsFiles, Logger: testLogger(t)})
	shared := testenv.Rabbit(t)
	if r.Port() == shared.Port() || r.Node() == shared.Node() {
		t.Fatalf("two nodes share port %d or name %s", r.Port(), r.Node())
	}
	if r.ManagementURL() != "" {
		t.Fatalf("management URL %q on a node without management", r.ManagementURL())
	}
	ctx := t.Context()

	conn := dial(t, r.URL())
	ch := channel(t, conn)
	if _, err := ch.QueueDeclare("durable-q", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	publishConfirmed(t, ch, "durable-q", "before restart")
	_ = conn.Close()

	// The queue exists on this node only.
	sch := channel(t, dial(t, shared.URL()))
	if _, err := sch.QueueDeclarePassive("durable-q", true, false, false, false, nil); err == nil {
		t.Fatal("durable-q exists on the shared node too")
	}

	port := r.Port()
	begin := time.Now()
	if err := r.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("restart took %v", time.Since(begin).Round(time.Millisecond))
	if r.Port() != port {
		t.Fatalf("port changed from %d to %d", port, r.Port())
	}
	conn = dial(t, r.URL())
	ch = channel(t, conn)
	if got := getOne(t, ch, "durable-q"); got != "before restart" {
		t.Fatalf("after restart got %q", got)
	}
	publishConfirmed(t, ch, "durable-q", "before crash")

	if err := r.Kill(); err != nil {
		t.Fatal(err)
	}
	if r.Running() {
		t.Fatal("node still running after Kill")
	}
	select {
	case err := <-conn.NotifyClose(make(chan *amqp.Error, 1)):
		t.Logf("connection closed by crash: %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("connection still open 5 s after the node was killed")
	}
	if c, err := amqp.Dial(r.URL()); err == nil {
		_ = c.Close()
		t.Fatal("killed node accepts connections")
	}
	begin = time.Now()
	if err := r.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("start after kill took %v", time.Since(begin).Round(time.Millisecond))
	ch = channel(t, dial(t, r.URL()))
	if got := getOne(t, ch, "durable-q"); got != "before crash" {
		t.Fatalf("after crash got %q", got)
	}

	// amqps with the generated CA and client certificate.
	cfg, err := tlsFiles.ClientConfig()
	if err != nil {
		t.Fatal(err)
	}
	tconn, err := amqp.DialTLS(r.TLSURL(), cfg)
	if err != nil {
		t.Fatalf("amqps: %v", err)
	}
	if !tconn.ConnectionState().HandshakeComplete {
		t.Fatal("TLS handshake not complete")
	}
	_ = tconn.Close()

	// Provisioning through rabbitmqctl.
	u := r.NewVhost(t)
	_ = channel(t, dial(t, u))
	uri, _ := amqp.ParseURI(u)
	if c, err := amqp.Dial(r.VhostURL(uri.Vhost, "guest", "guest")); err == nil {
		_ = c.Close()
		t.Fatal("guest may open a vhost it has no permissions on")
	}
	if err := r.DeleteVhost(ctx, "no-such-vhost"); err != nil {
		t.Fatalf("deleting a missing vhost: %v", err)
	}
}

func TestStartFailsFast(t *testing.T) {
	t.Parallel()
	testenv.Require(t, "rabbitmq-server", "rabbitmqctl")
	// A context that is already over: StartRabbitMQ must give up at once
	// and leave nothing running.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	r, err := testenv.StartRabbitMQ(ctx, testenv.RabbitOptions{Name: "canceled"})
	if err == nil {
		_ = r.Close()
		t.Fatal("StartRabbitMQ succeeded with a canceled context")
	}
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
}
