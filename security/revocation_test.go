package security

import (
	"os"
	"path/filepath"
	"testing"
)

func TestRevocationListFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "revoked")
	os.WriteFile(path, []byte("# stolen laptop\nname agent-7\nserial 0A:1B:2c  # old cert\n\n"), 0o644)
	l, err := LoadRevocationList(path)
	if err != nil {
		t.Fatal(err)
	}
	if l.Len() != 2 || !l.NameRevoked("agent-7") || l.NameRevoked("agent-8") || !l.SerialRevoked("a1b2c") || !l.SerialRevoked("0a1b2C") || l.SerialRevoked("a1b2d") {
		t.Errorf("list = %+v", l.set.Load())
	}
	for _, bad := range []string{"serial xyz\n", "name\n", "host agent-1\n", "name a b\n"} {
		os.WriteFile(path, []byte(bad), 0o644)
		if err := l.Load(path); err == nil {
			t.Errorf("Load accepted %q", bad)
		}
	}
	if !l.NameRevoked("agent-7") {
		t.Error("a bad file replaced the list")
	}
	var nilList *RevocationList
	if nilList.NameRevoked("x") || nilList.SerialRevoked("1") || nilList.Len() != 0 {
		t.Error("nil list revokes")
	}
}
