"""InfluxDB at the wire: a fake InfluxDB 2 server (FakeInflux) and the tests that use it.

No InfluxDB server runs here, so FakeInflux speaks the documented InfluxDB 2 HTTP API on loopback:
POST /api/v2/write (line protocol, gzip, token/org/bucket/precision checks, whole-batch 400 on a
malformed line, 422 on a field type conflict, points merged per (measurement, tags, time)),
POST /api/v2/query (a small Flux interpreter for the pipelines telemetry.flux_queries() builds,
answering annotated CSV as InfluxDB 2 prints it), GET /health, GET /ping, and fault controls
(fail, slow, down/up). The store contract test also runs against a real InfluxDB when
INFLUXDB_URL, INFLUXDB_TOKEN, INFLUXDB_ORG and INFLUXDB_BUCKET are set (marker `influx`).

Run: python -m pytest -q test_wire_draft.py
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gzip
import io
import json
import logging
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections import deque
from datetime import datetime, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import pytest

import telemetry as t
from test_telemetry import HERE, Demo, http, needs_caddy, send_mix, wait_for


def pytest_configure(config):  # effective when this module is a plugin (-p) or moved into a conftest
    config.addinivalue_line("markers", "influx: runs against a real InfluxDB 2 (INFLUXDB_URL, _TOKEN, _ORG, _BUCKET)")


# A test module's pytest_configure is not called by pytest; taking the mark with the unknown-mark
# warning silenced keeps the run clean (under --strict-markers the marker must be in a config file).
with warnings.catch_warnings():
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    influx_mark = pytest.mark.influx

TOKEN, ORG, BUCKET = "wire-test-token", "wire-org", "telemetry"
NS = 1_000_000_000


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
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, UInt):
        return "unsigned"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "float"
    return "string"


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
             now_ns: int) -> list[_Table]:
    """Evaluate one Flux pipeline (the subset telemetry uses) over the points of a bucket."""
    calls = _FluxParser(text).pipeline()
    for name, args, pos in calls:
        _check_call(name, args, pos)
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
    seen_range = False
    for name, args, _pos in calls[1:]:
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
    return tables


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
    """An InfluxDB 2 stand-in on 127.0.0.1 (see the module docstring). Thread-safe."""

    VERSION = "v2.7.11"

    def __init__(self, token: str = TOKEN, org: str = ORG, buckets: tuple[str, ...] = (BUCKET,)) -> None:
        self.token, self.org = token, org
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
    def points(self, measurement: str = "requests", bucket: str = BUCKET) -> list[tuple[dict, int, dict]]:
        """[(tags, timestamp ns, fields)] of one measurement."""
        with self.lock:
            return [(dict(k[1]), k[2], dict(f)) for k, f in self.data[bucket].items() if k[0] == measurement]

    def counts(self, measurement: str = "requests", bucket: str = BUCKET) -> dict[str, dict[tuple[str, str], int]]:
        """The summed count field per (source, status) and per (source, route)."""
        out: dict[str, dict[tuple[str, str], int]] = {"status": {}, "route": {}}
        for tags, _ts, fields in self.points(measurement, bucket):
            n = int(fields.get("count", 0))
            for kind, tag in (("status", "status"), ("route", "route")):
                key = (tags.get("source", ""), tags.get(tag, ""))
                out[kind][key] = out[kind].get(key, 0) + n
        return out

    def by_source(self, measurement: str = "requests") -> dict[str, dict[str, int]]:
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
        with self.lock:
            self.bodies.append(data)
        if not data:
            return 400, _json_error("invalid", "writing requires points"), {}
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

    def _fault_answer(self, fault: _Fault) -> tuple[int, bytes, dict]:
        body = fault.body if fault.body is not None else _json_error(
            _STATUS_CODES.get(fault.status, "internal error"), f"injected {fault.status}")
        extra = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
        return fault.status, body, extra

    def handle_query(self, q: dict[str, list[str]], headers: Any, raw: bytes) -> tuple[int, bytes, dict]:
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
            tables = run_flux(text, self._read_bucket, time.time_ns())
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
# fixtures and helpers
# =============================================================================================

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


def rollup(slot: int, route: str = "/api/ping", status: int = 200, count: int = 1, ms: float = 1.0,
           source: str = "sanic", method: str = "GET") -> t.Rollup:
    return t.Rollup(slot, source, route, method, status, count, ms * count, ms, 10 * count,
                    {t.Histogram.index(ms): count})


def batch(seq: int, rows: list[t.Rollup], instance: str = "wire-w0") -> t.Batch:
    return t.Batch(instance, seq, rows)


def expected_status(batches: list[t.Batch]) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for b in batches:
        for r in b.rows:
            out[(r.source, str(r.status))] = out.get((r.source, str(r.status)), 0) + r.count
    return out


def random_batches(now: int, seed: int = 11, n: int = 40) -> list[t.Batch]:
    """Batches from two instances over the last ~22 h; durations are multiples of 1/64 ms, so sums
    are exact in any order and the two stores can be compared for equality."""
    rnd = random.Random(seed)
    routes = ["/api/ping", "/api/items/<id:int>", "/api/slow", t.UNMATCHED, "/a b", "/x,y", "/k=v"]
    hot = now - 7  # a slot many batches share: flushes of one slot add up
    seqs = {"wire-w0": 1_000, "wire-w1": 9_000}
    used: set[float] = set()
    out = []
    for _ in range(n):
        inst = rnd.choice(sorted(seqs))
        seqs[inst] += 1
        rows: dict[tuple, t.Rollup] = {}
        for _ in range(rnd.randint(1, 6)):
            age = rnd.choice([0, rnd.randint(2, 280), rnd.randint(300, 3500), rnd.randint(3600, 21000),
                              rnd.randint(21600, 80000)])
            slot = hot if age == 0 else now - age
            key = (slot, rnd.choice(t.SOURCES), rnd.choice(routes), rnd.choice(["GET", "POST"]),
                   rnd.choice([200, 200, 200, 201, 404, 500, 502, 503, 504]))
            if key in rows:
                continue
            r = t.Rollup(*key)
            for _ in range(rnd.randint(1, 12)):
                ms = rnd.randint(1, 64 * 3000) / 64
                r.count += 1
                r.dur_sum += ms
                r.dur_max = max(r.dur_max, ms)
                r.bytes_sum += rnd.randint(0, 5000)
                i = t.Histogram.index(ms)
                r.hist[i] = r.hist.get(i, 0) + 1
            rows[key] = r
        events = []
        for _ in range(rnd.choice([0, 0, 1, 3])):  # recent errors and slow requests, all distinct
            age = rnd.choice([rnd.randint(2, 280), rnd.randint(300, 3500), rnd.randint(3600, 80000)])
            ts = now - age + rnd.randint(100, 900) / 1e3 + rnd.randint(1, 999) / 1e6
            slow = rnd.random() < 0.5
            ms = 500 + len(used) + rnd.randint(0, 64 * 100) / 64
            used.add(ms)
            events.append(t.Event(ts, "slow" if slow else "error", rnd.choice(t.SOURCES), "GET",
                                  rnd.choice(routes), rnd.choice(['/p/1', '/a "q" \\ b', '/x,y=z w']),
                                  200 if slow else rnd.choice([500, 502, 503]), ms, f"req-{len(used)}"))
        out.append(t.Batch(inst, seqs[inst], list(rows.values()), events=events))
    return out


def _close(a: Any, b: Any, rel: float = 1e-6) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return a == b or abs(a - b) <= rel * max(abs(a), abs(b))
    return a == b


def assert_same_summary(s1: dict, s2: dict, rng: str) -> None:
    """The store-independent figures of two summaries agree (as_of and events are store-specific)."""
    for source in t.SOURCES:
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
    assert sum(p["requests"] for p in s1["timeseries"]) > 0, rng
    for k in ("edge_only", "events"):  # newer parts of the document, compared when present
        assert s1.get(k) == s2.get(k), (rng, k, s1.get(k), s2.get(k))


# =============================================================================================
# the fake itself: line protocol, Flux, annotated CSV (a double that is wrong proves nothing)
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
    now = time.time()
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
    rows = t.parse_annotated_csv(text)
    assert {r["source"]: r["_value"] for r in rows} == {"caddy": "8", "sanic": "7"}
    lines = text.split("\r\n")
    assert lines[0] == "#datatype,string,long,long,string"
    assert lines[1] == "#group,false,false,false,true" and lines[2] == "#default,_result,,,"
    assert lines[3] == ",result,table,_value,source" and lines[4] == ",,0,8,caddy"
    # windows aligned to the epoch, stamped with their start, empty ones dropped; a float field
    status, text = _query(fake, head + '  |> filter(fn: (r) => r._field == "dur" or r._field =~ /^nope$/)\n'
                          '  |> group(columns: ["source"])\n'
                          '  |> aggregateWindow(every: 60s, fn: sum, createEmpty: false, timeSrc: "_start")\n')
    rows = t.parse_annotated_csv(text)
    assert [(r["source"], r["_time"], r["_value"]) for r in rows] == [
        ("caddy", "2027-01-15T08:00:00Z", "3.25"), ("caddy", "2027-01-15T08:01:00Z", "0.00001"),
        ("sanic", "2027-01-15T08:01:00Z", "3")]
    assert text.startswith("#datatype,string,long,dateTime:RFC3339,dateTime:RFC3339,dateTime:RFC3339,double,string")
    # selectors keep the row; max(_time) with nanoseconds printed as InfluxDB does
    status, text = _query(fake, head + '  |> filter(fn: (r) => r._field == "count")\n  |> group()\n'
                          '  |> keep(columns: ["_time"])\n  |> max(column: "_time")\n')
    assert t.parse_annotated_csv(text) == [{"": "", "result": "", "table": "0", "_time": "2027-01-15T08:01:01Z"}]
    status, text = _query(fake, head + '  |> filter(fn: (r) => r._field == "count" and r.status == "200")\n'
                          '  |> group()\n  |> max(column: "_time")\n')
    assert t.parse_annotated_csv(text)[0]["_time"] == "2027-01-15T08:01:01Z"
    status, text = _query(fake, head.replace("stop: 2027-01-15T08:10:00Z", "stop: 2027-01-15T08:01:00Z")
                          + '  |> filter(fn: (r) => r._field == "count")\n  |> group()\n  |> max(column: "_time")\n')
    assert t.parse_annotated_csv(text)[0]["_time"] == "2027-01-15T08:00:59.000000123Z"
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
    assert now  # (the fake's clock is only used for range stops by default)


def test_fake_csv_reads_with_influxdb_client_parser(fake):
    """Every query telemetry runs answers CSV that the real client's parser reads, with the same
    records as telemetry.parse_annotated_csv; counts come back as long, durations as double."""
    from influxdb_client import InfluxDBClient

    now = int(time.time())

    async def write() -> None:
        st = t.InfluxStore(fake.url, fake.token, fake.org, BUCKET)
        await st.open()
        try:
            for b in random_batches(now, seed=5, n=12):
                await st.write(b)
        finally:
            await st.close()
    asyncio.run(write())
    with InfluxDBClient(url=fake.url, token=fake.token, org=fake.org, enable_gzip=True) as client:
        api = client.query_api()
        for rng, (seconds, tier) in t.RANGES.items():
            for name, flux in t.flux_queries(BUCKET, seconds, tier, time.time()).items():
                records = [rec for tb in api.query(flux) for rec in tb.records]  # the client's FluxCsvParser
                status, text = _query(fake, flux)
                assert status == 200, text
                ours = t.parse_annotated_csv(text)
                assert len(records) == len(ours) > 0, (rng, name)
                events = name in ("errors", "slowest")
                for rec in records:
                    if events:  # pivoted rows: one column per field, typed
                        assert type(rec["status"]) is int and type(rec["ms"]) is float, rec
                        assert isinstance(rec["path"], str) and rec["kind"] == ("slow" if name == "slowest" else "error")
                    elif name == "series_sum":
                        assert type(rec.get_value()) is (int if rec["_field"] in ("count", "bytes") else float), rec
                    elif name == "series_max":
                        assert type(rec.get_value()) is float, rec
                    elif name != "as_of":
                        assert type(rec.get_value()) is int, rec  # sums of integer fields stay long
                    if "_time" in rec.values:
                        assert isinstance(rec.get_time(), datetime) and rec.get_time().tzinfo is not None
                if events:  # the same rows, in the same (sorted) order
                    assert [(r["request_id"], r["path"]) for r in records] == [(r["request_id"], r["path"]) for r in ours]
                elif name == "as_of":
                    assert [rec.get_time() for rec in records] == [
                        datetime.fromisoformat(r["_time"].replace("Z", "+00:00")) for r in ours]
                else:
                    assert sorted(float(rec.get_value()) for rec in records) == sorted(float(r["_value"]) for r in ours)


# =============================================================================================
# a. the store contract: SQLiteStore and InfluxStore give the same summaries
# =============================================================================================

async def _contract(tmp_path: Path, url: str, token: str, org: str, bucket: str) -> None:
    now = int(time.time())
    batches = random_batches(now)
    lite = t.SQLiteStore(str(tmp_path / "contract.db"))
    flux = t.InfluxStore(url, token, org, bucket)
    await lite.open()
    await flux.open()
    try:
        for b in batches:
            for st in (lite, flux):
                await st.write(b)
        for b in batches[:5]:  # replays: no double count in either store
            await lite.write(b)
            await flux.write(b)
        read_at = time.time()
        for rng, (seconds, tier) in t.RANGES.items():
            s1 = t.summarize(await lite.read(seconds, tier, read_at), rng, read_at)
            s2 = t.summarize(await flux.read(seconds, tier, read_at), rng, read_at)
            assert_same_summary(s1, s2, rng)
        total = sum(r.count for b in batches for r in b.rows)
        s = t.summarize(await flux.read(*t.RANGES["24h"], read_at), "24h", read_at)
        assert sum(src["requests"] for src in s["sources"].values()) == total
    finally:
        await lite.close()
        await flux.close()


def test_store_contract_sqlite_and_influx_agree(tmp_path, fake):
    asyncio.run(_contract(tmp_path, fake.url, fake.token, fake.org, BUCKET))
    assert len(fake.queries) >= 6 * len(t.RANGES)  # every range was read through Flux


LIVE = {k: os.environ.get(f"INFLUXDB_{k}", "") for k in ("URL", "TOKEN", "ORG", "BUCKET")}


@influx_mark
@pytest.mark.skipif(not LIVE["URL"], reason="INFLUXDB_URL not set")
def test_store_contract_live_influxdb(tmp_path, monkeypatch):
    """The same contract against a real InfluxDB 2. The rollups go to a measurement of their own,
    deleted afterwards, so the bucket's real data is neither read nor touched."""
    missing = [k for k, v in LIVE.items() if not v]
    assert not missing, f"INFLUXDB_{missing[0]} is required with INFLUXDB_URL"
    measurement = f"requests_wiretest_{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(t, "MEASUREMENT", measurement)

    async def cleanup() -> None:
        from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
        async with InfluxDBClientAsync(url=LIVE["URL"], token=LIVE["TOKEN"], org=LIVE["ORG"]) as c:
            await c.delete_api().delete(datetime(1970, 1, 1, tzinfo=timezone.utc),
                                        datetime.now(timezone.utc).replace(year=datetime.now().year + 1),
                                        f'_measurement="{measurement}"', bucket=LIVE["BUCKET"], org=LIVE["ORG"])
    try:
        asyncio.run(_contract(tmp_path, LIVE["URL"], LIVE["TOKEN"], LIVE["ORG"], LIVE["BUCKET"]))
    finally:
        asyncio.run(cleanup())


