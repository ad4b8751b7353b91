"""bench_telemetry.py: how much telemetry.py costs and how fast it shows what it sees.

    python bench_telemetry.py [--quick]      (--quick: every part shortened, < ~60 s in all)

The machine is small, shared and noisy, so every speed figure is a ratio or is measured in this
run, as a median over rounds. Only 127.0.0.1 is used; every loop and wait is bounded; only the
processes started here are stopped (SIGINT by PID, SIGKILL of their own group if they hang).
Children get no TELEMETRY_*/INFLUXDB_* variables from our environment. The script reports; it
never asserts, and it exits 0.

1. hot path   A bare Sanic app (GET /api/ping), a second copy of it (the control) and the same app
              + telemetry.instrument(), each in its own process (single_process, access log off),
              all pinned to CPU 0 and loaded at the same time by three `wrk -t1 -c32`: the servers
              share one CPU and one machine state, so the drift of a shared machine (+-20% between
              rounds here) cancels out. The headline has wrk on the other CPU, as any client would
              be; the run is repeated with wrk on the servers' CPU, because with wrk on the other
              CPU every response wakes wrk there through an inter-processor interrupt, which on this
              virtual machine is a trip to the hypervisor (14% of each server's CPU time, by perf)
              and weighs more on whichever server is slower. A set of three fresh processes runs a
              few rounds; the figure is the median over several sets. Fresh processes matter more
              than rounds: two processes of the *same* code differ by up to +-5% for their whole life
              (memory layout, hash seed), which rounds of one set cannot average out. So the three
              processes of a set share one hash seed (PYTHONHASHSEED = the set's number) and, where
              `setarch -R` exists, one address layout (ASLR off for them): a set compares the code,
              not the luck of the draw, and the sets still differ from each other. The control
              (bare copy / bare) shows the noise floor left. Per set: instrumented/bare req/s (goal
              >= 0.95, median over sets) and requests per CPU-second (in case the CPU was not shared
              evenly); each instrumented app's /telemetry/api/summary count against what wrk
              completed (wrk does not count requests in flight when it stops; the app may).
2. ingest     Lines as users' logs have them: N Caddy 2.11 compact access-log lines (--quick: fewer)
              against the demo app's routes, item ids up to 1,000,000, query strings on a third,
              a fifth of them 404 scans of random paths (so most paths are new to the route cache),
              a 500 now and then, lognormal durations, ending now. Parser alone: what the reader
              does with 64 KiB reads of them (LineBlocks cuts each at its last newline,
              parser.feed() parses the block) + the runs into the aggregator + agg.flush(), on one
              core, this build and --against's in turns (goal >= 500,000 lines/s); json.loads of the
              same lines for comparison; with valgrind, the instructions per line (callgrind).
              End to end: the lines in a file, `python telemetry.py --caddy-log-command "cat FILE"`
              (the command waits for a go, given once the app answers), timed until the summary
              shows every line (goal >= 350,000 lines/s), each build; and GoAccess
              (`goaccess FILE --log-format=CADDY`, when installed) on the same file in the same run,
              its ratio (goal: end to end >= 5x GoAccess).
3. freshness  `python telemetry.py` with a real Caddy in front. K times, after a random pause (so
              requests do not lock onto the flush tick): read both counts, send one GET /api/ping
              through Caddy, poll the summary every 5 ms until both counts went up by one; time
              from the response to visible (goal p95 <= 0.5 s).
4. render     Two fresh SQLite stores, one hour of history ending now (--quick: 15 minutes) at
              1,000 and at 10 req/s through Caddy (so that rate at each source) over 50 routes:
              statuses mostly 200, lognormal latencies (route medians around 20 ms, sigma 0.8).
              Rows are 10 s rollups, the finest stored tier, so the tables hold what the live
              pipeline writes. The demo app serves each store; GET /telemetry/?range=1h and
              /telemetry/api/summary?range=1h are timed sequentially, the two stores taking turns
              (goal p95 <= 50 ms; p95 ratio ~1: cost follows series x time, not request rate).
5. tail       A fresh bare and a fresh instrumented server (one seed, one layout), loaded one at
              a time (bare, instrumented, instrumented, bare) by `wrk -c32 --latency` on the other
              CPU, each alone on CPU 0: p99 latency instrumented/bare (goal <= 1.10). Each server
              also probes its event loop's lag; the instrumented one times every stretch its flush
              policy and writer tasks hold the loop, at full load and at about 10,000 req/s (wrk
              paced: 40 connections, 3 ms between a connection's requests): the longest (goal <= 1 ms).
6. memory     `python telemetry.py` with its default settings; 8 clients POST 9.9 MB of Caddy
              lines each to /telemetry/ingest at once: RSS before and at its peak (VmHWM), and the
              answers (the byte budget takes two at a time and answers the rest 503).
7. influx     One synthetic hour and day of 1,000 req/s x 50 routes x 3 instances written through
              the real InfluxStore into the test file's InfluxDB wire server: per range, the points
              and field values each page view's queries select, and what a flush writes.
8. crash      `python telemetry.py --caddy-log-file` (flush every 50 ms) while 25 lines are
              appended every 50 ms: SIGKILL after 10 such writes, 10 more lines while it is down,
              a restart; then the summary's caddy count against the lines written, 100 times
              (--quick: 5): exact, lines read twice, or lines lost. Killed anywhere in the flush
              cycle, then killed 0-0.6 ms after the database's write-ahead log grows (a batch being
              stored): where a crash between the store and the log file checkpoint would double.
9. burst      A guest that never hurts its host. A Sanic app (one process, access log off) with 200
              routes (/api/r{i}/<id:int>) and GET /api/ping, instrumented with the embedded store.
              600,000 Caddy 2.11 lines (--quick: 60,000), 4,000 (route, status) series in every
              second of log time (200 routes x 20 statuses, two of them 5xx; lognormal durations,
              median 20 ms), ending 2 s ago, are POSTed to /telemetry/ingest in 1-4 MB bodies by 3
              clients as fast as the app takes them (a 503 sent again after its Retry-After,
              counted), while another process GETs /api/ping every 5 ms over one keep-alive
              connection: the pings' p50/p99/max from the first POST until the summary (polled every
              0.5 s, range=15m) shows every line, that time, whether the count is exact, RSS before
              and at its peak (VmHWM). Then over that history, pings still running: one render of
              GET /telemetry/?range=15m alone (median of 3), then 8 clients rendering it for 10 s
              (--quick: 4 s), the same for range=24h: page latency p50/p95, the pings meanwhile.
              With py-spy on PATH, sampled (py-spy record --nonblocking) through the burst and each
              render load: the main thread's idle share and which telemetry.py functions hold it
              (by entry: the route handler or task; and the innermost one).
10. backlog   `python telemetry.py --caddy-log-file LOG --no-caddy`: a few lines written and counted,
              a stop (SIGINT), 1,200,000 demo lines (--quick: 120,000; no /telemetry ones, which are
              never counted) appended, ts over the last 4 minutes (--quick: 1), a start with the
              pinger (as in 9) running from the same moment: when the first ping was answered
              (from the process start) and its latency, ping p99/max until the summary's count of
              the backlog is exact, that time, exact or not; py-spy as in 9.
11. bodies    `python telemetry.py --no-caddy`, default settings, no token: 6 anonymous clients at
              once each send a 99 MB body (declared Content-Length, streamed in 1 MB chunks) to GET
              /telemetry/metrics, /healthz, /dashboard.css and POST /telemetry/login in turn: RSS
              before, its peak (VmHWM), and what each client got (status, or the error).
12. slow      `python telemetry.py --no-caddy`, default settings: two connections send the headers of
              POST /telemetry/ingest with Content-Length 10 MiB, then one byte every 2 s; at 5 s a
              third client POSTs one valid line (status, latency), and again every 5 s until 40 s
              (--quick: 10 s): how many got 200 and 503, and whether and when the server closed the
              slow connections.
13. alerts    Ten rules (error rate, p50, p95, p99, a rate, no traffic, edge minus app, the
              pipeline, an SLO's two burn-rate alerts) over 200 routes x 2 sources of history
              (SQLite: an hour; InfluxDB, the test file's wire server, which scans every point:
              3 min), judged in-process a few times: a judgement's time, the longest stretch the
              judge holds the event loop (each resumption of its coroutine timed; goal <= 1 ms),
              that stretch less the collector's pauses in it, the most CPU time one stretch took
              (less the collector's: what the judge did, without waits for the CPU or the GIL),
              and the loop's longest lag meanwhile.
              Then `python telemetry.py --alerts` judging every 5 s with a 10 s `for`: the app's
              5xx until a loopback webhook has the firing, 5 times (--quick: 2): arrival - (first
              5xx + for), in intervals (goal <= 2).
14. follow    The app keeps its CPU: two instrumented servers of this build on one CPU, one of them
              following a log file that a writer on the other CPU appends 20,000 of the ingest
              part's lines a second to (each stamped as written), loaded together by wrk on the
              other CPU, several sets of fresh processes: throughput following / not (goal: a drop
              of at most 10%), per CPU-second too, and the lines it read; the parse process's CPU
              per line and its memory (its own pages, RSS, PSS). Its parse process runs on CPU 1
              (a machine with a core to spare), then on CPU 0 (it inherits the server's CPU: with
              both servers loaded that core has no time to spare, and a parse process that yields
              to the app reads the lines later: the lines read of those written say so); with
              --against, that build's pair in the same sets.
--against REV|DIR compares this build with another in the same run: a git revision of this
repository (its telemetry.py, dashboard.css and Caddyfile) or a folder holding them. The hot path
loads a fourth server, instrumented with that build, in every set (figures paired per set); ingest
times the two builds in turns, and runs each end to end; memory, crash, burst, backlog, bodies and
slow run both, one after the other.
"""


from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import http.client
import json
import math
import os
import platform
import random
import re
import select
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import telemetry as T  # noqa: E402

WRK = "/usr/bin/wrk"
CPUS = sorted(os.sched_getaffinity(0))
SUMMARY: dict[str, str] = {}


# ---------------------------------------------------------------------------------------------
# helpers: ports, children, a keep-alive HTTP client, bounded waits

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cpu: int, argv: list[str]) -> list[str]:
    """argv under `taskset -c CPU` when there are two CPUs to split between server and load."""
    return ["taskset", "-c", str(CPUS[cpu]), *argv] if len(CPUS) >= 2 and shutil.which("taskset") else argv


def same_layout(argv: list[str]) -> list[str]:
    """argv with address-space randomisation off (`setarch -R`), where that works here: processes
    of one set then lay out their memory alike."""
    return [*_no_aslr_prefix(), *argv]


@functools.cache
def _no_aslr_prefix() -> tuple[str, ...]:
    """`setarch ARCH -R` if it runs here (tried once), else nothing."""
    setarch = shutil.which("setarch")
    if setarch and subprocess.run([setarch, platform.machine(), "-R", "true"], capture_output=True).returncode == 0:
        return (setarch, platform.machine(), "-R")
    return ()


def demo_argv(port: int, db: Path, tmp: Path, *extra: str) -> list[str]:
    """`python telemetry.py` on loopback; its spool (if this version has one) stays in tmp."""
    spool = ["--spool-dir", str(tmp / "spool")] if any(s.flag == "--spool-dir" for s in T._SETTINGS) else []
    return [sys.executable, "telemetry.py", "--port", str(port), "--db", str(db), *spool, *extra]


class Child:
    """A process started here, in its own session; its output goes to a log file."""

    def __init__(self, argv: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.log_path, self.log = log, open(log, "wb")
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("TELEMETRY_", "INFLUXDB_"))}, **(env or {})}
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:  # hung: SIGKILL its own process group only
                print(f"  ! pid {self.proc.pid} ignored SIGINT for {timeout} s; SIGKILL to its group")
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode

    def tail(self, n: int = 12) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


class Client:
    """GETs over one keep-alive connection, reconnecting once on failure."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.port, self.timeout, self.conn = port, timeout, None

    def get(self, path: str) -> tuple[int, bytes]:
        for attempt in (0, 1):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
                self.conn.request("GET", path)
                r = self.conn.getresponse()
                return r.status, r.read()
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def counts(self) -> tuple[int, int]:
        """(caddy, sanic) requests of the last 5 minutes, from the summary JSON."""
        src = json.loads(self.get("/telemetry/api/summary?range=5m")[1])["sources"]
        return src["caddy"]["requests"], src["sanic"]["requests"]

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def wait_until(pred, timeout: float, interval: float = 0.05):
    """pred()'s first truthy value within timeout seconds, else None (errors count as falsy)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = pred()
            if value:
                return value
        except (OSError, ValueError, KeyError, http.client.HTTPException):
            pass
        time.sleep(interval)
    return None


def answers(port: int, path: str, timeout: float = 30.0) -> bool:
    c = Client(port, timeout=2.0)
    try:
        return bool(wait_until(lambda: c.get(path)[0] == 200, timeout, 0.1))
    finally:
        c.close()


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(1, math.ceil(q * len(s))) - 1]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# 1. hot path

SERVER_SRC = """
import asyncio, os, sys, time
from sanic import Sanic, response
PROBE = {"lags": [], "ticks": []}
mode, port, db, here = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
app = Sanic("bench_" + mode)
app.config.ACCESS_LOG = False

@app.get("/api/ping")
async def ping(request):
    return response.json({"pong": True})

if mode in ("instrumented", "hookonly", "against"):  # "bare" and "control" run the app as it is
    sys.path.insert(0, here)
    import telemetry
    telemetry.instrument(app, telemetry.Config(db=db, spool_dir=db + "-spool",
                                               caddy_log_file=os.environ.get("BENCH_LOG", "")))
    if mode == "hookonly":  # callgrind: the per-request work only (see callgrind_per_request)
        async def _collect_only(self):  # collects batches of 1,024 samples, as the tick does at ~4,000 req/s
            while True:
                await asyncio.sleep(0.05)  # stop() cancels it
                if (self.sanic.uncollected() if hasattr(self.sanic, "uncollected") else self.sanic.pending()) >= 1024:
                    self.collect()
        telemetry._Pipeline._run = _collect_only
    if os.environ.get("BENCH_PROBE"):  # the tail part: each stretch telemetry's own tasks hold the loop
        import types

        @types.coroutine
        def timed(coro, label=""):  # drives coro, timing each resumption up to its next suspension
            value, exc = None, None
            while True:
                t0 = time.perf_counter()
                try:
                    future = coro.throw(exc) if exc is not None else coro.send(value)
                except StopIteration as stop:
                    PROBE["ticks"].append(time.perf_counter() - t0)
                    return stop.value
                PROBE["ticks"].append(time.perf_counter() - t0)
                if os.environ.get("BENCH_PROBE") == "labels":
                    PROBE.setdefault("labels", []).append((time.perf_counter() - t0, label,
                                                           coro.cr_frame.f_lineno if coro.cr_frame else 0))
                try:
                    value, exc = (yield future), None
                except BaseException as e:  # a cancellation goes into coro
                    value, exc = None, e

        for cls in (getattr(telemetry, "_Pipeline", None), getattr(telemetry, "_Writer", None)):
            if cls is not None:  # (an --against build before these names: no stretches timed)
                def patched(self, _run=cls._run, _label=cls.__name__):
                    return timed(_run(self), _label)
                cls._run = patched

if os.environ.get("BENCH_PROBE"):  # the event loop's lag: a 1 ms sleep, woken how late
    async def probe(app):
        lags = PROBE["lags"]
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - t0 - 0.001)
            if len(lags) > 200_000:
                del lags[:100_000]

    @app.after_server_start
    async def start_probe(app):
        app.add_task(probe(app))

    @app.get("/bench/probe")
    async def probe_read(request):
        out = {k: sorted(v) for k, v in PROBE.items()}
        PROBE["lags"].clear()
        PROBE["ticks"].clear()
        PROBE.pop("labels", None)
        return response.json(out)
app.run(host="127.0.0.1", port=port, single_process=True, access_log=False, motd=False)
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk_argv(port: int, seconds: int, cpu: int = 0) -> list[str]:
    return pinned(cpu, [WRK, "-t1", "-c32", f"-d{seconds}s", f"http://127.0.0.1:{port}/api/ping"])


def wrk_result(out: str) -> tuple[float, int, int]:
    """(req/s, requests completed, non-2xx + socket errors) from wrk's report."""
    bad = sum(map(int, re.findall(r"(?:Non-2xx or 3xx responses|connect|read|write|timeout):? (\d+)", out)))
    return (float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            int(re.search(r"(\d+) requests in", out).group(1)), bad)


