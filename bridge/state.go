package bridge

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"

	"mellium.im/xmpp/jid"
)

// The bridge's state file (Config.StateFile) keeps what must outlive a
// restart: the presence subscriptions to its cluster JIDs. A component has
// no roster on the server: without it, a plain XMPP client that subscribed
// to a cluster would see its agents' presence no more after a restart until
// it subscribed again (peer bridges do so by themselves).

// stateVersion is the version of the state file's format.
const stateVersion = 1

// stateFile is the file's content.
type stateFile struct {
	Version int `json:"version"`
	// Subscriptions: cluster JID → the bare JIDs subscribed to it.
	Subscriptions map[string][]string `json:"subscriptions"`
}

// loadState reads the subscriptions kept in path: none when the file does
// not exist yet.
func loadState(path string) (map[string][]string, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("bridge: state file: %w", err)
	}
	var st stateFile
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("bridge: state file %s: %w (move it away to start without the subscriptions it keeps)", path, err)
	}
	if st.Version != stateVersion {
		return nil, fmt.Errorf("bridge: state file %s: version %d, this bridge reads version %d", path, st.Version, stateVersion)
	}
	return st.Subscriptions, nil
}

// saveState writes subs to path at once: a new file renamed over the old,
// so that a crash leaves one or the other whole.
func saveState(path string, subs map[string]map[string]bool) error {
	st := stateFile{Version: stateVersion, Subscriptions: map[string][]string{}}
	for c, ss := range subs {
		if len(ss) > 0 {
			st.Subscriptions[c] = slices.Sorted(maps.Keys(ss))
		}
	}
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("bridge: state file: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("bridge: state file: %w", err)
	}
	_, err = tmp.Write(append(b, '\n'))
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		_ = os.Remove(tmp.Name())
		return fmt.Errorf("bridge: state file: %w", err)
	}
	return nil
}

// restoreSubscriptions takes the subscriptions of the state file that still
// hold: to a cluster of this bridge, from a JID it still exports to.
func (b *Bridge) restoreSubscriptions(kept map[string][]string) {
	for cj, subs := range kept {
		j, err := jid.Parse(cj)
		var c *cluster
		if err == nil {
			c = b.byLocal[j.Localpart()]
		}
		if c == nil || !c.jid.Equal(j) {
			b.log.Info("bridge: state file: dropped subscriptions to a cluster JID this bridge no longer has", "cluster", cj, "subscribers", len(subs))
			continue
		}
		for _, s := range subs {
			sj, err := jid.Parse(s)
			if err != nil || !c.exportsTo(sj) {
				b.log.Info("bridge: state file: dropped a subscription its export rules no longer allow", "cluster", cj, "subscriber", s)
				continue
			}
			k := c.jid.String()
			if b.pres.subs[k] == nil {
				b.pres.subs[k] = map[string]bool{}
			}
			b.pres.subs[k][sj.Bare().String()] = true
		}
	}
}

// saveSubscriptions writes the subscriptions to the state file, if there
// is one. Writes are serialised, each with the latest subscriptions.
func (b *Bridge) saveSubscriptions() {
	if b.stateFile == "" {
		return
	}
	b.stateMu.Lock()
	defer b.stateMu.Unlock()
	b.pres.mu.Lock()
	subs := make(map[string]map[string]bool, len(b.pres.subs))
	for c, ss := range b.pres.subs {
		subs[c] = maps.Clone(ss)
	}
	b.pres.mu.Unlock()
	if err := saveState(b.stateFile, subs); err != nil {
		b.log.Error("bridge: could not save the subscriptions; they will be lost at a restart", "err", err)
	}
}
