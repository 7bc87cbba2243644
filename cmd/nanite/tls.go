package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"time"

	"github.com/spf13/pflag"
)

// Environment variables of the TLS settings.
const (
	envTLSCA         = "NANITE_TLS_CA"
	envTLSCert       = "NANITE_TLS_CERT"
	envTLSKey        = "NANITE_TLS_KEY"
	envTLSServerName = "NANITE_TLS_SERVER_NAME"
)

// tlsHelp documents the TLS settings in the root command's --help.
const tlsHelp = `TLS (amqps:// URLs):
  --tls-ca FILE            CA certificates (PEM) to verify the broker's certificate
                           (env NANITE_TLS_CA; default: the system's roots)
  --tls-cert FILE          client certificate (PEM), for brokers that ask for one
  --tls-key FILE           its private key (PEM)
                           (env NANITE_TLS_CERT and NANITE_TLS_KEY)
  --tls-server-name NAME   name the broker's certificate must carry
                           (env NANITE_TLS_SERVER_NAME; default: the URL's host)
  Each is taken from the flag, else the environment, else the config file:

    url: amqps://app.agent:secret@rabbit.example:5671/app
    tls:
      ca: ca.pem             # relative to the config file
      cert: client.pem
      key: client-key.pem
      server_name: rabbit.example

  TLS settings with an amqp:// URL are an error. Without any, an amqps:// URL
  is verified against the system's roots (or the URL's own cacertfile,
  certfile, keyfile and server_name_indication parameters).`

// TLSFileConfig is the tls section of the config file (and the resolved
// TLS settings: file names and the server name).
type TLSFileConfig struct {
	CA         string `json:"ca"`
	Cert       string `json:"cert"`
	Key        string `json:"key"`
	ServerName string `json:"server_name"`
}

func (c TLSFileConfig) empty() bool { return c == TLSFileConfig{} }

// TLSSettings are the resolved TLS settings.
type TLSSettings struct {
	TLSFileConfig
	// Config is given to agents and mappers (AgentConfig.TLS,
	// MapperConfig.TLS); nil for amqp:// URLs, and for amqps:// URLs
	// whose TLS parameters are in the URL's query.
	Config *tls.Config
}

// addTLSFlags adds the TLS flags to the root's persistent flags.
func addTLSFlags(pf *pflag.FlagSet) {
	pf.String("tls-ca", "", "CA certificates (PEM) that sign the broker's certificate, for amqps:// (env NANITE_TLS_CA)")
	pf.String("tls-cert", "", "client certificate (PEM) for amqps:// (env NANITE_TLS_CERT)")
	pf.String("tls-key", "", "private key (PEM) of --tls-cert (env NANITE_TLS_KEY)")
	pf.String("tls-server-name", "", "name the broker's certificate must carry (env NANITE_TLS_SERVER_NAME; default: the URL's host)")
}

// resolveTLS applies flag > environment > config file to the TLS settings
// and builds the TLS configuration for rawURL, reading the files with
// in.ReadFile.
func resolveTLS(in settingsInput, file TLSFileConfig, rawURL string) (TLSSettings, error) {
	env := func(k string) string {
		if in.LookupEnv == nil {
			return ""
		}
		v, _ := in.LookupEnv(k)
		return v
	}
	s := TLSSettings{TLSFileConfig: TLSFileConfig{
		CA:         firstNonEmpty(in.Flags["tls-ca"], env(envTLSCA), file.CA),
		Cert:       firstNonEmpty(in.Flags["tls-cert"], env(envTLSCert), file.Cert),
		Key:        firstNonEmpty(in.Flags["tls-key"], env(envTLSKey), file.Key),
		ServerName: firstNonEmpty(in.Flags["tls-server-name"], env(envTLSServerName), file.ServerName),
	}}
	u, err := url.Parse(rawURL)
	if err != nil {
		return s, usageErrorf("broker URL: %v", err)
	}
	if u.Scheme != "amqps" {
		if !s.empty() {
			return s, usageErrorf("TLS settings (--tls-*, NANITE_TLS_* or the config file's tls section) need an amqps:// broker URL, not %s", redactURL(rawURL))
		}
		return s, nil
	}
	q := u.Query()
	if s.empty() && (q.Has("cacertfile") || q.Has("certfile") || q.Has("keyfile") || q.Has("server_name_indication")) {
		return s, nil // the AMQP library reads them
	}
	s.Config, err = buildTLSConfig(s.TLSFileConfig, u.Hostname(), in.ReadFile)
	return s, err
}

// buildTLSConfig builds a client TLS configuration. The server name is
// always set (to host by default), so that the AMQP library, which fills in
// an empty one, never writes to it.
func buildTLSConfig(c TLSFileConfig, host string, readFile func(string) ([]byte, error)) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: firstNonEmpty(c.ServerName, host)}
	if c.CA != "" {
		pem, err := readFile(c.CA)
		if err != nil {
			return nil, usageErrorf("TLS CA file: %v", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, usageErrorf("TLS CA file %s: no PEM certificate in it", c.CA)
		}
		cfg.RootCAs = pool
	}
	if (c.Cert == "") != (c.Key == "") {
		return nil, usageErrorf("a TLS client certificate needs both --tls-cert and --tls-key")
	}
	if c.Cert != "" {
		certPEM, err := readFile(c.Cert)
		if err != nil {
			return nil, usageErrorf("TLS client certificate: %v", err)
		}
		keyPEM, err := readFile(c.Key)
		if err != nil {
			return nil, usageErrorf("TLS client key: %v", err)
		}
		pair, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			return nil, usageErrorf("TLS client certificate %s and key %s: %v", c.Cert, c.Key, err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return cfg, nil
}

// checkTLS opens one TLS connection to the broker of an amqps:// URL with
// cfg and says at once, as a connectionError, when the broker's certificate
// is not trusted or not for this name, or when the broker refuses the
// client certificate — failures that retrying cannot fix, which the agent
// and mapper would otherwise retry in the background. It returns nil when
// the URL is not amqps, cfg is nil, or nothing answers at the address (a
// daemon waits for the broker; one-shot commands check that separately).
func checkTLS(ctx context.Context, rawURL string, cfg *tls.Config) error {
	u, err := url.Parse(rawURL)
	if err != nil || u.Scheme != "amqps" || cfg == nil {
		return nil
	}
	host, port := u.Hostname(), u.Port()
	if host == "" {
		host = "localhost"
	}
	if port == "" {
		port = "5671"
	}
	addr := net.JoinHostPort(host, port)
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	var d net.Dialer
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil
	}
	defer raw.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = raw.SetDeadline(dl)
	}
	conn := tls.Client(raw, cfg.Clone())
	if err := conn.HandshakeContext(ctx); err != nil {
		return &connectionError{URL: rawURL, Err: fmt.Errorf("TLS handshake with %s: %w", addr, err)}
	}
	// With TLS 1.3 the broker judges the client certificate after the
	// client's side of the handshake: its refusal arrives as an alert on
	// the first read. Say AMQP 0-9-1 and read the start of its answer.
	_, err = conn.Write([]byte("AMQP\x00\x00\x09\x01"))
	if err == nil {
		_, err = conn.Read(make([]byte, 1))
	}
	var ne net.Error
	if err != nil && !(errors.As(err, &ne) && ne.Timeout()) {
		return &connectionError{URL: rawURL, Err: fmt.Errorf(
			"the broker at %s closed the TLS connection after the handshake (does it refuse the client certificate, or want one?): %w", addr, err)}
	}
	return nil
}
