package vertebra

import (
	"context"
	"errors"
	"fmt"

	"mellium.im/xmpp/jid"
	"mellium.im/xmpp/stanza"
)

// Sentinel errors; errors returned by this package wrap them where they
// apply, so test with errors.Is.
var (
	// ErrNack: the responder refused the op (not authorized, unknown op,
	// bad arguments). The error is an *OpError.
	ErrNack = errors.New("vertebra: op refused")
	// ErrRemote: the responder accepted the op and then failed it. The
	// error is an *OpError.
	ErrRemote = errors.New("vertebra: op failed")
	// ErrDeadline: the op's deadline passed before it ended. The error is
	// a *DeadlineError, which also matches context.DeadlineExceeded.
	ErrDeadline = errors.New("vertebra: op deadline exceeded")
	// ErrUnavailable: the recipient does not exist or is offline
	// (service-unavailable, recipient-unavailable, item-not-found,
	// remote-server-not-found stanza errors).
	ErrUnavailable = errors.New("vertebra: recipient unavailable")
	// ErrNotAuthorized: a stanza error forbidden or not-authorized, or a
	// nack with code not_authorized.
	ErrNotAuthorized = errors.New("vertebra: not authorized")
	// ErrNotConnected: there is no XMPP session to send on (at the moment).
	ErrNotConnected = errors.New("vertebra: not connected")
	// ErrClosed: the endpoint was closed.
	ErrClosed = errors.New("vertebra: endpoint closed")
	// ErrNoTarget: discovery found no JID for the op and resources.
	ErrNoTarget = errors.New("vertebra: no JID offers the op")
	// ErrAbandoned: the caller went away or the deadline passed; the
	// responder stops sending.
	ErrAbandoned = errors.New("vertebra: op abandoned")
)

// Error codes in nack and error bodies. They are the codes of the nanite
// package's RemoteError, so results look the same over AMQP and XMPP.
const (
	CodeUnauthorized = "not_authorized"
	CodeUnknown      = "unknown_service"
	CodeBadRequest   = "bad_request"
	CodeHandler      = "handler_error"
	CodeTimeout      = "timeout"
	CodeInternal     = "internal"
	CodeShutdown     = "shutdown"
)

// OpError is a nack or error element received from a responder.
type OpError struct {
	Nack    bool    // a nack (refused before running) rather than an error
	From    jid.JID // the responder
	Op      string
	Code    string
	Message string
}

func (e *OpError) Error() string {
	what := "failed"
	if e.Nack {
		what = "refused"
	}
	code := e.Code
	if code == "" {
		code = "error"
	}
	return fmt.Sprintf("vertebra: %s %s %s: %s: %s", e.From, what, e.Op, code, e.Message)
}

// ErrorCode returns the code (for exit codes and relays).
func (e *OpError) ErrorCode() string { return e.Code }

// Is matches ErrNack or ErrRemote, and ErrNotAuthorized for the code
// not_authorized.
func (e *OpError) Is(target error) bool {
	switch target {
	case ErrNack:
		return e.Nack
	case ErrRemote:
		return !e.Nack
	case ErrNotAuthorized:
		return e.Code == CodeUnauthorized
	}
	return false
}

// StanzaError is an IQ answered with a stanza error. It unwraps to the
// stanza.Error, so errors.Is(err, stanza.Error{Condition: ...}) works, and
// matches ErrUnavailable or ErrNotAuthorized by condition.
type StanzaError struct {
	From jid.JID
	Err  stanza.Error
}

func (e *StanzaError) Error() string {
	msg := string(e.Err.Condition)
	if text := e.Err.Error(); text != msg {
		msg += ": " + text
	}
	return fmt.Sprintf("vertebra: %s answered %s %s", e.From, e.Err.Type, msg)
}

func (e *StanzaError) Unwrap() error { return e.Err }

func (e *StanzaError) Is(target error) bool {
	switch target {
	case ErrUnavailable:
		switch e.Err.Condition {
		case stanza.ServiceUnavailable, stanza.RecipientUnavailable, stanza.ItemNotFound,
			stanza.RemoteServerNotFound, stanza.Gone:
			return true
		}
	case ErrNotAuthorized:
		return e.Err.Condition == stanza.Forbidden || e.Err.Condition == stanza.NotAuthorized
	case ErrBadRequest:
		return e.Err.Condition == stanza.BadRequest
	}
	return false
}

// retryable reports whether a stanza error may go away by itself: the
// sender should resend later (until its deadline).
func (e *StanzaError) retryable() bool {
	if e.Err.Type == stanza.Wait {
		return true
	}
	switch e.Err.Condition {
	case stanza.ResourceConstraint, stanza.RemoteServerTimeout:
		return true
	}
	return false
}

// DeadlineError reports an op whose deadline passed. Stage says what the
// caller was waiting for.
type DeadlineError struct {
	To    jid.JID
	Op    string
	Stage string // "the op's echo", "ack", "final"
}

func (e *DeadlineError) Error() string {
	return fmt.Sprintf("vertebra: %s at %s: deadline exceeded waiting for %s", e.Op, e.To, e.Stage)
}

func (e *DeadlineError) Is(target error) bool {
	return target == ErrDeadline || target == context.DeadlineExceeded
}

// codeOf returns the code of err for a nack or error body: its
// ErrorCode() when it has one (*OpError, and the nanite package's
// RemoteError), otherwise def.
func codeOf(err error, def string) string {
	var c interface{ ErrorCode() string }
	if errors.As(err, &c) && c.ErrorCode() != "" {
		return c.ErrorCode()
	}
	switch {
	case errors.Is(err, ErrNotAuthorized):
		return CodeUnauthorized
	case errors.Is(err, context.DeadlineExceeded):
		return CodeTimeout
	}
	return def
}

// messageOf returns the message of err for a nack or error body: its
// ErrorMessage() when it has one.
func messageOf(err error) string {
	var m interface{ ErrorMessage() string }
	if errors.As(err, &m) {
		return m.ErrorMessage()
	}
	var oe *OpError
	if errors.As(err, &oe) {
		return oe.Message
	}
	return err.Error()
}

// Error is an error with a code, for handlers that want to choose the code
// of their nack or error.
type Error struct {
	Code    string
	Message string
}

func (e *Error) Error() string        { return e.Code + ": " + e.Message }
func (e *Error) ErrorCode() string    { return e.Code }
func (e *Error) ErrorMessage() string { return e.Message }
