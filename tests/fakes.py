"""Local fake Planhat and Segment servers: real HTTP on 127.0.0.1, one thread per request.

They check auth, paths and body shapes, enforce limits (429 + Retry-After, sizes, 5,000
items), answer 206 for end users they cannot match (and companies they cannot create), and
can be told to fail the next N
requests (500, 429, timeout, dropped connection, a stalled or trickled answer) or to hold a
request until released. EchoServer answers every request with an error that quotes its
headers, as a careless server does.
A message is recorded only when the server acknowledges it, so "none twice after
acknowledgement" is "no messageId recorded twice".
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

# Bounded waits: a fake never blocks a test for longer than this.
MAX_WAIT = 30.0


@dataclass
class Answer:
    status: int
    body: Any = None
    headers: dict[str, str] | None = None
    raw: bytes | None = None  # a body that is not JSON (HTML, text), sent as is


class _Drop(Exception):
    """Close the connection without answering."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body in one segment: split writes meet delayed ACKs and cost 40 ms each.
    wbufsize = -1
    disable_nagle_algorithm = True
    server: _Server

    def do_GET(self) -> None:
        self.server.fake.dispatch(self, "GET")

    def do_POST(self) -> None:
        self.server.fake.dispatch(self, "POST")

    def do_PUT(self) -> None:
        self.server.fake.dispatch(self, "PUT")

    def log_message(self, format: str, *args: Any) -> None:
        return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeServer


class FakeServer:
    """The machinery both fakes share; subclasses implement `route`."""

    def __init__(self, *, rate: float | None = None, burst: float = 1.0,
                 retry_after: float | None = None, timeout_delay: float = 1.0,
                 trickle_interval: float = 0.2) -> None:
        self.rate = rate
        self.trickle_interval = trickle_interval  # seconds between bytes of a trickled answer
        self.burst = burst
        self.retry_after = retry_after  # fixed Retry-After for rate-limit 429s, else computed
        self.timeout_delay = timeout_delay
        self.lock = threading.Lock()
        self.faults: deque[tuple[str, float | str]] = deque()
        self.statuses: Counter[int] = Counter()
        # (monotonic arrival time, status answered), for rate and hold checks.
        self.answers: list[tuple[float, int]] = []
        self.requests = 0
        self.acked: list[str] = []  # messageIds (or externalIds) acknowledged, in order
        self.request_bodies: list[bytes] = []
        self.auth_headers: list[str] = []
        self.raw_paths: list[str] = []  # as requested, query included
        self._tokens = burst
        self._refilled = time.monotonic()
        self._closing = threading.Event()
        self._hold_after: int | None = None
        self.held = threading.Event()
        self.release = threading.Event()
        self.in_flight = 0
        self.max_in_flight = 0
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,),
                                        daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()
        self.release.set()
        self._server.shutdown()
        self._server.server_close()

    @contextmanager
    def running(self) -> Iterator[FakeServer]:
        self.start()
        try:
            yield self
        finally:
            self.stop()

    # -- knobs -----------------------------------------------------------------------------

    def fail_next(self, count: int, kind: str, retry_after: float | str = 0.01) -> None:
        """kind: 500 | 429 | timeout | drop | stall (accept, read, never answer) | trickle (a
        200 answer sent a byte every `trickle_interval` seconds). A str retry_after is sent as
        the Retry-After header verbatim."""
        with self.lock:
            self.faults.extend([(kind, retry_after)] * count)

    def hold_after(self, acknowledged: int) -> None:
        """Once this many messages were acknowledged, park every request until `release`."""
        self._hold_after = acknowledged

    def unhold(self) -> None:
        self._hold_after = None
        self.release.set()

    def duplicates(self) -> dict[str, int]:
        return {k: n for k, n in Counter(self.acked).items() if n > 1}

    # -- request handling ------------------------------------------------------------------

    def dispatch(self, handler: _Handler, method: str) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        arrived = time.monotonic()
        with self.lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            fault = self.faults.popleft() if self.faults else None
        if fault is not None and fault[0] in ("stall", "trickle"):
            self._hang(handler, fault[0])
            with self.lock:
                self.in_flight -= 1
            return
        try:
            answer = self._answer(handler, method, body, fault)
        except _Drop:
            handler.close_connection = True
            return
        finally:
            with self.lock:
                self.in_flight -= 1
        with self.lock:
            self.statuses[answer.status] += 1
            self.answers.append((arrived, answer.status))
        payload = answer.raw if answer.raw is not None else (
            b"" if answer.body is None else json.dumps(answer.body).encode())
        handler.send_response(answer.status)
        handler.send_header("Content-Type", "application/json" if answer.raw is None
                            else "text/html")
        handler.send_header("Content-Length", str(len(payload)))
        for name, value in (answer.headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(payload)

    def _hang(self, handler: _Handler, kind: str) -> None:
        """Never answer (stall), or answer one byte at a time (trickle), until the fake stops
        or MAX_WAIT passes; the client is expected to give up long before."""
        with self.lock:
            self.statuses[0] += 1  # 0: no complete answer
        if kind == "stall":
            self._closing.wait(MAX_WAIT)
        else:
            payload = b'{"ok": true}' + b" " * 4096
            answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
            end = time.monotonic() + MAX_WAIT
            for byte in answer:
                if self._closing.wait(self.trickle_interval) or time.monotonic() > end:
                    break
                try:
                    handler.wfile.write(bytes([byte]))
                    handler.wfile.flush()
                except OSError:
                    break
        handler.close_connection = True

    def _answer(self, handler: _Handler, method: str, body: bytes,
                fault: tuple[str, float | str] | None) -> Answer:
        if fault is not None:
            kind, retry_after = fault
            if kind == "500":
                return Answer(500, {"message": "internal error (injected)"})
            if kind == "429":
                header = retry_after if isinstance(retry_after, str) else f"{retry_after:g}"
                return Answer(429, {"message": "Too many requests"}, {"Retry-After": header})
            if kind == "timeout":
                self._closing.wait(self.timeout_delay)
                raise _Drop
            raise _Drop
        if self.rate is not None:
            wait = self._take_token()
            if wait is not None:
                retry = self.retry_after if self.retry_after is not None else wait
                return Answer(429, {"message": "Too many requests"},
                              {"Retry-After": f"{retry:.3f}", "X-Rate-Limit-Remaining": "0"})
        if self._hold_after is not None:
            with self.lock:
                reached = len(self.acked) >= self._hold_after
            if reached:
                self.held.set()
                self.release.wait(MAX_WAIT)
                raise _Drop
        with self.lock:
            self.request_bodies.append(body)
            self.auth_headers.append(handler.headers.get("Authorization", ""))
            self.raw_paths.append(handler.path)
        return self.route(method, urlsplit(handler.path).path, handler.headers.get(
            "Authorization", ""), body)

    def _take_token(self) -> float | None:
        """Token bucket: None when a token was taken, else seconds until the next one."""
        assert self.rate is not None
        with self.lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.rate)
            self._refilled = now
            if self._tokens >= 1:
                self._tokens -= 1
                return None
            return (1 - self._tokens) / self.rate

    def route(self, method: str, path: str, auth: str, body: bytes) -> Answer:
        raise NotImplementedError


