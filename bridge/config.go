package bridge

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
	"mellium.im/xmpp/jid"

	"github.com/nanite-go/nanite/security"
)

// DefaultHopLimit is the most bridges an op may have crossed before it
// reaches this one.
const DefaultHopLimit = 4

// Config is the bridge's configuration file (YAML; docs/bridge.md has a
// full example). Unknown fields are errors.
type Config struct {
	XMPP     XMPPConfig      `yaml:"xmpp"`
	Clusters []ClusterConfig `yaml:"clusters"`
	// HopLimit: an op that has already crossed this many bridges is
	// refused (default DefaultHopLimit).
	HopLimit int `yaml:"hop_limit"`
	// Trust lists the CAs of peer sites (for signatures; see docs).
	Trust TrustConfig `yaml:"trust"`
	// Policy is a security policy file (docs/security.md) consulted, after
	// the export rules, for every op from XMPP: caller jid:<sender>.
	Policy string `yaml:"policy"`
	// Directory, when set, makes the bridge host the site's directory
	// (vertebra's /security/advertise and /security/discover).
	Directory *DirectoryConfig `yaml:"directory"`
	// Identity is the bridge's certificate (role bridge) and key. With
	// it, the bridge signs the ops it relays out (with the caller's own
	// signed request as origin, from secure clusters) and runs as a
	// mapper in secure clusters.
	Identity *IdentityConfig `yaml:"identity"`
	// StateFile is where the bridge keeps the presence subscriptions to
	// its cluster JIDs across restarts (relative to the config file's
	// directory). Empty: in memory only, and plain XMPP clients must
	// subscribe again after a restart.
	StateFile string `yaml:"state_file"`

	// Dir is the directory of the config file; relative paths are
	// resolved against it.
	Dir string `yaml:"-"`
}

// IdentityConfig names a certificate and its key (nanite pki issue).
type IdentityConfig struct {
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
}

// DirectoryConfig is the site directory the bridge hosts at
// <Localpart>@<domain>.
type DirectoryConfig struct {
	// Localpart of the directory's JID (default "directory"). It must not
	// be a cluster's.
	Localpart string `yaml:"localpart"`
	// Allow lists who may advertise and discover, as export "to" entries
	// (JIDs, *@domain, domain, *).
	Allow []string `yaml:"allow"`
}

// DefaultDirectoryLocalpart is the localpart of the directory's JID.
const DefaultDirectoryLocalpart = "directory"

// XMPPConfig is how the bridge joins the XMPP server: as an external
// component (XEP-0114) at Domain.
type XMPPConfig struct {
	Server     string `yaml:"server"` // host:port of the component listener
	Domain     string `yaml:"domain"` // the bridge's component domain
	Secret     string `yaml:"secret"`
	SecretFile string `yaml:"secret_file"`
}

// ClusterConfig is one cluster: a vhost on a broker, with what it exports
// to XMPP and imports from it.
type ClusterConfig struct {
	// Name identifies the cluster in logs and errors.
	Name string `yaml:"name"`
	// URL of the broker, amqp:// or amqps://, with credentials; its path
	// is the vhost unless Vhost is given.
	URL string `yaml:"url"`
	// Vhost overrides the URL's vhost.
	Vhost string `yaml:"vhost"`
	// PasswordFile, when set, holds the broker password (replacing the
	// URL's).
	PasswordFile string     `yaml:"password_file"`
	TLS          *TLSConfig `yaml:"tls"`
	Exports      []Export   `yaml:"exports"`
	Imports      []Import   `yaml:"imports"`
	// Secure: the cluster runs in secure mode (docs/security.md). The
	// bridge's mapper signs as identity and verifies with trust.ca_files
	// (which must hold the cluster's CA); ops carrying a caller's origin
	// are relayed on that caller's behalf; proxy agents need their own
	// certificate (imports[].identity).
	Secure bool `yaml:"secure"`
}

// TLSConfig configures amqps:// connections to a broker.
type TLSConfig struct {
	CAFile     string `yaml:"ca_file"`
	CertFile   string `yaml:"cert_file"`
	KeyFile    string `yaml:"key_file"`
	ServerName string `yaml:"server_name"`
}

