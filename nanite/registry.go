package nanite

import (
	"container/heap"
	"iter"
	"math/rand/v2"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/nanite-go/nanite/security"
)

// AgentState is a mapper's view of one agent.
type AgentState struct {
	Identity   string        `json:"identity"`
	Queue      string        `json:"queue"`
	Services   []ServiceInfo `json:"services"`
	Tags       []string      `json:"tags"`
	Status     float64       `json:"status"`
	InFlight   int           `json:"in_flight"`        // as the agent last reported it
	Pending    int           `json:"mapper_in_flight"` // requests this mapper has outstanding to it
	Version    string        `json:"version,omitempty"`
	LastSeen   time.Time     `json:"last_seen"`
	Registered time.Time     `json:"registered"`
	Heartbeat  time.Duration `json:"heartbeat_interval"`

	sealKey security.SealKey // from its certificate, in secure mode
}

// agentEntry is a registry record. Every field is guarded by the mapper's
// mutex.
type agentEntry struct {
	AgentState
	tags   map[string]struct{}
	idem   map[string]bool
	member map[string]*membership // by service
	heaps  []*membership          // the same, for fix to walk without a map iteration
}

type membership struct {
	list int         // index in serviceSet.list
	heap int         // index in serviceSet.heap
	set  *serviceSet // the service's set, so that fix needs no map lookup
}

// serviceSet holds the agents that offer one service: a slice for random,
// round-robin and fan-out, and a min-heap on score for least-loaded.
type serviceSet struct {
	name   string
	list   []*agentEntry
	heap   loadHeap
	rr     int
	weight float64
}

// loadHeap keeps each item's membership beside it, so that Swap updates
// heap indexes without a map lookup per swap.
type loadHeap struct {
	svc    string
	items  []*agentEntry
	mem    []*membership
	weight float64
}

func (h *loadHeap) Len() int { return len(h.items) }
func (h *loadHeap) Less(i, j int) bool {
	return score(h.items[i], h.weight) < score(h.items[j], h.weight)
}
func (h *loadHeap) Swap(i, j int) {
	h.items[i], h.items[j] = h.items[j], h.items[i]
	h.mem[i], h.mem[j] = h.mem[j], h.mem[i]
	h.mem[i].heap = i
	h.mem[j].heap = j
}
func (h *loadHeap) Push(x any) {
	e := x.(*agentEntry)
	m := e.member[h.svc]
	m.heap = len(h.items)
	h.items = append(h.items, e)
	h.mem = append(h.mem, m)
}
func (h *loadHeap) Pop() any {
	n := len(h.items) - 1
	e := h.items[n]
	h.items[n], h.mem[n] = nil, nil
	h.items, h.mem = h.items[:n], h.mem[:n]
	return e
}

// score is the figure least-loaded selection minimises: the load the agent
// reported plus the requests this mapper has sent it and not yet seen
// answered, so that a burst is spread instead of all going to the agent that
// was least loaded at its last heartbeat.
func score(e *agentEntry, weight float64) float64 {
	return e.Status + weight*float64(e.Pending)
}

// registry is the cluster state a mapper keeps. It is not safe for
// concurrent use; the mapper guards it.
type registry struct {
	agents   map[string]*agentEntry
	services map[string]*serviceSet
	byTag    map[string]map[*agentEntry]struct{} // agents carrying each tag
	weight   float64
}

func newRegistry(weight float64) *registry {
	return &registry{agents: map[string]*agentEntry{}, services: map[string]*serviceSet{},
		byTag: map[string]map[*agentEntry]struct{}{}, weight: weight}
}