# =============================================================================================
# b. the points as stored
# =============================================================================================

def test_points_tags_types_time_and_escaping(fake):
    now = int(time.time())
    routes = ["/api/items/<id:int>", "/a b", "/x,y", "/k=v", "/mix, =x", "/back\\slash", "/trailing\\", "two\nlines"]
    rows = [rollup(now, route=r, ms=0.01 * (i + 1), count=i + 1, source=t.SOURCES[i % 2]) for i, r in enumerate(routes)]
    rows.append(t.Rollup(now, "caddy", "/empty-hist", "GET", 0, 1, 0.0, 0.0, 0, {}))  # status 0, dur 0.0

    async def go() -> t.RangeData:
        st = t.InfluxStore(fake.url, fake.token, fake.org, BUCKET)
        await st.open()
        try:
            await st.write(batch(42, rows))
            return await st.read(300, 10, time.time() + 1)
        finally:
            await st.close()
    data = asyncio.run(go())
    points = fake.points()
    assert len(points) == len(rows)
    for tags, ts, fields in points:
        assert set(tags) == {"instance", "method", "route", "source", "status"}, tags
        assert abs(ts / NS - time.time()) < 10, ts  # never 1970
        assert ts % NS == 42  # the batch number, so a replay overwrites these very points
        assert isinstance(fields["dur_sum"], float) and isinstance(fields["dur_max"], float), fields
        assert all(type(fields[k]) is int for k in fields if k in ("count", "bytes") or re.fullmatch(r"b\d+", k))
        assert set(fields) - {"count", "bytes", "dur_sum", "dur_max"} == {k for k in fields if k.startswith("b")
                                                                          and k[1:].isdigit()}
    stored = {tags["route"] for tags, _, _ in points}
    # as _lp_tag documents: a backslash becomes '/', a newline a space; the rest survives as is
    assert stored == {r.replace("\\", "/").replace("\n", " ") for r in routes} | {"/empty-hist"}
    body = fake.bodies[-1].decode()
    assert r"route=/a\ b," in body and r"route=/x\,y," in body and r"route=/k\=v," in body
    assert {r[1] for r in data.series} == stored  # and the Flux read gives the same names back
    assert sum(r[4] for r in data.series) == sum(r.count for r in rows)


