"""Request traces to replay: lorabench's own CSV and three public formats, read into the same columns.

The format is told by the file's first line:

    lorabench  CSV    arrival_s, adapter, prompt_tokens, output_tokens (arrival_s in seconds)
    azure      CSV    TIMESTAMP, ContextTokens, GeneratedTokens: the Azure LLM inference traces of 2023
                      and 2024; TIMESTAMP is a date and time such as 2023-11-16 18:15:46.6805900
    burstgpt   CSV    Timestamp, Model, Request tokens, Response tokens, Total tokens, Log Type
                      (Timestamp in seconds from the start of the trace)
    mooncake   JSONL  one object a line: timestamp (milliseconds from the start of the trace),
                      input_length, output_length, hash_ids

Each format has a clock, the trace's own seconds t: lorabench's arrival_s, BurstGPT's Timestamp,
Mooncake's timestamp / 1000, and for Azure the seconds since the earliest TIMESTAMP of the file. Rows
are put in order of t (ties keep file order); a window [start, end) keeps the rows with
start <= t < end; then arrival_s = (t - start) * time_scale, with start = 0 without a window. So the
replay's clock starts at the window's start, and time_scale 0.5 replays the trace twice as fast.

Only lorabench's format names an adapter per request; `adapter_column` names a column (CSV) or key
(JSONL) to take adapters from in any format: whole numbers are adapter ids, anything else (a model
name, say) is numbered 0, 1, ... in order of first appearance in the replay. Token counts must be
whole numbers >= 0; `skip_empty` drops rows with 0 prompt or 0 output tokens (BurstGPT records
failed requests with 0 response tokens), which a server cannot replay.

A malformed row is one LorabenchError naming the file and its line (1-based, as an editor shows it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lorabench.errors import LorabenchError


@dataclass(frozen=True)
class TraceFormat:
    name: str
    title: str
    columns: tuple[str, ...]  # required columns (CSV) or keys (JSONL)
    time: str  # the column holding the time
    prompt: str
    output: str
    adapter: str | None = None  # the column holding adapter ids, if the format has one


FORMATS = {
    f.name: f for f in (
        TraceFormat("lorabench", "lorabench CSV", ("arrival_s", "adapter", "prompt_tokens", "output_tokens"),
                    "arrival_s", "prompt_tokens", "output_tokens", adapter="adapter"),
        TraceFormat("azure", "Azure LLM inference CSV (2023, 2024)", ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
                    "TIMESTAMP", "ContextTokens", "GeneratedTokens"),
        TraceFormat("burstgpt", "BurstGPT CSV", ("Timestamp", "Model", "Request tokens", "Response tokens"),
                    "Timestamp", "Request tokens", "Response tokens"),
        TraceFormat("mooncake", "Mooncake JSONL", ("timestamp", "input_length", "output_length"),
                    "timestamp", "input_length", "output_length"),
    )
}


def describe_formats() -> str:
    return "; ".join(f"{f.title} ({', '.join(f.columns)})" for f in FORMATS.values())


@dataclass(frozen=True)
class TraceRows:
    """A trace's rows in replay order: the columns every format gives, and where each row came from."""

    path: str
    format: str
    arrival_s: np.ndarray  # float64, replay seconds (window and time scale applied)
    prompt_tokens: np.ndarray  # int64
    output_tokens: np.ndarray  # int64
    adapter: np.ndarray | None  # int64, or None when the trace names no adapters
    row: np.ndarray  # int64: each row's index among the file's data rows, for line numbers

    def __len__(self) -> int:
        return len(self.arrival_s)

    def where(self, i: int) -> str:
        """'path, line N' of replayed row i."""
        return f"{self.path}, line {line_of(self.path, int(self.row[i]), header=self.format != 'mooncake')}"


def load_trace(path: str, time_scale: float = 1.0, window: tuple[float, float] | None = None,
               adapter_column: str | None = None, skip_empty: bool = False) -> TraceRows:
    """Read a trace in any format and return its rows in replay order (see the module docstring)."""
    if not Path(path).is_file():
        raise LorabenchError(f"{path}: no such trace file")
    fmt = detect_format(path)
    reader = _read_jsonl if fmt.name == "mooncake" else _read_csv
    t, prompt, output, adapter_raw, row = reader(path, fmt, adapter_column or fmt.adapter)
    order = np.argsort(t, kind="stable")
    t, prompt, output, row = t[order], prompt[order], output[order], row[order]
    adapter_raw = None if adapter_raw is None else adapter_raw[order]
    start = 0.0
    if window is not None:
        start, end = window
        keep = (t >= start) & (t < end)
        if not keep.any():
            span = f"{t[0]:g} .. {t[-1]:g} s" if len(t) else "no rows"
            raise LorabenchError(f"{path}: window [{start:g}, {end:g}) s holds no rows (the trace spans {span})")
        t, prompt, output, row = t[keep], prompt[keep], output[keep], row[keep]
        adapter_raw = None if adapter_raw is None else adapter_raw[keep]
    if skip_empty:
        keep = (prompt > 0) & (output > 0)
        if not keep.any():
            raise LorabenchError(f"{path}: every row has 0 prompt or 0 output tokens")
        t, prompt, output, row = t[keep], prompt[keep], output[keep], row[keep]
        adapter_raw = None if adapter_raw is None else adapter_raw[keep]
    adapter = None
    if adapter_raw is not None:
        adapter = _adapter_ids(adapter_raw, path, row, fmt, adapter_column or fmt.adapter)
    return TraceRows(str(path), fmt.name, (t - start) * time_scale, prompt, output, adapter, row)


