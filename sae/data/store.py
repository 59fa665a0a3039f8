"""The activation cache: safetensors shards plus a JSON manifest, written atomically and read back three ways.

Layout (format 1)::

    cache/manifest.json            what made the cache (model, hooks {name: d}, dtype, context_size, dataset, ...),
                                   shards [{file, contexts, rows, sha256, xxh3_64}], complete: bool
                                   (xxh3_64 only in caches harvested since it was added: see CHECKSUMS)
    cache/shard_00000.safetensors  one [rows, d] tensor per hook; tokens, seq, pos [rows] (int32);
                                   context_tokens [contexts, context_size] (int32)

Every shard holds the same number of whole contexts (`contexts_per_shard`), so shard i covers contexts
[i·C, (i+1)·C) and a row's place follows from its (seq, pos) alone. A shard enters the manifest only after it is
fully written and renamed into place; a restarted harvest continues after the listed shards, so a kill at any
moment loses at most the shard being written and never duplicates one.

The held-out split is by whole context, from a hash of the context index, so it needs no extra file, is the same
for every reader, and exists even in a one-shard cache.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import xxhash
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_bytes
from torch import Tensor

from sae.config import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
META_KEYS = ("tokens", "seq", "pos", "context_tokens")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class CacheError(UserError):
    """A cache that cannot be read or extended; the message names the file and what to do."""


#: What to do about a missing or corrupt shard (harvest.py's `repair` does it).
REPAIR_HINT = ("run `sae harvest` again with the cache's config plus repair=true to re-harvest exactly the missing "
               "or corrupt shards")


def write_synced(path: Path, data: bytes) -> None:
    """Write and fsync: the bytes are on disk before any rename makes them visible."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """fsync a directory: a rename inside it survives a power cut only once the directory itself is synced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskFullError(UserError):
    """ENOSPC while writing: nothing half-written is kept, and the same command resumes once there is space."""


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC, as an OSError or as safetensors' own error: its writer raises SafetensorError("Error while serializing:
    I/O error: No space left on device (os error 28)"), which is no OSError."""
    if isinstance(err, OSError):
        return err.errno == errno.ENOSPC
    return isinstance(err, SafetensorError) and f"(os error {errno.ENOSPC})" in str(err)


@contextmanager
def disk_full_reported(folder: Path, then: str = "run the same command again to continue") -> Iterator[None]:
    """Turn ENOSPC into one line naming the folder (an OSError traceback says neither where nor what to do)."""
    try:
        yield
    except (OSError, SafetensorError) as err:
        if not is_disk_full(err):
            raise
        raise DiskFullError(f"no space left on device while writing in {folder}; free some space there (or use "
                            f"another folder), then {then}") from None


LOCK_FILE = ".sae.lock"
"""In every folder a command writes, while it writes: who holds it (the lock itself is the kernel's flock)."""


@contextmanager
def folder_lock(folder: str | Path, what: str) -> Iterator[Path]:
    """Hold an exclusive advisory lock on `folder` while `what` (e.g. "sae train") writes it. A second writer started
    meanwhile stops at once with one line naming the holder, instead of mixing two runs' files in one folder (two
    harvests with different settings both reported success; a second `sae train` crashed after the first removed its
    temp checkpoint as stale). The kernel drops the lock when its process ends however it ends (kill -9 too), so a
    stale lock file never blocks; its text only names the holder. The file is removed on the way out, and so is a
    folder made here and left empty (a command that refused early leaves nothing behind)."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            raise UserError(f"{folder} is not writable (read-only, or no permission), and `{what}` writes there; "
                            "copy it somewhere writable") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = path.read_text(errors="replace").strip() or "another process"
            raise UserError(f"{folder} is in use by {holder}; wait for it to finish, or use another folder") from None
        if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break  # the file still at `path` is the one locked (not one a finishing holder just removed)
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{what} (pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')})"
                 .encode())
        yield folder
    finally:
        path.unlink(missing_ok=True)  # while still locked: one waiting on this file finds it gone and starts over
        if created:
            try:
                folder.rmdir()  # only if empty: a command that refused early leaves no folder behind
            except OSError:
                pass
        os.close(fd)


def human_bytes(n: float) -> str:
    """A size for a message: GiB from one GiB up, MiB below."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def existing_ancestor(path: Path) -> Path:
    """`path` itself if it exists, else the nearest folder above it that does (what a write there would meet)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_folder(path: str | Path, key: str = "out") -> Path:
    """Refuse, before any work starts, an output folder that cannot be written: a file at its path or above it, or a
    read-only place (a read-only mount refuses even root). One line naming the setting, instead of an OSError
    traceback once the work is done."""
    path = Path(path)
    probe = existing_ancestor(path)
    if not probe.is_dir():
        raise UserError(f"{key}={path}: {probe} is a file, not a folder; name a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{key}={path}: {probe} is not writable (read-only, or no permission); choose another folder")
    return path


def check_report_is_ours(out: Path, report: str, keys: set[str], command: str, beside: Iterable[Path] = ()) -> None:
    """Refuse, before any work, an out folder whose `report` (a JSON file) `command` did not write, as it would be
    replaced: ours parses with our top-level `keys`. Files `beside` it (plots) go with it: theirs if it is."""
    path = out / report
    try:
        ours = path.is_file() and keys <= set(json.loads(path.read_text()))
    except (ValueError, TypeError, OSError):
        ours = False
    theirs = [name for name in [report] * path.exists() + sorted(p.name for p in beside if p.exists()) if not ours]
    if theirs:
        raise UserError(f"out={out} already holds {', '.join(theirs)} that `{command}` did not write; use a new or "
                        "empty folder (out=...), nothing was changed")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, then rename: readers see the old file or the new, never half.
    A failed write removes its temp file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with disk_full_reported(path.parent):
        try:
            write_synced(tmp, data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)


_LIBC = ctypes.CDLL(None, use_errno=True)
"""The C library's calls Python has no wrapper for (renameat2, madvise), each looked up where it is used."""


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system lacks it."""
    renameat2 = getattr(_LIBC, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS):  # a kernel or filesystem without the flag
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_folder(new: Path, path: Path) -> None:
    """Put folder `new` at `path` in one rename, swapping out an old folder there (then deleting it)."""
    if not path.exists():
        os.rename(new, path)
    elif _exchange(new, path):
        shutil.rmtree(new)  # now the old folder
    else:  # no atomic swap here: move the old folder aside first; a crash in between leaves it beside `path`
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        os.rename(path, old)
        os.rename(new, path)
        shutil.rmtree(old)
    fsync_dir(path.parent)


def remove_stale_temps(folder: Path, name: str) -> None:
    """Delete the `.<name>.tmp<pid>` / `.<name>.old<pid>` files and folders (`name` a regular expression) that a
    process killed mid-write leaves; nothing ever reads them, and they would fill the disk over many restarts. Only
    those exact names: a user's `.env.old` or `.draft.tmpl` beside them is not ours (a harvest into a project folder
    deleted them)."""
    ours = re.compile(rf"\.(?:{name})\.(?:tmp|old)\d+")
    for stale in folder.glob(".*"):
        if ours.fullmatch(stale.name):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """A temp folder beside `path` to fill; when the block ends its files are fsynced and it replaces `path` in one
    rename, so the folder appears whole or not at all. On an error the temp folder is removed and `path` is kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, re.escape(path.name))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.mkdir()
    try:
        with disk_full_reported(path.parent):
            yield tmp
            for file in tmp.iterdir():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
            fsync_dir(tmp)
            _replace_folder(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class NonFiniteError(UserError):
    """NaN or inf where a number is needed: in cached activations, or in a value about to be written as JSON."""


def to_json(obj: Any, path: Path, **kw: Any) -> str:
    """Strict JSON: bare NaN/Infinity, which Python would write by default, breaks every other JSON parser."""
    try:
        return json.dumps(obj, allow_nan=False, **kw)
    except ValueError as err:
        raise NonFiniteError(f"refusing to write {path}: a value is NaN or infinite ({err}); nothing was written") from None


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, to_json(obj, path, indent=1).encode())


