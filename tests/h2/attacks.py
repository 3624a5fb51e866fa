"""Malformed and hostile HTTP/2 against the gateway (tests/it/h2_raw.rs runs this).

Each case opens its own connection with the `h2` package's validation off (or writes
frames by hand where even that would refuse), sends what RFC 9113 calls malformed or
what floods the peer, and records what came back: the status of the stream if it was
answered, whether the stream was reset, whether the connection was closed. One JSON
object per case on stdout. Targets carry "evil" so the Rust side can tell whether any
reached the upstream.

Usage: attacks.py PORT
"""

import json
import socket
import sys
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from hyperframe.frame import ContinuationFrame, HeadersFrame

PORT = int(sys.argv[1])
AUTH = "gw.test"


def connect():
    sock = socket.create_connection(("127.0.0.1", PORT), timeout=3)
    config = h2.config.H2Configuration(
        client_side=True,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
        header_encoding="utf-8",
    )
    conn = h2.connection.H2Connection(config=config)
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def base(method, path, extra=()):
    return [(":method", method), (":scheme", "http"), (":authority", AUTH), (":path", path)] + list(extra)


def outcome(sock, conn, stream_id, wait=2.0):
    """Reads until the stream ends, is reset, or the connection closes."""
    result = {"status": None, "reset": False, "goaway": False, "closed": False}
    deadline = time.time() + wait
    while time.time() < deadline:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            break
        except OSError:
            result["closed"] = True
            break
        if not data:
            result["closed"] = True
            break
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            result["closed"] = True
            break
        for e in events:
            if isinstance(e, h2.events.ResponseReceived) and e.stream_id == stream_id:
                result["status"] = int(dict(e.headers)[":status"])
            elif isinstance(e, h2.events.StreamReset) and e.stream_id == stream_id:
                result["reset"] = True
            elif isinstance(e, h2.events.ConnectionTerminated):
                result["goaway"] = True
            elif isinstance(e, h2.events.DataReceived):
                conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        try:
            out = conn.data_to_send()
            if out:
                sock.sendall(out)
        except OSError:
            result["closed"] = True
            break
        if result["status"] is not None or result["reset"] or result["goaway"]:
            break
    return result


def simple(name, headers, body=None, end_headers_stream=None):
    sock, conn = connect()
    sid = conn.get_next_available_stream_id()
    end = body is None if end_headers_stream is None else end_headers_stream
    conn.send_headers(sid, headers, end_stream=end)
    if body is not None:
        conn.send_data(sid, body, end_stream=True)
    sock.sendall(conn.data_to_send())
    r = outcome(sock, conn, sid)
    sock.close()
    r["case"] = name
    return r


