package security

import (
	"fmt"
	"testing"
	"time"
)

var benchBody = []byte(`{"v":1,"packet":"request","type":"/bench/echo","token":"0123456789abcdef","from":"client-1","reply_to":"nanite-client-1","deadline":1767225600000,"payload":"xxxxxxxx"}`)

func BenchmarkSign(b *testing.B) {
	id := issue(b, sharedCA(b), "bench-signer", RoleClient)
	b.ReportAllocs()
	var n int
	for b.Loop() {
		env, _ := id.Sign(benchBody)
		n = len(env)
	}
	b.ReportMetric(float64(n), "envelope-bytes")
}

// BenchmarkVerifyEnvelope measures the steady state of a receiver: the
// signer's certificate is cached, every envelope is new.
func BenchmarkVerifyEnvelope(b *testing.B) {
	ca := sharedCA(b)
	for _, tc := range []struct {
		name string
		kem  KEM
		opts []SignOption
	}{
		{"cert=x25519", KEMX25519, nil},
		{"cert=hybrid", KEMHybrid, nil},
		{"cert=omitted", KEMHybrid, []SignOption{OmitCert()}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			id := issue(b, ca, "bench-signer", RoleClient, WithKEM(tc.kem))
			v := newVerifier(b, ca.Pool(), nil)
			if _, err := v.VerifyCert(id.Cert.Raw, id.Name); err != nil { // warm the cache
				b.Fatal(err)
			}
			envs := make([][]byte, b.N)
			for i := range envs {
				envs[i] = sign(b, id, benchBody, tc.opts...)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, _, err := v.VerifyEnvelope(envs[i]); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(len(envs[0])), "envelope-bytes")
		})
	}
}

// BenchmarkVerifyCertCold is the cost the certificate cache saves: a full
// X.509 parse and chain verification.
func BenchmarkVerifyCertCold(b *testing.B) {
	ca := sharedCA(b)
	id := issue(b, ca, "bench-signer", RoleClient)
	v := newVerifier(b, ca.Pool(), nil)
	b.ReportAllocs()
	for b.Loop() {
		v.FlushCertCache()
		if _, err := v.VerifyCert(id.Cert.Raw, id.Name); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkSeal(b *testing.B) {
	ca := sharedCA(b)
	for _, kem := range []KEM{KEMHybrid, KEMX25519} {
		id := issue(b, ca, "bench-recipient", RoleAgent, WithKEM(kem))
		info := SealInfo("client-1", "/bench/echo", "0123456789abcdef")
		for _, size := range []int{100, 10 << 10} {
			pt := make([]byte, size)
			b.Run(fmt.Sprintf("kem=%s/size=%d/seal", kem, size), func(b *testing.B) {
				b.SetBytes(int64(size))
				b.ReportAllocs()
				for b.Loop() {
					if _, err := Seal(id.SealKey(), info, pt); err != nil {
						b.Fatal(err)
					}
				}
			})
			sealed, _ := Seal(id.SealKey(), info, pt)
			b.Run(fmt.Sprintf("kem=%s/size=%d/open", kem, size), func(b *testing.B) {
				b.SetBytes(int64(size))
				b.ReportAllocs()
				for b.Loop() {
					if _, err := id.OpenSealed(info, sealed); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

func BenchmarkPolicyDecide(b *testing.B) {
	p := mustPolicy(b, testPolicy)
	c := Caller{Name: "web-3", Role: RoleAgent}
	b.ReportAllocs()
	for b.Loop() {
		p.Decide(c, "/ml/train", []string{"gpu", "region:eu"})
	}
}

// BenchmarkSessionWrap and BenchmarkVerifySessionEnvelope are the per-packet
// cost of session keys (an HMAC-SHA256 each way instead of Ed25519).
func BenchmarkSessionWrap(b *testing.B) {
	p := newSessionPair(b, KEMX25519)
	b.ReportAllocs()
	var n int
	for b.Loop() {
		n = len(p.out.Wrap(benchBody))
	}
	b.ReportMetric(float64(n), "envelope-bytes")
}

func BenchmarkVerifySessionEnvelope(b *testing.B) {
	p := newSessionPair(b, KEMX25519)
	p.av.now = time.Now
	envs := make([][]byte, b.N)
	for i := range envs {
		envs[i] = p.out.Wrap(benchBody)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, _, err := p.av.VerifySessionEnvelope(envs[i], p.agentLookup, RoleMapper); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkSessionSetup is what a session costs once: the initiator's offer
// (HPKE seal) and the responder's acceptance (HPKE open).
func BenchmarkSessionSetup(b *testing.B) {
	for _, kem := range []KEM{KEMX25519, KEMHybrid} {
		b.Run(kem.String(), func(b *testing.B) {
			p := newSessionPair(b, kem)
			peer, _ := p.av.VerifyCert(p.mapper.Cert.Raw, "map-1")
			b.ReportAllocs()
			for b.Loop() {
				_, offer, err := p.mv.NewSession(p.mapper, "agent-1", 0)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := p.av.AcceptSession(p.agent, peer, offer); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
