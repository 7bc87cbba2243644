package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nanite-go/nanite/nanite/provision"
	"github.com/nanite-go/nanite/testenv"
)

// TestTLSSettings: flag > environment > config file, paths in the config
// file relative to it, and the errors a user can make.
func TestTLSSettings(t *testing.T) {
	dir := t.TempDir()
	files, err := testenv.GenerateTLS(dir)
	if err != nil {
		t.Fatal(err)
	}
	other, err := testenv.GenerateTLS(filepath.Join(dir, "other"))
	if err != nil {
		t.Fatal(err)
	}
	conf := writeFile(t, filepath.Join(dir, "config.yaml"), `url: amqps://u:p@rabbit.example:5671/app
tls:
  ca: other/ca.pem
  server_name: from-file
`, 0o600)
	resolve := func(flags, env map[string]string) (*Settings, error) {
		if flags == nil {
			flags = map[string]string{}
		}
		flags["config"] = conf
		return resolveSettings(settingsInput{Flags: flags, ReadFile: os.ReadFile,
			LookupEnv: func(k string) (string, bool) { v, ok := env[k]; return v, ok }})
	}

	s, err := resolve(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if s.TLS.CA != other.CACert || s.TLS.ServerName != "from-file" || s.TLS.Config == nil ||
		s.TLS.Config.ServerName != "from-file" || s.TLS.Config.RootCAs == nil || len(s.TLS.Config.Certificates) != 0 {
		t.Errorf("from the config file: %+v", s.TLS)
	}
	s, err = resolve(nil, map[string]string{envTLSCA: files.CACert, envTLSServerName: "from-env",
		envTLSCert: files.ClientCert, envTLSKey: files.ClientKey})
	if err != nil {
		t.Fatal(err)
	}
	if s.TLS.CA != files.CACert || s.TLS.Config.ServerName != "from-env" || len(s.TLS.Config.Certificates) != 1 {
		t.Errorf("from the environment: %+v", s.TLS)
	}
	s, err = resolve(map[string]string{"tls-ca": files.CACert, "tls-server-name": "from-flag"},
		map[string]string{envTLSCA: other.CACert, envTLSServerName: "from-env"})
	if err != nil {
		t.Fatal(err)
	}
	if s.TLS.CA != files.CACert || s.TLS.Config.ServerName != "from-flag" {
		t.Errorf("from the flags: %+v", s.TLS)
	}
	// Without a server name: the URL's host, set so that the AMQP library
	// does not write it into our configuration.
	s, err = resolveSettings(settingsInput{Flags: map[string]string{"url": "amqps://h.example/", "tls-ca": files.CACert}, ReadFile: os.ReadFile})
	if err != nil || s.TLS.Config.ServerName != "h.example" {
		t.Errorf("default server name: %v %+v", err, s.TLS)
	}
	// An amqps URL with no TLS setting still gets a configuration (system
	// roots), unless the URL carries the library's own parameters.
	s, err = resolveSettings(settingsInput{Flags: map[string]string{"url": "amqps://h.example/"}})
	if err != nil || s.TLS.Config == nil || s.TLS.Config.RootCAs != nil {
		t.Errorf("amqps without settings: %v %+v", err, s.TLS)
	}
	s, err = resolveSettings(settingsInput{Flags: map[string]string{"url": "amqps://h.example/?cacertfile=/x.pem"}})
	if err != nil || s.TLS.Config != nil {
		t.Errorf("amqps with URL parameters: %v %+v", err, s.TLS)
	}

	for name, flags := range map[string]map[string]string{
		"TLS with amqp://":  {"url": "amqp://h/", "tls-ca": files.CACert},
		"cert without key":  {"url": "amqps://h/", "tls-cert": files.ClientCert},
		"missing CA file":   {"url": "amqps://h/", "tls-ca": filepath.Join(dir, "nope.pem")},
		"CA file not PEM":   {"url": "amqps://h/", "tls-ca": conf},
		"key of other cert": {"url": "amqps://h/", "tls-cert": files.ClientCert, "tls-key": other.ClientKey},
	} {
		_, err := resolveSettings(settingsInput{Flags: flags, ReadFile: os.ReadFile})
		if exitCode(err) != exitUsage {
			t.Errorf("%s: %v, want a usage error", name, err)
		}
	}
}

// TestTLSEndToEnd: "nanite vhost create" against a broker with an amqps
// listener prints amqps:// URLs; an agent and a requester use them with
// --tls-ca (or NANITE_TLS_CA, or a config file) and a client certificate;
// a CA that did not sign the broker's certificate is refused at once with
// exit code 6 and a message that says why.
func TestTLSEndToEnd(t *testing.T) {
	dir := t.TempDir()
	files, err := testenv.GenerateTLS(filepath.Join(dir, "pki"))
	if err != nil {
		t.Fatal(err)
	}
	other, err := testenv.GenerateTLS(filepath.Join(dir, "other"))
	if err != nil {
		t.Fatal(err)
	}
	r := testenv.RunRabbitMQ(t, testenv.RabbitOptions{Name: "cli-tls", TLS: files, Management: true})
	base := strings.TrimSuffix(r.TLSURL(), "/") // amqps://guest:guest@127.0.0.1:port/
	base = strings.TrimSuffix(base, "%2F")
	res := runCLI(t.Context(), "", "vhost", "create", "tlsapp", "--url", base+"/", "--tls-ca", files.CACert,
		"--management", r.ManagementURL(), "--json")
	if res.code != 0 {
		t.Fatalf("vhost create: exit %d\n%s%s", res.code, res.out, res.errOut)
	}
	var creds provision.Credentials
	if err := json.Unmarshal([]byte(res.out), &creds); err != nil {
		t.Fatal(err)
	}
	agentURL, mapperURL := creds.User(provision.RoleAgent, "").URL, creds.User(provision.RoleMapper, "").URL
	if !strings.HasPrefix(agentURL, "amqps://") {
		t.Fatalf("agent URL %s", agentURL)
	}
	clientCert := []string{"--tls-cert", files.ClientCert, "--tls-key", files.ClientKey}

	startDaemon(t, append([]string{"agent", "--url", agentURL, "--tls-ca", files.CACert, "--identity", "tls-1",
		"--heartbeat", "500ms", "--shutdown-grace", "1s"}, clientCert...)...)
	startDaemon(t, "mapper", "--url", mapperURL, "--tls-ca", files.CACert)

	// Flags.
	deadline := time.Now().Add(20 * time.Second)
	for {
		res = runCLI(t.Context(), "", append([]string{"request", "--url", mapperURL, "--tls-ca", files.CACert, "/echo/say", "secure"}, clientCert...)...)
		if res.code == 0 || time.Now().After(deadline) {
			break
		}
	}
	if res.code != 0 || res.out != "\"secure\"\n" {
		t.Fatalf("request over amqps: exit %d %q %s", res.code, res.out, res.errOut)
	}
	// The environment.
	f, out, errOut := testFactory("", map[string]string{envURL: mapperURL, envTLSCA: files.CACert})
	if code := execute(t.Context(), f, []string{"request", "/echo/say", "env"}); code != 0 || out.String() != "\"env\"\n" {
		t.Errorf("request with NANITE_TLS_CA: exit %d %q %s", code, out.String(), errOut.String())
	}
	// A config file, its paths relative to it.
	conf := writeFile(t, filepath.Join(dir, "config.yaml"), "url: "+mapperURL+"\ntls:\n  ca: pki/ca.pem\n  cert: pki/client.pem\n  key: pki/client-key.pem\n", 0o600)
	res = runCLI(t.Context(), "", "request", "--config", conf, "/echo/say", "file")
	if res.code != 0 || res.out != "\"file\"\n" {
		t.Errorf("request with the config file: exit %d %q %s", res.code, res.out, res.errOut)
	}

	// The wrong CA: refused at once, saying why.
	for _, cmd := range [][]string{
		{"request", "/echo/say", "x"},
		{"agents"},
		{"agent", "--identity", "tls-2"},
		{"mapper"},
	} {
		start := time.Now()
		res = runCLI(t.Context(), "", append(cmd, "--url", mapperURL, "--tls-ca", other.CACert)...)
		if res.code != exitConnection || !strings.Contains(res.errOut, "certificate signed by unknown authority") {
			t.Errorf("%v with the wrong CA: exit %d: %s", cmd, res.code, res.errOut)
		}
		t.Logf("%v with the wrong CA: exit %d: %s", cmd, res.code, strings.TrimSpace(res.errOut))
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("%v with the wrong CA took %v", cmd, d)
		}
	}
	// A client certificate the broker does not trust.
	res = runCLI(t.Context(), "", "request", "/echo/say", "x", "--url", mapperURL, "--tls-ca", files.CACert,
		"--tls-cert", other.ClientCert, "--tls-key", other.ClientKey)
	t.Logf("untrusted client certificate: exit %d: %s", res.code, strings.TrimSpace(res.errOut))
	if res.code != exitConnection || !strings.Contains(res.errOut, "client certificate") {
		t.Errorf("untrusted client certificate: exit %d: %s", res.code, res.errOut)
	}
	// TLS settings with a plain URL are a usage error.
	res = runCLI(t.Context(), "", "agents", "--url", r.URL(), "--tls-ca", files.CACert)
	if res.code != exitUsage || !strings.Contains(res.errOut, "amqps://") {
		t.Errorf("--tls-ca with amqp://: exit %d: %s", res.code, res.errOut)
	}
}