def wrk(port: int, seconds: int) -> tuple[float, int, int]:
    """One wrk run against one server."""
    return wrk_result(subprocess.run(wrk_argv(port, seconds), capture_output=True, text=True,
                                     timeout=seconds + 30).stdout)


def wrk_both(ports: dict[str, int], seconds: int, cpu: int = 0) -> dict[str, tuple[float, int, int]]:
    """wrk against every server at once, every wrk on CPU cpu: whatever the machine does
    meanwhile, it does to all of them."""
    procs = {m: subprocess.Popen(wrk_argv(p, seconds, cpu), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 text=True)
             for m, p in ports.items()}
    return {m: wrk_result(proc.communicate(timeout=seconds + 30)[0]) for m, proc in procs.items()}


HOT_MODES = ("bare", "control", "instrumented")
#: --against: the folder of the build to compare with (its telemetry.py), or None.
AGAINST: Path | None = None


def hot_modes() -> tuple[str, ...]:
    """The servers of a set: with --against, the other build instrumented too ("against")."""
    return HOT_MODES + (("against",) if AGAINST is not None else ())


def hot_set(tmp: Path, n: int, rounds: int, secs: int, wrk_cpu: int) -> dict[str, Any]:
    """One set of fresh servers (hot_modes()), loaded together for `rounds` rounds by wrk on CPU
    wrk_cpu: the median ratios to bare of this set (throughput and requests per CPU-second), and
    the instrumented app's count against what wrk completed."""
    modes = hot_modes()
    ports = {m: free_port() for m in modes}
    seed = {"PYTHONHASHSEED": str(n + 1)}  # one seed (and one layout) for the set: see the docstring
    servers = {m: Child(same_layout(pinned(0, [sys.executable, str(tmp / "server.py"), m, str(p),
                                               str(tmp / f"hot{wrk_cpu}-{n}-{m}.db"),
                                               str(AGAINST if m == "against" else HERE)])),
                        tmp / f"{m}{wrk_cpu}-{n}.log", env=seed)
               for m, p in ports.items()}
    try:
        for m, p in ports.items():
            if not answers(p, "/api/ping"):
                raise RuntimeError(f"{m} server did not answer in 30 s:\n{servers[m].tail()}")
        sent = wrk_both(ports, 1, wrk_cpu)["instrumented"][1]  # warm-up, not timed; the instrumented app counts it too
        figures: dict[str, dict[str, list[float]]] = {k: {m: [] for m in modes[1:]} for k in ("ratio", "per_cpu")}
        rps, bad = [], 0
        for _ in range(rounds):
            c0 = {m: cpu_seconds(s.proc.pid) for m, s in servers.items()}
            res = wrk_both(ports, secs, wrk_cpu)
            cpu = {m: cpu_seconds(s.proc.pid) - c0[m] for m, s in servers.items()}
            bad += sum(r[2] for r in res.values())
            sent += res["instrumented"][1]
            rps.append(res["bare"][0])
            for m in modes[1:]:
                figures["ratio"][m].append(res[m][0] / res["bare"][0])
                # requests per CPU-second: corrects for an unequal share of the CPU
                figures["per_cpu"][m].append((res[m][1] / cpu[m]) / (res["bare"][1] / cpu["bare"]))
        # the last flush lands within flush_interval + one write: wait (bounded) for the count to settle
        c, seen = Client(ports["instrumented"]), [-1]
        wait_until(lambda: seen.append(c.counts()[1]) or (len(seen) > 4 and seen[-1] == seen[-4] >= sent), 5.0, 0.2)
        c.close()
        return {**{k: {m: statistics.median(v) for m, v in f.items()} for k, f in figures.items()},
                "bare_rps": statistics.median(rps), "sent": sent, "counted": seen[-1], "bad": bad}
    finally:
        for s in servers.values():
            s.stop()


def bench_hot_path(quick: bool, tmp: Path) -> None:
    sets, rounds, secs = (2, 1, 2) if quick else (8, 2, 4)
    (tmp / "server.py").write_text(SERVER_SRC)
    # the headline: wrk on the other CPU, as Caddy or any client would be; then wrk on the
    # servers' CPU, where the machine's wake-up cost (see the docstring) does not weigh in
    layouts = ([(1, "wrk on the other CPU")] if len(CPUS) > 1 else []) + [(0, "wrk on the servers' CPU")]
    lines, sent, counted = [], 0, 0
    for wrk_cpu, label in layouts:
        print(f"  -- {label} (CPU {CPUS[wrk_cpu]})")
        results = []
        for n in range(sets):
            r = hot_set(tmp, n, rounds, secs, wrk_cpu)
            results.append(r)
            against = (f"; against/bare {r['ratio']['against']:.3f} (per CPU-second {r['per_cpu']['against']:.3f})"
                       if AGAINST is not None else "")
            print(f"  set {n + 1}/{sets} (fresh processes, {rounds} x {secs} s): instrumented/bare "
                  f"{r['ratio']['instrumented']:.3f}, control/bare {r['ratio']['control']:.3f}; per CPU-second "
                  f"{r['per_cpu']['instrumented']:.3f} and {r['per_cpu']['control']:.3f}{against}; "
                  f"bare {r['bare_rps']:,.0f} req/s")

        def spread(key: str, mode: str) -> tuple[float, float, float]:
            v = [r[key][mode] for r in results]
            return statistics.median(v), min(v), max(v)

        inst, ctl, inst_cpu = spread("ratio", "instrumented"), spread("ratio", "control"), spread("per_cpu", "instrumented")
        sent += sum(r["sent"] for r in results)
        counted += sum(r["counted"] for r in results)
        print(f"  median of {sets} sets: instrumented/bare throughput {inst[0]:.3f} (sets {inst[1]:.3f}..{inst[2]:.3f}); "
              f"requests per CPU-second {inst_cpu[0]:.3f}; "
              f"control (the same bare app twice) {ctl[0]:.3f} (sets {ctl[1]:.3f}..{ctl[2]:.3f}); "
              f"wrk errors {sum(r['bad'] for r in results)}")
        vs = ""
        if AGAINST is not None:
            ag = spread("ratio", "against")
            paired = [r["ratio"]["instrumented"] / r["ratio"]["against"] for r in results]
            print(f"  --against {AGAINST.name}: against/bare {ag[0]:.3f} (sets {ag[1]:.3f}..{ag[2]:.3f}); this build / "
                  f"against, paired per set: median {statistics.median(paired):.3f} (sets {min(paired):.3f}.."
                  f"{max(paired):.3f})")
            vs = f"; against {ag[0]:.3f}, this/against {statistics.median(paired):.3f}"
        lines.append(f"{inst[0]:.3f} (sets {inst[1]:.3f}..{inst[2]:.3f}; control bare/bare {ctl[0]:.3f}, sets "
                     f"{ctl[1]:.3f}..{ctl[2]:.3f}; per CPU-second {inst_cpu[0]:.3f}{vs})")
    print(f"  telemetry counted {counted:,} sanic requests; wrk completed {sent:,} against it "
          f"(difference {counted - sent:+,}: requests in flight when wrk stopped)")
    SUMMARY["hot path"] = (f"instrumented/bare throughput   {lines[0]}  (goal >= 0.95)   median of {sets} sets of "
                           f"fresh processes, {layouts[0][1]}"
                           + (f"; {layouts[1][1]} {lines[1]}" if len(lines) > 1 else "")
                           + f"; counted {counted:,} of {sent:,}")


#: Appends the lines of a file (argv 1) to a log (argv 2) at a rate (argv 3, lines/s) in 50 ms
#: batches, each line's ts made the moment it is written; until killed or the lines run out.
FOLLOW_WRITER_SRC = """
import re, sys, time
lines, rate = open(sys.argv[1], "rb").read().splitlines(keepends=True), float(sys.argv[3])
ts = re.compile(rb'"ts":[0-9.]+,')
with open(sys.argv[2], "ab", buffering=0) as out:
    i, t0, done = 0, time.monotonic(), 0
    while i < len(lines):
        due = int((time.monotonic() - t0) * rate) - done
        if due > 0:
            now = b'"ts":%.6f,' % time.time()
            out.write(b"".join(ts.sub(now, line, count=1) for line in lines[i:i + due]))
            i, done = i + due, done + due
        time.sleep(0.05)
"""


def follow_set(tmp: Path, n: int, rounds: int, secs: int, rate: int, lines_file: Path,
               build: Path = HERE, parser_cpu: int | None = None) -> dict[str, Any]:
    """Two instrumented servers of a build on CPU 0, one following a log file that a writer on
    the other CPU appends `rate` lines/s to, loaded together by wrk on the other CPU: the median
    throughput ratio (following / not), per CPU-second too, the lines it read, and its parse
    process's CPU per line and memory (when it has one). The parse process runs where the server
    runs (it inherits its CPU), or on parser_cpu: a machine with a core to spare."""
    ports = {m: free_port() for m in ("plain", "following")}
    log = tmp / f"follow-{n}.log"
    log.write_bytes(b"")
    seed = {"PYTHONHASHSEED": str(n + 1)}
    servers = {m: Child(same_layout(pinned(0, [sys.executable, str(tmp / "server.py"), "instrumented", str(p),
                                               str(tmp / f"follow-{n}-{m}.db"), str(build)])),
                        tmp / f"follow-{m}-{n}.log", env={**seed, **({"BENCH_LOG": str(log)} if m == "following" else {})})
               for m, p in ports.items()}
    writer = None
    try:
        for m, p in ports.items():
            if not answers(p, "/api/ping"):
                raise RuntimeError(f"{m} server did not answer in 30 s:\n{servers[m].tail()}")
        writer = Child(pinned(1, [sys.executable, str(tmp / "follow_writer.py"), str(lines_file), str(log), str(rate)]),
                       tmp / f"follow-writer-{n}.log")
        wrk_both(ports, 1, 1)  # warm-up
        parser_pid = parse_process_pid(ports["following"])
        if parser_pid and parser_cpu is not None:
            os.sched_setaffinity(parser_pid, {parser_cpu})
        ratio, per_cpu, parse_cpu, lines0 = [], [], 0.0, reader_lines(ports["following"])
        for _ in range(rounds):
            c0 = {m: cpu_seconds(s.proc.pid) for m, s in servers.items()}
            p0 = cpu_seconds(parser_pid) if parser_pid else 0.0
            res = wrk_both(ports, secs, 1)
            cpu = {m: cpu_seconds(s.proc.pid) - c0[m] for m, s in servers.items()}
            parse_cpu += (cpu_seconds(parser_pid) - p0) if parser_pid else 0.0
            ratio.append(res["following"][0] / res["plain"][0])
            per_cpu.append((res["following"][1] / cpu["following"]) / (res["plain"][1] / cpu["plain"]))
        lines, written = reader_lines(ports["following"]), log.read_bytes().count(b"\n")
        return {"ratio": statistics.median(ratio), "per_cpu": statistics.median(per_cpu), "lines": lines,
                "written": written,
                "plain_rps": res["plain"][0], "parser_pid": parser_pid,
                "parse_us": 1e6 * parse_cpu / max(lines - lines0, 1) if parser_pid else None,
                "parser_mem": smaps_mb(parser_pid) if parser_pid else None}
    finally:
        if writer is not None:
            writer.stop()
        for s in servers.values():
            s.stop()


def reader_lines(port: int) -> int:
    return (json.loads(Client(port).get("/telemetry/healthz")[1]).get("reader") or {}).get("lines", 0)


def parse_process_pid(port: int) -> int | None:
    """The pid of the app's parse process, from healthz (None: builds without one, or off)."""
    reader = json.loads(Client(port).get("/telemetry/healthz")[1]).get("reader") or {}
    m = re.search(r"running \(pid (\d+)\)", str(reader.get("parse_process", "")))
    return int(m.group(1)) if m else None


def smaps_mb(pid: int) -> dict[str, float]:
    """A process's memory from /proc/PID/smaps_rollup (MB): Rss, Pss, and its own (Private_*)."""
    kb = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            kb[parts[0].rstrip(":")] = int(parts[1])
    return {"rss": kb.get("Rss", 0) / 1024, "pss": kb.get("Pss", 0) / 1024,
            "own": (kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)) / 1024}


def bench_follow(quick: bool, tmp: Path) -> None:
    sets, rounds, secs, rate = (2, 1, 3, 20_000) if quick else (5, 2, 5, 20_000)
    (tmp / "server.py").write_text(SERVER_SRC)
    (tmp / "follow_writer.py").write_text(FOLLOW_WRITER_SRC)
    lines_file = tmp / "follow-lines.log"
    lines_file.write_bytes(b"".join(diverse_lines(rate * (rounds * secs + 12))))
    builds = [(f"{name}, its parse process on CPU {cpu}", build, 1 if cpu else None)
              for name, build in [("this build", HERE)] + ([(f"against {AGAINST.name}", AGAINST)] if AGAINST else
                                                           [])
              for cpu in (1, 0)]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in builds}
    for n in range(sets):
        for name, build, parser_cpu in builds:  # in turns, one pair at a time
            r = follow_set(tmp, n, rounds, secs, rate, lines_file, build, parser_cpu)
            results[name].append(r)
            mem = r["parser_mem"]
            print(f"  set {n + 1}/{sets} [{name}]: following {rate:,} lines/s / not, app throughput {r['ratio']:.3f} "
                  f"(per CPU-second {r['per_cpu']:.3f}); {r['lines']:,} lines read of {r['written']:,} written; "
                  f"plain {r['plain_rps']:,.0f} req/s"
                  + (f"; parse process {r['parse_us']:.1f} us CPU/line, memory {mem['own']:.1f} MB own "
                     f"(RSS {mem['rss']:.0f} MB, PSS {mem['pss']:.1f} MB)" if mem else "; parsed in the worker"))
    line = []
    for name, rs in results.items():
        med, cpu = statistics.median(r["ratio"] for r in rs), statistics.median(r["per_cpu"] for r in rs)
        kept = statistics.median(r["lines"] / max(r["written"], 1) for r in rs)
        print(f"  [{name}] median of {sets} sets: {med:.3f} (sets {min(r['ratio'] for r in rs):.3f}.."
              f"{max(r['ratio'] for r in rs):.3f}), per CPU-second {cpu:.3f}; drop {100 * (1 - med):.1f}% (goal <= 10%); "
              f"lines read / written by the end {kept:.2f}")
        line.append(f"{name} {med:.3f} (drop {100 * (1 - med):.1f}%), per CPU-second {cpu:.3f}, read/written {kept:.2f}")
    lines_file.unlink()
    SUMMARY["follow"] = (f"app throughput, reader following {rate:,} lines/s / none (goal: drop <= 10%), median of "
                         f"{sets} sets: " + "; ".join(line))


def callgrind_per_request(mode: str, tmp: Path, n1: int, n2: int) -> float:
    """Main-thread instructions per request of the bench server under valgrind's callgrind: the
    difference between a run of n2 and one of n1 requests, divided by n2 - n1 (start-up cancels).
    Instruction counts do not depend on what else the machine is doing. The instrumented server's
    flush loop is replaced by one that only collects, in batches of 1,024 samples: under valgrind a
    flush would cover a handful of requests instead of thousands, so its cost per request would
    be inflated many times over, while the collection's cost is counted as it is at ~4,000 req/s."""
    totals = []
    for n in (n1, n2):
        port, out = free_port(), tmp / f"cg-{mode}-{n}"
        child = Child(same_layout(["valgrind", "--tool=callgrind", "--separate-threads=yes",
                                   f"--callgrind-out-file={out}.%p", sys.executable, str(tmp / "server.py"), mode,
                                   str(port), str(tmp / f"cg-{mode}.db"), str(HERE)]),
                      tmp / f"cg-{mode}.log", env={"PYTHONHASHSEED": "1"})  # seed and layout fixed: runs repeat
        try:
            if not answers(port, "/api/ping", timeout=300):
                raise RuntimeError(f"{mode} under valgrind did not answer:\n{child.tail()}")
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            for _ in range(n):
                conn.request("GET", "/api/ping")
                conn.getresponse().read()
            conn.close()
        finally:
            child.stop(timeout=300)
        counts = [int(m.group(1)) for f in tmp.glob(f"cg-{mode}-{n}.*")
                  if (m := re.search(r"^summary: (\d+)", f.read_text(errors="replace"), re.M))]
        totals.append(max(counts))  # the main thread's file is the largest
    return (totals[1] - totals[0]) / (n2 - n1)


