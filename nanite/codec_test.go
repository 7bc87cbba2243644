package nanite

// The codec (codec.go) against encoding/json: fixed cases, differential
// fuzz targets (seed corpus in testdata/fuzz) and benchmarks.
//
//	go test ./nanite -run 'Codec' -v
//	go test ./nanite -run '^$' -fuzz FuzzCodecDecode -fuzztime 5m
//	go test ./nanite -run '^$' -fuzz FuzzCodecEncode -fuzztime 5m
//	go test ./nanite -run '^$' -bench Codec -benchmem

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"math/bits"
	"math/rand/v2"
	"reflect"
	"strconv"
	"strings"
	"testing"
)

// refDecodePacket is DecodePacket as it was with encoding/json only.
func refDecodePacket(b []byte, max int) (*Packet, error) {
	if max > 0 && len(b) > max {
		return nil, fmt.Errorf("%w: %d bytes exceeds the limit of %d", ErrTooLarge, len(b), max)
	}
	var p Packet
	if err := json.Unmarshal(b, &p); err != nil {
		return nil, fmt.Errorf("%w: %v", errBadPacket, err)
	}
	if err := p.validate(); err != nil {
		return &p, err
	}
	return &p, nil
}

// refEncode and refEncodeTrusted are Encode and encodeTrusted as they were
// with encoding/json only.
func refEncode(p *Packet) ([]byte, error) {
	p.Version = ProtocolVersion
	if p.Payload != nil && !json.Valid(p.Payload) {
		return nil, fmt.Errorf("nanite: encode %s packet: payload is not JSON", p.Kind)
	}
	return refEncodeTrusted(p)
}

func refEncodeTrusted(p *Packet) ([]byte, error) {
	q := *p
	q.Version = ProtocolVersion
	q.Payload = nil
	b, err := json.Marshal(&q)
	if err != nil {
		return nil, fmt.Errorf("nanite: encode %s packet: %w", p.Kind, err)
	}
	if len(p.Payload) == 0 {
		return b, nil
	}
	out := make([]byte, 0, len(b)+len(`,"payload":`)+len(p.Payload))
	out = append(out, b[:len(b)-1]...)
	out = append(out, `,"payload":`...)
	out = append(out, p.Payload...)
	return append(out, '}'), nil
}

// checkDecode fails t unless DecodePacket and refDecodePacket agree on b:
// the same error text (or none) and deeply equal packets.
func checkDecode(t *testing.T, b []byte) {
	t.Helper()
	got, gerr := DecodePacket(b, 0)
	want, werr := refDecodePacket(b, 0)
	if fmt.Sprint(gerr) != fmt.Sprint(werr) {
		t.Fatalf("decode %q:\n got error %v\nwant error %v", b, gerr, werr)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("decode %q:\n got %#v\nwant %#v", b, got, want)
	}
	// What the fast path accepts, encoding/json accepts with the same result.
	var p Packet
	d := decoder{b: b}
	if d.packet(&p) {
		var q Packet
		if err := json.Unmarshal(b, &q); err != nil {
			t.Fatalf("fast path accepted %q, encoding/json: %v", b, err)
		}
		if !reflect.DeepEqual(p, q) {
			t.Fatalf("fast path on %q:\n got %#v\nwant %#v", b, p, q)
		}
	}
	if validJSON(b) != json.Valid(b) {
		t.Fatalf("validJSON(%q) = %v, json.Valid: %v", b, validJSON(b), json.Valid(b))
	}
}

// checkEncode fails t unless Encode and encodeTrusted of p return what
// refEncode and refEncodeTrusted return, byte for byte, or the same error.
func checkEncode(t *testing.T, p *Packet) {
	t.Helper()
	q := *p
	got, gerr := p.encodeTrusted()
	want, werr := refEncodeTrusted(&q)
	if fmt.Sprint(gerr) != fmt.Sprint(werr) || !bytes.Equal(got, want) {
		t.Fatalf("encodeTrusted %#v:\n got %s, %v\nwant %s, %v", p, got, gerr, want, werr)
	}
	p1, p2 := *p, *p
	got, gerr = p1.Encode()
	want, werr = refEncode(&p2)
	if fmt.Sprint(gerr) != fmt.Sprint(werr) || !bytes.Equal(got, want) {
		t.Fatalf("Encode %#v:\n got %s, %v\nwant %s, %v", p, got, gerr, want, werr)
	}
	if !reflect.DeepEqual(p1, p2) {
		t.Fatalf("Encode left %#v, want %#v", p1, p2)
	}
	if gerr == nil {
		checkDecode(t, got)
	}
}

