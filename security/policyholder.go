package security

import (
	"context"
	"io"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// PolicyHolder holds the current policy of a file and reloads it on demand
// (Reload, e.g. on SIGHUP) or when the file changes (Watch). A file that
// fails to load never replaces a good policy. It is safe for concurrent use.
type PolicyHolder struct {
	path string
	log  *slog.Logger
	cur  atomic.Pointer[Policy]

	mu    sync.Mutex // serialises loads; guards mtime and size
	mtime time.Time
	size  int64
}

// NewPolicyHolder loads the policy at path. logger (nil: discard) receives a
// record for every reload and every rejected file.
func NewPolicyHolder(path string, logger *slog.Logger) (*PolicyHolder, error) {
	if logger == nil {
		logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	h := &PolicyHolder{path: path, log: logger}
	if err := h.Reload(); err != nil {
		return nil, err
	}
	return h, nil
}

// Path returns the policy file's path.
func (h *PolicyHolder) Path() string { return h.path }

// Current returns the policy in force.
func (h *PolicyHolder) Current() *Policy { return h.cur.Load() }

// Decide is Current().Decide.
func (h *PolicyHolder) Decide(caller Caller, service string, agentTags []string) Decision {
	return h.Current().Decide(caller, service, agentTags)
}

// Reload reads the file again. On error it keeps the policy in force and
// returns the error.
func (h *PolicyHolder) Reload() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if fi, err := os.Stat(h.path); err == nil {
		h.mtime, h.size = fi.ModTime(), fi.Size()
	}
	p, err := LoadPolicy(h.path)
	if err != nil {
		if h.cur.Load() != nil {
			h.log.Warn("security: policy not reloaded, keeping the previous one", "path", h.path, "err", err)
		}
		return err
	}
	h.cur.Store(p)
	h.log.Info("security: policy loaded", "path", h.path, "rules", len(p.rules))
	return nil
}

// Watch polls the file's modification time and size every interval (default
// 2 s) and reloads it when they change, until ctx is done; it then returns
// ctx.Err(). Load errors are logged and the previous policy stays.
func (h *PolicyHolder) Watch(ctx context.Context, interval time.Duration) error {
	if interval <= 0 {
		interval = 2 * time.Second
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
		fi, err := os.Stat(h.path)
		if err != nil {
			continue // being replaced, or gone: keep the policy in force
		}
		h.mu.Lock()
		changed := !fi.ModTime().Equal(h.mtime) || fi.Size() != h.size
		h.mu.Unlock()
		if changed {
			_ = h.Reload() // logged by Reload
		}
	}
}
