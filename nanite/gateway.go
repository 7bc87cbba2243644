package nanite

import "strings"

// Gateways: agents that stand, in a cluster, for something outside it (a
// bridge's proxy for a remote cluster or XMPP agent, see package bridge).

// TargetXMPP starts a target that names an XMPP JID instead of an agent
// identity: WithTarget("xmpp:app@nanite.site-b.example/agent-x"). The
// mapper sends such a request to the gateway agent carrying the tag
// GatewayTag of the JID (full JID first, then its bare JID), and the
// gateway calls the JID.
const TargetXMPP = "xmpp:"

// GatewayTag is the tag by which a gateway agent says it reaches jid: the
// JID prefixed with TargetXMPP ("xmpp:app@nanite.site-b.example").
func GatewayTag(jid string) string { return TargetXMPP + jid }

// gatewayTags returns the tags that route an "xmpp:" target: the full JID,
// then the bare JID.
func gatewayTags(target string) []string {
	jid := strings.TrimPrefix(target, TargetXMPP)
	if bare, _, ok := strings.Cut(jid, "/"); ok {
		return []string{GatewayTag(jid), GatewayTag(bare)}
	}
	return []string{GatewayTag(jid)}
}

// MultiResult is what a gateway handler returns to answer with the results
// of several agents at once (a remote cluster's fan-out): the requester
// sees one Result per record, in place of one from the gateway. Records
// name their agents (for remote agents, TargetXMPP + their JID); a record
// holds a Payload or an Error.
type MultiResult []ResultRecord
