package vertebra

import (
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"math"
	"path"
	"slices"
	"strings"
	"sync"
	"time"

	"mellium.im/xmlstream"
	"mellium.im/xmpp/jid"
	"mellium.im/xmpp/mux"
	"mellium.im/xmpp/stanza"
)

// The directory's ops (Herault's).
const (
	OpAdvertise = "/security/advertise"
	OpDiscover  = "/security/discover"
)

// AdvertiseArgs are the arguments of /security/advertise.
type AdvertiseArgs struct {
	// Resources advertised: ops ("/echo/say") and resources
	// ("/cluster/rd00"), each a clean absolute path.
	Resources []string `json:"resources"`
	// TTL in seconds; 0 withdraws Resources (all of the JID's when empty).
	TTL float64 `json:"ttl"`
	// JID advertised, default the caller. A component (a caller without a
	// localpart) may advertise JIDs of its own domain: a bridge for its
	// agents.
	JID string `json:"jid,omitempty"`
}

// DiscoverArgs are the arguments of /security/discover.
type DiscoverArgs struct {
	Op        string   `json:"op,omitempty"`
	Resources []string `json:"resources,omitempty"`
}

// DiscoverResult is the result of /security/discover.
type DiscoverResult struct {
	JIDs []string `json:"jids"`
}

// DirectoryConfig configures a Directory.
type DirectoryConfig struct {
	// MaxTTL caps advertised TTLs. Default 24 h.
	MaxTTL time.Duration
	// MaxResources bounds the resources of one JID (default 1000) and
	// MaxJIDs the JIDs known (default 100000); advertisements past them are
	// refused.
	MaxResources, MaxJIDs int
	// Authorizer, when set, decides who may advertise and discover (op is
	// OpAdvertise or OpDiscover).
	Authorizer Authorizer
	// Now is the clock (tests); default time.Now.
	Now func() time.Time
}

// Directory is Herault's job: agents advertise the ops and resources they
// serve with a TTL; callers discover the JIDs serving an op on resources.
//
// Matching is by path segments. An op is served by a JID that advertised
// it or an ancestor of it ("/echo" serves "/echo/say"). A resource
// matches an advertised one that is the same, an ancestor ("/cluster"
// covers "/cluster/rd00") or a descendant (asking for "/cluster" finds
// the agents of "/cluster/rd00"). Several resources intersect: a JID must
// match all. Entries expire after their TTL; TTL 0 withdraws; a JID that
// goes offline (unavailable presence, see HandlePresence) is forgotten.
//
// A Directory is an OpHandler: serve it on an Endpoint of a client or a
// component (see "nanite directory"), or call its methods directly.
type Directory struct {
	cfg DirectoryConfig

	mu      sync.Mutex
	entries map[string]map[string]time.Time // JID → resource → expiry
}

