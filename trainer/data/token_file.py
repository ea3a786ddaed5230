"""A cached, memory-mapped token file: built once per content key, then opened by every rank.

On disk, in the cache folder:
    <key>.tokens   raw token ids (uint8 / uint16 / uint32, by vocab size), no header
    <key>.json     sidecar: format, key, vocab_size, dtype, n_tokens, n_val, sources
    <key>.lock     fcntl lock serialising builders of this key (left in place on purpose)

Both files are written to a temp file in the same folder, fsynced and renamed into
place, and the sidecar goes last. A reader trusts the tokens only when the sidecar
exists and agrees with the token file's size, so a crashed or half-finished build is
rebuilt rather than read.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from parallel.atomic import atomic_write, fsync_dir

# Bump when the layout or the meaning of the tokens changes: old caches are then ignored.
FORMAT_VERSION = 1


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id below vocab_size."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


def val_count(n_tokens: int, val_fraction: float) -> int:
    """Tokens held out at the end: at least one when asked for, never the whole corpus."""
    if val_fraction <= 0 or n_tokens < 2:
        return 0
    return min(max(1, round(n_tokens * val_fraction)), n_tokens - 1)


def file_fingerprints(paths: Iterable[str]) -> list[list]:
    """[path, size, mtime_ns] per file: a cheap stand-in for hashing the contents."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([p, st.st_size, st.st_mtime_ns])
    return out


def cache_key(**parts) -> str:
    """Hash of everything the file's contents depend on (JSON-able values)."""
    blob = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class TokenFile:
    """An opened token file: the ids as a read-only memmap and its sidecar."""

    path: str
    tokens: np.ndarray
    vocab_size: int
    n_val: int
    meta: dict
    built: bool
    """True when this call built the file, False when it reused one."""


def _paths(cache_dir: str, key: str) -> tuple[str, str, str]:
    base = os.path.join(cache_dir, key)
    return base + ".tokens", base + ".json", base + ".lock"


def open_token_file(cache_dir: str, key: str) -> TokenFile | None:
    """The cached file for `key`, or None when it is missing, partial or inconsistent."""
    tokens_path, meta_path, _ = _paths(cache_dir, key)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        vocab_size, n_tokens, n_val = int(meta["vocab_size"]), int(meta["n_tokens"]), int(meta["n_val"])
        dtype = dtype_for_vocab(vocab_size)
        ok = (meta.get("format") == FORMAT_VERSION and meta.get("key") == key
              and meta.get("dtype") == dtype.name and n_tokens > 0 and 0 <= n_val < n_tokens
              and os.path.getsize(tokens_path) == n_tokens * dtype.itemsize)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not ok:
        return None
    tokens = np.memmap(tokens_path, dtype=dtype, mode="r", shape=(n_tokens,))
    return TokenFile(tokens_path, tokens, vocab_size, n_val, meta, built=False)


def _lock(lock_path: str, timeout_s: float) -> int:
    """Exclusive flock with a deadline; the kernel drops it if the holder dies."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise TimeoutError(
                    f"waited {timeout_s:.0f} s for another process building {lock_path[:-5]}.tokens; "
                    f"if no build is running, delete {lock_path} and retry") from None
            time.sleep(0.05)


def _write_tokens(f, chunks: Iterable, dtype: np.dtype, vocab_size: int) -> int:
    n = 0
    for chunk in chunks:
        arr = np.asarray(chunk)
        if arr.size == 0:
            continue
        # Checked before the cast, which would otherwise wrap out-of-range ids silently.
        if arr.dtype != dtype and (int(arr.min()) < 0 or int(arr.max()) >= vocab_size):
            raise ValueError(f"token id out of range [0, {vocab_size}) while building the token file")
        f.write(memoryview(np.ascontiguousarray(arr.astype(dtype, copy=False).reshape(-1))))
        n += arr.size
    return n


def open_or_build(cache_dir: str, key: str, *, vocab_size: int, val_fraction: float, sources,
                  chunks: Callable[[], Iterable], lock_timeout_s: float = 3600.0) -> TokenFile:
    """Opens the file for `key`, building it from chunks() first when needed.

    Several processes may call this at once: one builds under the lock, the others
    wait for it and then open its result.
    """
    found = open_token_file(cache_dir, key)
    if found is not None:
        return found
    os.makedirs(cache_dir, exist_ok=True)
    tokens_path, meta_path, lock_path = _paths(cache_dir, key)
    lock_fd = _lock(lock_path, lock_timeout_s)
    try:
        found = open_token_file(cache_dir, key)  # built by whoever held the lock before us
        if found is not None:
            return found
        # Only the lock holder builds this key, so leftovers are from crashed builders.
        for stale in [meta_path, tokens_path, *glob.glob(os.path.join(cache_dir, f".{key}.*.tmp"))]:
            if os.path.exists(stale):
                os.unlink(stale)
        dtype = dtype_for_vocab(vocab_size)
        n_tokens = atomic_write(tokens_path, lambda f: _write_tokens(f, chunks(), dtype, vocab_size))
        if n_tokens == 0:
            os.unlink(tokens_path)
            raise ValueError(f"the corpus produced no tokens (sources: {sources})")
        meta = {"format": FORMAT_VERSION, "key": key, "vocab_size": int(vocab_size), "dtype": dtype.name,
                "n_tokens": n_tokens, "n_val": val_count(n_tokens, val_fraction), "sources": sources}
        atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
        fsync_dir(cache_dir)
    finally:
        fcntl.flock(lock_fd, fcntl.LOCK_UN)
        os.close(lock_fd)
    opened = open_token_file(cache_dir, key)
    if opened is None:  # would mean the cache folder changed under us
        raise RuntimeError(f"token file {tokens_path} was built but does not open")
    return TokenFile(opened.path, opened.tokens, opened.vocab_size, opened.n_val, opened.meta, built=True)