// Export makes services of a cluster callable by XMPP peers.
type Export struct {
	// Services are globs ("/echo/*", "/ops/restart", "*" for all) matched
	// with path.Match: "*" in a glob stays inside one path segment.
	Services []string `yaml:"services"`
	// To are the peers allowed: "*" (anyone), "*@domain" or "domain" (any
	// JID of that domain, the domain itself included), a bare JID (any of
	// its resources), a full JID, or "cert:NAME" (a signer's certificate
	// name, matched when the op carries a signature that a CA of
	// trust.ca_files vouches for).
	To []string `yaml:"to"`
	// RequireSignature: the export covers only ops with a valid signature
	// (trust.ca_files must be set).
	RequireSignature bool `yaml:"require_signature"`
}

// Import makes services of a remote cluster callable from a local one: the
// bridge runs in the local vhost a proxy agent for the remote cluster JID
// From, offering the services of From (as its disco#info lists them to this
// bridge) that match the globs.
type Import struct {
	// From is a cluster JID (localpart@domain: a remote cluster, or a
	// cluster of this bridge) or an XMPP agent's full JID
	// (localpart@domain/resource).
	From     string   `yaml:"from"`
	Services []string `yaml:"services"`
	// AsTags are extra tags of the proxy agent (it always carries
	// "nanite:proxy" and "remote:<domain>").
	AsTags []string `yaml:"as_tags"`
	// Identity is the proxy agent's certificate in a secure cluster: its
	// name must be the proxy's identity (bridge.ProxyIdentity, printed
	// by "nanite bridge --check"), its role agent.
	Identity *IdentityConfig `yaml:"identity"`
}

// roots returns a pool of the trusted CAs (nil when none).
func (c *Config) roots() (*x509.CertPool, error) {
	if len(c.Trust.CAFiles) == 0 {
		return nil, nil
	}
	pool := x509.NewCertPool()
	for _, f := range c.Trust.CAFiles {
		certs, err := security.LoadCertificates(c.Path(f))
		if err != nil {
			return nil, err
		}
		for _, cert := range certs {
			pool.AddCert(cert)
		}
	}
	return pool, nil
}

// TrustConfig lists the CAs of peer sites.
type TrustConfig struct {
	CAFiles []string `yaml:"ca_files"`
}

// ConfigError is a problem of the config file, with where it is.
type ConfigError struct {
	File  string
	Line  int    // 0 when unknown
	Field string // e.g. clusters[0].exports[1].to[2]
	Msg   string
}

func (e *ConfigError) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		b.WriteString(":" + strconv.Itoa(e.Line))
	}
	if e.Field != "" {
		b.WriteString(": " + e.Field)
	}
	b.WriteString(": " + e.Msg)
	return b.String()
}

// LoadConfig reads and validates a config file. The error lists every
// problem found, each a *ConfigError naming its line and field.
func LoadConfig(file string) (*Config, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	return ParseConfig(file, data)
}

// ParseConfig parses and validates a config; name is used in errors and
// its directory resolves relative paths.
func ParseConfig(name string, data []byte) (*Config, error) {
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, &ConfigError{File: name, Msg: strings.TrimPrefix(err.Error(), "yaml: ")}
	}
	var cfg Config
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil {
		var te *yaml.TypeError
		if errors.As(err, &te) {
			var errs []error
			for _, m := range te.Errors {
				errs = append(errs, typeError(name, m))
			}
			return nil, errors.Join(errs...)
		}
		return nil, &ConfigError{File: name, Msg: strings.TrimPrefix(err.Error(), "yaml: ")}
	}
	cfg.Dir = filepath.Dir(name)
	v := &validator{file: name, root: &root}
	cfg.validate(v)
	if len(v.errs) > 0 {
		return nil, errors.Join(v.errs...)
	}
	return &cfg, nil
}

// typeError turns a yaml.v3 message "line N: ..." into a ConfigError.
func typeError(file, msg string) error {
	if rest, ok := strings.CutPrefix(msg, "line "); ok {
		if n, tail, ok := strings.Cut(rest, ": "); ok {
			if line, err := strconv.Atoi(n); err == nil {
				return &ConfigError{File: file, Line: line, Msg: tail}
			}
		}
	}
	return &ConfigError{File: file, Msg: msg}
}

