#!/usr/bin/env python3
"""Call one op of a Nanite XMPP agent, written only from docs/xmpp.md.

    call_op.py [options] TO OP [ARGS-JSON]

logs in as a client account (STARTTLS, verified with --ca; or --plaintext to
a loopback address), sends <op type=OP> with ARGS-JSON as typed values to the
full JID TO, confirms every ack/data/final it receives, and prints each
intermediate result as a line {"key": K, "value": V} and then the result as
the last line of JSON (null when the op sent none). Exits 0 on final; 1 on a
nack, an error or a stanza error (the body on stderr); 2 on a bad command
line or login; 4 at the deadline.

Options default to the environment: XMPP_JID, XMPP_PASSWORD, XMPP_SERVER
(host:port), XMPP_CA (PEM file).  Needs slixmpp (Debian: python3-slixmpp).
"""

import argparse
import asyncio
import base64
import ipaddress
import json
import logging
import os
import secrets
import sys
from xml.etree import ElementTree as ET

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

NS = "http://xmlschema.engineyard.com/agent/api"
META = "urn:nanite:op:0"
INT32 = (-(2**31), 2**31 - 1)


class Fail(Exception):
    def __init__(self, code, msg):
        super().__init__(msg)
        self.code = code


# ---- typed values (docs/xmpp.md, "Typed values and JSON") -----------------

def _check_xml_text(s, where):
    for ch in s:
        o = ord(ch)
        if (o < 0x20 and ch not in "\t\n\r") or o in (0xFFFE, 0xFFFF):
            raise Fail(2, f"{where}: character U+{o:04X} cannot be sent in XML")


def _set_name(el, name):
    _check_xml_text(name, "member name")
    if any(c in name for c in "\t\r\n"):
        el.set("name-base64", base64.b64encode(name.encode()).decode())
    else:
        el.set("name", name)


def encode_value(v, name=None):
    """One JSON value as one typed-value element."""
    if isinstance(v, bool):  # before int: bool is an int in Python
        el = ET.Element(f"{{{NS}}}boolean")
        el.text = "1" if v else "0"
    elif isinstance(v, int) and INT32[0] <= v <= INT32[1]:
        el = ET.Element(f"{{{NS}}}i4")
        el.text = str(v)
    elif isinstance(v, (int, float)):
        el = ET.Element(f"{{{NS}}}double")
        el.text = json.dumps(v)
    elif isinstance(v, str):
        _check_xml_text(v, "string")
        el = ET.Element(f"{{{NS}}}string")
        if "\r" in v:
            el.set("enc", "base64")
            el.text = base64.b64encode(v.encode()).decode()
        else:
            el.text = v
    elif v is None:
        el = ET.Element(f"{{{NS}}}nil")
    elif isinstance(v, list):
        el = ET.Element(f"{{{NS}}}list")
        for item in v:
            el.append(encode_value(item))
    elif isinstance(v, dict):
        el = ET.Element(f"{{{NS}}}struct")
        for k, item in v.items():
            el.append(encode_value(item, k))
    else:
        raise Fail(2, f"cannot encode {type(v).__name__}")
    if name is not None:
        _set_name(el, name)
    return el


NO_PAYLOAD = object()


def encode_payload(v):
    """A payload: named elements for a non-empty object, else one unnamed
    element (null is <nil/>); nothing for no payload."""
    if v is NO_PAYLOAD:
        return []
    if isinstance(v, dict) and v:
        return [encode_value(item, k) for k, item in v.items()]
    return [encode_value(v)]


def _local(el):
    ns, _, local = el.tag[1:].partition("}") if el.tag.startswith("{") else ("", "", el.tag)
    return ns, local


def _name(el):
    if el.get("name-base64") is not None:
        return base64.b64decode(el.get("name-base64")).decode()
    return el.get("name")


def _number(text):
    n = json.loads(text.strip())
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        raise ValueError(f"{text!r} is not a number")
    return n


