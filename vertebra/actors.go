package vertebra

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"encoding/xml"
	"fmt"
	"path"
	"slices"
	"strings"
	"sync"

	"mellium.im/xmpp/jid"

	"github.com/nanite-go/nanite/vertebra/values"
)

// Handler serves ops; *nanite.Dispatcher satisfies it
// (nanite.NewDispatcher(actors...)), so the same actors serve over AMQP
// and over XMPP.
type Handler interface {
	// Services lists the ops served, "/actor/method".
	Services() []string
	// Call runs service; emit sends intermediate results.
	Call(ctx context.Context, service string, payload json.RawMessage, from string,
		emit func(ctx context.Context, key string, data json.RawMessage) error) (json.RawMessage, error)
}

// Authorizer decides whether caller (the full JID its server
// authenticated) may run op. signedBy is the signer's name when the op
// carried a valid signature, else "". A nil error allows; any error
// refuses the op with a nack (code not_authorized) whose message is the
// error's text.
type Authorizer interface {
	Authorize(ctx context.Context, caller, signedBy, op string) error
}

// AuthorizerFunc adapts a function to Authorizer.
type AuthorizerFunc func(ctx context.Context, caller, signedBy, op string) error

// Authorize calls f.
func (f AuthorizerFunc) Authorize(ctx context.Context, caller, signedBy, op string) error {
	return f(ctx, caller, signedBy, op)
}

// AllowJIDs is Vertebra's authorization: an allow list of JIDs. A pattern
// is a full JID, a bare JID (any resource), "*@domain" (any account of
// the domain) or "*" (anyone).
func AllowJIDs(patterns ...string) Authorizer {
	return AuthorizerFunc(func(_ context.Context, caller, _, op string) error {
		c, err := jid.Parse(caller)
		if err != nil {
			return fmt.Errorf("caller %q is not a JID", caller)
		}
		for _, p := range patterns {
			switch {
			case p == "*", p == c.String(), p == c.Bare().String(),
				strings.HasPrefix(p, "*@") && p[2:] == c.Domainpart():
				return nil
			}
		}
		return fmt.Errorf("%s may not call %s", c.Bare(), op)
	})
}

// Verifier checks an op's signature: signature and certificate are the
// opaque bytes the op carried (Meta), signed the bytes the signature must
// cover (SigningBytes). It returns the signer's name.
type Verifier interface {
	Verify(ctx context.Context, signature, certificate, signed []byte) (signedBy string, err error)
}

// Signer signs the bytes of an op (SigningBytes) for a caller: it returns
// the signature and the certificate to send along, both opaque.
type Signer interface {
	Sign(ctx context.Context, signed []byte) (signature, certificate []byte, err error)
}

// SigningBytes returns what a signature of an op covers: its target, type,
// request id, selector, tags, the hash of the origin envelope when there is
// one (Meta.Origin) and payload. The payload is taken in the form
// the receiver sees it (CanonicalPayload); deadline and hops change on the
// way and are left out.
func SigningBytes(to jid.JID, op string, payload json.RawMessage, m Meta) []byte {
	var b bytes.Buffer
	b.WriteString("nanite-vertebra-op/0\x00")
	for _, s := range []string{to.String(), op, m.RequestID, m.Selector, strings.Join(m.Tags, ",")} {
		b.WriteString(s)
		b.WriteByte(0)
	}
	if len(m.Origin) > 0 {
		// Only when present, so that signatures without an origin stay
		// as they were; a JSON payload cannot start with "origin:".
		sum := sha256.Sum256(m.Origin)
		b.WriteString("origin:")
		b.WriteString(hex.EncodeToString(sum[:]))
		b.WriteByte(0)
	}
	b.Write(payload)
	return b.Bytes()
}

