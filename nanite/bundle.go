package nanite

// Reply bundles (docs/protocol.md, "Reply bundles"). An agent's delivery
// loop that answers several requests in a row, while more deliveries are
// waiting, sends the answers bound for one reply queue as one AMQP message
// instead of one each, when the requests said their requester reads
// bundles (Packet.Bundles). The broker then routes, queues and delivers one
// message instead of several, and both ends write and parse one set of
// frames: that per-message work, not the bytes, is most of what a small
// answer costs. Nothing waits for a bundle to fill: the loop sends what it
// has before it waits for the next delivery, so a lone request's answer
// leaves as soon as it did before, as a plain message.

import (
	"context"
	"encoding/binary"
	"errors"
	"log/slog"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

const (
	// BundleType is the AMQP type property of a reply bundle.
	BundleType = "nanite.bundle"
	// BundleContentType is its content type.
	BundleContentType = "application/vnd.nanite.bundle"

	// A bundle is sent once it holds this many answers or bytes, without
	// waiting for the loop to run out of deliveries.
	maxBundleParts = 32
	maxBundleBytes = 64 << 10
	// A reader refuses a bundle of more parts than this (a sender's limit
	// is far lower): a reply queue takes messages from anyone in the vhost.
	maxBundlePartsRead = 1024
)

var errBadBundle = errors.New("nanite: malformed reply bundle")

// appendBundlePart appends one answer to a bundle's body: its correlation
// id and its body, each after its length as an unsigned varint.
func appendBundlePart(b []byte, corr string, body []byte) []byte {
	b = binary.AppendUvarint(b, uint64(len(corr)))
	b = append(b, corr...)
	b = binary.AppendUvarint(b, uint64(len(body)))
	return append(b, body...)
}

// nextBundlePart reads the part at the start of b.
func nextBundlePart(b []byte) (corr, body, rest []byte, ok bool) {
	n, k := binary.Uvarint(b)
	if k <= 0 || n > uint64(len(b)-k) {
		return nil, nil, nil, false
	}
	corr, b = b[k:k+int(n)], b[k+int(n):]
	n, k = binary.Uvarint(b)
	if k <= 0 || n > uint64(len(b)-k) {
		return nil, nil, nil, false
	}
	return corr, b[k : k+int(n)], b[k+int(n):], true
}

// splitBundle calls f with each answer of a bundle, in order. A malformed
// bundle is refused whole, before f is called for any of it.
func splitBundle(body []byte, f func(corr string, body []byte)) error {
	n := 0
	for rest := body; len(rest) > 0; n++ {
		var ok bool
		if _, _, rest, ok = nextBundlePart(rest); !ok || n == maxBundlePartsRead {
			return errBadBundle
		}
	}
	if n == 0 {
		return errBadBundle
	}
	for rest := body; len(rest) > 0; {
		corr, part, r, _ := nextBundlePart(rest)
		rest = r
		f(string(corr), part)
	}
	return nil
}

// replyBundler gathers an agent's answers to send them as bundles (see the
// top of the file). An answer joins the loop's (add) only while the Handle
// of its delivery runs in the loop (acker.inLoop), so that the loop, which
// flushes before it waits for the next delivery and when it ends, is sure
// to send it; an answer made later, by a handler that went on in a
// goroutine of its own, goes through sendNow. Either way the delivery is
// acknowledged after its answer is published, as after a plain answer's
// publish.
type replyBundler struct {
	link     *link
	log      *slog.Logger
	fallback time.Duration // how long a flush waits for the connection when an answer has no deadline

	// The answers of the delivery loop. mu is held across a flush's
	// publishes, so that a flush that follows finds the previous one's
	// answers sent.
	mu      sync.Mutex
	parts   []bundledReply
	bytes   int
	scratch sendScratch
	tags    []uint64
	// lastFlush is how many answers the last flush sent.
	lastFlush int

	// The answers made outside the loop (sendNow).
	omu      sync.Mutex
	oparts   []bundledReply
	ospare   []bundledReply
	osending bool // one of the callers is sending; the others leave theirs
	oscratch sendScratch
	otags    []uint64

	bundles, bundled atomic.Int64 // bundles sent, answers sent in them
}

type bundledReply struct {
	key, corr string
	body      []byte
	until     time.Time // wait for a connection until then (zero: fallback)
	acker     *acker
	tag       uint64
}

func newReplyBundler(l *link, log *slog.Logger, fallback time.Duration) *replyBundler {
	return &replyBundler{link: l, log: log, fallback: fallback}
}

// add queues an answer to d, unless d's Handle no longer runs in its
// delivery loop; it reports whether it did. The caller must then leave
// d's acknowledgement to the bundler.
func (b *replyBundler) add(d *delivery, key, corr string, body []byte, until time.Time) bool {
	if b == nil || d.acker == nil {
		return false
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if !d.acker.inLoopNow(d.tag) {
		return false
	}
	b.parts = append(b.parts, bundledReply{key: key, corr: corr, body: body, until: until, acker: d.acker, tag: d.tag})
	b.bytes += len(body)
	return true
}

// burst reports whether answers of the loop wait to be sent and more are
// likely to join them: several wait already, or the last flush sent
// several. A lone answer of a quiet agent does not wait for more.
func (b *replyBundler) burst() bool {
	if b == nil {
		return false
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.parts) > 1 || len(b.parts) == 1 && b.lastFlush > 1
}

// full reports whether the answers waiting should go now.
func (b *replyBundler) full() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.parts) >= maxBundleParts || b.bytes >= maxBundleBytes
}

