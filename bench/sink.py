"""A Message Batches endpoint that reads every create body to the end and keeps none of it.

For ``bench/submit.py --sink`` only: the submit task's memory at 10M records cannot be measured
against the emulator, which keeps every created request in memory to answer it later (~2.6 GB
per million short requests). The submit task's side is unchanged: the same SDK client, the same
streamed bodies over HTTP. This server answers what a first submit calls (``count_tokens`` for
the estimate and the model check, ``POST /v1/messages/batches``, retrieve and list of its
batches), counts the requests of each body by the ``"custom_id"`` keys it streams past, and
returns batch objects shaped like the API's. It validates nothing and generates no answers:
never use it in a test (tests run against the emulator).

Run alone: ``python bench/sink.py`` prints ``sink listening on http://127.0.0.1:PORT``.
"""

from __future__ import annotations

import json
import secrets
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MARK = b'"custom_id"'


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    batches: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        return

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("request-id", "req_sink")
        self.end_headers()
        self.wfile.write(data)

    def _body_requests(self) -> int:
        """Read the body (fixed length or chunked) to the end, counting custom_id keys."""
        count, tail = 0, b""
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                data = tail + self.rfile.read(size)
                self.rfile.readline()
                count += data.count(MARK)
                tail = data[-(len(MARK) - 1) :]  # a key cut by the boundary is counted next time
        else:
            left = int(self.headers.get("content-length") or 0)
            while left:
                data = tail + self.rfile.read(min(left, 1 << 20))
                left -= len(data) - len(tail)
                count += data.count(MARK)
                tail = data[-(len(MARK) - 1) :]
        return count

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?")[0]
        if path == "/v1/messages/count_tokens":
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length)
            self._send(200, {"input_tokens": max(1, len(body) // 4)})
        elif path == "/v1/messages/batches":
            n = self._body_requests()
            batch = {
                "id": "msgbatch_" + secrets.token_hex(12),
                "type": "message_batch",
                "processing_status": "in_progress",
                "request_counts": {
                    "processing": n,
                    "succeeded": 0,
                    "errored": 0,
                    "canceled": 0,
                    "expired": 0,
                },
                "ended_at": None,
                "created_at": _now(),
                "expires_at": _now(),
                "archived_at": None,
                "cancel_initiated_at": None,
                "results_url": None,
            }
            with self.lock:
                self.batches[batch["id"]] = batch
            self._send(200, batch)
        else:
            self._send(404, {"type": "error", "error": {"type": "not_found_error", "message": path}})

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?")[0].rstrip("/")
        if path == "/v1/messages/batches":
            with self.lock:
                data = list(self.batches.values())[::-1]
            self._send(
                200,
                {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
                 "last_id": data[-1]["id"] if data else None},
            )  # fmt: skip
            return
        batch = self.batches.get(path.rsplit("/", 1)[-1])
        if batch is None:
            self._send(404, {"type": "error", "error": {"type": "not_found_error", "message": path}})
        else:
            self._send(200, batch)


def serve(port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


if __name__ == "__main__":
    _, url = serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    print(f"sink listening on {url}", flush=True)
    while True:
        time.sleep(3600)
