"""A stand-in for llama-server, for faults the real one won't do on demand.

Accepts llama-server's argv (only --host/--port matter) and serves GET
/health; `--list-devices` answers as a CPU build does. Behaviour comes from the environment:
  FAKE_IGNORE_SIGTERM=1   keep running on SIGTERM (tests the kill fallback)
  FAKE_CHILD=1            start a grandchild that also ignores SIGTERM (tests tree kill)
  FAKE_HEALTH=503         answer /health with this status forever
  FAKE_HEALTH_HANG=1      accept /health requests and never answer them
  FAKE_COMPLETION=500     answer POST requests with this status (default 200)
  a POST body containing "slow" is answered only after 60 seconds
  FAKE_EXIT_AFTER=S       exit with code 3 after S seconds
  FAKE_LOAD_S=S           "load a model" for S seconds: /health answers 503 and
                          llama.cpp's progress dots go to stderr, one per percent
  FAKE_LOAD_STALL=1       load forever, printing nothing (a load that hangs)
  FAKE_OOM=1              print what ggml prints when a CUDA buffer does not fit,
                          and exit with code 1, as llama-server does
  FAKE_QUIET=1            no line per request on stderr
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


LOADED = threading.Event()

OOM_LINES = """\
load_tensors: offloading 24 repeating layers to GPU
ggml_backend_cuda_buffer_type_alloc_buffer: allocating 4437.80 MiB on device 0: cudaMalloc failed: out of memory
alloc_tensor_range: failed to allocate CUDA0 buffer of size 4653375488
llama_model_load: error loading model: unable to allocate CUDA0 buffer
llama_model_load_from_file_impl: failed to load model
srv    load_model: failed to load model, 'model.gguf'
main: exiting due to model loading error
"""


def load(seconds: float) -> None:
    """What llama.cpp prints while it reads a model's tensors: a dot per percent."""
    for _ in range(100):
        threading.Event().wait(seconds / 100)
        sys.stderr.write(".")
        sys.stderr.flush()
    sys.stderr.write("\nload_tensors: done\n")
    sys.stderr.flush()
    LOADED.set()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        if os.environ.get("FAKE_HEALTH_HANG"):
            threading.Event().wait()
        if not LOADED.is_set():
            self._answer(503, b'{"error":{"code":503,"message":"Loading model"}}')
            return
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
        if not os.environ.get("FAKE_QUIET"):
            sys.stderr.write("fake: " + fmt % args + "\n")


def main() -> None:
    if "--list-devices" in sys.argv:  # as a CPU build of llama-server answers
        print("Available devices:\n  (none)")
        return
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
    if os.environ.get("FAKE_OOM"):
        sys.stderr.write(OOM_LINES)
        sys.stderr.flush()
        sys.exit(1)
    exit_after = os.environ.get("FAKE_EXIT_AFTER")
    if exit_after:
        threading.Timer(float(exit_after), lambda: os._exit(3)).start()
    ThreadingHTTPServer.daemon_threads = True  # hung handlers must not keep it alive
    server = ThreadingHTTPServer(
        (_arg("--host", "127.0.0.1"), int(_arg("--port", "8080"))), Handler
    )
    print(f"fake llama-server listening on {server.server_address}", file=sys.stderr, flush=True)
    if os.environ.get("FAKE_LOAD_S"):
        threading.Thread(target=load, args=(float(os.environ["FAKE_LOAD_S"]),), daemon=True).start()
    elif not os.environ.get("FAKE_LOAD_STALL"):
        LOADED.set()
    server.serve_forever()


if __name__ == "__main__":
    main()
