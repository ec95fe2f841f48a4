"""Run the emulator in a background thread, for tests, demos and the CLI.

The socket is bound before uvicorn starts (port 0 = any free port), so the address is known
up front and there is no race between picking a port and another process taking it.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

import uvicorn

from airflow_provider_fable.emulator.app import create_app
from airflow_provider_fable.emulator.settings import EmulatorSettings
from airflow_provider_fable.emulator.state import BatchStore

__all__ = ["EmulatorServer"]


class EmulatorServer:
    """An emulator listening on ``host:port`` from a daemon thread.

    Use it as a context manager (``with EmulatorServer() as server:``) or call ``start()`` and
    ``stop()``; point the SDK at ``server.base_url``.
    """

    def __init__(
        self,
        settings: EmulatorSettings | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        log_level: str = "warning",
    ) -> None:
        self.settings = settings or EmulatorSettings()
        self.host = host
        self.app = create_app(self.settings)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError:
            self._socket.close()
            raise
        self.port: int = self._socket.getsockname()[1]
        # log_config=None: leave logging to the embedding process (pytest, Airflow, the CLI)
        # instead of replacing its configuration with uvicorn's.
        config = uvicorn.Config(
            self.app,
            log_level=log_level,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        """``http://host:port`` without a trailing slash, ready for ``anthropic.Anthropic(base_url=...)``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def store(self) -> BatchStore:
        """The in-process batch store (for inspection; prefer ``/_emulator/stats`` over HTTP)."""
        return self.app.state.store

    def start(self, timeout: float = 10.0) -> EmulatorServer:
        """Start serving and return once requests are answered."""
        if self._thread is not None:
            raise RuntimeError("EmulatorServer.start() was already called")
        self._thread = threading.Thread(target=self._run, name=f"fable-emulator-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"fable emulator failed to start on {self.base_url}") from self._error
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"fable emulator did not start on {self.base_url} within {timeout}s")
            time.sleep(0.01)
        return self

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._socket])
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = exc

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and release the port (safe to call twice)."""
        if self._thread is not None and self._thread.is_alive():
            self._server.should_exit = True
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(timeout)
        self._socket.close()
        self.store.close()  # the state file, if any: a restarted server reopens it

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmulatorServer({self.base_url})"
