package nanite_test

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/nanite-go/nanite/nanite"
)

// An actor groups methods; method m of actor a is the service "/a/m".
func ExampleNewActor() {
	echo := func(ctx context.Context, r *nanite.Request) (any, error) { return r.Payload, nil }
	now := func(ctx context.Context, r *nanite.Request) (any, error) { return "12:00", nil }

	actor := nanite.NewActor("simple").
		Expose("echo", echo, nanite.Idempotent(), nanite.Describe("answers its payload")).
		Expose("time", now, nanite.Idempotent())
	fmt.Println(actor.Name())
	fmt.Println(actor.Services())
	// Output:
	// simple
	// [/simple/echo /simple/time]
}

// Every agent serves the introspection actor "nanite" besides its own
// actors. NewAgent does not connect: that happens in Run.
func ExampleAgent_Services() {
	a, err := nanite.NewAgent(nanite.AgentConfig{URL: "amqp://guest:guest@localhost:5672/", Identity: "agent-1"})
	if err != nil {
		fmt.Println(err)
		return
	}
	a.AddActor(nanite.NewActor("simple").Expose("echo",
		func(ctx context.Context, r *nanite.Request) (any, error) { return r.Payload, nil }, nanite.Idempotent()))
	for _, s := range a.Services() {
		fmt.Println(s.Name, s.Idempotent)
	}
	// Output:
	// /nanite/index true
	// /nanite/info true
	// /nanite/load true
	// /nanite/ping true
	// /nanite/services true
	// /nanite/stats true
	// /nanite/tags true
	// /nanite/version true
	// /simple/echo true
}

// A request to "/actor" alone calls the actor's "index" method.
func ExampleNormalizeService() {
	for _, s := range []string{"/simple/echo", "/simple", "simple/echo", "/a/b/c"} {
		n, err := nanite.NormalizeService(s)
		if err != nil {
			fmt.Println("error:", err)
			continue
		}
		fmt.Println(n)
	}
	// Output:
	// /simple/echo
	// /simple/index
	// error: nanite: service "simple/echo" must start with /
	// error: nanite: service "/a/b/c" is not of the form /actor/method
}

// DecodePacket parses and validates one packet as it arrives from the
// broker (docs/protocol.md describes every field).
func ExampleDecodePacket() {
	body := []byte(`{"v":1,"packet":"request","type":"/simple/echo","payload":"hello nanite :)",
		"from":"mapper-1","token":"9f2c1e","reply_to":"nanite.reply.mapper-1",
		"selector":"least_loaded","deadline":1700000030000,"unknown_fields":"are ignored"}`)
	p, err := nanite.DecodePacket(body, nanite.DefaultMaxPayload)
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(p.Kind, p.Type, string(p.Payload), p.Token, p.ReplyTo, p.Deadline)

	// A request needs a token and a reply queue.
	_, err = nanite.DecodePacket([]byte(`{"v":1,"packet":"request","type":"/simple/echo"}`), 0)
	fmt.Println(err)
	// Output:
	// request /simple/echo "hello nanite :)" 9f2c1e nanite.reply.mapper-1 1700000030000
	// nanite: malformed packet: request without token or reply_to
}

// Encode fills in the protocol version; fields that do not apply to the
// packet's kind are left out.
func ExamplePacket_Encode() {
	p := &nanite.Packet{Kind: nanite.KindResult, Token: "9f2c1e", From: "agent-1",
		Error: &nanite.ErrorBody{Code: nanite.CodeUnknown, Message: "agent agent-1 does not offer /simple/nope"}}
	b, err := p.Encode()
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(string(b))
	// Output:
	// {"v":1,"packet":"result","from":"agent-1","token":"9f2c1e","error":{"code":"unknown_service","message":"agent agent-1 does not offer /simple/nope"}}
}

// Errors answered by agents are *RemoteError values that match the
// package's sentinel errors by their wire code.
func ExampleRemoteError() {
	var err error = &nanite.RemoteError{Agent: "agent-1", Code: nanite.CodeAgentLost,
		Message: "agent agent-1 stopped sending heartbeats while holding the request; it may or may not have run"}
	fmt.Println(errors.Is(err, nanite.ErrAgentLost), errors.Is(err, nanite.ErrRemote), errors.Is(err, nanite.ErrTimeout))
	var re *nanite.RemoteError
	if errors.As(err, &re) {
		fmt.Println(re.Code, strings.HasPrefix(re.Error(), "nanite: agent agent-1"))
	}
	// Output:
	// true true false
	// agent_lost true
}
