package vertebra

import (
	"encoding/json"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"mellium.im/xmpp/jid"
)

// TestConcurrentOps runs many ops at once, component to component and
// component to a client agent, and requires every one to end with its
// result.
func TestConcurrentOps(t *testing.T) {
	p := runProsody(t)
	// Few remembered ops: finished ops must be forgotten, not block new ones.
	comp := NewEndpoint(Config{Handler: &ActorServer{Handler: &fakeActors{}}, MaxRemembered: 100, MaxOps: 50})
	startConn(t, componentDial(p), comp)
	a := startAgent(t, AgentConfig{Dial: clientDial(t, p, "agent1"), Handler: &fakeActors{}})
	caller := NewEndpoint(Config{Logger: testLogger(t)})
	startConn(t, DialConfig{JID: jid.MustParse(testComponent2), Secret: testSecret, Addr: p.ComponentAddr()}, caller)
	for _, to := range []jid.JID{jid.MustParse("svc@" + testComponent), a.JID()} {
		var failed atomic.Int64
		var wg sync.WaitGroup
		t0 := time.Now()
		for w := range 8 {
			wg.Go(func() {
				for i := range 200 {
					payload := json.RawMessage(`"` + string(rune('a'+w)) + `"`)
					res, err := caller.Call(ctxTimeout(t, 5*time.Second), to, "/echo/say", payload,
						WithFrom(jid.MustParse("c@"+testComponent2)))
					if err != nil || string(res.Value()) != string(payload) {
						if failed.Add(1) < 5 {
							t.Errorf("%v op %d/%d: %v %v", to, w, i, res, err)
						}
					}
				}
			})
		}
		wg.Wait()
		comp.mu.Lock()
		n := len(comp.served)
		comp.mu.Unlock()
		if to.Domainpart() == testComponent && n > 100+8 {
			t.Errorf("%d ops remembered, want at most 100 (and those running)", n)
		}
		t.Logf("%v: 1600 ops in %v, %d failed; caller %+v", to, time.Since(t0), failed.Load(), caller.Stats())
	}
}