_EXPONENT_BITS = {torch.float16: (torch.int16, 0x7C00), torch.bfloat16: (torch.int16, 0x7F80),
                  torch.float32: (torch.int32, 0x7F800000)}
"""Per float dtype, an integer view and its exponent field: a value is NaN or ±inf exactly when the field is all ones."""


def all_finite(t: Tensor) -> bool:
    """Whether a tensor holds no NaN/inf, for every batch the trainer reads. On the CPU by the exponent bits in numpy,
    one thread: ``torch.isfinite(t).all()`` on a float16 4096 × 576 batch took 59 ms with 2 threads on a loaded 2-core
    machine (each call waits a scheduler slice for its second thread; 0.07M rows/s, below the reader's 1.2M), the bit
    test 0.5 ms."""
    if t.device.type != "cpu" or t.dtype not in _EXPONENT_BITS or not t.is_contiguous():
        return bool(torch.isfinite(t).all())
    view, field = _EXPONENT_BITS[t.dtype]
    bits = t.view(view).numpy()
    return not ((bits & field) == field).any()


def check_finite(x: Tensor, what: str) -> None:
    """Stop at NaN/inf activations, saying where: one such row turns every mean, sort and histogram into NaN."""
    bad = ~torch.isfinite(x).all(dim=-1)
    if bad.any():
        raise NonFiniteError(f"{int(bad.sum())} of {len(x)} rows of {what} hold NaN/inf values; the cache is corrupt "
                             "or the model overflowed its storage dtype (harvest again, with dtype=float32 if so)")


SPLITS = ("train", "eval", "all")


def split_mask(seq: Tensor, fraction: float, split: str) -> Tensor:
    """Rows of `split` among rows from contexts `seq`: "eval" = held out, "train" = the rest, "all" = every row."""
    if split not in SPLITS:
        raise CacheError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    held = is_holdout(seq, fraction)
    return held if split == "eval" else ~held if split == "train" else torch.ones_like(held)


def is_holdout(seq: Tensor, fraction: float) -> Tensor:
    """Held-out mask for context indices: a multiplicative hash, so the split is spread evenly through the data."""
    if fraction <= 0:
        return torch.zeros_like(seq, dtype=torch.bool)
    hashed = (seq.long() * 2654435761) % (2**32)
    return hashed < int(fraction * 2**32)


@dataclass
class Rows:
    """A run of cached tokens in cache order."""

    acts: dict[str, Tensor]
    """hook name → float32 [n, d] activations."""
    tokens: Tensor
    """int64 [n] token id at each row."""
    seq: Tensor
    """int64 [n] index of the context each row comes from."""
    pos: Tensor
    """int64 [n] position of the row within its context."""


#: Manifest keys every reader relies on, with their JSON types (the others are provenance, read with .get).
MANIFEST_TYPES: dict[str, type | tuple[type, ...]] = {
    "model": str, "hooks": dict, "dtype": str, "context_size": int, "exclude_first": (int, bool),
    "eval_fraction": (int, float), "contexts_per_shard": int, "shards": list, "complete": bool,
}
SHARD_TYPES: dict[str, type] = {"file": str, "contexts": int, "rows": int, "sha256": str}


def _type_problem(obj: dict[str, Any], types: dict[str, Any], where: str) -> str | None:
    for key, tp in types.items():
        if key not in obj:
            return f"{where}key {key!r} is missing"
        value = obj[key]
        if not isinstance(value, tp) or (isinstance(value, bool) and tp in (int, (int, float))):
            names = " or ".join(t.__name__ for t in (tp if isinstance(tp, tuple) else (tp,)))
            return f"{where}{key!r} should be {names}, not {value!r}"
    return None


def manifest_problem(m: dict[str, Any]) -> str | None:
    """What in a manifest would crash a reader later (a missing key, a wrong type, a value out of range), or None."""
    problem = _type_problem(m, MANIFEST_TYPES, "")
    if problem:
        return problem
    bad_hooks = {h: d for h, d in m["hooks"].items() if not isinstance(d, int) or isinstance(d, bool) or d <= 0}
    checks = [
        (not m["hooks"] or bad_hooks, f"'hooks' should map hook names to widths > 0, not {m['hooks']!r}"),
        (m["dtype"] not in DTYPES, f"'dtype' {m['dtype']!r} is not one of {', '.join(DTYPES)}"),
        (not 0 <= int(m["exclude_first"]) < m["context_size"], f"'exclude_first' {m['exclude_first']!r} should be "
                                                                f"between 0 and context_size - 1 = {m['context_size'] - 1}"),
        (not 0 <= m["eval_fraction"] < 1, f"'eval_fraction' {m['eval_fraction']!r} should be in [0, 1)"),
        (m["contexts_per_shard"] < 1, f"'contexts_per_shard' {m['contexts_per_shard']!r} should be ≥ 1"),
    ]
    shards = [f"shards[{i}] should be an object, not {shard!r}" if not isinstance(shard, dict)
              else _type_problem(shard, SHARD_TYPES, f"shards[{i}]: ")
              or (f"shards[{i}] is {shard['file']!r}, not shard_{i:05d}.safetensors (an entry was removed: shard i "
                  "holds contexts from i × contexts_per_shard on)" if shard["file"] != f"shard_{i:05d}.safetensors" else None)
              for i, shard in enumerate(m["shards"])]
    return next((msg for bad, msg in checks if bad), None) or next(filter(None, shards), None)


