package testenv

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// TLSFiles names PEM files: a CA certificate, a server certificate and key
// signed by it, and optionally a client certificate and key signed by it.
type TLSFiles struct {
	CACert string // CA certificate
	Cert   string // server certificate
	Key    string // server private key

	ClientCert string // client certificate (CN "testenv-client"); may be empty
	ClientKey  string // client private key; may be empty
}

// GenerateTLS writes a fresh self-signed CA (ca.pem), a server certificate
// for hosts (server.pem, server-key.pem) and a client certificate with
// common name "testenv-client" (client.pem, client-key.pem) into dir, all
// signed by the CA and valid for a year. Hosts are DNS names or IP
// addresses; without any, the server certificate is for 127.0.0.1, ::1 and
// localhost. Keys are ECDSA P-256, unencrypted.
func GenerateTLS(dir string, hosts ...string) (*TLSFiles, error) {
	if len(hosts) == 0 {
		hosts = []string{"127.0.0.1", "::1", "localhost"}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("testenv: %w", err)
	}
	ca, err := newCA("testenv CA")
	if err != nil {
		return nil, err
	}
	f := &TLSFiles{
		CACert:     filepath.Join(dir, "ca.pem"),
		Cert:       filepath.Join(dir, "server.pem"),
		Key:        filepath.Join(dir, "server-key.pem"),
		ClientCert: filepath.Join(dir, "client.pem"),
		ClientKey:  filepath.Join(dir, "client-key.pem"),
	}
	if err := writePEM(f.CACert, "CERTIFICATE", ca.cert.Raw, 0o644); err != nil {
		return nil, err
	}
	if err := ca.issue(f.Cert, f.Key, hosts[0], hosts, x509.ExtKeyUsageServerAuth); err != nil {
		return nil, err
	}
	if err := ca.issue(f.ClientCert, f.ClientKey, "testenv-client", nil, x509.ExtKeyUsageClientAuth); err != nil {
		return nil, err
	}
	return f, nil
}

// CertPool returns a pool holding the CA certificate.
func (f *TLSFiles) CertPool() (*x509.CertPool, error) {
	data, err := os.ReadFile(f.CACert)
	if err != nil {
		return nil, fmt.Errorf("testenv: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data) {
		return nil, fmt.Errorf("testenv: no certificate in %s", f.CACert)
	}
	return pool, nil
}

// ClientConfig returns a TLS client configuration that trusts the CA and,
// when the files have one, presents the client certificate.
func (f *TLSFiles) ClientConfig() (*tls.Config, error) {
	pool, err := f.CertPool()
	if err != nil {
		return nil, err
	}
	cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	if f.ClientCert != "" {
		pair, err := tls.LoadX509KeyPair(f.ClientCert, f.ClientKey)
		if err != nil {
			return nil, fmt.Errorf("testenv: %w", err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return cfg, nil
}

type certAuthority struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newCA(name string) (*certAuthority, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("testenv: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: name, Organization: []string{"nanite testenv"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("testenv: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("testenv: %w", err)
	}
	return &certAuthority{cert: cert, key: key}, nil
}

// issue writes a certificate for cn and hosts (DNS names or IPs) with the
// given extended usages, and its key (mode 0600, SEC1 "EC PRIVATE KEY", which
// both OpenSSL and Erlang read).
func (ca *certAuthority) issue(certPath, keyPath, cn string, hosts []string, usage ...x509.ExtKeyUsage) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("testenv: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: cn, Organization: []string{"nanite testenv"}},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  usage,
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return fmt.Errorf("testenv: %w", err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return fmt.Errorf("testenv: %w", err)
	}
	return errors.Join(
		writePEM(certPath, "CERTIFICATE", der, 0o644),
		writePEM(keyPath, "EC PRIVATE KEY", keyDER, 0o600),
	)
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	data := pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
	if err := os.WriteFile(path, data, mode); err != nil {
		return fmt.Errorf("testenv: %w", err)
	}
	return nil
}
