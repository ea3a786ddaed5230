"""Model FLOPs utilisation: achieved model FLOP/s over the hardware's peak.

Peak per device: a table of dense bf16 / fp32 tensor-core peaks for GPUs we know
(vendor datasheets, SXM parts), `trainer.peak_tflops` when given, and on a CPU the
matmul throughput this process measures at start-up (so CPU MFU reads as "fraction
of what a big matmul achieves here", not of a datasheet number).
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
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def peak_flops(device: torch.device, *, bf16: bool, override_tflops: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number came from)."""
    if override_tflops is not None:
        return override_tflops * 1e12, "trainer.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (p16, p32) in _GPU_PEAKS.items():
            if key in name:
                return (p16 if bf16 else p32), f"datasheet {key}"
        return measure_matmul_flops(device, torch.bfloat16 if bf16 else torch.float32, n=4096), f"measured {name}"
    return measure_matmul_flops(device), "measured CPU matmul"
