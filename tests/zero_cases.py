"""ZeRO cases run inside the shared worker pools (see harness.py)."""

from __future__ import annotations

import copy

import torch

from models.config import AttentionConfig, ModelConfig
from models.transformer import DecoderLM
from parallel.collectives import Communicator
from parallel.zero import apply_zero


def _model(seed: int, attention: str = "softmax") -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(ModelConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=3, n_heads=2, mlp_ratio=2.0),
                     AttentionConfig(kind=attention, chunk_size=4))


def _batch(step: int, micro: int, n: int):
    g = torch.Generator().manual_seed(7919 * step + micro)
    x = torch.randint(0, 64, (n, 16), generator=g)
    return x, torch.roll(x, -1, dims=1)


def zero_matches_single_process(rank: int, world: int, stage: int, accum: int = 2, steps: int = 3,
                                per_rank: int = 2, algorithm: str = "ring", bucket_mb: float = 0.01,
                                attention: str = "softmax") -> dict:
    """ZeRO weights after `steps` AdamW steps (accumulation, clipping) equal one process
    trained on the global batches; also returns the per-rank model-state bytes."""
    model = _model(100 + rank, attention)         # different per rank: the broadcast must fix it
    ref = None
    comm = Communicator(None, algorithm=algorithm)
    zero = apply_zero(model, stage=stage, param_groups=model.param_groups(0.1), bucket_mb=bucket_mb,
                      blocks=list(model.blocks), comm=comm)
    with zero.gathered():
        ref = copy.deepcopy(model)
    # deepcopy copies the views' data, but the copy's hooks and views belong to `ref` alone
    make = lambda groups: torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95))  # noqa: E731
    opt = zero.build_optimizer(make)
    ref_opt = make(ref.param_groups(0.1))
    for step in range(steps):
        for micro in range(accum):
            x, y = _batch(step, micro, world * per_rank)
            mine = slice(rank * per_rank, (rank + 1) * per_rank)
            ctx = zero.no_sync() if micro < accum - 1 else torch.enable_grad()
            with ctx:
                _, loss = zero(x[mine], y[mine])
                (loss / accum).backward()
            _, ref_loss = ref(x, y)
            (ref_loss / accum).backward()
        zero.finish_gradient_sync()
        norm = zero.clip_grad_norm_(0.5)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        torch.testing.assert_close(norm, ref_norm, rtol=1e-4, atol=1e-6)
        opt.step()
        zero.after_step()
        zero.zero_grad()
        ref_opt.step()
        ref_opt.zero_grad()
    with zero.gathered():
        got = {k: v.clone() for k, v in model.state_dict().items()}
    want = ref.state_dict()
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=2e-5, msg=lambda m, k=k: f"{k}: {m}")
    n_params = sum(p.numel() for p in model.parameters())
    comm.close()
    return {"worst": worst, "bytes": zero.model_state_bytes(), "n_params": n_params,
            "weights": torch.cat([got[k].reshape(-1) for k in sorted(got)])}