type validator struct {
	file string
	root *yaml.Node
	errs []error
}

// errorf records a problem at the field path (keys and indices).
func (v *validator) errorf(p []any, format string, args ...any) {
	v.errs = append(v.errs, &ConfigError{File: v.file, Line: v.line(p), Field: fieldName(p), Msg: fmt.Sprintf(format, args...)})
}

func fieldName(p []any) string {
	var b strings.Builder
	for _, e := range p {
		switch e := e.(type) {
		case string:
			if b.Len() > 0 {
				b.WriteByte('.')
			}
			b.WriteString(e)
		case int:
			fmt.Fprintf(&b, "[%d]", e)
		}
	}
	return b.String()
}

// line finds the line of the field at p, or of its nearest present parent.
func (v *validator) line(p []any) int {
	n := v.root
	if n == nil || len(n.Content) == 0 {
		return 0
	}
	n = n.Content[0]
	line := n.Line
	for _, e := range p {
		var next *yaml.Node
		switch e := e.(type) {
		case string:
			if n.Kind == yaml.MappingNode {
				for i := 0; i+1 < len(n.Content); i += 2 {
					if n.Content[i].Value == e {
						next = n.Content[i+1]
						line = n.Content[i].Line
						break
					}
				}
			}
		case int:
			if n.Kind == yaml.SequenceNode && e < len(n.Content) {
				next = n.Content[e]
				line = next.Line
			}
		}
		if next == nil {
			return line
		}
		n = next
	}
	return line
}

func at(p []any, more ...any) []any {
	return append(append([]any(nil), p...), more...)
}

// Path resolves a path of the config against its directory.
func (c *Config) Path(p string) string {
	if p == "" || filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(c.Dir, p)
}