// codecExamples are the packets of docs/protocol.md, one or more of every
// kind. All of them take the fast path.
var codecExamples = []string{
	`{"v":1,"packet":"request","type":"/echo/say","payload":{"text":"hi"},"from":"xmpp.nanite.site-b.test","token":"tok-h","reply_to":"nanite.reply.x","hops":["nanite.site-a.test","nanite.site-b.test"],"deadline":1795704222822}`,
	`{"v":1,"packet":"request","type":"/raw/echo","payload":{"hello":"world"},"from":"mapper-497fb8c43a06","token":"96136167171f972c283bf427edf0189a","reply_to":"nanite.reply.mapper-497fb8c43a06","selector":"least_loaded","tag_match":"all","deadline":1795704214459}`,
	`{"v":1,"packet":"request","type":"/raw/echo","payload":"kept","from":"mapper-497fb8c43a06","token":"1a6097c59b7d4b8f59973883e68af299","reply_to":"nanite.reply.mapper-497fb8c43a06","selector":"least_loaded","tags":["raw"],"tag_match":"all","persistent":true,"deadline":1795704239464}`,
	`{"v":1,"packet":"request","type":"/calc/add","payload":{"a":2,"b":3},"from":"raw-requester-1","token":"tok-1","reply_to":"nanite.reply.raw-requester-1","deadline":1795704222822}`,
	`{"v":1,"packet":"request","type":"/db/query","from":"agent-7f3a","token":"fd86181707d4246df4c9a475b57351c0","reply_to":"nanite.reply.agent-7f3a","selector":"least_loaded","tag_match":"all","persistent":true,"offline_failsafe":true,"deadline":1795704590470}`,
	`{"v":1,"packet":"request","type":"/db/query","payload":{"sql":"select 1"},"from":"agent-7f3a","token":"2a11c0fb40589032be67c5d7f502794c","reply_to":"nanite.reply.agent-7f3a","selector":"all","tags":["db"],"tag_match":"all","deadline":1795704590470,"attempt":2,"target":"go-agent-1"}`,
	`{"v":1,"packet":"push","type":"/raw/echo","payload":"fire and forget","from":"mapper-497fb8c43a06","token":"566f9e78dfa7879ea28cb1d67c5bcd3f","selector":"least_loaded","tag_match":"all","deadline":1795704239471}`,
	`{"v":1,"packet":"result","payload":{"sum":5},"from":"go-agent-1","token":"tok-1"}`,
	`{"v":1,"packet":"result","payload":null,"from":"go-agent-1","token":"tok-1"}`,
	`{"v":1,"packet":"result","from":"go-agent-1","token":"tok-2","error":{"code":"unknown_service","message":"agent go-agent-1 does not offer /calc/nope"}}`,
	`{"v":1,"packet":"result","from":"go-agent-1","token":"tok-4","error":{"code":"expired","message":"deadline passed 1.001s before /calc/add ran"}}`,
	`{"v":1,"packet":"result","from":"mapper-5ab35f3cb9ba","token":"tok-8","results":[{"agent":"go-agent-1","payload":{"sum":42}},{"agent":"go-agent-2","error":{"code":"timeout","message":"no answer"}}]}`,
	`{"v":1,"packet":"result","from":"mapper-5ab35f3cb9ba","token":"tok-9","error":{"code":"no_agent","message":"nanite: no agent available: no registered agent offers /x/y"}}`,
	`{"v":1,"packet":"intermediate","payload":"adding","from":"go-agent-1","token":"tok-1","key":"step"}`,
	`{"v":1,"packet":"register","from":"go-agent-1","tags":["go"],"identity":"go-agent-1","queue":"nanite.agent.go-agent-1","services":[{"name":"/calc/add","idempotent":true},{"name":"/nanite/index","idempotent":true},{"name":"/nanite/info","idempotent":true},{"name":"/nanite/load","idempotent":true},{"name":"/nanite/ping","idempotent":true},{"name":"/nanite/services","idempotent":true},{"name":"/nanite/stats","idempotent":true},{"name":"/nanite/tags","idempotent":true},{"name":"/nanite/version","idempotent":true}],"status":0.5,"heartbeat_ms":300,"agent_version":"0.1.0","sent_at":1795704212556}`,
	`{"agent_version":"raw-0","from":"raw-agent-1","heartbeat_ms":300,"identity":"raw-agent-1","packet":"register","queue":"nanite.agent.raw-agent-1","sent_at":1795704209444,"services":[{"idempotent":true,"name":"/raw/echo"},{"name":"/raw/stream"},{"name":"/raw/retired"}],"status":0.25,"tags":["raw","lang:none"],"v":1}`,
	`{"v":1,"packet":"heartbeat","from":"go-agent-1","identity":"go-agent-1","status":0.5,"in_flight":3,"sent_at":1795704212820}`,
	`{"v":1,"packet":"unregister","from":"go-agent-1","identity":"go-agent-1","status":0.5,"sent_at":1795704213079}`,
	`{"v":1,"packet":"advertise","from":"mapper-497fb8c43a06"}`,
	// Secure mode (docs/security.md): a sealed request relayed with its
	// caller's envelope, and a sealed result.
	`{"v":1,"packet":"request","type":"/db/query","from":"agent-7f3a","token":"2a11c0fb40589032be67c5d7f502794c","reply_to":"nanite.reply.mapper-1","selector":"least_loaded","tag_match":"all","deadline":1795704590470,"to":"go-agent-1","sealed":"q83vASNFZ4mrze8BI0VniavN7wEjRWeJ","origin":{"v":1,"sig":"MEUCIQDx","cert":"MIIB"}}`,
	`{"v":1,"packet":"result","from":"go-agent-1","token":"tok-1","sealed":"3q2+7w=="}`,
}

