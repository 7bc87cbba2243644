package security

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
)

// parseEnvelopeJSON is parseEnvelope as it was before decodeEnvelope:
// encoding/json only. The differential tests compare the two.
func parseEnvelopeJSON(raw []byte, max int) (*Envelope, error) {
	if len(raw) > max {
		return nil, newError(ErrMalformed, "", nil, "envelope is %d bytes, the limit is %d", len(raw), max)
	}
	if !IsEnvelope(raw) {
		return nil, newError(ErrUnsigned, "", nil, "not an envelope")
	}
	var e Envelope
	if err := json.Unmarshal(raw, &e); err != nil {
		return nil, newError(ErrMalformed, "", err, "decode")
	}
	if err := checkEnvelope(&e); err != nil {
		return nil, err
	}
	return &e, nil
}

// checkDecodeEnvelope fails t if decodeEnvelope and encoding/json disagree
// on raw, or if ParseEnvelope and parseEnvelopeJSON do.
func checkDecodeEnvelope(t *testing.T, raw []byte) (fast bool) {
	t.Helper()
	var want Envelope
	jerr := json.Unmarshal(raw, &want)
	var got Envelope
	if decodeEnvelope(raw, &got) {
		fast = true
		if jerr != nil {
			t.Fatalf("decodeEnvelope accepted %q, encoding/json: %v", raw, jerr)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("decodeEnvelope(%q):\n got %#v\nwant %#v", raw, got, want)
		}
		// The three slices share one buffer: none may reach into another.
		for _, s := range [][]byte{got.Cert, got.Body, got.Sig} {
			if len(s) != cap(s) {
				t.Fatalf("slice of len %d has cap %d", len(s), cap(s))
			}
		}
	}
	pe, perr := ParseEnvelope(raw)
	je, jperr := parseEnvelopeJSON(raw, DefaultMaxEnvelopeSize)
	if (perr == nil) != (jperr == nil) || perr != nil && perr.Error() != jperr.Error() {
		t.Fatalf("ParseEnvelope(%q): error %v, encoding/json %v", raw, perr, jperr)
	}
	if !reflect.DeepEqual(pe, je) {
		t.Fatalf("ParseEnvelope(%q):\n got %#v\nwant %#v", raw, pe, je)
	}
	return fast
}

// envelopeSeeds returns real envelopes (both fuzz identities, with and
// without certificate, bodies of 0, 100 B and 10 KiB), hand-written edge
// cases, and the corpora of FuzzParseEnvelope and FuzzVerifyEnvelope.
func envelopeSeeds(t testing.TB) [][]byte {
	ids := loadFuzzIDs(t)
	var seeds [][]byte
	for _, id := range []*Identity{ids.hybrid, ids.x25519} {
		for _, n := range []int{0, 100, 10 << 10} {
			body := bytes.Repeat([]byte("b"), n)
			seeds = append(seeds,
				sign(t, id, body, SignedAt(ids.now)),
				sign(t, id, body, SignedAt(ids.now), OmitCert()))
		}
	}
	const sig = `"sig":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=="`
	const nonce = `"nonce":"00000000000000000000000000000000"`
	for _, s := range []string{
		`{"v":1,"alg":"ed25519","signer":"a","ts":1,` + nonce + `,"body":"","cert":"",` + sig + `}`,
		` { "v" : 1 , "alg" : "ed25519" , "signer" : "a" , "ts" : 1 ,` + nonce + ` , "body" : "aGk=" ,` + sig + " }\r\n\t",
		`{"v":1,"alg":"ed25519","signer":"a","ts":-0,` + nonce + `,"body":"aGk=",` + sig + `}`,
		`{"v":1,"alg":"ed25519","signer":"a","ts":01,` + nonce + `,"body":"aGk=",` + sig + `}`,
		`{"v":1,"alg":"ed25519","signer":"a","ts":1.0,` + nonce + `,"body":"aGk=",` + sig + `}`,
		`{"v":1,"alg":"ed25519","signer":"a","ts":1e3,` + nonce + `,"body":"aGk=",` + sig + `}`,
		`{"v":1,"alg":"ed25519","signer":"a","ts":9223372036854775808,` + nonce + `,"body":"aGk=",` + sig + `}`,
		`{"v":1,"alg":"ed25519","signer":"a","ts":-9223372036854775808,` + nonce + `,"body":"aGk=",` + sig + `}`,
		`{"v":1,"alg":"ed25519","signer":"a","ts":1,` + nonce + `,"body":"aG` + "\r\n" + `k=",` + sig + `}`,
		`{"v":1,"alg":"ed25519","signer":"a","ts":1,` + nonce + `,"body":"aG\r\nk=",` + sig + `}`,
		`{"v":1,"alg":"ed25519","signer":"a","ts":1,` + nonce + `,"body":"aG\/k=",` + sig + `}`,
		`{"v":1,"alg":"ed25519","signer":"a","ts":1,` + nonce + `,"body":"aGk",` + sig + `}`,
		`{"v":1,"alg":"ed25519","signer":"a","ts":1,` + nonce + `,"body":[104,105],` + sig + `}`,
		`{"v":1,"alg":"ed25519","signer":"a","ts":1,` + nonce + `,"body":"aGk=",` + sig + `}x`,
		`{"v":1,"alg":"ed25519","signer":"a","ts":1,` + nonce + `,"body":"aGk=",` + sig + `,}`,
		`{"v":1,"alg":"ed25519","signer":"a","ts":1,` + nonce + `,"Body":"aGk=",` + sig + `}`,
		`{"v":1,"alg":"ed25519","signer":"a","ts":1,` + nonce + `,"body":"aGk=","extra":1,` + sig + `}`,
		`{"v":1,"alg":"ed25519","signer":"a","ts":1,` + nonce + `,"body":"aGk=","body":"aGk=",` + sig + `}`,
		`{"v":1,"alg":"ed25519","signer":"a\u00e9","ts":1,` + nonce + `,"body":"aGk=",` + sig + `}`,
		`{"v":1,"alg":"ed25519","signer":"a` + "\xff" + `","ts":1,` + nonce + `,"body":"aGk=",` + sig + `}`,
		`{"v":1,"alg":"ed25519","signer":"a` + "\xc3\xa9" + `","ts":1,` + nonce + `,"body":"aGk=",` + sig + `}`,
		`{"v":1,"alg":"ed25519","signer":"a","ts":1,` + nonce + `,"body":"aGk` + "\xff" + `",` + sig + `}`,
		`{"v":1,"alg":"ed25519","signer":"a","ts":1,` + nonce + `,"body":"aGk=` + "\x00" + `",` + sig + `}`,
		`{"v":1,"alg":"ed25519","signer":"a","ts":1,` + nonce + `,"body":"aGk=\"",` + sig + `}`,
		`{"v":1,"alg":"ed25519","signer":"a","ts":1,` + nonce + `,"body":"aGk=`,
		`{"v":1,"alg":"ed25519"`,
		`{"v":1}`,
		`{}`,
	} {
		seeds = append(seeds, []byte(s))
	}
	for _, dir := range []string{"FuzzParseEnvelope", "FuzzVerifyEnvelope", "FuzzDecodeEnvelope"} {
		files, _ := filepath.Glob(filepath.Join("testdata", "fuzz", dir, "*"))
		for _, name := range files {
			b, err := os.ReadFile(name)
			if err != nil {
				t.Fatal(err)
			}
			lines := strings.Split(strings.TrimSpace(string(b)), "\n")
			if len(lines) != 2 || lines[0] != "go test fuzz v1" ||
				!strings.HasPrefix(lines[1], "[]byte(") || !strings.HasSuffix(lines[1], ")") {
				t.Fatalf("%s: unexpected corpus file", name)
			}
			s, err := strconv.Unquote(strings.TrimSuffix(strings.TrimPrefix(lines[1], "[]byte("), ")"))
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			seeds = append(seeds, []byte(s))
		}
	}
	return seeds
}

