"""Result files and run folders, written atomically: everything goes into a hidden temporary sibling
that is renamed into place at the end, so a run never leaves a half-written result behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from lorabench.errors import LorabenchError


def default_run_dir(workload: str, n_loras: int, root: str | Path = "results") -> Path:
    """results/<UTC timestamp>-<workload>-<n_loras>, with a counter if two runs start in the same second."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{stamp}-{Path(workload).stem}-{n_loras}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


@contextlib.contextmanager
def atomic_dir(final: str | Path):
    """Yield a temporary folder beside `final`; rename it to `final` when the block succeeds."""
    final = Path(final)
    if final.exists():
        raise LorabenchError(f"--out {final}: already exists; choose a new folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; results are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def csv_text(frame: pd.DataFrame) -> str:
    """`frame.to_csv(index=False)`, byte for byte (see `_csv_pieces`)."""
    return "".join(_csv_pieces(frame))


def _csv_pieces(frame: pd.DataFrame, rows: int = 20_000):
    """`frame.to_csv(index=False)` in pieces of `rows` rows, so a large table never sits in memory
    as text. Integer and float columns (every run record) are formatted here, about twice as fast
    as pandas: a float as Python's shortest repr, NaN as an empty field, as pandas writes them; any
    other frame goes to pandas whole."""
    simple = all(isinstance(c, str) and not any(ch in c for ch in ',"\n') for c in frame.columns)
    values = [frame[c].to_numpy() for c in frame.columns]
    if not simple or any(v.dtype.kind not in "iuf" for v in values):
        yield frame.to_csv(index=False)
        return
    yield ",".join(frame.columns) + "\n"
    for start in range(0, len(frame), rows):
        columns = []
        for v in values:
            part = v[start : start + rows]
            text = list(map(str if v.dtype.kind in "iu" else repr, part.tolist()))
            if v.dtype.kind == "f" and np.isnan(part).any():
                text = ["" if t == "nan" else t for t in text]
            columns.append(text)
        yield "\n".join(map(",".join, zip(*columns))) + "\n"


def write_csv_atomic(path: Path, frame: pd.DataFrame) -> None:
    write_text_atomic(path, csv_text(frame))


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, default=_jsonable) + "\n")


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(_csv_pieces(frame))


def _jsonable(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def read_table(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """A results CSV with at least one row and the `required` columns, or one clear error."""
    try:
        table = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise LorabenchError(f"{path}: empty file, no rows") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise LorabenchError(f"{path}: not a CSV table ({err})") from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise LorabenchError(f"{path}: missing column(s) {', '.join(missing)}")
    if table.empty:
        raise LorabenchError(f"{path}: no rows")
    return table