// codecDecodeCases are corner cases of encoding/json decoding; some take
// the fast path, some fall back.
var codecDecodeCases = []string{
	``, ` `, `null`, `{}`, `[]`, `"x"`, `1`, `{`, `}`, `{"v":1,}`, `{"v":1}x`, `{"v":1} `, " \t\r\n{\"v\":1}\n",
	`{"v":1,"packet":"push","type":"/a/b"}`,
	// Whitespace everywhere; the payload keeps its own.
	" { \"v\" : 1 , \"packet\" : \"push\" , \"type\" : \"/a/b\" , \"payload\" : { \"a\" : [ 1 , 2 ] , \"b\" : \"c d\" } \n} ",
	`{"v":1,"packet":"push","type":"/a/b","payload":  "x"  }`,
	`{"v":1,"packet":"push","type":"/a/b","payload":-1.5e+3}`,
	`{"v":1,"packet":"push","type":"/a/b","payload":[]}`,
	`{"v":1,"packet":"push","type":"/a/b","payload":true}`,
	`{"v":1,"packet":"push","type":"/a/b","payload":nul}`,
	`{"v":1,"packet":"push","type":"/a/b","payload":{"a":01}}`,
	// Duplicate keys: the last wins, slices and structs merge.
	`{"v":1,"packet":"push","type":"/a/b","type":"/c/d"}`,
	`{"v":1,"packet":"register","identity":"a","services":[{"name":"a","idempotent":true},{"name":"b"}],"services":[{"name":"c"}]}`,
	`{"v":1,"packet":"result","token":"t","error":{"code":"a","message":"m"},"error":{"code":"b"}}`,
	`{"v":1,"packet":"register","identity":"a","services":[{"name":"a","name":"b"}]}`,
	`{"v":1,"packet":"push","type":"/a/b","payload":1,"payload":2}`,
	// Case-insensitive and escaped keys.
	`{"V":1,"PACKET":"push","Type":"/a/b"}`,
	`{"\u0076":1,"packet":"push","type":"/a/b"}`,
	"{\"v\":1,\"packet\":\"push\",\"type\":\"/a/b\",\"\u017fent_at\":5}",
	"{\"v\":1,\"packet\":\"push\",\"type\":\"/a/b\",\"\xff\":5}",
	`{"v":1,"packet":"push","type":"/a/b","extra":{"deep":[1,{"x":null}]},"Extra":2}`,
	`{"v":1,"packet":"register","identity":"a","services":[{"Name":"a","x":1}]}`,
	// Strings: escapes, surrogates, invalid UTF-8, control characters.
	`{"v":1,"packet":"push","type":"/a\"b\\c\/d\b\f\n\r\t\u00e9\u2028\ud83d\ude00"}`,
	`{"v":1,"packet":"push","type":"\ud800"}`,
	`{"v":1,"packet":"push","type":"\ud800\u0041"}`,
	`{"v":1,"packet":"push","type":"\udc00\ud800\udc00"}`,
	`{"v":1,"packet":"push","type":"\ud800\ud800\udc00x"}`,
	`{"v":1,"packet":"push","type":"\uD83D\uDE00\uFFFD"}`,
	`{"v":1,"packet":"push","type":"\x"}`,
	`{"v":1,"packet":"push","type":"\'"}`,
	`{"v":1,"packet":"push","type":"\u12"}`,
	`{"v":1,"packet":"push","type":"\u12g4"}`,
	"{\"v\":1,\"packet\":\"push\",\"type\":\"a\xffb\xc3\"}",
	"{\"v\":1,\"packet\":\"push\",\"type\":\"\xed\xa0\x80\"}",
	"{\"v\":1,\"packet\":\"push\",\"type\":\"é\u2028\x7f\"}",
	"{\"v\":1,\"packet\":\"push\",\"type\":\"a\nb\"}",
	"{\"v\":1,\"packet\":\"push\",\"type\":\"a\\\xffb\"}",
	// null for every kind of field.
	`{"v":1,"packet":"push","type":"/a/b","from":null,"tags":null,"persistent":null,"deadline":null,"error":null,"results":null,"services":null,"status":null}`,
	`{"v":null,"packet":null}`,
	`{"v":1,"packet":"push","type":"/a/b","tags":[null]}`,
	`{"v":1,"packet":"register","identity":"a","services":[null]}`,
	`{"v":1,"packet":"result","token":"t","results":[null,{"agent":"a","payload":null,"error":null}]}`,
	// Empty arrays and objects.
	`{"v":1,"packet":"push","type":"/a/b","tags":[],"services":[],"results":[],"error":{}}`,
	`{"v":1,"packet":"result","token":"t","results":[{}],"error":{"x":[]}}`,
	// Numbers.
	`{"v":1.0,"packet":"push","type":"/a/b"}`,
	`{"v":1e0,"packet":"push","type":"/a/b"}`,
	`{"v":-0,"packet":"push","type":"/a/b"}`,
	`{"v":01,"packet":"push","type":"/a/b"}`,
	`{"v":+1,"packet":"push","type":"/a/b"}`,
	`{"v":1,"packet":"push","type":"/a/b","deadline":9223372036854775807}`,
	`{"v":1,"packet":"push","type":"/a/b","deadline":9223372036854775808}`,
	`{"v":1,"packet":"push","type":"/a/b","deadline":-9223372036854775808}`,
	`{"v":1,"packet":"push","type":"/a/b","deadline":999999999999999999}`,
	`{"v":1,"packet":"push","type":"/a/b","deadline":1000000000000000000}`,
	`{"v":1,"packet":"push","type":"/a/b","attempt":99999999999999999999}`,
	`{"v":1,"packet":"heartbeat","identity":"a","status":1e400}`,
	`{"v":1,"packet":"heartbeat","identity":"a","status":1e-400}`,
	`{"v":1,"packet":"heartbeat","identity":"a","status":-0}`,
	`{"v":1,"packet":"heartbeat","identity":"a","status":0.1e-5}`,
	`{"v":1,"packet":"heartbeat","identity":"a","status":1.}`,
	`{"v":1,"packet":"heartbeat","identity":"a","status":.5}`,
	`{"v":1,"packet":"heartbeat","identity":"a","status":"0.5"}`,
	`{"v":1,"packet":"heartbeat","identity":"a","status":123456789012345678901234567890}`,
	// Wrong types.
	`{"v":"1","packet":"push","type":"/a/b"}`,
	`{"v":1,"packet":"push","type":7}`,
	`{"v":1,"packet":"push","type":"/a/b","persistent":"true"}`,
	`{"v":1,"packet":"push","type":"/a/b","persistent":1}`,
	`{"v":1,"packet":"push","type":"/a/b","tags":"x"}`,
	`{"v":1,"packet":"push","type":"/a/b","tags":[1]}`,
	`{"v":1,"packet":"result","token":"t","error":"x"}`,
	`{"v":1,"packet":"result","token":"t","results":{}}`,
	`{"v":1,"packet":"register","identity":"a","services":["x"]}`,
	`{"v":1,"packet":"register","identity":"a","services":[{"name":1}]}`,
	// Validation failures return the packet.
	`{"v":2,"packet":"push","type":"/a/b"}`,
	`{"v":1,"packet":"zap"}`,
	`{"v":1,"packet":"request","type":"/a/b","reply_to":"q"}`,
	`{"v":1,"packet":"advertise"}`,
	// Secure mode: to, sealed (base64), origin (raw).
	`{"v":1,"packet":"request","type":"/a/b","token":"t","reply_to":"q","to":"agent-1","sealed":"AAECA/8=","origin":{"sig":"x", "cert" : [1,2]}}`,
	`{"v":1,"packet":"result","token":"t","sealed":""}`,
	`{"v":1,"packet":"result","token":"t","sealed":null,"origin":null,"to":null}`,
	`{"v":1,"packet":"result","token":"t","sealed":"AAEC\nAw=="}`,
	`{"v":1,"packet":"result","token":"t","sealed":"AAEC\u0041w=="}`,
	"{\"v\":1,\"packet\":\"result\",\"token\":\"t\",\"sealed\":\"AAEC\r\nAw==\"}",
	`{"v":1,"packet":"result","token":"t","sealed":"AAECAw"}`,
	`{"v":1,"packet":"result","token":"t","sealed":"AAEC-w=="}`,
	`{"v":1,"packet":"result","token":"t","sealed":"AAEC\u00e9=="}`,
	`{"v":1,"packet":"result","token":"t","sealed":[1,2]}`,
	`{"v":1,"packet":"result","token":"t","sealed":"AA==","Sealed":"AQ=="}`,
	`{"v":1,"packet":"result","token":"t","origin":1,"origin":2}`,
	// Deep nesting.
	`{"v":1,"packet":"push","type":"/a/b","payload":` + strings.Repeat("[", 1500) + strings.Repeat("]", 1500) + `}`,
	`{"v":1,"packet":"push","type":"/a/b","x":` + strings.Repeat("[", 20000) + strings.Repeat("]", 20000) + `}`,
	`{"v":1,"packet":"push","type":"/a/b","x":` + strings.Repeat(`{"a":`, 999) + `1` + strings.Repeat("}", 999) + `}`,
}