def width_problem(path: Path, m: dict[str, Any]) -> str | None:
    """The manifest's width of each hook against the first shard's tensors (a header read: no data is loaded).
    An unreadable shard is left to `load_shard`, whose message says how to repair it."""
    if not m["shards"]:
        return None
    file = m["shards"][0]["file"]
    try:
        with safe_open(str(path / file), framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except (SafetensorError, OSError):
        return None
    for hook, d in m["hooks"].items():
        if hook not in shapes:
            return f"hook {hook!r} is listed but {file} holds no such tensor"
        if shapes[hook][1:] != [d]:
            return f"hooks[{hook!r}] says d_model {d} but {file} holds {hook} of shape {shapes[hook]}"
    return None


class ActivationStore:
    """Read side of a cache: metadata, shard access with checksums, and the readers built on them."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        file = self.path / MANIFEST
        if not file.is_file():
            raise CacheError(f"no activation cache at {str(self.path)!r} (missing {MANIFEST}); run `sae harvest` first")
        try:
            self.manifest: dict[str, Any] = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise CacheError(f"{file} is corrupt ({err}); delete the cache folder and harvest again") from err
        if not isinstance(self.manifest, dict):
            raise CacheError(f"{file} is damaged: it holds no JSON object; harvest again into a fresh folder")
        if self.manifest.get("format") != FORMAT_VERSION:
            raise CacheError(f"{file} has format {self.manifest.get('format')!r}; this sae reads format {FORMAT_VERSION}")
        problem = manifest_problem(self.manifest) or width_problem(self.path, self.manifest)
        if problem:
            raise CacheError(f"{file} is damaged: {problem}; restore it or harvest again into a fresh folder")
        self._verified: set[int] = set()
        self._lock = threading.Lock()
        self._shard_locks: dict[int, threading.Lock] = {}

    # ----------------------------------------------------------------------------------------- metadata
    @property
    def hooks(self) -> dict[str, int]:
        return dict(self.manifest["hooks"])

    @property
    def model_name(self) -> str:
        return self.manifest["model"]

    @property
    def context_size(self) -> int:
        return self.manifest["context_size"]

    @property
    def exclude_first(self) -> bool:
        """Whether leading positions were dropped (see `first_pos` for how many)."""
        return bool(self.manifest["exclude_first"])

    @property
    def prepend_bos(self) -> bool:
        return bool(self.manifest.get("prepend_bos"))

    @property
    def bos_token_id(self) -> int | None:
        """The BOS token every context starts with; None when contexts were not given one."""
        return self.manifest.get("bos_token_id") if self.prepend_bos else None

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.manifest["dtype"]]

    @property
    def first_pos(self) -> int:
        """First stored position of every context: rows before it were not harvested."""
        return int(self.manifest["exclude_first"])

    @property
    def rows_per_context(self) -> int:
        return self.context_size - self.first_pos

    @property
    def contexts_per_shard(self) -> int:
        return self.manifest["contexts_per_shard"]

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    @property
    def eval_fraction(self) -> float:
        return self.manifest["eval_fraction"]

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def n_contexts(self) -> int:
        return sum(s["contexts"] for s in self.shards)

    @property
    def n_rows(self) -> int:
        return self.n_contexts * self.rows_per_context

    def shard_seqs(self, i: int) -> Tensor:
        start = i * self.contexts_per_shard
        return torch.arange(start, start + self.shards[i]["contexts"])

    def _split_rows(self, i: int, split: str) -> int:
        return int(split_mask(self.shard_seqs(i), self.eval_fraction, split).sum()) * self.rows_per_context

    def _split_row_index(self, i: int, split: str) -> Tensor:
        """Indices of shard i's rows of one split, in file order, from the manifest alone (no file read)."""
        contexts = split_mask(self.shard_seqs(i), self.eval_fraction, split)
        return contexts.repeat_interleave(self.rows_per_context).nonzero().squeeze(1)

    @property
    def n_train_rows(self) -> int:
        return sum(self._split_rows(i, "train") for i in range(len(self.shards)))

    @property
    def n_eval_rows(self) -> int:
        return sum(self._split_rows(i, "eval") for i in range(len(self.shards)))

    def check_hooks(self, hooks: list[str]) -> None:
        missing = [h for h in hooks if h not in self.hooks]
        if missing:
            raise CacheError(f"hook(s) {missing} are not in the cache at {self.path}; it holds {list(self.hooks)}")

    def require_complete(self) -> None:
        if not self.complete:
            raise CacheError(
                f"the cache at {self.path} is incomplete (harvest interrupted?); "
                "run `sae harvest` again with the same config to finish it"
            )
        if not self.shards:
            raise CacheError(f"the cache at {self.path} holds no shards")

    # ----------------------------------------------------------------------------------------- shards
    def shard_file(self, i: int) -> Path:
        """Shard i's file, which must exist: a listed shard that is gone means the cache was tampered with."""
        file = self.path / self.shards[i]["file"]
        if not file.is_file():
            raise CacheError(f"shard {file} listed in the manifest is missing; {REPAIR_HINT}")
        return file

    def verify_shard(self, i: int) -> Path:
        """Check shard i against its manifest checksums once per store, and return its file.

        Each shard has its own lock so that several threads can hash different shards at once (hashlib and xxhash
        release the GIL), while two asking for the same shard hash it only once.
        """
        file = self.shard_file(i)
        with self._lock:
            lock = self._shard_locks.setdefault(i, threading.Lock())
        with lock:
            if i not in self._verified:
                if not any(_file_digest(file, name) == digest for name, digest in _checksums(self.shards[i])):
                    raise self._corrupt(file)
                self._mark_verified(i)
        return file

    def _corrupt(self, file: Path) -> CacheError:
        return CacheError(f"shard {file} is corrupt (checksum mismatch); {REPAIR_HINT}")

    def _mark_verified(self, i: int) -> None:
        with self._lock:
            self._verified.add(i)

    def read_shard_into(self, i: int, dests: dict[str, Tensor]) -> None:
        """Fill `dests` (key → contiguous tensor of its shape) with shard i's tensors. A shard not yet verified by this
        store is checked by the same read: every byte of the file is hashed as it arrives (see `_read_tensors`), so
        verifying costs the hash alone, not a second pass over the file, and what was verified is what is served.
        A file that fails the fast checksum is read again under sha256 (see CHECKSUMS) before it is called corrupt."""
        file = self.shard_file(i)
        checks = [] if i in self._verified else _checksums(self.shards[i])
        try:
            if not checks:
                return _read_tensors(file, dests)
            for name, digest in checks:
                hasher = CHECKSUMS[name]()
                _read_tensors(file, dests, hasher)
                if hasher.hexdigest() == digest:
                    return self._mark_verified(i)
        except (OSError, EOFError, ValueError, KeyError, struct.error) as err:
            if checks:
                self.verify_shard(i)  # a damaged file is reported as corrupt, as on every other path
            raise CacheError(f"shard {file} cannot be read ({err}); {REPAIR_HINT}") from err
        raise self._corrupt(file)

    def load_shard(self, i: int, keys: list[str]) -> dict[str, Tensor]:
        """Tensors `keys` of shard i (memory-mapped), the file checked against its manifest checksum on first use."""
        file = self.verify_shard(i)
        try:
            with safe_open(str(file), framework="pt") as f:
                return {k: f.get_tensor(k) for k in keys}
        except (SafetensorError, OSError) as err:
            raise CacheError(f"shard {file} cannot be read ({err}); {REPAIR_HINT}") from err

    def _rows(self, i: int, hooks: list[str], split: str) -> tuple[dict[str, Tensor], Tensor]:
        """Shard i's rows of one split (storage dtype) and the boolean row mask that selected them."""
        data = self.load_shard(i, [*hooks, "seq"])
        mask = split_mask(data["seq"], self.eval_fraction, split)
        return {h: data[h][mask] for h in hooks}, mask

    # ----------------------------------------------------------------------------------------- readers
    def shuffled(self, hooks: list[str], batch_size: int, *, seed: int = 0, position: int = 0, shuffle_rows: int = 2**18,
                 rank: int = 0, world_size: int = 1) -> "ShuffledReader":
        """Infinite shuffled training batches (this rank's slice of each global batch); see `ShuffledReader`."""
        return ShuffledReader(self, hooks, batch_size, seed=seed, position=position, shuffle_rows=shuffle_rows,
                              rank=rank, world_size=world_size)

    def iter_ordered(self, hooks: list[str], split: str = "all", batch_rows: int = 8192) -> Iterator[Rows]:
        """Activations with their token ids and places, in cache order: what feature analysis streams over."""
        self.require_complete()  # as for training: an interrupted harvest is finished first, not analysed half-made
        self.check_hooks(hooks)
        for i in range(len(self.shards)):
            data = self.load_shard(i, [*hooks, *META_KEYS[:3]])
            idx = split_mask(data["seq"], self.eval_fraction, split).nonzero().squeeze(1)
            for start in range(0, len(idx), batch_rows):
                sel = idx[start : start + batch_rows]
                yield Rows(
                    acts={h: data[h][sel].float() for h in hooks},
                    tokens=data["tokens"][sel].long(),
                    seq=data["seq"][sel].long(),
                    pos=data["pos"][sel].long(),
                )

    def holdout(self, hooks: list[str], max_rows: int) -> dict[str, Tensor]:
        """Up to `max_rows` held-out rows per hook (float32), in cache order."""
        self.require_complete()
        self.check_hooks(hooks)
        parts: dict[str, list[Tensor]] = {h: [] for h in hooks}
        n = 0
        for i in range(len(self.shards)):
            if n >= max_rows:
                break
            if not self._split_rows(i, "eval"):
                continue
            rows, _ = self._rows(i, hooks, "eval")
            for h in hooks:
                parts[h].append(rows[h][: max_rows - n].float())
            n += len(parts[hooks[0]][-1])
        if n == 0:
            raise CacheError(f"the cache at {self.path} has no held-out rows; harvest more tokens or raise eval_fraction")
        return {h: torch.cat(p) for h, p in parts.items()}

    def sample(self, hooks: list[str], n_rows: int, seed: int = 0) -> dict[str, Tensor]:
        """About `n_rows` training rows (float32) drawn evenly from a random subset of shards: enough to fit a
        normalisation scale or a mean, at the cost of reading a few shards rather than a shuffle window."""
        self.require_complete()
        self.check_hooks(hooks)
        if self.n_train_rows == 0:
            raise CacheError(f"the cache at {self.path} has no training rows (every context is held out); harvest more "
                             "tokens or lower eval_fraction")
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.shards), generator=g).tolist()
        per_shard = max(1, n_rows // min(len(order), 8))
        parts: dict[str, list[Tensor]] = {h: [] for h in hooks}
        have = 0
        for i in order:
            if have >= n_rows:
                break
            rows, _ = self._rows(i, hooks, "train")
            n = len(rows[hooks[0]])
            pick = torch.randperm(n, generator=g)[: min(per_shard, n_rows - have)]
            for h in hooks:
                parts[h].append(rows[h][pick].float())
            have += len(pick)
        return {h: torch.cat(p) for h, p in parts.items()}

    def holdout_seqs(self, max_contexts: int) -> Tensor:
        """Indices of the first `max_contexts` held-out contexts: for running the model on unseen text."""
        seqs = torch.arange(self.n_contexts)
        return seqs[is_holdout(seqs, self.eval_fraction)][:max_contexts]

    def context_tokens(self, seqs: Tensor) -> Tensor:
        """Full token ids [len(seqs), context_size] of the given contexts (position 0 included)."""
        seqs = seqs.long()
        out = torch.empty(len(seqs), self.context_size, dtype=torch.long)
        shard_of = seqs // self.contexts_per_shard
        for i in shard_of.unique().tolist():
            if not 0 <= i < len(self.shards):
                raise CacheError(f"context index out of range for the cache at {self.path} ({self.n_contexts} contexts)")
            sel = (shard_of == i).nonzero().squeeze(1)
            table = self.load_shard(i, ["context_tokens"])["context_tokens"]
            out[sel] = table[seqs[sel] - i * self.contexts_per_shard].long()
        return out


HASH_CHUNK = 1 << 20
"""Bytes read, then hashed, at a time: a chunk small enough to be hashed while it is still in the core's cache (L2 is
1 MiB per core on this machine), instead of a second pass over the file from memory. A first epoch verified by
sha256 this way took 0.66-0.77 M rows/s of CPU time (d 576 float16) against 0.31-0.42 when each file was hashed
(through a fresh 4 MiB bytes object per chunk) and then read again, in the same runs."""


def _hash_through(f: BinaryIO, end: int | None, hasher: Any, scratch: memoryview) -> None:
    """Read `f` on to offset `end` (to its end if None) through `scratch`, feeding every byte to `hasher`."""
    at = f.tell()
    while end is None or at < end:
        n = f.readinto(scratch if end is None else scratch[: end - at])
        if not n:
            if end is None:
                return
            raise EOFError(f"it ends at byte {at}, before byte {end} (truncated)")
        hasher.update(scratch[:n])
        at += n


CHECKSUMS: dict[str, Callable[[], Any]] = {"xxh3_64": xxhash.xxh3_64, "sha256": hashlib.sha256}
"""A shard's checksums (manifest key → hasher), in the order a reader tries them: the first that matches verifies the
file. sha256 is in every cache and is the reference (a repair compares shards by it); xxh3_64, written beside it by
caches harvested since, is what the reader checks first: 24 GB/s against sha256's 1.76 GB/s in memory on this machine,
and a fresh store's first epoch (scripts/bench_reader.py, load 4-6) went at 1.0-1.4 M rows/s under it against
0.42-0.57 M under sha256. It detects accidental damage (bit flips, zeroed or truncated pages) all the same; nobody
forges shards. A file failing xxh3_64 is tried under sha256
before it is called corrupt, so a shard rewritten by a tool that updates sha256 alone still reads. xxhash comes with
`datasets`, which sae requires."""


def _checksums(entry: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, digest) of each checksum shard `entry` records, in CHECKSUMS order."""
    return [(name, entry[name]) for name in CHECKSUMS if name in entry]


def _digests(data: bytes) -> dict[str, str]:
    """Every CHECKSUMS digest of a shard's bytes, for its manifest entry."""
    return {name: new(data).hexdigest() for name, new in CHECKSUMS.items()}


def _file_digest(file: Path, name: str) -> str:
    """Checksum `name` (a CHECKSUMS key) of every byte of `file`."""
    hasher = CHECKSUMS[name]()
    with open(file, "rb", buffering=0) as f:
        _hash_through(f, None, hasher, memoryview(bytearray(HASH_CHUNK)))
    return hasher.hexdigest()


def _read_tensors(file: Path, dests: dict[str, Tensor], hasher: Any = None) -> None:
    """Fill each contiguous tensor of `dests` with the bytes of its namesake in safetensors `file`: one kernel copy
    into memory that is already mapped (no temporary, no page faults on a memory map). With a `hasher`, every byte
    of the file (header, other tensors) is read exactly once, in file order, and hashed a chunk at a time right after
    it is read (see HASH_CHUNK): the bytes checked are the bytes served. Raises OSError, EOFError, ValueError (a
    header that is not JSON or a size that disagrees) or KeyError (a tensor missing) for a damaged file."""
    scratch = memoryview(bytearray(HASH_CHUNK)) if hasher is not None else None
    with open(file, "rb", buffering=0) as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head)
        header_bytes = f.read(n)
        header = json.loads(header_bytes)
        if hasher is not None:
            hasher.update(head)
            hasher.update(header_bytes)
        spans = sorted((8 + n + header[k]["data_offsets"][0], 8 + n + header[k]["data_offsets"][1], k) for k in dests)
        for start, end, key in spans:
            view = memoryview(dests[key].view(-1).view(torch.uint8).numpy())
            if end - start != len(view):
                raise ValueError(f"it holds {end - start} bytes for {key!r}, not the {len(view)} its manifest implies")
            if hasher is None:
                f.seek(start)
            else:
                _hash_through(f, start, hasher, scratch)
            while view:
                got = f.readinto(view[:HASH_CHUNK])
                if not got:
                    raise EOFError(f"it ends before the end of {key!r} (truncated)")
                if hasher is not None:
                    hasher.update(view[:got])
                view = view[got:]
        if hasher is not None:
            _hash_through(f, None, hasher, scratch)