def basic(token: str) -> str:
    return "Basic " + base64.b64encode(f"{token}:".encode()).decode()


class FakePlanhat(FakeServer):
    """POST /dock/segment (Segment mode: identify and track); REST API mode: PUT and GET
    /endusers, PUT and GET /companies (bulk upserts by externalId), GET and POST /customfields;
    POST /analytics/bulk/{tenant token} (user activities, on the analytics host)."""

    def __init__(self, tenant_token: str = "", api_token: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tenant_token = tenant_token
        self.api_token = api_token
        self.messages: list[dict[str, Any]] = []  # identify and track calls acknowledged
        self.activities: list[dict[str, Any]] = []  # user activities acknowledged
        self.activity_requests = 0
        # Custom fields ({"_id", "name", "type", "parent"}); creating one twice is refused.
        self.customfields: list[dict[str, Any]] = []
        self.fields_created: list[tuple[str, str, str]] = []  # (parent, name, type)
        # Strict: an upsert naming a custom field that does not exist is refused (400).
        self.strict_fields = False
        self.endusers: dict[str, dict[str, Any]] = {}  # externalId -> merged end user
        self.bulk_requests: list[list[dict[str, Any]]] = []  # PUT /endusers bodies
        self.companies: dict[str, dict[str, Any]] = {}  # externalId -> merged company
        self.company_requests: list[list[dict[str, Any]]] = []  # PUT /companies bodies
        self.known_domains: set[str] = {"example.com"}
        # Answers for the next bulk upserts (end users or companies), given as is and applying
        # nothing (partial answers that name no item, say).
        self.bulk_answers: deque[Answer] = deque()

    def route(self, method: str, path: str, auth: str, body: bytes) -> Answer:
        if path == "/dock/segment" and method == "POST":
            return self._identify(auth, body)
        if path.startswith("/analytics/bulk/") and method == "POST":
            return self._activities(path.removeprefix("/analytics/bulk/"), auth, body)
        if path == "/endusers" and method == "PUT":
            return self._bulk(auth, body, "EndUser")
        if path == "/companies" and method == "PUT":
            return self._bulk(auth, body, "Company")
        if path == "/customfields":
            if auth != f"Bearer {self.api_token}":
                return Answer(401, {"message": "Invalid token"})
            if method == "GET":
                with self.lock:
                    return Answer(200, list(self.customfields))
            if method == "POST":
                return self._create_field(body)
        if path == "/endusers" and method == "GET":
            if auth != f"Bearer {self.api_token}":
                return Answer(401, {"message": "Invalid token"})
            return Answer(200, [])
        if path == "/companies" and method == "GET":
            if auth != f"Bearer {self.api_token}":
                return Answer(401, {"message": "Invalid token"})
            with self.lock:
                return Answer(200, list(self.companies.values()))
        return Answer(404, {"message": f"no route {method} {path}"})

    def _identify(self, auth: str, body: bytes) -> Answer:
        if auth != basic(self.tenant_token):
            # A careless server that echoes what it got: our redaction must catch it.
            return Answer(401, {"message": f"invalid tenant token in {auth!r}"})
        try:
            message = json.loads(body)
        except ValueError:
            return Answer(400, {"message": "body is not JSON"})
        problem = _identify_problem(message)
        if problem:
            return Answer(400, {"message": problem})
        with self.lock:
            self.messages.append(message)
            self.acked.append(message["messageId"])
        return Answer(200, {"ok": True})

    def _create_field(self, body: bytes) -> Answer:
        field = json.loads(body)
        if not isinstance(field, dict) or not all(
                isinstance(field.get(k), str) for k in ("parent", "name", "type")):
            return Answer(400, {"message": "a custom field needs parent, name and type"})
        with self.lock:
            if any(f["parent"] == field["parent"] and f["name"] == field["name"]
                   for f in self.customfields):
                return Answer(400, {"message": f"field {field['name']} already exists"})
            created = {"_id": f"cf{len(self.customfields)}", **field}
            self.customfields.append(created)
            self.fields_created.append((field["parent"], field["name"], field["type"]))
        return Answer(200, created)

    def _activities(self, token: str, auth: str, body: bytes) -> Answer:
        if token != self.tenant_token or auth:
            return Answer(403, {"message": "invalid tenant token"})
        items = json.loads(body)
        if not isinstance(items, list) or len(items) > 5000:
            return Answer(400, {"message": "expected an array of at most 5000 activities"})
        for item in items:
            if not isinstance(item, dict) or not (item.get("externalId") or item.get("email")) \
                    or not item.get("action"):
                return Answer(400, {"message": "an activity needs externalId or email, action"})
        with self.lock:
            self.activity_requests += 1
            self.activities.extend(items)
            self.acked.extend(json.dumps(["activity", i.get("externalId"), i["action"],
                                          i.get("info"), i.get("date")], sort_keys=True)
                              for i in items)
        return Answer(200, {"processed": len(items)})

    def _bulk(self, auth: str, body: bytes, parent: str) -> Answer:
        """PUT /endusers (parent EndUser) or /companies (Company): merge each item by
        externalId; an item that cannot be created is listed in createdErrors (206)."""
        if auth != f"Bearer {self.api_token}":
            return Answer(403, {"message": f"Forbidden: bad token {auth}"})
        items = json.loads(body)
        if not isinstance(items, list):
            return Answer(400, {"message": f"expected an array of {parent} items"})
        requests, records = ((self.bulk_requests, self.endusers) if parent == "EndUser"
                             else (self.company_requests, self.companies))
        with self.lock:
            if self.bulk_answers:
                requests.append(items)
                return self.bulk_answers.popleft()
        if len(items) > 5000:
            return Answer(400, {"message": f"at most 5000 items per request, got {len(items)}"})
        if self.strict_fields:
            with self.lock:
                fields = {f["name"] for f in self.customfields if f["parent"] == parent}
            unknown = {k for i in items for k in (i.get("custom") or {})} - fields
            if unknown:
                return Answer(400, {"message": f"unknown {parent} custom fields "
                                               f"{sorted(unknown)}"})
        errors: list[dict[str, Any]] = []
        updated = created = 0
        with self.lock:
            requests.append(items)
            for item in items:
                external_id = item.get("externalId")
                known = external_id in records
                problem = None if known else self._not_creatable(parent, item)
                if problem is not None:
                    errors.append({"item": item, "error": problem})
                    continue
                record = records.setdefault(external_id, {"externalId": external_id,
                                                          "custom": {}})
                record.update({k: v for k, v in item.items() if k != "custom"})
                record["custom"].update(item.get("custom") or {})
                # An upsert carries no messageId: one acknowledged (object, values) is one
                # message (end users keep their old form).
                self.acked.append(json.dumps(
                    [external_id, item.get("custom")] if parent == "EndUser"
                    else [parent, external_id, item.get("custom")], sort_keys=True))
                updated += known
                created += not known
        answer = {"created": created, "createdErrors": errors, "insertsKeys": [],
                  "updated": updated, "updatedErrors": [], "updatesKeys": [], "nonupdates": 0,
                  "modified": [], "upsertedIds": [], "permissionErrors": []}
        return Answer(206 if errors else 200, answer)

    def _not_creatable(self, parent: str, item: dict[str, Any]) -> str | None:
        """Why a new record cannot be created: an end user needs a company (by id or by its
        email's domain), a company its name."""
        if parent == "Company":
            return None if item.get("name") else "a new company needs a name"
        domain = str(item.get("email") or "").rpartition("@")[2]
        if not item.get("companyId") and domain not in self.known_domains:
            return "no company matches this end user"
        return None


def _identify_problem(message: Any) -> str | None:
    """Planhat acts on identify and track calls at /dock/segment."""
    if not isinstance(message, dict) or message.get("type") not in ("identify", "track"):
        return "expected one identify or track call"
    if not message.get("userId") or message.get("user_id") != message.get("userId"):
        return "userId and user_id are required and must agree"
    body = "traits" if message["type"] == "identify" else "properties"
    if message["type"] == "track" and not message.get("event"):
        return "a track call needs its event"
    for field in (body, "context", "integrations", "messageId", "timestamp"):
        if field not in message:
            return f"missing {field}"
    return None


class FakeSegment(FakeServer):
    """POST /v1/batch with Segment's limits: 32 KB per message, 500 KB and 2,500 per batch;
    every message names a userId or anonymousId (and a group call its groupId)."""

    def __init__(self, write_key: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.write_key = write_key
        self.messages: list[dict[str, Any]] = []
        self.batches = 0
        self.parse = True

    def route(self, method: str, path: str, auth: str, body: bytes) -> Answer:
        if path != "/v1/batch" or method != "POST":
            return Answer(404, {"message": f"no route {method} {path}"})
        if auth != basic(self.write_key):
            return Answer(401, {"message": "invalid write key"})
        if len(body) > 500 * 1024:
            return Answer(400, {"message": "batch larger than 500 KB"})
        document = json.loads(body)
        batch = document.get("batch")
        if not isinstance(batch, list) or len(batch) > 2500 or "sentAt" not in document:
            return Answer(400, {"message": "expected batch of at most 2500 and sentAt"})
        for message in batch:
            if len(json.dumps(message, separators=(",", ":"))) > 32 * 1024:
                return Answer(400, {"message": "message larger than 32 KB"})
            # Segment's spec: every call names a user (or an anonymous one); a group call
            # its group.
            if not (message.get("userId") or message.get("anonymousId")):
                return Answer(400, {"message": "userId or anonymousId is required"})
            if message.get("type") == "group" and not message.get("groupId"):
                return Answer(400, {"message": "a group call needs its groupId"})
        with self.lock:
            self.batches += 1
            self.messages.extend(batch)
            self.acked.extend(m["messageId"] for m in batch)
        return Answer(200, {"success": True})


class EchoServer(FakeServer):
    """Answers every request with an error quoting its request line and every header, in
    JSON and as text: 400 and 500 in turn (a careless proxy or API that echoes what it got)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.echoed: list[str] = []  # what each answer quoted

    def dispatch(self, handler: _Handler, method: str) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        if length:
            handler.rfile.read(length)
        with self.lock:
            self.requests += 1
            status = 400 if self.requests % 2 else 500
            self.statuses[status] += 1
        echoed = handler.requestline + "\n" + "".join(
            f"{name}: {value}\n" for name, value in handler.headers.items())
        with self.lock:
            self.echoed.append(echoed)
        payload = json.dumps({"message": f"rejected: {echoed}", "headers": echoed,
                              "repr": repr(dict(handler.headers.items()))}).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)
