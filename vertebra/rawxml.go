package vertebra

import (
	"encoding/xml"
	"sync"
	"unicode/utf8"

	"mellium.im/xmpp"
	"mellium.im/xmpp/stanza"
)

// Stanzas this endpoint sends are rendered by appendStanza into XML text and
// written to the session's connection in one piece (sendRaw), rather than
// token by token through encoding/xml's encoder, for three reasons measured
// with `nanite bench-bridge` (docs/xmpp.md, "Performance"):
//
//   - encoding/xml escapes every quote in text as &#34;, and JSON text, the
//     payload of every <done> and <call>, is full of them: the XMPP server
//     (prosody's expat) and our own decoder then see a text node per quote;
//   - it repeats xmlns on every element of a namespace its parent already
//     declares (every <call> of a <batch>), an attribute more for the server
//     to parse and store per op;
//   - it is slow: an allocation per token and per attribute, where
//     appendStanza appends to one reused buffer.
//
// The XML is the same document: a stanza with no namespace of its own takes
// the stream's, and text is escaped as XML 1.0 requires (& and <, and > and
// carriage returns so that they survive), with characters XML cannot carry
// replaced by U+FFFD as encoding/xml does.

// appendStanza appends the XML text of the element toks hold to b. ok is
// false when toks hold something it does not render (tokens other than
// elements and text, namespaced attributes but xml:, unbalanced elements):
// the caller then sends the tokens through the session's encoder.
func appendStanza(b []byte, toks []xml.Token) (_ []byte, ok bool) {
	// The default namespace in scope at each open element; the stanza
	// itself is in the stream's, whatever its tokens say.
	var stack [16]string
	nss := stack[:0]
	for i, tok := range toks {
		switch t := tok.(type) {
		case xml.StartElement:
			if t.Name.Local == "" {
				return b, false
			}
			b = append(b, '<')
			b = append(b, t.Name.Local...)
			// As encoding/xml: an element without a space is in its
			// parent's, or in the one its xmlns attribute declares.
			ns := t.Name.Space
			for _, a := range t.Attr {
				if a.Name.Local == "xmlns" && a.Name.Space == "" {
					if a.Value == "" || ns != "" && ns != a.Value {
						return b, false // undeclaring, or contradicting
					}
					ns = a.Value
				}
			}
			if i == 0 {
				if ns != "" && !isStanzaNS(ns) {
					return b, false
				}
				ns = ""
			} else if ns == "" {
				ns = nss[len(nss)-1]
			} else if ns != nss[len(nss)-1] {
				b = append(b, ` xmlns="`...)
				b = appendEscaped(b, ns, true)
				b = append(b, '"')
			}
			for _, a := range t.Attr {
				switch {
				case a.Name.Local == "xmlns" && a.Name.Space == "":
					continue // written above
				case a.Name.Space == "":
				case a.Name.Space == "xml" || a.Name.Space == xmlNS:
					b = append(b, " xml:"...)
					b = append(b, a.Name.Local...)
					b = append(b, `="`...)
					b = appendEscaped(b, a.Value, true)
					b = append(b, '"')
					continue
				default:
					return b, false
				}
				b = append(b, ' ')
				b = append(b, a.Name.Local...)
				b = append(b, `="`...)
				b = appendEscaped(b, a.Value, true)
				b = append(b, '"')
			}
			b = append(b, '>')
			nss = append(nss, ns)
		case xml.EndElement:
			if len(nss) == 0 {
				return b, false
			}
			nss = nss[:len(nss)-1]
			b = append(b, "</"...)
			b = append(b, t.Name.Local...)
			b = append(b, '>')
			if len(nss) == 0 && i != len(toks)-1 {
				return b, false // more than one element
			}
		case xml.CharData:
			if len(nss) == 0 {
				return b, false
			}
			b = appendEscaped(b, []byte(t), false)
		default:
			return b, false
		}
	}
	return b, len(nss) == 0 && len(toks) > 0
}

const xmlNS = "http://www.w3.org/XML/1998/namespace"

func isStanzaNS(ns string) bool {
	return ns == stanza.NSClient || ns == stanza.NSServer || ns == "jabber:component:accept"
}

// appendEscaped appends s escaped for XML text or, with attr, for an
// attribute value in double quotes.
func appendEscaped[T string | []byte](b []byte, s T, attr bool) []byte {
	last := 0
	for i := 0; i < len(s); {
		c := s[i]
		var esc string
		n := 1
		switch {
		case c == '&':
			esc = "&amp;"
		case c == '<':
			esc = "&lt;"
		case c == '>':
			esc = "&gt;"
		case c == '\r':
			esc = "&#xD;"
		case c == '"' && attr:
			esc = "&quot;"
		case (c == '\n' || c == '\t') && attr:
			esc = "&#xA;"
			if c == '\t' {
				esc = "&#x9;"
			}
		case c < 0x20 && c != '\n' && c != '\t':
			esc = "\uFFFD"
		case c >= utf8.RuneSelf:
			var r rune
			r, n = utf8.DecodeRuneInString(string(s[i:min(i+utf8.UTFMax, len(s))]))
			if r == utf8.RuneError && n == 1 || r == 0xFFFE || r == 0xFFFF {
				esc = "\uFFFD"
			}
		}
		if esc == "" {
			i += n
			continue
		}
		b = append(b, s[last:i]...)
		b = append(b, esc...)
		i += n
		last = i
	}
	return append(b, s[last:]...)
}

var rawBufs = sync.Pool{New: func() any { b := make([]byte, 0, 2048); return &b }}

// sendTokens sends the stanza toks hold: as XML text in one write when
// appendStanza renders it, else through the session's encoder.
func sendTokens(s *xmpp.Session, toks []xml.Token) error {
	bp := rawBufs.Get().(*[]byte)
	b, ok := appendStanza((*bp)[:0], toks)
	var err error
	if ok {
		err = sendRaw(s, b)
	} else {
		err = sendStanza(s, &tokenSlice{toks: toks})
	}
	if cap(b) <= 64<<10 {
		*bp = b[:0]
		rawBufs.Put(bp)
	}
	return err
}

// sendRaw writes one stanza's XML text to s, holding the session's output
// as its encoder's writes do (flushed first, so nothing it buffered comes
// after).
func sendRaw(s *xmpp.Session, b []byte) error {
	w := s.TokenWriter()
	err := w.Flush()
	if err == nil {
		_, err = s.Conn().Write(b)
	}
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	return err
}
