"""Run store: a resumable, shardable run directory of Parquet results.

Every analysis (magnitude sweeps, shift protocols, pose statistics, ...) writes its
results through a :class:`RunStore`. The store is generic: it knows configurations
(JSON dictionaries), parts (units of work named by string ids) and tables (pandas
DataFrames), nothing about models or transformations.

Layout of a run directory::

    run_dir/
      config.json              {"config": <resolved configuration>, "config_hash": <sha256>}
      manifest.json            status ("running" | "complete"), hash, times, summary
      meta.json                free-form (environment: torch version, device, ...)
      parts/<part_id>/<table>.parquet   one file per table of a part
      parts/<part_id>/_done.json        done marker, written last: {"tables": {name: rows}}
      aggregates/<name>.parquet         tables written by finalize() / write_aggregate()
      figures/                          run.path("figures")

Convention:
    - Configuration: canonical JSON (sorted keys, compact separators, UTF-8, no NaN),
      its hash is the sha256 hex digest of those bytes, so it does not depend on key
      order; tuples become lists, numpy scalars/arrays Python numbers/lists, paths
      strings, dataclasses dictionaries.
    - Every file is written atomically: a temporary file ``.<name>.r<rank>.<pid>.<token>.tmp``
      in the same directory, flush + fsync, ``os.replace``, fsync of the directory. A
      file with its final name is therefore always complete; a kill (``kill -9``
      included) leaves at most temporary files and tables of the part in flight.
    - A part is done only when its marker exists; the marker is written after all its
      tables. Readers see done parts only, so unfinished parts are invisible.
      ``write_part`` clears the leftovers of an unfinished part before writing it.
    - Part order: tables are concatenated in sorted part-id order, whatever the order
      in which parts finished. :func:`part_id` makes ids that sort in key order
      (integers zero-padded). The pandas index is not stored: read tables have a
      ``RangeIndex`` (``reset_index()`` first if the index carries data).
    - Checksums: a part's marker holds the sha256 of each of its files, the manifest that
      of each aggregate (``aggregate_sha256``). On resume a damaged part or aggregate is
      removed (the run is first marked running) and computed again from the parts;
      reading a damaged aggregate is refused with a one-line error.
    - Status: ``manifest.json`` says ``"running"`` from the first start until
      :meth:`RunStore.finalize` has written the aggregates; then ``"complete"``. Writing a
      new part or aggregate to a complete run sets it back to ``"running"``.
    - Distribution (``torchrun``): each rank takes ``shard(part_ids, rank, world_size)``
      (disjoint, round-robin over the sorted ids) and writes its parts into the same
      directory; parts are per-part files, so ranks never clobber each other. Only rank 0
      writes ``config.json``, ``manifest.json``, ``meta.json`` and aggregates, and clears
      anything; the other ranks wait (up to ``timeout`` s) until ``config.json`` with
      their configuration exists. With ``overwrite=True`` in a distributed job, build
      the store on rank 0 before the others (a barrier), or a rank could still see the
      old directory. Call :meth:`RunStore.finalize` on rank 0 after all ranks are done.

Usage::

    run = RunStore("runs/sweep-digits", config, rank=rank, world_size=world_size)
    ids = [part_id(name, k) for name in transforms for k in range(num_batches)]
    for pid in run.pending(run.shard(ids)):        # resume: finished parts are skipped
        run.write_part(pid, {"records": records_df, "topk": topk_df})
    # ... barrier ...
    if run.rank == 0:
        acc = run.read_table("records", columns=["transform", "magnitude", "correct"])
        run.finalize({"num_images": n}, aggregates={"accuracy": summarise(acc)},
                     expected_parts=ids)

    report = RunStore.open("runs/sweep-digits")  # read-only
    report.is_complete, report.config, report.read_aggregate("accuracy")
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from invariscope.errors import InvariscopeError, hint, unknown_name

__all__ = [
    "RankInfo",
    "RunStore",
    "canonical_json",
    "config_hash",
    "part_id",
    "rank_from_env",
    "shard",
]

logger = logging.getLogger(__name__)

CONFIG = "config.json"
MANIFEST = "manifest.json"
META = "meta.json"
PARTS = "parts"
AGGREGATES = "aggregates"
FIGURES = "figures"
DONE = "_done.json"
LOCK = ".lock"
FORMAT = "invariscope.run"
FORMAT_VERSION = 1
STATUS_RUNNING = "running"
STATUS_COMPLETE = "complete"

_RESERVED = {CONFIG, MANIFEST, META, PARTS, AGGREGATES}
_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]{0,199}$")
_KEY_RE = re.compile(r"^[A-Za-z0-9_.=+]+$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
_TMP_RE = re.compile(r"^\..+\.r(?P<rank>\d+)\.\d+\.[0-9a-f]+\.tmp$")
_TRASH_PREFIX = ".trash-"
#: Every entry a run of ours writes into its directory (besides temporary files and trash).
_OURS = _RESERVED | {FIGURES, LOCK}


def _leftover(name: str) -> bool:
    """A temporary file or trash folder a killed writer of ours left."""
    return name.startswith(_TRASH_PREFIX) or bool(_TMP_RE.match(name))


# --------------------------------------------------------------------------- config


def _jsonable(obj: Any, where: str) -> Any:
    """Return ``obj`` as plain JSON types (dict/list/str/int/float/bool/None)."""
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if not np.isfinite(obj):
            raise InvariscopeError(
                f"{where} is {obj}, which canonical JSON cannot store; use a finite number or null"
            )
        return float(obj)
    if isinstance(obj, np.generic):
        return _jsonable(obj.item(), where)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist(), where)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj), where)
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise InvariscopeError(
                    f"{where} has the non-string key {key!r}; configuration keys must be strings"
                )
            out[key] = _jsonable(value, f"{where}.{key}" if where != "config" else key)
        return out
    if isinstance(obj, list | tuple):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise InvariscopeError(
        f"{where} has a value of type {type(obj).__name__} that JSON cannot store; "
        "pass str, int, float, bool, None, list or dict"
    )


def canonical_json(config: Mapping[str, Any]) -> str:
    """Canonical JSON text of a configuration: sorted keys, compact, no NaN.

    >>> canonical_json({"b": (1, 2), "a": {"y": 1.5, "x": None}})
    '{"a":{"x":null,"y":1.5},"b":[1,2]}'
    """
    if not isinstance(config, Mapping):
        raise InvariscopeError(
            f"a run configuration must be a dict, got {type(config).__name__}; pass a dict"
        )
    return json.dumps(
        _jsonable(config, "config"),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 hex digest of :func:`canonical_json` (UTF-8): independent of key order.

    >>> config_hash({"a": 1}) == hashlib.sha256(b'{"a":1}').hexdigest()
    True
    """
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted-key view of nested dicts (lists are leaves)."""
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: obj}


def _differing_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Sorted dotted keys whose values differ (or that exist on one side only)."""
    a, b = _flatten(dict(old)), _flatten(dict(new))
    return sorted(k for k in a.keys() | b.keys() if a.get(k, _MISSING) != b.get(k, _MISSING))