# --- format detection ---------------------------------------------------------------------------


def _first_line(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:
            for line in f:
                if line.strip():
                    return line.strip()
    except UnicodeDecodeError as err:
        raise LorabenchError(f"{path}: not a text file ({err})") from None
    raise LorabenchError(f"{path}: empty trace file")


def header_names(line: str) -> list[str]:
    return [name.strip().strip('"') for name in line.split(",")]


def detect_format(path: str) -> TraceFormat:
    first = _first_line(path)
    if first.startswith("{"):
        return FORMATS["mooncake"]
    names = set(header_names(first))
    csv_formats = [f for f in FORMATS.values() if f.name != "mooncake"]
    for fmt in csv_formats:
        if set(fmt.columns) <= names:
            return fmt
    near = max(csv_formats, key=lambda f: len(set(f.columns) & names))
    if set(near.columns) & names:
        missing = [c for c in near.columns if c not in names]
        raise LorabenchError(f"{path}: missing column(s) {', '.join(missing)} for a {near.title} trace; expected "
                             f"{', '.join(near.columns)}")
    raise LorabenchError(f"{path}: unknown trace format (first line {first[:80]!r}); expected one of: "
                         f"{describe_formats()}")


# --- readers --------------------------------------------------------------------------------------


def line_of(path: str, row: int, header: bool = True) -> int:
    """The 1-based line of data row `row` (0-based, blank lines skipped as the readers skip them)."""
    target = row + (1 if header else 0)
    seen = -1
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                seen += 1
                if seen == target:
                    return number
    return number + 1


def _show(value) -> str:
    """A value as the file had it (numpy scalars as plain numbers)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _bad(path: str, row: int, what: str, header: bool = True):
    raise LorabenchError(f"{path}, line {line_of(path, row, header)}: {what}")


def _read_csv(path: str, fmt: TraceFormat, adapter_column: str | None):
    try:
        df = pd.read_csv(path, encoding="utf-8-sig", skipinitialspace=True)
    except pd.errors.ParserError as err:
        raise LorabenchError(_parser_message(path, err)) from None
    except (pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise LorabenchError(f"{path}: not a readable CSV ({err})") from None
    df.columns = header_names(",".join(map(str, df.columns)))
    if df.empty:
        raise LorabenchError(f"{path}: no rows, only the header")
    if adapter_column is not None and adapter_column not in df.columns:
        raise LorabenchError(f"{path}: no column {adapter_column!r} to take adapters from; its columns are "
                             f"{', '.join(df.columns)}")
    row = np.arange(len(df), dtype=np.int64)
    if fmt.name == "azure":
        t = _azure_seconds(df[fmt.time], path)
    else:
        t = _numbers(df[fmt.time], path, fmt.time)
        bad = np.flatnonzero(~(t >= 0))
        if bad.size:
            _bad(path, bad[0], f"column {fmt.time}: {_show(df[fmt.time].iloc[bad[0]])} is not a time >= 0")
    prompt = _tokens(df[fmt.prompt], path, fmt.prompt)
    output = _tokens(df[fmt.output], path, fmt.output)
    adapter = None if adapter_column is None else df[adapter_column].to_numpy()
    if adapter is not None:
        missing = np.flatnonzero(pd.isna(adapter))
        if missing.size:
            _bad(path, missing[0], f"column {adapter_column}: no value")
    return t, prompt, output, adapter, row


def _parser_message(path: str, err: Exception) -> str:
    """pandas' 'Error tokenizing data. C error: Expected 4 fields in line 7, saw 5' as 'path, line 7: ...'."""
    found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(err))
    if found:
        want, line, saw = found.groups()
        return f"{path}, line {line}: {saw} fields, the header has {want}"
    return f"{path}: not a readable CSV ({err})"


def _numbers(col: pd.Series, path: str, name: str) -> np.ndarray:
    values = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raw = col.iloc[bad[0]]
        _bad(path, bad[0], f"column {name}: " + ("no value" if pd.isna(raw) else f"{_show(raw)} is not a number"))
    return values


