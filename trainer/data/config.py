"""The `data` config group: which tokens to train on and where their cache lives."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, get_args

from ..structured import require

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
    require(cfg.kind in DATA_KINDS, "data.kind", f"be one of {list(DATA_KINDS)}", cfg.kind)
    require(not isinstance(cfg.paths, str), "data.paths", "be a list of paths, not one string", cfg.paths)
    require(not isinstance(cfg.extensions, str), "data.extensions", "be a list of suffixes, not one string",
            cfg.extensions)
    for ext in cfg.extensions:
        require(isinstance(ext, str) and ext.startswith(".") and len(ext) >= 2, "data.extensions",
                "hold file suffixes like '.txt'", ext)
    require(isinstance(cfg.tokenizer, str) and bool(cfg.tokenizer.strip()), "data.tokenizer",
            "be 'bytes' or a Hugging Face tokenizer name/path", cfg.tokenizer)
    # Only text files are tokenized; failing beats silently training on bytes.
    require(cfg.kind == "text" or cfg.tokenizer == "bytes", "data.tokenizer",
            f"be 'bytes' unless data.kind=text (kind is {cfg.kind})", cfg.tokenizer)
    require(isinstance(cfg.cache_dir, str) and bool(cfg.cache_dir.strip()), "data.cache_dir",
            "be a non-empty folder path", cfg.cache_dir)
    # Below 1 so the training split is never empty; 0 (no validation split) is allowed.
    require(0.0 <= float(cfg.val_fraction) < 1.0, "data.val_fraction", "be in [0, 1)", cfg.val_fraction)
    require(int(cfg.seed) >= 0, "data.seed", "be >= 0", cfg.seed)
    if cfg.kind == "text":
        require(bool(cfg.paths), "data.paths", "name at least one file or folder with kind=text", list(cfg.paths))
        for p in cfg.paths:
            require(os.path.exists(os.path.expanduser(str(p))), "data.paths", "name existing files or folders (this path does not exist)", p)
        folders = any(os.path.isdir(os.path.expanduser(str(p))) for p in cfg.paths)
        require(bool(cfg.extensions) or not folders, "data.extensions",
                "not be empty when data.paths names folders (nothing would be taken)", list(cfg.extensions))
    if cfg.kind == "synthetic":
        require(int(cfg.synthetic_tokens) >= 2, "data.synthetic_tokens", "be >= 2", cfg.synthetic_tokens)
        require(2 <= int(cfg.synthetic_vocab_size) <= MAX_VOCAB_SIZE, "data.synthetic_vocab_size",
                f"be in [2, {MAX_VOCAB_SIZE}]", cfg.synthetic_vocab_size)
