package nanite

import (
	"fmt"
	"testing"
	"time"
)

func regWith(n int) *registry {
	r := newRegistry(1)
	for i := range n {
		r.upsert(AgentState{Identity: fmt.Sprintf("a%d", i), Services: []ServiceInfo{{Name: "/s/x"}, {Name: "/s/y", Idempotent: true}},
			Tags: []string{fmt.Sprintf("g%d", i%2)}, Status: float64(n - i)}, time.Now())
	}
	return r
}

func TestLeastLoadedUsesStatusAndPending(t *testing.T) {
	r := regWith(4) // a3 has the lowest status (1)
	o := requestOptions{selector: SelectLeastLoaded, tagMatch: MatchAll}
	if got := r.pick("/s/x", &o, nil)[0].Identity; got != "a3" {
		t.Fatalf("least loaded picked %s", got)
	}
	r.addPending("a3", 2) // score 3, a2 has status 2
	if got := r.pick("/s/x", &o, nil)[0].Identity; got != "a2" {
		t.Fatalf("with a3 busy picked %s", got)
	}
	r.heartbeat("a0", 0, 0, time.Now())
	if got := r.pick("/s/y", &o, nil)[0].Identity; got != "a0" {
		t.Fatalf("after heartbeat picked %s", got)
	}
	// Exclusions (retries) and tags scan the candidates.
	if got := r.pick("/s/y", &o, map[string]bool{"a0": true})[0].Identity; got != "a2" {
		t.Fatalf("excluding a0 picked %s", got)
	}
	o.tags = []string{"g1"}
	if got := r.pick("/s/y", &o, nil)[0].Identity; got != "a1" && got != "a3" {
		t.Fatalf("tag g1 picked %s", got)
	}
}

func TestRegistryRemoveKeepsIndexesConsistent(t *testing.T) {
	r := regWith(50)
	for i := 0; i < 50; i += 3 {
		r.remove(fmt.Sprintf("a%d", i))
	}
	o := requestOptions{selector: SelectAll, tagMatch: MatchAll}
	if got := len(r.pick("/s/x", &o, nil)); got != 33 {
		t.Fatalf("all after removals: %d", got)
	}
	for svc, set := range r.services {
		for i, e := range set.list {
			if e.member[svc].list != i {
				t.Fatalf("list index of %s broken", e.Identity)
			}
		}
		for i, e := range set.heap.items {
			if e.member[svc].heap != i {
				t.Fatalf("heap index of %s broken", e.Identity)
			}
		}
		// heap property
		for i := 1; i < len(set.heap.items); i++ {
			if set.heap.Less(i, (i-1)/2) {
				t.Fatalf("heap property broken at %d", i)
			}
		}
	}
	// Re-registering replaces the services and keeps the pending count.
	r.addPending("a1", 5)
	r.upsert(AgentState{Identity: "a1", Services: []ServiceInfo{{Name: "/other/z"}}}, time.Now())
	if r.agents["a1"].Pending != 5 || r.agents["a1"].member["/s/x"] != nil {
		t.Fatalf("re-register: %+v", r.agents["a1"].AgentState)
	}
	for _, id := range []string{"a1"} {
		r.remove(id)
	}
	if _, ok := r.services["/other/z"]; ok {
		t.Fatal("empty service set kept")
	}
}

func TestRoundRobinAndExpiry(t *testing.T) {
	r := regWith(3)
	o := requestOptions{selector: SelectRoundRobin, tagMatch: MatchAll}
	seen := map[string]int{}
	for range 9 {
		seen[r.pick("/s/x", &o, nil)[0].Identity]++
	}
	if len(seen) != 3 || seen["a0"] != 3 {
		t.Fatalf("rr: %v", seen)
	}
	now := time.Now()
	r.agents["a1"].LastSeen = now.Add(-time.Hour)
	exp := r.expired(now, func(*AgentState) time.Duration { return time.Minute })
	if len(exp) != 1 || exp[0] != "a1" {
		t.Fatalf("expired %v", exp)
	}
}