// NewDirectory returns an empty directory.
func NewDirectory(cfg DirectoryConfig) *Directory {
	if cfg.MaxTTL <= 0 {
		cfg.MaxTTL = 24 * time.Hour
	}
	if cfg.MaxResources <= 0 {
		cfg.MaxResources = 1000
	}
	if cfg.MaxJIDs <= 0 {
		cfg.MaxJIDs = 100000
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Directory{cfg: cfg, entries: map[string]map[string]time.Time{}}
}

// ErrBadResource: a resource is not a clean absolute path.
var ErrBadResource = errors.New("vertebra: resource must be a clean absolute path like /cluster/rd00")

func checkResource(r string) error {
	if !strings.HasPrefix(r, "/") || path.Clean(r) != r || len(r) > 256 {
		return fmt.Errorf("%w: %q", ErrBadResource, r)
	}
	return nil
}

// covers reports whether a is b or an ancestor of b.
func covers(a, b string) bool {
	return a == b || a == "/" || strings.HasPrefix(b, a+"/")
}

// Advertise records that who serves resources for ttl (0 withdraws them,
// or all of who's when resources is empty).
func (d *Directory) Advertise(who jid.JID, resources []string, ttl time.Duration) error {
	for _, r := range resources {
		if err := checkResource(r); err != nil {
			return err
		}
	}
	if ttl < 0 {
		return errors.New("vertebra: negative TTL")
	}
	ttl = min(ttl, d.cfg.MaxTTL)
	now := d.cfg.Now()
	key := who.String()
	d.mu.Lock()
	defer d.mu.Unlock()
	d.sweepLocked(now)
	m := d.entries[key]
	if ttl == 0 {
		if len(resources) == 0 {
			delete(d.entries, key)
			return nil
		}
		for _, r := range resources {
			delete(m, r)
		}
		if len(m) == 0 {
			delete(d.entries, key)
		}
		return nil
	}
	if m == nil {
		if len(d.entries) >= d.cfg.MaxJIDs {
			return fmt.Errorf("vertebra: directory full (%d JIDs)", d.cfg.MaxJIDs)
		}
		m = map[string]time.Time{}
		d.entries[key] = m
	}
	for _, r := range resources {
		if _, ok := m[r]; !ok && len(m) >= d.cfg.MaxResources {
			return fmt.Errorf("vertebra: %s has more than %d resources", key, d.cfg.MaxResources)
		}
		m[r] = now.Add(ttl)
	}
	return nil
}

// Forget withdraws everything who advertised.
func (d *Directory) Forget(who jid.JID) {
	d.mu.Lock()
	delete(d.entries, who.String())
	d.mu.Unlock()
}

func (d *Directory) sweepLocked(now time.Time) {
	for k, m := range d.entries {
		for r, exp := range m {
			if !now.Before(exp) {
				delete(m, r)
			}
		}
		if len(m) == 0 {
			delete(d.entries, k)
		}
	}
}

// Discover returns the JIDs, sorted, that serve op (when not empty) and
// match every resource.
func (d *Directory) Discover(op string, resources []string) ([]jid.JID, error) {
	if op == "" && len(resources) == 0 {
		return nil, errors.New("vertebra: discover needs an op or resources")
	}
	for _, r := range append([]string{op}, resources...) {
		if r == "" {
			continue
		}
		if err := checkResource(r); err != nil {
			return nil, err
		}
	}
	now := d.cfg.Now()
	var out []jid.JID
	d.mu.Lock()
	defer d.mu.Unlock()
	for k, m := range d.entries {
		if matches(m, now, op, resources) {
			if j, err := jid.Parse(k); err == nil {
				out = append(out, j)
			}
		}
	}
	slices.SortFunc(out, func(a, b jid.JID) int { return strings.Compare(a.String(), b.String()) })
	return out, nil
}

func matches(m map[string]time.Time, now time.Time, op string, resources []string) bool {
	live := func(f func(r string) bool) bool {
		for r, exp := range m {
			if now.Before(exp) && f(r) {
				return true
			}
		}
		return false
	}
	if op != "" && !live(func(r string) bool { return covers(r, op) }) {
		return false
	}
	for _, want := range resources {
		if !live(func(r string) bool { return covers(r, want) || covers(want, r) }) {
			return false
		}
	}
	return true
}

// ServeOp implements OpHandler for OpAdvertise and OpDiscover.
func (d *Directory) ServeOp(ctx context.Context, req *Request, w *Reply) error {
	if req.Type != OpAdvertise && req.Type != OpDiscover {
		return w.Nack(ctx, CodeUnknown, fmt.Sprintf("no service %s here", req.Type))
	}
	if d.cfg.Authorizer != nil {
		if err := d.cfg.Authorizer.Authorize(ctx, req.From.String(), "", req.Type); err != nil {
			return w.Nack(ctx, CodeUnauthorized, err.Error())
		}
	}
	bad := func(err error) error { return w.Nack(ctx, CodeBadRequest, err.Error()) }
	switch req.Type {
	case OpAdvertise:
		var a AdvertiseArgs
		if err := strictJSON(req.Payload, &a); err != nil {
			return bad(err)
		}
		who := req.From
		if a.JID != "" {
			j, err := jid.Parse(a.JID)
			if err != nil {
				return bad(err)
			}
			self := j.Equal(req.From)
			component := req.From.Localpart() == "" && req.From.Resourcepart() == "" && j.Domain().Equal(req.From.Domain())
			if !self && !component {
				return w.Nack(ctx, CodeUnauthorized, fmt.Sprintf("%s may not advertise %s", req.From, j))
			}
			who = j
		}
		if a.TTL < 0 || math.IsNaN(a.TTL) || math.IsInf(a.TTL, 0) {
			return bad(errors.New("ttl must be a number of seconds >= 0"))
		}
		ttl := time.Duration(min(a.TTL, d.cfg.MaxTTL.Seconds()) * float64(time.Second))
		if err := d.Advertise(who, a.Resources, ttl); err != nil {
			return bad(err)
		}
		b, _ := json.Marshal(map[string]any{"jid": who.String(), "resources": len(a.Resources), "ttl": ttl.Seconds()})
		if err := w.Data(ctx, b); err != nil {
			return err
		}
	case OpDiscover:
		var a DiscoverArgs
		if err := strictJSON(req.Payload, &a); err != nil {
			return bad(err)
		}
		js, err := d.Discover(a.Op, a.Resources)
		if err != nil {
			return bad(err)
		}
		res := DiscoverResult{JIDs: []string{}}
		for _, j := range js {
			res.JIDs = append(res.JIDs, j.String())
		}
		b, _ := json.Marshal(res)
		if err := w.Data(ctx, b); err != nil {
			return err
		}
	}
	return w.Final(ctx)
}

func strictJSON(p json.RawMessage, v any) error {
	if len(p) == 0 {
		return errors.New("arguments missing")
	}
	dec := json.NewDecoder(strings.NewReader(string(p)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("arguments: %w", err)
	}
	return nil
}

// HandlePresence returns a mux option that forgets a JID when it sends
// unavailable presence (agents send their presence to their directory).
func (d *Directory) HandlePresence() mux.Option {
	return mux.Presence(stanza.UnavailablePresence, xml.Name{}, mux.PresenceHandlerFunc(
		func(p stanza.Presence, _ xmlstream.TokenReadEncoder) error {
			if p.From.String() != "" {
				d.Forget(p.From)
			}
			return nil
		}))
}

// Advertise tells the directory dir that the caller (the endpoint's JID,
// or the one given WithFrom) serves resources for ttl; ttl 0 withdraws
// them.
func Advertise(ctx context.Context, ep *Endpoint, dir jid.JID, resources []string, ttl time.Duration, opts ...CallOption) error {
	b, err := json.Marshal(AdvertiseArgs{Resources: resources, TTL: ttl.Seconds()})
	if err != nil {
		return err
	}
	_, err = ep.Call(ctx, dir, OpAdvertise, b, opts...)
	return err
}

// Discover asks the directory dir for the JIDs that serve op on resources.
func Discover(ctx context.Context, ep *Endpoint, dir jid.JID, op string, resources []string, opts ...CallOption) ([]jid.JID, error) {
	b, err := json.Marshal(DiscoverArgs{Op: op, Resources: resources})
	if err != nil {
		return nil, err
	}
	res, err := ep.Call(ctx, dir, OpDiscover, b, opts...)
	if err != nil {
		return nil, err
	}
	var r DiscoverResult
	if err := json.Unmarshal(res.Value(), &r); err != nil {
		return nil, fmt.Errorf("vertebra: discover: unexpected result %s: %w", res.Value(), err)
	}
	out := make([]jid.JID, 0, len(r.JIDs))
	for _, s := range r.JIDs {
		j, err := jid.Parse(s)
		if err != nil {
			return nil, fmt.Errorf("vertebra: discover: %w", err)
		}
		out = append(out, j)
	}
	return out, nil
}