func (c *Config) validate(v *validator) {
	x := []any{"xmpp"}
	if c.XMPP.Server == "" {
		v.errorf(at(x, "server"), "required (host:port of the server's component listener)")
	} else if _, _, err := net.SplitHostPort(c.XMPP.Server); err != nil {
		v.errorf(at(x, "server"), "%q is not host:port", c.XMPP.Server)
	}
	if c.XMPP.Domain == "" {
		v.errorf(at(x, "domain"), "required (the bridge's component domain)")
	} else if j, err := jid.Parse(c.XMPP.Domain); err != nil || j.Localpart() != "" || j.Resourcepart() != "" {
		v.errorf(at(x, "domain"), "%q is not a domain", c.XMPP.Domain)
	}
	switch {
	case c.XMPP.Secret != "" && c.XMPP.SecretFile != "":
		v.errorf(at(x, "secret_file"), "give secret or secret_file, not both")
	case c.XMPP.Secret == "" && c.XMPP.SecretFile == "":
		v.errorf(x, "secret or secret_file is required")
	case c.XMPP.SecretFile != "":
		if _, err := os.ReadFile(c.Path(c.XMPP.SecretFile)); err != nil {
			v.errorf(at(x, "secret_file"), "%v", err)
		}
	}
	if c.HopLimit == 0 {
		c.HopLimit = DefaultHopLimit
	} else if c.HopLimit < 1 || c.HopLimit > 32 {
		v.errorf([]any{"hop_limit"}, "%d is out of range 1..32", c.HopLimit)
	}
	for i, f := range c.Trust.CAFiles {
		if _, err := security.LoadCertificates(c.Path(f)); err != nil {
			v.errorf([]any{"trust", "ca_files", i}, "%v", err)
		}
	}
	if c.Policy != "" {
		if _, err := security.LoadPolicy(c.Path(c.Policy)); err != nil {
			v.errorf([]any{"policy"}, "%v", err)
		}
	}
	if len(c.Clusters) == 0 {
		v.errorf([]any{"clusters"}, "at least one cluster is required")
	}
	names := map[string]int{}
	jids := map[string]int{}
	for i := range c.Clusters {
		cl := &c.Clusters[i]
		p := []any{"clusters", i}
		if cl.Name == "" {
			v.errorf(at(p, "name"), "required")
		} else if j, ok := names[cl.Name]; ok {
			v.errorf(at(p, "name"), "%q is also the name of clusters[%d]", cl.Name, j)
		} else {
			names[cl.Name] = i
		}
		cl.validate(c, v, p)
		if c.XMPP.Domain != "" && cl.Vhost != "" {
			if j, err := ClusterJID(cl.Vhost, c.XMPP.Domain); err != nil {
				v.errorf(at(p, "vhost"), "%v", err)
			} else if k, ok := jids[j.String()]; ok {
				v.errorf(at(p, "vhost"), "cluster JID %s is also that of clusters[%d] (localparts are case-folded)", j, k)
			} else {
				jids[j.String()] = i
			}
		}
	}
	if id := c.Identity; id != nil {
		c.checkIdentity(v, []any{"identity"}, id)
	}
	if c.StateFile != "" {
		if st, err := os.Stat(filepath.Dir(c.Path(c.StateFile))); err != nil {
			v.errorf([]any{"state_file"}, "its directory: %v", err)
		} else if !st.IsDir() {
			v.errorf([]any{"state_file"}, "the directory of %q is not a directory", c.StateFile)
		} else if st, err := os.Stat(c.Path(c.StateFile)); err == nil && st.IsDir() {
			v.errorf([]any{"state_file"}, "%q is a directory", c.StateFile)
		}
	}
	if d := c.Directory; d != nil {
		dp := []any{"directory"}
		if d.Localpart == "" {
			d.Localpart = DefaultDirectoryLocalpart
		}
		if j, err := jid.New(d.Localpart, "example.org", ""); err != nil || j.Localpart() != d.Localpart {
			v.errorf(at(dp, "localpart"), "%q is not a JID localpart", d.Localpart)
		} else if c.XMPP.Domain != "" {
			if dj, err := jid.New(d.Localpart, c.XMPP.Domain, ""); err == nil {
				if k, ok := jids[dj.String()]; ok {
					v.errorf(at(dp, "localpart"), "%s is also the JID of clusters[%d]", dj, k)
				}
			}
		}
		if len(d.Allow) == 0 {
			v.errorf(at(dp, "allow"), "at least one entry is required (who may advertise and discover)")
		}
		for k, a := range d.Allow {
			if _, err := parsePeer(a); err != nil {
				v.errorf(at(dp, "allow", k), "%v", err)
			} else if strings.HasPrefix(a, "cert:") {
				v.errorf(at(dp, "allow", k), "cert: entries are not supported here (directory ops are not checked for signatures)")
			}
		}
	}
	// Imports from a cluster of this bridge (a local relay between vhosts):
	// the cluster must exist and not be the importer itself. Its exports
	// must list the importer too (checked on every request).
	for i := range c.Clusters {
		for k, im := range c.Clusters[i].Imports {
			j, err := jid.Parse(im.From)
			if err != nil || c.XMPP.Domain == "" || !strings.EqualFold(j.Domainpart(), c.XMPP.Domain) {
				continue
			}
			ip := at([]any{"clusters", i}, "imports", k, "from")
			own, ok := jids[j.Bare().String()]
			switch {
			case j.Resourcepart() != "":
				v.errorf(ip, "%q: a local cluster is imported by its cluster JID, without a resource", im.From)
			case !ok:
				v.errorf(ip, "%q is on this bridge's domain but is no cluster of it", im.From)
			case own == i:
				v.errorf(ip, "a cluster cannot import itself")
			}
		}
	}
}