READ_THREADS = max(1, min(4, os.cpu_count() or 1))
"""Threads that verify and read the next shard group while the current one is consumed. Hashing and reading from
the page cache release the GIL, so they run beside the consumer; more than a few only contend for memory bandwidth."""


def _as_rows(t: Tensor) -> np.ndarray:
    """A contiguous [n, d] tensor as a numpy vector of n opaque rows (void items of d·itemsize bytes), sharing its
    memory: taking rows of it is one memcpy per row, whatever the dtype (numpy has no float16/bfloat16 to trip on)."""
    return t.view(torch.uint8).numpy().view(np.dtype((np.void, t.shape[1] * t.element_size())))[:, 0]


def _gather(src: Tensor, rows: Tensor, out: Tensor) -> None:
    """out[j] = src[rows[j]] on the calling thread alone, without the GIL.

    Not torch.index_select: it splits each gather over torch's intra-op threads, and when the cores are busy (load 4-6
    on this 2-core machine) each of its parallel regions waits for a descheduled thread, about one 8 ms time slice per
    batch: 0.26-0.34 M rows/s for 4096 rows of d 576 out of a 2^18-row window, against 2.6-3.5 M rows/s for this
    (2.7-3.8 for index_select on one thread) in the same runs. mode="clip" because numpy buffers `out` under the default "raise";
    the indices are in range by construction."""
    np.take(_as_rows(src), rows.numpy(), axis=0, out=_as_rows(out), mode="clip")


