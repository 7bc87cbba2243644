package nanite

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
)

var identityRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$`)

// ValidIdentity reports whether s can be an agent or mapper identity: 1 to
// 128 letters, digits, '.', '_', ':' or '-', starting with a letter or digit.
func ValidIdentity(s string) bool { return identityRE.MatchString(s) }

// NewIdentity returns a fresh identity with the given prefix, such as
// "agent-5f0c9a1e2b3d".
func NewIdentity(prefix string) string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return prefix + "-" + hex.EncodeToString(b[:])
}

// LoadIdentity returns the identity stored in dir/identity, creating it with
// a fresh identity when the file does not exist.
func LoadIdentity(dir, prefix string) (string, error) {
	path := filepath.Join(dir, "identity")
	b, err := os.ReadFile(path)
	if err == nil {
		id := strings.TrimSpace(string(b))
		if !ValidIdentity(id) {
			return "", fmt.Errorf("nanite: %s holds an invalid identity %q", path, id)
		}
		return id, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("nanite: read identity: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("nanite: data directory: %w", err)
	}
	id := NewIdentity(prefix)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(id+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("nanite: write identity: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return "", fmt.Errorf("nanite: write identity: %w", err)
	}
	return id, nil
}
