package nanite

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nanite-go/nanite/security"
)

// handleRelay serves the shared queues of a mapper daemon: agent-originated
// requests (nanite.mapper.requests) and the offline failsafe queue
// (nanite.offline). Competing consumers make each message handled by exactly
// one mapper; the message is acknowledged only after the request has been
// answered, so a mapper that dies mid-relay leaves it to another one.
func (m *Mapper) handleRelay(dv delivery) {
	d := &dv
	in, err := m.cfg.Secure.open(d.Body, m.cfg.MaxPayload, security.RoleAgent, security.RoleMapper, security.RoleClient, security.RoleBridge)
	p := in.pkt
	if err != nil && m.cfg.Secure != nil && !errors.Is(err, errBadPacket) && !errors.Is(err, ErrTooLarge) {
		reason := rejectReason(err)
		m.rejects.add(reason)
		m.log.Warn("refused relayed packet", "reason", reason, "err", err)
		if token, replyTo := peekRequest(d.Body); token != "" && replyTo != "" {
			m.relayAnswer(&Packet{Token: token, ReplyTo: replyTo}, nil,
				&ErrorBody{Code: CodeUnauthorized, Message: fmt.Sprintf("mapper %s refused the request (%s): %v", m.id, reason, err)})
		}
		_ = d.Ack()
		return
	}
	if err != nil || (p.Kind != KindRequest && p.Kind != KindPush) {
		m.stats.badPackets.Add(1)
		m.log.Warn("rejected relayed packet", "err", err)
		if p != nil && p.Kind == KindRequest && p.Token != "" && p.ReplyTo != "" {
			m.relayAnswer(p, nil, &ErrorBody{Code: CodeBadRequest, Message: errString(err, "not a request")})
		}
		_ = d.Ack()
		return
	}
	// In secure mode the agents must see who asked: the original signed
	// envelope travels along as the request's origin.
	var origin json.RawMessage
	if m.cfg.Secure != nil {
		origin = p.Origin
		if len(origin) == 0 {
			origin = d.Body
		}
	}
	m.relays.Add(1)
	go func() {
		defer m.relays.Done()
		m.relay(d, p, origin)
	}()
}

func errString(err error, def string) string {
	if err == nil {
		return def
	}
	return err.Error()
}

func (m *Mapper) relay(d *delivery, p *Packet, origin json.RawMessage) {
	m.stats.relayed.Add(1)
	var o requestOptions
	o.fromPacket(p)
	o.failsafe = false
	ctx := context.Background()
	var cancel context.CancelFunc
	if dl := p.deadlineTime(); !dl.IsZero() {
		ctx, cancel = context.WithDeadline(ctx, dl)
	} else {
		ctx, cancel = context.WithTimeout(ctx, m.cfg.RequestTimeout)
	}
	defer cancel()
	if dl, ok := ctx.Deadline(); ok {
		o.timeout = time.Until(dl)
	}
	if p.Failsafe {
		m.stats.failsafeHeld.Add(1)
	}
	resp, err := m.request(ctx, p.Kind, p.Type, p.Payload, o, p.From, p.Token, origin, p.Failsafe)
	if p.Kind == KindRequest {
		var records []ResultRecord
		if resp != nil {
			for _, r := range resp.Results {
				records = append(records, ResultRecord{Agent: r.Agent, Payload: r.Payload, Error: errorBody(r.Err)})
			}
		}
		var ebody *ErrorBody
		if err != nil && len(records) == 0 {
			ebody = errorBody(err)
		} else if err != nil {
			var te *TimeoutError
			if errors.As(err, &te) {
				for _, a := range te.Missing {
					records = append(records, ResultRecord{Agent: a, Error: &ErrorBody{Code: CodeTimeout, Message: "no answer before the deadline"}})
				}
			}
		}
		m.relayAnswer(p, records, ebody)
	} else if err != nil {
		m.log.Warn("relayed push failed", "service", p.Type, "err", err)
	}
	if err := d.Ack(); err != nil {
		m.log.Warn("ack relayed request", "err", err)
	}
}

func (m *Mapper) relayAnswer(p *Packet, records []ResultRecord, ebody *ErrorBody) {
	rp := &Packet{Kind: KindResult, Token: p.Token, From: m.id, Results: records, Error: ebody}
	body, err := rp.Encode()
	if err == nil {
		body, err = m.cfg.Secure.wrap(body, false)
	}
	if err != nil {
		m.log.Error("encode relayed result", "err", err)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := m.link.publish(ctx, message{Key: p.ReplyTo, Body: body, CorrelationID: p.Token}); err != nil {
		m.log.Warn("send relayed result", "err", err)
	}
}