// upsert records a registration, replacing what was known of the agent. It
// returns whether the agent was new.
func (r *registry) upsert(s AgentState, now time.Time) bool {
	old, existed := r.agents[s.Identity]
	pending := 0
	if existed {
		pending = old.Pending
		if s.Registered.IsZero() {
			s.Registered = old.Registered
		}
		r.remove(s.Identity)
	}
	s.Pending = pending
	s.LastSeen = now
	if s.Registered.IsZero() {
		s.Registered = now
	}
	e := &agentEntry{AgentState: s, tags: map[string]struct{}{}, idem: map[string]bool{}, member: map[string]*membership{}}
	for _, t := range s.Tags {
		e.tags[t] = struct{}{}
		if r.byTag[t] == nil {
			r.byTag[t] = map[*agentEntry]struct{}{}
		}
		r.byTag[t][e] = struct{}{}
	}
	for _, svc := range s.Services {
		if _, dup := e.member[svc.Name]; dup {
			continue
		}
		e.idem[svc.Name] = svc.Idempotent
		set := r.services[svc.Name]
		if set == nil {
			set = &serviceSet{name: svc.Name, heap: loadHeap{svc: svc.Name, weight: r.weight}}
			r.services[svc.Name] = set
		}
		m := &membership{list: len(set.list), set: set}
		e.member[svc.Name] = m
		e.heaps = append(e.heaps, m)
		set.list = append(set.list, e)
		heap.Push(&set.heap, e)
	}
	r.agents[s.Identity] = e
	return !existed
}

// remove forgets an agent. It returns the removed entry or nil.
func (r *registry) remove(id string) *agentEntry {
	e := r.agents[id]
	if e == nil {
		return nil
	}
	delete(r.agents, id)
	for t := range e.tags {
		delete(r.byTag[t], e)
		if len(r.byTag[t]) == 0 {
			delete(r.byTag, t)
		}
	}
	for svc, m := range e.member {
		set := r.services[svc]
		last := len(set.list) - 1
		if m.list != last {
			moved := set.list[last]
			set.list[m.list] = moved
			moved.member[svc].list = m.list
		}
		set.list[last] = nil
		set.list = set.list[:last]
		heap.Remove(&set.heap, m.heap)
		if len(set.list) == 0 {
			delete(r.services, svc)
		}
	}
	return e
}

// heartbeat updates an agent's status. It returns false for an unknown
// agent (the mapper then asks it to advertise).
func (r *registry) heartbeat(id string, status float64, inflight int, now time.Time) bool {
	e := r.agents[id]
	if e == nil {
		return false
	}
	e.LastSeen = now
	e.InFlight = inflight
	if e.Status != status {
		e.Status = status
		r.fix(e)
	}
	return true
}

// addPending changes the count of this mapper's outstanding requests to an
// agent.
func (r *registry) addPending(id string, delta int) {
	e := r.agents[id]
	if e == nil {
		return
	}
	e.Pending += delta
	if e.Pending < 0 {
		e.Pending = 0
	}
	r.fix(e)
}

func (r *registry) fix(e *agentEntry) {
	for _, m := range e.heaps {
		if len(m.set.heap.items) > 1 { // a heap of one is in order
			heap.Fix(&m.set.heap, m.heap)
		}
	}
}

// expired returns the agents last seen before cutoff, where cutoff depends
// on each agent's own heartbeat interval.
func (r *registry) expired(now time.Time, timeout func(*AgentState) time.Duration) []string {
	var out []string
	for id, e := range r.agents {
		if now.Sub(e.LastSeen) > timeout(&e.AgentState) {
			out = append(out, id)
		}
	}
	return out
}

// selection is the outcome of choosing agents for a request.
type selection struct {
	agents     []*agentEntry
	idempotent bool
}

func (e *agentEntry) hasTags(tags []string, match string) bool {
	if len(tags) == 0 {
		return true
	}
	if match == MatchAny {
		for _, t := range tags {
			if _, ok := e.tags[t]; ok {
				return true
			}
		}
		return false
	}
	for _, t := range tags {
		if _, ok := e.tags[t]; !ok {
			return false
		}
	}
	return true
}

// pick chooses agents for a request. exclude lists agents already tried (for
// retries). Least-loaded without tags is O(1) (heap top); with exclusions or
// tags it scans the agents offering the service.
func (r *registry) pick(service string, o *requestOptions, exclude map[string]bool) []*agentEntry {
	return r.pickInto(nil, service, o, exclude)
}