HUGE_PAGE = 2**21
MADV_HUGEPAGE = 14  # Linux's <sys/mman.h>


def huge_page_empty(rows: int, d: int, dtype: torch.dtype) -> Tensor:
    """torch.empty((rows, d)) on 2 MiB-aligned memory the kernel is asked to back with transparent huge pages
    (madvise; a no-op where it has none or runs them "never"). The gather's random rows each cost a TLB miss with
    4 KiB pages: gathering 4096 rows of d 576 out of a 2^18-row window took 0.25-0.32 µs per row, 0.20-0.22 with huge
    pages, on this machine (THP "madvise", so only memory asked for gets them)."""
    nbytes = rows * d * dtype.itemsize
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    madvise = getattr(_LIBC, "madvise", None)
    if madvise is not None and nbytes >= HUGE_PAGE:
        madvise(ctypes.c_void_p(raw.data_ptr() + start), ctypes.c_size_t(nbytes), MADV_HUGEPAGE)
    return raw[start : start + nbytes].view(dtype).view(rows, d)  # a view: `raw` lives as long as the tensor does


GATHER_THREADS = max(1, min(2, os.cpu_count() or 1))
"""Threads that assemble batches ahead of the consumer, each batch whole on one thread (`_gather`), so two batches are
gathered at once and neither waits on the other. Gathering is the reader's largest cost (0.36-0.47 µs of CPU per row
inside the reader on this machine, against 0.28-0.38 for reading and verifying), hence as many gather threads as
read threads here."""

