package values

import (
	"bytes"
	"encoding/json"
	"encoding/xml"
	"errors"
	"io"
	"strings"
	"testing"
)

// roundTrip converts JSON to a value element and back.
func roundTrip(t testing.TB, in string) (string, string) {
	t.Helper()
	x, err := Marshal([]byte(in))
	if err != nil {
		t.Fatalf("Marshal(%s): %v", in, err)
	}
	out, err := Unmarshal(x, Limits{})
	if err != nil {
		t.Fatalf("Unmarshal(%s) (from %s): %v", x, in, err)
	}
	return string(x), string(out)
}

func compact(t testing.TB, s string) string {
	t.Helper()
	var b bytes.Buffer
	if err := json.Compact(&b, []byte(s)); err != nil {
		t.Fatalf("compact %q: %v", s, err)
	}
	return b.String()
}

func TestRoundTrip(t *testing.T) {
	for _, in := range []string{
		`"hello"`, `""`, `"a <b> & 'c' \"d\" \\ e"`, `"line\nbreak\ttab\r\nCRLF"`, `"  spaced  "`,
		`"ünïcødé ☃ 😀"`, `0`, `1`, `-1`, `2147483647`, `-2147483648`, `2147483648`, `-2147483649`,
		`9007199254740993`, `123456789012345678901234567890`, `1.5`, `1.0`, `1.10`, `-0.0`, `1e3`, `1E-7`,
		`6.02e+23`, `true`, `false`, `null`, `[]`, `{}`, `[1,"two",3.5,true,null,[],{}]`,
		`{"a":1,"b":[{"c":null}],"":"empty key","z":{}}`, `{"b":2,"a":1}`, `{"a":1,"a":2}`,
		`{"key with space":"v","<&>":"x"}`, `[[[[[[[[[[1]]]]]]]]]]`,
	} {
		x, out := roundTrip(t, in)
		if want := compact(t, in); out != want {
			t.Errorf("%s -> %s -> %s, want %s", in, x, out, want)
		}
	}
}

func TestNegativeZeroBecomesZero(t *testing.T) {
	x, out := roundTrip(t, `-0`)
	if x != `<i4 xmlns="`+NS+`">-0</i4>` || out != `0` {
		t.Errorf("-0 -> %s -> %s", x, out)
	}
}

func TestMarshalForms(t *testing.T) {
	for in, want := range map[string]string{
		`"x"`:                  `<string xmlns="NS">x</string>`,
		`""`:                   `<string xmlns="NS"></string>`,
		`42`:                   `<i4 xmlns="NS">42</i4>`,
		`4294967296`:           `<double xmlns="NS">4294967296</double>`,
		`1.5`:                  `<double xmlns="NS">1.5</double>`,
		`true`:                 `<boolean xmlns="NS">1</boolean>`,
		`false`:                `<boolean xmlns="NS">0</boolean>`,
		`null`:                 `<nil xmlns="NS"></nil>`,
		`[1,"a"]`:              `<list xmlns="NS"><i4>1</i4><string>a</string></list>`,
		`{"a":1,"b":{"c":[]}}`: `<struct xmlns="NS"><i4 name="a">1</i4><struct name="b"><list name="c"></list></struct></struct>`,
		`"<&>\n"`:              "<string xmlns=\"NS\">&lt;&amp;&gt;\n</string>",
		`"a\r\nb"`:             `<string xmlns="NS" enc="base64">YQ0KYg==</string>`,
		`{"a\nb":1}`:           `<struct xmlns="NS"><i4 name-base64="YQpi">1</i4></struct>`,
	} {
		x, err := Marshal([]byte(in))
		if err != nil {
			t.Errorf("Marshal(%s): %v", in, err)
			continue
		}
		if want = strings.ReplaceAll(want, "NS", NS); string(x) != want {
			t.Errorf("Marshal(%s) = %s, want %s", in, x, want)
		}
	}
}

