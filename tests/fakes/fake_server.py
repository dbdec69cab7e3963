"""A stand-in for llama-server, for faults the real one won't do on demand.

Accepts llama-server's argv (only --host/--port matter) and serves GET
/health. Behaviour comes from the environment:
  FAKE_IGNORE_SIGTERM=1   keep running on SIGTERM (tests the kill fallback)
  FAKE_CHILD=1            start a grandchild that also ignores SIGTERM (tests tree kill)
  FAKE_HEALTH=503         answer /health with this status forever
  FAKE_HEALTH_HANG=1      accept /health requests and never answer them
  FAKE_COMPLETION=500     answer POST requests with this status (default 200)
  a POST body containing "slow" is answered only after 60 seconds
  FAKE_EXIT_AFTER=S       exit with code 3 after S seconds
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _arg(name: str, default: str) -> str:
    argv = sys.argv
    return argv[argv.index(name) + 1] if name in argv else default


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        if os.environ.get("FAKE_HEALTH_HANG"):
            threading.Event().wait()
        status = int(os.environ.get("FAKE_HEALTH", "200"))
        self._answer(status, b'{"status":"ok"}' if status == 200 else b'{"error":"loading"}')

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if b"slow" in body:
            threading.Event().wait(60)
        status = int(os.environ.get("FAKE_COMPLETION", "200"))
        self._answer(status, b'{"content":"x"}' if status == 200 else b'{"error":"broken"}')

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args: object) -> None:
        sys.stderr.write("fake: " + fmt % args + "\n")


def main() -> None:
    if os.environ.get("FAKE_IGNORE_SIGTERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.environ.get("FAKE_CHILD"):
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)",
            ]
        )
    exit_after = os.environ.get("FAKE_EXIT_AFTER")
    if exit_after:
        threading.Timer(float(exit_after), lambda: os._exit(3)).start()
    ThreadingHTTPServer.daemon_threads = True  # hung handlers must not keep it alive
    server = ThreadingHTTPServer(
        (_arg("--host", "127.0.0.1"), int(_arg("--port", "8080"))), Handler
    )
    print(f"fake llama-server listening on {server.server_address}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
