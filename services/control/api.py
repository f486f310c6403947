"""The controller's control API: a tiny HTTP server.

Endpoints (JSON in, JSON out; every error body is one line: {"error": "..."}):

    GET  /health  liveness, no token: 200 {ok, state, step, last_step_age_s[, uptime_s]}; 503 when
                  the last learner step is older than `stall_after_s` (control.stall_after_s,
                  default 600 s), when no step came within `stall_after_s` of the job's start
                  (`uptime_s`), or when status fails
    GET  /status  with the token: the controller's full status dict; without a valid token the
                  public view {job, state, step, steps, last_step_age_s, ok} (no paths, no
                  fleet details)
    POST /scale   {"rollout_workers": N, "teachers": {"route": N}} -> the controller's answer;
                  400 on bad JSON / types or a ValueError from the controller
    POST /stop    graceful stop (final checkpoint, then exit) -> 202
    POST endpoints need `Authorization: Bearer <token>`: 401 when missing, 403 when wrong.
    A body that does not parse, for any reason (not UTF-8 or JSON, too deeply nested, a number
    too long), is 400; one over 64 KiB is 413, refused before it is read.

Under load: one event-loop thread reads every connection until its request is whole (head and
body) or `request_timeout_s` passes (then 408), so an idle or slow client holds no thread; only
whole requests reach the `workers` request threads, through a queue of `queued`. Beyond that, or
beyond `max_connections` open connections, a client gets 503 at once.

The server binds `control.host` (127.0.0.1): `danceopd status|scale|stop` reach it through a
helper job on the head, over loopback. The controller's Prometheus /metrics is a separate
server on `control.metrics_host`, the one address a cluster opens (0.0.0.0 in
configs/cluster.yaml), so scraping never exposes this API.

The cluster-wide registry that lets `danceopd status|scale|stop` find this server is
`services.control.registry`; what a request may hold, `services.control.requests`.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import queue
import re
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler

from services.control.requests import BadRequest, TooLarge, control_url, parse_scale_request, stall

log = logging.getLogger(__name__)

DEFAULT_STALL_AFTER_S = 600.0
MAX_BODY_BYTES = 64 * 1024
MAX_HEAD_BYTES = 16 * 1024  # request line and headers
WORKERS = 4  # request threads: every call (status, scale, stop) is short
QUEUED = 16  # whole requests waiting for a request thread; beyond them, 503
MAX_CONNECTIONS = 512  # open connections (reading, queued or answering); beyond them, 503
REQUEST_TIMEOUT_S = 10.0  # a request must arrive whole within this, else 408
LINGER_S = 1.0  # after the answer, how long what the client still sends is read and dropped
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)[ \t]*\r\n", re.IGNORECASE)
PUBLIC_STATUS_KEYS = ("job", "state", "step", "steps", "last_step_age_s")


def _raw_response(code: int, msg: str, headers: dict | None = None) -> bytes:
    """A whole response, written by the event loop itself (no request thread is free, or the
    request never arrived whole)."""
    body = (json.dumps({"error": msg}) + "\n").encode()
    head = [f"HTTP/1.0 {int(code)} {HTTPStatus(code).phrase}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One request's bytes: its head, and the body its Content-Length announces (none when that is
    not a number or is over MAX_BODY_BYTES: the handler refuses those unread). None: the client
    closed before a whole request."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        m = _CONTENT_LENGTH.search(head)
        n = int(m.group(1)) if m else 0
        return head + (await reader.readexactly(n) if 0 < n <= MAX_BODY_BYTES else b"")
    except asyncio.IncompleteReadError:
        return None


async def _discard(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


def _resolve(done: asyncio.Future, response: bytes) -> None:
    if not done.done():  # its connection may have been cancelled meanwhile
        done.set_result(response)


class _Handler(BaseHTTPRequestHandler):
    """One request, already read whole: `request` is (its bytes, the buffer the response goes to),
    `server` the ControlServer. Runs in a request thread; never touches the socket."""

    server: ControlServer
    server_version = "danceopd-control"
    sys_version = ""

    def setup(self) -> None:
        data, out = self.request
        self.rfile, self.wfile = io.BytesIO(data), out

    def finish(self) -> None:  # the event loop writes `out` and closes the connection
        pass

    # ---- plumbing ---------------------------------------------------------------------------
    def log_message(self, format, *args):  # noqa: A002 - the stdlib signature
        log.debug("control api %s - %s", self.address_string(), format % args)

    def _send(self, code: int, payload: dict, headers: dict | None = None) -> None:
        data = (json.dumps(payload, default=str) + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, code: int, msg: str, headers: dict | None = None) -> None:
        self._send(code, {"error": " ".join(str(msg).split())}, headers)

    def _read_body(self) -> bytes:
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise BadRequest("Content-Length is not a number") from None
        if n < 0:
            raise BadRequest("Content-Length is negative")
        if n > MAX_BODY_BYTES:
            raise TooLarge(f"body larger than {MAX_BODY_BYTES} bytes")
        return self.rfile.read(n) if n else b""

    def _bearer(self) -> str | None:
        """The bearer token the request carries, or None."""
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        return given.strip() if scheme.lower() == "bearer" and given.strip() else None

    def _token_ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.server.token.encode())

    def _authorized(self) -> bool:
        """Answers 401/403 itself and returns False when the bearer token is missing/wrong."""
        given = self._bearer()
        if given is None:
            self._error(HTTPStatus.UNAUTHORIZED, "missing bearer token (Authorization: Bearer <token>)",
                        {"WWW-Authenticate": 'Bearer realm="danceopd"'})
            return False
        if not self._token_ok(given):
            self._error(HTTPStatus.FORBIDDEN, "wrong token")
            return False
        return True

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/") or "/"

    # ---- verbs ------------------------------------------------------------------------------
    def do_GET(self):  # noqa: N802 - the stdlib naming
        ctl = self.server
        path = self._path()
        if path == "/health":
            self._health(ctl)
        elif path == "/status":
            try:
                st = ctl.status_fn()
            except Exception as e:  # the API must answer even when the controller misbehaves
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"status failed: {type(e).__name__}: {e}")
                return
            if not self._token_ok(self._bearer()):  # public view: no paths, fleet or checkpoints
                st = {**{k: st.get(k) for k in PUBLIC_STATUS_KEYS}, "ok": stall(st, ctl.stall_after_s) is None}
            self._send(HTTPStatus.OK, st)
        elif path in ("/scale", "/stop"):
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} needs POST", {"Allow": "POST"})
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no endpoint {path} (GET /health /status, POST /scale /stop)")

    def do_HEAD(self):  # noqa: N802
        self.do_GET()

    def do_POST(self):  # noqa: N802
        ctl = self.server
        path = self._path()
        if path not in ("/scale", "/stop"):
            status = HTTPStatus.METHOD_NOT_ALLOWED if path in ("/health", "/status") else HTTPStatus.NOT_FOUND
            self._error(status, f"no POST endpoint {path} (POST /scale /stop)")
            return
        try:
            body = self._read_body()
        except BadRequest as e:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE if isinstance(e, TooLarge) else HTTPStatus.BAD_REQUEST, str(e))
            return
        if not self._authorized():
            return
        if path == "/stop":
            try:
                ctl.stop_fn()
            except Exception as e:
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"stop failed: {type(e).__name__}: {e}")
                return
            self._send(HTTPStatus.ACCEPTED, {"ok": True, "state": "stopping"})
            return
        try:
            parsed = json.loads(body.decode("utf-8")) if body else None
        except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, a number too long, nesting too deep
            self._error(HTTPStatus.BAD_REQUEST, f"body is not valid JSON ({type(e).__name__}: {e})")
            return
        try:
            rollout, teachers = parse_scale_request(parsed)
            result = ctl.scale_fn(rollout_workers=rollout, teachers=teachers)
        except ValueError as e:  # BadRequest included
            self._error(HTTPStatus.BAD_REQUEST, str(e))
            return
        except Exception as e:
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"scale failed: {type(e).__name__}: {e}")
            return
        self._send(HTTPStatus.OK, {"ok": True, **(result or {})})

    def _health(self, ctl: ControlServer) -> None:
        try:
            st = ctl.status_fn()
        except Exception as e:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, f"status failed: {type(e).__name__}: {e}")
            return
        why = stall(st, ctl.stall_after_s)
        payload = {"ok": why is None, "state": st.get("state"), "step": st.get("step"),
                   "last_step_age_s": st.get("last_step_age_s")}
        if "uptime_s" in st:
            payload["uptime_s"] = st["uptime_s"]
        if why:
            payload["error"] = why
        self._send(HTTPStatus.OK if why is None else HTTPStatus.SERVICE_UNAVAILABLE, payload)


class ControlServer:
    """The control API: an event-loop thread and `workers` request threads, all daemons.
    `status_fn() -> dict`, `scale_fn(rollout_workers=int|None, teachers=dict|None) -> dict`
    (ValueError -> 400) and `stop_fn() -> None` are called from the request threads: they must be
    thread-safe."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str = "",
                 status_fn: Callable[[], dict] | None = None,
                 scale_fn: Callable[..., dict] | None = None,
                 stop_fn: Callable[[], None] | None = None,
                 stall_after_s: float = DEFAULT_STALL_AFTER_S, *, workers: int = WORKERS, queued: int = QUEUED,
                 max_connections: int = MAX_CONNECTIONS, request_timeout_s: float = REQUEST_TIMEOUT_S):
        if not token:
            raise ValueError("ControlServer: an empty token would leave /scale and /stop open")
        if status_fn is None or scale_fn is None or stop_fn is None:
            raise ValueError("ControlServer: status_fn, scale_fn and stop_fn are required")
        self.host, self.port, self.token = host, port, token
        self.status_fn, self.scale_fn, self.stop_fn = status_fn, scale_fn, stop_fn
        self.stall_after_s = float(stall_after_s)
        self.workers, self.queued = workers, queued
        self.max_connections, self.request_timeout_s = max_connections, request_timeout_s
        # Counted by the event loop alone: connections open now, and requests queued or being answered.
        self.connections = self.waiting = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def start(self) -> tuple[str, int]:
        """Bind and serve; returns the bound (host, port) (port 0 asks for a free one)."""
        if self._server is not None:
            raise RuntimeError("ControlServer already started")
        loop = asyncio.new_event_loop()
        try:  # bound here, so a bind error is the caller's
            self._server = loop.run_until_complete(asyncio.start_server(
                self._connection, self.host, self.port, limit=MAX_HEAD_BYTES, backlog=128))
            loop.run_until_complete(loop.shutdown_default_executor())  # name lookup's thread: no other
        except BaseException:
            loop.close()
            raise
        self._loop = loop
        self.host, self.port = self._server.sockets[0].getsockname()[:2]
        self._threads = [threading.Thread(target=loop.run_forever, name="danceopd-control-api", daemon=True)]
        self._threads += [threading.Thread(target=self._work, name=f"danceopd-control-{i}", daemon=True)
                          for i in range(self.workers)]
        for t in self._threads:
            t.start()
        return self.host, self.port

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._tasks.add(asyncio.current_task())
        try:
            writer.write(await self._answer(reader, writer.get_extra_info("peername") or ("", 0)))
            await asyncio.wait_for(writer.drain(), self.request_timeout_s)
            # Closing on bytes the client sent and we never read (a refused request) would reset
            # the connection, and the answer with it: half-close, and drop what still comes.
            writer.write_eof()
            await asyncio.wait_for(_discard(reader), LINGER_S)
        except (OSError, asyncio.TimeoutError):  # the client went away, or does not read
            pass
        except asyncio.CancelledError:  # the server stops: end quietly (a cancelled task is logged as an error)
            pass
        finally:
            self.connections -= 1
            self._tasks.discard(asyncio.current_task())
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, peer) -> bytes:
        if self.connections > self.max_connections:
            return _raw_response(HTTPStatus.SERVICE_UNAVAILABLE, f"more than {self.max_connections} open connections",
                                 {"Retry-After": "1"})
        try:
            request = await asyncio.wait_for(_read_request(reader), self.request_timeout_s)
        except asyncio.TimeoutError:
            return _raw_response(HTTPStatus.REQUEST_TIMEOUT, f"no whole request within {self.request_timeout_s:g} s")
        except asyncio.LimitOverrunError:  # no end of the head within MAX_HEAD_BYTES
            return _raw_response(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"request head over {MAX_HEAD_BYTES} bytes")
        if request is None:
            return b""
        if self.waiting >= self.workers + self.queued:
            return _raw_response(HTTPStatus.SERVICE_UNAVAILABLE, "busy: every request thread and queue slot is taken",
                                 {"Retry-After": "1"})
        self.waiting += 1
        try:
            done = self._loop.create_future()
            self._requests.put((done, request, peer))
            return await done
        finally:
            self.waiting -= 1

    def _work(self) -> None:
        """A request thread: answers whole requests from the queue until it gets None."""
        while (job := self._requests.get()) is not None:
            done, request, peer = job
            out = io.BytesIO()
            try:
                _Handler((request, out), peer, self)
                response = out.getvalue()
            except Exception as e:  # noqa: BLE001 — the API answers whatever happens
                response = _raw_response(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}")
            try:
                self._loop.call_soon_threadsafe(_resolve, done, response)
            except RuntimeError:  # the loop is closed: the server stopped meanwhile
                pass

    @property
    def url(self) -> str:
        return control_url(self.host, self.port)

    def stop(self) -> None:
        loop, server, self._server = self._loop, self._server, None
        if server is None:
            return

        async def close() -> None:
            server.close()  # the port is free once this returns
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        for _ in range(self.workers):  # each request thread ends after its current request (daemons: not awaited)
            self._requests.put(None)
        self._threads[0].join(timeout=5)  # the event loop's
        loop.close()
        self._threads = []

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
