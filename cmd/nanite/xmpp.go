package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/spf13/pflag"
	"mellium.im/xmpp/jid"

	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/vertebra"
)

// xmppHelp documents the XMPP login flags in --help.
const xmppHelp = `XMPP login (flags, or the environment):
  --jid user@domain/resource     NANITE_XMPP_JID        the account (a component: --component)
  --password-file FILE           NANITE_XMPP_PASSWORD   (the environment holds the password itself)
  --server host:port             NANITE_XMPP_SERVER     default: the JID's domain, port 5222
  --ca-file FILE                 NANITE_XMPP_CA_FILE    CAs for the server's certificate (STARTTLS)
  --allow-plaintext                                     no TLS; refused unless the server is on loopback`

// xmppFlags are the login flags shared by the XMPP commands.
type xmppFlags struct {
	JID            string
	PasswordFile   string
	Server         string
	CAFile         string
	AllowPlaintext bool
	// Component logins (nanite directory).
	Component  string
	SecretFile string
}

func (x *xmppFlags) add(fl *pflag.FlagSet, component bool) {
	fl.StringVar(&x.JID, "jid", "", "XMPP account, user@domain/resource (env NANITE_XMPP_JID)")
	fl.StringVar(&x.PasswordFile, "password-file", "", "file holding the account's password (env NANITE_XMPP_PASSWORD holds the password itself)")
	fl.StringVar(&x.Server, "server", "", "XMPP server host:port (env NANITE_XMPP_SERVER; default the JID's domain, port 5222)")
	fl.StringVar(&x.CAFile, "ca-file", "", "PEM file of the CAs that sign the server's certificate (env NANITE_XMPP_CA_FILE; default the system's)")
	fl.BoolVar(&x.AllowPlaintext, "allow-plaintext", false, "log in without TLS (only to a loopback address; for tests)")
	if component {
		fl.StringVar(&x.Component, "component", "", "run as an external component (XEP-0114) with this domain instead of a client")
		fl.StringVar(&x.SecretFile, "secret-file", "", "file holding the component's secret (env NANITE_XMPP_SECRET holds the secret itself)")
	}
}

// dialConfig resolves the flags (then the environment) into a login.
func (x *xmppFlags) dialConfig(f *Factory) (vertebra.DialConfig, error) {
	env := func(k string) string {
		if f.LookupEnv == nil {
			return ""
		}
		v, _ := f.LookupEnv(k)
		return v
	}
	read := func(file string) (string, error) {
		rf := f.ReadFile
		if rf == nil {
			return "", errors.New("cannot read files")
		}
		b, err := rf(file)
		if err != nil {
			return "", usageErrorf("%v", err)
		}
		return strings.TrimRight(string(b), "\r\n"), nil
	}
	dc := vertebra.DialConfig{Addr: firstNonEmpty(x.Server, env("NANITE_XMPP_SERVER")), AllowPlaintext: x.AllowPlaintext}
	if x.Component != "" {
		j, err := jid.Parse(x.Component)
		if err != nil || j.Localpart() != "" || j.Resourcepart() != "" {
			return dc, usageErrorf("invalid --component %q: want a domain such as directory.example.com", x.Component)
		}
		dc.JID = j
		switch {
		case x.SecretFile != "":
			s, err := read(x.SecretFile)
			if err != nil {
				return dc, err
			}
			dc.Secret = s
		default:
			dc.Secret = env("NANITE_XMPP_SECRET")
		}
		if dc.Secret == "" {
			return dc, usageErrorf("--component needs --secret-file (or NANITE_XMPP_SECRET)")
		}
		if dc.Addr == "" {
			return dc, usageErrorf("--component needs --server, the server's component port")
		}
		return dc, nil
	}
	raw := firstNonEmpty(x.JID, env("NANITE_XMPP_JID"))
	if raw == "" {
		return dc, usageErrorf("no XMPP account: give --jid (or NANITE_XMPP_JID)")
	}
	j, err := jid.Parse(raw)
	if err != nil || j.Localpart() == "" {
		return dc, usageErrorf("invalid --jid %q: want user@domain or user@domain/resource", raw)
	}
	dc.JID = j
	switch {
	case x.PasswordFile != "":
		p, err := read(x.PasswordFile)
		if err != nil {
			return dc, err
		}
		dc.Password = p
	default:
		dc.Password = env("NANITE_XMPP_PASSWORD")
	}
	if dc.Password == "" {
		return dc, usageErrorf("no password for %s: give --password-file (or NANITE_XMPP_PASSWORD)", j)
	}
	if ca := firstNonEmpty(x.CAFile, env("NANITE_XMPP_CA_FILE")); ca != "" {
		tc, err := vertebra.LoadCAFile(ca)
		if err != nil {
			return dc, usageErrorf("%v", err)
		}
		dc.TLSConfig = tc
	}
	return dc, nil
}

// xmppError gives vertebra's errors their exit codes (see exitCode):
// deadline 4, refused or failed op 5, no such JID or none found 3, login
// refused 6.
type xmppError struct {
	err    error
	server string
}

func (e *xmppError) Error() string { return e.err.Error() }
func (e *xmppError) Unwrap() error { return e.err }

func (e *xmppError) Is(target error) bool {
	switch target {
	case nanite.ErrTimeout:
		return errors.Is(e.err, vertebra.ErrDeadline)
	case nanite.ErrRemote:
		return errors.Is(e.err, vertebra.ErrNack) || errors.Is(e.err, vertebra.ErrRemote)
	case nanite.ErrNoAgent:
		return errors.Is(e.err, vertebra.ErrUnavailable) || errors.Is(e.err, vertebra.ErrNoTarget)
	}
	return false
}

// As makes a refused login a *connectionError (exit code 6).
func (e *xmppError) As(target any) bool {
	if ce, ok := target.(**connectionError); ok && (errors.Is(e.err, vertebra.ErrAuth) || errors.Is(e.err, vertebra.ErrPlaintext)) {
		*ce = &connectionError{URL: "xmpp://" + e.server, Err: e.err}
		return true
	}
	return false
}

func wrapXMPP(err error, server string) error {
	if err == nil {
		return nil
	}
	return &xmppError{err: err, server: server}
}

// dispatcherHandler serves a nanite.Dispatcher over XMPP, giving its
// errors their codes.
type dispatcherHandler struct{ *nanite.Dispatcher }

func (d dispatcherHandler) Call(ctx context.Context, service string, payload json.RawMessage, from string,
	emit func(ctx context.Context, key string, data json.RawMessage) error) (json.RawMessage, error) {
	res, err := d.Dispatcher.Call(ctx, service, payload, from, emit)
	var re *nanite.RemoteError
	if errors.As(err, &re) {
		return nil, &vertebra.Error{Code: re.Code, Message: re.Message}
	}
	return res, err
}

// checkResources checks --resource values.
func checkResources(rs []string) error {
	for _, r := range rs {
		if !strings.HasPrefix(r, "/") {
			return usageErrorf("invalid --resource %q: want a path such as /cluster/rd00", r)
		}
	}
	return nil
}

func parseJIDArg(name, s string) (jid.JID, error) {
	j, err := jid.Parse(s)
	if err != nil {
		return jid.JID{}, usageErrorf("invalid %s %q: %v", name, s, err)
	}
	return j, nil
}

func describeServer(dc vertebra.DialConfig) string {
	if dc.Addr != "" {
		return dc.Addr
	}
	return fmt.Sprintf("%s:5222", dc.JID.Domainpart())
}
