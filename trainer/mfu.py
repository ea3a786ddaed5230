"""Model FLOPs utilisation: achieved model FLOP/s over the hardware's peak.

Peak per device: `trainer.peak_tflops` when given, else a table of dense bf16 / fp32
(TF32) tensor-core peaks for GPUs we know (vendor datasheets, SXM parts), else, for an
unknown GPU, a large matmul timed on it. On a CPU there is no honest peak to divide by
(a short matmul timed while other ranks start up once gave MFU above 1), so MFU is logged
as null there unless trainer.peak_tflops says what the peak is; the start-up log line
says which source was used.
"""

from __future__ import annotations

import time

import torch

# (bf16 dense, fp32 via TF32) peak FLOP/s
_GPU_PEAKS = {
    "H200": (989e12, 495e12),
    "H100": (989e12, 495e12),
    "A100": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "A10G": (70e12, 35e12),
    "V100": (125e12, 15.7e12),
}


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 512,
                         repeats: int = 8) -> float:
    """FLOP/s of `repeats` n x n matmuls on `device` (after two warm-up ones)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def peak_flops(device: torch.device, *, bf16: bool, override_tflops: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s of one device or None, where the number came from)."""
    if override_tflops is not None:
        return override_tflops * 1e12, "trainer.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (p16, p32) in _GPU_PEAKS.items():
            if key in name:
                return (p16 if bf16 else p32), f"datasheet {key}"
        dtype = torch.bfloat16 if bf16 else torch.float32
        return measure_matmul_flops(device, dtype, n=8192, repeats=20), f"measured {name}"
    return None, "none on CPU: MFU is null unless trainer.peak_tflops is set"
