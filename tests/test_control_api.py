"""The control API over real HTTP on a free loopback port. The controller's three methods are
replaced by plain recording functions (test doubles); the server, routing, auth and JSON
handling are the real ones. The last tests run the real Telemetry wiring (metrics and control
servers, status with the job's start), with only the Ray registry stubbed out."""

import http.client
import json
import socket
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.control import api, registry
from services.control.api import ControlServer
from services.control.ctl import ctl_request
from services.control.requests import control_url, parse_scale_request, resolve_token
from tests.conftest import cfg_for, free_port, ipv6_loopback

TOKEN = "s3cret-token"


class FakeController:
    """Records calls; answers like the controller's status()/request_scale()/request_stop()."""

    def __init__(self):
        self.lock = threading.Lock()
        self.scale_calls: list[dict] = []
        self.stop_calls = 0
        self.age = 0.5
        self.uptime = None  # seconds since the job started; the real status() always has it
        self.state = "running"
        self.routes = {"t2i", "local_edit"}

    def status(self) -> dict:
        st = {"job": "toy", "state": self.state, "step": 12, "steps": 300, "samples_per_s": 512.0, "lag_last": 0, "lag_max": 0, "lag_bound": 0,
              "workers": {"rollout": 1, "learner": 1, "teacher": {"t2i": 1, "local_edit": 1}},
              "last_checkpoint": "/tmp/run/checkpoints/step-00000010", "last_step_age_s": self.age, "output_dir": "/tmp/run"}
        if self.uptime is not None:
            st["uptime_s"] = self.uptime
        return st

    def scale(self, rollout_workers=None, teachers=None) -> dict:
        for route, n in (teachers or {}).items():
            if route not in self.routes:
                raise ValueError(f"unknown route {route!r}")
            if n < 1:
                raise ValueError(f"teachers.{route}: {n} is below 1")
        if rollout_workers is not None and rollout_workers < 1:
            raise ValueError(f"rollout_workers: {rollout_workers} is below 1")
        with self.lock:
            self.scale_calls.append({"rollout_workers": rollout_workers, "teachers": teachers})
        return {"rollout_workers": rollout_workers, "teachers": teachers}

    def stop(self) -> None:
        with self.lock:
            self.stop_calls += 1


@pytest.fixture
def ctl():
    fake = FakeController()
    server = ControlServer(token=TOKEN, status_fn=fake.status, scale_fn=fake.scale, stop_fn=fake.stop,
                           stall_after_s=60)
    host, port = server.start()
    yield fake, server, host, port
    server.stop()


def request(port, method, path, body=None, token=None, raw: bytes | None = None, host="127.0.0.1"):
    conn = http.client.HTTPConnection(host, port, timeout=10)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=headers)
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    return r.status, (json.loads(payload) if payload else None), r


def test_binds_loopback_on_a_free_port_by_default(ctl):
    _, server, host, port = ctl
    assert host == "127.0.0.1"
    assert port > 0
    assert server.url == f"http://127.0.0.1:{port}"


def test_health_and_status(ctl):
    fake, _, _, port = ctl
    code, body, _ = request(port, "GET", "/health")
    assert code == 200
    assert body == {"ok": True, "state": "running", "step": 12, "last_step_age_s": 0.5}
    code, body, r = request(port, "GET", "/status", token=TOKEN)
    assert code == 200 and r.getheader("Content-Type") == "application/json"
    assert body == fake.status()


def test_status_without_a_valid_token_is_the_public_view(ctl):
    fake, _, _, port = ctl
    public = {"job": "toy", "state": "running", "step": 12, "steps": 300, "last_step_age_s": 0.5, "ok": True}
    for token in (None, "wrong", ""):
        code, body, _ = request(port, "GET", "/status", token=token)
        assert code == 200 and body == public, token
    assert set(public) == {*api.PUBLIC_STATUS_KEYS, "ok"}
    raw = json.dumps(body)
    assert "/tmp/run" not in raw and TOKEN not in raw and "workers" not in raw
    # Basic auth carrying the right secret is not a bearer token either
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/status", headers={"Authorization": f"Basic {TOKEN}"})
    assert json.loads(conn.getresponse().read()) == public
    conn.close()
    fake.age = 61.0  # over the fixture's 60 s bound: the public view says so
    assert request(port, "GET", "/status")[1]["ok"] is False