// flush sends the answers the loop gathered: those for one reply queue as
// a bundle (a lone one as a plain message), then marks their deliveries
// acknowledged. The caller sends the acknowledgements (acker.flush).
func (b *replyBundler) flush() {
	if b == nil {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.parts) == 0 {
		return
	}
	b.send(b.parts, &b.scratch)
	b.tags = ackParts(b.parts, b.tags, false)
	b.lastFlush = len(b.parts)
	clear(b.parts)
	b.parts, b.bytes = b.parts[:0], 0
}

// sendNow sends an answer made outside the delivery loop (a handler that
// runs in a goroutine of its own, as a bridge's proxy does), with the
// others made meanwhile: the first to come sends, and keeps sending what
// the others queue while it does, as bundles; the others return at once.
// It acknowledges d after its answer is published. busy says other
// requests are being handled: their answers may be on their way. It reports
// false, doing nothing, when d's consumer does not bundle answers.
func (b *replyBundler) sendNow(d *delivery, key, corr string, body []byte, until time.Time, busy bool) bool {
	if b == nil || d.acker == nil {
		return false
	}
	b.omu.Lock()
	b.oparts = append(b.oparts, bundledReply{key: key, corr: corr, body: body, until: until, acker: d.acker, tag: d.tag})
	if b.osending {
		b.omu.Unlock()
		return true
	}
	b.osending = true
	if busy {
		// Answers made together (a bridge's proxy wakes the handlers of
		// a batch of results at once) wait in the run queue behind this
		// one: let them queue theirs first. Not when nothing else runs:
		// a quiet agent's answer does not wait.
		b.omu.Unlock()
		runtime.Gosched()
		b.omu.Lock()
	}
	for len(b.oparts) > 0 {
		parts := b.oparts
		b.oparts = b.ospare[:0]
		b.omu.Unlock()
		b.send(parts, &b.oscratch)
		b.otags = ackParts(parts, b.otags, true)
		clear(parts)
		b.omu.Lock()
		b.ospare = parts[:0]
	}
	b.osending = false
	b.omu.Unlock()
	return true
}

// sendScratch is what send reuses from one call to the next.
type sendScratch struct {
	buf   []byte
	taken []bool
}

// send publishes parts: those for one reply queue as a bundle, a lone one
// as a plain message.
func (b *replyBundler) send(parts []bundledReply, s *sendScratch) {
	s.taken = append(s.taken[:0], make([]bool, len(parts))...)
	for i := range parts {
		if s.taken[i] {
			continue
		}
		first := &parts[i]
		m := message{Key: first.key, Body: first.body, CorrelationID: first.corr}
		until, n := first.until, 1
		for j := i + 1; j < len(parts); j++ {
			if parts[j].key == first.key {
				n++
			}
		}
		if n > 1 {
			s.buf = s.buf[:0]
			for j := i; j < len(parts); j++ {
				if p := &parts[j]; !s.taken[j] && p.key == first.key {
					s.taken[j] = true
					s.buf = appendBundlePart(s.buf, p.corr, p.body)
					if p.until.IsZero() || !until.IsZero() && p.until.After(until) {
						until = p.until
					}
				}
			}
			m = message{Key: first.key, Body: s.buf, Type: BundleType, ContentType: BundleContentType}
			b.bundles.Add(1)
			b.bundled.Add(int64(n))
		}
		// amqp091-go has written the body when Publish returns: s.buf can
		// be reused.
		if err := b.link.publishBy(context.Background(), until, b.fallback, m); err != nil {
			b.log.Warn("could not send results", "reply_to", first.key, "results", n, "err", err)
		}
	}
}

// ackParts marks the deliveries of parts acknowledged, sending the
// acknowledgements when flush is set; tags is scratch space, returned for
// reuse.
func ackParts(parts []bundledReply, tags []uint64, flush bool) []uint64 {
	var ack *acker
	tags = tags[:0]
	for i := range parts {
		if ack != nil && parts[i].acker != ack {
			ack.ackAll(tags)
			if flush {
				ack.flush()
			}
			tags = tags[:0]
		}
		ack = parts[i].acker
		tags = append(tags, parts[i].tag)
	}
	if ack != nil {
		ack.ackAll(tags)
		if flush {
			ack.flush()
		}
	}
	return tags[:0]
}