def cases():
    smuggled = b"DELETE /fhir/Observation/evil-smuggled HTTP/1.1\r\nHost: up\r\n\r\n"
    yield simple("data_on_get", base("GET", "/r4/Patient/evil-get"), smuggled)
    yield simple("data_on_head", base("HEAD", "/r4/Patient/evil-head"), smuggled)
    yield simple("data_on_delete", base("DELETE", "/r4/Observation/evil-delete"), smuggled)
    json_type = [("content-type", "application/fhir+json")]
    yield simple("content_length_over", base("POST", "/r4/Basic/evil-cl-over", json_type + [("content-length", "5")]), b'{"resourceType":"Basic"}')
    yield simple("content_length_under", base("POST", "/r4/Basic/evil-cl-under", json_type + [("content-length", "500")]), b'{"resourceType":"Basic"}')
    yield simple("content_length_on_get", base("GET", "/r4/Patient/evil-cl-get", [("content-length", "10")]), b"0123456789")
    yield simple("connection_header", base("GET", "/r4/Patient/evil-connection", [("connection", "keep-alive")]))
    yield simple("keep_alive_header", base("GET", "/r4/Patient/evil-keepalive", [("keep-alive", "timeout=5")]))
    yield simple("te_gzip", base("GET", "/r4/Patient/evil-te", [("te", "gzip")]))
    yield simple("transfer_encoding", base("POST", "/r4/Basic/evil-te-chunked", json_type + [("transfer-encoding", "chunked")]), b"5\r\nhello\r\n0\r\n\r\n")
    yield simple("upgrade", base("GET", "/r4/Patient/evil-upgrade", [("upgrade", "websocket")]))
    yield simple("uppercase_name", base("GET", "/r4/Patient/evil-upper", [("X-Evil", "1")]))
    yield simple("duplicate_path", base("GET", "/r4/Patient/evil-dup", [(":path", "/r4/Patient/evil-dup2")]))
    yield simple("pseudo_after_regular", [(":method", "GET"), (":scheme", "http"), ("x-a", "1"), (":authority", AUTH), (":path", "/r4/Patient/evil-order")])
    yield simple("unknown_pseudo", base("GET", "/r4/Patient/evil-pseudo", [(":evil", "1")]))
    yield simple("missing_path", [(":method", "GET"), (":scheme", "http"), (":authority", AUTH)])
    yield simple("empty_path", base("GET", ""))
    yield simple("connect_method", [(":method", "CONNECT"), (":authority", "evil-connect:443")])
    yield simple("host_mismatch", base("GET", "/r4/Patient/evil-host", [("host", "other.test")]))
    yield simple("padded_value", base("GET", "/r4/Patient/evil-pad", [("x-a", " v")]))
    yield simple("newline_value", base("GET", "/r4/Patient/evil-nl", [("x-a", "v\r\nx-injected: 1")]))
    yield simple("nul_value", base("GET", "/r4/Patient/evil-nul", [("x-a", "v\x00w")]))
    yield simple("space_in_path", base("GET", "/r4/Patient/evil path HTTP/1.1"))
    yield rapid_reset()
    yield continuation_flood()
    yield ping_flood()


def rapid_reset():
    """HEADERS then RST_STREAM at once, many times: the classic rapid reset."""
    sock, conn = connect()
    sent = 0
    closed = False
    for _ in range(2000):
        try:
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, base("GET", "/r4/Patient/evil-rapid-reset"), end_stream=True)
            conn.reset_stream(sid)
            sock.sendall(conn.data_to_send())
            sent += 1
        except (OSError, h2.exceptions.ProtocolError):
            closed = True
            break
    r = outcome(sock, conn, 0, wait=1.0)
    sock.close()
    r.update({"case": "rapid_reset", "sent": sent, "closed": r["closed"] or closed})
    return r


def continuation_flood():
    """A HEADERS frame never ended, then endless CONTINUATION frames (CVE-2024-27316)."""
    sock, conn = connect()
    sid = conn.get_next_available_stream_id()
    encoded = conn.encoder.encode(base("GET", "/r4/Patient/evil-continuation"))
    headers = HeadersFrame(sid, data=encoded)  # no END_HEADERS
    sent = 0
    closed = False
    try:
        sock.sendall(headers.serialize())
        junk = conn.encoder.encode([("x-junk", "a" * 1000)])
        for _ in range(20000):
            sock.sendall(ContinuationFrame(sid, data=junk).serialize())
            sent += 1
    except OSError:
        closed = True
    sock.close()
    return {"case": "continuation_flood", "status": None, "reset": False, "goaway": False,
            "closed": closed, "sent": sent}


def ping_flood():
    """PING frames sent without reading the acknowledgements."""
    sock, conn = connect()
    closed = False
    sent = 0
    try:
        for i in range(50000):
            conn.ping(i.to_bytes(8, "big"))
            sock.sendall(conn.data_to_send())
            sent += 1
    except OSError:
        closed = True
    sock.close()
    return {"case": "ping_flood", "status": None, "reset": False, "goaway": False,
            "closed": closed, "sent": sent}


def still_serving():
    """A well-formed request on a new connection after everything else."""
    return simple("still_serving", base("GET", "/r4/Patient/ok"))


if __name__ == "__main__":
    for case in cases():
        print(json.dumps(case), flush=True)
    print(json.dumps(still_serving()), flush=True)
