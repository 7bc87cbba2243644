package security

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
)

// RevocationList is a locally configured list of revoked certificate serials
// and identity names. It is safe for concurrent use, and replacing its
// contents takes effect on the next verification (a Verifier checks it on
// every call, also for cached certificates): lookups read an immutable
// snapshot without locking.
//
// The file format (LoadRevocationList) is one entry a line, '#' starts a
// comment:
//
//	# agent-7's laptop was stolen
//	name   agent-7
//	serial 5f3a9c0e...   (hex as printed by "nanite pki show"; colons allowed)
//
// Revoking a name revokes every certificate with that name, including ones
// issued later: issue the replacement under a new name, or remove the name
// once the old certificates have expired.
type RevocationList struct {
	set atomic.Pointer[revSet]
}

type revSet struct {
	serials map[string]struct{}
	names   map[string]struct{}
}

// NewRevocationList returns a list revoking the given serials (hex) and
// names. It panics on an invalid serial: use ParseRevocationList for input
// that is not a constant.
func NewRevocationList(serials, names []string) *RevocationList {
	s, err := newRevSet(serials, names)
	if err != nil {
		panic(err)
	}
	l := &RevocationList{}
	l.set.Store(s)
	return l
}

func newRevSet(serials, names []string) (*revSet, error) {
	s := &revSet{serials: make(map[string]struct{}, len(serials)), names: make(map[string]struct{}, len(names))}
	for _, x := range serials {
		n, ok := normalizeSerial(x)
		if !ok {
			return nil, fmt.Errorf("security: invalid serial %q in revocation list", x)
		}
		s.serials[n] = struct{}{}
	}
	for _, n := range names {
		if n == "" {
			return nil, fmt.Errorf("security: empty name in revocation list")
		}
		s.names[n] = struct{}{}
	}
	return s, nil
}

// normalizeSerial turns "0A:1b:..." or "0x0a1b" into the form of
// big.Int.Text(16): lowercase hex without leading zeros.
func normalizeSerial(s string) (string, bool) {
	s = strings.ToLower(strings.ReplaceAll(strings.TrimSpace(s), ":", ""))
	s = strings.TrimPrefix(s, "0x")
	if s == "" {
		return "", false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return "", false
		}
	}
	s = strings.TrimLeft(s, "0")
	if s == "" {
		s = "0"
	}
	return s, true
}

// ParseRevocationList parses the file format described on RevocationList.
func ParseRevocationList(data []byte) (*RevocationList, error) {
	s, err := parseRevSet(data)
	if err != nil {
		return nil, err
	}
	l := &RevocationList{}
	l.set.Store(s)
	return l, nil
}

func parseRevSet(data []byte) (*revSet, error) {
	var serials, names []string
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(nil, 1<<20)
	for line := 1; sc.Scan(); line++ {
		text := sc.Text()
		if i := strings.IndexByte(text, '#'); i >= 0 {
			text = text[:i]
		}
		f := strings.Fields(text)
		if len(f) == 0 {
			continue
		}
		if len(f) != 2 {
			return nil, fmt.Errorf("security: revocation list line %d: want \"serial HEX\" or \"name NAME\"", line)
		}
		switch f[0] {
		case "serial":
			if _, ok := normalizeSerial(f[1]); !ok {
				return nil, fmt.Errorf("security: revocation list line %d: invalid serial %q", line, f[1])
			}
			serials = append(serials, f[1])
		case "name":
			names = append(names, f[1])
		default:
			return nil, fmt.Errorf("security: revocation list line %d: unknown kind %q (want serial or name)", line, f[0])
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("security: revocation list: %w", err)
	}
	return newRevSet(serials, names)
}

// LoadRevocationList reads a revocation list file.
func LoadRevocationList(path string) (*RevocationList, error) {
	l := &RevocationList{}
	if err := l.Load(path); err != nil {
		return nil, err
	}
	return l, nil
}

// Load replaces the list's contents with those of the file at path. On error
// the old contents stay.
func (l *RevocationList) Load(path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("security: read revocation list: %w", err)
	}
	s, err := parseRevSet(data)
	if err != nil {
		return fmt.Errorf("%w (%s)", err, path)
	}
	l.set.Store(s)
	return nil
}

// Set replaces the list's contents. On error the old contents stay.
func (l *RevocationList) Set(serials, names []string) error {
	s, err := newRevSet(serials, names)
	if err != nil {
		return err
	}
	l.set.Store(s)
	return nil
}

// Len returns the number of revoked serials and names.
func (l *RevocationList) Len() int {
	if l == nil {
		return 0
	}
	s := l.set.Load()
	if s == nil {
		return 0
	}
	return len(s.serials) + len(s.names)
}

// SerialRevoked reports whether the serial (hex, any case, colons allowed) is
// revoked.
func (l *RevocationList) SerialRevoked(serial string) bool {
	n, ok := normalizeSerial(serial)
	return ok && l.serialRevoked(n)
}

func (l *RevocationList) serialRevoked(normalized string) bool {
	if l == nil {
		return false
	}
	s := l.set.Load()
	if s == nil {
		return false
	}
	_, ok := s.serials[normalized]
	return ok
}

// NameRevoked reports whether the name is revoked.
func (l *RevocationList) NameRevoked(name string) bool {
	if l == nil {
		return false
	}
	s := l.set.Load()
	if s == nil {
		return false
	}
	_, ok := s.names[name]
	return ok
}
