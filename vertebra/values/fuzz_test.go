package values

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"strconv"
	"strings"
	"testing"
)

// fuzzLimits keep fuzzing fast; the limits themselves are part of what is
// tested.
var fuzzLimits = Limits{MaxDepth: 32, MaxBytes: 1 << 16, MaxValues: 4096}

// The seed corpus is in testdata/fuzz/FuzzUnmarshal and FuzzMarshal (run
// "go test -fuzz FuzzUnmarshal ./vertebra/values"); these add readable ones.
func FuzzUnmarshal(f *testing.F) {
	ns := ` xmlns="` + NS + `"`
	for _, s := range []string{
		`<struct` + ns + `><i4 name="a">1</i4><list name="l"><string>x</string><nil/></list></struct>`,
		`<double` + ns + `>1e5</double>`,
		`<base64` + ns + `>AAEC</base64>`,
		`<dateTime.iso8601` + ns + `>19980717T14:08:55</dateTime.iso8601>`,
		`<i4` + ns + `>99999999999</i4>`,
		`<struct` + ns + `><i4>1</i4></struct>`,
		`<list` + ns + `>` + strings.Repeat("<list>", 40) + strings.Repeat("</list>", 40) + `</list>`,
		`<string` + ns + `>&#0;</string>`,
		`<string` + ns + `><![CDATA[x]]><!--c--></string>`,
		`<unknown` + ns + `/>`,
		`<<<`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		out, err := Unmarshal(data, fuzzLimits)
		if err != nil {
			var ve *Error
			if !errors.As(err, &ve) || !(errors.Is(err, ErrInvalid) || errors.Is(err, ErrLimit)) {
				t.Fatalf("error is not a *Error wrapping ErrInvalid or ErrLimit: %#v", err)
			}
			return
		}
		if !json.Valid(out) {
			t.Fatalf("invalid JSON %q from %q", out, data)
		}
		if len(out) > fuzzLimits.MaxBytes+1 {
			t.Fatalf("output of %d bytes over the limit", len(out))
		}
		// What we decoded we can encode, and it decodes to the same JSON.
		x, err := Marshal(out)
		if err != nil {
			t.Fatalf("Marshal(%s) (decoded from %q): %v", out, data, err)
		}
		out2, err := Unmarshal(x, fuzzLimits)
		if err != nil {
			t.Fatalf("Unmarshal(%s) (re-encoded from %s): %v", x, out, err)
		}
		if !bytes.Equal(out, out2) {
			t.Fatalf("not a fixed point: %q -> %s -> %s -> %s", data, out, x, out2)
		}
	})
}

func FuzzMarshal(f *testing.F) {
	for _, s := range []string{
		`{"a":[1,2.5,"x",true,null,{}],"b":{"c":-2147483649}}`,
		`"\u0000"`, `"\ud800"`, `"\r\n"`, `{"":""}`, `[[[[[[]]]]]]`, `1e400`, `-0`, `{"a":1,"a":2}`,
		strings.Repeat("[", 70) + strings.Repeat("]", 70),
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		x, err := Marshal(data)
		if err != nil {
			var ve *Error
			if !errors.As(err, &ve) || !(errors.Is(err, ErrUnrepresentable) || errors.Is(err, ErrLimit)) {
				t.Fatalf("error is not a *Error wrapping ErrUnrepresentable or ErrLimit: %#v", err)
			}
			if json.Valid(data) && errors.Is(err, ErrUnrepresentable) && !strings.Contains(err.Error(), "XML cannot carry") {
				t.Fatalf("valid JSON %q refused: %v", data, err)
			}
			return
		}
		if !json.Valid(data) {
			t.Fatalf("invalid JSON %q accepted as %s", data, x)
		}
		out, err := Unmarshal(x, Limits{MaxBytes: 4 * (len(data) + 64)})
		if err != nil {
			t.Fatalf("Unmarshal(%s) from %q: %v", x, data, err)
		}
		if !jsonEquivalent(t, data, out) {
			t.Fatalf("%q -> %s -> %s", data, x, out)
		}
	})
}

// jsonEquivalent compares two JSON documents token by token: same order,
// same strings, numbers with the same text (or the same integer: -0 is 0).
func jsonEquivalent(t *testing.T, a, b []byte) bool {
	da := json.NewDecoder(bytes.NewReader(a))
	db := json.NewDecoder(bytes.NewReader(b))
	da.UseNumber()
	db.UseNumber()
	for {
		ta, ea := da.Token()
		tb, eb := db.Token()
		if ea == io.EOF && eb == io.EOF {
			return true
		}
		if ea != nil || eb != nil {
			t.Logf("token errors %v, %v", ea, eb)
			return false
		}
		na, oka := ta.(json.Number)
		nb, okb := tb.(json.Number)
		if oka && okb {
			if na == nb {
				continue
			}
			ia, e1 := strconv.ParseInt(string(na), 10, 64)
			ib, e2 := strconv.ParseInt(string(nb), 10, 64)
			if e1 == nil && e2 == nil && ia == ib {
				continue
			}
			t.Logf("numbers %s != %s", na, nb)
			return false
		}
		if ta != tb {
			t.Logf("tokens %#v != %#v", ta, tb)
			return false
		}
	}
}
