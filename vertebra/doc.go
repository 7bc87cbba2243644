// Package vertebra is the XMPP side of nanite: Vertebra's ops protocol on
// mellium.im/xmpp, XMPP agents that serve the same actors as AMQP agents,
// callers with scopes, and a resource directory (Herault). The protocol as
// spoken on the wire is documented in docs/xmpp.md.
//
// # The ops protocol
//
// A caller sends an op as an IQ-set; the responder echoes it in the
// IQ-result with the token T extended to T:S, then sends ack (or nack),
// any number of data, and final (or error), each an IQ-set the caller
// confirms with an IQ-result:
//
//	caller                                 responder
//	<op token=T type=/echo/say>  --set-->
//	                             <--result-- <op token=T:S>
//	                             <--set----- <ack token=T:S>        (confirmed by a result)
//	                             <--set----- <data token=T:S>...    (confirmed)
//	                             <--set----- <final token=T:S>      (confirmed)
//
// The responder does not wait for each confirmation before sending the
// next stanza (up to Config.Window unconfirmed), so an op costs about one
// round trip. With a caller that offers it (<meta batch="1">, which our
// callers do), the responder folds stanzas produced within Config.Hold
// into one <batch> IQ-set, and a component responder answers a quick op
// entirely in its echo: 4 stanzas per op from an XMPP agent, 2 from a
// component, instead of 8. Unconfirmed stanzas are sent again with backoff until the
// op's deadline; duplicates are recognised by (sender, token) for ops and
// by (sender, IQ id) for the rest and answered without running anything
// again; sequence numbers restore the order after resends. Every op has a
// deadline, carried as the time left in the project extension
// <meta xmlns="urn:nanite:op:0" deadline-ms="..."/> (Config.DefaultTimeout
// for peers that send none). Arguments and results are typed values (see
// package values) mapped to and from JSON.
//
// # Pieces
//
//   - [Element], [DecodeElement]: the protocol elements.
//   - [Endpoint]: the protocol engine on one session (client or
//     component): [Endpoint.Call] makes calls, an [OpHandler] serves ops.
//     Register it with [Endpoint.Handle] on the session's mux.
//   - [Dial], [Conn]: log in (STARTTLS and SASL, or XEP-0114) and keep the
//     session alive, reconnecting when the server goes away.
//   - [Agent], [ActorServer]: serve a [Handler] (a *nanite.Dispatcher) with
//     authorization ([Authorizer]) and signatures ([Verifier]), presence
//     with the load as status, disco#info and XEP-0199 ping.
//   - [Caller]: scopes direct, single (try JIDs until one accepts) and all
//     (scatter and gather).
//   - [Directory], [Advertise], [Discover]: resources with TTL, matched by
//     ancestors and prefixes.
//   - [IdentitySigner], [IdentityVerifier], [PolicyAuthorizer]: the
//     security package's identities, verifier and policy as a Signer, a
//     Verifier and an Authorizer.
//
// Of the other nanite packages it imports only security: the bridge and
// the nanite command join it to the cluster through the Handler interface.
package vertebra