func (cl *ClusterConfig) validate(c *Config, v *validator, p []any) {
	if cl.URL == "" {
		v.errorf(at(p, "url"), "required (amqp://user:pass@host:port/vhost)")
	} else if u, err := url.Parse(cl.URL); err != nil || (u.Scheme != "amqp" && u.Scheme != "amqps") || u.Host == "" {
		v.errorf(at(p, "url"), "not an amqp:// or amqps:// URL")
	} else {
		vh := "/"
		if u.Path != "" {
			vh = strings.TrimPrefix(u.Path, "/")
		}
		if cl.Vhost == "" {
			cl.Vhost = vh
		} else if u.Path != "" && u.Path != "/" && vh != cl.Vhost {
			v.errorf(at(p, "vhost"), "%q differs from the URL's vhost %q", cl.Vhost, vh)
		}
		if cl.TLS != nil && u.Scheme != "amqps" {
			v.errorf(at(p, "tls"), "given for a URL that is not amqps://")
		}
	}
	if cl.PasswordFile != "" {
		if _, err := os.ReadFile(c.Path(cl.PasswordFile)); err != nil {
			v.errorf(at(p, "password_file"), "%v", err)
		}
	}
	if cl.TLS != nil {
		if _, err := cl.tlsConfig(c); err != nil {
			v.errorf(at(p, "tls"), "%v", err)
		}
	}
	for i, e := range cl.Exports {
		ep := at(p, "exports", i)
		if len(e.Services) == 0 {
			v.errorf(at(ep, "services"), "at least one service glob is required")
		}
		for k, s := range e.Services {
			if err := checkGlob(s); err != nil {
				v.errorf(at(ep, "services", k), "%v", err)
			}
		}
		if len(e.To) == 0 {
			v.errorf(at(ep, "to"), "at least one peer is required (\"*\" for anyone)")
		}
		for k, s := range e.To {
			p, err := parsePeer(s)
			if err != nil {
				v.errorf(at(ep, "to", k), "%v", err)
			} else if p.cert != "" && len(c.Trust.CAFiles) == 0 {
				v.errorf(at(ep, "to", k), "%q needs trust.ca_files to verify signatures", s)
			}
		}
		if e.RequireSignature && len(c.Trust.CAFiles) == 0 {
			v.errorf(at(ep, "require_signature"), "needs trust.ca_files to verify signatures")
		}
	}
	if cl.Secure {
		if c.Identity == nil {
			v.errorf(at(p, "secure"), "needs the bridge's identity (identity.cert_file, identity.key_file)")
		}
		if len(c.Trust.CAFiles) == 0 {
			v.errorf(at(p, "secure"), "needs trust.ca_files (with the cluster's CA)")
		}
	}
	for i, im := range cl.Imports {
		ip := at(p, "imports", i)
		switch {
		case im.Identity != nil && !cl.Secure:
			v.errorf(at(ip, "identity"), "only for a cluster in secure mode")
		case im.Identity == nil && cl.Secure:
			v.errorf(at(ip, "identity"), "required in a secure cluster: the proxy agent's certificate")
		case im.Identity != nil:
			c.checkIdentity(v, at(ip, "identity"), im.Identity)
			if j, err := jid.Parse(im.From); err == nil && im.Identity.CertFile != "" {
				if id, err := security.LoadIdentity(c.Path(im.Identity.CertFile), c.Path(im.Identity.KeyFile)); err == nil && id.Name != ProxyIdentity(j) {
					v.errorf(at(ip, "identity"), "the certificate is for %q; the proxy agent's identity is %q", id.Name, ProxyIdentity(j))
				}
			}
		}
		if im.From == "" {
			v.errorf(at(ip, "from"), "required (a cluster JID or a domain)")
		} else if j, err := jid.Parse(im.From); err != nil {
			v.errorf(at(ip, "from"), "%q: %v", im.From, err)
		} else if j.Localpart() == "" {
			v.errorf(at(ip, "from"), "%q is not a cluster JID (localpart@domain) or an XMPP agent's JID (localpart@domain/resource)", im.From)
		}
		for k, tg := range im.AsTags {
			if strings.TrimSpace(tg) == "" {
				v.errorf(at(ip, "as_tags", k), "empty tag")
			}
		}
		if len(im.Services) == 0 {
			v.errorf(at(ip, "services"), "at least one service glob is required")
		}
		for k, s := range im.Services {
			if err := checkGlob(s); err != nil {
				v.errorf(at(ip, "services", k), "%v", err)
			}
		}
	}
}

// checkIdentity checks that both files of an identity are given and load.
func (c *Config) checkIdentity(v *validator, p []any, id *IdentityConfig) {
	switch {
	case id.CertFile == "":
		v.errorf(at(p, "cert_file"), "required")
	case id.KeyFile == "":
		v.errorf(at(p, "key_file"), "required")
	default:
		if _, err := security.LoadIdentity(c.Path(id.CertFile), c.Path(id.KeyFile)); err != nil {
			v.errorf(p, "%v", err)
		}
	}
}

