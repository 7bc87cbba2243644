package testenv

import (
	"crypto/tls"
	"io"
	"net"
	"testing"
)

func TestSanitize(t *testing.T) {
	for in, want := range map[string]string{
		"TestFoo/sub_case#01": "TestFoo-sub_case-01",
		"--x--":               "x",
		"":                    "",
	} {
		if got := sanitize(in, "_-", 40); got != want {
			t.Errorf("sanitize(%q) = %q, want %q", in, got, want)
		}
	}
	if got := sanitize("abcdefghij", "", 4); got != "abcd" {
		t.Errorf("sanitize cut to %q", got)
	}
}

func TestLuaString(t *testing.T) {
	if got, want := luaString("a\"b\\c\nd"), `"a\"b\\c\010d"`; got != want {
		t.Errorf("luaString = %s, want %s", got, want)
	}
}

func TestAMQPURL(t *testing.T) {
	for _, c := range []struct{ vhost, user, pass, want string }{
		{"/", "guest", "guest", "amqp://guest:guest@127.0.0.1:1/%2F"},
		{"a/b c", "u@x", "p:w/", "amqp://u%40x:p%3Aw%2F@127.0.0.1:1/a%2Fb%20c"},
	} {
		if got := amqpURL("amqp", "127.0.0.1:1", c.vhost, c.user, c.pass); got != c.want {
			t.Errorf("amqpURL(%q, %q, %q) = %s, want %s", c.vhost, c.user, c.pass, got, c.want)
		}
	}
}

// TestGenerateTLS checks the generated files with a mutual-TLS handshake.
func TestGenerateTLS(t *testing.T) {
	files, err := GenerateTLS(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	pair, err := tls.LoadX509KeyPair(files.Cert, files.Key)
	if err != nil {
		t.Fatal(err)
	}
	pool, err := files.CertPool()
	if err != nil {
		t.Fatal(err)
	}
	l, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{pair},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	errc := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			errc <- err
			return
		}
		defer c.Close()
		_, err = io.WriteString(c, "ok")
		errc <- err
	}()
	cfg, err := files.ClientConfig()
	if err != nil {
		t.Fatal(err)
	}
	c, err := tls.Dial("tcp", l.Addr().String(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got, err := io.ReadAll(c); err != nil || string(got) != "ok" {
		t.Fatalf("read %q, %v", got, err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if cn := c.ConnectionState().PeerCertificates[0].IPAddresses; len(cn) == 0 || !cn[0].Equal(net.ParseIP("127.0.0.1")) {
		t.Fatalf("server certificate IPs %v", cn)
	}
}
