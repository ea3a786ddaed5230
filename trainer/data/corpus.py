"""Turns a DataConfig into train/val token arrays: stdlib, text files or synthetic."""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np

from .config import validate_data_config
from .token_file import cache_key, dtype_for_vocab, file_fingerprints, open_or_build, val_count

# Byte 0 hardly ever occurs in source or text files, so it marks document boundaries
# in byte-level corpora without spending an extra vocabulary entry.
SEPARATOR_BYTE = 0
_SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass
class TokenData:
    """The tokens one run trains and evaluates on."""

    train: np.ndarray
    """1-D token ids (a read-only memmap for cached corpora)."""
    val: np.ndarray
    """1-D held-out ids: the tail of the same corpus (may be empty when val_fraction is 0)."""
    vocab_size: int
    """Ids are in [0, vocab_size)."""
    description: str
    """One line for the log: what the tokens are and how many."""
    path: Optional[str] = None
    """The cached token file, or None for in-memory (synthetic) data."""
    built: bool = False
    """True when this call built the cache, False when it reused it."""


def _walk_sorted(root: str, keep: Callable[[str], bool], skip_dir: Callable[[str], bool]) -> list[str]:
    """Files under root for which keep(name) holds, in sorted relative-path order."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not skip_dir(d)]
        found.extend(os.path.relpath(os.path.join(folder, f), root) for f in files if keep(f))
    return [os.path.join(root, rel) for rel in sorted(found)]


def stdlib_files() -> tuple[str, list[str]]:
    """(stdlib folder, its .py files) of the running interpreter, installed packages excluded."""
    root = sysconfig.get_paths()["stdlib"]
    files = _walk_sorted(root, lambda f: f.endswith(".py"), lambda d: d in _SKIPPED_STDLIB_DIRS)
    # Symlinks to missing targets exist in some distro layouts; they cannot be read.
    return root, [f for f in files if os.path.isfile(f)]


def text_files(paths: list[str], extensions: list[str]) -> list[str]:
    """Named files plus matching files under named folders, deduplicated, sorted."""
    exts = tuple(e.lower() for e in extensions)
    out = set()
    for p in paths:
        p = os.path.abspath(os.path.expanduser(str(p)))
        if os.path.isdir(p):
            # Hidden folders (.git, .venv) hold tool state, not training text.
            out.update(_walk_sorted(p, lambda f: f.lower().endswith(exts) and not f.startswith("."),
                                    lambda d: d.startswith(".")))
        elif os.path.isfile(p):
            out.add(p)
        else:
            raise ValueError(f"data.paths: {p!r} is neither a file nor a folder")
    return sorted(out)


def _byte_chunks(files: list[str]) -> Iterator[np.ndarray]:
    sep = np.array([SEPARATOR_BYTE], dtype=np.uint8)
    for i, path in enumerate(files):
        if i:
            yield sep
        yield np.fromfile(path, dtype=np.uint8)


class _HFTokenizer:
    """A Hugging Face tokenizer from local files only; documents joined by its EOS id."""

    def __init__(self, name: str):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ValueError(f"data.tokenizer: {name!r} needs the transformers package "
                             f"(pip install transformers), or use data.tokenizer=bytes") from None
        try:
            self.tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception as e:  # transformers raises OSError, ValueError, ... depending on what is missing
            raise ValueError(f"data.tokenizer: cannot load {name!r} from local files "
                             f"(downloads are disabled; use a local path or a cached name): {e}") from None
        # Whole documents are encoded at once; the model's context length does not apply here.
        self.tok.model_max_length = int(1e30)
        self.vocab_size = len(self.tok)
        sep = self.tok.eos_token_id if self.tok.eos_token_id is not None else self.tok.sep_token_id
        self.separator = None if sep is None else int(sep)
        self.identity = {"name": name, "class": type(self.tok).__name__, "vocab_size": self.vocab_size}
        if os.path.isdir(os.path.expanduser(name)):
            # A local folder can change under the same name; its files' stamps go into the key.
            root = os.path.expanduser(name)
            self.identity["files"] = file_fingerprints(_walk_sorted(root, lambda f: True, lambda d: False))

    def chunks(self, files: list[str]) -> Iterator[np.ndarray]:
        dtype = np.int64
        for i, path in enumerate(files):
            if i and self.separator is not None:
                yield np.array([self.separator], dtype=dtype)
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            yield np.asarray(self.tok.encode(text, add_special_tokens=False), dtype=dtype)


def _describe(what: str, vocab_size: int, n_train: int, n_val: int) -> str:
    return f"{what}, vocab {vocab_size}, {n_train + n_val:,} tokens (train {n_train:,}, val {n_val:,})"


def _from_file(cache_dir: str, key: str, what: str, *, vocab_size: int, val_fraction: float,
               sources, chunks: Callable[[], Iterator[np.ndarray]]) -> TokenData:
    tf = open_or_build(cache_dir, key, vocab_size=vocab_size, val_fraction=val_fraction,
                       sources=sources, chunks=chunks)
    n_train = len(tf.tokens) - tf.n_val
    return TokenData(tf.tokens[:n_train], tf.tokens[n_train:], tf.vocab_size,
                     _describe(what, tf.vocab_size, n_train, tf.n_val), path=tf.path, built=tf.built)


def _stdlib(cfg, cache_dir: str) -> TokenData:
    root, files = stdlib_files()
    if not files:
        raise ValueError(f"data.kind: stdlib, but no .py files were found under {root}")
    key = cache_key(kind="stdlib", root=root, files=file_fingerprints(files), tokenizer="bytes",
                    separator=SEPARATOR_BYTE, val_fraction=float(cfg.val_fraction))
    return _from_file(cache_dir, key, f"stdlib: {len(files)} .py files under {root}, bytes",
                      vocab_size=256, val_fraction=float(cfg.val_fraction),
                      sources={"root": root, "n_files": len(files)}, chunks=lambda: _byte_chunks(files))


def _text(cfg, cache_dir: str) -> TokenData:
    paths, exts = [str(p) for p in cfg.paths], [str(e) for e in cfg.extensions]
    files = text_files(paths, exts)
    if not files:
        raise ValueError(f"data.paths: no files ending in {exts} under {paths}")
    stamps = file_fingerprints(files)
    if sum(size for _, size, _ in stamps) == 0:
        raise ValueError(f"data.paths: all {len(files)} files are empty")
    if cfg.tokenizer == "bytes":
        vocab, ident, chunks = 256, "bytes", (lambda: _byte_chunks(files))
    else:
        tok = _HFTokenizer(cfg.tokenizer)
        vocab, ident, chunks = tok.vocab_size, tok.identity, (lambda: tok.chunks(files))
    key = cache_key(kind="text", files=stamps, tokenizer=ident, separator=SEPARATOR_BYTE,
                    val_fraction=float(cfg.val_fraction))
    return _from_file(cache_dir, key, f"text: {len(files)} files, tokenizer {cfg.tokenizer}",
                      vocab_size=vocab, val_fraction=float(cfg.val_fraction),
                      sources={"paths": [os.path.abspath(os.path.expanduser(p)) for p in paths],
                               "n_files": len(files)}, chunks=chunks)


def _synthetic(cfg) -> TokenData:
    # Generated in memory: cheaper than a cache round trip, and needs no disk.
    n, vocab = int(cfg.synthetic_tokens), int(cfg.synthetic_vocab_size)
    rng = np.random.default_rng(int(cfg.seed))
    tokens = rng.integers(0, vocab, size=n, dtype=dtype_for_vocab(vocab))
    n_val = val_count(n, float(cfg.val_fraction))
    n_train = n - n_val
    return TokenData(tokens[:n_train], tokens[n_train:], vocab,
                     _describe(f"synthetic: uniform random, seed {cfg.seed}", vocab, n_train, n_val))


def load_tokens(cfg) -> TokenData:
    """Validates cfg (a DataConfig or an OmegaConf node of one), then loads or builds its tokens."""
    validate_data_config(cfg)
    cache_dir = os.path.abspath(os.path.expanduser(str(cfg.cache_dir)))
    if cfg.kind == "stdlib":
        return _stdlib(cfg, cache_dir)
    if cfg.kind == "text":
        return _text(cfg, cache_dir)
    return _synthetic(cfg)