// CanonicalPayload returns payload as a receiver decodes it from the op's
// typed values (compact, with i4 numbers in canonical form). Signers use
// it so that the receiver computes the same SigningBytes.
func CanonicalPayload(payload json.RawMessage) (json.RawMessage, error) {
	toks, err := values.AppendPayload(nil, payload)
	if err != nil || len(toks) == 0 {
		return nil, err
	}
	for i, t := range toks {
		switch t := t.(type) {
		case xml.StartElement:
			t.Name.Space = NS
			toks[i] = t
		case xml.EndElement:
			t.Name.Space = NS
			toks[i] = t
		}
	}
	r := &tokenSlice{toks: toks}
	pd := values.NewPayloadDecoder(values.Limits{})
	for {
		tok, err := r.Token()
		if err != nil {
			return pd.Payload(), nil
		}
		if st, ok := tok.(xml.StartElement); ok {
			if err := pd.Add(r, st); err != nil {
				return nil, err
			}
		}
	}
}

// Sign fills m's Signature and Certificate for an op to to.
func Sign(ctx context.Context, s Signer, to jid.JID, op string, payload json.RawMessage, m *Meta) error {
	p, err := CanonicalPayload(payload)
	if err != nil {
		return err
	}
	m.Signature, m.Certificate, err = s.Sign(ctx, SigningBytes(to, op, p, *m))
	return err
}

// ActorServer serves a Handler's services as ops: it checks the signature
// (when there is one and a Verifier), the caller's authorization, that the
// op is served here; then acks, runs the service with intermediate results
// as data marked intermediate, and sends the result as data then final, or
// an error. Refusals are nacks with codes not_authorized or
// unknown_service.
type ActorServer struct {
	Handler Handler
	// Authorizer decides who may call what; nil allows every caller the
	// XMPP server authenticated.
	Authorizer Authorizer
	// Verifier checks signatures; nil ignores them.
	Verifier Verifier
	// RequireSignature refuses ops without a valid signature.
	RequireSignature bool

	once     sync.Once
	services map[string]bool
}

func (a *ActorServer) serves(op string) bool {
	a.once.Do(func() {
		a.services = map[string]bool{}
		for _, s := range a.Handler.Services() {
			a.services[s] = true
		}
	})
	return a.services[op]
}

// Features returns the disco#info features for the services (see
// ServiceFeature).
func (a *ActorServer) Features() []string {
	var out []string
	for _, s := range a.Handler.Services() {
		out = append(out, ServiceFeature(s))
	}
	slices.Sort(out)
	return out
}

// ServeOp implements OpHandler.
func (a *ActorServer) ServeOp(ctx context.Context, req *Request, w *Reply) error {
	signedBy := ""
	switch {
	case len(req.Meta.Signature) > 0 && a.Verifier != nil:
		by, err := a.Verifier.Verify(ctx, req.Meta.Signature, req.Meta.Certificate,
			SigningBytes(req.To, req.Type, req.Payload, req.Meta))
		if err != nil {
			return w.Nack(ctx, CodeUnauthorized, "bad signature: "+err.Error())
		}
		signedBy = by
	case a.RequireSignature:
		return w.Nack(ctx, CodeUnauthorized, "ops must be signed")
	}
	if a.Authorizer != nil {
		if err := a.Authorizer.Authorize(ctx, req.From.String(), signedBy, req.Type); err != nil {
			return w.Nack(ctx, CodeUnauthorized, err.Error())
		}
	}
	if !a.serves(path.Clean(req.Type)) || path.Clean(req.Type) != req.Type {
		return w.Nack(ctx, CodeUnknown, fmt.Sprintf("no service %s here", req.Type))
	}
	if err := w.Ack(ctx); err != nil {
		return err
	}
	res, err := a.Handler.Call(ctx, req.Type, req.Payload, req.From.String(),
		func(ctx context.Context, key string, data json.RawMessage) error {
			return w.Intermediate(ctx, key, data)
		})
	if err != nil {
		return err
	}
	if err := w.Data(ctx, res); err != nil {
		return err
	}
	return w.Final(ctx)
}