# =============================================================================================
# c. the Writer against the fake
# =============================================================================================

@contextlib.asynccontextmanager
async def influx_writer(fake: FakeInflux, tmp_path: Path, cap: int = 1 << 20, timeout_ms: int = 3000,
                        token: str | None = None, backoff_max: float = 0.4):
    store = t.InfluxStore(fake.url, token or fake.token, fake.org, BUCKET, timeout_ms=timeout_ms)
    await store.open()
    spool = t.Spool(str(tmp_path / "spool"), cap)
    w = t.Writer(store, spool=spool)
    w.BACKOFF_MAX = backoff_max  # keeps a test short; the schedule is the same
    w.start()
    try:
        yield w, spool
    finally:
        await w.close(timeout=3.0)
        await store.close()


def _done(w: t.Writer, n: int) -> bool:
    c = w.counters
    return c["written"] + c["rejected"] + w.health()["dropped"] >= n and not w.queue


def _seqs_written(fake: FakeInflux, since: int = 0) -> list[int]:
    """The batch number (timestamp modulo 1e9) of each write body, in the order received."""
    return [int(b.split(b"\n")[0].rsplit(b" ", 1)[1]) % NS for b in fake.bodies[since:] if b]


def test_writer_503_is_retried_and_written_once(tmp_path, fake):
    now = int(time.time())
    b = batch(1, [rollup(now, count=3), rollup(now, status=500, source="caddy")])

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
    b = batch(2, [rollup(int(time.time()), count=2)])

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
    b = batch(3, [rollup(now, count=5), rollup(now - 1, route="/a b", count=2)])

    async def go():
        async with influx_writer(fake, tmp_path) as (w, _):
            fake.fail(503, times=2, accept=True)  # stored, yet answered 503, twice
            w.put(b)
            await until(lambda: _done(w, 1), 10, "the batch written")
            return dict(w.counters)
    c = asyncio.run(go())
    assert c["retried"] == 2 and c["written"] == 1
    assert fake.write_requests == 3 and fake.points_received == 6
    assert fake.counts()["status"] == {("sanic", "200"): 7}  # the same points overwritten, not added
    assert fake.counts()["route"] == {("sanic", "/api/ping"): 5, ("sanic", "/a b"): 2}


