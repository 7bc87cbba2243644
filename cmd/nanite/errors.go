package main

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"syscall"

	"github.com/nanite-go/nanite/nanite"
)

// Exit codes of the nanite command.
const (
	exitOK         = 0 // success
	exitError      = 1 // any other failure
	exitUsage      = 2 // bad flags, arguments or configuration
	exitNoAgent    = 3 // no agent offers the service (or matches target and tags)
	exitTimeout    = 4 // the request's deadline passed
	exitRemote     = 5 // an agent answered with an error
	exitConnection = 6 // the broker could not be reached or refused us
	exitDenied     = 7 // nanite policy check: the policy denies the call
)

// exitCodesHelp documents the exit codes in --help.
const exitCodesHelp = `Exit codes:
  0  success
  1  any other failure
  2  usage: bad flags, arguments or configuration
  3  no agent offers the service (or matches --target and --tag)
  4  the request timed out
  5  an agent answered with an error
  6  the broker could not be reached, or refused the credentials or vhost
  7  nanite policy check: the policy denies the call`

// exitCode maps an error to the exit code of the process. It is the only
// place that knows the mapping.
func exitCode(err error) int {
	var ue *usageError
	var de *deniedError
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &ue):
		return exitUsage
	case errors.As(err, &de):
		return exitDenied
	case isConnectionError(err):
		return exitConnection
	case errors.Is(err, nanite.ErrNoAgent):
		return exitNoAgent
	case errors.Is(err, nanite.ErrTimeout):
		return exitTimeout
	case errors.Is(err, nanite.ErrRemote):
		return exitRemote
	}
	return exitError
}

// usageError is a bad flag, argument or configuration (exit code 2).
type usageError struct{ err error }

func (e *usageError) Error() string { return e.err.Error() }
func (e *usageError) Unwrap() error { return e.err }

func usageErrorf(format string, args ...any) error {
	return &usageError{fmt.Errorf(format, args...)}
}

// connectionError reports that the broker at URL could not be reached or
// refused us (exit code 6).
type connectionError struct {
	URL string
	Err error
}

func (e *connectionError) Error() string {
	return fmt.Sprintf("cannot connect to the broker at %s: %v", redactURL(e.URL), e.Err)
}

func (e *connectionError) Unwrap() error { return e.Err }

// isConnectionError reports whether err says that the broker is out of
// reach: a connectionError, or a network error anywhere in the chain.
func isConnectionError(err error) bool {
	var ce *connectionError
	var oe *net.OpError
	var de *net.DNSError
	return errors.As(err, &ce) || errors.As(err, &oe) || errors.As(err, &de) ||
		errors.Is(err, syscall.ECONNREFUSED)
}

// redactURL hides the password of a broker URL.
func redactURL(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		return "(invalid URL)"
	}
	return u.Redacted()
}