def bench_instructions(quick: bool, tmp: Path) -> None:
    if not shutil.which("valgrind"):
        SUMMARY["instructions"] = "skipped: no valgrind (apt-get install valgrind)"
        return
    (tmp / "server.py").write_text(SERVER_SRC)
    n1, n2 = (100, 400) if quick else (300, 2300)
    bare = callgrind_per_request("bare", tmp, n1, n2)
    inst = callgrind_per_request("hookonly", tmp, n1, n2)
    print(f"  instructions per request (main thread): bare {bare:,.0f}, instrumented {inst:,.0f} "
          f"(+{inst - bare:,.0f}); bare/instrumented {bare / inst:.3f}")
    SUMMARY["instructions"] = (f"bare/instrumented per request  {bare / inst:.3f}  (goal >= 0.95)   {bare:,.0f} vs "
                               f"{inst:,.0f} instructions (callgrind, main thread; flush loop replaced by a collect every "
                               f"1,024 samples)")


# ---------------------------------------------------------------------------------------------
# 2. ingest

LINE = ('{{"level":"info","ts":{ts!r},"logger":"http.log.access.log0","msg":"handled request","request":'
        '{{"remote_ip":"127.0.0.1","remote_port":"{port}","client_ip":"127.0.0.1","proto":"HTTP/1.1",'
        '"method":"{method}","host":"127.0.0.1:8080","uri":"{uri}","headers":{{"User-Agent":["{ua}"],'
        '"Accept":["*/*"],"X-Request-Id":["{rid}"]}}}},"bytes_read":{read},"user_id":"","duration":{dur:.9f},'
        '"size":{size},"status":{status},"resp_headers":{{"Content-Type":["application/json"],"Server":["Caddy"]}},'
        '"uuid":"{rid}","request_id":"{rid}","upstream_latency_ms":{up:.3f}}}\n')
UAS = ["curl/8.5.0", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
       "python-requests/2.32.3", "Go-http-client/1.1", "kube-probe/1.30"]
#: (weight, method, uri template, status): 13 shapes the demo app routes, 37 it 404s (assets, scanners).
PATHS = [(30, "GET", "/api/ping", 200), (25, "GET", "/api/items/{id}", 200),
         (5, "GET", "/api/items/{id}?fields=name&x={n}", 200), (3, "HEAD", "/api/items/{n}", 200),
         (4, "GET", "/api/slow?ms={ms}", 200), (2, "GET", "/api/error", 500), (2, "GET", "/", 302),
         (3, "GET", "/telemetry/?range=15m&refresh=2", 200), (2, "GET", "/telemetry/api/summary?range=5m", 200),
         (1, "GET", "/telemetry/dashboard.css", 200), (2, "GET", "/telemetry/healthz", 200),
         (1, "POST", "/telemetry/ingest", 200), (1, "POST", "/api/ping", 405)] + \
        [(0.4, "GET", f"/static/asset-{i}.js?v={{n}}" if i % 3 else f"/v1/legacy/{i}/items?page={{n}}", 404)
         for i in range(37)]


def caddy_lines(n: int, seed: int = 1, rate: float = 2000.0) -> list[bytes]:
    rng = random.Random(seed)
    ts, out = time.time() - n / rate, []  # `rate` lines/s of traffic (2,000), ending now
    for _, method, template, status in rng.choices(PATHS, [p[0] for p in PATHS], k=n):
        uri = template.format(id=rng.randint(1, 2000), n=rng.randint(1, 50), ms=rng.choice([10, 50, 100, 250]))
        ts += rng.expovariate(rate)
        dur = rng.lognormvariate(math.log(0.004), 0.9)
        rid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        size = 0 if method == "HEAD" else 13 if uri == "/api/ping" else rng.randint(20, 4000)
        out.append(LINE.format(ts=ts, port=rng.randint(30000, 60999), method=method, uri=uri, ua=rng.choice(UAS),
                               rid=rid, read=rng.randint(50, 900) if method == "POST" else 0, dur=dur,
                               size=size, status=status, up=dur * 800).encode())
    return out


#: Scanners' paths: every {tok} a random token, so hardly a path comes twice.
SCANS = ["/wp-admin/{tok}.php", "/.env", "/.git/config", "/{tok}", "/{tok}/{tok}", "/cgi-bin/{tok}.cgi",
         "/static/{hex}.js?v={n}", "/api/v{n}/{tok}/{id}", "/api/items/{tok}", "/vendor/phpunit/{tok}/eval-stdin.php",
         "/{tok}.{ext}", "/index.php?s={tok}", "/%2e%2e/{tok}", "/api/{tok}?id={id}"]
#: (weight, method, uri template, status) of the demo app's routes as its users call them.
USER_PATHS = [(28, "GET", "/api/ping", 200), (25, "GET", "/api/items/{id}", 200),
              (8, "GET", "/api/items/{id}?fields=name&page={n}", 200), (3, "HEAD", "/api/items/{id}", 200),
              (4, "GET", "/api/slow?ms={ms}", 200), (2, "GET", "/api/error", 500), (3, "GET", "/?utm_source={tok}", 302),
              (1, "POST", "/api/ping", 405), (1, "PUT", "/api/items/{id}", 405)]  # (the dashboard's own are not kept)


def diverse_lines(n: int, seed: int = 3, rate: float = 2500.0) -> list[bytes]:
    """n lines as a busy service's log has them (see bench_ingest): 80% the app's routes with item
    ids up to 10^6 and query strings, 20% 404 scans of random paths; `rate` lines/s ending now."""
    rng = random.Random(seed)
    alnum = string.ascii_lowercase + string.digits

    def tok() -> str:
        return "".join(rng.choices(alnum, k=rng.randint(4, 12)))
    ts, out = time.time() - n / rate, []
    weights = [p[0] for p in USER_PATHS]
    for _ in range(n):
        if rng.random() < 0.2:
            method, template, status = rng.choice(["GET", "GET", "GET", "POST", "HEAD"]), rng.choice(SCANS), 404
        else:
            _, method, template, status = rng.choices(USER_PATHS, weights)[0]
        uri = template.replace("{tok}", tok(), 1).replace("{tok}", tok()).format(
            id=rng.randint(1, 1_000_000), n=rng.randint(1, 50), ms=rng.choice([10, 50, 100, 250]),
            hex=f"{rng.getrandbits(64):016x}", ext=rng.choice(["php", "asp", "bak", "sql", "zip"]))
        ts += rng.expovariate(rate)
        dur = min(rng.lognormvariate(math.log(0.004), 0.9), 0.45)  # (slower ones are events: another path)
        rid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        size = 0 if method == "HEAD" else rng.randint(20, 4000)
        out.append(LINE.format(ts=ts, port=rng.randint(30000, 60999), method=method, uri=uri, ua=rng.choice(UAS),
                               rid=rid, read=0, dur=dur, size=size, status=status, up=dur * 800).encode())
    return out


INGEST_SRC = """
import bisect, itertools, sys
sys.path.insert(0, sys.argv[1])
import bench_telemetry as B
chunks = B.reader_chunks(B.caddy_lines(20_000))
parser, agg = B.fresh_pipeline()
ends = list(itertools.accumulate(chunk.count(b"\\n") for chunk in chunks))  # lines up to the end of each chunk
B.feed_chunks(parser, agg, chunks[:bisect.bisect_left(ends, int(sys.argv[2])) + 1])
print(parser.stats.lines)
"""


def callgrind_per_line(tmp: Path, n1: int, n2: int) -> float:
    """Instructions per line of parse + aggregate under callgrind: the difference between feeding
    the 64 KiB blocks that hold n2 and n1 of the same lines (rounded up to whole blocks), divided
    by the difference in lines fed (building the lines and the blocks, and start-up, cancel)."""
    (tmp / "ingest.py").write_text(INGEST_SRC)
    totals, fed = [], []
    for n in (n1, n2):
        out = tmp / f"cg-ingest-{n}"
        run = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
                              str(tmp / "ingest.py"), str(HERE), str(n)], capture_output=True, text=True,
                             timeout=1200, check=True)
        fed.append(int(run.stdout.split()[-1]))
        totals.append(int(re.search(r"^summary: (\d+)", out.read_text(errors="replace"), re.M).group(1)))
    return (totals[1] - totals[0]) / (fed[1] - fed[0])


def reader_chunks(lines: list[bytes], size: int = 1 << 16) -> list[bytes]:
    """Newline-ended lines as the reader gets them from a pipe with a backlog: 64 KiB reads, cut
    anywhere (mid-line too)."""
    stream = b"".join(lines)
    return [stream[i:i + size] for i in range(0, len(stream), size)]


def named(mod: Any, name: str) -> Any:
    """mod's private name (this build's), or its public one (builds before the names were private)."""
    return getattr(mod, f"_{name}", None) or getattr(mod, name)


def feed_chunks(parser: Any, agg: Any, chunks: list[bytes], mod: Any = T) -> None:
    """What the reader does with each read (take(): the line cutter cuts it at its last newline,
    feed() parses the block), then the worker's flush (the runs into the aggregator, its flush());
    mod is the telemetry module (this build's, or --against's)."""
    reader_cls, blocks_cls = named(mod, "CaddyReader"), named(mod, "LineBlocks")
    reader, blocks = reader_cls("true", parser), blocks_cls(reader_cls.LINE_LIMIT)  # no process started
    for chunk in [*chunks, b""]:  # b"": the end of the stream
        reader.take(blocks, chunk)
    if hasattr(parser, "collect"):
        for run in parser.collect():
            agg.add(run)
    else:  # builds before series runs
        parser.drain(agg)
    agg.flush()


def fresh_pipeline(mod: Any = T) -> tuple[Any, Any]:
    app = mod.create_app(mod.Config(db=":memory:"), name=f"bench{random.getrandbits(32)}")
    app.router.finalize()
    return named(mod, "CaddyParser")(named(mod, "RouteResolver")(app.router)), named(mod, "Aggregator")("bench")


@functools.cache
def against_module() -> Any:
    """--against's telemetry.py, imported under another name beside this build's."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("telemetry_against", AGAINST / "telemetry.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["telemetry_against"] = mod
    spec.loader.exec_module(mod)
    return mod


def bench_ingest(quick: bool, tmp: Path) -> None:
    n, rounds = (100_000, 3) if quick else (300_000, 5)
    t0 = time.perf_counter()
    lines = diverse_lines(n)
    uris = len({line.split(b'"uri":"', 1)[1].split(b'"', 1)[0] for line in lines})
    print(f"  {n:,} lines ({sum(map(len, lines)) / n:.0f} bytes avg; item ids up to 10^6, a fifth 404 scans; "
          f"{uris:,} distinct URIs) built in {time.perf_counter() - t0:.1f} s")
    chunks = reader_chunks(lines)
    bare = [line.rstrip(b"\n") for line in lines]
    total, loads, other = [], [], []
    for _ in range(rounds):
        parser, agg = fresh_pipeline()
        total.append(timed(lambda: feed_chunks(parser, agg, chunks)))
        if AGAINST is not None:  # the other build, in turns with this one
            mod = against_module()
            p2, a2 = fresh_pipeline(mod)
            other.append(timed(lambda: feed_chunks(p2, a2, chunks, mod)))
        if parser.stats.access != n or parser.stats.malformed:
            print(f"  ! parser: {parser.stats.access} access lines, {parser.stats.malformed} malformed: "
                  f"{parser.stats.last_malformed[:120]}")
        # each object dropped as soon as it is made, as a parser would: a list of 200,000 dicts
        # would make the collector, not json.loads, most of the time
        loads.append(timed(lambda: collections.deque(map(json.loads, bare), 0)))
    bare.clear()
    tot, j = statistics.median(total), statistics.median(loads)
    print(f"  parser alone, median of {rounds}, {len(chunks):,} reads of 64 KiB ({n / len(chunks):.0f} lines each): "
          f"cut into lines + parse + aggregate {n / tot:,.0f} lines/s ({tot * 1e6 / n:.2f} us/line); json.loads "
          f"alone {n / j:,.0f} lines/s (pipeline is {j / tot:.2f}x json.loads)")
    vs = ""
    if other:
        o = statistics.median(other)
        print(f"  --against {AGAINST.name}: {n / o:,.0f} lines/s; this build / against: {o / tot:.3f}")
        vs = f"; against {n / o:,.0f} lines/s, this/against {o / tot:.3f}"
    per_line = ""
    if shutil.which("valgrind"):  # a figure that does not drift with the machine
        n1, n2 = (1_000, 3_000) if quick else (2_000, 12_000)
        per_line = f"; {callgrind_per_line(tmp, n1, n2):,.0f} instructions/line (callgrind)"
        print(f"  instructions per line, cut + parse + aggregate: {per_line[2:]}")
    # end to end: a log file through the reader into the store, until the summary shows every line
    e2e_n = 300_000 if quick else 1_500_000
    log = tmp / "diverse.log"
    with open(log, "wb") as f:
        f.writelines(lines)
        if e2e_n > n:
            f.writelines(diverse_lines(e2e_n - n, seed=4, rate=2500.0 * (e2e_n - n) / e2e_n))
    lines.clear()
    chunks.clear()
    mb = log.stat().st_size / 1e6
    print(f"  end to end: {e2e_n:,} lines ({mb:.0f} MB) in {log.name}")
    e2e = {label: ingest_e2e(build, log, e2e_n, tmp, label.split()[0]) for label, build in builds_here()}
    for label, r in e2e.items():
        print(f"  {label}: `--caddy-log-command \"cat FILE\"`: the summary shows "
              f"{r['counted'] if r['counted'] is not None else '?':,} of {e2e_n:,} after {r['seconds']:.1f} s: "
              f"{r['rate']:,.0f} lines/s ({'exact' if r['counted'] == e2e_n else 'NOT exact'}); peak RSS {r['peak']:.0f} MB")
    ga = goaccess_rate(log, e2e_n, tmp)
    mine = e2e["this build"]["rate"]
    if ga is not None:
        print(f"  GoAccess {ga['version']} (--log-format=CADDY) on the same file: {ga['seconds']:.1f} s, "
              f"{ga['rate']:,.0f} lines/s; end to end / GoAccess: {mine / ga['rate']:.1f}x (goal >= 5x)")
    else:
        print("  GoAccess: not installed (apt-get install goaccess)")
    log.unlink()
    others = [f"{label} {r['rate']:,.0f} lines/s" for label, r in e2e.items() if label != "this build"]
    SUMMARY["ingest"] = (f"parser alone {n / tot:,.0f} lines/s (goal >= 500,000){vs}{per_line}; end to end "
                         f"{mine:,.0f} lines/s (goal >= 350,000)" + (f", {'; '.join(others)}" if others else "")
                         + (f"; GoAccess {ga['rate']:,.0f} lines/s, ratio {mine / ga['rate']:.1f}x (goal >= 5x)"
                            if ga else "; GoAccess not installed"))


def ingest_e2e(build: Path, log: Path, n: int, tmp: Path, tag: str) -> dict[str, Any]:
    """One build's `--caddy-log-command "cat FILE"` (started once the app answers) until the
    summary shows n caddy requests (bounded: 300 s): lines/s, the count, peak RSS."""
    go = tmp / f"go-{tag}"
    go.unlink(missing_ok=True)
    command = f"sh -c 'while [ ! -e {go} ]; do sleep 0.01; done; exec cat {log}'"
    port = free_port()
    app = Child(demo_argv(port, tmp / f"e2e-{tag}.db", tmp, "--no-caddy", "--caddy-log-command", command),
                tmp / f"e2e-{tag}.log", cwd=build)
    client = Client(port, timeout=60)
    try:
        if not answers(port, "/telemetry/healthz"):
            raise RuntimeError(f"the app did not answer in 30 s:\n{app.tail()}")
        go.touch()
        t0, counted = time.perf_counter(), None
        while time.perf_counter() - t0 < 300:
            with contextlib.suppress(OSError, ValueError, KeyError, http.client.HTTPException):
                counted = caddy_count(client)
                if counted >= n:
                    break
            time.sleep(0.25)  # (each read flushes and reads: not too often)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "rate": (counted or 0) / seconds, "counted": counted,
                "peak": rss_mb(app.proc.pid, "VmHWM")}
    finally:
        client.close()
        app.stop()
        go.unlink(missing_ok=True)


def goaccess_rate(log: Path, n: int, tmp: Path) -> dict[str, Any] | None:
    """GoAccess on the same file (its CADDY log format, a JSON report), or None without it."""
    exe = shutil.which("goaccess")
    if exe is None:
        return None
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    t0 = time.perf_counter()
    run = subprocess.run([exe, str(log), "--log-format=CADDY", "-o", str(tmp / "goaccess.json"), "--no-progress"],
                         capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        print(f"  ! goaccess exited {run.returncode}: {run.stderr[-500:]}")
        return None
    total = json.loads((tmp / "goaccess.json").read_text())["general"].get("total_requests")
    if total != n:
        print(f"  ! goaccess counted {total} requests of {n}")
    return {"seconds": seconds, "rate": n / seconds, "version": version.split()[-1].rstrip(".")}


# ---------------------------------------------------------------------------------------------
# 3. freshness

def bench_freshness(quick: bool, tmp: Path) -> None:
    k = 15 if quick else 50
    if T._find_caddy() is None:
        SUMMARY["freshness"] = "skipped: no caddy binary"
        return
    port, cport = free_port(), free_port()
    demo = Child(demo_argv(port, tmp / "fresh.db", tmp, "--caddy-port", str(cport)), tmp / "fresh.log", cwd=HERE)
    app, edge = Client(port), Client(cport)
    try:
        if not (answers(port, "/telemetry/healthz") and answers(cport, "/api/ping")):
            raise RuntimeError(f"demo or Caddy did not answer in 30 s:\n{demo.tail()}")
        lags, missed, rng = [], 0, random.Random(3)
        for i in range(k + 1):  # the first one warms up (and absorbs the readiness probe)
            time.sleep(rng.uniform(0, 0.3))  # a random phase against the flush tick
            base = app.counts()
            if edge.get("/api/ping")[0] != 200:
                raise RuntimeError("GET /api/ping through Caddy did not return 200")
            t0 = time.perf_counter()
            seen = wait_until(lambda: all(a > b for a, b in zip(app.counts(), base)), 5.0, 0.005)
            if i and seen:
                lags.append(time.perf_counter() - t0)
            elif i:
                missed += 1
        p50, p95, mx = statistics.median(lags), pct(lags, 0.95), max(lags)
        print(f"  {len(lags)} requests through Caddy: request -> visible p50 {p50:.3f} s, p95 {p95:.3f} s, "
              f"max {mx:.3f} s; not visible within 5 s: {missed}")
        SUMMARY["freshness"] = (f"request -> visible p95         {p95:.2f} s (goal <= 0.5 s)  "
                                f"p50 {p50:.2f} s, max {mx:.2f} s, missed {missed} of {k}")
    finally:
        app.close()
        edge.close()
        if demo.stop() != 0:
            print(f"  ! telemetry.py exited {demo.proc.returncode}:\n{demo.tail()}")


# ---------------------------------------------------------------------------------------------
# 4. dashboard render

def add_bytes(r: Any, n: int) -> None:
    """A rollup's response bytes += n (the field is nbytes; builds before it called it bytes_sum)."""
    if hasattr(r, "nbytes"):
        r.nbytes += n
    else:
        r.bytes_sum += n