def test_the_status_cli_path_sends_the_token_and_gets_the_full_view(ctl):
    """`danceopd status` -> helper job -> ctl.ctl_request with the registry's token."""
    fake, server, _, _ = ctl
    assert ctl_request(server.url, TOKEN, "status") == fake.status()


def test_health_is_503_when_the_last_step_is_too_old(ctl):
    fake, _, _, port = ctl
    fake.age = 61.0
    code, body, _ = request(port, "GET", "/health")
    assert code == 503
    assert body["ok"] is False and "61 s" in body["error"]


def test_health_counts_from_the_start_until_the_first_step(ctl):
    fake, _, _, port = ctl
    fake.age = None  # no learner step yet
    fake.uptime = 59.0
    code, body, _ = request(port, "GET", "/health")
    assert code == 200 and body["ok"] is True and body["uptime_s"] == 59.0
    fake.uptime = 61.0  # started longer ago than the 60 s bound and still no step
    code, body, _ = request(port, "GET", "/health")
    assert code == 503 and body["ok"] is False and "61 s since the job started" in body["error"]
    fake.state = "done"  # a finished job is never stalled
    assert request(port, "GET", "/health")[0] == 200


def test_scale_needs_the_token(ctl):
    fake, _, _, port = ctl
    code, body, r = request(port, "POST", "/scale", {"rollout_workers": 2})
    assert code == 401 and "missing" in body["error"]
    assert r.getheader("WWW-Authenticate", "").startswith("Bearer")
    code, body, _ = request(port, "POST", "/scale", {"rollout_workers": 2}, token="wrong")
    assert code == 403 and body == {"error": "wrong token"}
    assert fake.scale_calls == []


def test_scale_with_the_token_calls_the_controller(ctl):
    fake, _, _, port = ctl
    code, body, _ = request(port, "POST", "/scale", {"rollout_workers": 2, "teachers": {"t2i": 3}}, token=TOKEN)
    assert code == 200, body
    assert body["ok"] is True and body["rollout_workers"] == 2
    assert fake.scale_calls == [{"rollout_workers": 2, "teachers": {"t2i": 3}}]
    code, _, _ = request(port, "POST", "/scale", {"teachers": {"local_edit": 2}}, token=TOKEN)
    assert code == 200
    assert fake.scale_calls[-1] == {"rollout_workers": None, "teachers": {"local_edit": 2}}


@pytest.mark.parametrize("raw, fragment", [
    (b"{not json", "not valid JSON"),
    (b"", "body must be a JSON object"),
    (b"[1, 2]", "body must be a JSON object"),
    (b'{"rollout_workers": "two"}', "rollout_workers: expected an integer"),
    (b'{"rollout_workers": true}', "rollout_workers: expected an integer"),
    (b'{"workers": 2}', "unknown key 'workers'"),
    (b"{}", "nothing to scale"),
    (b'{"teachers": {"t2i": 1.5}}', "teachers.t2i: expected an integer"),
    (b'{"teachers": {"nope": 2}}', "unknown route 'nope'"),  # a ValueError from the controller
    (b'{"rollout_workers": 0}', "below 1"),
    (b"\xff{}", "not valid JSON"),  # not UTF-8
    (b"[" * 60_000, "not valid JSON (RecursionError"),  # nesting deeper than the parser's stack
    (b'{"rollout_workers": ' + b"9" * 5000 + b"}", "not valid JSON"),  # an int too long to convert
    (b'{"teachers": [1, 2]}', "teachers: expected an object"),
])
def test_scale_bad_requests_are_400_with_one_line(ctl, raw, fragment):
    fake, _, _, port = ctl
    code, body, _ = request(port, "POST", "/scale", raw=raw, token=TOKEN)
    assert code == 400
    assert fragment in body["error"] and "\n" not in body["error"]
    assert fake.scale_calls == []


