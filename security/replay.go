package security

import (
	"hash/maphash"
	"sync"
	"time"
)

// replayCache remembers the (signer, nonce) pairs of accepted envelopes for
// as long as their timestamp is inside the window.
//
// Entries are grouped in buckets by the second of their envelope timestamp.
// A replayed envelope carries the same signed timestamp, so a lookup only
// looks in that one bucket, and a whole bucket is dropped once the newest
// timestamp it can hold is older than the window. There are at most about
// 2*window/1s + 2 buckets.
//
// The key is the 16-byte nonce XORed with a 128-bit keyed hash of the
// signer (two maphash seeds, secret and per cache). A replay carries the same
// signer and nonce, so it always has the same key: detection is exact. Two
// different envelopes share a key only by a 128-bit collision, which nobody
// can aim for without the seeds, so one signer cannot get another's nonces
// rejected. 16-byte keys keep an entry at about 34 bytes of heap (24-byte
// keys cost 76).
type replayCache struct {
	seed1  maphash.Seed
	seed2  maphash.Seed
	max    int
	window int64 // milliseconds

	mu        sync.Mutex
	buckets   map[int64]map[replayKey]struct{} // by timestamp second
	n         int
	lastSweep int64 // milliseconds
}

type replayKey [16]byte

func newReplayCache(max int, window time.Duration) *replayCache {
	return &replayCache{
		seed1:   maphash.MakeSeed(),
		seed2:   maphash.MakeSeed(),
		max:     max,
		window:  window.Milliseconds(),
		buckets: make(map[int64]map[replayKey]struct{}),
	}
}

// add records the pair and returns nil, or returns ErrReplay if it was
// recorded before, or ErrReplayCacheFull if it cannot be recorded. ts and now
// are Unix milliseconds; the caller has checked |now-ts| <= window.
func (c *replayCache) add(signer string, nonce [nonceLen]byte, ts, now int64) error {
	k := replayKey(nonce)
	h1, h2 := maphash.String(c.seed1, signer), maphash.String(c.seed2, signer)
	for i := 0; i < 8; i++ {
		k[i] ^= byte(h1 >> (8 * i))
		k[8+i] ^= byte(h2 >> (8 * i))
	}
	sec := ts / 1000 // ts > 0
	c.mu.Lock()
	defer c.mu.Unlock()
	if now-c.lastSweep >= 1000 || (c.n >= c.max && now != c.lastSweep) {
		c.sweep(now)
	}
	b := c.buckets[sec]
	if _, seen := b[k]; seen {
		return ErrReplay
	}
	if c.n >= c.max {
		return ErrReplayCacheFull
	}
	if b == nil {
		b = make(map[replayKey]struct{})
		c.buckets[sec] = b
	}
	b[k] = struct{}{}
	c.n++
	return nil
}

// sweep drops the buckets whose newest possible timestamp is outside the
// window.
func (c *replayCache) sweep(now int64) {
	c.lastSweep = now
	for sec, b := range c.buckets {
		if sec*1000+999+c.window < now {
			c.n -= len(b)
			delete(c.buckets, sec)
		}
	}
}

func (c *replayCache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}
