package bridge

import (
	"testing"
)

func TestEscapeLocalpart(t *testing.T) {
	// The examples of XEP-0106 section 5 (table 3), plus vhost names.
	cases := []struct{ in, out string }{
		{"space cadet", `space\20cadet`},
		{`call me "ishmael"`, `call\20me\20\22ishmael\22`},
		{"at&t guy", `at\26t\20guy`},
		{"d'artagnan", `d\27artagnan`},
		{"/.fanboy", `\2f.fanboy`},
		{"::foo::", `\3a\3afoo\3a\3a`},
		{"<foo>", `\3cfoo\3e`},
		{"user@host", `user\40host`},
		{`c:\net`, `c\3a\net`},
		{`c:\\net`, `c\3a\\net`},
		{`c:\cool stuff`, `c\3a\cool\20stuff`},
		{`c:\5commas`, `c\3a\5c5commas`},
		{"/nanite", `\2fnanite`},
		{"/", `\2f`},
		{"app", "app"},
		{"a/b/c", `a\2fb\2fc`},
		{`\2f`, `\5c2f`},
		{`\2F`, `\5c2F`},
		{`\zz`, `\zz`},
		{`trailing\`, `trailing\`},
		{"ünï", "ünï"},
	}
	for _, c := range cases {
		got, err := EscapeLocalpart(c.in)
		if err != nil || got != c.out {
			t.Errorf("EscapeLocalpart(%q) = %q, %v; want %q", c.in, got, err, c.out)
			continue
		}
		if back := UnescapeLocalpart(got); back != c.in {
			t.Errorf("UnescapeLocalpart(%q) = %q; want %q", got, back, c.in)
		}
	}
	for _, bad := range []string{"", " lead", "trail ", " "} {
		if got, err := EscapeLocalpart(bad); err == nil {
			t.Errorf("EscapeLocalpart(%q) = %q, want an error", bad, got)
		}
	}
}

func TestUnescapeLocalpart(t *testing.T) {
	cases := []struct{ in, out string }{
		{`\2Fnanite`, "/nanite"}, // either case of hex
		{`\5c5c`, `\5c`},         // one pass only
		{`\5c2f`, `\2f`},
		{`\41`, `\41`}, // not one of the ten
		{`a\`, `a\`},
		{`\2`, `\2`},
		{"plain", "plain"},
	}
	for _, c := range cases {
		if got := UnescapeLocalpart(c.in); got != c.out {
			t.Errorf("UnescapeLocalpart(%q) = %q; want %q", c.in, got, c.out)
		}
	}
}

func TestClusterAndAgentJID(t *testing.T) {
	c, err := ClusterJID("/nanite", "nanite.site-a.test")
	if err != nil {
		t.Fatal(err)
	}
	if got := c.String(); got != `\2fnanite@nanite.site-a.test` {
		t.Errorf("ClusterJID = %s", got)
	}
	a, err := AgentJID(c, "agent-1")
	if err != nil {
		t.Fatal(err)
	}
	if got := a.String(); got != `\2fnanite@nanite.site-a.test/agent-1` {
		t.Errorf("AgentJID = %s", got)
	}
	if _, err := ClusterJID("", "x.test"); err == nil {
		t.Error("empty vhost accepted")
	}
}

func TestParseTarget(t *testing.T) {
	j, ok, err := ParseTarget(`xmpp:app@nanite.site-b.test/agent-x`)
	if !ok || err != nil || j.String() != "app@nanite.site-b.test/agent-x" {
		t.Errorf("ParseTarget = %v %v %v", j, ok, err)
	}
	if FormatTarget(j) != `xmpp:app@nanite.site-b.test/agent-x` {
		t.Errorf("FormatTarget = %s", FormatTarget(j))
	}
	if _, ok, err := ParseTarget("agent-x"); ok || err != nil {
		t.Errorf("plain identity: ok=%v err=%v", ok, err)
	}
	for _, bad := range []string{"xmpp:", "xmpp:@x", "xmpp:a@"} {
		if _, ok, err := ParseTarget(bad); !ok || err == nil {
			t.Errorf("ParseTarget(%q): ok=%v err=%v, want an error", bad, ok, err)
		}
	}
}
