"""The `data` config group: which tokens to train on and where their cache lives."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, get_args

DataKind = Literal["stdlib", "text", "synthetic"]
DATA_KINDS: tuple[str, ...] = get_args(DataKind)

# Token ids are stored as uint8/16/32; ids must fit below 2**32.
MAX_VOCAB_SIZE = 2**32


@dataclass
class DataConfig:
    """Where the training tokens come from (configs/data/*.yaml)."""

    kind: DataKind = "stdlib"
    """stdlib: the running Python's standard library, bytes; text: your files; synthetic: random tokens."""
    paths: list[str] = field(default_factory=list)
    """text: files or folders (folders walked recursively, in sorted order)."""
    extensions: list[str] = field(default_factory=lambda: [".txt", ".md", ".py"])
    """text: file suffixes taken from folders (files named directly are always taken)."""
    tokenizer: str = "bytes"
    """text: "bytes" (vocab 256) or a Hugging Face tokenizer name/path already on disk (never downloaded)."""
    cache_dir: str = "~/.cache/ringtrain/data"
    """Folder of the cached memory-mapped token files (shared by all ranks of a node)."""
    val_fraction: float = 0.005
    """Fraction of the tokens, taken from the end, held out for validation."""
    synthetic_tokens: int = 1_000_000
    """synthetic: number of tokens generated."""
    synthetic_vocab_size: int = 256
    """synthetic: token ids are drawn uniformly from [0, synthetic_vocab_size)."""
    seed: int = 0
    """synthetic: seed of the generated content."""

    def validate(self) -> None:
        """Raises ValueError naming the first bad `data.<field>`."""
        validate_data_config(self)


def validate_data_config(cfg) -> None:
    """Checks a DataConfig or an OmegaConf node of the same shape (methods do not survive OmegaConf).

    `kind` is checked here too: OmegaConf 2.3 cannot hold Literal fields, so an OmegaConf
    node of this config (trainer/structured.py's mirror) carries it as a plain str.
    """
    if cfg.kind not in DATA_KINDS:
        raise ValueError(f"data.kind: {cfg.kind!r} is not one of {list(DATA_KINDS)}")
    if isinstance(cfg.paths, str):
        raise ValueError(f"data.paths: expected a list of paths, got the string {cfg.paths!r}")
    if isinstance(cfg.extensions, str):
        raise ValueError(f"data.extensions: expected a list of suffixes, got the string {cfg.extensions!r}")
    for ext in cfg.extensions:
        if not isinstance(ext, str) or not ext.startswith(".") or len(ext) < 2:
            raise ValueError(f"data.extensions: {ext!r} is not a file suffix like '.txt'")
    if not isinstance(cfg.tokenizer, str) or not cfg.tokenizer.strip():
        raise ValueError("data.tokenizer: must be 'bytes' or a Hugging Face tokenizer name/path")
    if cfg.kind != "text" and cfg.tokenizer != "bytes":
        # Only text files are tokenized; failing beats silently training on bytes.
        raise ValueError(f"data.tokenizer: only used with data.kind=text, got {cfg.tokenizer!r} with kind={cfg.kind}")
    if not isinstance(cfg.cache_dir, str) or not cfg.cache_dir.strip():
        raise ValueError("data.cache_dir: must be a non-empty folder path")
    # Below 1 so the training split is never empty; 0 (no validation split) is allowed.
    if not 0.0 <= float(cfg.val_fraction) < 1.0:
        raise ValueError(f"data.val_fraction: must be in [0, 1), got {cfg.val_fraction}")
    if int(cfg.seed) < 0:
        raise ValueError(f"data.seed: must be >= 0, got {cfg.seed}")
    if cfg.kind == "text":
        if not cfg.paths:
            raise ValueError("data.paths: kind=text needs at least one file or folder")
        for p in cfg.paths:
            if not os.path.exists(os.path.expanduser(str(p))):
                raise ValueError(f"data.paths: {p!r} does not exist")
        if not cfg.extensions and any(os.path.isdir(os.path.expanduser(str(p))) for p in cfg.paths):
            raise ValueError("data.extensions: empty, so nothing would be taken from the folders in data.paths")
    if cfg.kind == "synthetic":
        if int(cfg.synthetic_tokens) < 2:
            raise ValueError(f"data.synthetic_tokens: must be >= 2, got {cfg.synthetic_tokens}")
        if not 2 <= int(cfg.synthetic_vocab_size) <= MAX_VOCAB_SIZE:
            raise ValueError(
                f"data.synthetic_vocab_size: must be in [2, {MAX_VOCAB_SIZE}], got {cfg.synthetic_vocab_size}")
