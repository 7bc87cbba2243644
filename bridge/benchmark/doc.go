// Package benchmark measures a cross-site request through two bridges
// against the raw legs it is made of, side by side in one run (absolute
// numbers drift on shared machines; ratios measured together do not).
//
// Two sites, A and B, each a RabbitMQ vhost (on two brokers, or two vhosts
// of one), joined by one XMPP server with four component domains: the two
// bridges' and two for the raw XMPP baseline. The sides (Config.Sides):
//
//	amqp-a  raw AMQP RPC at A: an amqp091-go echo consumer answering to the
//	        requester's exclusive reply queue by correlation id
//	        (nanite/benchmark's raw baseline), on site A's vhost
//	xmpp    raw XMPP component round trip: component raw-A sends an IQ-set
//	        carrying the payload as text to component raw-B, which answers
//	        with an IQ-result carrying it back, through the XMPP server
//	amqp-b  raw AMQP RPC at B, as amqp-a on site B's vhost
//	cross   the full cross-site request: a nanite requester (embedded
//	        mapper) at A asks /bench/echo; bridge A's proxy agent (the only
//	        agent offering it at A) turns it into an op to B's cluster JID;
//	        bridge B's mapper relays it to the echo agent at B; the answer
//	        goes back the same way. Every answer must equal the payload.
//
// and two optional diagnostic sides that split the cross-site request into
// what the project adds on each leg:
//
//	nanite-a  an in-cluster nanite request at A (embedded mapper to an echo
//	          agent at A): what each AMQP leg of cross costs in nanite
//	op        a vertebra op (op, echo, ack, data, final) from raw-A to an
//	          echo handler on raw-B: what the XMPP leg costs in the ops
//	          protocol
//
// The sum of the raw legs, at each number of outstanding requests, is
// p50(amqp-a) + p50(xmpp) + p50(amqp-b): the least a request crossing
// AMQP at A, XMPP, and AMQP at B could take with nothing of the project in
// it. The targets (docs/bridge.md, "Benchmark"): cross p50 at most
// TargetP50Ratio × that sum sequentially (1 outstanding), and cross
// throughput at least TargetThroughputRatio × the xmpp side's at
// TargetThroughputOutstanding.
//
// The package needs servers; StartServers starts private ones (testenv:
// the rabbitmq-server and prosody packages), or Config names existing
// ones. The sides of a cell run interleaved in ABBA order
// (nanite/benchmark.MeasureCell).
package benchmark