func TestCodecDecode(t *testing.T) {
	for _, in := range append(codecExamples, codecDecodeCases...) {
		checkDecode(t, []byte(in))
	}
}

// TestCodecFastPath checks that real packets do not fall back to
// encoding/json.
func TestCodecFastPath(t *testing.T) {
	for _, in := range codecExamples {
		var p Packet
		d := decoder{b: []byte(in)}
		if !d.packet(&p) {
			t.Errorf("fell back to encoding/json: %s", in)
		}
	}
	for _, in := range []string{
		" { \"v\" : 1 , \"packet\" : \"push\" , \"type\" : \"/a/b\" , \"payload\" : { \"a\" : [ 1 , 2 ] } } ",
		`{"v":1,"packet":"push","type":"/a\"b\u00e9\ud83d\ude00","extra":{"deep":[1,{"x":null}]}}`,
		"{\"v\":1,\"packet\":\"push\",\"type\":\"a\xffé\"}",
		`{"v":1,"packet":"push","type":"/a/b","from":null,"tags":[],"error":null,"status":null}`,
		`{"v":1,"packet":"request","type":"/a/b","token":"t","reply_to":"q","to":"agent-1","sealed":"AAECA/8=","origin":{"sig":"x"}}`,
		`{"v":1,"packet":"result","token":"t","sealed":"AAEC\u0041w=="}`,
	} {
		var p Packet
		d := decoder{b: []byte(in)}
		if !d.packet(&p) {
			t.Errorf("fell back to encoding/json: %s", in)
		}
	}
}