_MISSING = object()


# ------------------------------------------------------------------ ids and sharding


def part_id(*keys: str | int, width: int = 6) -> str:
    """Build a part id from keys, joined by ``-``, that sorts in key order.

    Integers (>= 0) are zero-padded to ``width`` digits, so lexicographic order of ids
    is numeric order of keys; strings may use letters, digits and ``_ . = +`` (no ``-``,
    so the keys can be read back by splitting on ``-``).

    >>> part_id("rotation", 7)
    'rotation-000007'
    >>> sorted([part_id("a", 10), part_id("a", 9)])
    ['a-000009', 'a-000010']
    """
    if not keys:
        raise InvariscopeError("part_id() needs at least one key, e.g. part_id('rotation', 0)")
    pieces = []
    for key in keys:
        if isinstance(key, bool) or not isinstance(key, int | str | np.integer):
            raise InvariscopeError(
                f"part_id key {key!r} is a {type(key).__name__}; use str or int keys "
                "(e.g. the index of a magnitude, not the magnitude)"
            )
        if isinstance(key, int | np.integer):
            text = str(int(key))
            if key < 0 or len(text) > width:
                raise InvariscopeError(
                    f"part_id key {key} is not in [0, 10**{width}); use non-negative "
                    f"indices or a larger width"
                )
            pieces.append(text.zfill(width))
        else:
            if not _KEY_RE.match(key):
                raise InvariscopeError(
                    f"part_id key {key!r} must be non-empty and use only letters, digits "
                    "and _ . = +; rename it"
                )
            pieces.append(key)
    return _check_part_id("-".join(pieces))


def _check_part_id(pid: Any) -> str:
    if not isinstance(pid, str) or not _PART_RE.match(pid):
        raise InvariscopeError(
            f"invalid part id {pid!r}: use 1-200 letters, digits and _ . = + - starting "
            "with a letter or digit (build ids with part_id())"
        )
    return pid


