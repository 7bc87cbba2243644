// Package testenv starts real, private RabbitMQ and prosody servers for
// tests: each in its own temporary directory, on free ports of 127.0.0.1,
// never on the machine's default ports, and never shared with other test
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
// # Diagnostics
//
// The helpers print the tail of a server's log when the test using it
// fails; [RabbitMQ.Logs] and [Prosody.Logs] return it at any time. Servers
// get SIGTERM if the test binary dies without closing them (Linux).
package testenv
