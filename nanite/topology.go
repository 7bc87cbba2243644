package nanite

import "time"

// The topology inside one vhost (docs/protocol.md explains each part).
const (
	// ExchangeRegistration is the fanout on which agents publish register,
	// unregister and advertise-answers. Nanite's "registration".
	ExchangeRegistration = "nanite.registration"
	// ExchangeHeartbeat is the fanout for heartbeats. Nanite's "heartbeat".
	ExchangeHeartbeat = "nanite.heartbeat"
	// ExchangeAdvertise is the fanout every agent binds its queue to: a
	// mapper that starts publishes one advertise packet on it and every
	// agent registers again at once.
	ExchangeAdvertise = "nanite.advertise"
	// ExchangeDead is the headers exchange that dead-letters expired
	// requests back to their requester: a requester binds its reply queue
	// with x-match=all and HeaderReplyTo=<its reply queue>.
	ExchangeDead = "nanite.dead"
	// QueueMapperRequests is the shared queue of agent-originated requests
	// and pushes. Mapper daemons consume it competitively, so each request
	// is handled by exactly one mapper.
	QueueMapperRequests = "nanite.mapper.requests"
	// QueueOffline is the shared offline failsafe queue: requests for which
	// no agent was available wait here until one appears or they expire.
	QueueOffline = "nanite.offline"
	// HeaderReplyTo is the header that routes a dead-lettered request back
	// to its requester's reply queue.
	HeaderReplyTo = "nanite-reply-to"
	// AgentQueueExpiry is how long an agent's queue lives unused (no
	// consumer) before the broker deletes it. Part of the queue arguments,
	// so it is fixed by the protocol.
	AgentQueueExpiry = 24 * time.Hour
	// ReplyQueueExpiry is how long a reply queue lives unused.
	ReplyQueueExpiry = 10 * time.Minute
)

// AgentQueue is the name of the durable request queue of agent id.
func AgentQueue(id string) string { return "nanite.agent." + id }

// ReplyQueue is the name of the reply queue of an agent or mapper.
func ReplyQueue(id string) string { return "nanite.reply." + id }

func agentQueueSpec(id string) queueSpec {
	return queueSpec{Name: AgentQueue(id), Durable: true, Args: map[string]any{
		"x-dead-letter-exchange": ExchangeDead,
		"x-expires":              int64(AgentQueueExpiry / time.Millisecond),
	}}
}

func replyQueueSpec(id string) queueSpec {
	return queueSpec{Name: ReplyQueue(id), Durable: true, Args: map[string]any{
		"x-expires": int64(ReplyQueueExpiry / time.Millisecond),
	}}
}

func sharedQueueSpec(name string) queueSpec {
	return queueSpec{Name: name, Durable: true, Args: map[string]any{
		"x-dead-letter-exchange": ExchangeDead,
	}}
}

// declareCommon declares the exchanges and shared queues every participant
// relies on. Declarations are idempotent.
func declareCommon(t topology) error {
	for _, e := range []struct{ name, kind string }{
		{ExchangeRegistration, "fanout"},
		{ExchangeHeartbeat, "fanout"},
		{ExchangeAdvertise, "fanout"},
		{ExchangeDead, "headers"},
	} {
		if err := t.SharedExchange(e.name, e.kind); err != nil {
			return err
		}
	}
	for _, q := range []string{QueueMapperRequests, QueueOffline} {
		if err := t.SharedQueue(sharedQueueSpec(q)); err != nil {
			return err
		}
	}
	return nil
}

// declareReplyQueue declares id's reply queue and binds it to the dead-letter
// exchange so that its expired requests come back to it.
func declareReplyQueue(t topology, id string) error {
	q := replyQueueSpec(id)
	if err := t.Queue(q); err != nil {
		return err
	}
	return t.Bind(q.Name, ExchangeDead, "", map[string]any{"x-match": "all", HeaderReplyTo: q.Name})
}
