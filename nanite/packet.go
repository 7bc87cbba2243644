package nanite

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nanite-go/nanite/security"
)

// ProtocolVersion is the version of the wire protocol written in every
// packet's "v" field. Receivers accept packets with the same major version and
// ignore fields they do not know.
const ProtocolVersion = 1

// Kind names a packet type on the wire (the "packet" field).
type Kind string

// The packet kinds. They follow Nanite's packet classes: Request, Push,
// Result, IntermediateMessage, Register, UnRegister, Ping (heartbeat) and
// Advertise.
const (
	KindRequest      Kind = "request"
	KindPush         Kind = "push"
	KindResult       Kind = "result"
	KindIntermediate Kind = "intermediate"
	KindRegister     Kind = "register"
	KindUnregister   Kind = "unregister"
	KindHeartbeat    Kind = "heartbeat"
	KindAdvertise    Kind = "advertise"
)

// Selector values for requests.
const (
	SelectLeastLoaded = "least_loaded"
	SelectAll         = "all"
	SelectRandom      = "random"
	SelectRoundRobin  = "rr"
)

// Tag match modes.
const (
	MatchAll = "all" // the agent must carry every tag of the request (default)
	MatchAny = "any" // the agent must carry at least one tag of the request
)

// Packet is the one JSON document every message of the protocol carries.
// Fields that do not apply to a kind are omitted. docs/protocol.md documents
// each kind with examples.
type Packet struct {
	Version int  `json:"v"`
	Kind    Kind `json:"packet"`

	// Request and push.
	Type       string          `json:"type,omitempty"` // service, "/actor/method"
	Payload    json.RawMessage `json:"payload,omitempty"`
	From       string          `json:"from,omitempty"`
	Token      string          `json:"token,omitempty"`
	ReplyTo    string          `json:"reply_to,omitempty"`
	Selector   string          `json:"selector,omitempty"`
	Target     string          `json:"target,omitempty"`
	Tags       []string        `json:"tags,omitempty"`
	TagMatch   string          `json:"tag_match,omitempty"`
	Persistent bool            `json:"persistent,omitempty"`
	Failsafe   bool            `json:"offline_failsafe,omitempty"`
	Deadline   int64           `json:"deadline,omitempty"` // Unix milliseconds
	Attempt    int             `json:"attempt,omitempty"`  // 0 for the first delivery, n for the nth retry
	// Bundles says the requester reads reply bundles at ReplyTo
	// (docs/protocol.md, "Reply bundles").
	Bundles bool `json:"bundles,omitempty"`

	// Result and intermediate.
	Key     string         `json:"key,omitempty"` // intermediate result key
	Error   *ErrorBody     `json:"error,omitempty"`
	Results []ResultRecord `json:"results,omitempty"` // aggregated results relayed by a mapper

	// Register, heartbeat, unregister, advertise.
	Identity   string        `json:"identity,omitempty"`
	Queue      string        `json:"queue,omitempty"`
	Services   []ServiceInfo `json:"services,omitempty"`
	Status     *float64      `json:"status,omitempty"`
	InFlight   int           `json:"in_flight,omitempty"`
	Interval   int64         `json:"heartbeat_ms,omitempty"`
	AgentVer   string        `json:"agent_version,omitempty"`
	SentAtUnix int64         `json:"sent_at,omitempty"` // Unix milliseconds

	// Secure mode (docs/security.md).
	To     string          `json:"to,omitempty"`     // the agent a request was signed for
	Sealed []byte          `json:"sealed,omitempty"` // the payload, sealed to the recipient (base64)
	Origin json.RawMessage `json:"origin,omitempty"` // the original caller's envelope, on relayed requests
	// Session keys (docs/security.md, "Session keys"): a session offer
	// (security.SessionOffer) in a signed request.
	Session json.RawMessage `json:"session,omitempty"`

	// Federation (docs/bridge.md): the bridges (their XMPP domains) a
	// request crossed before it entered this cluster, oldest first.
	Hops []string `json:"hops,omitempty"`

	// sess is the session a request arrived in, or whose offer it
	// carried: the agent answers in it (nanite/session.go).
	sess *security.Session
}

// ServiceInfo describes one service an agent offers.
type ServiceInfo struct {
	Name       string `json:"name"`
	Idempotent bool   `json:"idempotent,omitempty"`
}

// ErrorBody is the error of a failed request on the wire.
type ErrorBody struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// ResultRecord is one agent's answer inside an aggregated result packet.
type ResultRecord struct {
	Agent   string          `json:"agent"`
	Payload json.RawMessage `json:"payload,omitempty"`
	Error   *ErrorBody      `json:"error,omitempty"`
}