@pytest.mark.parametrize("kind", ["400", "401", "404-bucket"])
def test_writer_client_errors_are_rejected_and_logged_once(tmp_path, fake, caplog, kind):
    caplog.set_level(logging.ERROR, logger="telemetry")
    now = int(time.time())
    bad = [batch(10 + i, [rollup(now, count=i + 1)]) for i in range(3)]
    good = batch(20, [rollup(now, count=9, route="/ok")])

    async def go():
        token = "wrong-token" if kind == "401" else None
        if kind == "400":
            fake.fail(400, times=3, body=_json_error("invalid", "unable to parse 'x': bad timestamp"))
        async with influx_writer(fake, tmp_path, token=token) as (w, _):
            if kind == "404-bucket":
                w.store.bucket = "no-such-bucket"
            for b in bad:
                w.put(b)
            await until(lambda: w.counters["rejected"] == 3, 10, "three rejections")
            if kind != "400":
                w.store.bucket, w.store.token = BUCKET, fake.token
                await w.store.close()
                await w.store.open()
            w.put(good)
            await until(lambda: w.counters["written"] == 1, 10, "the good batch")
            return dict(w.counters)
    c = asyncio.run(go())
    assert c["rejected"] == 3 and c["retried"] == 0 and c["written"] == 1
    assert fake.write_requests == 4  # never retried
    assert fake.counts()["route"] == {("sanic", "/ok"): 9}
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1, [r.getMessage() for r in caplog.records]
    assert kind[:3] in refused[0].getMessage()