// brokerURL is the URL with the configured vhost and password.
func (cl *ClusterConfig) brokerURL(c *Config) (string, error) {
	u, err := url.Parse(cl.URL)
	if err != nil {
		return "", err
	}
	if cl.PasswordFile != "" {
		pw, err := os.ReadFile(c.Path(cl.PasswordFile))
		if err != nil {
			return "", err
		}
		user := ""
		if u.User != nil {
			user = u.User.Username()
		}
		u.User = url.UserPassword(user, strings.TrimSpace(string(pw)))
	}
	u.Path = "/" + cl.Vhost
	u.RawPath = "/" + url.PathEscape(cl.Vhost)
	return u.String(), nil
}

func (cl *ClusterConfig) tlsConfig(c *Config) (*tls.Config, error) {
	if cl.TLS == nil {
		return nil, nil
	}
	tc := &tls.Config{ServerName: cl.TLS.ServerName, MinVersion: tls.VersionTLS12}
	if cl.TLS.CAFile != "" {
		pem, err := os.ReadFile(c.Path(cl.TLS.CAFile))
		if err != nil {
			return nil, err
		}
		tc.RootCAs = x509.NewCertPool()
		if !tc.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("ca_file %s: no PEM certificate", cl.TLS.CAFile)
		}
	}
	if (cl.TLS.CertFile == "") != (cl.TLS.KeyFile == "") {
		return nil, errors.New("cert_file and key_file go together")
	}
	if cl.TLS.CertFile != "" {
		kp, err := tls.LoadX509KeyPair(c.Path(cl.TLS.CertFile), c.Path(cl.TLS.KeyFile))
		if err != nil {
			return nil, err
		}
		tc.Certificates = []tls.Certificate{kp}
	}
	return tc, nil
}

// checkGlob checks a service glob: "*", or an absolute path pattern.
func checkGlob(g string) error {
	if g == "*" {
		return nil
	}
	if !strings.HasPrefix(g, "/") {
		return fmt.Errorf("service glob %q must start with / (or be \"*\")", g)
	}
	if _, err := path.Match(g, ""); err != nil {
		return fmt.Errorf("service glob %q: %v", g, err)
	}
	return nil
}

// matchService reports whether service matches glob.
func matchService(glob, service string) bool {
	if glob == "*" {
		return true
	}
	ok, _ := path.Match(glob, service)
	return ok
}

// peer is a parsed entry of Export.To.
type peer struct {
	any    bool
	domain string // any JID of the domain
	bare   string // any resource of this bare JID
	full   string // exactly this JID
	cert   string // a signer's certificate name
}

func parsePeer(s string) (peer, error) {
	switch {
	case s == "*":
		return peer{any: true}, nil
	case strings.HasPrefix(s, "cert:"):
		name := strings.TrimPrefix(s, "cert:")
		if !security.ValidName(name) {
			return peer{}, fmt.Errorf("%q: not a valid certificate name", s)
		}
		return peer{cert: name}, nil
	case strings.HasPrefix(s, "*@"):
		j, err := jid.Parse(s[2:])
		if err != nil || j.Localpart() != "" || j.Resourcepart() != "" {
			return peer{}, fmt.Errorf("%q: not *@domain", s)
		}
		return peer{domain: j.Domainpart()}, nil
	}
	j, err := jid.Parse(s)
	if err != nil {
		return peer{}, fmt.Errorf("%q: not a JID, domain, \"*\" or cert:NAME: %v", s, err)
	}
	switch {
	case j.Localpart() == "" && j.Resourcepart() == "":
		return peer{domain: j.Domainpart()}, nil
	case j.Resourcepart() == "":
		return peer{bare: j.String()}, nil
	default:
		return peer{full: j.String()}, nil
	}
}

// matches reports whether the sender from (as its server authenticated it)
// or the verified signer's certificate name signer is this peer.
func (p peer) matches(from jid.JID, signer string) bool {
	if p.cert != "" {
		return signer != "" && signer == p.cert
	}
	switch {
	case p.any:
		return true
	case p.domain != "":
		return from.Domainpart() == p.domain
	case p.bare != "":
		return from.Bare().String() == p.bare
	case p.full != "":
		return from.String() == p.full
	}
	return false
}
