"""Data-parallel batches of next-token windows, resumable mid-epoch.

The token stream is cut into windows of seq_len + 1 tokens that start at multiples
of seq_len (consecutive windows share one token, so every token is a target once).
Each epoch shuffles the window indices with torch.Generator(seed + epoch); rank r
takes positions r, r + dp_size, ... of that order. Every rank gets the same number
of batches, so no rank waits in a collective for one that ran out of data.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

_STATE_VERSION = 1


def _as_tokens(tokens) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    tokens = np.asarray(tokens)  # keeps a memmap a memmap: no copy of the corpus
    if tokens.ndim != 1:
        raise ValueError(f"data: token array must be 1-D, got shape {tokens.shape}")
    return tokens


def _check_layout(seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")


def _n_windows(n_tokens: int, seq_len: int) -> int:
    return max(0, (n_tokens - 1) // seq_len)


def _gather(tokens: np.ndarray, windows: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) int64 (B, T) for the given window indices."""
    buf = np.empty((len(windows), seq_len + 1), dtype=np.int64)
    for i, w in enumerate(windows):
        start = int(w) * seq_len
        buf[i] = tokens[start:start + seq_len + 1]  # one contiguous read per window from the memmap
    t = torch.from_numpy(buf)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def _too_small(n_tokens: int, seq_len: int, micro_batch_size: int, dp_size: int, what: str) -> str:
    need = seq_len * micro_batch_size * dp_size + 1
    return (f"{what} has {n_tokens:,} tokens, but one batch per rank needs {need:,} "
            f"(seq_len={seq_len} x micro_batch_size={micro_batch_size} x dp_size={dp_size} + 1); "
            f"use more data or a smaller seq_len / micro_batch_size")


def check_split_sizes(n_train: int, n_val: int, *, seq_len: int, micro_batch_size: int, dp_size: int) -> None:
    """Raises ValueError naming the keys when either split cannot give every rank one batch
    (training: one micro-batch per rank; validation: one evaluation batch per rank)."""
    need = seq_len * micro_batch_size * dp_size + 1
    for n, split, key in ((n_train, "training split", "data"), (n_val, "validation split", "data.val_fraction")):
        if _n_windows(n, seq_len) // (dp_size * micro_batch_size) == 0:
            raise ValueError(f"the {split} ({key}) has {n:,} tokens, but one batch per rank needs {need:,}: "
                             f"model.seq_len={seq_len} x trainer.micro_batch_size={micro_batch_size} x "
                             f"{dp_size} rank(s) + 1; use more data or a smaller model.seq_len / "
                             "trainer.micro_batch_size")