def test_writer_spools_while_refused_and_replays_in_order(tmp_path, fake):
    now = int(time.time())
    batches = [batch(100 + i, [rollup(now - 3 + i % 3, count=i + 1, status=200 if i % 2 else 503)]) for i in range(6)]

    async def go():
        async with influx_writer(fake, tmp_path) as (w, spool):
            fake.down()
            w.put(batches[0])
            await until(lambda: w.down_since is not None, 10, "the writer to see the store down")
            for b in batches[1:]:
                w.put(b)
            files = sorted(p.name for p in (tmp_path / "spool").glob("*.batch"))
            assert len(files) == 5 and w.counters["spooled"] == 5, files
            assert fake.write_requests == 0
            since = len(fake.bodies)
            fake.up()
            await until(lambda: _done(w, 6) and spool.count() == 0, 10, "the spool replayed")
            return dict(w.counters), since
    c, since = asyncio.run(go())
    assert c["written"] == 6 and c["replayed"] == 5 and c["retried"] >= 1
    assert _seqs_written(fake, since) == [100 + i for i in range(6)]  # oldest first
    assert fake.counts()["status"] == expected_status(batches)
    assert not list((tmp_path / "spool").iterdir())


def test_writer_spool_cap_drops_oldest_and_counts(tmp_path, fake):
    now = int(time.time())
    batches = [batch(200 + i, [rollup(now - 2, count=i + 1)]) for i in range(8)]
    size = len(t.batch_to_json(batches[1]))

    async def go():
        async with influx_writer(fake, tmp_path, cap=3 * size + size // 2) as (w, spool):
            fake.down()
            w.put(batches[0])  # the head stays in memory, retried
            await until(lambda: w.down_since is not None, 10, "the writer to see the store down")
            for b in batches[1:]:
                w.put(b)
            assert spool.count() == 3 and w.health()["dropped"] == 4
            fake.up()
            await until(lambda: w.counters["written"] == 4 and spool.count() == 0, 10, "the rest written")
            return w.health()
    h = asyncio.run(go())
    assert h["dropped"] == 4 and h["written"] == 4
    kept = [batches[0], *batches[5:]]  # the four oldest spooled batches were dropped
    assert fake.counts()["status"] == expected_status(kept)


def test_writer_timeout_is_retried_and_late_write_counts_once(tmp_path, fake):
    b = batch(300, [rollup(int(time.time()), count=4)])

    async def go():
        async with influx_writer(fake, tmp_path, timeout_ms=400) as (w, _):
            fake.slow(1.2, times=1)  # past the client's timeout; the fake stores it late anyway
            w.put(b)
            await until(lambda: _done(w, 1), 10, "the batch written")
            await until(lambda: fake.idle() and fake.write_requests >= 2, 5, "the late write to land")
            return dict(w.counters), w.last_error
    c, last_error = asyncio.run(go())
    assert c["retried"] >= 1 and c["written"] == 1, (c, last_error)
    assert "Timeout" in last_error or "timeout" in last_error, last_error
    assert fake.counts()["status"] == {("sanic", "200"): 4}


# =============================================================================================
# d. end to end: `python telemetry.py` with a real Caddy, InfluxDB = the fake
# =============================================================================================

def _fake_has(fake: FakeInflux, expected: dict[str, int]) -> bool:
    got = fake.by_source()
    return got.get("caddy") == expected and got.get("sanic") == expected


def _summary_has(demo: Demo, expected: dict[str, int]) -> bool:
    s = demo.summary()
    return all(s.get("sources", {}).get(src, {}).get("status") == expected for src in t.SOURCES)


def _add(expected: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    return {k: expected.get(k, 0) + more.get(k, 0) for k in set(expected) | set(more)}


@needs_caddy
def test_e2e_influx_outage_spools_and_catches_up_exactly(tmp_path, fake):
    demo = Demo(tmp_path, env=influx_env(fake, tmp_path / "spool"))
    try:
        expected = _add({"200": 1}, send_mix(demo.edge))  # 1: Demo's readiness probe
        wait_for(lambda: _fake_has(fake, expected), 10, f"the fake to hold {expected}")
        wait_for(lambda: _summary_has(demo, expected), 5, "the summary (Flux) to agree")
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
        wait_for(lambda: _summary_has(demo, expected), 5, "the summary to agree")
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
        wait_for(lambda: _summary_has(demo, expected), 5, "the summary to agree")
        wait_for(lambda: not list(spool.iterdir()), 5, "the spool folder to be empty")
    finally:
        code = demo.stop()
    assert code == 0, demo.output()[-3000:]


# =============================================================================================
# e. the Flux text type-checks with the Flux language server (offline)
# =============================================================================================

FLUX_CHECK = HERE.parent / "shared" / "tools" / "flux-check" / "flux-check"


@pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None,
                    reason="no node/npm (apt-get install nodejs npm)")
@pytest.mark.skipif(not FLUX_CHECK.exists(), reason=f"no {FLUX_CHECK}")
def test_flux_queries_pass_flux_check_and_the_checker_bites(tmp_path):
    files = []
    for rng in t.RANGES:
        out = subprocess.run([sys.executable, str(HERE / "telemetry.py"), "flux", "--range", rng],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        parts = re.split(r"^// --- (\w+) \(range [^)]+\)\n", out, flags=re.M)
        named = dict(zip(parts[1::2], parts[2::2]))
        assert set(named) == set(t.flux_queries(BUCKET, *t.RANGES[rng], time.time())), named.keys()
        for name, text in named.items():
            path = tmp_path / f"{rng}-{name}.flux"
            path.write_text(text)
            files.append(path)
    good = subprocess.run([str(FLUX_CHECK), *map(str, files)], capture_output=True, text=True, timeout=600)
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.strip().splitlines()[-1] == f"{len(files)} passed, 0 failed"
    bad = {"arg-type": 'from(bucket: "x") |> range(start: -1h) |> sum(column: 5)\n',
           "misspelt": 'from(bucket: "x") |> range(start: -1h) |> summ()\n'}
    for name, text in bad.items():
        (tmp_path / f"bad-{name}.flux").write_text(text)
        r = subprocess.run([str(FLUX_CHECK), str(tmp_path / f"bad-{name}.flux")], capture_output=True, text=True,
                           timeout=600)
        assert r.returncode != 0 and "FAIL" in r.stdout, (name, r.stdout + r.stderr)
