package vertebra

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"mellium.im/xmpp/jid"
)

// hmacKeys signs and verifies with a shared key; the "certificate" names
// the signer. It stands in for the security package.
type hmacKeys struct{ key []byte }

func (h hmacKeys) Sign(_ context.Context, signed []byte) ([]byte, []byte, error) {
	m := hmac.New(sha256.New, h.key)
	m.Write(signed)
	return m.Sum(nil), []byte("signer-1"), nil
}

func (h hmacKeys) Verify(_ context.Context, sig, cert, signed []byte) (string, error) {
	m := hmac.New(sha256.New, h.key)
	m.Write(signed)
	if !hmac.Equal(m.Sum(nil), sig) {
		return "", errors.New("signature does not match")
	}
	return string(cert), nil
}

func TestSignedOps(t *testing.T) {
	p := runProsody(t)
	keys := hmacKeys{key: []byte("k")}
	var sawSigner string
	server := &ActorServer{Handler: &fakeActors{}, Verifier: keys, RequireSignature: true,
		Authorizer: AuthorizerFunc(func(_ context.Context, caller, signedBy, op string) error {
			sawSigner = signedBy
			if signedBy != "signer-1" {
				return errors.New("unsigned")
			}
			return nil
		})}
	comp := NewEndpoint(Config{Handler: server})
	startConn(t, componentDial(p), comp)
	alice := NewEndpoint(Config{})
	startConn(t, clientDial(t, p, "alice"), alice)
	to := jid.MustParse("svc@" + testComponent)
	payload := json.RawMessage(`{"n": -0, "s": "x"}`) // canonicalised before signing

	var m Meta
	m.RequestID = "r-1"
	if err := Sign(context.Background(), keys, to, "/echo/say", payload, &m); err != nil {
		t.Fatal(err)
	}
	res, err := alice.Call(ctxTimeout(t, 5*time.Second), to, "/echo/say", payload, WithMeta(m))
	if err != nil || string(res.Value()) != `{"n":0,"s":"x"}` || sawSigner != "signer-1" {
		t.Fatalf("signed op: %v %v (signer %q)", res, err, sawSigner)
	}
	// The same signature on another payload is refused.
	_, err = alice.Call(ctxTimeout(t, 5*time.Second), to, "/echo/say", json.RawMessage(`"tampered"`), WithMeta(m))
	var oe *OpError
	if !errors.As(err, &oe) || !oe.Nack || oe.Code != CodeUnauthorized || !bytes.Contains([]byte(oe.Message), []byte("bad signature")) {
		t.Fatalf("tampered: %v", err)
	}
	// No signature at all.
	_, err = alice.Call(ctxTimeout(t, 5*time.Second), to, "/echo/say", payload)
	if !errors.Is(err, ErrNotAuthorized) {
		t.Fatalf("unsigned: %v", err)
	}
}
