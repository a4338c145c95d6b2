"""Result files and run folders, written atomically: everything goes into a hidden temporary sibling
that is renamed into place at the end, so a run never leaves a half-written result behind.

A folder being written is locked (`writer_lock`: an flock on a hidden sibling `.NAME.lock` that holds
the writer's pid; the kernel frees it when the writer dies, even by kill -9), so a second writer into
the same place is refused and temporary folders left by a killed writer are recognised as stale and
removed by the next one. Folders and files are created with the permissions the umask gives (as
`mkdir` and `open` do), so results on a shared filesystem stay readable by others.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from lorabench.errors import LorabenchError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: folders are written unlocked
    fcntl = None


def default_run_dir(workload: str, n_loras: int, root: str | Path = "results") -> Path:
    """results/<UTC timestamp>-<workload>-<n_loras>, with a counter if two runs start in the same second."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{stamp}-{Path(workload).stem}-{n_loras}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


# A temporary sibling of NAME: .NAME.<token>.tmp (the token has no dots; older versions made it with mkdtemp)
_TMP = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]+\.tmp")


@contextlib.contextmanager
def writer_lock(target: str | Path, flag: str = "--out"):
    """Hold the writer's lock of `target` (a folder or file, existing or not) for the block: one clear
    error when another live process holds it; the lock file is removed when the block ends."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(_lock_path(target), target, flag)
    except OSError as err:
        raise LorabenchError(f"{flag} {target}: cannot write there ({err.strerror or err})") from None
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(_lock_path(target))  # still ours: we hold it
            os.close(fd)


def _acquire(path: Path, target: Path, flag: str) -> int | None:
    if fcntl is None:  # pragma: no cover
        return None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LorabenchError(f"{flag} {target}: another lorabench process (pid {pid}) is writing it; wait for "
                                 "it to finish or stop it") from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            os.close(fd)  # a filesystem without locks (some NFS setups): written unlocked, as before
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its last holder unlinked between our open and our lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def _abandoned(lock: Path) -> bool:
    """Whether no live process holds the writer's lock file `lock` (absent, or free)."""
    if fcntl is None:  # pragma: no cover
        return False
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except OSError:  # held (or a filesystem without locks: then nothing is known to be stale)
        return False
    finally:
        os.close(fd)


def remove_stale_temporaries(final: Path) -> None:
    """Remove the temporary folders a killed writer left beside `final`: those of `final` itself (the
    caller holds its lock), and those of other names whose writer's lock file is there but free."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(final.parent):
            found = _TMP.fullmatch(entry.name)
            if not found or not entry.is_dir(follow_symlinks=False):
                continue
            name = found["name"]
            lock = final.parent / f".{name}.lock"
            if name == final.name or (lock.exists() and _abandoned(lock)):
                shutil.rmtree(entry.path, ignore_errors=True)
                if name != final.name and _abandoned(lock):
                    with contextlib.suppress(OSError):
                        lock.unlink()


def remove_temporaries_under(folder: Path) -> None:
    """Remove every temporary file and folder (.NAME.<token>.tmp) under `folder`: what writers killed
    mid-write left. Only for a folder whose writer's lock the caller holds."""
    for path in sorted(Path(folder).rglob(".*.tmp"), reverse=True):  # deepest first
        if _TMP.fullmatch(path.name):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()


def _make_temporary(final: Path, directory: bool) -> tuple[Path, int | None]:
    """A new hidden sibling of `final` (.NAME.<token>.tmp), created with the umask's permissions; for a
    file, its open descriptor."""
    while True:
        path = final.parent / f".{final.name}.{secrets.token_hex(4)}.tmp"
        try:
            if directory:
                os.mkdir(path, 0o777)
                return path, None
            return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_dir(final: str | Path):
    """Yield a temporary folder beside `final`; rename it to `final` when the block succeeds."""
    final = Path(final)
    if final.exists():
        raise LorabenchError(f"--out {final}: already exists; choose a new folder")
    with writer_lock(final):
        if final.exists():  # written by the process that held the lock before us
            raise LorabenchError(f"--out {final}: already exists; choose a new folder")
        remove_stale_temporaries(final)
        try:
            tmp, _ = _make_temporary(final, directory=True)
        except OSError as err:
            raise LorabenchError(f"--out {final}: cannot write there ({err.strerror or err})") from None
        try:
            yield tmp
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def write_text_atomic(path: Path, text: str | bytes) -> None:
    """Write `text` (or bytes) to `path` through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _make_temporary(path, directory=False)
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
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


def read_json(path: Path, what: str):
    """A JSON file's contents, or one clear error naming it (`what`: "profile", "engine file")."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LorabenchError(f"{what} {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LorabenchError(f"{what} {path}: not readable JSON ({err})") from None


def read_table(path: Path, required: tuple[str, ...], what: str = "", **read_csv) -> pd.DataFrame:
    """A CSV with at least one row and the `required` columns, or one clear error naming the file
    (`what` says what it is: "runs file"); `read_csv`: pandas.read_csv's options."""
    name = f"{what} {path}" if what else str(path)
    try:
        table = pd.read_csv(path, **read_csv)
    except FileNotFoundError:
        raise LorabenchError(f"{name}: no such file") from None
    except pd.errors.EmptyDataError:
        raise LorabenchError(f"{name}: empty file, no rows") from None
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise LorabenchError(f"{name}: not a CSV table ({err})") from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise LorabenchError(f"{name}: missing column(s) {', '.join(missing)}")
    if table.empty:
        raise LorabenchError(f"{name}: no rows")
    return table