func TestDecodeEnvelope(t *testing.T) {
	fast := 0
	seeds := envelopeSeeds(t)
	for _, raw := range seeds {
		if checkDecodeEnvelope(t, raw) {
			fast++
		}
	}
	// The envelopes Sign makes must take the fast path.
	ids := loadFuzzIDs(t)
	for _, opts := range [][]SignOption{nil, {OmitCert()}} {
		raw := sign(t, ids.x25519, bytes.Repeat([]byte("b"), 100), opts...)
		if !decodeEnvelope(raw, new(Envelope)) {
			t.Errorf("Sign's envelope %q fell back to encoding/json", raw)
		}
	}
	t.Logf("%d of %d seeds decoded without encoding/json", fast, len(seeds))
}

// FuzzDecodeEnvelope is a differential test: decodeEnvelope and ParseEnvelope
// must agree with encoding/json on every input.
func FuzzDecodeEnvelope(f *testing.F) {
	for _, raw := range envelopeSeeds(f) {
		f.Add(raw)
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		checkDecodeEnvelope(t, raw)
	})
}

func benchEnvelopes(b *testing.B) (*Identity, *Verifier, []int) {
	ca := sharedCA(b)
	id := issue(b, ca, "bench-signer", RoleClient)
	v := newVerifier(b, ca.Pool(), nil)
	if _, err := v.VerifyCert(id.Cert.Raw, id.Name); err != nil { // warm the cache
		b.Fatal(err)
	}
	return id, v, []int{100, 10 << 10}
}

func BenchmarkParseEnvelope(b *testing.B) {
	id, _, sizes := benchEnvelopes(b)
	for _, n := range sizes {
		for _, omit := range []bool{false, true} {
			var opts []SignOption
			name := "body=" + strconv.Itoa(n) + "/cert=x25519"
			if omit {
				opts, name = []SignOption{OmitCert()}, "body="+strconv.Itoa(n)+"/cert=omitted"
			}
			b.Run(name, func(b *testing.B) {
				raw := sign(b, id, bytes.Repeat([]byte("b"), n), opts...)
				b.ReportAllocs()
				b.SetBytes(int64(len(raw)))
				for b.Loop() {
					if _, err := ParseEnvelope(raw); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

func BenchmarkVerifyEnvelopeSize(b *testing.B) {
	id, v, sizes := benchEnvelopes(b)
	for _, n := range sizes {
		b.Run("body="+strconv.Itoa(n), func(b *testing.B) {
			body := bytes.Repeat([]byte("b"), n)
			envs := make([][]byte, b.N)
			for i := range envs {
				envs[i] = sign(b, id, body)
			}
			b.ReportAllocs()
			b.SetBytes(int64(len(envs[0])))
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, _, err := v.VerifyEnvelope(envs[i]); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