func TestCodecEncode(t *testing.T) {
	for _, in := range codecExamples {
		var p Packet
		if err := json.Unmarshal([]byte(in), &p); err != nil {
			t.Fatal(err)
		}
		checkEncode(t, &p)
	}
	f := func(v float64) *float64 { return &v }
	odd := "<a&b>\"\\/\b\f\n\r\t\x00\x01\x1f\x7f é \u2028\u2029 \xff\xc3 \xed\xa0\x80 \U0001F600"
	for _, p := range []*Packet{
		{},
		{Kind: KindPush, Type: odd, From: odd, Token: odd, ReplyTo: odd, Selector: odd, Target: odd,
			Tags: []string{odd, "", "x"}, TagMatch: odd, Key: odd, Identity: odd, Queue: odd, AgentVer: odd,
			Error: &ErrorBody{Code: odd, Message: odd}, Services: []ServiceInfo{{Name: odd}, {}, {Idempotent: true}}},
		{Kind: KindRequest, Version: 7, Tags: []string{}, Services: []ServiceInfo{}, Results: []ResultRecord{},
			Deadline: -1, Attempt: math.MaxInt, Bundles: true, InFlight: math.MinInt, Interval: math.MaxInt64, SentAtUnix: math.MinInt64},
		{Kind: KindResult, Payload: json.RawMessage{}},
		{Kind: KindResult, Payload: json.RawMessage(" { \"a\" : \"<>\" } ")},
		{Kind: KindResult, Payload: json.RawMessage(`{"a":`)},
		{Kind: KindResult, Payload: json.RawMessage(`nul`)},
		{Kind: KindResult, Error: &ErrorBody{}},
		{Kind: KindResult, Results: []ResultRecord{{}, {Agent: "a", Payload: json.RawMessage{}}, {Error: &ErrorBody{}}}},
		{Kind: KindResult, Results: []ResultRecord{{Agent: "a", Payload: json.RawMessage(
			" { \"a\" : [ 1 , \"<x>&\u2028\u2029\\\" \t\\u003c\" ] , \"b\" : null }\n")}}},
		{Kind: KindResult, Results: []ResultRecord{{Agent: "a", Payload: json.RawMessage("\"\xff\xe2\x80\"")}}},
		{Kind: KindResult, Results: []ResultRecord{{Agent: "a", Payload: json.RawMessage(`{"a":}`)}}},
		{Kind: KindResult, Results: []ResultRecord{{Agent: "a", Payload: json.RawMessage(`1 2`)}}},
		{Kind: KindResult, Results: []ResultRecord{{Agent: "a", Payload: json.RawMessage(
			strings.Repeat("[", 1500) + strings.Repeat("]", 1500))}}},
		{Kind: KindResult, Results: []ResultRecord{{Agent: "a", Payload: json.RawMessage(
			strings.Repeat("[", 10001) + strings.Repeat("]", 10001))}}},
		{Kind: KindRequest, To: odd, Sealed: []byte{0, 1, 2, 0xff}, Origin: json.RawMessage(" { \"a\" : \"<&>\" } ")},
		{Kind: KindRequest, Sealed: []byte{}, Origin: json.RawMessage{}},
		{Kind: KindRequest, Origin: json.RawMessage(`{"a":`)},
		{Kind: KindRequest, Origin: json.RawMessage(strings.Repeat("[", 1500) + strings.Repeat("]", 1500))},
		{Kind: KindHeartbeat, Status: f(0)},
		{Kind: KindHeartbeat, Status: f(math.Copysign(0, -1))},
		{Kind: KindHeartbeat, Status: f(1e-7)},
		{Kind: KindHeartbeat, Status: f(1e-6)},
		{Kind: KindHeartbeat, Status: f(-1e-7)},
		{Kind: KindHeartbeat, Status: f(1e20)},
		{Kind: KindHeartbeat, Status: f(1e21)},
		{Kind: KindHeartbeat, Status: f(123456789.125)},
		{Kind: KindHeartbeat, Status: f(math.MaxFloat64)},
		{Kind: KindHeartbeat, Status: f(math.SmallestNonzeroFloat64)},
		{Kind: KindHeartbeat, Status: f(math.NaN())},
		{Kind: KindHeartbeat, Status: f(math.Inf(1))},
		{Kind: KindHeartbeat, Status: f(math.Inf(-1))},
	} {
		checkEncode(t, p)
	}
}

