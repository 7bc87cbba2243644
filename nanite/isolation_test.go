package nanite_test

// Vhost isolation, proved against a real broker: applications provisioned
// by nanite/provision, then attacked with raw AMQP calls made with one
// application's credentials. Every refusal is checked to be RabbitMQ's
// 403 ACCESS_REFUSED (or 530 NOT_ALLOWED for a vhost), on a resource that
// exists, next to the same operation on the user's own resource succeeding:
// widen a permission regex and the refused operation succeeds, and the test
// fails. The positive tests run a real nanite.Agent and nanite.Mapper with
// the provisioned credentials, so the regexes are not too strict either.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/nanite/provision"
	"github.com/nanite-go/nanite/testenv"
)

// isoAPI is the management API of the shared node, as its administrator.
func isoAPI(r *testenv.RabbitMQ) provision.ManagementConfig {
	return provision.ManagementConfig{URL: r.ManagementURL(), User: "guest", Password: "guest"}
}

// isoApp provisions a fresh application and deletes it when the test ends.
func isoApp(t *testing.T, r *testenv.RabbitMQ, opts provision.Options) *provision.Credentials {
	t.Helper()
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	app := "iso-" + hex.EncodeToString(b)
	opts.AMQPURL = "amqp://" + r.Addr()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	creds, err := provision.Provision(ctx, isoAPI(r), app, opts)
	if err != nil {
		t.Fatalf("provision %s: %v", app, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := provision.Delete(ctx, isoAPI(r), app); err != nil {
			t.Errorf("delete %s: %v", app, err)
		}
	})
	return creds
}

func isoUser(t *testing.T, c *provision.Credentials, role provision.Role, agent string) *provision.User {
	t.Helper()
	u := c.User(role, agent)
	if u == nil {
		t.Fatalf("no %s user %q in %s", role, agent, c.App)
	}
	return u
}

