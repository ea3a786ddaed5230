"""One case of the attention benchmark, run in its own process: one layer of one kind at one length.

The layer (`make_layer`: the settings of configs/attention/<kind>.yaml, layer 0, weights from
--seed) takes a random (batch, T, d_model) input and a fixed random output gradient; parameter
and input gradients are cleared before every pass, so each pass allocates them afresh. One
untimed pass over the first --prime-len tokens pages in kernels and one-off state; then the
memory baseline (parallel/bench/timing.py PeakMemory) and --trials trials of --warmup + --iters
forward + backward passes (timing.py's timer, the device synchronised). `--dtype bfloat16`
runs under bf16 autocast with float32 weights, as the trainer's precision=bf16 does.
The result is one JSON line after RESULT_MARKER on stdout; running out of memory is a result
(status oom), not a crash.
"""

from __future__ import annotations

import contextlib
import json

import torch

from models.attention import build_attention
from models.config import AttentionConfig
from parallel.bench.timing import PeakMemory, interleaved

from . import output

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Per-kind settings that differ from AttentionConfig's defaults, as in configs/attention/<kind>.yaml.
KIND_SETTINGS: dict[str, dict] = {"gau": {"chunk_size": 256}}
RESULT_MARKER = "BENCH_ATTENTION_RESULT "


def make_layer(kind: str, *, d_model: int, n_heads: int, seq_len: int) -> torch.nn.Module:
    """The mixing layer of one decoder block for `kind`, with its config-group settings."""
    return build_attention(AttentionConfig(kind=kind, **KIND_SETTINGS.get(kind, {})), d_model=d_model,
                           n_heads=n_heads, seq_len=seq_len, layer_idx=0)


def _sdpa_backend(q: torch.Tensor) -> str | None:
    """Which fused SDPA kernel causal attention on tensors like q would use (private torch API; None if absent)."""
    try:
        from torch.nn.attention import SDPBackend
        return SDPBackend(torch._fused_sdp_choice(q, q, q, is_causal=True)).name
    except Exception:  # noqa: BLE001 - informational only
        return None


def measure_case(kind: str, seq_len: int, a) -> dict:
    """Times the passes of one layer and measures their peak memory growth, in this process."""
    dev = torch.device(a.device)
    torch.manual_seed(a.seed)
    layer = make_layer(kind, d_model=a.d_model, n_heads=a.n_heads, seq_len=seq_len).to(dev)
    x = torch.randn(a.batch, seq_len, a.d_model, device=dev, requires_grad=True)
    grad_out = torch.randn(a.batch, seq_len, a.d_model, device=dev, dtype=DTYPES[a.dtype])
    bf16 = a.dtype == "bfloat16"
    params = list(layer.parameters())

    def step(inp: torch.Tensor = x, grad: torch.Tensor = grad_out) -> None:
        for p in params:
            p.grad = None
        inp.grad = None
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            out = layer(inp)
        out.backward(grad if out.dtype == grad.dtype else grad.to(out.dtype))

    if a.prime_len > 0:  # page in kernels and lazily built state before the baseline; neither timed nor measured
        n = min(a.prime_len, seq_len)
        step(x[:, :n].detach().clone().requires_grad_(True), grad_out[:, :n].clone())
        for p in params:
            p.grad = None
    extra: dict = {}
    if kind == "softmax":
        probe = torch.empty(a.batch, a.n_heads, seq_len, a.d_model // a.n_heads, device=dev,
                            dtype=torch.bfloat16 if bf16 else torch.float32)
        extra["sdpa_backend"] = _sdpa_backend(probe)
        del probe
    memory = PeakMemory(dev)
    trial_s = interleaved({kind: step}, trials=a.trials, warmup=a.warmup, iters=a.iters, device=dev)[kind]
    return {"status": "ok", **output.timed(trial_s), "peak_mem_mb": memory.growth_mb(), "mem_method": memory.method,
            "mem_baseline_mb": memory.baseline_mb, "mem_slack_mb": memory.slack_mb,
            "threads": torch.get_num_threads(), **extra}


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


def run_child(a) -> int:
    """`--one KIND LEN`: measures that case and prints its result line."""
    kind, seq_len = a.one[0], int(a.one[1])
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    try:
        result, code = measure_case(kind, seq_len, a), 0
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which goes on
        oom = _is_oom(exc)
        result = {"status": "oom" if oom else "error", "message": f"{type(exc).__name__}: {exc}"[:500]}
        code = 0 if oom else 1
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return code
