package vertebra

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"io"

	"mellium.im/xmlstream"
	"mellium.im/xmpp"
	"mellium.im/xmpp/jid"
	"mellium.im/xmpp/stanza"
)

const nsBind = "urn:ietf:params:xml:ns:xmpp-bind"

// bindResource is the client side of resource binding asking for resource
// (the server picks one when it is empty). mellium's BindResource (v0.22.0)
// sends an empty <resource/> whatever the JID says, so a client could not
// keep its full JID across reconnections, which callers need to reach it
// again.
func bindResource(resource string) xmpp.StreamFeature {
	return xmpp.StreamFeature{
		Name:       xml.Name{Space: nsBind, Local: "bind"},
		Necessary:  xmpp.Authn,
		Prohibited: xmpp.Ready,
		List: func(context.Context, xmlstream.TokenWriter, xml.StartElement) (bool, error) {
			return true, errors.New("vertebra: resource binding is implemented for clients only")
		},
		Parse: func(_ context.Context, d *xml.Decoder, _ *xml.StartElement) (bool, any, error) {
			return true, nil, d.Skip()
		},
		Negotiate: func(_ context.Context, s *xmpp.Session, _ any) (xmpp.SessionState, io.ReadWriter, error) {
			r := s.TokenReader()
			defer r.Close()
			w := s.TokenWriter()
			defer w.Close()

			id := newID()
			iqName := xml.Name{Space: stanza.NSClient, Local: "iq"}
			bindName := xml.Name{Space: nsBind, Local: "bind"}
			toks := []xml.Token{
				xml.StartElement{Name: iqName, Attr: []xml.Attr{
					{Name: xml.Name{Local: "type"}, Value: "set"}, {Name: xml.Name{Local: "id"}, Value: id}}},
				xml.StartElement{Name: bindName},
			}
			if resource != "" {
				toks = append(toks, xml.StartElement{Name: xml.Name{Local: "resource"}}, xml.CharData(resource),
					xml.EndElement{Name: xml.Name{Local: "resource"}})
			}
			toks = append(toks, xml.EndElement{Name: bindName}, xml.EndElement{Name: iqName})
			for _, t := range toks {
				if err := w.EncodeToken(t); err != nil {
					return 0, nil, err
				}
			}
			if err := w.Flush(); err != nil {
				return 0, nil, err
			}

			d := xml.NewTokenDecoder(r)
			var start xml.StartElement
			for {
				tok, err := d.Token()
				if err != nil {
					return 0, nil, err
				}
				if st, ok := tok.(xml.StartElement); ok {
					start = st
					break
				}
			}
			var resp struct {
				ID   string `xml:"id,attr"`
				Type string `xml:"type,attr"`
				Bind struct {
					JID string `xml:"jid"`
				} `xml:"urn:ietf:params:xml:ns:xmpp-bind bind"`
				Err *stanza.Error `xml:"error"`
			}
			if start.Name.Local != "iq" {
				return 0, nil, fmt.Errorf("vertebra: bind: expected an IQ, got <%s>", start.Name.Local)
			}
			if err := d.DecodeElement(&resp, &start); err != nil {
				return 0, nil, err
			}
			switch {
			case resp.ID != id:
				return 0, nil, fmt.Errorf("vertebra: bind: answer to IQ %q, want %q", resp.ID, id)
			case resp.Type == "error" && resp.Err != nil:
				return 0, nil, fmt.Errorf("vertebra: bind: %w", *resp.Err)
			case resp.Type != "result":
				return 0, nil, fmt.Errorf("vertebra: bind: IQ of type %q", resp.Type)
			}
			j, err := jid.Parse(resp.Bind.JID)
			if err != nil {
				return 0, nil, fmt.Errorf("vertebra: bind: %w", err)
			}
			s.UpdateAddr(j)
			return xmpp.Ready, nil, nil
		},
	}
}