// pickInto is pick appending to dst (nil when no agent matches).
func (r *registry) pickInto(dst []*agentEntry, service string, o *requestOptions, exclude map[string]bool) []*agentEntry {
	if strings.HasPrefix(o.target, TargetXMPP) {
		// The gateway that reaches the JID (least loaded when several do).
		for _, tag := range gatewayTags(o.target) {
			var best *agentEntry
			for e := range r.byTag[tag] {
				if e.member[service] != nil && !exclude[e.Identity] && (best == nil || score(e, r.weight) < score(best, r.weight)) {
					best = e
				}
			}
			if best != nil {
				return append(dst, best)
			}
		}
		return nil
	}
	if o.target != "" {
		e := r.agents[o.target]
		if e == nil || e.member[service] == nil || exclude[o.target] {
			return nil
		}
		return append(dst, e)
	}
	set := r.services[service]
	if set == nil || len(set.list) == 0 {
		return nil
	}
	filtered := len(o.tags) > 0 || len(exclude) > 0
	if !filtered {
		// The common cases, without closures.
		switch o.selector {
		case SelectRandom:
			return append(dst, set.list[rand.IntN(len(set.list))])
		case SelectLeastLoaded, "":
			return append(dst, set.heap.items[0])
		}
	}
	one, all := r.pickSlow(set, service, *o, exclude)
	if one != nil {
		return append(dst, one)
	}
	if len(all) == 0 {
		return nil
	}
	return append(dst, all...)
}

// pickSlow is pickInto for the selections that filter (tags, exclusions)
// or go round: one agent, or all for SelectAll. It takes the options by
// value and appends to no slice of the caller's, so that the closures and
// iterators here leave the common path's options and buffer on its stack.
func (r *registry) pickSlow(set *serviceSet, service string, o requestOptions, exclude map[string]bool) (one *agentEntry, all []*agentEntry) {
	ok := func(e *agentEntry) bool {
		return e.member[service] != nil && !exclude[e.Identity] && e.hasTags(o.tags, o.tagMatch)
	}
	cands := r.candidates(set, &o)
	switch o.selector {
	case SelectAll:
		for e := range cands {
			if ok(e) {
				all = append(all, e)
			}
		}
		return nil, all
	case SelectRandom:
		var cands2 []*agentEntry
		for e := range cands {
			if ok(e) {
				cands2 = append(cands2, e)
			}
		}
		if len(cands2) == 0 {
			return nil, nil
		}
		return cands2[rand.IntN(len(cands2))], nil
	case SelectRoundRobin:
		n := len(set.list)
		for i := 0; i < n; i++ {
			e := set.list[(set.rr+i)%n]
			if ok(e) {
				set.rr = (set.rr + i + 1) % n
				return e, nil
			}
		}
		return nil, nil
	default: // least loaded
		var best *agentEntry
		for e := range cands {
			if ok(e) && (best == nil || score(e, r.weight) < score(best, r.weight)) {
				best = e
			}
		}
		return best, nil
	}
}

// candidates yields a superset of the agents that can match a request, each
// once: the agents offering the service or, when the request names tags and
// that is smaller, the agents carrying the rarest of its tags (all-match) or
// any of them (any-match). Tag-filtered selection thus costs the size of the
// smallest candidate set, not of the whole service.
func (r *registry) candidates(set *serviceSet, o *requestOptions) iter.Seq[*agentEntry] {
	all := func(yield func(*agentEntry) bool) {
		for _, e := range set.list {
			if !yield(e) {
				return
			}
		}
	}
	if len(o.tags) == 0 {
		return all
	}
	if o.tagMatch == MatchAny {
		total := 0
		for _, t := range o.tags {
			total += len(r.byTag[t])
		}
		if total >= len(set.list) {
			return all
		}
		return func(yield func(*agentEntry) bool) {
			seen := map[*agentEntry]bool{}
			for _, t := range o.tags {
				for e := range r.byTag[t] {
					if seen[e] {
						continue
					}
					seen[e] = true
					if !yield(e) {
						return
					}
				}
			}
		}
	}
	var rarest map[*agentEntry]struct{}
	for i, t := range o.tags {
		if i == 0 || len(r.byTag[t]) < len(rarest) {
			rarest = r.byTag[t]
		}
	}
	if len(rarest) >= len(set.list) {
		return all
	}
	return func(yield func(*agentEntry) bool) {
		for e := range rarest {
			if !yield(e) {
				return
			}
		}
	}
}

// snapshot copies the state of every agent, sorted by identity.
func (r *registry) snapshot() []AgentState {
	out := make([]AgentState, 0, len(r.agents))
	for _, e := range r.agents {
		s := e.AgentState
		s.Services = slices.Clone(s.Services)
		s.Tags = slices.Clone(s.Tags)
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Identity < out[j].Identity })
	return out
}