// Error codes carried in ErrorBody.Code.
const (
	CodeHandler      = "handler_error"   // the handler returned an error
	CodePanic        = "handler_panic"   // the handler panicked
	CodeUnknown      = "unknown_service" // the agent does not offer the service
	CodeBadRequest   = "bad_request"     // malformed packet or payload
	CodeTooLarge     = "payload_too_large"
	CodeExpired      = "expired"        // the deadline passed before the request ran
	CodeTimeout      = "timeout"        // the handler did not finish before the deadline
	CodeShutdown     = "shutdown"       // the agent stopped before finishing
	CodeNoAgent      = "no_agent"       // no agent offers the service (mapper relay)
	CodeNotDelivered = "not_delivered"  // the broker could not deliver the request
	CodeAgentLost    = "agent_lost"     // the agent went silent while handling
	CodeUnauthorized = "not_authorized" // refused by policy
	CodeInternal     = "internal"       // anything else
)

var errBadPacket = errors.New("nanite: malformed packet")

// DecodePacket parses and validates a packet. It rejects packets larger than
// max bytes (when max > 0), of an unknown kind or missing the fields their
// kind requires.
func DecodePacket(b []byte, max int) (*Packet, error) {
	return decodePacket(b, max, false)
}

// decodeOwned is DecodePacket for a buffer that nobody changes or reuses
// afterwards, such as the body of a delivery: the payload is not copied
// out of it but refers to it.
func decodeOwned(b []byte, max int) (*Packet, error) {
	return decodePacket(b, max, true)
}

func decodePacket(b []byte, max int, alias bool) (*Packet, error) {
	return decodePacketInto(nil, b, max, alias)
}

// decodePacketInto is decodePacket into *p, which must be zero (a new
// packet when p is nil).
func decodePacketInto(p *Packet, b []byte, max int, alias bool) (*Packet, error) {
	if max > 0 && len(b) > max {
		return nil, fmt.Errorf("%w: %d bytes exceeds the limit of %d", ErrTooLarge, len(b), max)
	}
	if p == nil {
		p = new(Packet)
	}
	if err := unmarshalPacket(b, p, alias); err != nil { // json.Unmarshal, see codec.go
		return nil, fmt.Errorf("%w: %v", errBadPacket, err)
	}
	if err := p.validate(); err != nil {
		return p, err
	}
	return p, nil
}

func (p *Packet) validate() error {
	if p.Version != ProtocolVersion {
		return fmt.Errorf("%w: unsupported protocol version %d", errBadPacket, p.Version)
	}
	switch p.Kind {
	case KindRequest, KindPush:
		if p.Type == "" {
			return fmt.Errorf("%w: %s without type", errBadPacket, p.Kind)
		}
		if p.Kind == KindRequest && (p.Token == "" || p.ReplyTo == "") {
			return fmt.Errorf("%w: request without token or reply_to", errBadPacket)
		}
	case KindResult, KindIntermediate:
		if p.Token == "" {
			return fmt.Errorf("%w: %s without token", errBadPacket, p.Kind)
		}
	case KindRegister, KindHeartbeat, KindUnregister, KindAdvertise:
		if p.Identity == "" && p.Kind != KindAdvertise {
			return fmt.Errorf("%w: %s without identity", errBadPacket, p.Kind)
		}
	default:
		return fmt.Errorf("%w: unknown packet kind %q", errBadPacket, p.Kind)
	}
	return nil
}

// Encode marshals the packet, filling in the protocol version.
func (p *Packet) Encode() ([]byte, error) {
	p.Version = ProtocolVersion
	if p.Payload != nil && !validJSON(p.Payload) {
		return nil, fmt.Errorf("nanite: encode %s packet: payload is not JSON", p.Kind)
	}
	return p.encodeTrusted()
}

// encodeTrusted is Encode for a packet whose payload is known to be valid
// JSON: json.Marshal of the packet with the payload spliced in unchanged as
// its last member (see codec.go).
func (p *Packet) encodeTrusted() ([]byte, error) {
	return marshalPacket(p)
}

// deadlineTime converts the wire deadline to a time.
func (p *Packet) deadlineTime() time.Time {
	if p.Deadline == 0 {
		return time.Time{}
	}
	return time.UnixMilli(p.Deadline)
}

// unixMilli is a deadline on the wire: Unix milliseconds, rounded up, so
// that whoever reads it (a relaying mapper daemon, an agent) never gives up
// before the requester itself does. Rounded down, a mapper daemon holding a
// failsafe request could answer "timeout" up to a millisecond before the
// requester's own deadline, and that answer would overtake the requester's
// own, clearer timeout.
func unixMilli(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	ms := t.UnixMilli()
	if time.UnixMilli(ms).Before(t) {
		ms++
	}
	return ms
}