def _tokens(col: pd.Series, path: str, name: str) -> np.ndarray:
    values = _numbers(col, path, name)
    bad = np.flatnonzero((values < 0) | (values != np.floor(values)))
    if bad.size:
        _bad(path, bad[0], f"column {name}: {_show(col.iloc[bad[0]])} is not a whole number of tokens >= 0")
    return values.astype(np.int64)


def _azure_seconds(col: pd.Series, path: str) -> np.ndarray:
    aware = col.astype(str).str.contains(r"(?:[+-]\d\d:?\d\d|Z)$", regex=True)
    if aware.any() and not aware.all():  # seconds between such rows would depend on a guess
        first = int(np.flatnonzero((aware != aware.iloc[0]).to_numpy())[0])
        _bad(path, first, f"column TIMESTAMP: {_show(col.iloc[first])} "
                          f"{'has' if aware.iloc[first] else 'lacks'} a time zone and line "
                          f"{line_of(path, 0)} does {'not' if aware.iloc[first] else ''}".rstrip()
                          + "; give every row the same kind of time")
    try:
        stamps = pd.to_datetime(col, format="ISO8601", errors="coerce", utc=bool(aware.all()))
    except ValueError as err:  # pandas refuses some mixes outright
        raise LorabenchError(f"{path}: column TIMESTAMP: {err}") from None
    bad = np.flatnonzero(stamps.isna().to_numpy())
    if bad.size:
        _bad(path, bad[0], f"column TIMESTAMP: {_show(col.iloc[bad[0]])} is not a date and time "
                           "(like 2023-11-16 18:15:46.6805900)")
    ns = stamps.to_numpy(dtype="datetime64[ns]").astype(np.int64)
    return (ns - ns.min()) / 1e9


def _read_jsonl(path: str, fmt: TraceFormat, adapter_column: str | None):
    keys = list(fmt.columns) + ([adapter_column] if adapter_column else [])
    values: dict[str, list] = {k: [] for k in keys}
    row = 0
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise LorabenchError(f"{path}, line {number}: not a JSON object ({err.msg})") from None
            if not isinstance(obj, dict):
                raise LorabenchError(f"{path}, line {number}: not a JSON object")
            for k in keys:
                v = obj.get(k)
                if k != adapter_column and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    what = "missing" if k not in obj else f"{v!r} is not a number"
                    raise LorabenchError(f"{path}, line {number}: {k}: {what}")
                if v is None:
                    raise LorabenchError(f"{path}, line {number}: {k}: missing")
                values[k].append(v)
            row += 1
    if not row:
        raise LorabenchError(f"{path}: no rows")
    t = np.asarray(values[fmt.time], dtype=np.float64)
    for name in fmt.columns:  # the readers' checks, with JSONL lines (no header)
        col = np.asarray(values[name], dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(col) | (col < 0) | ((col != np.floor(col)) & (name != fmt.time)))
        if bad.size:
            what = "a time >= 0" if name == fmt.time else "a whole number of tokens >= 0"
            _bad(path, bad[0], f"{name}: {_show(values[name][bad[0]])} is not {what}", header=False)
    prompt = np.asarray(values[fmt.prompt], dtype=np.int64)
    output = np.asarray(values[fmt.output], dtype=np.int64)
    adapter = None if adapter_column is None else np.asarray(values[adapter_column], dtype=object)
    return t / 1e3, prompt, output, adapter, np.arange(row, dtype=np.int64)


def _adapter_ids(raw: np.ndarray, path: str, row: np.ndarray, fmt: TraceFormat, column: str) -> np.ndarray:
    """Whole numbers are ids; other values are numbered in order of first appearance. A column that
    mixes the two is refused (a name among ids is a typo, and numbering would renumber every adapter)."""
    numbers = pd.to_numeric(pd.Series(raw), errors="coerce").to_numpy(dtype=np.float64)
    names = np.flatnonzero(~np.isfinite(numbers))
    if names.size and names.size < len(numbers):
        i = int(names[np.argmin(row[names])])  # the first such row of the file
        _bad(path, int(row[i]), f"column {column}: {_show(raw[i])} is not an adapter id (a whole number >= 0), "
                                "and other rows hold ids: the column must be all ids or all names",
             header=fmt.name != "mooncake")
    if np.isfinite(numbers).all():
        bad = np.flatnonzero((numbers < 0) | (numbers != np.floor(numbers)))
        if bad.size:
            i = int(np.argmin(row[bad]))  # the first such row of the file
            _bad(path, int(row[bad[i]]), f"column {column}: {_show(raw[bad[i]])} is not an adapter id (a whole "
                                         "number >= 0)", header=fmt.name != "mooncake")
        return numbers.astype(np.int64)
    codes, _ = pd.factorize(pd.Series(raw).astype(str), sort=False)
    return codes.astype(np.int64)
