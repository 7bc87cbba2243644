package provision

import (
	"regexp"
	"strings"
)

// The topology of one vhost (docs/protocol.md). These names repeat the
// constants of package nanite, which this package does not import (it
// speaks only HTTP); a test checks that they agree.
const (
	ExchangeRegistration = "nanite.registration"
	ExchangeHeartbeat    = "nanite.heartbeat"
	ExchangeAdvertise    = "nanite.advertise"
	ExchangeDead         = "nanite.dead"
	QueueMapperRequests  = "nanite.mapper.requests"
	QueueOffline         = "nanite.offline"
	// DefaultExchange is the name under which RabbitMQ checks permissions
	// on the default exchange "" (its write permission is what publishing
	// to a queue by name needs).
	DefaultExchange = "amq.default"
)

// Role is what a user is for.
type Role string

// The roles of an application's users.
const (
	// RoleMapper is for mapper daemons and for requesters (every requester
	// embeds a mapper): it keeps the cluster state and sends requests.
	RoleMapper Role = "mapper"
	// RoleAgent is for agents: either one user shared by all agents of the
	// application, or one user per agent identity (stricter).
	RoleAgent Role = "agent"
	// RoleBridge is for the XMPP bridge, which reaches into the vhost as a
	// mapper does.
	RoleBridge Role = "bridge"
)

// Permissions are RabbitMQ's three regular expressions over the names of
// exchanges and queues in one vhost.
type Permissions struct {
	Configure string `json:"configure"`
	Write     string `json:"write"`
	Read      string `json:"read"`
}

// Name patterns (PCRE, as RabbitMQ evaluates them), without anchors.
const (
	// patID matches any identity nanite accepts (nanite.ValidIdentity).
	patID = `[A-Za-z0-9][A-Za-z0-9._:-]*`
	// patSharedNames are the exchanges and shared queues every participant
	// declares on each connect.
	patSharedNames = `nanite\.(registration|heartbeat|advertise|dead|mapper\.requests|offline)`
	// patMapperState are the exclusive state queues of mappers.
	patMapperState = `nanite\.mapper\.` + patID + `\.(registration|heartbeat)`
	// patReplyAny are the reply queues of everyone.
	patReplyAny = `nanite\.reply\.` + patID
)

// anchor joins alternatives into one anchored expression.
func anchor(alts ...string) string {
	return "^(" + strings.Join(alts, "|") + ")$"
}

// AgentPermissions returns the permissions of an agent user. With an id, the
// user is that one agent's: it may configure, bind and consume only
// nanite.agent.<id> and nanite.reply.<id>. With id "", the user is shared by
// all agents of the application and the same rights extend to every
// nanite.agent.* and nanite.reply.* queue (so one agent can read, purge or
// delete another's queues, and the reply queues of mappers).
//
// lockTopology leaves out the configure permission on the shared exchanges
// and queues (see Options.LockTopology).
func AgentPermissions(id string, lockTopology bool) Permissions {
	own := `nanite\.(agent|reply)\.` + patID
	if id != "" {
		own = `nanite\.(agent|reply)\.` + regexp.QuoteMeta(id)
	}
	configure := []string{own}
	if !lockTopology {
		configure = append(configure, patSharedNames)
	}
	return Permissions{
		// Declaring (and deleting) its own queues.
		Configure: anchor(configure...),
		// Binding its own queues (queue.bind needs write on the queue);
		// publishing register/unregister and heartbeats; nanite.dead because
		// creating a queue whose dead-letter exchange it is needs write on
		// it; the default exchange for results and agent-originated
		// requests.
		Write: anchor(own, `nanite\.(registration|heartbeat|dead)`, `amq\.default`),
		// Consuming its own queues; binding them to nanite.advertise and
		// nanite.dead (queue.bind needs read on the exchange).
		Read: anchor(own, `nanite\.(advertise|dead)`),
	}
}

// MapperPermissions returns the permissions of the mapper user (mapper
// daemons and requesters: their identities are made up per process, so the
// user is shared). A mapper declares, binds and consumes its exclusive state
// queues and its reply queue, publishes requests, advertises and relayed
// results, and (as a daemon) consumes the two shared queues. It has no
// right at all on agents' queues beyond publishing to them through the
// default exchange: it cannot consume, purge, bind or delete them.
func MapperPermissions(lockTopology bool) Permissions {
	configure := []string{patMapperState, patReplyAny}
	write := []string{patMapperState, patReplyAny, `nanite\.advertise`, `amq\.default`}
	if !lockTopology {
		configure = append(configure, patSharedNames)
		// Re-creating a shared queue (its dead-letter exchange is
		// nanite.dead) needs write on nanite.dead.
		write = append(write, `nanite\.dead`)
	}
	return Permissions{
		Configure: anchor(configure...),
		Write:     anchor(write...),
		Read: anchor(patMapperState, patReplyAny, `nanite\.(registration|heartbeat|dead)`,
			`nanite\.(mapper\.requests|offline)`),
	}
}

// BridgePermissions returns the permissions of the bridge user: those of a
// mapper, as the bridge routes requests into the vhost with an embedded
// mapper. It is a separate user so that it can be rotated or revoked on its
// own.
func BridgePermissions(lockTopology bool) Permissions {
	return MapperPermissions(lockTopology)
}

// PermissionsFor returns the permissions of role (agentID only for a
// per-agent user).
func PermissionsFor(role Role, agentID string, lockTopology bool) Permissions {
	switch role {
	case RoleAgent:
		return AgentPermissions(agentID, lockTopology)
	case RoleBridge:
		return BridgePermissions(lockTopology)
	default:
		return MapperPermissions(lockTopology)
	}
}
