"""The page's server: uvicorn in a thread of the executor's process.

Must never: listen anywhere but the configured address, or keep the executor from stopping (a live view's
stream ends when the server closes).
"""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

from ...errors import ConfigError
from ...settings import Settings
from ...store import Store
from .app import create_app

log = logging.getLogger(__name__)


class WebServer:
    """uvicorn in a thread of the executor's process."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.closing = threading.Event()  # live views end their streams when it is set
        app = create_app(settings, store, self.closing)
        config = uvicorn.Config(app, host=settings.ui_host, port=settings.ui_port or 0, log_config=None,
                                access_log=False, lifespan="off", server_header=False, timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="web", daemon=True)
        self.host = settings.ui_host

    def start(self, timeout: float = 15.0) -> WebServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the review web page cannot listen on {self.host}:{self.server.config.port} "
                                  "(EXECUTOR_UI_HOST / EXECUTOR_UI_PORT); see the log")
            time.sleep(0.05)
        log.info("review web page serving", extra={"action": "web", "host": self.host, "port": self.port})
        return self

    @property
    def port(self) -> int:
        for server in self.server.servers:
            for sock in server.sockets:
                return sock.getsockname()[1]
        return self.server.config.port

    def close(self) -> None:
        self.closing.set()
        self.server.should_exit = True
        self.thread.join(timeout=15)


def serve_web(settings: Settings, store: Store) -> WebServer | None:
    """Start the page when ``ui_port`` is set."""
    if settings.ui_port is None:
        return None
    return WebServer(settings, store).start()