def _check_name(kind: str, name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvariscopeError(
            f"invalid {kind} name {name!r}: use 1-100 letters, digits, _ and - starting "
            "with a letter or digit"
        )
    return name


def _check_rank(rank: Any, world_size: Any) -> tuple[int, int]:
    if isinstance(world_size, bool) or not isinstance(world_size, int | np.integer):
        raise InvariscopeError(f"world_size must be an int >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer):
        raise InvariscopeError(f"rank must be an int, got {rank!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise InvariscopeError(
            f"rank {rank} is not in [0, world_size={world_size}); check RANK and WORLD_SIZE"
        )
    return int(rank), int(world_size)


def shard(part_ids: Iterable[str], rank: int, world_size: int) -> list[str]:
    """The part ids rank ``rank`` of ``world_size`` handles: ``sorted(ids)[rank::world_size]``.

    Sorting first makes the shards independent of the order each process built its
    list in (a ``set`` iterates differently in every process), so the shards of all
    ranks are disjoint and cover the ids. Duplicate ids are refused.

    >>> shard(["c", "a", "b", "d"], 1, 2)
    ['b', 'd']
    """
    rank, world_size = _check_rank(rank, world_size)
    ids = [_check_part_id(p) for p in part_ids]
    unique = sorted(set(ids))
    if len(unique) != len(ids):
        dup = next(p for p in unique if ids.count(p) > 1)
        raise InvariscopeError(f"part id {dup!r} is listed twice; part ids must be unique")
    return unique[rank::world_size]


class RankInfo(NamedTuple):
    """``(rank, world_size)`` of this process."""

    rank: int
    world_size: int


def rank_from_env(environ: Mapping[str, str] | None = None) -> RankInfo:
    """Rank and world size from the ``torchrun`` environment, ``(0, 1)`` without it.

    ``RANK`` (falling back to ``LOCAL_RANK``) and ``WORLD_SIZE`` (falling back to
    ``LOCAL_WORLD_SIZE``) are read; a value that is not an integer is refused.
    """
    env = os.environ if environ is None else environ

    def read(*names: str, default: int) -> int:
        for name in names:
            if env.get(name, "") != "":
                try:
                    return int(env[name])
                except ValueError:
                    raise InvariscopeError(
                        f"environment variable {name}={env[name]!r} is not an integer; "
                        "fix or unset it"
                    ) from None
        return default

    rank = read("RANK", "LOCAL_RANK", default=0)
    world_size = read("WORLD_SIZE", "LOCAL_WORLD_SIZE", default=1)
    return RankInfo(*_check_rank(rank, world_size))


# ------------------------------------------------------------------- atomic files


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside ``path`` durable (no-op where unsupported)."""
    if os.name == "nt":  # pragma: no cover - directories cannot be opened on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None], rank: int) -> None:
    """Write ``path`` via a temporary file in its directory, fsync, ``os.replace``."""
    tmp = path.with_name(f".{path.name}.r{rank}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _atomic_json(path: Path, obj: Any, rank: int) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
    _atomic_write(path, lambda f: f.write(data), rank)


def _atomic_parquet(path: Path, table: pa.Table, rank: int) -> None:
    _atomic_write(path, lambda f: pq.write_table(table, f), rank)


def _sha256(path: Path) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvariscopeError(
            f"cannot read {path} ({type(exc).__name__}); it was not written by invariscope "
            "or was edited: fix it or start the run again with "
            + hint("overwrite=True", "--overwrite")
        ) from None


def _ours(run_dir: Path) -> bool:
    """True when ``run_dir/config.json`` was written by a :class:`RunStore`: a JSON object
    whose ``config_hash`` is the sha256 of its ``config`` (a file that merely has the name
    is not)."""
    try:
        stored = json.loads((run_dir / CONFIG).read_text(encoding="utf-8"))
        return (
            isinstance(stored, dict)
            and isinstance(stored.get("config"), dict)
            and stored.get("config_hash") == config_hash(stored["config"])
        )
    except (OSError, ValueError, InvariscopeError, RecursionError):
        return False


def _not_ours(
    run_dir: Path, why: str, fix: str = "it is left untouched: pick a new or empty directory"
) -> InvariscopeError:
    return InvariscopeError(f"'{run_dir}' is not an invariscope run directory ({why}); {fix}")


def _to_arrow(name: str, table: Any) -> pa.Table:
    if isinstance(table, pa.Table):
        return table
    if isinstance(table, pd.DataFrame):
        try:
            return pa.Table.from_pandas(table, preserve_index=False)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise InvariscopeError(
                f"table {name!r} cannot be stored as Parquet ({exc}); use plain column types"
            ) from None
    raise InvariscopeError(
        f"table {name!r} is a {type(table).__name__}; pass a pandas DataFrame or pyarrow Table"
    )


def _to_expression(filters: Any) -> pc.Expression | None:
    if filters is None or isinstance(filters, pc.Expression):
        return filters
    return pq.filters_to_expression(filters)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ------------------------------------------------------------------------- store


class RunStore:
    """A run directory: configuration, manifest, Parquet parts, aggregates, figures.

    Args:
        run_dir: the directory (created with its parents if missing). A directory that
            is not a run of ours -- files but no ``config.json``, or a ``config.json`` that
            a RunStore did not write -- is refused, with or without ``overwrite``, and left
            untouched (no lock file is taken in it).
        config: the resolved configuration, a JSON-able dict (see :func:`canonical_json`).
        overwrite: discard the results already in ``run_dir`` (any configuration) and
            start afresh: only what a run writes (config, manifest, meta, parts,
            aggregates, figures, temporary files) is removed; other files stay. Without
            it, the same configuration resumes and a different one is refused with an
            error naming the differing keys.
        rank, world_size: this process's place in a distributed job (:func:`rank_from_env`).
        timeout: seconds a rank other than 0 waits for rank 0 to write ``config.json``.
        lock: rank 0 takes an exclusive OS lock on the run directory (``.lock``, holding
            its PID) until :meth:`close`; another process that tries is refused with
            "in use by PID N". The engine locks every run it writes.

    Attributes:
        run_dir (Path): the run directory.
        rank (int): this process's rank; world_size (int): the number of ranks.
        read_only (bool): opened for reading only (:meth:`open`).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        config: Mapping[str, Any],
        *,
        overwrite: bool = False,
        rank: int = 0,
        world_size: int = 1,
        timeout: float = 600.0,
        lock: bool = False,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.rank, self.world_size = _check_rank(rank, world_size)
        self.read_only = False
        self._lock_fd: int | None = None
        self._canonical = canonical_json(config)
        self._hash = hashlib.sha256(self._canonical.encode("utf-8")).hexdigest()
        try:
            if self.rank == 0:
                self._start(overwrite, lock)
            else:
                self._wait_for_config(overwrite, timeout)
        except OSError as exc:
            self.close()
            raise InvariscopeError(
                f"cannot write the run directory '{self.run_dir}' ({type(exc).__name__}: "
                f"{exc.strerror or exc}); choose a directory you can write ("
                + hint("out=", "--out")
                + ")"
            ) from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run directory's lock (if this store holds it). Idempotent."""
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _acquire_lock(self) -> None:
        """Take the exclusive lock on ``run_dir/.lock`` or refuse, naming the holder's PID."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no flock (Windows): no lock
            return
        fd = os.open(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise InvariscopeError(
                f"run directory '{self.run_dir}' is in use by PID {holder}; wait for that "
                "run to finish, or write to another directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    @classmethod
    def open(cls, run_dir: str | os.PathLike[str]) -> RunStore:
        """Open an existing run directory read-only (for reports); writes are refused."""
        run_dir = Path(run_dir)
        if (run_dir / CONFIG).is_file() and not _ours(run_dir):
            raise _not_ours(
                run_dir,
                f"its {CONFIG} was not written by invariscope",
                "pass the directory an analysis wrote its results to",
            )
        if not (run_dir / CONFIG).is_file():
            raise InvariscopeError(
                f"'{run_dir}' is not an invariscope run directory (no {CONFIG}); "
                "pass the directory an analysis wrote its results to"
            )
        self = cls.__new__(cls)
        self.run_dir, self.rank, self.world_size, self.read_only = run_dir, 0, 1, True
        self._lock_fd = None
        self._canonical = canonical_json(self._stored_config()["config"])
        self._hash = hashlib.sha256(self._canonical.encode("utf-8")).hexdigest()
        return self

    def __repr__(self) -> str:
        mode = ", read_only" if self.read_only else ""
        return (
            f"RunStore('{self.run_dir}', hash={self._hash[:12]}, rank={self.rank}/"
            f"{self.world_size}{mode})"
        )

    # ---------------------------------------------------------------- start-up

    def _stored_config(self) -> dict[str, Any]:
        stored = _read_json(self.run_dir / CONFIG)
        if not isinstance(stored, dict) or not isinstance(stored.get("config"), dict):
            raise InvariscopeError(
                f"{self.run_dir / CONFIG} has no 'config' object; it was not written by "
                "invariscope: start the run again with " + hint("overwrite=True", "--overwrite")
            )
        return stored

    def _mismatch_error(self, old: Mapping[str, Any]) -> InvariscopeError:
        keys = _differing_keys(old, json.loads(self._canonical))
        shown = ", ".join(keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")
        return InvariscopeError(
            f"run directory '{self.run_dir}' holds a different configuration (differing keys: "
            f"{shown}); use another directory or pass "
            + hint("overwrite=True", "--overwrite")
            + " to discard its results"
        )

    def _start(self, overwrite: bool, lock: bool) -> None:
        """Rank 0: create, check, resume or clear the directory; write config + manifest.

        A directory is checked before anything is written into it (the lock file
        included): one that holds files but no ``config.json`` of ours is refused, with
        or without ``overwrite``, and left untouched.
        """
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise InvariscopeError(f"run directory '{self.run_dir}' is a file; pass a directory")
        if self.run_dir.is_dir():
            self._check_foreign()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if lock:
            self._acquire_lock()
            self._check_foreign()  # again under the lock
        manifest: dict[str, Any] = {}
        if (self.run_dir / CONFIG).is_file():
            stored = None if overwrite else self._stored_config()
            if stored is not None and config_hash(stored["config"]) != self._hash:
                raise self._mismatch_error(stored["config"])
            if overwrite:
                self._clear()
            else:
                manifest = self.manifest
        else:
            self._clear()  # leftovers of a run stopped before it wrote config.json
        self._cleanup(everything=self.world_size == 1)
        if manifest:
            self._repair(manifest)
        if not (self.run_dir / CONFIG).is_file():
            _atomic_json(
                self.run_dir / CONFIG,
                {"config": json.loads(self._canonical), "config_hash": self._hash},
                self.rank,
            )
        done = len(self.completed_parts())
        if manifest:
            logger.info("resuming run %s: %d parts done", self.run_dir, done)
        status = manifest.get("status", STATUS_RUNNING)
        self._write_manifest(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "config_hash": self._hash,
                "status": STATUS_COMPLETE if status == STATUS_COMPLETE else STATUS_RUNNING,
                "created": manifest.get("created", _now()),
                "started": _now(),
                "starts": int(manifest.get("starts", 0)) + 1,
                "world_size": self.world_size,
                "summary": manifest.get("summary"),
                "finished": manifest.get("finished"),
            }
        )

    def _check_foreign(self) -> None:
        """Refuse a directory that is not a run of ours: it has a ``config.json`` that a
        :class:`RunStore` did not write, or none and other files."""
        if (self.run_dir / CONFIG).exists():
            if not _ours(self.run_dir):
                raise _not_ours(self.run_dir, f"its {CONFIG} was not written by invariscope")
            return
        foreign = [
            e.name
            for e in os.scandir(self.run_dir)
            if e.name not in _OURS and not _leftover(e.name)
        ]
        if foreign:
            raise _not_ours(self.run_dir, f"no {CONFIG}, holds {sorted(foreign)[0]!r}")

    def _clear(self) -> None:
        """Discard what a run of ours wrote (config.json last), crash-safely.

        Only the store's own entries (manifest, meta, parts, aggregates, figures,
        temporary files) are removed; any other file in the directory stays. Entries are
        first renamed into a fresh trash folder (atomic), so a kill leaves either an entry
        whole or gone, never a done part without its tables.
        """
        trash = self.run_dir / f"{_TRASH_PREFIX}{uuid.uuid4().hex[:12]}"
        trash.mkdir()
        for entry in os.scandir(self.run_dir):
            if entry.name.startswith(_TRASH_PREFIX) or entry.name in (CONFIG, LOCK):
                continue
            if entry.name in _OURS or _TMP_RE.match(entry.name):
                os.rename(entry.path, trash / entry.name)
        _fsync_dir(self.run_dir)
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir / CONFIG).unlink()
        _fsync_dir(self.run_dir)
        for entry in os.scandir(self.run_dir):
            if entry.name.startswith(_TRASH_PREFIX):
                _remove(Path(entry.path))

    def _damaged_parts(self) -> list[str]:
        """Done parts whose files no longer match the checksums of their marker."""
        damaged = []
        for pid in self.completed_parts():
            folder = self.run_dir / PARTS / pid
            try:
                marker = json.loads((folder / DONE).read_text(encoding="utf-8"))
                sums = marker.get("sha256")
                ok = sums is None or all(_sha256(folder / f) == h for f, h in sums.items())
            except (OSError, ValueError, AttributeError):
                ok = False
            if not ok:
                damaged.append(pid)
        return damaged

    def _aggregate_damage(self, name: str, manifest: Mapping[str, Any]) -> str | None:
        """Why aggregate ``name`` cannot be trusted (missing, checksum, unreadable), or None."""
        path = self.run_dir / AGGREGATES / f"{name}.parquet"
        if not path.is_file():
            return "it is missing"
        expected = (manifest.get("aggregate_sha256") or {}).get(name)
        try:
            if expected is not None:
                return None if _sha256(path) == expected else "its checksum does not match"
            pq.read_metadata(path)
        except (OSError, pa.ArrowException) as exc:
            return f"it cannot be read: {type(exc).__name__}"
        return None

    def _damaged_aggregates(self, manifest: Mapping[str, Any]) -> list[str]:
        names = set(self.aggregates())
        if manifest.get("status") == STATUS_COMPLETE:
            names |= set(manifest.get("aggregates") or ())
        return sorted(n for n in names if self._aggregate_damage(n, manifest) is not None)

    def _repair(self, manifest: dict[str, Any]) -> None:
        """On resume: remove done parts and aggregates that fail their checksums (they are
        computed again). A complete run that lost anything (a damaged part or aggregate,
        or fewer done parts than it finished with) is marked running FIRST, so that a kill
        during the repair never leaves a "complete" run with a part missing."""
        parts = self._damaged_parts()
        aggregates = self._damaged_aggregates(manifest)
        count = manifest.get("num_parts")
        lost = isinstance(count, int) and len(self.completed_parts()) < count
        if manifest.get("status") == STATUS_COMPLETE and (parts or aggregates or lost):
            self._write_manifest({"status": STATUS_RUNNING, "finished": None})
            manifest["status"] = STATUS_RUNNING
        for pid in parts:
            trash = self.run_dir / f"{_TRASH_PREFIX}{uuid.uuid4().hex[:12]}"
            os.rename(self.run_dir / PARTS / pid, trash)  # atomic: the part is gone as a whole
            _remove(trash)
        for name in aggregates:
            _remove(self.run_dir / AGGREGATES / f"{name}.parquet")
        if parts:
            _fsync_dir(self.run_dir / PARTS)
            logger.warning(
                "run %s: %d done part(s) failed their checksum and will be computed again: %s",
                self.run_dir,
                len(parts),
                ", ".join(parts[:5]),
            )
        if aggregates:
            logger.warning(
                "run %s: aggregate(s) %s failed their checksum and will be recomputed from "
                "the parts",
                self.run_dir,
                ", ".join(aggregates),
            )

    def _cleanup(self, everything: bool) -> None:
        """Remove leftovers of killed writers.

        Always (rank 0): temporary files in the run directory and ``aggregates/``, trash.
        ``everything`` (single process, or finalize after all ranks are done): also the
        temporary files and tables of unfinished parts. In a running distributed job the
        owner of a part clears its leftovers in :meth:`write_part` instead.
        """
        for folder in (self.run_dir, self.run_dir / AGGREGATES):
            if folder.is_dir():
                for entry in os.scandir(folder):
                    if _TMP_RE.match(entry.name) or entry.name.startswith(_TRASH_PREFIX):
                        _remove(Path(entry.path))
        parts = self.run_dir / PARTS
        if everything and parts.is_dir():
            removed = 0
            for entry in os.scandir(parts):
                path = Path(entry.path)
                if _TMP_RE.match(entry.name):
                    _remove(path)
                elif entry.is_dir() and not (path / DONE).is_file():
                    _remove(path)
                    removed += 1
            if removed:
                logger.info("run %s: removed %d unfinished parts", self.run_dir, removed)

    def _wait_for_config(self, overwrite: bool, timeout: float) -> None:
        """Rank > 0: wait until rank 0 has written config.json with our hash."""
        deadline = time.monotonic() + timeout
        while True:
            path = self.run_dir / CONFIG
            if path.is_file():
                stored = self._stored_config()
                if config_hash(stored["config"]) == self._hash:
                    return
                if not overwrite:
                    raise self._mismatch_error(stored["config"])
            if time.monotonic() > deadline:
                raise InvariscopeError(
                    f"rank {self.rank} waited {timeout:g} s for rank 0 to write "
                    f"{path} with this configuration; start rank 0 or raise the timeout"
                )
            time.sleep(0.05)

    # --------------------------------------------------------------- properties

    @property
    def config(self) -> dict[str, Any]:
        """The resolved configuration as stored (a fresh copy)."""
        return json.loads(self._canonical)

    @property
    def config_hash(self) -> str:
        """sha256 hex digest of the canonical configuration."""
        return self._hash

    @property
    def manifest(self) -> dict[str, Any]:
        """Contents of ``manifest.json`` (empty before rank 0 has written it)."""
        path = self.run_dir / MANIFEST
        return _read_json(path) if path.is_file() else {}

    @property
    def status(self) -> str:
        """``"running"`` or ``"complete"``."""
        return self.manifest.get("status", STATUS_RUNNING)

    @property
    def is_complete(self) -> bool:
        """True once :meth:`finalize` has run (and nothing was written since)."""
        return self.status == STATUS_COMPLETE

    @property
    def summary(self) -> dict[str, Any] | None:
        """The summary passed to :meth:`finalize`, or None."""
        return self.manifest.get("summary")

    @property
    def meta(self) -> dict[str, Any]:
        """Contents of ``meta.json`` (free-form; empty if never written)."""
        path = self.run_dir / META
        return _read_json(path) if path.is_file() else {}

    # ------------------------------------------------------------------- writes

    def _require_writer(self, what: str, rank0: bool = False) -> None:
        if self.read_only:
            raise InvariscopeError(
                f"cannot {what}: run '{self.run_dir}' was opened read-only; "
                "use RunStore(run_dir, config) to write"
            )
        if rank0 and self.rank != 0:
            raise InvariscopeError(
                f"rank {self.rank} cannot {what}; only rank 0 does (guard with `if run.rank == 0`)"
            )

    def _write_manifest(self, updates: Mapping[str, Any]) -> None:
        manifest = {**self.manifest, **updates, "updated": _now()}
        _atomic_json(self.run_dir / MANIFEST, manifest, self.rank)

    def _reopen(self, what: str) -> None:
        """A write to a complete run makes it running again (rank 0 only)."""
        if self.is_complete:
            self._require_writer(f"{what} in the complete run '{self.run_dir}'", rank0=True)
            self._write_manifest({"status": STATUS_RUNNING, "finished": None})

    def update_meta(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Merge ``values`` into ``meta.json`` (rank 0; atomic) and return the result."""
        self._require_writer("write meta.json", rank0=True)
        meta = {**self.meta, **_jsonable(dict(values), "meta")}
        _atomic_json(self.run_dir / META, meta, self.rank)
        return meta

    def write_part(
        self,
        part_id: str,
        tables: Mapping[str, pd.DataFrame | pa.Table],
        blobs: Mapping[str, bytes] | None = None,
        stage: int | None = None,
    ) -> None:
        """Write the tables (and binary blobs) of one part, then its done marker.

        Args:
            part_id: the part (see :func:`part_id`); it must not be done already.
            tables: ``{table_name: DataFrame}``; may be empty (the part produced
                nothing but counts as done). Tables of different parts with the same
                name are concatenated by :meth:`read_table`.
            blobs: ``{name: bytes}`` stored as ``<name>.bin`` in the part (fitted maps,
                trained weights), read back with :meth:`read_blob`.
            stage: the engine stage the part belongs to, recorded in the marker (parts are
                dealt out to ranks stage by stage).
        """
        self._require_writer("write a part")
        pid = _check_part_id(part_id)
        arrow = {_check_name("table", n): _to_arrow(n, t) for n, t in tables.items()}
        blobs = {_check_name("blob", n): bytes(b) for n, b in (blobs or {}).items()}
        if self.is_done(pid):
            raise InvariscopeError(
                f"part {pid!r} of run '{self.run_dir}' is already done; "
                + hint(
                    "skip done parts with run.pending(ids) or pass overwrite=True to start afresh",
                    "another process wrote it: run one command per run directory, or pass "
                    "--overwrite to start afresh",
                )
            )
        self._reopen("write part " + pid)
        folder = self.run_dir / PARTS / pid
        if folder.exists():  # leftovers of an interrupted attempt
            _remove(folder)
        folder.mkdir(parents=True)
        _fsync_dir(folder.parent)
        for name, table in arrow.items():
            _atomic_parquet(folder / f"{name}.parquet", table, self.rank)
        for name, data in blobs.items():
            _atomic_write(folder / f"{name}.bin", lambda f, d=data: f.write(d), self.rank)
        files = [f"{n}.parquet" for n in arrow] + [f"{n}.bin" for n in blobs]
        marker = {
            "part_id": pid,
            "tables": {name: table.num_rows for name, table in arrow.items()},
            "blobs": {name: len(data) for name, data in blobs.items()},
            "sha256": {f: _sha256(folder / f) for f in files},
            "rank": self.rank,
            "finished": _now(),
        }
        if stage is not None:
            marker["stage"] = int(stage)
        _atomic_json(folder / DONE, marker, self.rank)

    def write_aggregate(self, name: str, table: pd.DataFrame | pa.Table) -> None:
        """Write ``aggregates/<name>.parquet`` atomically (rank 0)."""
        self._require_writer("write an aggregate", rank0=True)
        arrow = _to_arrow(_check_name("aggregate", name), table)
        self._reopen("write aggregate " + name)
        folder = self.run_dir / AGGREGATES
        folder.mkdir(exist_ok=True)
        _atomic_parquet(folder / f"{name}.parquet", arrow, self.rank)
        sums = dict(self.manifest.get("aggregate_sha256") or {})
        sums[name] = _sha256(folder / f"{name}.parquet")
        self._write_manifest({"aggregate_sha256": sums})

    def finalize(
        self,
        summary: Mapping[str, Any] | None = None,
        *,
        aggregates: Mapping[str, pd.DataFrame | pa.Table] | None = None,
        expected_parts: Iterable[str] | None = None,
    ) -> None:
        """Write ``aggregates``, remove leftovers, then mark the run complete (rank 0).

        Call it after every rank has finished (a barrier). ``expected_parts``, when
        given, must all be done, or the run is refused completion. ``summary`` (JSON-able)
        is stored in the manifest.
        """
        self._require_writer("finalize the run", rank0=True)
        if expected_parts is not None:
            expected = list(expected_parts)
            missing = self.pending(expected)
            if missing:
                raise InvariscopeError(
                    f"cannot finalize run '{self.run_dir}': {len(missing)} of {len(expected)} "
                    f"parts are not done (first: {missing[0]}); run the analysis again to resume"
                )
        summary = None if summary is None else _jsonable(dict(summary), "summary")
        for name, table in (aggregates or {}).items():
            self.write_aggregate(name, table)
        self._cleanup(everything=True)
        self._write_manifest(
            {
                "status": STATUS_COMPLETE,
                "finished": _now(),
                "summary": summary,
                "num_parts": len(self.completed_parts()),
                "tables": self.tables(),
                "aggregates": self.aggregates(),
            }
        )

    # -------------------------------------------------------------------- reads

    def is_done(self, part_id: str) -> bool:
        """True when the part's done marker exists (all its tables are written)."""
        return (self.run_dir / PARTS / _check_part_id(part_id) / DONE).is_file()

    def completed_parts(self) -> list[str]:
        """Ids of the done parts, sorted."""
        folder = self.run_dir / PARTS
        if not folder.is_dir():
            return []
        return sorted(
            e.name
            for e in os.scandir(folder)
            if _PART_RE.match(e.name) and os.path.isfile(os.path.join(e.path, DONE))
        )

    def pending(self, part_ids: Iterable[str]) -> list[str]:
        """The ids of ``part_ids`` that are not done, in the given order."""
        done = set(self.completed_parts())
        return [p for p in map(_check_part_id, part_ids) if p not in done]

    def shard(self, part_ids: Iterable[str]) -> list[str]:
        """This rank's share of ``part_ids``: ``shard(part_ids, self.rank, self.world_size)``."""
        return shard(part_ids, self.rank, self.world_size)

    def _markers(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for pid in self.completed_parts():
            yield pid, _read_json(self.run_dir / PARTS / pid / DONE)

    def tables(self) -> list[str]:
        """Sorted names of the tables that some done part holds."""
        return sorted({name for _, marker in self._markers() for name in marker["tables"]})

    def aggregates(self) -> list[str]:
        """Sorted names of the aggregate tables."""
        folder = self.run_dir / AGGREGATES
        if not folder.is_dir():
            return []
        return sorted(p.stem for p in folder.glob("*.parquet") if _NAME_RE.match(p.stem))

    def _table_files(self, name: str) -> list[tuple[str, Path]]:
        _check_name("table", name)
        markers = list(self._markers())
        files = [
            (pid, self.run_dir / PARTS / pid / f"{name}.parquet")
            for pid, marker in markers
            if name in marker["tables"]
        ]
        if not files:
            known = sorted({n for _, marker in markers for n in marker["tables"]})
            if known:
                raise unknown_name(f"table in run '{self.run_dir}'", name, known)
            raise InvariscopeError(
                f"run '{self.run_dir}' has no finished part with table {name!r} yet; "
                "run the analysis first"
            )
        return files

    def read_table(
        self,
        name: str,
        columns: Sequence[str] | None = None,
        filters: Any = None,
    ) -> pd.DataFrame:
        """Concatenate table ``name`` over the done parts, in sorted part-id order.

        Args:
            name: the table name used in :meth:`write_part`.
            columns: the columns to read (all when None).
            filters: a ``pyarrow.compute`` expression (``pc.field("k") > 2``) or
                pyarrow's list-of-tuples form (``[("k", ">", 2)]``), applied while reading.

        Returns:
            DataFrame with a ``RangeIndex``. Column types that differ between parts (a
            column that was all-null in one part) are promoted to a common type.
        """
        paths = [str(p) for _, p in self._table_files(name)]
        schema = pa.unify_schemas([pq.read_schema(p) for p in paths], promote_options="permissive")
        for column in columns or ():
            if column not in schema.names:
                raise unknown_name(f"column of table {name!r}", column, schema.names)
        dataset = pads.dataset(paths, schema=schema, format="parquet")
        table = dataset.to_table(
            columns=list(columns) if columns is not None else None,
            filter=_to_expression(filters),
        )
        return table.to_pandas()

    def iter_table(
        self,
        name: str,
        columns: Sequence[str] | None = None,
        filters: Any = None,
    ) -> Iterator[tuple[str, pd.DataFrame]]:
        """Yield ``(part_id, DataFrame)`` for each done part holding ``name``, in part order.

        Memory is bounded by one part; arguments as in :meth:`read_table`.
        """
        expression = _to_expression(filters)
        for pid, path in self._table_files(name):
            table = pq.read_table(
                path,
                columns=list(columns) if columns is not None else None,
                filters=expression,
            )
            yield pid, table.to_pandas()

    def read_blob(self, part_id: str, name: str) -> bytes:
        """The blob ``name`` that done part ``part_id`` stored (see :meth:`write_part`)."""
        pid = _check_part_id(part_id)
        if not self.is_done(pid):
            raise InvariscopeError(
                f"part {pid!r} of run '{self.run_dir}' is not done; run the analysis first"
            )
        path = self.run_dir / PARTS / pid / f"{_check_name('blob', name)}.bin"
        if not path.is_file():
            marker = _read_json(self.run_dir / PARTS / pid / DONE)
            raise unknown_name(f"blob of part {pid!r}", name, marker.get("blobs", {}))
        return path.read_bytes()

    def read_aggregate(self, name: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Read ``aggregates/<name>.parquet``."""
        path = self.run_dir / AGGREGATES / f"{_check_name('aggregate', name)}.parquet"
        if not path.is_file():
            raise unknown_name(f"aggregate in run '{self.run_dir}'", name, self.aggregates())
        why = self._aggregate_damage(name, self.manifest)
        if why is not None:
            raise InvariscopeError(
                f"aggregate '{name}' of run '{self.run_dir}' is damaged ({why}); run the same "
                "command again: it recomputes the aggregates from the stored parts"
            )
        return pq.read_table(
            path, columns=list(columns) if columns is not None else None
        ).to_pandas()

    def path(self, *names: str) -> Path:
        """A path inside the run directory for other outputs, e.g. ``run.path("figures")``.

        The folders named are created: all of ``names`` when the last has no suffix
        (``"figures"``), all but the last otherwise (``"figures", "accuracy.png"``).
        The store's own files (config.json, manifest.json, meta.json, parts,
        aggregates) cannot be named.
        """
        if not names:
            return self.run_dir
        rel = Path(*names)
        if rel.is_absolute() or ".." in rel.parts or rel.parts[0] in _RESERVED:
            raise InvariscopeError(
                f"run.path{names!r} must be a relative path inside the run directory that "
                f"does not name {sorted(_RESERVED)}"
            )
        path = self.run_dir / rel
        folder = path if not rel.suffix else path.parent
        for parent in (*reversed(folder.relative_to(self.run_dir).parents), folder):
            where = self.run_dir / parent
            if where.exists() and not where.is_dir():
                raise InvariscopeError(
                    f"'{where}' is a file, not a folder; move it away so that the run can "
                    "write its outputs there"
                )
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvariscopeError(
                f"cannot create '{folder}' ({type(exc).__name__}: {exc.strerror or exc}); "
                "choose a folder you can write"
            ) from None
        return path