AHEAD = 2 * GATHER_THREADS
"""Batches scheduled ahead of the one being consumed: enough to keep every gather thread busy."""


@dataclass
class _Group:
    """A shard group resident in storage dtype, filled by tasks on the reader's pool."""

    data: dict[str, Tensor]
    """hook → [capacity, d]: the group's shards back to back, every row in file order (held-out rows too)."""
    shuffle: Future
    """→ int64 [training rows]: the row of `data` at each position of the group's shuffled stream."""
    reads: list[Future]
    users: list[Future] = field(default_factory=list)
    """The batches gathered from `data`."""

    def ready(self) -> Tensor:
        """The shuffle, once every read is done; a corrupt or unreadable shard raises its CacheError here."""
        for read in self.reads:
            read.result()
        return self.shuffle.result()

    def settle(self) -> dict[str, Tensor]:
        """`data`, once no read writes into it and no gather reads it any more (whether they succeeded or not)."""
        wait([*self.reads, *self.users])
        return self.data


class ShuffledReader:
    """Training batches shuffled across shards with memory bounded by `shuffle_rows`, however large the cache.

    Each epoch visits the shards in a fresh random order, in groups of about `shuffle_rows` rows; a group's
    training rows are loaded together and permuted. The epoch is thus a fixed virtual sequence of rows (given the
    seed), and `position` — rows consumed since the start — is all a checkpoint needs to resume exactly.

    Data parallel: `batch_size` is the global batch; rank r of `world_size` returns rows
    [position + r·b, position + (r+1)·b) of the stream, b = batch_size / world_size, and every rank advances
    `position` by the whole batch, so the ranks' batches in rank order are exactly the one-rank batch.

    Speed: while a group is consumed, a thread pool shuffles, reads and verifies the next group (`read_shard_into`:
    one pass over each file, hashed as it arrives, once per store) straight into the buffers of a group already
    consumed. `AHEAD` batches are gathered ahead on `GATHER_THREADS` threads, each batch one row gather in the
    storage dtype: the trainer casts on its device, so a float16 cache crosses to a GPU at half the bytes and the
    host never converts. Two groups are resident: the one served and the next (more only while one batch spans more
    than two groups).
    """

    def __init__(self, store: ActivationStore, hooks: list[str], batch_size: int, *, seed: int = 0, position: int = 0,
                 shuffle_rows: int = 2**18, rank: int = 0, world_size: int = 1):
        store.require_complete()
        store.check_hooks(hooks)
        if world_size < 1 or not 0 <= rank < world_size:
            raise CacheError(f"rank {rank} is not one of world_size {world_size} ranks")
        if batch_size < 1:
            raise CacheError(f"batch_size {batch_size} should be at least 1")
        if batch_size % world_size:
            raise CacheError(f"batch_size {batch_size} (the global batch) is not divisible by world_size {world_size}")
        self.store, self.hooks, self.batch_size, self.seed = store, list(hooks), batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.position = position
        n_shards = len(store.shards)
        rows_per_shard = store.contexts_per_shard * store.rows_per_context
        self.group_shards = max(1, min(n_shards, shuffle_rows // max(rows_per_shard, 1)))
        self.shard_rows = [store._split_rows(i, "train") for i in range(n_shards)]
        self.epoch_rows = sum(self.shard_rows)
        if self.epoch_rows == 0:
            raise CacheError(f"the cache at {store.path} has no training rows")
        self._capacity = self.group_shards * max(s["rows"] for s in store.shards)
        self._plans: dict[int, list[tuple[list[int], int]]] = {}
        self._resident: dict[tuple[int, int], _Group] = {}
        self._spares: list[dict[str, Tensor]] = []  # buffers of consumed groups, for the next reads
        self._ahead: deque[Future] = deque()  # this rank's next batches, in order
        self._scheduled = position  # the global position of the first batch not yet in `_ahead`
        self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="sae-reader")
        self._gatherers = ThreadPoolExecutor(GATHER_THREADS, thread_name_prefix="sae-gather")

    # ----------------------------------------------------------------------------------------- the virtual stream
    def _plan(self, epoch: int) -> list[tuple[list[int], int]]:
        """The epoch's groups in visiting order, each (shard indices, training rows); the last two epochs cached."""
        if epoch not in self._plans:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.shard_rows), generator=g).tolist()
            groups = [order[i : i + self.group_shards] for i in range(0, len(order), self.group_shards)]
            self._plans[epoch] = [(shards, sum(self.shard_rows[i] for i in shards)) for shards in groups]
            if len(self._plans) > 2:  # a batch longer than an epoch asks for an older epoch after newer ones
                del self._plans[min(e for e in self._plans if e != epoch)]
        return self._plans[epoch]

    def _locate(self, position: int) -> tuple[tuple[int, int], int, int]:
        """(epoch, group index), offset within that group's stream, and the group's training rows."""
        epoch, offset = divmod(position, self.epoch_rows)
        for index, (_, size) in enumerate(self._plan(epoch)):
            if offset < size:
                return (epoch, index), offset, size
            offset -= size
        raise AssertionError("offset beyond the epoch")  # unreachable: the groups' sizes sum to epoch_rows

    def _after(self, key: tuple[int, int]) -> tuple[int, int]:
        epoch, index = key
        return (epoch, index + 1) if index + 1 < len(self._plan(epoch)) else (epoch + 1, 0)

    # ----------------------------------------------------------------------------------------- resident groups
    def _start(self, key: tuple[int, int]) -> _Group:
        """Begin shuffling and reading group `key` on the pool, into a consumed group's buffers where there is one."""
        epoch, index = key
        shards, size = self._plan(epoch)[index]
        data = self._spares.pop() if self._spares else self._buffers()
        shuffle = self._pool.submit(self._shuffle, shards, size, self.seed * 1_000_003 + epoch * 7919 + index + 1)
        reads, base = [], 0
        for i in shards:
            rows = self.store.shards[i]["rows"]
            reads.append(self._pool.submit(self.store.read_shard_into, i,
                                           {h: t[base : base + rows] for h, t in data.items()}))
            base += rows
        return _Group(data, shuffle, reads)

    def _shuffle(self, shards: list[int], size: int, seed: int) -> Tensor:
        """On the pool: the row of the group's buffers at each position of its shuffled stream."""
        train, base = [], 0
        for i in shards:
            train.append(self.store._split_row_index(i, "train") + base)
            base += self.store.shards[i]["rows"]
        dest = torch.randperm(size, generator=torch.Generator().manual_seed(seed))  # training row j lands at dest[j]
        source = torch.empty(size, dtype=torch.long)
        source[dest] = torch.cat(train)
        return source

    def _buffers(self) -> dict[str, Tensor]:
        """Room for the largest group; allocated twice per reader (then recycled), since touching fresh memory is slow."""
        return {h: huge_page_empty(self._capacity, self.store.hooks[h], dtype=self.store.dtype) for h in self.hooks}

    # ----------------------------------------------------------------------------------------- batches
    def _schedule(self, position: int, n: int) -> Future:
        """Gather `n` rows (storage dtype) of the virtual stream from `position` on, crossing groups and epochs as
        needed, on the gather threads. Groups before this batch's first are retired (their buffers kept for the
        next reads, once the batches before this one are gathered); the group after a batch that lies in one group
        starts loading now."""
        pieces, done = [], 0
        while done < n:
            key, offset, size = self._locate(position + done)
            pieces.append((key, offset, done, min(n - done, size - offset)))
            done += pieces[-1][3]
        first, last = pieces[0][0], pieces[-1][0]
        for old in sorted(k for k in self._resident if k < first):
            self._spares.append(self._resident.pop(old).settle())
        wanted = [key for key, *_ in pieces] + ([self._after(last)] if first == last else [])
        for key in wanted:
            if key not in self._resident:
                self._resident[key] = self._start(key)
        parts = [(self._resident[key], offset, at, take) for key, offset, at, take in pieces]
        batch = self._gatherers.submit(self._assemble, parts, n)
        for group, *_ in parts:
            group.users.append(batch)
        return batch

    def _assemble(self, parts: list[tuple[_Group, int, int, int]], n: int) -> dict[str, Tensor]:
        """On a gather thread: rows [at, at + take) of the batch are those at [offset, offset + take) of a group."""
        out = {h: torch.empty(n, self.store.hooks[h], dtype=self.store.dtype) for h in self.hooks}
        for group, offset, at, take in parts:
            rows = group.ready()[offset : offset + take]
            for h in self.hooks:
                _gather(group.data[h], rows, out[h][at : at + take])
        return out

    def close(self) -> None:
        """Stop the read-ahead threads (a read or gather already running finishes; queued ones are dropped)."""
        self._gatherers.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __iter__(self) -> "ShuffledReader":
        return self

    def __next__(self) -> dict[str, Tensor]:
        """This rank's slice of the next global batch: hook → [batch_size / world_size, d] in the storage dtype."""
        local = self.batch_size // self.world_size
        while len(self._ahead) < AHEAD:
            self._ahead.append(self._schedule(self._scheduled + self.rank * local, local))
            self._scheduled += self.batch_size
        batch = self._ahead[0].result()  # an error stays at the head: asking again raises it again
        self._ahead.popleft()
        self.position += self.batch_size
        return batch

    @property
    def epoch(self) -> float:
        return self.position / self.epoch_rows


