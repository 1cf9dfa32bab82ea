"""Serving the dashboard's WSGI app from the stdlib HTTP server the health port already uses.

`audience-sync ui` runs a UIServer; the daemon's health handler passes every path other than
/healthz and /metrics to `run_wsgi`. One server mechanism, threaded, no extra dependency.
"""

from __future__ import annotations

import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Any, cast
from urllib.parse import unquote
from wsgiref.handlers import SimpleHandler
from wsgiref.types import WSGIApplication

log = logging.getLogger("audience_sync.ui")

SERVER_SOFTWARE = "audience-sync"


def run_wsgi(request: BaseHTTPRequestHandler, app: WSGIApplication) -> None:
    """Answer one request parsed by `request` with the WSGI `app` (PEP 3333 environ)."""
    path, _, query = request.path.partition("?")
    address = request.server.server_address
    host, port = (address[0], address[1]) if isinstance(address, tuple) else (address, "")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": request.command,
        "SCRIPT_NAME": "",
        # As wsgiref's own server does: percent-decoded, each byte as one latin-1 character.
        "PATH_INFO": unquote(path, "iso-8859-1"),
        "QUERY_STRING": query,
        "SERVER_NAME": str(host),
        "SERVER_PORT": str(port),
        "SERVER_PROTOCOL": request.request_version,
        "SERVER_SOFTWARE": SERVER_SOFTWARE,
        "REMOTE_ADDR": request.client_address[0],
        "CONTENT_TYPE": request.headers.get("Content-Type", ""),
        "CONTENT_LENGTH": request.headers.get("Content-Length", ""),
    }
    for name, value in request.headers.items():
        key = "HTTP_" + name.upper().replace("-", "_")
        if key not in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
            environ[key] = f"{environ[key]},{value}" if key in environ else value
    handler = SimpleHandler(request.rfile, cast(IO[bytes], request.wfile), sys.stderr, environ,
                            multithread=True, multiprocess=False)
    handler.server_software = SERVER_SOFTWARE
    handler.http_version = "1.0"
    handler.run(app)
    request.close_connection = True


class UIServer:
    """A threaded HTTP server answering every request with the dashboard app."""

    def __init__(self, app: WSGIApplication, host: str, port: int) -> None:
        self.server = ThreadingHTTPServer((host, port), _handler(app))
        self.server.daemon_threads = True
        self.host = host
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name="ui",
                                        daemon=True)

    def start(self) -> UIServer:
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.server.serve_forever()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(app: WSGIApplication) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            run_wsgi(self, app)

        do_HEAD = do_POST = do_GET

        def log_message(self, format: str, *args: Any) -> None:
            # The request line only: headers (where a bearer token travels) are never logged.
            log.debug("ui: " + format, *args)

    return Handler