def poisson(rng: random.Random, lam: float) -> int:
    if lam >= 30:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    n, p, limit = 0, rng.random(), math.exp(-lam)
    while p > limit:
        n, p = n + 1, p * rng.random()
    return n


def route_models(rng: random.Random) -> list[tuple[str, str, float, int, dict[str, list[tuple[int, int]]]]]:
    """50 routes: (route, method, traffic weight, bytes, {source: 1,024 equally likely (status, bucket)})."""
    nd = statistics.NormalDist()
    names = ["/api/ping", "/api/items/<id:int>", "/api/error", T._UNMATCHED] + [
        f"/api/{noun}/<id:int>{tail}" for noun in ("users", "orders", "carts", "invoices", "products", "reviews",
                                                    "shipments", "coupons")
        for tail in ("", "/history", "/lines", "/status", "/notes", "/events")][:46]
    models = []
    for i, name in enumerate(names):
        median = 20.0 * math.exp(rng.gauss(0, 0.5))
        mix = {"/api/error": [(500, 1)], T._UNMATCHED: [(404, 1)]}.get(name, [(200, 96), (404, 2), (500, 1), (304, 1)])
        statuses = rng.choices([s for s, _ in mix], [w for _, w in mix], k=1024)
        order = rng.sample(range(1024), 1024)  # latency rank independent of status
        tables = {}
        for source, hop_ms in (("sanic", 0.0), ("caddy", 0.4)):  # the edge adds its proxy hop
            ms = [median * math.exp(0.8 * nd.inv_cdf((j + 0.5) / 1024)) + hop_ms for j in order]
            tables[source] = [(s, T._Histogram.index(m / 1000)) for s, m in zip(statuses, ms)]
        models.append((name, "POST" if i % 7 == 6 else "GET", 1.0 / (i + 1) ** 0.8, rng.randint(50, 5000), tables))
    return models


async def fill_store(path: str, rate: float, seconds: int, seed: int = 7) -> int:
    """`seconds` of history ending now at `rate` req/s; one Batch per 10 s slot. Returns requests."""
    rng = random.Random(seed)
    models = route_models(rng)
    wsum = sum(m[2] for m in models)
    value = [T._Histogram.value(i) for i in range(T._Histogram.BUCKETS)]  # seconds
    store = T._SQLiteStore(path)
    await store.open()
    now = int(time.time())
    total = 0
    for seq, slot in enumerate(range(now - seconds - (now - seconds) % 10, now + 1, 10)):
        rows = []
        for route, method, w, size, tables in models:
            n = poisson(rng, rate * w / wsum * 10)
            total += n
            for source, table in tables.items():
                by_status: dict[int, T._Rollup] = {}
                for (status, b), c in Counter(rng.choices(table, k=n)).items():
                    r = by_status.get(status)
                    if r is None:
                        r = by_status[status] = T._Rollup(slot, source, route, method, status)
                    r.count += c
                    r.dur_sum += value[b] * c
                    r.dur_max = max(r.dur_max, value[b])
                    add_bytes(r, size * c)
                    r.hist[b] = c
                rows.extend(by_status.values())
        await store.write(T._Batch("bench-fill", seq, rows))
    await store.close()
    return total


def bench_render(quick: bool, tmp: Path) -> None:
    n, history = (15, 900) if quick else (50, 3600)
    rates = (1000, 10)
    builds = {"this": HERE, **({"against": AGAINST} if AGAINST is not None else {})}
    if quick:
        print("  quick mode: stores hold 15 minutes of history; the page still renders range=1h")
    paths = {"page": "/telemetry/?range=1h&refresh=0", "json": "/telemetry/api/summary?range=1h"}
    keys = [(r, b) for r in rates for b in builds]
    times: dict[tuple, list[float]] = {(*k, kind): [] for k in keys for kind in paths}
    servers, clients, last = {}, {}, {}
    try:
        for rate in rates:
            db = tmp / f"render-{rate}.db"
            t0 = time.perf_counter()
            total = asyncio.run(fill_store(str(db), rate, history))
            fill_s = time.perf_counter() - t0
            size = sum(os.path.getsize(f) for f in tmp.glob(f"render-{rate}.db*"))
            print(f"  {rate:>5} req/s: filled {total:,} requests ({history // 60} min of history) "
                  f"in {fill_s:.1f} s; db {size / 1e6:.1f} MB")
            for build, folder in builds.items():  # each build reads its own copy of the same history
                copy = tmp / f"render-{rate}-{build}.db"
                for f in tmp.glob(f"render-{rate}.db*"):
                    if f.is_file():  # (the database and its journal; not the status folder)
                        shutil.copy(f, tmp / f.name.replace(f"render-{rate}.db", copy.name))
                port = free_port()
                (tmp / build).mkdir(exist_ok=True)
                servers[rate, build] = Child(demo_argv(port, copy, tmp / build, "--no-caddy"),
                                             tmp / f"render-{rate}-{build}.log", cwd=folder)
                clients[rate, build] = Client(port)
        for key in keys:
            if not answers(clients[key].port, "/telemetry/healthz"):
                raise RuntimeError(f"demo app did not answer in 30 s:\n{servers[key].tail()}")
        for i in range(n + 3):  # the stores and builds take turns, so noise hits all alike; 3 warm-ups
            for key in keys:
                for kind, path in paths.items():
                    t0 = time.perf_counter()
                    status, last[(*key, kind)] = clients[key].get(path)
                    if status != 200:
                        raise RuntimeError(f"GET {path} -> {status}: {last[(*key, kind)][:200]!r}")
                    if i >= 3:
                        times[(*key, kind)].append(time.perf_counter() - t0)
    finally:
        for key in servers:
            clients[key].close()
            servers[key].stop()
    for rate, build in keys:
        m = re.search(rb"data read in ([\d.]+) ms", last[rate, build, "page"])
        shown = json.loads(last[rate, build, "json"])["sources"]["caddy"]["requests"]
        name = "" if build == "this" else f" [--against {AGAINST.name}]"
        print(f"  {rate:>5} req/s history, range=1h ({shown:,} caddy requests shown), {n} GETs each{name}:")
        for kind in paths:
            ts = times[rate, build, kind]
            note = f", last 'data read in' {m.group(1).decode() if m else '?'} ms" if kind == "page" else ""
            print(f"         {kind}  p50 {statistics.median(ts) * 1e3:6.1f} ms  p95 {pct(ts, 0.95) * 1e3:6.1f} ms  "
                  f"({len(last[rate, build, kind]) / 1e3:.0f} kB{note})")
    p95 = {r: pct(times[r, "this", "page"], 0.95) for r in rates}
    json_ratio = pct(times[1000, "this", "json"], 0.95) / pct(times[10, "this", "json"], 0.95)
    print(f"  p95 ratio 1,000 / 10 req/s history: page {p95[1000] / p95[10]:.2f}, json {json_ratio:.2f}")
    if AGAINST is not None:
        for kind in paths:
            ratios = ", ".join(f"{r:,} req/s {pct(times[r, 'this', kind], 0.95) / pct(times[r, 'against', kind], 0.95):.2f}"
                               for r in rates)
            print(f"  this build / --against {AGAINST.name}, {kind} p95: {ratios}")
    SUMMARY["render 1h"] = (f"p95 at 1,000 req/s history     {p95[1000] * 1e3:.0f} ms  (goal <= 50 ms); at 10 req/s "
                            f"{p95[10] * 1e3:.0f} ms; ratio {p95[1000] / p95[10]:.1f} (goal ~1)"
                            + ("; 15 min of history (quick)" if quick else ""))


# ---------------------------------------------------------------------------------------------
# 5. tail latency and event-loop stalls