class ShardedBatches:
    """An endless, epoch-based stream of (x, y) batches for one data-parallel rank."""

    def __init__(self, tokens, *, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, shuffle: bool = True):
        _check_layout(seq_len, micro_batch_size, dp_rank, dp_size)
        self.tokens = _as_tokens(tokens)
        self.seq_len, self.micro_batch_size = int(seq_len), int(micro_batch_size)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.n_windows = _n_windows(len(self.tokens), self.seq_len)
        # The remainder (fewer windows than one batch on every rank) is dropped each epoch.
        self.batches_per_epoch = self.n_windows // (self.dp_size * self.micro_batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(_too_small(len(self.tokens), self.seq_len, self.micro_batch_size, self.dp_size,
                                        "data (training split)"))
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def _rank_windows(self, epoch: int) -> np.ndarray:
        """This rank's window indices for one epoch, batches_per_epoch * micro_batch_size of them."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n_windows, generator=g).numpy()
        else:
            order = np.arange(self.n_windows, dtype=np.int64)
        return order[self.dp_rank::self.dp_size][: self.batches_per_epoch * self.micro_batch_size]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y), int64 of shape (micro_batch_size, seq_len); y is x shifted by one token."""
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = self._rank_windows(self.epoch), self.epoch
        b = self.micro_batch_size
        windows = self._order[self.position * b:(self.position + 1) * b]
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return _gather(self.tokens, windows, self.seq_len)

    def state_dict(self) -> dict:
        """Where the stream is, plus what must match on resume. Equal on every rank but dp_rank."""
        return {"version": _STATE_VERSION, "epoch": self.epoch, "position": self.position,
                "seed": self.seed, "shuffle": self.shuffle, "seq_len": self.seq_len,
                "micro_batch_size": self.micro_batch_size, "dp_size": self.dp_size,
                "n_windows": self.n_windows, "dp_rank": self.dp_rank}

    def load_state_dict(self, state: dict, *, reshard: bool = False) -> None:
        """Continues exactly where the saved sampler stopped; refuses a state from another layout.

        With reshard=True a state saved with another dp_size or micro_batch_size is accepted
        when the windows consumed so far (position x micro_batch_size x dp_size: ranks take
        the epoch's permutation round-robin, so any layout consumes it front to back) are a
        whole number of the new layout's global batches; the stream then goes on with the
        windows an unresharded run would have read next (within the epoch)."""
        if reshard and (state.get("dp_size"), state.get("micro_batch_size")) != (self.dp_size, self.micro_batch_size):
            consumed = int(state["position"]) * int(state["micro_batch_size"]) * int(state["dp_size"])
            per_batch = self.micro_batch_size * self.dp_size
            if consumed % per_batch:
                raise ValueError(f"sampler state: {consumed} windows of this epoch were consumed, not a whole "
                                 f"number of batches of {self.micro_batch_size} x {self.dp_size} ranks; resume "
                                 f"with a trainer.micro_batch_size x world size that divides it")
            state = dict(state, position=consumed // per_batch, dp_size=self.dp_size,
                         micro_batch_size=self.micro_batch_size)
        missing = [k for k in ("epoch", "position", "seed", "shuffle", "seq_len", "micro_batch_size",
                               "dp_size", "n_windows") if k not in state]
        if missing:
            raise ValueError(f"sampler state lacks {missing}; not a ShardedBatches.state_dict()")
        if state.get("version", _STATE_VERSION) != _STATE_VERSION:
            raise ValueError(f"sampler state version {state['version']} is not {_STATE_VERSION}")
        # dp_rank is deliberately not compared: any rank's state restores every rank.
        for name in ("dp_size", "seq_len", "micro_batch_size", "seed", "shuffle", "n_windows"):
            saved, now = state[name], getattr(self, name)
            if saved != now:
                hint = " (the training data changed)" if name == "n_windows" else ""
                raise ValueError(f"sampler state: {name} was {saved} when saved but is {now} now{hint}; "
                                 f"resuming would not reproduce the batch order")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise ValueError(f"sampler state: epoch={epoch}, position={position} out of range "
                             f"(batches_per_epoch={self.batches_per_epoch})")
        self.epoch, self.position = epoch, position


def eval_batch_count(n_tokens: int, *, seq_len: int, micro_batch_size: int, dp_size: int,
                     max_batches: int | None = None) -> int:
    """Batches every rank gets from eval_batches (the same on every rank)."""
    n = _n_windows(n_tokens, seq_len) // (dp_size * micro_batch_size)
    return n if max_batches is None else min(n, max_batches)


def eval_batches(tokens, *, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic (x, y) batches over the head of `tokens`, sharded like training, no shuffle.

    Rank r takes windows r, r + dp_size, ...; every rank yields the same count,
    min(max_batches, what the data allows); max_batches=None takes all.
    """
    _check_layout(seq_len, micro_batch_size, dp_rank, dp_size)
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    tokens = _as_tokens(tokens)
    n = eval_batch_count(len(tokens), seq_len=seq_len, micro_batch_size=micro_batch_size, dp_size=dp_size,
                         max_batches=max_batches)
    if n == 0:  # raised now, not on first iteration, so setup code sees it
        raise ValueError(_too_small(len(tokens), seq_len, micro_batch_size, dp_size,
                                    "data.val_fraction: the validation split"))
    mine = np.arange(n * micro_batch_size * dp_size, dtype=np.int64)[dp_rank::dp_size]

    def batches():
        for j in range(n):
            yield _gather(tokens, mine[j * micro_batch_size:(j + 1) * micro_batch_size], seq_len)

    return batches()