def decode_value(el, path):
    ns, kind = _local(el)
    if ns != NS:
        raise Fail(1, f"{path}: unknown element {el.tag}")
    text = el.text or ""
    if kind in ("struct", "list"):
        out = {} if kind == "struct" else []
        for child in el:
            if kind == "struct":
                name = _name(child)
                if name is None:
                    raise Fail(1, f"{path}: unnamed struct member")
                out[name] = decode_value(child, f"{path}.{name}")
            else:
                out.append(decode_value(child, f"{path}[{len(out)}]"))
        return out
    if len(el):
        raise Fail(1, f"{path}: element inside <{kind}>")
    if kind == "string":
        if el.get("enc") == "base64":
            return base64.b64decode("".join(text.split())).decode()
        return text
    if kind in ("i4", "int"):
        return int(text.strip())
    if kind == "double":
        return _number(text)
    if kind == "boolean":
        t = text.strip()
        if t in ("1", "true"):
            return True
        if t in ("0", "false"):
            return False
        raise Fail(1, f"{path}: bad boolean {t!r}")
    if kind == "nil":
        return None
    if kind in ("base64", "res"):
        return "".join(text.split()) if kind == "base64" else text
    if kind == "dateTime.iso8601":
        return text.strip()  # not converted here (input only; not used by us)
    raise Fail(1, f"{path}: unknown type <{kind}>")


def decode_payload(el):
    """The values of an op/data/nack/error element as one JSON value."""
    vals = [c for c in el if _local(c)[0] != META]
    if not vals:
        return None
    named = [_name(c) is not None for c in vals]
    if all(named):
        return {_name(c): decode_value(c, "<" + _local(el)[1] + ">." + _name(c)) for c in vals}
    if len(vals) == 1 and not any(named):
        return decode_value(vals[0], "<" + _local(el)[1] + ">")
    raise Fail(1, "named and unnamed values mixed")


def error_body(el):
    body = decode_payload(el)
    if isinstance(body, dict):
        msg = next((body[k] for k in ("message", "reason", "error", "response") if k in body), body)
        return body.get("code", ""), msg
    return "", body


# ---- the caller -----------------------------------------------------------

class Caller(slixmpp.ClientXMPP):
    def __init__(self, jid, password):
        super().__init__(jid, password)
        self.ops = {}  # token T -> Op
        self.seen = set()  # (from, IQ id) of the IQ-sets already delivered
        for name in ("ack", "nack", "data", "result", "final", "error"):
            self.register_handler(Callback(
                "nanite-" + name, MatchXPath(f"{{{self.default_ns}}}iq/{{{NS}}}{name}"), self.on_set))

    def on_set(self, iq):
        if iq["type"] != "set":
            return
        el = iq.xml[0]
        token = el.get("token", "")
        t = token.rpartition(":")[0]  # S never contains ':'
        op = self.ops.get(t)
        if op is None:  # not ours (or given up): the responder stops
            r = iq.reply()
            r["type"] = "error"
            r["error"]["type"] = "cancel"
            r["error"]["condition"] = "item-not-found"
            r.send()
            return
        iq.reply().send()  # confirm every IQ-set, repeated ones too
        key = (str(iq["from"]), iq["id"])
        if key in self.seen:
            return
        self.seen.add(key)
        op.receive(el)


class Op:
    """The responder's stanzas of one op, put in order by <meta seq>."""

    def __init__(self):
        self.queue = asyncio.Queue()
        self.next = 1
        self.held = {}

    def receive(self, el):
        meta = el.find(f"{{{META}}}meta")
        seq = meta.get("seq") if meta is not None else None
        if seq is None:  # a plain Vertebra responder: arrival order
            self.queue.put_nowait(el)
            return
        seq = int(seq)
        if seq < self.next or seq in self.held:
            return
        self.held[seq] = el
        while self.next in self.held:
            self.queue.put_nowait(self.held.pop(self.next))
            self.next += 1