def wrk_latency(out: str) -> dict[str, float]:
    """wrk --latency's distribution (50/75/90/99 %) in ms, and req/s."""
    unit = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    dist = {f"p{q}": float(v) * unit[u] for q, v, u in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\b", out, re.M)}
    return {**dist, "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}


def tail_set(tmp: Path, n: int, secs: int, wrk_cpu: int) -> dict[str, Any]:
    """A fresh bare and a fresh instrumented server (one seed, one layout, both on CPU 0), each
    with a probe of its event loop's lag, loaded one at a time (bare, instrumented, instrumented,
    bare: drift cancels) by `wrk -t1 -c32 --latency` on CPU wrk_cpu: alone on its CPU, a server's
    tail is its own, not the scheduler's time slices between servers."""
    modes = ("bare", "instrumented") + (("against",) if AGAINST is not None else ())
    ports = {m: free_port() for m in modes}
    env = {"PYTHONHASHSEED": str(n + 1), "BENCH_PROBE": "1"}
    servers = {m: Child(same_layout(pinned(0, [sys.executable, str(tmp / "server.py"), m, str(p),
                                               str(tmp / f"tail{wrk_cpu}-{n}-{m}.db"),
                                               str(AGAINST if m == "against" else HERE)])),
                        tmp / f"tail-{m}{wrk_cpu}-{n}.log", env=env)
               for m, p in ports.items()}
    out: dict[str, Any] = {m: {"p99": [], "rps": [], "lags": [], "ticks": []} for m in ports}
    try:
        for m, p in ports.items():
            if not answers(p, "/api/ping"):
                raise RuntimeError(f"{m} server did not answer in 30 s:\n{servers[m].tail()}")
        order = [*modes, *reversed(modes)]  # bare, instrumented[, against, against], instrumented, bare
        for m, paced in [(m, False) for m in order] + [("instrumented", True)]:
            client = Client(ports[m])
            client.get("/bench/probe")  # clears what came before
            pace = ["-s", str(tmp / "pace.lua")] if paced else []
            run = subprocess.run(pinned(wrk_cpu, [WRK, "-t1", "-c40" if paced else "-c32", f"-d{secs}s", "--latency", *pace,
                                                  f"http://127.0.0.1:{ports[m]}/api/ping"]),
                                 capture_output=True, text=True, timeout=secs + 30)
            lat = wrk_latency(run.stdout)
            probe = json.loads(client.get("/bench/probe")[1])
            client.close()
            if paced:  # the stalls at about 10,000 req/s
                out["paced"] = {"rps": lat["rps"], "ticks": probe["ticks"]}
                continue
            out[m]["p99"].append(lat["p99"])
            out[m]["rps"].append(lat["rps"])
            out[m]["lags"] += probe["lags"]
            out[m]["ticks"] += probe["ticks"]
        return out
    finally:
        for s in servers.values():
            s.stop()


#: wrk's pacing for the stall figure: each of 40 connections waits 3 ms before its next request,
#: about 10,000 req/s in all.
PACE_LUA = "function delay()\n  return 3\nend\n"


def bench_tail(quick: bool, tmp: Path) -> None:
    sets, secs = (2, 2) if quick else (5, 4)
    (tmp / "server.py").write_text(SERVER_SRC)
    (tmp / "pace.lua").write_text(PACE_LUA)
    cpu = 1 if len(CPUS) > 1 else 0
    ratios, stalls, rates, ticks_all, lags = [], [], [], [], {"bare": [], "instrumented": []}
    paced_stalls, paced_rates, paced_all, against_ratios = [], [], [], []
    for n in range(sets):
        r = tail_set(tmp, n, secs, cpu)
        paced = r.pop("paced")
        paced_stalls.append(max(paced["ticks"], default=0.0))
        paced_rates.append(paced["rps"])
        paced_all += paced["ticks"]
        p99 = {m: statistics.mean(v["p99"]) for m, v in r.items()}
        ratios.append(p99["instrumented"] / p99["bare"])
        stalls.append(max(r["instrumented"]["ticks"], default=0.0))
        ticks_all += r["instrumented"]["ticks"]
        rates += r["instrumented"]["rps"]
        for m in lags:
            lags[m] += r[m]["lags"]
        if "against" in p99:
            against_ratios.append(p99["against"] / p99["bare"])
        print(f"  set {n + 1}/{sets} (one server at a time on CPU {CPUS[0]}, wrk -c32 on CPU {CPUS[cpu]}, {secs} s each): "
              f"p99 latency instrumented {p99['instrumented']:.3f} ms, bare {p99['bare']:.3f} ms, ratio "
              f"{ratios[-1]:.3f}; {statistics.mean(r['instrumented']['rps']):,.0f} vs "
              f"{statistics.mean(r['bare']['rps']):,.0f} req/s; longest stretch telemetry held the loop "
              f"{stalls[-1] * 1000:.2f} ms ({len(r['instrumented']['ticks'])} stretches); at {paced['rps']:,.0f} req/s "
              f"{paced_stalls[-1] * 1000:.2f} ms")
    ticks_all.sort()
    paced_all.sort()
    lag = {m: (pct(v, 0.999) * 1000, max(v) * 1000) for m, v in lags.items() if v}
    print(f"  median p99 ratio {statistics.median(ratios):.3f} (sets {min(ratios):.3f}..{max(ratios):.3f}); "
          f"longest stretch telemetry held the loop: {max(paced_stalls) * 1000:.2f} ms at "
          f"{statistics.median(paced_rates):,.0f} req/s (p99 {pct(paced_all, 0.99) * 1000:.2f} ms), "
          f"{max(stalls) * 1000:.2f} ms at {statistics.median(rates):,.0f} req/s (p99 {pct(ticks_all, 0.99) * 1000:.2f} "
          f"ms); event-loop lag p99.9 / max at full load: instrumented {lag['instrumented'][0]:.2f} / "
          f"{lag['instrumented'][1]:.2f} ms, bare {lag['bare'][0]:.2f} / {lag['bare'][1]:.2f} ms")
    vs = ""
    if against_ratios:
        vs = f"; against {statistics.median(against_ratios):.3f} (sets {min(against_ratios):.3f}..{max(against_ratios):.3f})"
        print(f"  --against {AGAINST.name}: p99 latency against/bare {vs[10:]}")
    SUMMARY["tail"] = (f"p99 latency instrumented/bare   {statistics.median(ratios):.3f}{vs} (goal <= 1.10; sets "
                       f"{min(ratios):.3f}..{max(ratios):.3f}, one server at a time, wrk -c32 on the other CPU); "
                       f"longest stretch telemetry held the event loop {max(paced_stalls) * 1000:.2f} ms at "
                       f"{statistics.median(paced_rates):,.0f} req/s (goal <= 1 ms), {max(stalls) * 1000:.2f} ms at "
                       f"{statistics.median(rates):,.0f} req/s")


# ---------------------------------------------------------------------------------------------
# 6. ingest memory

def rss_mb(pid: int, key: str) -> float:
    """VmRSS (now) or VmHWM (peak) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ingest_memory(build: Path, tmp: Path, tag: str, clients: int = 8, size: int = 9_900_000) -> tuple[float, float, list[int]]:
    """`python telemetry.py` of build, its default settings: RSS before, peak RSS while `clients`
    POST /ingest bodies of `size` bytes of Caddy lines at once, and the answers."""
    port = free_port()
    demo = Child(demo_argv(port, tmp / f"mem-{tag}.db", tmp, "--no-caddy"), tmp / f"mem-{tag}.log", cwd=build)
    try:
        if not answers(port, "/telemetry/healthz"):
            raise RuntimeError(f"demo did not answer in 30 s:\n{demo.tail()}")
        line = caddy_lines(1)[0]
        body = line * (size // len(line))
        base, out = rss_mb(demo.proc.pid, "VmRSS"), []

        def post() -> None:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            c.request("POST", "/telemetry/ingest", body)
            r = c.getresponse()
            r.read()
            out.append(r.status)
            c.close()
        threads = [threading.Thread(target=post) for _ in range(clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(180)
        return base, rss_mb(demo.proc.pid, "VmHWM"), sorted(out)
    finally:
        demo.stop()


def bench_memory(quick: bool, tmp: Path) -> None:
    builds = [("this build", HERE)] + ([(f"against {AGAINST.name}", AGAINST)] if AGAINST is not None else [])
    figures = []
    for label, build in builds:
        base, peak, answers_ = ingest_memory(build, tmp, label.split()[0])
        print(f"  {label}: 8 concurrent POST /ingest of 9.9 MB: RSS {base:.0f} MB before, peak {peak:.0f} MB "
              f"(+{peak - base:.0f} MB); answers {dict(collections.Counter(answers_))}")
        figures.append(f"{label} +{peak - base:.0f} MB")
    SUMMARY["memory"] = "peak RSS, 8 x 9.9 MB /ingest at once  " + "; ".join(figures)


# ---------------------------------------------------------------------------------------------
# 7. InfluxDB: what a page reads

INFLUX_INSTANCES, INFLUX_RATE = 3, 1000.0  # each instance (host) serves INFLUX_RATE req/s over 50 routes


@functools.cache
def _shares(models_id: int, i: int, source: str) -> list[tuple[tuple[int, int], float]]:
    """A route's (status, latency bucket) table as shares, largest first (made once)."""
    table = _MODELS[models_id][i][4][source]
    return [(k, c / len(table)) for k, c in Counter(table).most_common()]


_MODELS: dict[int, list] = {}


def synthetic_rollups(rng: random.Random, models: list, slot: int, seconds: int, mod: Any = T) -> list[Any]:
    """One instance's rollups of `seconds` of traffic from `slot` (one rollup per route, source and
    status, at the slot): INFLUX_RATE req/s split over the routes by weight, each route's requests
    spread over its (status, latency bucket) table in proportion; durations in seconds."""
    _MODELS[id(models)] = models
    wsum = sum(m[2] for m in models)
    value = [T._Histogram.value(i) for i in range(T._Histogram.BUCKETS)]
    rollup = named(mod, "Rollup")
    out = []
    for i, (route, method, w, size, tables) in enumerate(models):
        n = poisson(rng, INFLUX_RATE * seconds * w / wsum)
        if not n:
            continue
        for source in tables:
            by_status: dict[int, Any] = {}
            left = n
            for (status, b), share in _shares(id(models), i, source):
                k = min(left, round(n * share)) if left else 0
                if not k:
                    continue
                left -= k
                r = by_status.get(status)
                if r is None:
                    r = by_status[status] = rollup(slot, source, route, method, status)
                r.count += k
                r.dur_sum += value[b] * k
                r.dur_max = max(r.dur_max, value[b])
                add_bytes(r, size * k)
                r.hist[b] = r.hist.get(b, 0) + k
            out.extend(by_status.values())
    return out


async def influx_fill(store: Any, models: list, hours: int, now: int, mod: Any = T) -> int:
    """`hours` of INFLUX_INSTANCES instances' traffic ending now, through store.prepare() and write()
    as the flushes would, coarser where only a coarser tier keeps it: 10 s slots in batches of a
    minute for the last 2 h, 1 min slots in batches of 10 min until 8 h, 10 min slots in batches of
    an hour before. Returns the requests written."""
    rng, total, batch_cls = random.Random(41), 0, named(mod, "Batch")
    spans = [(min(hours, 2) * 3600, 10, 60), ((min(hours, 8) - 2) * 3600, 60, 600), ((hours - 8) * 3600, 600, 3600)]
    end = now - now % 600 + 600
    bounds, until = [], end
    for span, slot_s, batch_s in spans:  # newest span first; written oldest first, as time runs
        if span > 0:
            bounds.append((until - span, until, slot_s, batch_s))
            until -= span
    for inst in range(INFLUX_INSTANCES):
        seq = 0
        for start, until, slot_s, batch_s in reversed(bounds):
            for b0 in range(start, until, batch_s):
                rows = [r for slot in range(b0, b0 + batch_s, slot_s) if slot <= now
                        for r in synthetic_rollups(rng, models, slot, slot_s, mod)]
                if not rows:
                    continue
                total += sum(r.count for r in rows if r.source == "sanic")
                seq += 1
                batch = batch_cls(f"bench-host{inst}-w0", seq, rows, created=min(b0 + batch_s, now))
                if mod is T:  # a 5xx and a slow request per source and slot, for the event tables' reads
                    batch.events = [T._Event(slot + rng.random(), kind, source, "GET", "/api/items/<id:int>",
                                             f"/api/items/{rng.randrange(10**6)}", status, rng.expovariate(2.0),
                                             f"{inst}-{seq}-{slot}-{kind}")
                                    for slot in range(b0, min(b0 + batch_s, now + 1), slot_s)
                                    for source in T._SOURCES for kind, status in (("error", 500), ("slow", 200))]
                if hasattr(store, "prepare"):
                    store.prepare(batch)
                await store.write(batch)
    return total


async def influx_page_reads(fake: Any, store: Any, now: float,
                            route: tuple[str, str] | None = None) -> dict[str, tuple[int, int, int]]:
    """Per range: the queries of one page view (of one route's page, given one), the range and
    the one before it (the cards' change), the points they read (each once, however many of its
    queries read it) and the field values they read."""
    out = {}
    previous = getattr(store, "read_previous", None)  # (a build before the cards' change has none)
    for rng, (seconds, tier) in T._RANGES.items():
        fake.selected.clear()
        fake.selected_points.clear()
        await (store.read(seconds, tier, now, route) if route else store.read(seconds, tier, now))
        if previous is not None:
            await (previous(seconds, tier, now, route) if route else previous(seconds, tier, now))
        out[rng] = (len(fake.selected), len(fake.selected_points), sum(v for _, v in fake.selected))
    return out


def bench_influx(quick: bool, tmp: Path) -> None:
    import test_telemetry as W  # the InfluxDB wire server lives in the test file
    models = route_models(random.Random(7))
    now = int(time.time())
    results: dict[str, dict[str, tuple[int, int, int]]] = {}
    routes: dict[str, dict[str, tuple[int, int, int]]] = {}  # the busiest route's page
    for label, hours in (("hour", 1),) if quick else (("hour", 1), ("day", 24)):
        fake = W.FakeInflux(lean=True)
        try:
            async def go() -> tuple[int, dict]:
                store = T._InfluxStore(fake.url, fake.token, fake.org, W.BUCKET, timeout_s=120.0)
                await store.open()
                t0 = time.perf_counter()
                total = await influx_fill(store, models, hours, now)
                await store.trim(now)
                print(f"  {label}: {total:,} requests of {INFLUX_INSTANCES} instances written "
                      f"({fake.points_received:,} points sent, {len(fake.data[W.BUCKET]):,} kept after the "
                      f"finer tiers' trim) in {time.perf_counter() - t0:.0f} s")
                reads = await influx_page_reads(fake, store, now)
                busiest = max(models, key=lambda m: m[2])
                routes[label] = await influx_page_reads(fake, store, now, (busiest[0], busiest[1]))
                await store.close()
                return total, reads
            _total, results[label] = asyncio.run(go())
        finally:
            fake.close()
    flush = influx_flush_cost(models, now)
    print(f"  a worker's flush of 1 s of its traffic (1,000 req/s x 50 routes, steady): {flush['lines']:,.0f} lines, "
          f"{flush['values']:,.0f} field values, {flush['kb']:,.0f} KB ({flush['gz_kb']:,.0f} KB gzip); longest step on "
          f"the event loop: preparing {flush['prepare_ms']:.2f} ms, line protocol {flush['lp_ms']:.2f} ms "
          f"(median over flushes of each flush's longest; in one go: {flush['whole_ms']:.1f} ms)")
    before = influx_before(models, now) if AGAINST is not None else None
    print("  per page view: queries, points read, field values read" + (
        f" (before: the build {AGAINST.name}, its 1 s points over 5 min measured, scaled to each range)"
        if before else ""))
    for rng in T._RANGES:
        for label, reads in results.items():
            q, p, v = reads[rng]
            extra = ""
            if before and label == "day":
                bp, bv = (x * T._RANGES[rng][0] / 300 for x in before)
                extra = f"; before {bp:,.0f} points, {bv:,.0f} values: {bv / max(v, 1):,.0f}x as many values"
            print(f"  {label:4} {rng:>3}: {q} queries, {p:>7,} points, {v:>9,} field values{extra}")
            q, p, v = routes[label][rng]
            print(f"           the busiest route's page: {q} queries, {p:>7,} points, {v:>9,} field values")
    day = results.get("day") or results["hour"]
    worst = max([*day.values(), *(routes.get("day") or routes["hour"]).values()], key=lambda r: r[1])
    ratio = ""
    if before:
        ratio = f"; 24h page reads 1/{before[1] * 86400 / 300 / max(day['24h'][2], 1):,.0f} of the values it did"
    SUMMARY["influx"] = (f"points a page reads, at most      {worst[1]:,} (goal <= 50,000, a route's page too; 1,000 req/s x 50 routes x "
                         f"{INFLUX_INSTANCES} instances, a day); 24h page {day['24h'][1]:,} points, "
                         f"{day['24h'][2]:,} values{ratio}")


def sampled_rollups(rng: random.Random, models: list, slot: int) -> list[Any]:
    """One second of INFLUX_RATE req/s as an aggregator makes it: each request drawn from its
    route's table (synthetic_rollups spreads in proportion instead, which fits long spans)."""
    wsum = sum(m[2] for m in models)
    value = [T._Histogram.value(i) for i in range(T._Histogram.BUCKETS)]
    rows: dict[tuple, Any] = {}
    for route, method, w, size, tables in models:
        for _ in range(poisson(rng, INFLUX_RATE * w / wsum)):
            for source, table in tables.items():
                status, b = rng.choice(table)
                r = rows.get((source, route, status))
                if r is None:
                    r = rows[(source, route, status)] = T._Rollup(slot, source, route, method, status)
                r.count += 1
                r.dur_sum += value[b]
                r.dur_max = max(r.dur_max, value[b])
                add_bytes(r, size)
                r.hist[b] = r.hist.get(b, 0) + 1
    return list(rows.values())


def influx_flush_cost(models: list, now: int, flushes: int = 120) -> dict[str, float]:
    """One worker's flushes of 1 s of INFLUX_RATE req/s each, in a row, through
    _InfluxWindows.add_steps and _line_protocol_steps: what each writes and the longest step of
    each (medians over the last half, the windows filled by the first)."""
    import gzip
    import statistics
    rng, windows = random.Random(5), T._InfluxWindows()
    rows: dict[str, list[float]] = {k: [] for k in ("lines", "values", "kb", "gz_kb", "prepare_ms", "lp_ms", "whole_ms")}

    def longest(steps: Any) -> float:
        worst = 0.0
        while True:
            t0 = time.perf_counter()
            try:
                next(steps)
            except StopIteration:
                return max(worst, time.perf_counter() - t0) * 1e3
            worst = max(worst, time.perf_counter() - t0)
    for i in range(flushes):
        batch = T._Batch("bench-w0", i + 1, sampled_rollups(rng, models, now - flushes + i))
        t0 = time.perf_counter()
        prepare = longest(windows.add_steps(batch))
        out: list[str] = []
        lp = longest(T._line_protocol_steps(batch, out))
        whole = (time.perf_counter() - t0) * 1e3
        body = "\n".join(out).encode()
        if i >= flushes // 2:
            for k, v in (("lines", len(out)), ("values", sum(line.split(" ")[-2].count("=") for line in out)),
                         ("kb", len(body) / 1024), ("gz_kb", len(gzip.compress(body, 6)) / 1024),
                         ("prepare_ms", prepare), ("lp_ms", lp), ("whole_ms", whole)):
                rows[k].append(v)
    return {k: statistics.median(v) for k, v in rows.items()}


def influx_before(models: list, now: int) -> tuple[int, int]:
    """The build --against's InfluxDB reads of one 5 min page over 5 min of 1 s points (the same
    traffic): (points, field values)."""
    import test_telemetry as W
    mod = against_module()
    fake = W.FakeInflux(lean=True)

    async def go() -> tuple[int, int]:
        store = named(mod, "InfluxStore")(fake.url, fake.token, fake.org, W.BUCKET)
        await store.open()
        rng, batch_cls = random.Random(41), named(mod, "Batch")
        for inst in range(INFLUX_INSTANCES):
            for i, slot in enumerate(range(now - 300, now)):
                rows = synthetic_rollups(rng, models, slot, 1, mod)
                for r in rows:  # that build kept milliseconds
                    r.dur_sum, r.dur_max = r.dur_sum * 1000, r.dur_max * 1000
                await store.write(batch_cls(f"bench-host{inst}-w0", i + 1, rows))
        fake.selected.clear()
        await store.read(300, 10, now)
        await store.close()
        return sum(p for p, _ in fake.selected), sum(v for _, v in fake.selected)
    try:
        return asyncio.run(go())
    finally:
        fake.close()


# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# 8. crash: SIGKILL while Caddy log lines are being written

def kill_after_a_commit(pid: int, wal: Path, after: float, timeout: float = 2.0) -> None:
    """SIGKILL pid `after` seconds after its SQLite write-ahead log grows (a batch being committed;
    or after timeout): the kill lands in or just after a store write, before what follows it."""
    size = wal.stat().st_size if wal.exists() else 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if wal.stat().st_size != size:
                break
    end = time.perf_counter() + after
    while time.perf_counter() < end:  # (a sleep this short overshoots)
        pass
    os.kill(pid, signal.SIGKILL)


def crash_run(build: Path, work: Path, seed: int, at_commit: bool = False) -> tuple[int, int | None]:
    """One SIGKILL and restart of `python telemetry.py --caddy-log-file` of build: (lines written,
    caddy requests counted after the restart; None when the app did not answer). at_commit: the
    kill waits for the next write to the database (kill_after_a_commit), else it lands anywhere."""
    work.mkdir()
    log = work / "access.log"
    log.touch()
    lines = [line for line in caddy_lines(400, seed) if b'"/telemetry' not in line][:260]  # (its own: not counted)
    argv = demo_argv(free_port(), work / "telemetry.db", work, "--caddy-log-file", str(log), "--flush-interval",
                     "0.05", "--no-caddy")
    port = int(argv[argv.index("--port") + 1])
    demo = Child(argv, work / "first.log", cwd=build)
    try:
        if not answers(port, "/telemetry/healthz"):
            return len(lines), None
        with open(log, "ab", buffering=0) as f:
            for i in range(0, 250, 25):
                f.write(b"\n".join(lines[i:i + 25]) + b"\n")
                if not (at_commit and i == 225):
                    time.sleep(0.05)
            if at_commit:  # 0 to 0.6 ms after the write began: here, about the write's own length
                kill_after_a_commit(demo.proc.pid, work / "telemetry.db-wal", random.Random(seed).uniform(0, 0.0006))
            else:
                os.kill(demo.proc.pid, signal.SIGKILL)
            demo.proc.wait(10)
            f.write(b"\n".join(lines[250:]) + b"\n")
    finally:
        demo.stop()
    demo = Child(argv, work / "second.log", cwd=build)
    app = Client(port)
    try:
        if not answers(port, "/telemetry/healthz"):
            return len(lines), None
        seen: list[int] = []
        wait_until(lambda: seen.append(app.counts()[0]) or seen[-1] == len(lines), 8.0, 0.1)
        return len(lines), (seen[-1] if seen else None)
    finally:
        app.close()
        demo.stop()


def bench_crash(quick: bool, tmp: Path) -> None:
    n = 5 if quick else 100
    builds = [("this build", HERE)] + ([(f"against {AGAINST.name}", AGAINST)] if AGAINST is not None else [])
    figures = []
    for at_commit in (False, True):
        when = "right after a database write" if at_commit else "anywhere"
        for label, build in builds:
            outcomes: Counter = Counter()
            off: list[int] = []
            for i in range(n):
                wrote, counted = crash_run(build, tmp / f"crash-{label.split()[0]}-{int(at_commit)}-{i}", i, at_commit)
                kind = "no answer" if counted is None else "exact" if counted == wrote else \
                    "read twice" if counted > wrote else "lost"
                outcomes[kind] += 1
                if counted is not None and counted != wrote:
                    off.append(counted - wrote)
            spread = ", ".join(f"{k:+d} lines x{v}" for k, v in sorted(Counter(off).items())) or "none"
            print(f"  killed {when}: {label}: {n} kills: {dict(outcomes)}; off by: {spread}")
            figures.append(f"{when}: {label} exact in {outcomes['exact']} of {n}" + (f" ({spread})" if off else ""))
    SUMMARY["crash"] = "SIGKILL mid-log, then restart  " + "; ".join(figures)


# ---------------------------------------------------------------------------------------------
# 9-12. a guest that never hurts its host: a burst of log lines, a backlog, big bodies, slow bodies

#: The host app of the burst part: 200 routes and GET /api/ping, instrumented, one process.
BURST_SRC = """
import sys
from sanic import Sanic, response
port, db, here = int(sys.argv[1]), sys.argv[2], sys.argv[3]
sys.path.insert(0, here)
import telemetry
app = Sanic("bench_burst")
app.config.ACCESS_LOG = False

@app.get("/api/ping")
async def ping(request):
    return response.json({"pong": True})

def route(i):
    async def handler(request, id):
        return response.json({"route": i, "id": id})
    app.add_route(handler, f"/api/r{i}/<id:int>", methods=["GET"], name=f"r{i}")

for i in range(200):
    route(i)

import gc, time
GC = {0: [0, 0.0, 0.0], 1: [0, 0.0, 0.0], 2: [0, 0.0, 0.0]}  # generation -> [collections, longest s, total s]
_gc_t0 = [0.0]

def _gc_timer(phase, info):
    if phase == "start":
        _gc_t0[0] = time.perf_counter()
    else:
        d, g = time.perf_counter() - _gc_t0[0], GC[info["generation"]]
        g[0], g[1], g[2] = g[0] + 1, max(g[1], d), g[2] + d
gc.callbacks.append(_gc_timer)

@app.get("/bench/objects")
async def objects_read(request):
    import collections
    objs = gc.get_objects()
    out = {"tracked": len(objs), "by_type": collections.Counter(type(o).__name__ for o in objs).most_common(12)}
    del objs
    return response.json(out)

@app.get("/bench/gcstats")
async def gc_stats(request):
    return response.json(gc.get_stats())

@app.get("/bench/gc")
async def gc_read(request):
    out = {str(k): v[:] for k, v in GC.items()}
    for v in GC.values():
        v[:] = [0, 0.0, 0.0]
    return response.json(out)

telemetry.instrument(app, telemetry.Config(db=db, spool_dir=db + "-spool"))
app.run(host="127.0.0.1", port=port, single_process=True, access_log=False, motd=False)
"""

#: The host's user: GET /api/ping every INTERVAL s over one keep-alive connection (reconnecting
#: after an error or a refused connection); one line per ping, as it ends: monotonic start,
#: latency (s), status or error name. CLOCK_MONOTONIC is one clock for every process here.
PINGER_SRC = """
import http.client, sys, time
port, interval, out = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
f, conn, due = open(out, "w", buffering=1), None, time.monotonic()
try:
    while True:
        t0 = time.monotonic()
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.request("GET", "/api/ping")
            r = conn.getresponse()
            r.read()
            f.write(f"{t0:.6f} {time.monotonic() - t0:.6f} {r.status}\\n")
        except (OSError, http.client.HTTPException) as exc:
            f.write(f"{t0:.6f} {time.monotonic() - t0:.6f} {type(exc).__name__}\\n")
            if conn is not None:
                conn.close()
            conn = None
        due = max(due + interval, time.monotonic())
        time.sleep(max(0.0, due - time.monotonic()))
except KeyboardInterrupt:
    pass
"""

PING_INTERVAL = 0.005
BURST_ROUTES = 200
#: 20 statuses: 18 of 2xx-4xx, two 5xx (5xx lines are events: they take the parser's long way).
BURST_STATUSES = (200, 201, 202, 204, 206, 301, 302, 304, 307, 400, 401, 403, 404, 405, 409, 410, 422, 429, 500, 503)


class Pinger:
    """A PINGER_SRC process against port (a Child), and what it wrote."""

    def __init__(self, port: int, tmp: Path, tag: str) -> None:
        script = tmp / "pinger.py"
        if not script.exists():
            script.write_text(PINGER_SRC)
        self.out = tmp / f"pings-{tag}.txt"
        self.child = Child([sys.executable, str(script), str(port), str(PING_INTERVAL), str(self.out)],
                           tmp / f"pinger-{tag}.log")

    def pings(self) -> list[tuple[float, float, str]]:
        """(start, latency s, status or error) of every ping so far."""
        out = []
        with contextlib.suppress(OSError):
            for line in self.out.read_text().splitlines():
                parts = line.split()
                if len(parts) == 3:
                    out.append((float(parts[0]), float(parts[1]), parts[2]))
        return out

    def stop(self) -> None:
        self.child.stop()


def ping_stats(pings: list[tuple[float, float, str]], start: float, end: float) -> dict[str, Any]:
    """The pings that started in [start, end]: p50/p99/max (ms) of those answered, how many, errors."""
    lat = [p[1] * 1e3 for p in pings if start <= p[0] <= end and p[2] == "200"]
    errors = sum(1 for p in pings if start <= p[0] <= end and p[2] != "200")
    if not lat:
        return {"n": 0, "errors": errors, "p50": float("nan"), "p99": float("nan"), "max": float("nan"), "over100": 0}
    return {"n": len(lat), "errors": errors, "p50": statistics.median(lat), "p99": pct(lat, 0.99), "max": max(lat),
            "over100": sum(1 for v in lat if v >= 100)}


def fmt_pings(s: dict[str, Any]) -> str:
    return (f"p50 {s['p50']:.1f} ms, p99 {s['p99']:.1f} ms, max {s['max']:.0f} ms ({s['n']:,} pings, "
            f"{s['over100']} >= 100 ms" + (f", {s['errors']} errors" if s["errors"] else "") + ")")


class Sampler:
    """`py-spy record` of a process (100 Hz, nonblocking, idle samples too, no line numbers) in
    speedscope format, which keeps each thread's samples in order; stopped by SIGINT. top() says
    which functions held the process's main thread (its event loop)."""

    #: A main-thread sample whose innermost frame is one of these is the event loop waiting.
    IDLE = ("_run_server_forever", "select", "poll", "BaseEventLoop.run_forever", "BaseEventLoop._run_once")

    def __init__(self, pid: int, tmp: Path, tag: str, seconds: int = 900) -> None:
        self.out, self.child, self.pid = tmp / f"pyspy-{tag}.json", None, pid
        spy = shutil.which("py-spy")
        if spy is None:
            return
        for _ in range(20):  # a process just started may not be readable yet: tried again, bounded
            child = Child([spy, "record", "--pid", str(pid), "--format", "speedscope", "-o", str(self.out), "-d",
                           str(seconds), "-r", "100", "--nonblocking", "--idle", "--nolineno"],
                          tmp / f"pyspy-{tag}.log")
            time.sleep(0.3)
            if child.proc.poll() is None:
                self.child = child
                return
            child.stop()
            time.sleep(0.1)

    def stop(self) -> None:
        if self.child is not None and self.child.proc.poll() is None:
            self.child.stop(timeout=30)

    def samples(self) -> list[tuple[str, str] | None]:
        """The main thread's samples in order: None when idle, else (entry, innermost): entry is
        the outermost telemetry.py function under Sanic's hook and the token guard (a route
        handler or a task), innermost the innermost telemetry.py function or the page's Jinja2
        template; 'other' where there is none (Sanic, asyncio, the app, telemetry.py's start-up)."""
        try:
            doc = json.loads(self.out.read_text())
        except (OSError, ValueError):
            return []
        frames = doc["shared"]["frames"]
        names = [("jinja2 template" if f.get("file") == "<template>" else f["name"])
                 if f.get("file") == "<template>" or str(f.get("file", "")).endswith("telemetry.py") else None
                 for f in frames]
        idle = {i for i, f in enumerate(frames) if f["name"] in self.IDLE}
        # the main thread's id is the pid (its name may be unknown to py-spy in a process just started)
        main = next((p for p in doc["profiles"] if f"{p.get('name', '')} ".startswith(f"Thread {self.pid} ")),
                    None) or next((p for p in doc["profiles"] if "MainThread" in p.get("name", "")), None)
        out: list[tuple[str, str] | None] = []
        for stack in (main or {}).get("samples", []):
            if not stack or stack[-1] in idle:
                out.append(None)
                continue
            ours = [names[i] for i in stack if names[i] is not None]
            outer = [f for f in ours if "hook.<locals>" not in f and "guarded" not in f
                     and f not in ("<module>", "main", "_serve", "jinja2 template")]
            out.append((outer[0] if outer else "other", ours[-1] if ours else "other"))
        return out

    def top(self, n: int = 4) -> str:
        """The main thread's idle share; the busy samples' shares by entry and by innermost
        function; the longest runs of busy samples (the loop never seen waiting) and what they held."""
        if self.child is None:
            return "no py-spy (pip install py-spy)"
        samples = self.samples()
        if not samples:
            log = self.child.tail(1).strip()
            return "no samples" + (f" (py-spy: {log[:160]})" if log else "")
        total = len(samples)

        def shares(c: Counter, of: int, k: int = n) -> str:
            return ", ".join(f"{name} {v / of:.0%}" for name, v in c.most_common(k))
        busy = [x for x in samples if x is not None]
        runs, i = [], 0
        while i < total:
            j = i
            while j < total and samples[j] is not None:
                j += 1
            if j > i:
                runs.append(samples[i:j])
            i = j + 1
        runs.sort(key=len, reverse=True)
        longest = "; ".join(f"{len(r) * 10} ms ({shares(Counter(e for e, _ in r), len(r), 1)}: "
                            f"{shares(Counter(f for _, f in r), len(r), 2)})" for r in runs[:3])
        return (f"main thread {total:,} samples, idle {1 - len(busy) / total:.0%}; by entry: "
                f"{shares(Counter(e for e, _ in busy), total)}; innermost: {shares(Counter(f for _, f in busy), total)}; "
                f"longest busy runs (10 ms samples): {longest or 'none'}")


def burst_lines(n: int, seed: int = 11) -> tuple[list[bytes], int]:
    """n Caddy 2.11 lines, BURST_ROUTES x len(BURST_STATUSES) = 4,000 series in every second of
    log time (each series once a second, in random order within it), lognormal durations (median
    20 ms, sigma 0.8), ending 2 s ago: (lines, seconds of log time)."""
    rng = random.Random(seed)
    series = [(r, s) for r in range(BURST_ROUTES) for s in BURST_STATUSES]
    seconds = max(1, n // len(series))
    base, out = int(time.time()) - seconds - 2, []
    for sec in range(seconds):
        rng.shuffle(series)
        for r, status in series[:n - len(out)]:
            dur = rng.lognormvariate(math.log(0.02), 0.8)
            rid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            out.append(LINE.format(ts=base + sec + rng.random(), port=rng.randint(30000, 60999), method="GET",
                                   uri=f"/api/r{r}/{rng.randint(1, 99999)}", ua=rng.choice(UAS), rid=rid, read=0,
                                   dur=dur, size=rng.randint(20, 4000), status=status, up=dur * 800).encode())
    return out, seconds


def bodies_of(lines: list[bytes], rng: random.Random, lo: int = 1 << 20, hi: int = 4 << 20) -> list[tuple[bytes, int]]:
    """Lines cut into POST bodies of lo..hi bytes: (body, lines in it)."""
    out, i = [], 0
    while i < len(lines):
        target, size, j = rng.randint(lo, hi), 0, i
        while j < len(lines) and size < target:
            size += len(lines[j])
            j += 1
        out.append((b"".join(lines[i:j]), j - i))
        i = j
    return out


def caddy_count(client: Client, rng: str = "15m") -> int:
    """The caddy requests the summary of a range shows."""
    return json.loads(client.get(f"/telemetry/api/summary?range={rng}")[1])["sources"]["caddy"]["requests"]


def post_all(port: int, bodies: list[tuple[bytes, int]], threads: int, deadline: float) -> dict[str, Any]:
    """bodies POSTed to /telemetry/ingest by `threads` clients, each over a keep-alive connection,
    as fast as the app takes them; a 503 is sent again after its Retry-After (counted)."""
    todo = collections.deque(bodies)
    lock = threading.Lock()
    stats: dict[str, Any] = {"retries": 0, "accepted": 0, "other": Counter(), "errors": 0, "done_at": None}

    def run() -> None:
        conn = None
        while time.monotonic() < deadline:
            with lock:
                if not todo:
                    return
                body, _ = todo.popleft()
            while time.monotonic() < deadline:
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                    conn.request("POST", "/telemetry/ingest", body, {"Content-Type": "application/x-ndjson"})
                    r = conn.getresponse()
                    data = r.read()
                except (OSError, http.client.HTTPException):
                    with lock:
                        stats["errors"] += 1
                    if conn is not None:
                        conn.close()
                    conn = None
                    time.sleep(0.5)
                    continue
                if r.status == 503:
                    with lock:
                        stats["retries"] += 1
                    time.sleep(float(r.getheader("retry-after") or 1))
                    continue
                with lock:
                    if r.status == 200:
                        stats["accepted"] += json.loads(data)["accepted"]
                    else:
                        stats["other"][r.status] += 1
                break
        if conn is not None:
            conn.close()

    workers = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(max(deadline - time.monotonic(), 0) + 130)
    stats["done_at"] = time.monotonic()
    return stats


def render_load(port: int, path: str, clients: int, seconds: float) -> list[float]:
    """`clients` clients GET path over and over for `seconds`: every latency (s)."""
    out: list[float] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def run() -> None:
        c = Client(port, timeout=120)
        try:
            while time.monotonic() < end:
                t0 = time.perf_counter()
                status, _ = c.get(path)
                if status == 200:
                    with lock:
                        out.append(time.perf_counter() - t0)
        except (OSError, http.client.HTTPException):
            pass
        finally:
            c.close()
    workers = [threading.Thread(target=run, daemon=True) for _ in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(seconds + 150)
    return out


def burst_run(build: Path, tmp: Path, tag: str, quick: bool) -> dict[str, Any]:
    """One build's burst: the lines POSTed, the pings, the count, the renders (see bench_burst)."""
    n, render_s = (60_000, 4.0) if quick else (600_000, 10.0)
    t0 = time.perf_counter()
    lines, seconds = burst_lines(n)
    bodies = bodies_of(lines, random.Random(5))
    mb = sum(len(b) for b, _ in bodies) / 1e6
    del lines
    print(f"  [{tag}] {n:,} lines ({seconds} s of log time x {BURST_ROUTES * len(BURST_STATUSES):,} series, "
          f"{mb:.0f} MB) in {len(bodies)} bodies of 1-4 MB, built in {time.perf_counter() - t0:.1f} s")
    (tmp / "burst_app.py").write_text(BURST_SRC)
    port, db = free_port(), tmp / f"burst-{tag}.db"
    app = Child([sys.executable, str(tmp / "burst_app.py"), str(port), str(db), str(build)], tmp / f"burst-{tag}.log",
                cwd=build)
    pinger = sampler = None
    out: dict[str, Any] = {"n": n}
    try:
        if not answers(port, "/telemetry/healthz"):
            raise RuntimeError(f"burst app did not answer in 30 s:\n{app.tail()}")
        pid = app.proc.pid
        out["rss_before"] = rss_mb(pid, "VmRSS")
        pinger = Pinger(port, tmp, f"burst-{tag}")
        wait_until(lambda: len(pinger.pings()) >= 20, 10.0)
        sampler = Sampler(pid, tmp, f"burst-{tag}")
        stats: dict[str, Any] = {"retries": 0, "accepted": 0, "other": Counter(), "errors": 0}
        start = time.monotonic()
        out["idle_pings"] = ping_stats(pinger.pings(), 0.0, start)
        poster = threading.Thread(target=lambda: stats.update(post_all(port, bodies, 3, start + 600)), daemon=True)
        poster.start()
        poll, seen, exact_at, summary_ms = Client(port, timeout=120), [], None, []
        while exact_at is None:
            done = stats.get("done_at")
            if done is not None and time.monotonic() > done + 300 or time.monotonic() > start + 900:
                break
            t = time.perf_counter()
            with contextlib.suppress(OSError, ValueError, KeyError, http.client.HTTPException):
                seen.append(caddy_count(poll))
                summary_ms.append((time.perf_counter() - t) * 1e3)
                if seen[-1] >= n:
                    exact_at = time.monotonic()
            time.sleep(max(0.0, 0.5 - (time.perf_counter() - t)))
        end = exact_at or time.monotonic()
        poster.join(150)
        sampler.stop()
        with contextlib.suppress(OSError, ValueError, http.client.HTTPException):
            out["gc"] = json.loads(poll.get("/bench/gc")[1])  # the collector's pauses during the burst
            out["objects"] = json.loads(poll.get("/bench/objects")[1])  # what it has to look at
            out["gcstats"] = json.loads(poll.get("/bench/gcstats")[1])
        out.update(stats=stats, counted=seen[-1] if seen else None, exact_s=(exact_at - start) if exact_at else None,
                   posted_s=(stats["done_at"] - start) if stats.get("done_at") else None,
                   peak=rss_mb(pid, "VmHWM"), rss_after=rss_mb(pid, "VmRSS"), summary_ms=summary_ms,
                   pings=ping_stats(pinger.pings(), start, end), spy=sampler.top())
        # the history's pages: one render alone (median of 3), then 8 clients at once for render_s
        out["render"] = {}
        for rng in ("15m", "24h"):
            path = f"/telemetry/?range={rng}&refresh=0"
            alone = []
            for _ in range(3):
                t = time.perf_counter()
                status, _ = poll.get(path)
                alone.append((time.perf_counter() - t) * 1e3)
            sampler = Sampler(pid, tmp, f"render-{rng}-{tag}")
            r0 = time.monotonic()
            lat = [v * 1e3 for v in render_load(port, path, 8, render_s)]
            r1 = time.monotonic()
            sampler.stop()
            out["render"][rng] = {"alone": statistics.median(alone), "status": status, "n": len(lat),
                                  "p50": statistics.median(lat) if lat else float("nan"),
                                  "p95": pct(lat, 0.95) if lat else float("nan"),
                                  "pings": ping_stats(pinger.pings(), r0, r1), "spy": sampler.top()}
        out["peak_after_render"] = rss_mb(pid, "VmHWM")
        poll.close()
        return out
    finally:
        if sampler is not None:
            sampler.stop()
        if pinger is not None:
            pinger.stop()
        app.stop()


def builds_here() -> list[tuple[str, Path]]:
    return [("this build", HERE)] + ([(f"against {AGAINST.name}", AGAINST)] if AGAINST is not None else [])


def bench_burst(quick: bool, tmp: Path) -> None:
    figures = []
    for label, build in builds_here():
        r = burst_run(build, tmp, label.split()[0], quick)
        st, p = r["stats"], r["pings"]
        exact = r["counted"] == r["n"]
        print(f"  {label}: POSTed in {r['posted_s'] or float('nan'):.1f} s (3 clients; 503 retries {st['retries']}, "
              f"other answers {dict(st['other'])}, connection errors {st['errors']}); summary shows "
              f"{r['counted'] if r['counted'] is not None else '?':,} of {r['n']:,} "
              + (f"after {r['exact_s']:.1f} s from the first POST" if r["exact_s"] else "(not within the bound)")
              + f" ({'exact' if exact else 'NOT exact'}); summary?range=15m p50 "
              f"{statistics.median(r['summary_ms']) if r['summary_ms'] else float('nan'):.0f} ms, max "
              f"{max(r['summary_ms'], default=float('nan')):.0f} ms")
        print(f"  {label}: /api/ping idle before: {fmt_pings(r['idle_pings'])}")
        print(f"  {label}: /api/ping during the burst {fmt_pings(p)}; RSS {r['rss_before']:.0f} MB before, peak "
              f"{r['peak']:.0f} MB (+{r['peak'] - r['rss_before']:.0f} MB), {r['rss_after']:.0f} MB after")
        print(f"  {label}: py-spy, burst: {r['spy']}")
        if r.get("gcstats"):
            print(f"  {label}: cyclic garbage the collector freed: " + "; ".join(
                f"gen {g}: {x['collected']:,}" for g, x in enumerate(r["gcstats"])))
        if r.get("objects"):
            print(f"  {label}: objects the collector tracks after the burst: {r['objects']['tracked']:,} "
                  f"({', '.join(f'{k} {n:,}' for k, n in r['objects']['by_type'][:8])})")
        if r.get("gc"):
            print(f"  {label}: the garbage collector during the burst: " + "; ".join(
                f"gen {g}: {n} runs, longest {mx * 1e3:.1f} ms, {tot:.2f} s in all" for g, (n, mx, tot) in r["gc"].items()))
        renders = []
        for rng, x in r["render"].items():
            print(f"  {label}: GET /telemetry/?range={rng}: alone {x['alone']:.0f} ms (median of 3, status "
                  f"{x['status']}); 8 clients: {x['n']} renders, p50 {x['p50']:.0f} ms, p95 {x['p95']:.0f} ms; "
                  f"/api/ping meanwhile {fmt_pings(x['pings'])}")
            print(f"  {label}: py-spy, renders {rng}: {x['spy']}")
            renders.append(f"{rng} alone {x['alone']:.0f} ms, x8 p95 {x['p95']:.0f} ms, ping p99 "
                           f"{x['pings']['p99']:.0f}/max {x['pings']['max']:.0f} ms")
        print(f"  {label}: peak RSS after the renders {r['peak_after_render']:.0f} MB")
        figures.append(f"{label}: ping p99 {p['p99']:.0f} ms, max {p['max']:.0f} ms during {r['n']:,} lines; exact "
                       + (f"after {r['exact_s']:.0f} s" if exact and r["exact_s"] else "NO")
                       + f"; peak RSS +{r['peak'] - r['rss_before']:.0f} MB; " + "; ".join(renders))
    SUMMARY["burst"] = "4,000 series/s of log lines    " + " | ".join(figures)


def backlog_run(build: Path, tmp: Path, tag: str, quick: bool) -> dict[str, Any]:
    """One build's backlog: a few lines read and counted, a stop, n lines appended, a start."""
    n = 120_000 if quick else 1_200_000
    work = tmp / f"backlog-{tag}"
    work.mkdir()
    log = work / "access.log"
    log.touch()
    argv = demo_argv(free_port(), work / "telemetry.db", work, "--caddy-log-file", str(log), "--no-caddy")
    port = int(argv[argv.index("--port") + 1])
    few = [line for line in caddy_lines(40, 99) if b'"/telemetry' not in line]
    demo = Child(argv, work / "first.log", cwd=build)
    try:
        c = Client(port)
        if not answers(port, "/telemetry/healthz"):
            raise RuntimeError(f"demo did not answer in 30 s:\n{demo.tail()}")
        with open(log, "ab") as f:
            f.write(b"".join(few))
        counted_first = wait_until(lambda: caddy_count(c) == len(few), 20.0, 0.2)
        c.close()
    finally:
        demo.stop()
    t0 = time.perf_counter()
    span = 60.0 if quick else 240.0
    made = int(n * 1.12)  # about 9% are the dashboard's own requests (never counted): left out
    lines = [line for line in caddy_lines(made, 7, rate=made / span) if b'"/telemetry' not in line][:n]
    with open(log, "ab") as f:
        for i in range(0, len(lines), 50_000):
            f.write(b"".join(lines[i:i + 50_000]))
    total, size = len(few) + len(lines), log.stat().st_size
    print(f"  [{tag}] {len(few)} lines read and counted ({'yes' if counted_first else 'NO'}), stopped; "
          f"{len(lines):,} lines ({size / 1e6:.0f} MB, ts over the last {span:.0f} s) appended in "
          f"{time.perf_counter() - t0:.1f} s")
    del lines
    started = time.monotonic()
    demo = Child(argv, work / "second.log", cwd=build)
    pinger = Pinger(port, tmp, f"backlog-{tag}")
    sampler = Sampler(demo.proc.pid, tmp, f"backlog-{tag}")
    out: dict[str, Any] = {"n": total, "size": size}
    try:
        c, seen, exact_at = Client(port, timeout=120), [], None
        first = wait_until(lambda: next((p for p in pinger.pings() if p[2] == "200"), None), 300.0, 0.05)
        while exact_at is None and time.monotonic() < started + 600:
            t = time.perf_counter()
            with contextlib.suppress(OSError, ValueError, KeyError, http.client.HTTPException):
                seen.append(caddy_count(c))
                if seen[-1] >= total:
                    exact_at = time.monotonic()
            time.sleep(max(0.0, 0.5 - (time.perf_counter() - t)))
        end = exact_at or time.monotonic()
        time.sleep(0.5)
        sampler.stop()
        c.close()
        out.update(first=first, first_s=(first[0] + first[1] - started) if first else None,
                   counted=seen[-1] if seen else None, exact_s=(exact_at - started) if exact_at else None,
                   pings=ping_stats(pinger.pings(), first[0] if first else started, end), spy=sampler.top(),
                   peak=rss_mb(demo.proc.pid, "VmHWM"))
        return out
    finally:
        sampler.stop()
        pinger.stop()
        demo.stop()


def bench_backlog(quick: bool, tmp: Path) -> None:
    figures = []
    for label, build in builds_here():
        r = backlog_run(build, tmp, label.split()[0], quick)
        first, exact = r["first"], r["counted"] == r["n"]
        print(f"  {label}: restart over a {r['size'] / 1e6:.0f} MB backlog: first /api/ping answered "
              + (f"{r['first_s']:.2f} s after the process started (that ping was sent at "
                 f"{r['first_s'] - first[1]:.2f} s and took {first[1] * 1e3:.0f} ms)"
                 if first else "never (300 s)"))
        print(f"  {label}: /api/ping while the backlog is read {fmt_pings(r['pings'])}; summary "
              f"{r['counted'] if r['counted'] is not None else '?':,} of {r['n']:,} "
              + (f"after {r['exact_s']:.1f} s from the start" if r["exact_s"] else "(not within 600 s)")
              + f" ({'exact' if exact else 'NOT exact'}); peak RSS {r['peak']:.0f} MB")
        print(f"  {label}: py-spy: {r['spy']}")
        figures.append(f"{label}: first ping at {r['first_s'] or float('nan'):.1f} s (took "
                       f"{first[1] * 1e3 if first else float('nan'):.0f} ms), ping p99 {r['pings']['p99']:.0f} ms, max "
                       f"{r['pings']['max']:.0f} ms; " + (f"exact after {r['exact_s']:.0f} s" if exact else "NOT exact"))
    SUMMARY["backlog"] = "restart over a log backlog      " + " | ".join(figures)


def big_body(port: int, method: str, path: str, size: int, timeout: float = 60.0) -> str:
    """One request with a body of `size` bytes (declared, streamed in 1 MB chunks): its status,
    or the error that ended it (and how much of the body was sent by then)."""
    chunk, sent = memoryview(b"x" * (1 << 20)), 0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path)
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
        failed = ""
        try:
            while sent < size:
                n = min(size - sent, len(chunk))
                conn.send(chunk[:n])
                sent += n
        except OSError as exc:  # the server may have answered and closed before the whole body
            failed = f"{type(exc).__name__} after {sent / 1e6:.0f} MB"
        try:
            r = conn.getresponse()
            r.read()
            return f"{r.status}" + (f" ({failed})" if failed else "")
        except (OSError, http.client.HTTPException) as exc:
            return failed or f"{type(exc).__name__} after {sent / 1e6:.0f} MB"
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__} after {sent / 1e6:.0f} MB"
    finally:
        conn.close()


BODY_TARGETS = (("GET", "/telemetry/metrics"), ("GET", "/telemetry/healthz"), ("GET", "/telemetry/dashboard.css"),
                ("POST", "/telemetry/login"))


def bench_bodies(quick: bool, tmp: Path) -> None:
    size, clients = 99_000_000, 6
    figures = []
    for label, build in builds_here():
        tag = label.split()[0]
        port = free_port()
        demo = Child(demo_argv(port, tmp / f"bodies-{tag}.db", tmp / f"bodies-{tag}", "--no-caddy"),
                     tmp / f"bodies-{tag}.log", cwd=build)
        try:
            if not answers(port, "/telemetry/healthz"):
                raise RuntimeError(f"demo did not answer in 30 s:\n{demo.tail()}")
            base = rss_mb(demo.proc.pid, "VmRSS")
            got: dict[int, str] = {}
            targets = [BODY_TARGETS[i % len(BODY_TARGETS)] for i in range(clients)]
            t0 = time.perf_counter()
            threads = [threading.Thread(target=lambda i=i, m=m, p=p: got.__setitem__(i, big_body(port, m, p, size)),
                                        daemon=True) for i, (m, p) in enumerate(targets)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(180)
            secs = time.perf_counter() - t0
            peak, alive = rss_mb(demo.proc.pid, "VmHWM"), answers(port, "/telemetry/healthz", 10)
        finally:
            demo.stop()
        answers_ = "; ".join(f"{m} {p}: {got.get(i, 'no answer in 180 s')}" for i, (m, p) in enumerate(targets))
        print(f"  {label}: {clients} anonymous clients, a {size / 1e6:.0f} MB body each, at once ({secs:.1f} s): RSS "
              f"{base:.0f} MB before, peak {peak:.0f} MB (+{peak - base:.0f} MB); app answers after: {alive}")
        print(f"  {label}: {answers_}")
        codes = Counter(got.get(i, "none").split()[0] for i in range(clients))
        figures.append(f"{label} +{peak - base:.0f} MB (peak {peak:.0f} MB), answers {dict(codes)}")
    SUMMARY["bodies"] = "peak RSS, 6 x 99 MB bodies      " + "; ".join(figures)


def trickle(port: int, until: float, out: dict[str, Any]) -> None:
    """POST /telemetry/ingest with Content-Length 10 MiB, then one byte every 2 s until `until`
    (monotonic): when and how the server ended it (out), if it did."""
    t0 = time.monotonic()
    out.update(sent=0, closed=None, how="")
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError as exc:
        out.update(closed=0.0, how=f"connect: {type(exc).__name__}")
        return
    try:
        s.sendall(b"POST /telemetry/ingest HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-ndjson\r\n"
                  b"Content-Length: 10485760\r\n\r\n")
        while time.monotonic() < until:
            ready, _, _ = select.select([s], [], [], min(2.0, max(until - time.monotonic(), 0)))
            if ready:
                data = s.recv(4096)
                out.update(closed=time.monotonic() - t0,
                           how=(data.split(b"\r\n", 1)[0].decode(errors="replace") if data else "closed (EOF)"))
                return
            if time.monotonic() >= until:
                return
            try:
                s.send(b" ")
                out["sent"] += 1
            except OSError as exc:
                out.update(closed=time.monotonic() - t0, how=type(exc).__name__)
                return
    except OSError as exc:
        out.update(closed=time.monotonic() - t0, how=type(exc).__name__)
    finally:
        s.close()


def one_line_ingest(port: int, line: bytes) -> tuple[str, float]:
    """POST one Caddy line to /telemetry/ingest on a fresh connection: (status or error, ms)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/telemetry/ingest", line, {"Content-Type": "application/x-ndjson"})
        r = conn.getresponse()
        r.read()
        return str(r.status), (time.perf_counter() - t0) * 1e3
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__, (time.perf_counter() - t0) * 1e3
    finally:
        conn.close()


def bench_slow(quick: bool, tmp: Path) -> None:
    window = 10.0 if quick else 40.0
    figures = []
    for label, build in builds_here():
        tag = label.split()[0]
        port = free_port()
        demo = Child(demo_argv(port, tmp / f"slow-{tag}.db", tmp / f"slow-{tag}", "--no-caddy"),
                     tmp / f"slow-{tag}.log", cwd=build)
        try:
            if not answers(port, "/telemetry/healthz"):
                raise RuntimeError(f"demo did not answer in 30 s:\n{demo.tail()}")
            start = time.monotonic()
            until = start + window
            slow = [{}, {}]
            threads = [threading.Thread(target=trickle, args=(port, until, o), daemon=True) for o in slow]
            for th in threads:
                th.start()
            time.sleep(5.0)
            tries = []
            while True:
                status, ms = one_line_ingest(port, caddy_lines(1, random.randrange(1 << 30))[0])
                tries.append((time.monotonic() - start, status, ms))
                if time.monotonic() + 5.0 > until:
                    break
                time.sleep(max(0.0, 5.0 - (time.monotonic() - start - tries[-1][0])))
            for th in threads:
                th.join(window + 10)
        finally:
            demo.stop()
        first = tries[0]
        codes = Counter(t[1] for t in tries)
        ends = "; ".join(f"slow connection {i + 1}: " + (f"ended by the server at {o['closed']:.1f} s ({o['how']})"
                                                          if o.get("closed") is not None else
                                                          f"still open at {window:.0f} s")
                         + f", {o.get('sent', 0)} bytes trickled" for i, o in enumerate(slow))
        print(f"  {label}: 2 connections hold POST /ingest (Content-Length 10 MiB, 1 byte / 2 s); at 5 s one "
              f"line: {first[1]} in {first[2]:.0f} ms; every 5 s until {window:.0f} s: {dict(codes)} "
              f"({', '.join(f'{t:.0f} s {s} {ms:.0f} ms' for t, s, ms in tries)})")
        print(f"  {label}: {ends}")
        closed = [o["closed"] for o in slow if o.get("closed") is not None]
        figures.append(f"{label}: one line at 5 s -> {first[1]} ({first[2]:.0f} ms); over {window:.0f} s "
                       f"{dict(codes)}; slow connections "
                       + (f"closed at {', '.join(f'{c:.0f} s' for c in closed)}" if closed else "never closed"))
    SUMMARY["slow"] = "2 slow 10 MiB ingest bodies     " + " | ".join(figures)


# ---------------------------------------------------------------------------------------------
# 13. alerts: a judgement's cost on both stores, and how soon a receiver hears
# ---------------------------------------------------------------------------------------------

ALERT_ROUTES = 200
#: Ten rules over every route: the README's kinds, and an SLO's two burn-rate alerts.
ALERT_RULES = """
interval = "15s"
[[rule]]
name = "errors"
when = "error_rate"
above = 0.05
over = "1m"
for = "30s"
[[rule]]
name = "p50"
when = "p50"
above = 0.5
over = "5m"
[[rule]]
name = "p95"
when = "p95"
above = 1.0
over = "5m"
[[rule]]
name = "p99"
when = "p99"
above = 2.0
over = "5m"
[[rule]]
name = "quiet"
when = "rate"
below = 0.01
over = "5m"
[[rule]]
name = "gone"
when = "no_traffic"
over = "10m"
[[rule]]
name = "edge"
when = "edge_minus_app_p95"
above = 0.1
over = "5m"
[[rule]]
name = "pipeline"
when = "pipeline"
[[slo]]
name = "fast"
objective = 0.99
latency = "300ms"
"""


def alert_rollups(slot: int, seconds: int) -> list[Any]:
    """`seconds` of traffic of ALERT_ROUTES routes at `slot`, per source: 2 req/s each, 1 in 20 of
    every tenth route a 5xx; latencies of a few buckets around a route's median (5-80 ms)."""
    out = []
    for i in range(ALERT_ROUTES):
        median = 0.005 * (1 + i % 16)
        for source in ("caddy", "sanic"):
            for status, n in ((200, 2 * seconds), (500, seconds // 10 if i % 10 == 0 else 0)):
                if not n:
                    continue
                hist: dict[int, int] = {}
                for j, share in enumerate((0.5, 0.3, 0.15, 0.05)):
                    b = T._Histogram.index(median * (1 + j) * (1.1 if source == "caddy" else 1.0))
                    hist[b] = hist.get(b, 0) + max(1, round(n * share))
                count = sum(hist.values())
                out.append(T._Rollup(slot, source, f"/api/r{i}/<id:int>", "GET", status, count, median * count,
                                     median * 4, 100 * count, hist))
    return out


async def alert_fill(store: Any, seconds: int, now: int) -> int:
    """`seconds` of history ending now, in 10 s slots, a batch a minute, written as flushes would."""
    rows = 0
    for seq, b0 in enumerate(range(now - seconds, now, 60), 1):
        batch = T._Batch("bench-w0", seq, [r for slot in range(b0, min(b0 + 60, now), 10) for r in alert_rollups(slot, 10)],
                         created=min(b0 + 60, now))
        rows += len(batch.rows)
        store.prepare(batch)
        await store.write(batch)
    return rows


async def alert_ticks(store: Any, rules: Any, now: float, ticks: int) -> dict[str, float]:
    """`ticks` judgements of every rule from the store: each one's time, the longest stretch the
    judge held the event loop (each resumption of its coroutine timed), the loop's longest lag
    meanwhile (a 1 ms sleep, woken how late: the judge's threads included), the alerts found."""
    import gc
    import types
    stretches: list[float] = []
    own: list[float] = []  # the same, less the garbage collector's pauses within them
    cpu: list[float] = []  # this thread's CPU time in each (the wall time less waits for the CPU or the GIL)
    collector = {"total": 0.0, "longest": 0.0, "began": 0.0}

    def collecting(phase: str, info: dict) -> None:
        if phase == "start":
            collector["began"] = time.perf_counter()
        else:
            took = time.perf_counter() - collector["began"]
            collector["total"] += took
            collector["longest"] = max(collector["longest"], took)

    def stretch(t0: float, gc0: float, c0: float) -> None:
        stretches.append(time.perf_counter() - t0)
        own.append(stretches[-1] - (collector["total"] - gc0))
        cpu.append(time.thread_time() - c0 - (collector["total"] - gc0))

    @types.coroutine
    def timed(coro: Any) -> Any:
        value, exc = None, None
        while True:
            t0, gc0, c0 = time.perf_counter(), collector["total"], time.thread_time()
            try:
                future = coro.throw(exc) if exc is not None else coro.send(value)
            except StopIteration as stop:
                stretch(t0, gc0, c0)
                return stop.value
            stretch(t0, gc0, c0)
            try:
                value, exc = (yield future), None
            except BaseException as e:
                value, exc = None, e
    lags: list[float] = []

    async def probe() -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - t0 - 0.001)

    async def health() -> Any:
        return await store.health()
    judge = T._Alerts(rules, store, health, Path(os.devnull), "bench", "http://127.0.0.1/telemetry")
    took = []
    task = asyncio.get_running_loop().create_task(probe())
    gc.callbacks.append(collecting)
    try:
        for i in range(ticks):
            t0 = time.perf_counter()
            await timed(judge.evaluate(now + i * rules.interval_s))
            took.append(time.perf_counter() - t0)
    finally:
        gc.callbacks.remove(collecting)
        task.cancel()
    return {"median_s": statistics.median(took), "max_s": max(took), "first_s": took[0],
            "longest_step_ms": max(stretches) * 1000, "steps": len(stretches), "lag_ms": max(lags) * 1000,
            "loop_s": sum(stretches) / ticks, "own_ms": max(own) * 1000, "gc_ms": collector["longest"] * 1000,
            "cpu_ms": max(cpu) * 1000,
            "alerts": len(judge.states), "routes": ALERT_ROUTES}


class AlertHook:
    """A loopback webhook receiver: when each notification arrived (monotonic), and its status."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        got = self.got = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                got.append((time.monotonic(), body["status"]))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def alert_latency(tmp: Path, trials: int, interval: float = 5.0, hold: float = 10.0) -> list[float]:
    """`python telemetry.py --alerts` (judged every `interval`): the app's 5xx from T0 at 10/s until the
    receiver has the firing; per trial, (arrival - (T0 + for)) / interval; then the 5xx stop and the
    resolve is awaited before the next trial."""
    hook = AlertHook()
    rules = tmp / "latency.toml"
    rules.write_text(f'interval = "{interval:g}s"\n[[receiver]]\nname = "ops"\nurl = "{hook.url}"\n'
                     f'[[rule]]\nname = "errors"\nwhen = "error_rate"\nabove = 0.5\nover = "10s"\nfor = "{hold:g}s"\n'
                     'keep_firing_for = "0s"\nroute = "/api/error"\n')
    port = free_port()
    demo = Child(demo_argv(port, tmp / "latency.db", tmp, "--no-caddy", "--alerts", str(rules)), tmp / "latency.log",
                 cwd=HERE)
    out: list[float] = []
    client = Client(port)
    try:
        wait_until(lambda: answers(port, "/telemetry/healthz"), 30)
        for _ in range(trials):
            seen = len(hook.got)
            t0 = time.monotonic()
            deadline = t0 + hold + 4 * interval + 10
            while time.monotonic() < deadline and not [g for g in hook.got[seen:] if g[1] == "firing"]:
                client.get("/api/error")
                time.sleep(0.1)
            fired = [g for g in hook.got[seen:] if g[1] == "firing"]
            if not fired:
                print(f"  ! no firing within {deadline - t0:.0f} s")
                break
            out.append((fired[0][0] - t0 - hold) / interval)
            wait_until(lambda: [g for g in hook.got[seen:] if g[1] == "resolved"], 10 + 4 * interval + 20)
    finally:
        client.close()
        demo.stop()
        hook.stop()
    return out


WIRE_SRC = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import test_telemetry as W
parent = os.getppid()
fake = W.FakeInflux()
print(fake.port, flush=True)
while os.getppid() == parent:  # (ends with the bench, however the bench ends)
    time.sleep(0.5)
"""


def wire_server(tmp: Path) -> tuple[Child, str]:
    """The test file's InfluxDB wire server in a process of its own (its interpreter's threads
    would otherwise share ours and hold up the event loop being measured); its URL."""
    child = Child([sys.executable, "-c", WIRE_SRC, str(HERE)], tmp / "wire.log", cwd=HERE)
    port = wait_until(lambda: (tmp / "wire.log").read_text().strip().isdigit() and
                      int((tmp / "wire.log").read_text().strip()), 30)
    return child, f"http://127.0.0.1:{port}"


def bench_alerts(quick: bool, tmp: Path) -> None:
    import test_telemetry as W  # the InfluxDB wire server lives in the test file
    path = tmp / "alerts.toml"
    path.write_text(ALERT_RULES)
    rules = T._load_alert_rules(str(path))
    judged = len(rules.all_rules())
    now = int(time.time())
    figures = {}
    for kind in ("sqlite", "influxdb"):
        seconds = (900 if quick else 3600) if kind == "sqlite" else 180  # (the wire server scans every point)
        wire, url = wire_server(tmp) if kind == "influxdb" else (None, "")
        try:
            async def go() -> tuple[int, dict[str, float]]:
                store = T._SQLiteStore(str(tmp / "alerts.db")) if wire is None else \
                    T._InfluxStore(url, W.TOKEN, W.ORG, W.BUCKET, timeout_s=300.0)
                await store.open()
                rows = await alert_fill(store, seconds, now)
                figures = await alert_ticks(store, rules, now, 2 if quick or wire else 6)
                await store.close()
                return rows, figures
            rows, figures[kind] = asyncio.run(go())
        finally:
            if wire is not None:
                wire.stop()
        f = figures[kind]
        print(f"  {kind}: {rows:,} rollups ({seconds // 60} min, {ALERT_ROUTES} routes x 2 sources); {judged} rules: "
              f"a judgement {f['median_s'] * 1000:.0f} ms (median; the first {f['first_s'] * 1000:.0f} ms, "
              f"the longest {f['max_s'] * 1000:.0f} ms; on the event loop {f['loop_s'] * 1000:.0f} ms), "
              f"{f['alerts']} alerts pending or firing; the judge's "
              f"longest step on the loop {f['longest_step_ms']:.2f} ms ({f['steps']} steps; "
              f"{f['own_ms']:.2f} ms less the garbage collector's pauses in it, the longest of which "
              f"{f['gc_ms']:.1f} ms; the most CPU time of one step {f['cpu_ms']:.2f} ms), "
              f"the loop's longest lag meanwhile {f['lag_ms']:.1f} ms")
    late = alert_latency(tmp, 2 if quick else 5)
    print(f"  condition held `for` -> the receiver's request, in evaluation intervals (5 s): "
          f"{', '.join(f'{x:.2f}' for x in late)}")
    sq, ix = figures["sqlite"], figures["influxdb"]
    SUMMARY["alerts"] = (f"{judged} rules x {ALERT_ROUTES} routes: a judgement SQLite {sq['median_s'] * 1000:.0f} ms "
                         f"({sq['loop_s'] * 1000:.0f} ms on the loop), InfluxDB {ix['loop_s'] * 1000:.0f} ms on the loop "
                         f"(the wire server's own time aside); longest step on the loop "
                         f"{max(sq['longest_step_ms'], ix['longest_step_ms']):.2f} ms, "
                         f"{max(sq['own_ms'], ix['own_ms']):.2f} ms less the collector's pauses, "
                         f"{max(sq['cpu_ms'], ix['cpu_ms']):.2f} ms of CPU (goal <= 1 ms); condition "
                         f"-> receiver {max(late, default=float('nan')):.2f} intervals at most (goal <= 2)")


def against_build(spec: str, tmp: Path) -> Path:
    """--against's folder: spec itself when it is one, else the files of git revision spec."""
    if Path(spec).is_dir():
        return Path(spec).resolve()
    out = tmp / f"against-{re.sub(r'[^A-Za-z0-9._-]', '_', spec)}"
    out.mkdir()
    for name in ("telemetry.py", "dashboard.css", "Caddyfile"):
        blob = subprocess.run(["git", "show", f"{spec}:{name}"], cwd=HERE, capture_output=True, timeout=60)
        if blob.returncode == 0:
            (out / name).write_bytes(blob.stdout)
    if not (out / "telemetry.py").is_file():
        raise SystemExit(f"bench_telemetry.py: --against {spec}: no telemetry.py in that folder or revision")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs for a CI smoke test (< ~60 s)")
    ap.add_argument("--only", action="append",
                    choices=["hot", "tail", "instructions", "ingest", "freshness", "render", "memory", "influx",
                             "crash", "burst", "backlog", "bodies", "slow", "alerts", "follow"],
                    help="run only these parts (repeatable)")
    ap.add_argument("--against", metavar="REV|DIR",
                    help="compare with another build in the same run (hot path: a fourth server; ingest: in turns): "
                         "a git revision of this repository, or a folder holding its telemetry.py")
    args = ap.parse_args()
    quick = args.quick
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-telemetry-"))
    if args.against:
        global AGAINST
        AGAINST = against_build(args.against, tmp)
    pinning = (f"servers on CPU {CPUS[0]}; hot path's wrk on CPU {CPUS[1]}, then on CPU {CPUS[0]}" if len(CPUS) > 1
               else "no pinning (one CPU)")
    print(f"bench_telemetry.py{' --quick' if quick else ''}: {pinning}; scratch {tmp}")
    parts = [("hot path", lambda: bench_hot_path(quick, tmp)), ("tail", lambda: bench_tail(quick, tmp)),
             ("instructions", lambda: bench_instructions(quick, tmp)), ("ingest", lambda: bench_ingest(quick, tmp)),
             ("freshness", lambda: bench_freshness(quick, tmp)), ("render 1h", lambda: bench_render(quick, tmp)),
             ("memory", lambda: bench_memory(quick, tmp)), ("influx", lambda: bench_influx(quick, tmp)),
             ("crash", lambda: bench_crash(quick, tmp)), ("burst", lambda: bench_burst(quick, tmp)),
             ("backlog", lambda: bench_backlog(quick, tmp)), ("bodies", lambda: bench_bodies(quick, tmp)),
             ("slow", lambda: bench_slow(quick, tmp)), ("alerts", lambda: bench_alerts(quick, tmp)),
             ("follow", lambda: bench_follow(quick, tmp))]
    if args.only:
        parts = [p for p in parts if p[0].split()[0] in args.only]
    for name, run in parts:
        print(f"\n== {name}")
        try:
            print(f"  ({timed(run):.1f} s)")
        except Exception as exc:  # report and go on: this script never fails the build
            traceback.print_exc(limit=3)
            SUMMARY[name] = f"error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nbench_telemetry.py results ({datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}{', --quick' if quick else ''}, {time.perf_counter() - started:.0f} s)")
    for name, _ in parts:
        print(f"{name:<13} {SUMMARY.get(name, 'not run')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