// isoDial opens a connection with u's credentials, closed when the test
// ends.
func isoDial(t *testing.T, u *provision.User) *amqp.Connection {
	t.Helper()
	conn, err := amqp.Dial(u.URL)
	if err != nil {
		t.Fatalf("dial as %s: %v", u.Name, err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// isoDo runs op on a fresh channel of conn.
func isoDo(t *testing.T, conn *amqp.Connection, op func(*amqp.Channel) error) error {
	t.Helper()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatalf("channel: %v", err)
	}
	defer ch.Close()
	return op(ch)
}

// isoRefused checks that the broker refuses op with 403 ACCESS_REFUSED.
func isoRefused(t *testing.T, conn *amqp.Connection, what string, op func(*amqp.Channel) error) {
	t.Helper()
	err := isoDo(t, conn, op)
	var aerr *amqp.Error
	if !errors.As(err, &aerr) || aerr.Code != amqp.AccessRefused {
		t.Errorf("%s: got %v, want 403 ACCESS_REFUSED", what, err)
		return
	}
	t.Logf("refused as it should: %s: %s", what, aerr.Reason)
}

// isoAllowed checks that op succeeds.
func isoAllowed(t *testing.T, conn *amqp.Connection, what string, op func(*amqp.Channel) error) {
	t.Helper()
	if err := isoDo(t, conn, op); err != nil {
		t.Errorf("%s: %v, want success", what, err)
	}
}

// The operations, as the protocol's participants (or attackers) make them.

func declareAgentQueue(id string) func(*amqp.Channel) error {
	return func(ch *amqp.Channel) error {
		_, err := ch.QueueDeclare(nanite.AgentQueue(id), true, false, false, false, amqp.Table{
			"x-dead-letter-exchange": nanite.ExchangeDead,
			"x-expires":              int64(nanite.AgentQueueExpiry / time.Millisecond),
		})
		return err
	}
}

func declareReplyQueue(id string) func(*amqp.Channel) error {
	return func(ch *amqp.Channel) error {
		_, err := ch.QueueDeclare(nanite.ReplyQueue(id), true, false, false, false, amqp.Table{
			"x-expires": int64(nanite.ReplyQueueExpiry / time.Millisecond),
		})
		return err
	}
}

func consume(queue string) func(*amqp.Channel) error {
	return func(ch *amqp.Channel) error {
		_, err := ch.Consume(queue, "", true, false, false, false, nil)
		return err
	}
}

func getMessage(queue string) func(*amqp.Channel) error {
	return func(ch *amqp.Channel) error {
		_, _, err := ch.Get(queue, true)
		return err
	}
}

func purge(queue string) func(*amqp.Channel) error {
	return func(ch *amqp.Channel) error {
		_, err := ch.QueuePurge(queue, false)
		return err
	}
}

func deleteQueue(queue string) func(*amqp.Channel) error {
	return func(ch *amqp.Channel) error {
		_, err := ch.QueueDelete(queue, false, false, false)
		return err
	}
}

func bind(queue, exchange string) func(*amqp.Channel) error {
	return func(ch *amqp.Channel) error { return ch.QueueBind(queue, "", exchange, false, nil) }
}

func declareExchange(name, kind string) func(*amqp.Channel) error {
	return func(ch *amqp.Channel) error { return ch.ExchangeDeclare(name, kind, true, false, false, false, nil) }
}

func deleteExchange(name string) func(*amqp.Channel) error {
	return func(ch *amqp.Channel) error { return ch.ExchangeDelete(name, false, false) }
}

func declareQueue(name string) func(*amqp.Channel) error {
	return func(ch *amqp.Channel) error {
		_, err := ch.QueueDeclare(name, false, true, false, false, nil)
		return err
	}
}

// publish publishes and then makes a synchronous call that needs no
// permission (a passive declaration of a built-in exchange), so that the
// broker's asynchronous refusal of the publish (a channel close) is seen.
func publish(exchange, key string) func(*amqp.Channel) error {
	return func(ch *amqp.Channel) error {
		closed := ch.NotifyClose(make(chan *amqp.Error, 1))
		err := ch.PublishWithContext(context.Background(), exchange, key, false, false,
			amqp.Publishing{ContentType: "application/json", Body: []byte(`{"v":1,"packet":"push","type":"/x/y","token":"t"}`)})
		if err == nil {
			err = ch.ExchangeDeclarePassive("amq.direct", "direct", true, false, false, false, nil)
		}
		if err != nil {
			// The call may have failed only because the channel was
			// closed already: the reason is the close's.
			select {
			case cerr := <-closed:
				if cerr != nil {
					return cerr
				}
			case <-time.After(2 * time.Second):
			}
		}
		return err
	}
}

// isoLogger logs warnings of nanite agents and mappers to the test log.
func isoLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(isoWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

type isoWriter struct{ t *testing.T }

func (w isoWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// isoRun runs f until the test ends and checks that it returned nil.
func isoRun(t *testing.T, name string, f func(context.Context) error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("%s: %v", name, err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("%s did not stop", name)
		}
	})
}

func isoEchoAgent(t *testing.T, url, id string) *nanite.Agent {
	t.Helper()
	a, err := nanite.NewAgent(nanite.AgentConfig{URL: url, Identity: id, Logger: isoLogger(t),
		HeartbeatInterval: 300 * time.Millisecond, Status: func() float64 { return 0 }})
	if err != nil {
		t.Fatal(err)
	}
	a.AddActor(nanite.NewActor("echo").Expose("say", func(_ context.Context, r *nanite.Request) (any, error) {
		var s string
		err := r.Decode(&s)
		return id + ": " + s, err
	}))
	a.AddActor(nanite.NewActor("relay").Expose("to", func(ctx context.Context, r *nanite.Request) (any, error) {
		// An agent-originated request: through nanite.mapper.requests and a
		// mapper daemon to another agent, and back to this agent's reply
		// queue.
		var target string
		if err := r.Decode(&target); err != nil {
			return nil, err
		}
		resp, err := r.Agent.Request(ctx, "/echo/say", "relayed", nanite.WithTarget(target))
		if err != nil {
			return nil, err
		}
		var out []string
		for _, res := range resp.Results {
			out = append(out, string(res.Payload))
		}
		return strings.Join(out, ","), nil
	}))
	isoRun(t, "agent "+id, a.Run)
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	if err := a.Ready(ctx); err != nil {
		t.Fatalf("agent %s: %v", id, err)
	}
	return a
}

func isoMapper(t *testing.T, cfg nanite.MapperConfig) *nanite.Mapper {
	t.Helper()
	cfg.Logger = isoLogger(t)
	m, err := nanite.NewMapper(cfg)
	if err != nil {
		t.Fatal(err)
	}
	isoRun(t, "mapper "+m.Identity(), m.Run)
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	if err := m.Ready(ctx); err != nil {
		t.Fatalf("mapper: %v", err)
	}
	return m
}

func isoWaitAgents(t *testing.T, m *nanite.Mapper, n int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	if err := m.WaitForAgents(ctx, "/echo/say", n); err != nil {
		t.Fatalf("waiting for %d agents: %v (have %d)", n, err, len(m.Agents()))
	}
}

// TestIsolationRoundTrip: a real cluster runs with nothing but the
// provisioned credentials: per-agent and shared agent users, a mapper
// daemon and a requester with the mapper user, a requester with the bridge
// user. Requests to each agent, to all agents, an agent-originated request
// relayed by the daemon, and a persistent request (publisher confirms) all
// go round.
func TestIsolationRoundTrip(t *testing.T) {
	r := testenv.Rabbit(t)
	{
		creds := isoApp(t, r, provision.Options{Agents: []string{"web-1"}})
		isoEchoAgent(t, isoUser(t, creds, provision.RoleAgent, "web-1").URL, "web-1")
		isoEchoAgent(t, isoUser(t, creds, provision.RoleAgent, "").URL, "shared-1")
		isoMapper(t, nanite.MapperConfig{URL: isoUser(t, creds, provision.RoleMapper, "").URL,
			ServeAgentRequests: true, ServeFailsafe: true})
		for _, role := range []provision.Role{provision.RoleMapper, provision.RoleBridge} {
			m := isoMapper(t, nanite.MapperConfig{URL: isoUser(t, creds, role, "").URL})
			isoWaitAgents(t, m, 2)
			for _, id := range []string{"web-1", "shared-1"} {
				resp, err := m.Request(t.Context(), "/echo/say", "hi", nanite.WithTarget(id), nanite.WithTimeout(10*time.Second))
				if err != nil {
					t.Fatalf("%s → %s: %v", role, id, err)
				}
				var got string
				if err := resp.Decode(&got); err != nil || got != id+": hi" {
					t.Fatalf("%s → %s: %q %v", role, id, got, err)
				}
			}
			resp, err := m.Request(t.Context(), "/echo/say", "all", nanite.WithSelector("all"), nanite.WithTimeout(10*time.Second))
			if err != nil || len(resp.Results) != 2 {
				t.Fatalf("%s → all: %v %+v", role, err, resp)
			}
			resp, err = m.Request(t.Context(), "/relay/to", "shared-1", nanite.WithTarget("web-1"),
				nanite.Persistent(), nanite.WithTimeout(10*time.Second))
			if err != nil {
				t.Fatalf("%s → web-1 → mapper daemon → shared-1: %v", role, err)
			}
			var got string
			if err := resp.Decode(&got); err != nil || !strings.Contains(got, "shared-1: relayed") {
				t.Fatalf("agent-originated request: %q %v", got, err)
			}
		}
	}
}

// TestIsolationOtherVhost: no user of application A can open application
// B's vhost: the broker refuses the connection (530 NOT_ALLOWED), and a
// nanite.Agent given such a URL fails at once with ErrConnection.
func TestIsolationOtherVhost(t *testing.T) {
	r := testenv.Rabbit(t)
	a := isoApp(t, r, provision.Options{Agents: []string{"a-1"}})
	b := isoApp(t, r, provision.Options{})
	for _, u := range a.Users {
		// A's credentials, B's vhost.
		url := strings.TrimSuffix(u.URL, "/"+a.Vhost) + "/" + b.Vhost
		conn, err := amqp.Dial(url)
		if err == nil {
			conn.Close()
			t.Errorf("%s opened vhost %s", u.Name, b.Vhost)
			continue
		}
		var aerr *amqp.Error
		if !errors.As(err, &aerr) || aerr.Code != amqp.NotAllowed {
			t.Errorf("%s on vhost %s: %v, want 530 NOT_ALLOWED", u.Name, b.Vhost, err)
		}
		// The same credentials do open their own vhost.
		isoDial(t, &u)
	}
	ag, err := nanite.NewAgent(nanite.AgentConfig{URL: strings.TrimSuffix(isoUser(t, a, provision.RoleAgent, "").URL, "/"+a.Vhost) + "/" + b.Vhost})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := ag.Run(ctx); !errors.Is(err, nanite.ErrConnection) {
		t.Fatalf("agent with A's credentials on B's vhost: %v, want ErrConnection", err)
	}
}

// TestIsolationPerAgent: with one user per agent identity, an agent can
// declare, bind and consume its own two queues and nothing else: not
// another agent's queues, not a mapper's queues, not the shared queues of
// mapper daemons.
func TestIsolationPerAgent(t *testing.T) {
	r := testenv.Rabbit(t)
	app := isoApp(t, r, provision.Options{Agents: []string{"a-1", "a-2"}, PerAgent: true})
	if app.User(provision.RoleAgent, "") != nil {
		t.Fatal("PerAgent made a shared agent user")
	}
	// a-2 and a mapper are running, so their queues exist.
	isoEchoAgent(t, isoUser(t, app, provision.RoleAgent, "a-2").URL, "a-2")
	m := isoMapper(t, nanite.MapperConfig{URL: isoUser(t, app, provision.RoleMapper, "").URL, Identity: "m-1"})
	isoWaitAgents(t, m, 1)

	a1 := isoDial(t, isoUser(t, app, provision.RoleAgent, "a-1"))
	// Its own queues: everything the protocol does.
	isoAllowed(t, a1, "declare own agent queue", declareAgentQueue("a-1"))
	isoAllowed(t, a1, "declare own reply queue", declareReplyQueue("a-1"))
	isoAllowed(t, a1, "bind own queue to nanite.advertise", bind(nanite.AgentQueue("a-1"), nanite.ExchangeAdvertise))
	isoAllowed(t, a1, "consume own agent queue", consume(nanite.AgentQueue("a-1")))
	isoAllowed(t, a1, "consume own reply queue", consume(nanite.ReplyQueue("a-1")))
	isoAllowed(t, a1, "publish register", publish(nanite.ExchangeRegistration, ""))
	isoAllowed(t, a1, "publish a result (default exchange)", publish("", nanite.ReplyQueue("m-1")))

	// Another agent's queues.
	isoRefused(t, a1, "consume another agent's queue", consume(nanite.AgentQueue("a-2")))
	isoRefused(t, a1, "basic.get from another agent's queue", getMessage(nanite.AgentQueue("a-2")))
	isoRefused(t, a1, "consume another agent's reply queue", consume(nanite.ReplyQueue("a-2")))
	isoRefused(t, a1, "purge another agent's queue", purge(nanite.AgentQueue("a-2")))
	isoRefused(t, a1, "delete another agent's queue", deleteQueue(nanite.AgentQueue("a-2")))
	isoRefused(t, a1, "re-declare another agent's queue", declareAgentQueue("a-2"))
	isoRefused(t, a1, "declare a queue under another agent's name", declareAgentQueue("a-3"))
	isoRefused(t, a1, "bind another agent's queue", bind(nanite.AgentQueue("a-2"), nanite.ExchangeAdvertise))
	// A mapper's queues and the mapper daemons' shared queues.
	isoRefused(t, a1, "consume a mapper's registration queue", consume("nanite.mapper.m-1.registration"))
	isoRefused(t, a1, "consume a mapper's reply queue", consume(nanite.ReplyQueue("m-1")))
	isoRefused(t, a1, "consume nanite.mapper.requests", consume(nanite.QueueMapperRequests))
	isoRefused(t, a1, "consume nanite.offline", consume(nanite.QueueOffline))
	// Snooping on registrations and heartbeats: binding its own queue to them.
	isoRefused(t, a1, "bind own queue to nanite.registration", bind(nanite.ReplyQueue("a-1"), nanite.ExchangeRegistration))
	isoRefused(t, a1, "bind own queue to nanite.heartbeat", bind(nanite.ReplyQueue("a-1"), nanite.ExchangeHeartbeat))
}

// TestIsolationSharedAgentUser: the shared agent user is weaker (any agent
// queue is "its own"), but still cannot read a mapper's queues or the
// shared queues.
func TestIsolationSharedAgentUser(t *testing.T) {
	r := testenv.Rabbit(t)
	app := isoApp(t, r, provision.Options{})
	m := isoMapper(t, nanite.MapperConfig{URL: isoUser(t, app, provision.RoleMapper, "").URL, Identity: "m-1", ServeAgentRequests: true})
	_ = m
	ag := isoDial(t, isoUser(t, app, provision.RoleAgent, ""))
	isoAllowed(t, ag, "declare an agent queue", declareAgentQueue("x-1"))
	isoRefused(t, ag, "consume a mapper's registration queue", consume("nanite.mapper.m-1.registration"))
	isoRefused(t, ag, "consume a mapper's heartbeat queue", consume("nanite.mapper.m-1.heartbeat"))
	isoRefused(t, ag, "consume nanite.mapper.requests", consume(nanite.QueueMapperRequests))
	isoRefused(t, ag, "consume nanite.offline", consume(nanite.QueueOffline))
	isoRefused(t, ag, "bind a queue to nanite.registration", bind(nanite.AgentQueue("x-1"), nanite.ExchangeRegistration))
	// The trade-off (docs/provisioning.md): another agent's queue counts as
	// its own. One user per agent (TestIsolationPerAgent) closes this.
	isoAllowed(t, ag, "shared user: declare another agent's queue", declareAgentQueue("x-2"))
}

// TestIsolationForeignResources: nobody declares exchanges or queues
// outside the protocol, or publishes where the protocol does not.
func TestIsolationForeignResources(t *testing.T) {
	r := testenv.Rabbit(t)
	app := isoApp(t, r, provision.Options{Agents: []string{"a-1"}})
	for _, u := range app.Users {
		conn := isoDial(t, &u)
		who := u.Name
		isoRefused(t, conn, who+": declare exchange evil", declareExchange("evil", "fanout"))
		isoRefused(t, conn, who+": declare exchange nanite.evil", declareExchange("nanite.evil", "topic"))
		isoRefused(t, conn, who+": declare queue evil", declareQueue("evil"))
		isoRefused(t, conn, who+": declare queue nanite.evil", declareQueue("nanite.evil"))
		isoRefused(t, conn, who+": publish to amq.fanout", publish("amq.fanout", ""))
		isoRefused(t, conn, who+": publish to amq.topic", publish("amq.topic", "x"))
		isoAllowed(t, conn, who+": publish through the default exchange", publish("", nanite.QueueMapperRequests))
	}
	// Agents may not broadcast advertise requests (a mapper's job).
	for _, id := range []string{"", "a-1"} {
		conn := isoDial(t, isoUser(t, app, provision.RoleAgent, id))
		isoRefused(t, conn, "agent: publish to nanite.advertise", publish(nanite.ExchangeAdvertise, ""))
		isoAllowed(t, conn, "agent: publish to nanite.heartbeat", publish(nanite.ExchangeHeartbeat, ""))
	}
	// Mappers may not publish state as if they were agents, nor touch
	// agents' queues beyond sending to them.
	mconn := isoDial(t, isoUser(t, app, provision.RoleMapper, ""))
	isoAllowed(t, mconn, "mapper: publish to nanite.advertise", publish(nanite.ExchangeAdvertise, ""))
	isoRefused(t, mconn, "mapper: publish to nanite.registration", publish(nanite.ExchangeRegistration, ""))
	isoRefused(t, mconn, "mapper: publish to nanite.heartbeat", publish(nanite.ExchangeHeartbeat, ""))
	aconn := isoDial(t, isoUser(t, app, provision.RoleAgent, "a-1"))
	isoAllowed(t, aconn, "declare a-1's queue", declareAgentQueue("a-1"))
	isoRefused(t, mconn, "mapper: consume an agent's queue", consume(nanite.AgentQueue("a-1")))
	isoRefused(t, mconn, "mapper: purge an agent's queue", purge(nanite.AgentQueue("a-1")))
	isoRefused(t, mconn, "mapper: delete an agent's queue", deleteQueue(nanite.AgentQueue("a-1")))
}

// TestIsolationLockedTopology: with LockTopology no user may re-declare or
// delete the shared exchanges and queues; participants check them with
// passive declarations instead, and still do all the rest.
func TestIsolationLockedTopology(t *testing.T) {
	r := testenv.Rabbit(t)
	app := isoApp(t, r, provision.Options{Agents: []string{"a-1"}, LockTopology: true})
	users := map[string]*provision.User{
		"shared agent": isoUser(t, app, provision.RoleAgent, ""),
		"agent a-1":    isoUser(t, app, provision.RoleAgent, "a-1"),
		"mapper":       isoUser(t, app, provision.RoleMapper, ""),
		"bridge":       isoUser(t, app, provision.RoleBridge, ""),
	}
	for who, u := range users {
		conn := isoDial(t, u)
		for _, e := range []struct{ name, kind string }{
			{nanite.ExchangeRegistration, "fanout"}, {nanite.ExchangeHeartbeat, "fanout"},
			{nanite.ExchangeAdvertise, "fanout"}, {nanite.ExchangeDead, "headers"},
		} {
			isoAllowed(t, conn, who+": passive declare "+e.name, func(ch *amqp.Channel) error {
				return ch.ExchangeDeclarePassive(e.name, e.kind, true, false, false, false, nil)
			})
			isoRefused(t, conn, who+": declare "+e.name, declareExchange(e.name, e.kind))
			isoRefused(t, conn, who+": delete "+e.name, deleteExchange(e.name))
		}
		for _, q := range []string{nanite.QueueMapperRequests, nanite.QueueOffline} {
			isoAllowed(t, conn, who+": passive declare "+q, func(ch *amqp.Channel) error {
				_, err := ch.QueueDeclarePassive(q, true, false, false, false, nil)
				return err
			})
			isoRefused(t, conn, who+": delete "+q, deleteQueue(q))
		}
	}
	// The rest of an agent's work still goes.
	a1 := isoDial(t, users["agent a-1"])
	isoAllowed(t, a1, "declare own agent queue", declareAgentQueue("a-1"))
	isoAllowed(t, a1, "declare own reply queue", declareReplyQueue("a-1"))
	isoAllowed(t, a1, "bind own queue to nanite.advertise", bind(nanite.AgentQueue("a-1"), nanite.ExchangeAdvertise))
	isoAllowed(t, a1, "consume own queue", consume(nanite.AgentQueue("a-1")))
	isoAllowed(t, a1, "publish register", publish(nanite.ExchangeRegistration, ""))

	// Real participants check the shared topology passively when they may
	// not declare it, and work.
	isoEchoAgent(t, users["agent a-1"].URL, "a-1")
	isoMapper(t, nanite.MapperConfig{URL: users["mapper"].URL, ServeAgentRequests: true})
	m := isoMapper(t, nanite.MapperConfig{URL: users["bridge"].URL})
	isoWaitAgents(t, m, 1)
	if _, err := m.Request(t.Context(), "/echo/say", "hi", nanite.WithTimeout(10*time.Second)); err != nil {
		t.Fatalf("locked topology round trip: %v", err)
	}
}

// Example output of a refusal, for the record: RabbitMQ names the user,
// the resource and the vhost.
func TestIsolationRefusalIsExplained(t *testing.T) {
	r := testenv.Rabbit(t)
	app := isoApp(t, r, provision.Options{})
	conn := isoDial(t, isoUser(t, app, provision.RoleAgent, ""))
	err := isoDo(t, conn, declareExchange("evil", "fanout"))
	want := fmt.Sprintf("ACCESS_REFUSED - access to exchange 'evil' in vhost '%s' refused for user '%s.agent'", app.Vhost, app.App)
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("got %v, want it to say %q", err, want)
	}
}
