// Package testenv starts real, private RabbitMQ and prosody servers for
// tests: each in its own temporary directory, on free ports of 127.0.0.1
// (or another loopback address), never on the machine's default ports, and never shared with other test
// processes (go test runs packages in parallel).
//
// The servers come from Debian's packages (apt-get install -y
// rabbitmq-server prosody). When they are missing, the helpers skip the
// test, or fail it when the environment variable CI is "true" (see
// [Require]).
//
// # RabbitMQ
//
// A node takes about 5 s to start, so a package's tests share one through
// [Rabbit], and [Main] stops it at the end:
//
//	func TestMain(m *testing.M) { testenv.Main(m) }
//
//	func TestSomething(t *testing.T) {
//		r := testenv.Rabbit(t)   // shared node, management plugin on
//		url := r.NewVhost(t)     // fresh vhost + user, deleted after the test
//		conn, err := amqp.Dial(url)
//		...
//	}
//
// Tests that stop, restart or kill a node use their own, from
// [RunRabbitMQ] (closed when the test ends) or [StartRabbitMQ]:
//
//	r := testenv.RunRabbitMQ(t, testenv.RabbitOptions{Name: "failover"})
//	r.Kill()                 // crash
//	r.Start(ctx)             // same ports, same data: durable queues survive
//
// [GenerateTLS] makes a CA with server and client certificates; pass them
// as [RabbitOptions].TLS to get an amqps listener ([RabbitMQ.TLSURL]).
//
// # Prosody
//
// [RunProsody] starts an XMPP server with the given virtual hosts,
// components and accounts (about 0.1 s), closed when the test ends:
//
//	p := testenv.RunProsody(t, testenv.ProsodyOptions{
//		VirtualHosts: []string{"site-a.test", "site-b.test"},
//		Components:   map[string]string{"nanite.site-a.test": "s3cret"},
//		Accounts:     []testenv.Account{{User: "alice", Host: "site-a.test", Password: "pw"}},
//	})
//	conn, err := net.Dial("tcp", p.ComponentAddr())
//
// # Federation (s2s)
//
// [RunFederatedProsody] starts several servers that federate over real
// server-to-server connections: each on a loopback address of its own
// (127.0.0.2, 127.0.0.3, ...), with an s2s listener on a private port
// ([Prosody.S2SAddr]), TLS with certificates of one shared CA, and routes to
// each other's domains:
//
//	ps := testenv.RunFederatedProsody(t,
//		testenv.ProsodyOptions{VirtualHosts: []string{"site-a.test"},
//			Components: map[string]string{"nanite.site-a.test": "s3cret"}},
//		testenv.ProsodyOptions{VirtualHosts: []string{"site-b.test"},
//			Components: map[string]string{"nanite.site-b.test": "s3cret"}})
//	// a component of ps[0] sending to app@nanite.site-b.test reaches the
//	// component of ps[1] over s2s; ps[1].S2SLinks() shows the connection.
//
// Name resolution is arranged inside the servers, not on the machine: a
// plugin written to each server's directory replaces prosody's DNS lookup
// of remote servers by static routes ([ProsodyOptions].S2SRoutes,
// [Prosody.AddS2SRoute]); domains without a route are unreachable. Nothing
// outside the servers' directories changes (docs/xmpp.md, "s2s in tests").
//
// # Diagnostics
//
// The helpers print the tail of a server's log when the test using it
// fails; [RabbitMQ.Logs] and [Prosody.Logs] return it at any time. Servers
// get SIGTERM if the test binary dies without closing them (Linux).
package testenv