func TestNormalizeService(t *testing.T) {
	for in, want := range map[string]string{"/a": "/a/index", "/a/b": "/a/b", "a/b": "", "/a/b/c": "", "/": "", "//b": ""} {
		got, err := NormalizeService(in)
		if got != want || (want == "") != (err != nil) {
			t.Errorf("NormalizeService(%q) = %q, %v", in, got, err)
		}
	}
}

func TestDecodePacketRejects(t *testing.T) {
	for name, in := range map[string]string{
		"not json":        `{`,
		"wrong version":   `{"v":9,"packet":"push","type":"/a/b"}`,
		"unknown kind":    `{"v":1,"packet":"zap"}`,
		"request no tok":  `{"v":1,"packet":"request","type":"/a/b","reply_to":"q"}`,
		"push no type":    `{"v":1,"packet":"push"}`,
		"result no token": `{"v":1,"packet":"result"}`,
		"heartbeat no id": `{"v":1,"packet":"heartbeat"}`,
	} {
		if _, err := DecodePacket([]byte(in), 0); err == nil {
			t.Errorf("%s: accepted %s", name, in)
		}
	}
	if _, err := DecodePacket([]byte(`{"v":1,"packet":"push","type":"/a/b"}`), 10); err == nil {
		t.Error("size limit not applied")
	}
	if _, err := DecodePacket([]byte(`{"v":1,"packet":"push","type":"/a/b","extra":1}`), 0); err != nil {
		t.Errorf("unknown fields must be ignored: %v", err)
	}
}

func FuzzDecodePacket(f *testing.F) {
	f.Add([]byte(`{"v":1,"packet":"request","type":"/a/b","token":"t","reply_to":"q","payload":{"x":[1,2]}}`))
	f.Add([]byte(`{"v":1,"packet":"result","token":"t","results":[{"agent":"a","error":{"code":"x","message":"y"}}]}`))
	f.Add([]byte(`{"v":1,"packet":"register","identity":"a","services":[{"name":"/a/b"}],"status":0.5}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := DecodePacket(b, 1<<16)
		if err != nil {
			return
		}
		// What decodes re-encodes and decodes to the same kind.
		enc, err := p.Encode()
		if err != nil {
			t.Fatal(err)
		}
		q, err := DecodePacket(enc, 0)
		if err != nil || q.Kind != p.Kind || q.Token != p.Token {
			t.Fatalf("round trip: %v %+v", err, q)
		}
	})
}

// The tag index must select exactly the agents a full scan would.
func TestTagIndexMatchesFullScan(t *testing.T) {
	r := newRegistry(1)
	tagsOf := func(i int) []string { return []string{fmt.Sprintf("z%d", i%3), fmt.Sprintf("r%d", i%7), "all"} }
	for i := range 300 {
		svcs := []ServiceInfo{{Name: "/s/x"}}
		if i%2 == 0 {
			svcs = append(svcs, ServiceInfo{Name: "/s/even"})
		}
		r.upsert(AgentState{Identity: fmt.Sprintf("a%d", i), Services: svcs, Tags: tagsOf(i)}, time.Now())
	}
	for i := 0; i < 300; i += 11 {
		r.remove(fmt.Sprintf("a%d", i))
	}
	for _, svc := range []string{"/s/x", "/s/even"} {
		for _, match := range []string{MatchAll, MatchAny} {
			for _, tags := range [][]string{{"z1"}, {"z1", "r3"}, {"r6", "z0"}, {"all"}, {"nope"}, {"z2", "nope"}} {
				o := requestOptions{selector: SelectAll, tags: tags, tagMatch: match}
				got := map[string]bool{}
				for _, e := range r.pick(svc, &o, nil) {
					if got[e.Identity] {
						t.Fatalf("%s %v %s: %s twice", svc, tags, match, e.Identity)
					}
					got[e.Identity] = true
				}
				want := 0
				for id, e := range r.agents {
					if e.member[svc] != nil && e.hasTags(tags, match) {
						want++
						if !got[id] {
							t.Fatalf("%s %v %s: missing %s", svc, tags, match, id)
						}
					}
				}
				if len(got) != want {
					t.Fatalf("%s %v %s: %d agents, want %d", svc, tags, match, len(got), want)
				}
			}
		}
	}
}