func TestUnmarshalInputForms(t *testing.T) {
	ns := ` xmlns="` + NS + `"`
	for in, want := range map[string]string{
		`<int>7</int>`:               `7`,
		`<i4> -12 </i4>`:             `-12`,
		`<i4>+5</i4>`:                `5`,
		`<boolean>true</boolean>`:    `true`,
		`<boolean> 0 </boolean>`:     `false`,
		`<double>+1.5</double>`:      `1.5`,
		`<double>.5</double>`:        `0.5`,
		`<double>1.</double>`:        `1`,
		`<double> 2.5e10 </double>`:  `2.5e10`,
		`<nil/>`:                     `null`,
		`<nil> </nil>`:               `null`,
		`<string/>`:                  `""`,
		`<base64>SGVs bG8=</base64>`: `"SGVsbG8="`,
		`<base64>SGVsbG8</base64>`:   `"SGVsbG8"`,
		`<dateTime.iso8601>19980717T14:08:55</dateTime.iso8601>`:         `"1998-07-17T14:08:55Z"`,
		`<dateTime.iso8601>2024-02-03T04:05:06+01:00</dateTime.iso8601>`: `"2024-02-03T04:05:06+01:00"`,
		`<dateTime.iso8601>2024-02-03T04:05:06.25Z</dateTime.iso8601>`:   `"2024-02-03T04:05:06.25Z"`,
		`<res> /cluster/rd00 </res>`:                                     `"/cluster/rd00"`,
		`<struct>
		   <string name="a">x</string>
		   <!-- comment -->
		   <list name="l"><res name="ignored">/r</res></list>
		 </struct>`: `{"a":"x","l":["/r"]}`,
		`<string>a<!-- c -->b</string>`:    `"ab"`,
		`<string>&#xD;&#10;</string>`:      `"\r\n"`,
		`<string><![CDATA[<x>]]></string>`: `"<x>"`,
	} {
		in2 := strings.Replace(in, ">", ns+">", 1)
		if strings.HasPrefix(in, "<nil/>") {
			in2 = `<nil` + ns + `/>`
		}
		if strings.HasPrefix(in, "<string/>") {
			in2 = `<string` + ns + `/>`
		}
		out, err := Unmarshal([]byte(in2), Limits{})
		if err != nil {
			t.Errorf("Unmarshal(%s): %v", in2, err)
			continue
		}
		if string(out) != want {
			t.Errorf("Unmarshal(%s) = %s, want %s", in2, out, want)
		}
	}
}

func TestUnmarshalErrors(t *testing.T) {
	ns := ` xmlns="` + NS + `"`
	for _, c := range []struct {
		in       string
		sentinel error
		detail   string
	}{
		{`<i4>x</i4>`, ErrInvalid, `"x" is not a 32-bit integer`},
		{`<i4>2147483648</i4>`, ErrInvalid, `not a 32-bit integer`},
		{`<i4>1.5</i4>`, ErrInvalid, `not a 32-bit integer`},
		{`<double>NaN</double>`, ErrInvalid, `not a finite number`},
		{`<double>1e999</double>x`, ErrInvalid, `text after`},
		{`<double>Inf</double>`, ErrInvalid, `not a finite number`},
		{`<boolean>yes</boolean>`, ErrInvalid, `not a boolean`},
		{`<nil>x</nil>`, ErrInvalid, `nil has text`},
		{`<base64>!!!</base64>`, ErrInvalid, `not base64`},
		{`<dateTime.iso8601>yesterday</dateTime.iso8601>`, ErrInvalid, `not an ISO 8601`},
		{`<float>1</float>`, ErrInvalid, `unknown value type <float>`},
		{`<string><b>x</b></string>`, ErrInvalid, `element <b> inside <string>`},
		{`<struct><i4>1</i4></struct>`, ErrInvalid, `without a name`},
		{`<struct>text</struct>`, ErrInvalid, `text inside <struct>`},
		{`<list><i4>1</i4><x>2</x></list>`, ErrInvalid, `<list>[1]: unknown value type <x>`},
		{`<struct><struct name="a"><i4 name="b">z</i4></struct></struct>`, ErrInvalid, `<struct>.a.b: "z" is not`},
		{`<string>unterminated`, ErrInvalid, `<string>: malformed XML`},
		{`<string>a</i4>`, ErrInvalid, `malformed XML`},
		{`<i4>1</i4><i4>2</i4>`, ErrInvalid, `more than one element`},
		{`just text`, ErrInvalid, `text outside`},
		{``, ErrInvalid, `no value element`},
	} {
		in := c.in
		if i := strings.IndexAny(in, " >/"); strings.HasPrefix(in, "<") && i > 0 {
			in = in[:i] + ns + in[i:]
		}
		_, err := Unmarshal([]byte(in), Limits{})
		var ve *Error
		if !errors.As(err, &ve) || !errors.Is(err, c.sentinel) || !strings.Contains(err.Error(), c.detail) {
			t.Errorf("Unmarshal(%s) = %v; want *Error wrapping %v containing %q", in, err, c.sentinel, c.detail)
		}
	}
	// A value in another namespace.
	if _, err := Unmarshal([]byte(`<i4>1</i4>`), Limits{}); !errors.Is(err, ErrInvalid) {
		t.Errorf("value without namespace: %v", err)
	}
}