def test_stop(ctl):
    fake, _, _, port = ctl
    code, _, _ = request(port, "POST", "/stop")
    assert code == 401
    code, _, _ = request(port, "POST", "/stop", token="nope")
    assert code == 403
    assert fake.stop_calls == 0
    code, body, _ = request(port, "POST", "/stop", token=TOKEN)
    assert code == 202 and body == {"ok": True, "state": "stopping"}
    assert fake.stop_calls == 1


def test_wrong_methods_and_paths(ctl):
    _, _, _, port = ctl
    assert request(port, "GET", "/scale")[0] == 405
    assert request(port, "POST", "/status", token=TOKEN)[0] == 405
    assert request(port, "GET", "/nope")[0] == 404
    # A body claimed larger than 64 KiB is refused (413) before it is read.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest("POST", "/scale")
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.putheader("Content-Length", str(10 * 1024 * 1024))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "larger than" in json.loads(r.read())["error"]
    conn.close()


# ---- under load: a bounded pool, request timeouts (issue 22, point 9) ---------------------------

def wait_until(cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_300_idle_connections_hold_no_thread_and_status_still_answers(ctl):
    """Idle clients, and clients that sent half a request, wait in the event loop: no thread each,
    so the server's threads stay its pool's and a valid /status answers at once."""
    fake, server, _, port = ctl
    before = threading.active_count()
    pool = [t for t in server._threads if t.is_alive()]
    assert len(pool) == 1 + server.workers  # the event loop and the request threads, from the start
    socks = []
    try:
        for i in range(300):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            if i % 3 == 1:  # the head never ends
                s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n")
            elif i % 3 == 2:  # the body never comes whole
                s.sendall(b"POST /scale HTTP/1.1\r\nContent-Length: 100\r\nAuthorization: Bearer " + TOKEN.encode()
                          + b"\r\n\r\n{\"rollout")
            socks.append(s)
        wait_until(lambda: server.connections >= 300)
        t0 = time.monotonic()
        code, body, _ = request(port, "GET", "/status", token=TOKEN)
        assert code == 200 and body == fake.status()
        assert time.monotonic() - t0 < 3
        assert threading.active_count() <= before  # not one thread more for 300 connections
        assert [t for t in server._threads if t.is_alive()] == pool
        assert fake.scale_calls == []
    finally:
        for s in socks:
            s.close()
    wait_until(lambda: server.connections == 0)


def test_a_request_beyond_the_pool_and_its_queue_is_503_at_once():
    entered, release = threading.Event(), threading.Event()

    def slow_status():
        entered.set()
        release.wait(10)
        return {"job": "toy", "state": "running", "step": 1, "steps": 2, "last_step_age_s": 0.1}

    server = ControlServer(token=TOKEN, status_fn=slow_status, scale_fn=lambda **kw: {}, stop_fn=lambda: None,
                           workers=1, queued=1)
    _, port = server.start()
    codes = []
    get = lambda: codes.append(request(port, "GET", "/status", token=TOKEN)[0])  # noqa: E731
    try:
        first = threading.Thread(target=get)
        first.start()
        assert entered.wait(5)  # the one request thread is busy
        second = threading.Thread(target=get)
        second.start()
        wait_until(lambda: server.waiting == 2)  # ... and the one queue slot taken
        t0 = time.monotonic()
        code, body, r = request(port, "GET", "/health")
        assert code == 503 and "busy" in body["error"] and r.getheader("Retry-After") == "1", body
        assert time.monotonic() - t0 < 2
        release.set()
        first.join(10)
        second.join(10)
        assert codes == [200, 200]  # the queued one was answered too
    finally:
        release.set()
        server.stop()


def test_a_client_that_never_sends_a_whole_request_is_dropped_and_connections_are_bounded():
    server = ControlServer(token=TOKEN, status_fn=dict, scale_fn=lambda **kw: {}, stop_fn=lambda: None,
                           request_timeout_s=0.5, max_connections=3)
    _, port = server.start()
    try:
        for partial in (b"", b"GET /health HTTP/1.1\r\n", b"POST /scale HTTP/1.1\r\nContent-Length: 10\r\n\r\n{"):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(partial)
                t0, got = time.monotonic(), b""
                while chunk := s.recv(4096):  # until the server closes it
                    got += chunk
                assert got.startswith(b"HTTP/1.0 408 ") and b"no whole request within 0.5 s" in got, got
                assert time.monotonic() - t0 < 3
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        try:
            wait_until(lambda: server.connections == 3)
            code, body, _ = request(port, "GET", "/health")
            assert code == 503 and "more than 3 open connections" in body["error"]
        finally:
            for s in idle:
                s.close()
        wait_until(lambda: server.connections == 0)
        assert request(port, "GET", "/health")[0] == 200
        # a head that never ends within 16 KiB
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/health", headers={"X-Pad": "x" * (api.MAX_HEAD_BYTES + 10)})
        assert conn.getresponse().status == 431
        conn.close()
    finally:
        server.stop()


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
@pytest.mark.parametrize("host", ["::1", "::"])
def test_an_ipv6_bind_works(host):
    server = ControlServer(host=host, token=TOKEN, status_fn=lambda: {"state": "running"}, scale_fn=lambda **kw: {},
                           stop_fn=lambda: None)
    _, port = server.start()
    try:
        assert server.url == f"http://[::1]:{port}"
        assert request(port, "GET", "/health", host="::1")[0] == 200
        assert ctl_request(server.url, TOKEN, "status") == {"state": "running"}
    finally:
        server.stop()


def test_controller_errors_do_not_kill_the_server():
    def broken():
        raise RuntimeError("boom")

    server = ControlServer(token=TOKEN, status_fn=broken, scale_fn=lambda **kw: {}, stop_fn=lambda: None)
    _, port = server.start()
    try:
        assert request(port, "GET", "/status")[0] == 500
        code, body, _ = request(port, "GET", "/health")
        assert code == 503 and "boom" in body["error"]
        assert request(port, "POST", "/scale", {"rollout_workers": 1}, token=TOKEN)[0] == 200
    finally:
        server.stop()


def test_stop_releases_the_port():
    server = ControlServer(token=TOKEN, status_fn=dict, scale_fn=lambda **kw: {}, stop_fn=lambda: None)
    _, port = server.start()
    server.stop()
    with pytest.raises(OSError):
        request(port, "GET", "/health")
    again = ControlServer(port=port, token=TOKEN, status_fn=dict, scale_fn=lambda **kw: {}, stop_fn=lambda: None)
    assert again.start()[1] == port
    again.stop()


def test_constructor_refuses_an_empty_token():
    with pytest.raises(ValueError, match="empty token"):
        ControlServer(token="", status_fn=dict, scale_fn=dict, stop_fn=dict)


def test_resolve_token(monkeypatch):
    monkeypatch.setenv("DANCEOPD_TEST_TOKEN", "from-env")
    assert resolve_token("DANCEOPD_TEST_TOKEN") == "from-env"
    monkeypatch.setenv("DANCEOPD_TEST_TOKEN", "  ")
    a, b = resolve_token("DANCEOPD_TEST_TOKEN"), resolve_token("DANCEOPD_TEST_TOKEN")
    assert a != b and len(a) >= 40
    monkeypatch.delenv("DANCEOPD_TEST_TOKEN")
    assert len(resolve_token("DANCEOPD_TEST_TOKEN")) >= 40


def test_control_url_and_parse():
    assert control_url("0.0.0.0", 8000) == "http://127.0.0.1:8000"
    assert control_url("10.0.0.5", 8000) == "http://10.0.0.5:8000"
    assert control_url("::1", 8000) == "http://[::1]:8000"
    assert control_url("::", 8000) == "http://[::1]:8000"  # an IPv6 wildcard bind may take IPv6 only
    from services.control.ctl import _loopback  # the helper job's view of a registered wildcard URL

    assert _loopback("http://0.0.0.0:8000") == "http://127.0.0.1:8000"
    assert _loopback("http://[::]:8000") == "http://[::1]:8000"
    assert parse_scale_request({"rollout_workers": 3}) == (3, None)
    assert parse_scale_request({"teachers": {"a": 1}}) == (None, {"a": 1})


# ---- the real wiring: Telemetry serves metrics and the control API apart -----------------------

def scrape(host: str, port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture
def telemetry(toy_raw, tmp_path, monkeypatch):
    """A real Telemetry with serve=True; only the Ray registry is replaced (no Ray here)."""
    from services.telemetry.status import Telemetry

    registered = {}
    monkeypatch.setattr(registry, "register", lambda job, url, token: registered.update(job=job, url=url, token=token))
    monkeypatch.setattr(registry, "unregister", lambda job: registered.clear())
    monkeypatch.setenv("DANCEOPD_CONTROL_TOKEN", TOKEN)
    ctl_port = free_port()
    cfg = cfg_for(toy_raw, tmp_path, "run", control__host="127.0.0.1", control__port=ctl_port,
                  control__metrics_host="0.0.0.0", control__metrics_port=0, control__stall_after_s=5)
    holder = {}
    fns = (lambda: holder["t"].status("starting"), lambda **kw: {}, lambda: None)
    tel = holder["t"] = Telemetry(cfg, 0, show_progress=False, serve=True, control_fns=fns, run_id="run-7")
    yield tel, registered, ctl_port
    tel.close()


def test_metrics_and_control_bind_separately(telemetry):
    tel, registered, ctl_port = telemetry
    assert tel.metrics._server.socket.getsockname()[0] == "0.0.0.0"  # scrapeable from the pod network
    assert tel.control._server.sockets[0].getsockname()[:2] == ("127.0.0.1", ctl_port)  # the API: loopback only
    assert tel.metrics.port != ctl_port
    assert registered == {"job": tel.cfg.job.name, "url": f"http://127.0.0.1:{ctl_port}", "token": TOKEN}
    series = scrape("127.0.0.1", tel.metrics.port)
    assert series["danceopd_start_timestamp_seconds"] == pytest.approx(tel.started_at)
    assert series["danceopd_stall_after_seconds"] == 5
    assert series["danceopd_last_step_timestamp_seconds"] == 0
    text = urllib.request.urlopen(f"http://127.0.0.1:{tel.metrics.port}/metrics", timeout=10).read().decode()
    runs = {(x.labels.get("job"), x.labels.get("run_id")) for fam in text_string_to_metric_families(text) for x in fam.samples}
    assert runs == {(tel.cfg.job.name, "run-7")}  # every series names the job and the run


def test_health_of_a_job_that_never_steps(telemetry):
    tel, _, ctl_port = telemetry
    code, body, _ = request(ctl_port, "GET", "/health")
    assert code == 200 and body["last_step_age_s"] is None and 0 <= body["uptime_s"] < 5
    tel.started_at = time.time() - 6  # started 6 s ago, bound 5 s (control.stall_after_s), no step
    code, body, _ = request(ctl_port, "GET", "/health")
    assert code == 503 and "since the job started" in body["error"]
    code, body, _ = request(ctl_port, "GET", "/status")
    assert code == 200 and body["ok"] is False and body["state"] == "starting" and set(body) == {*api.PUBLIC_STATUS_KEYS, "ok"}
    code, body, _ = request(ctl_port, "GET", "/status", token=TOKEN)
    assert body["uptime_s"] >= 6 and body["steps"] == tel.cfg.learner.steps