func TestCodecValid(t *testing.T) {
	for _, in := range []string{``, ` `, `1`, ` 1 `, `-`, `-0`, `-01`, `1.`, `1.5e`, `1.5e+`, `1.5E-7`, `"`, `"\`, `"\u"`,
		`"\u00zz"`, `"a"b`, `tru`, `true`, `truex`, `nul`, `null`, `[1,]`, `[,1]`, `[1 2]`, `{"a"}`, `{"a":}`, `{"a":1,}`,
		`{1:1}`, `{"a":1}}`, "\"\x00\"", "\"\x7f\xff\"", strings.Repeat("[", 10000) + strings.Repeat("]", 10000),
		strings.Repeat("[", 10001) + strings.Repeat("]", 10001), strings.Repeat("[", 5000) + "x"} {
		if got, want := validJSON([]byte(in)), json.Valid([]byte(in)); got != want {
			t.Errorf("validJSON(%.40q) = %v, json.Valid: %v", in, got, want)
		}
	}
}

// Long strings take a faster path (their end found with bytes.IndexByte);
// whatever sits where in them, validation and decoding agree with
// encoding/json.
func TestCodecLongStrings(t *testing.T) {
	specials := []string{``, `\"`, `\\`, `\n`, `\u00e9`, `\u12`, `\x`, "\x00", "\x1f", "\x7f", "\xc3\xa9", "\xff", `"`, `<&>`}
	for _, n := range []int{60, 100, 135, 136, 137, 143, 144, 150, 200, 1000, 10240} {
		for _, sp := range specials {
			sp, _ := strconv.Unquote(`"` + sp + `"`)
			for _, at := range []int{0, 7, 8, 63, 64, 127, 128, 135, 136, 137, 143, 144, 160, 167, 168, n - 2, n - 1} {
				if at < 0 || at > n {
					continue
				}
				body := strings.Repeat("a", at) + sp + strings.Repeat("b", n-at)
				in := []byte(`"` + body + `"`)
				if got, want := validJSON(in), json.Valid(in); got != want {
					t.Fatalf("validJSON(string of %d with %q at %d) = %v, json.Valid: %v", n, sp, at, got, want)
				}
				pkt := []byte(`{"v":1,"packet":"result","token":"t","from":"` + body + `","payload":` + string(in) + `}`)
				var want Packet
				werr := json.Unmarshal(pkt, &want)
				for _, alias := range []bool{false, true} {
					var got Packet
					gerr := unmarshalPacket(pkt, &got, alias)
					if (gerr == nil) != (werr == nil) || gerr == nil && !reflect.DeepEqual(got, want) {
						t.Fatalf("string of %d with %q at %d: got %+v, %v; encoding/json %+v, %v", n, sp, at, got, gerr, want, werr)
					}
				}
			}
		}
	}
}

// TestCodecStringStopMask checks the word-at-a-time scan against the
// byte table: the lowest flagged byte is the first stop byte.
func TestCodecStringStopMask(t *testing.T) {
	first := func(w [8]byte) int {
		for i, c := range w {
			if stringStop[c] {
				return i
			}
		}
		return 8
	}
	check := func(w [8]byte) {
		m := stringStopMask(binary.LittleEndian.Uint64(w[:]))
		got := 8
		if m != 0 {
			got = bits.TrailingZeros64(m) / 8
		}
		if want := first(w); got != want {
			t.Fatalf("%q: first stop byte at %d, mask says %d", w, want, got)
		}
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for range 200000 {
		var w [8]byte
		for i := range w {
			w[i] = byte(rng.Uint32())
			if rng.IntN(2) == 0 {
				w[i] = ' ' + byte(rng.IntN(0x60))
			}
		}
		check(w)
	}
	for pos := range 8 {
		for c := range 256 {
			for _, fill := range []byte{'a', ' ', '!', '#', '[', ']', 0x7f, 0x00, 0x1f, 0xff, '"', '\\'} {
				var w [8]byte
				for i := range w {
					w[i] = fill
				}
				w[pos] = byte(c)
				check(w)
			}
		}
	}
}

// TestCodecPacketFields fails when a member is added to Packet or one of
// its nested types, or changes type: appendPacket and decoder.packet must
// learn it first.
func TestCodecPacketFields(t *testing.T) {
	want := map[reflect.Type]string{
		reflect.TypeFor[Packet](): `v:int packet:nanite.Kind type,omitempty:string
			payload,omitempty:json.RawMessage from,omitempty:string token,omitempty:string
			reply_to,omitempty:string selector,omitempty:string target,omitempty:string
			tags,omitempty:[]string tag_match,omitempty:string persistent,omitempty:bool
			offline_failsafe,omitempty:bool deadline,omitempty:int64 attempt,omitempty:int
			bundles,omitempty:bool key,omitempty:string error,omitempty:*nanite.ErrorBody results,omitempty:[]nanite.ResultRecord
			identity,omitempty:string queue,omitempty:string services,omitempty:[]nanite.ServiceInfo
			status,omitempty:*float64 in_flight,omitempty:int heartbeat_ms,omitempty:int64
			agent_version,omitempty:string sent_at,omitempty:int64
			to,omitempty:string sealed,omitempty:[]uint8 origin,omitempty:json.RawMessage
			session,omitempty:json.RawMessage hops,omitempty:[]string :*security.Session`,
		reflect.TypeFor[ServiceInfo]():  `name:string idempotent,omitempty:bool`,
		reflect.TypeFor[ErrorBody]():    `code:string message:string`,
		reflect.TypeFor[ResultRecord](): `agent:string payload,omitempty:json.RawMessage error,omitempty:*nanite.ErrorBody`,
	}
	for typ, members := range want {
		var got []string
		for f := range typ.Fields() {
			got = append(got, f.Tag.Get("json")+":"+f.Type.String())
		}
		if strings.Join(got, " ") != strings.Join(strings.Fields(members), " ") {
			t.Errorf("%v has JSON members %q; codec.go handles %q", typ, got, strings.Fields(members))
		}
	}
}

// FuzzCodecDecode compares DecodePacket with encoding/json on arbitrary
// input, validJSON with json.Valid, and the encoding of a result record
// with the input as payload.
func FuzzCodecDecode(f *testing.F) {
	for _, in := range codecExamples {
		f.Add([]byte(in))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		checkDecode(t, b)
		if p, err := refDecodePacket(b, 0); p != nil {
			checkEncode(t, p)
		} else if err == nil {
			t.Fatal("no packet and no error")
		}
		checkEncode(t, &Packet{Kind: KindResult, Results: []ResultRecord{{Agent: "a", Payload: b}}})
	})
}

// FuzzCodecDecodeShapes is FuzzCodecDecode on packet-shaped JSON: the
// fuzzer's bytes choose members, values, escapes, whitespace and
// deviations (wrong types, case variants, duplicates) from genPacketJSON's
// vocabulary, so that most inputs get deep into the fast path.
func FuzzCodecDecodeShapes(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte("request, push, result, register, heartbeat"))
	f.Add([]byte{9, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6, 7, 7, 7, 8, 8, 8})
	f.Fuzz(func(t *testing.T, choices []byte) {
		g := &jsonGen{choices: choices}
		b := g.packet()
		checkDecode(t, b)
		if p, _ := refDecodePacket(b, 0); p != nil {
			checkEncode(t, p)
		}
	})
}

// jsonGen writes packet-shaped JSON, each choice taken from the next byte
// of choices (0 once they run out).
type jsonGen struct {
	choices []byte
	out     []byte
	depth   int
}

func (g *jsonGen) next(n int) int {
	if len(g.choices) == 0 {
		return 0
	}
	c := g.choices[0]
	g.choices = g.choices[1:]
	return int(c) % n
}

func (g *jsonGen) pick(list ...string) {
	g.out = append(g.out, list[g.next(len(list))]...)
}

func (g *jsonGen) space() { g.pick("", "", "", " ", "\n", "\t", "\r\n  ") }

// genPacketKeys are the member names genPacketJSON uses, with the kind of
// value (see jsonGen.value) each takes, and then names that are not
// members or match one only case-insensitively or after unescaping.
var genPacketKeys = []struct {
	key  string
	kind byte
}{
	{"v", 'i'}, {"packet", 'k'}, {"type", 's'}, {"payload", 'r'}, {"from", 's'}, {"token", 's'},
	{"reply_to", 's'}, {"selector", 's'}, {"target", 's'}, {"tags", 'a'}, {"tag_match", 's'},
	{"persistent", 'b'}, {"offline_failsafe", 'b'}, {"deadline", 'i'}, {"attempt", 'i'}, {"key", 's'},
	{"error", 'e'}, {"results", 'p'}, {"identity", 's'}, {"queue", 's'}, {"services", 'n'},
	{"status", 'f'}, {"in_flight", 'i'}, {"heartbeat_ms", 'i'}, {"agent_version", 's'}, {"sent_at", 'i'},
	{"to", 's'}, {"sealed", 's'}, {"origin", 'r'},
	{"extra", 'r'}, {"V", 'i'}, {"Type", 's'}, {"REPLY_TO", 's'}, {`\u0074oken`, 's'}, {"x-y", 'r'},
	{"payload ", 'r'}, {"\u017fent_at", 'i'}, {"\xff", 's'},
}

var genNested = []string{"name", "idempotent", "code", "message", "agent", "payload", "error", "Name", "zz"}

func (g *jsonGen) packet() []byte {
	g.space()
	g.out = append(g.out, '{')
	for i := range g.next(14) {
		if i > 0 {
			g.out = append(g.out, ',')
		}
		g.space()
		k := genPacketKeys[g.next(len(genPacketKeys))]
		g.out = append(append(append(g.out, '"'), k.key...), '"')
		g.space()
		g.out = append(g.out, ':')
		g.space()
		g.value(k.kind)
		g.space()
	}
	g.out = append(g.out, '}')
	g.space()
	if g.next(32) == 0 {
		g.pick("x", ",", "}", "{}")
	}
	return g.out
}

// value writes a value of the kind (i int, f float, s string, k packet
// kind, b bool, a array of strings, n services, e error, p results, r
// any), or sometimes of another kind.
func (g *jsonGen) value(kind byte) {
	if g.next(6) == 0 {
		kind = "ifskbanepr"[g.next(10)]
	}
	if g.depth > 4 {
		kind = 'i'
	}
	g.depth++
	defer func() { g.depth-- }()
	switch kind {
	case 'i':
		g.pick("1", "0", "-0", "2", "300", "1795704214459", "9223372036854775807", "9223372036854775808",
			"-9223372036854775808", "999999999999999999", "1.0", "1e3", "-1", "null", "01", "2147483648")
	case 'f':
		g.pick("0.5", "0", "-0", "1", "0.25", "1e-7", "1E21", "1e400", "-1.5e-3", "null", "123456789.125", "1.")
	case 's':
		g.pick(`"/a/b"`, `""`, `"mapper-1"`, `"a\"b\\c\/d"`, `"\u00e9\u2028\ud83d\ude00"`, `"\ud800x"`,
			"\"\xff\xc3 \xed\xa0\x80\"", `"<&>"`, `"\b\f\n\r\t"`, `null`, "\"a\x01\"", `"\x"`, `"AAECAw=="`, `"AAEC\nAw=="`, `"AAE"`)
	case 'k':
		g.pick(`"request"`, `"push"`, `"result"`, `"intermediate"`, `"register"`, `"unregister"`, `"heartbeat"`,
			`"advertise"`, `"zap"`, `"\u0072esult"`, `null`)
	case 'b':
		g.pick("true", "false", "null", "tru", `"true"`)
	case 'a':
		g.array('s')
	case 'n':
		g.array('o')
	case 'e':
		g.object()
	case 'p':
		g.array('o')
	case 'o':
		g.object()
	default: // any JSON, as payloads are
		switch g.next(4) {
		case 0:
			g.array('r')
		case 1:
			g.object()
		default:
			g.value("ifsb"[g.next(4)])
		}
	}
}

func (g *jsonGen) array(elem byte) {
	if g.next(8) == 0 {
		g.out = append(g.out, "null"...)
		return
	}
	g.out = append(g.out, '[')
	for i := range g.next(4) {
		if i > 0 {
			g.out = append(g.out, ',')
		}
		g.space()
		if g.next(12) == 0 {
			g.out = append(g.out, "null"...)
		} else {
			g.value(elem)
		}
		g.space()
	}
	g.out = append(g.out, ']')
}

func (g *jsonGen) object() {
	if g.next(8) == 0 {
		g.out = append(g.out, "null"...)
		return
	}
	g.out = append(g.out, '{')
	for i := range g.next(4) {
		if i > 0 {
			g.out = append(g.out, ',')
		}
		g.space()
		k := genNested[g.next(len(genNested))]
		g.out = append(append(append(g.out, '"'), k...), '"', ':')
		g.space()
		switch k {
		case "idempotent":
			g.value('b')
		case "payload", "zz":
			g.value('r')
		case "error":
			g.value('e')
		default:
			g.value('s')
		}
	}
	g.out = append(g.out, '}')
}

// FuzzCodecEncode compares the encoding of packets built from arbitrary
// values with encoding/json's, and decodes them back.
func FuzzCodecEncode(f *testing.F) {
	f.Add("request", "/a/b", "mapper-1", "tok", "reply", "least_loaded", "a,b", []byte(`{"x":1}`), int64(1795704214459), 0, false, true, 0.5, false, "", "", []byte(nil), "/x/y", "", []byte(nil), []byte(nil))
	f.Add("result", "", "agent<&>", "t\u2028", "", "", "", []byte(`"v"`), int64(0), 3, true, false, 1e21, true, "code", "msg\xff", []byte(` [ 1 , "<" ] `), "", "agent-1", []byte("\x00\x01sealed"), []byte(`{"sig": "<x>"}`))
	f.Add("register", "", "a", "", "", "", "", []byte(nil), int64(-5), -1, false, true, 1e-7, true, "", "", []byte(nil), "/a/b,/c/d", "", []byte{}, []byte{})
	f.Fuzz(func(t *testing.T, kind, typ, from, token, replyTo, selector, tags string, payload []byte, deadline int64,
		attempt int, persistent, hasStatus bool, status float64, hasError bool, code, message string, result []byte, services string,
		to string, sealed, origin []byte) {
		p := &Packet{Kind: Kind(kind), Type: typ, From: from, Token: token, ReplyTo: replyTo, Selector: selector,
			Target: typ, TagMatch: selector, Persistent: persistent, Failsafe: hasError, Deadline: deadline,
			Attempt: attempt, Bundles: persistent != hasStatus, Key: message, Identity: from, Queue: replyTo, InFlight: -attempt,
			Interval: -deadline, AgentVer: code, SentAtUnix: deadline / 3, To: to, Sealed: sealed, Origin: origin}
		if payload != nil {
			p.Payload = payload
		}
		if tags != "" {
			p.Tags = strings.Split(tags, ",")
		}
		if hasStatus {
			p.Status = &status
		}
		if hasError {
			p.Error = &ErrorBody{Code: code, Message: message}
		}
		if result != nil {
			p.Results = []ResultRecord{{Agent: from, Payload: result}, {Agent: code, Error: p.Error}}
		}
		if services != "" {
			for i, s := range strings.Split(services, ",") {
				p.Services = append(p.Services, ServiceInfo{Name: s, Idempotent: i%2 == 0})
			}
		}
		checkEncode(t, p)
	})
}

// Benchmarks: the codec (fast) against encoding/json (ref) for a request
// and its result with 100 B and 10 KiB payloads.

func benchCodecPackets(size int) (req, res *Packet) {
	raw := make([]byte, size)
	for i := range raw {
		raw[i] = 'a'
	}
	raw[0], raw[size-1] = '"', '"'
	req = &Packet{Kind: KindRequest, Type: "/bench/echo", Payload: raw, From: "mapper-5f0c9a1e2b3d",
		Token: "96136167171f972c283bf427edf0189a", ReplyTo: ReplyQueue("mapper-5f0c9a1e2b3d"),
		Selector: SelectLeastLoaded, TagMatch: MatchAll, Deadline: 1795704214459}
	res = &Packet{Kind: KindResult, Token: req.Token, From: "agent-5f0c9a1e2b3d", Payload: raw}
	return req, res
}

func BenchmarkCodecEncode(b *testing.B) {
	for _, size := range []int{100, 10 * 1024} {
		req, _ := benchCodecPackets(size)
		for _, impl := range []struct {
			name string
			enc  func(*Packet) ([]byte, error)
		}{{"fast", (*Packet).Encode}, {"ref", refEncode}} {
			b.Run(fmt.Sprintf("payload=%d/%s", size, impl.name), func(b *testing.B) {
				b.ReportAllocs()
				b.SetBytes(int64(size))
				for b.Loop() {
					if _, err := impl.enc(req); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

func BenchmarkCodecDecode(b *testing.B) {
	for _, size := range []int{100, 10 * 1024} {
		req, _ := benchCodecPackets(size)
		body, err := req.Encode()
		if err != nil {
			b.Fatal(err)
		}
		for _, impl := range []struct {
			name string
			dec  func([]byte, int) (*Packet, error)
		}{{"fast", DecodePacket}, {"ref", refDecodePacket}} {
			b.Run(fmt.Sprintf("payload=%d/%s", size, impl.name), func(b *testing.B) {
				b.ReportAllocs()
				b.SetBytes(int64(len(body)))
				for b.Loop() {
					if _, err := impl.dec(body, DefaultMaxPayload); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

func BenchmarkCodecHeartbeat(b *testing.B) {
	st := 0.25
	p := &Packet{Kind: KindHeartbeat, Identity: "agent-5f0c9a1e2b3d", From: "agent-5f0c9a1e2b3d", Status: &st,
		InFlight: 2, SentAtUnix: 1795704212820}
	body, err := p.Encode()
	if err != nil {
		b.Fatal(err)
	}
	b.Run("encode/fast", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			_, _ = p.encodeTrusted()
		}
	})
	b.Run("encode/ref", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			_, _ = refEncodeTrusted(p)
		}
	})
	b.Run("decode/fast", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			_, _ = DecodePacket(body, 0)
		}
	})
	b.Run("decode/ref", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			_, _ = refDecodePacket(body, 0)
		}
	})
}

// Packets decoded from a delivery's body (which nobody changes afterwards)
// refer to it instead of copying their payloads; capped, so that appending
// to a payload does not write into the body.
func TestDecodeOwnedAliases(t *testing.T) {
	b, err := (&Packet{Kind: KindResult, Token: "t", Payload: json.RawMessage(`{"a":[1,2]}`),
		Results: []ResultRecord{{Agent: "x", Payload: json.RawMessage(`"r"`)}}}).Encode()
	if err != nil {
		t.Fatal(err)
	}
	for _, alias := range []bool{false, true} {
		in := append([]byte(nil), b...)
		p, err := decodePacket(in, 0, alias)
		if err != nil {
			t.Fatal(err)
		}
		if string(p.Payload) != `{"a":[1,2]}` || string(p.Results[0].Payload) != `"r"` {
			t.Fatalf("payloads %s %s", p.Payload, p.Results[0].Payload)
		}
		if alias && cap(p.Payload) != len(p.Payload) {
			t.Fatalf("alias %v: cap %d len %d: appending would write into the body", alias, cap(p.Payload), len(p.Payload))
		}
		shared := &p.Payload[0] == &in[bytes.Index(in, p.Payload)]
		if shared != alias {
			t.Fatalf("alias %v: payload shares the body: %v", alias, shared)
		}
	}
}