func TestLimits(t *testing.T) {
	ns := ` xmlns="` + NS + `"`
	deep := strings.Repeat("<list>", 70) + strings.Repeat("</list>", 70)
	deep = strings.Replace(deep, "<list>", "<list"+ns+">", 1)
	if _, err := Unmarshal([]byte(deep), Limits{}); !errors.Is(err, ErrLimit) || !strings.Contains(err.Error(), "deeper than 64") {
		t.Errorf("deep nesting: %v", err)
	}
	if _, err := Unmarshal([]byte(deep), Limits{MaxDepth: 100}); err != nil {
		t.Errorf("deep nesting under a raised limit: %v", err)
	}
	big := `<string` + ns + `>` + strings.Repeat("x", 2000) + `</string>`
	if _, err := Unmarshal([]byte(big), Limits{MaxBytes: 1000}); !errors.Is(err, ErrLimit) {
		t.Errorf("huge text: %v", err)
	}
	many := `<list` + ns + `>` + strings.Repeat("<nil/>", 200) + `</list>`
	if _, err := Unmarshal([]byte(many), Limits{MaxValues: 100}); !errors.Is(err, ErrLimit) {
		t.Errorf("many values: %v", err)
	}
	// Many small strings: the total JSON size is bounded too.
	wide := `<list` + ns + `>` + strings.Repeat("<string>xxxxxxxxxx</string>", 200) + `</list>`
	if _, err := Unmarshal([]byte(wide), Limits{MaxBytes: 1000}); !errors.Is(err, ErrLimit) {
		t.Errorf("wide list: %v", err)
	}
	// Encoding refuses what decoding would refuse.
	if _, err := Marshal([]byte(strings.Repeat("[", 65) + strings.Repeat("]", 65))); !errors.Is(err, ErrLimit) {
		t.Errorf("encode deep: %v", err)
	}
}

func TestMarshalErrors(t *testing.T) {
	for _, in := range []string{`"nul\u0000"`, `{"a\u0001":1}`, `"\uffff"`, `[1,`, `{"a"}`, `1 2`, ``, `nope`, `[1]]`} {
		_, err := Marshal([]byte(in))
		var ve *Error
		if !errors.As(err, &ve) || !errors.Is(err, ErrUnrepresentable) {
			t.Errorf("Marshal(%q) = %v, want ErrUnrepresentable", in, err)
		}
	}
}

func payloadRoundTrip(t testing.TB, in []byte) (string, []byte) {
	t.Helper()
	toks, err := AppendPayload(nil, in)
	if err != nil {
		t.Fatalf("AppendPayload(%s): %v", in, err)
	}
	// Wrap in an element of the namespace, as an op does.
	all := append([]xml.Token{xml.StartElement{Name: xml.Name{Space: NS, Local: "op"}}}, toks...)
	all = append(all, xml.EndElement{Name: xml.Name{Space: NS, Local: "op"}})
	var b bytes.Buffer
	e := xml.NewEncoder(&b)
	for _, tk := range all {
		if err := e.EncodeToken(tk); err != nil {
			t.Fatal(err)
		}
	}
	_ = e.Flush()
	d := xml.NewDecoder(bytes.NewReader(b.Bytes()))
	if _, err := d.Token(); err != nil {
		t.Fatal(err)
	}
	pd := NewPayloadDecoder(Limits{})
	for {
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if st, ok := tok.(xml.StartElement); ok {
			if err := pd.Add(d, st); err != nil {
				t.Fatalf("Add (%s): %v", b.String(), err)
			}
		}
	}
	return b.String(), pd.Payload()
}

func TestPayload(t *testing.T) {
	for in, wantXML := range map[string]string{
		``:                       `<op xmlns="NS"></op>`,
		`{"a":1,"b":"x"}`:        `<op xmlns="NS"><i4 name="a">1</i4><string name="b">x</string></op>`,
		`{}`:                     `<op xmlns="NS"><struct></struct></op>`,
		`[1]`:                    `<op xmlns="NS"><list><i4>1</i4></list></op>`,
		`"s"`:                    `<op xmlns="NS"><string>s</string></op>`,
		`null`:                   `<op xmlns="NS"><nil></nil></op>`,
		` {"payload": {"n":2}} `: `<op xmlns="NS"><struct name="payload"><i4 name="n">2</i4></struct></op>`,
	} {
		x, out := payloadRoundTrip(t, []byte(in))
		if wantXML = strings.ReplaceAll(wantXML, "NS", NS); x != wantXML {
			t.Errorf("payload %s -> %s, want %s", in, x, wantXML)
		}
		want := ""
		if strings.TrimSpace(in) != "" {
			want = compact(t, in)
		}
		if string(out) != want {
			t.Errorf("payload %s -> %s -> %s", in, x, out)
		}
	}
	if _, out := payloadRoundTrip(t, nil); out != nil {
		t.Errorf("nil payload -> %q, want nil", out)
	}
}

func TestPayloadMixed(t *testing.T) {
	for _, in := range []string{
		`<op xmlns="NS"><i4 name="a">1</i4><i4>2</i4></op>`,
		`<op xmlns="NS"><i4>2</i4><i4 name="a">1</i4></op>`,
		`<op xmlns="NS"><i4>2</i4><i4>1</i4></op>`,
	} {
		d := xml.NewDecoder(strings.NewReader(strings.ReplaceAll(in, "NS", NS)))
		_, _ = d.Token()
		pd := NewPayloadDecoder(Limits{})
		var err error
		for err == nil {
			var tok xml.Token
			tok, err = d.Token()
			if st, ok := tok.(xml.StartElement); ok {
				err = pd.Add(d, st)
			}
		}
		if !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", in, err)
		}
	}
}
