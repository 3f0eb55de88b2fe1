#!/usr/bin/env python3
"""Waits until a Kafka-protocol broker answers a Metadata request with at least one broker.

Usage: broker-probe.py HOST:PORT SECONDS
Speaks the wire protocol directly (Metadata v4, supported by Apache Kafka 4.x and tansu) so the
scripts need no Kafka client. Exit 0 when answered, 1 with the last error at the deadline.
"""
import socket
import struct
import sys
import time


def metadata(host: str, port: int) -> int:
    client_id = b"secureforms-probe"
    # Request header v1: api_key=3 (Metadata), api_version=4, correlation_id, client_id.
    # Body v4: topics = null (all), allow_auto_topic_creation = false.
    body = struct.pack(">hhih", 3, 4, 7, len(client_id)) + client_id + struct.pack(">ib", -1, 0)
    with socket.create_connection((host, port), timeout=2) as s:
        s.sendall(struct.pack(">i", len(body)) + body)
        size = struct.unpack(">i", recv_exact(s, 4))[0]
        resp = recv_exact(s, size)
    correlation, _throttle, brokers = struct.unpack(">iii", resp[:12])
    if correlation != 7:
        raise RuntimeError(f"unexpected correlation id {correlation}")
    return brokers


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise RuntimeError("connection closed")
        buf += chunk
    return buf


def main() -> int:
    host, port = sys.argv[1].rsplit(":", 1)
    deadline = time.monotonic() + float(sys.argv[2])
    last = "no attempt"
    while time.monotonic() < deadline:
        try:
            if metadata(host, int(port)) >= 1:
                return 0
            last = "metadata lists no broker yet"
        except (OSError, RuntimeError, struct.error) as e:
            last = str(e) or type(e).__name__
        time.sleep(0.2)
    print(f"broker-probe: {sys.argv[1]} did not answer a metadata request within {sys.argv[2]} s: {last}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