def _changed(old: Any, new: Any) -> list[tuple[str, tuple[Any, Any]]]:
    """(key, (old, new)) for what differs between two settings: the keys that differ where both are mappings (a
    planted cache's settings), else the whole value under the key ""."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [(k, (old.get(k), new.get(k))) for k in {**old, **new} if old.get(k) != new.get(k)]
    return [("", (old, new))]


def _shown(value: Any) -> str:
    """A setting's value as a user types it on the command line: true/false, strings quoted."""
    return str(value).lower() if isinstance(value, bool) else repr(value)


_SETTING_NAMES = {"dataset.name": "dataset", "dataset.split": "dataset_split", "dataset.text_column": "text_column"}
"""The harvest settings a manifest nests, by the names a user sets them with."""


def check_same_settings(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The manifest of the cache at `path`, which a writer of `meta` may continue; or a CacheError that names, in the
    settings a user sets, what differs. Only `meta`'s keys are compared, so a harvest checks its config's part (its
    hooks as names) before loading the model. The stored contexts are shown as `max_tokens` (contexts × rows per
    context); they and the shard size are left out where the planted settings' own `tokens` says what changed."""
    old = ActivationStore(path).manifest
    changed = {f"{k}.{sub}" if sub else k: f"{_shown(a)} → {_shown(b)}" for k, v in meta.items()
               if k != "hooks" and old.get(k) != v for sub, (a, b) in _changed(old.get(k), v)}
    if "hooks" in meta and set(old["hooks"]) != set(meta["hooks"]):
        changed["hooks"] = f"{list(old['hooks'])} → {list(meta['hooks'])}"
    elif isinstance(meta.get("hooks"), dict) and old["hooks"] != meta["hooks"]:
        changed["hooks' widths"] = f"{old['hooks']} → {meta['hooks']}"
    if "planted.tokens" in changed:
        changed.pop("max_contexts", None)
        changed.pop("contexts_per_shard", None)
    elif "max_contexts" in changed and all(isinstance(m.get("max_contexts"), int) for m in (old, meta)):
        del changed["max_contexts"]
        rows = [m["context_size"] - int(m["exclude_first"]) for m in (old, {**old, **meta})]
        a, b = (m["max_contexts"] * r for m, r in zip((old, meta), rows))
        if not changed or abs(a - b) >= max(rows):  # else the same max_tokens in other whole contexts
            changed["max_tokens"] = f"{a:,} → {b:,} (in whole contexts)"
    for key, name in _SETTING_NAMES.items():
        if key in changed:
            changed[name] = changed.pop(key)
    if changed:
        diff = "; ".join(f"{k}: {pair}" for k, pair in changed.items())
        raise CacheError(f"the cache at {path} was made with other settings ({diff}); rerun with its settings, use "
                         "another `out` folder, or delete it")
    return old


class CacheWriter:
    """Write side: whole contexts in, shards out on a background thread, manifest updated after each shard.

    Opening a folder that already holds a manifest made with the same settings resumes it (`contexts_done`);
    different settings are an error rather than a silent mix of two caches.
    """

    def __init__(self, path: str | Path, meta: dict[str, Any], contexts_per_shard: int):
        self.path = Path(path)
        self.file = self.path / MANIFEST
        meta = {"format": FORMAT_VERSION, **meta, "contexts_per_shard": contexts_per_shard}
        if self.file.exists():
            self.manifest = check_same_settings(self.path, meta)
        else:
            self._check_no_foreign_shards()
            self.manifest = {**meta, "shards": [], "complete": False}
        self.contexts_per_shard = contexts_per_shard
        self.hooks = list(meta["hooks"])
        self._check_space()
        self.path.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.path, rf"shard_\d+\.safetensors|{re.escape(MANIFEST)}")
        self._pending: dict[str, list[Tensor]] = {}
        self._pending_contexts = 0
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._futures: list[Future] = []
        self._next_index = len(self.manifest["shards"])

    def _check_no_foreign_shards(self) -> None:
        """A folder with no manifest that holds files named like shards: ours only if they hold a shard's tensors (a
        harvest killed before its first manifest); anything else is the user's, and writing would replace it."""
        for file in sorted(self.path.glob("shard_*.safetensors")):
            try:
                with safe_open(file, "pt") as f:
                    ours = set(META_KEYS) <= set(f.keys())
            except (SafetensorError, OSError):
                ours = False
            if not ours:
                raise CacheError(f"{file} is not a shard this toolkit wrote, and a harvest would replace it; use "
                                 "another `out` folder (nothing was changed)")

    def _check_space(self) -> None:
        """Refuse, before the first shard, a cache the disk cannot hold: the contexts still to write (the manifest's
        `max_contexts`) at their stored size (the layout above) against the free space (`sae planted tokens=10¹²`
        wrote until the disk was full). Nothing is written; the same command runs once there is room."""
        m = self.manifest
        todo = m.get("max_contexts", 0) - self.contexts_done
        if m["complete"] or todo <= 0:
            return
        rows = m["context_size"] - int(m["exclude_first"])
        per_context = rows * (sum(m["hooks"].values()) * DTYPES[m["dtype"]].itemsize + 12) + m["context_size"] * 4
        need, free = todo * per_context, shutil.disk_usage(existing_ancestor(self.path)).free
        if need > free:
            raise DiskFullError(f"this cache needs {human_bytes(need)} more but {self.path} has {human_bytes(free)} "
                                "free; ask for fewer tokens, or free space (or use another folder) first")

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def contexts_done(self) -> int:
        return sum(s["contexts"] for s in self.manifest["shards"])

    def add(self, acts: dict[str, Tensor], context_tokens: Tensor, first_pos: int) -> None:
        """Append whole contexts: `acts[hook]` is [n_ctx, rows_per_ctx, d] (storage dtype), tokens [n_ctx, T]."""
        n_ctx, ctx_size = context_tokens.shape
        for k, t in {**acts, "context_tokens": context_tokens}.items():
            self._pending.setdefault(k, []).append(t)
        self._pending_contexts += n_ctx
        while self._pending_contexts >= self.contexts_per_shard:
            self._cut(self.contexts_per_shard, first_pos)

    def _cut(self, n_ctx: int, first_pos: int) -> None:
        merged = {k: torch.cat(v) for k, v in self._pending.items()}
        self._pending = {k: [v[n_ctx:]] for k, v in merged.items()}
        self._pending_contexts -= n_ctx
        index = self._next_index
        self._next_index += 1
        shard = {k: v[:n_ctx] for k, v in merged.items()}
        self._futures.append(self._pool.submit(self._write, index, shard, first_pos))
        self._reap()

    def _reap(self) -> None:
        """Surface write errors early and keep at most two shards queued (bounded memory)."""
        while self._futures and (self._futures[0].done() or len(self._futures) > 2):
            self._futures.pop(0).result()

    def _write(self, index: int, shard: dict[str, Tensor], first_pos: int) -> None:
        if index != len(self.manifest["shards"]):  # an earlier shard failed (its future raises): no gap in the list
            return
        name, data, n_ctx, rows = self._shard_bytes(index, shard, first_pos)
        atomic_write_bytes(self.path / name, data)
        self.manifest["shards"].append(
            {"file": name, "contexts": n_ctx, "rows": rows, **_digests(data)}
        )
        atomic_write_json(self.file, self.manifest)

    def _shard_bytes(self, index: int, shard: dict[str, Tensor], first_pos: int) -> tuple[str, bytes, int, int]:
        """(file name, safetensors bytes, contexts, rows) of shard `index` from [n_ctx, rows_per_ctx, d] activations."""
        ctx_tokens = shard.pop("context_tokens")
        n_ctx, ctx_size = ctx_tokens.shape
        first_seq = index * self.contexts_per_shard
        seq = torch.arange(first_seq, first_seq + n_ctx, dtype=torch.int32).repeat_interleave(ctx_size - first_pos)
        pos = torch.arange(first_pos, ctx_size, dtype=torch.int32).repeat(n_ctx)
        tensors = {h: t.reshape(-1, t.shape[-1]).contiguous() for h, t in shard.items()}
        tensors.update(
            tokens=ctx_tokens[:, first_pos:].reshape(-1).to(torch.int32).contiguous(),
            seq=seq,
            pos=pos,
            context_tokens=ctx_tokens.to(torch.int32).contiguous(),
        )
        return f"shard_{index:05d}.safetensors", save_bytes(tensors), n_ctx, len(seq)

    def damaged_shards(self) -> list[int]:
        """Listed shards whose file is missing or fails its checksum (reads every shard once)."""
        return [i for i, entry in enumerate(self.manifest["shards"])
                if not (self.path / entry["file"]).is_file()
                or _file_digest(self.path / entry["file"], "sha256") != entry["sha256"]]

    def rewrite(self, index: int, acts: dict[str, Tensor], context_tokens: Tensor, first_pos: int) -> None:
        """Write listed shard `index` again from re-harvested contexts; refused unless it is byte-identical to the
        shard the manifest records, so a repair can never mix two different harvests."""
        name, data, _, _ = self._shard_bytes(index, {**acts, "context_tokens": context_tokens}, first_pos)
        if hashlib.sha256(data).hexdigest() != self.manifest["shards"][index]["sha256"]:
            raise CacheError(f"re-harvesting {self.path / name} gives other bytes than the manifest records (the model, "
                             "data or software changed since the harvest, or it ran on another device or batch size); "
                             "harvest again into a fresh folder")
        atomic_write_bytes(self.path / name, data)

    def finish(self, first_pos: int) -> None:
        """Write the last partial shard, wait for every write, and mark the cache complete."""
        if self._pending_contexts:
            self._cut(self._pending_contexts, first_pos)
        self.flush()
        self.manifest["complete"] = True
        atomic_write_json(self.file, self.manifest)

    def flush(self) -> None:
        while self._futures:
            self._futures.pop(0).result()
        if not self.file.exists():
            atomic_write_json(self.file, self.manifest)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
