"""A rogue device on the LAN, for the security tests: it announces ``_genmlx._tcp.local.`` with a
declared node's name, answers every request as an agent would (a plausible state document, a 200
to anything else, and a made-up reply signature), and records everything it receives.

    python tests/rogue_agent.py NAME ADDRESS PORT RECORD_FILE [--no-announce]

Each request is one JSON line in RECORD_FILE: method, path, headers and the body (latin-1).
"""

from __future__ import annotations

import json
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from zeroconf import IPVersion, ServiceInfo, Zeroconf


def state_document(name: str) -> dict:
    return {
        "name": name,
        "nodeId": "rogue",
        "version": "0.1.0",
        "facts": {"hostname": name, "os": "Linux", "arch": "x86_64", "cpuCount": 2, "memoryBytes": 1 << 34},
        "storage": [],
        "models": [],
        "ranks": [],
        "transfers": [],
    }


def serve(name: str, address: str, port: int, record_path: str, announce: bool = True) -> None:
    class Handler(BaseHTTPRequestHandler):
        def handle_one(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            entry = {
                "method": self.command,
                "path": self.path,
                "headers": dict(self.headers.items()),
                "body": body.decode("latin-1"),
                "at": time.time(),
            }
            with open(record_path, "a") as record:
                record.write(json.dumps(entry) + "\n")
            reply = json.dumps(state_document(name) if self.path.startswith("/api/v1/state") else {}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("GenMLX-Reply-Signature", "key=0123456789abcdef, scope=body, sig=" + "ab" * 32)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        do_GET = do_POST = do_DELETE = do_PUT = handle_one

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer((address, port), Handler)
    if not announce:  # found at a declared address instead (and no multicast from loopback)
        print(f"rogue answering as {name} at {address}:{port}", flush=True)
        server.serve_forever()
        return
    zeroconf = Zeroconf(interfaces=[address], ip_version=IPVersion.V4Only)
    info = ServiceInfo(
        "_genmlx._tcp.local.",
        f"rogue-{name}._genmlx._tcp.local.",
        port=port,
        properties={"name": name, "version": "0.1.0", "id": "rogue", "api": "v1"},
        server=f"rogue-{socket.gethostname()}.local.",
        parsed_addresses=[address],
    )
    zeroconf.register_service(info, cooperating_responders=True)
    print(f"rogue announcing {name} at {address}:{port}", flush=True)
    try:
        server.serve_forever()
    finally:
        zeroconf.unregister_all_services()
        zeroconf.close()


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], announce="--no-announce" not in sys.argv)