async def call(xmpp, to, optype, args, timeout, out):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    t = secrets.token_hex(13)
    el = ET.Element(f"{{{NS}}}op", token=t, type=optype)
    for v in encode_payload(args):
        el.append(v)
    meta = ET.SubElement(el, f"{{{META}}}meta")
    op = xmpp.ops[t] = Op()  # before sending: ack and data may beat the echo

    # Send the op; resend it with the same IQ id until the echo comes.
    iq = xmpp.make_iq_set(ito=to)
    iq.append(el)
    wait = 1.0
    while True:
        left = deadline - loop.time()
        if left <= 0:
            raise Fail(4, f"deadline: no echo for {optype} from {to}")
        meta.set("deadline-ms", str(max(1, int(left * 1000))))
        try:
            echo = await iq.send(timeout=min(wait, left))
            break
        except IqTimeout:
            wait = min(wait * 2, 8)
        except IqError as e:
            cond = e.iq["error"]["condition"]
            raise Fail(1, f"stanza error answering the op: {cond} {e.iq['error']['text']}".strip())
    echoed = echo.xml.find(f"{{{NS}}}op")
    if echoed is None or not echoed.get("token", "").startswith(t + ":"):
        raise Fail(1, f"bad echo: {ET.tostring(echo.xml).decode()}")

    result = None
    acked = False
    while True:
        left = deadline - loop.time()
        try:
            e = await asyncio.wait_for(op.queue.get(), max(left, 0.001))
        except asyncio.TimeoutError:
            raise Fail(4, f"deadline: waiting for the {'final' if acked else 'ack'}")
        kind = _local(e)[1]
        if kind == "ack":
            acked = True
        elif kind in ("data", "result"):
            value = decode_payload(e)
            m = e.find(f"{{{META}}}meta")
            if m is not None and m.get("key") is not None:
                out(json.dumps({"key": m.get("key"), "value": value}, ensure_ascii=False))
            else:
                result = value
        elif kind in ("nack", "error"):
            code, msg = error_body(e)
            raise Fail(1, f"{kind} {code}: {msg}")
        elif kind == "final":
            del xmpp.ops[t]
            return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jid", default=os.environ.get("XMPP_JID"), help="full JID to log in as (XMPP_JID)")
    ap.add_argument("--password", default=os.environ.get("XMPP_PASSWORD"), help="(XMPP_PASSWORD)")
    ap.add_argument("--server", default=os.environ.get("XMPP_SERVER"), help="host:port (XMPP_SERVER)")
    ap.add_argument("--ca", default=os.environ.get("XMPP_CA"), help="CA PEM file for STARTTLS (XMPP_CA)")
    ap.add_argument("--plaintext", action="store_true", help="no TLS (loopback servers only)")
    ap.add_argument("--timeout", type=float, default=10.0, help="the op's deadline in seconds")
    ap.add_argument("--debug", action="store_true")
    ap.add_argument("to")
    ap.add_argument("op")
    ap.add_argument("args", nargs="?", help="the arguments as JSON (none: no payload)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.DEBUG if a.debug else logging.ERROR, stream=sys.stderr)

    def die(code, msg):
        print(f"call_op: {msg}", file=sys.stderr)
        sys.exit(code)

    if not a.jid or not a.password or not a.server:
        die(2, "--jid, --password and --server (or XMPP_JID, XMPP_PASSWORD, XMPP_SERVER) are needed")
    host, _, port = a.server.rpartition(":")
    if not host or not port.isdigit():
        die(2, f"bad --server {a.server!r}: want host:port")
    if a.plaintext:
        try:
            loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            die(2, "--plaintext only to a loopback address")
    args = NO_PAYLOAD
    if a.args is not None:
        try:
            args = json.loads(a.args)
        except ValueError as e:
            die(2, f"bad arguments: {e}")

    xmpp = Caller(a.jid, a.password)
    if a.ca:
        xmpp.ca_certs = a.ca
    loop = asyncio.get_event_loop()
    session = loop.create_future()

    def failed(msg):
        if not session.done():
            session.set_exception(Fail(2, msg))

    xmpp.add_event_handler("session_start", lambda _: session.done() or session.set_result(None))
    xmpp.add_event_handler("failed_all_auth", lambda _: failed("the server refused the login"))
    xmpp.add_event_handler("connection_failed", lambda e: failed(f"cannot connect: {e}"))
    xmpp.add_event_handler("ssl_invalid_chain", lambda e: failed(f"bad server certificate: {e}"))
    xmpp.add_event_handler("disconnected", lambda _: failed("disconnected while logging in"))

    async def run():
        if a.plaintext:
            xmpp.connect((host, int(port)), force_starttls=False, disable_starttls=True)
        else:
            xmpp.connect((host, int(port)), force_starttls=True)
        try:
            await asyncio.wait_for(session, a.timeout)
        except asyncio.TimeoutError:
            raise Fail(2, "login timed out")
        return await call(xmpp, a.to, a.op, args, a.timeout, lambda line: print(line, flush=True))

    code = 0
    try:
        result = loop.run_until_complete(run())
        print(json.dumps(result, ensure_ascii=False), flush=True)
    except Fail as e:
        print(f"call_op: {e}", file=sys.stderr)
        code = e.code
    finally:
        try:  # close the stream, then stop slixmpp's own tasks
            loop.run_until_complete(xmpp.disconnect(wait=2))
        except Exception:
            pass
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    sys.exit(code)


if __name__ == "__main__":
    main()
