package nanite

import (
	"errors"
	"fmt"
	"strings"
)

// Sentinel errors. Errors returned by this package wrap one of these where it
// applies, so callers test them with errors.Is.
var (
	// ErrNoAgent: no registered agent offers the service (or matches the
	// target and tags).
	ErrNoAgent = errors.New("nanite: no agent available")
	// ErrTimeout: the request's deadline passed before every expected agent
	// answered. The error is a *TimeoutError naming the silent agents.
	ErrTimeout = errors.New("nanite: request timed out")
	// ErrTooLarge: a packet or payload is over the configured size limit.
	ErrTooLarge = errors.New("nanite: payload too large")
	// ErrNotDelivered: the broker could not deliver the request to the
	// agent (its queue is gone, or the request expired in it).
	ErrNotDelivered = errors.New("nanite: request not delivered")
	// ErrAgentLost: the agent stopped (or went silent) while it held the
	// request; the request may or may not have run.
	ErrAgentLost = errors.New("nanite: agent lost while handling the request")
	// ErrRemote: the agent answered with an error. The error is a
	// *RemoteError.
	ErrRemote = errors.New("nanite: remote error")
	// ErrClosed: the agent or mapper has been stopped.
	ErrClosed = errors.New("nanite: closed")
	// ErrConnection: the broker cannot be reached, or refused the
	// connection (bad credentials, unknown vhost).
	ErrConnection = errors.New("nanite: broker connection failed")
	// ErrBusy: too many requests are outstanding.
	ErrBusy = errors.New("nanite: too many outstanding requests")
)

// RemoteError is an error answered by an agent (or by a mapper relaying for
// an agent-originated request).
type RemoteError struct {
	Agent   string // identity of the agent that answered
	Code    string // one of the Code* constants
	Message string
}

func (e *RemoteError) Error() string {
	if e.Agent == "" {
		return fmt.Sprintf("nanite: remote error %s: %s", e.Code, e.Message)
	}
	return fmt.Sprintf("nanite: agent %s: %s: %s", e.Agent, e.Code, e.Message)
}

// ErrorCode is the wire code (one of the Code* constants); with
// ErrorMessage it lets other transports (vertebra's XMPP ops) carry the
// error without importing this package.
func (e *RemoteError) ErrorCode() string { return e.Code }

// ErrorMessage is the error's message without the agent prefix.
func (e *RemoteError) ErrorMessage() string { return e.Message }

// Is matches ErrRemote, and the sentinels that correspond to the wire codes
// (ErrNoAgent, ErrNotDelivered, ErrAgentLost, ErrTimeout, ErrTooLarge).
func (e *RemoteError) Is(target error) bool {
	switch target {
	case ErrRemote:
		return true
	case ErrNoAgent:
		return e.Code == CodeNoAgent
	case ErrNotDelivered:
		return e.Code == CodeNotDelivered
	case ErrAgentLost:
		return e.Code == CodeAgentLost || e.Code == CodeShutdown
	case ErrTimeout:
		return e.Code == CodeTimeout || e.Code == CodeExpired
	case ErrTooLarge:
		return e.Code == CodeTooLarge
	}
	return false
}

func remoteErr(agent string, b *ErrorBody) error {
	if b == nil {
		return nil
	}
	return &RemoteError{Agent: agent, Code: b.Code, Message: b.Message}
}

// errorBody converts an error into its wire form.
func errorBody(err error) *ErrorBody {
	if err == nil {
		return nil
	}
	var re *RemoteError
	if errors.As(err, &re) {
		return &ErrorBody{Code: re.Code, Message: re.Message}
	}
	code := CodeInternal
	switch {
	case errors.Is(err, ErrNoAgent):
		code = CodeNoAgent
	case errors.Is(err, ErrTimeout):
		code = CodeTimeout
	case errors.Is(err, ErrNotDelivered):
		code = CodeNotDelivered
	case errors.Is(err, ErrAgentLost):
		code = CodeAgentLost
	case errors.Is(err, ErrTooLarge):
		code = CodeTooLarge
	}
	return &ErrorBody{Code: code, Message: err.Error()}
}

// TimeoutError is returned when a request's deadline passes. Missing lists
// the agents that were sent the request and did not answer (empty when the
// request never reached an agent, for example while it waited in the
// offline failsafe queue).
type TimeoutError struct {
	Service string
	Missing []string
	Detail  string
}

func (e *TimeoutError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "nanite: request %s timed out", e.Service)
	if len(e.Missing) > 0 {
		fmt.Fprintf(&b, ": no answer from %s", strings.Join(e.Missing, ", "))
	}
	if e.Detail != "" {
		b.WriteString(" (" + e.Detail + ")")
	}
	return b.String()
}

// Is reports that a TimeoutError is an ErrTimeout.
func (e *TimeoutError) Is(target error) bool { return target == ErrTimeout }
