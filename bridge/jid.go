package bridge

import (
	"errors"
	"fmt"
	"strings"

	"mellium.im/xmpp/jid"
)

// XEP-0106 (JID Escaping): the ten characters that may not appear in a
// localpart, and their escape sequences.
var escapes = map[byte]string{
	' ':  `\20`,
	'"':  `\22`,
	'&':  `\26`,
	'\'': `\27`,
	'/':  `\2f`,
	':':  `\3a`,
	'<':  `\3c`,
	'>':  `\3e`,
	'@':  `\40`,
	'\\': `\5c`,
}

// unescapes maps the (lower-case) hex pair of an escape sequence to its
// character.
var unescapes = map[string]byte{
	"20": ' ', "22": '"', "26": '&', "27": '\'', "2f": '/',
	"3a": ':', "3c": '<', "3e": '>', "40": '@', "5c": '\\',
}

// isEscapeAt reports whether s[i:] starts with one of the ten escape
// sequences (a backslash and a hex pair, either case).
func isEscapeAt(s string, i int) bool {
	if i+3 > len(s) || s[i] != '\\' {
		return false
	}
	_, ok := unescapes[strings.ToLower(s[i+1:i+3])]
	return ok
}

// EscapeLocalpart escapes s per XEP-0106 so that it can be the localpart of
// a JID: each of space " & ' / : < > @ becomes \XX; a backslash is escaped
// (\5c) only when it starts something that would read as an escape sequence,
// as the XEP requires, so that UnescapeLocalpart gives s back. It refuses an
// empty s and one that starts or ends with a space (the XEP forbids \20 at
// either end).
func EscapeLocalpart(s string) (string, error) {
	if s == "" {
		return "", errors.New("empty localpart")
	}
	if s[0] == ' ' || s[len(s)-1] == ' ' {
		return "", fmt.Errorf("%q: a space may not start or end an escaped localpart (XEP-0106)", s)
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == '\\' {
			if isEscapeAt(s, i) {
				b.WriteString(`\5c`)
			} else {
				b.WriteByte(c)
			}
			continue
		}
		if e, ok := escapes[c]; ok {
			b.WriteString(e)
			continue
		}
		b.WriteByte(c)
	}
	return b.String(), nil
}

// UnescapeLocalpart reverses EscapeLocalpart: each escape sequence \XX of
// XEP-0106 (hex either case) becomes its character, in one left-to-right
// pass; any other backslash is kept.
func UnescapeLocalpart(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if isEscapeAt(s, i) {
			b.WriteByte(unescapes[strings.ToLower(s[i+1:i+3])])
			i += 2
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// ClusterJID returns the JID of the cluster of vhost at the bridge's domain:
// <escaped vhost>@<domain>.
func ClusterJID(vhost, domain string) (jid.JID, error) {
	local, err := EscapeLocalpart(vhost)
	if err != nil {
		return jid.JID{}, fmt.Errorf("vhost %w", err)
	}
	j, err := jid.New(local, domain, "")
	if err != nil {
		return jid.JID{}, fmt.Errorf("cluster JID of vhost %q at %q: %w", vhost, domain, err)
	}
	return j, nil
}

// AgentJID returns the JID of an agent of a cluster: <cluster JID>/<identity>.
func AgentJID(cluster jid.JID, identity string) (jid.JID, error) {
	return cluster.Bare().WithResource(identity)
}

// TargetPrefix starts a Nanite target that names a JID.
const TargetPrefix = "xmpp:"

// ParseTarget parses a Nanite target of the form xmpp:<jid>. ok is false
// (and err nil) when the target does not start with "xmpp:" (it names a
// local agent identity); err says why a target that does is not a JID.
func ParseTarget(target string) (j jid.JID, ok bool, err error) {
	rest, found := strings.CutPrefix(target, TargetPrefix)
	if !found {
		return jid.JID{}, false, nil
	}
	if rest == "" {
		return jid.JID{}, true, fmt.Errorf("target %q: empty JID", target)
	}
	j, err = jid.Parse(rest)
	if err != nil {
		return jid.JID{}, true, fmt.Errorf("target %q: %w", target, err)
	}
	return j, true, nil
}

// FormatTarget returns the Nanite target naming j, xmpp:<jid>.
func FormatTarget(j jid.JID) string { return TargetPrefix + j.String() }
