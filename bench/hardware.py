"""The machine a benchmark runs on, its peak rates, and the roofline model (bench/README.md).

This is the one place that holds the peak table. Peaks are the vendors' datasheet
figures for dense (not 2:4-sparse) tensor-core math and for DRAM bandwidth; a device
not in the table gets no roofline share (``None``), never a guessed one.

Nothing here touches CUDA at import.
"""

from __future__ import annotations

import functools
import os
import platform

import torch

# name substring (matched against torch.cuda.get_device_name, first match wins):
# TFLOP/s by math precision, and DRAM bandwidth in TB/s.
GPU_PEAKS = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0, "tb_s": 2.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0, "tb_s": 3.9}),
    # H100 SXM5 (torch reports "NVIDIA H100 80GB HBM3"); an unqualified "H100" is taken as SXM.
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9, "tb_s": 3.35}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9, "tb_s": 4.8}),
    ("A100-SXM4-80GB", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5, "tb_s": 2.039}),
    ("A100-SXM4-40GB", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5, "tb_s": 1.555}),
    ("A100 80GB PCIe", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5, "tb_s": 1.935}),
    ("A100-PCIE-40GB", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5, "tb_s": 1.555}),
]

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@functools.cache
def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device | str) -> str:
    """What ``extra_info['device']`` says: the GPU's name, or the CPU model and thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def gpu_peaks(device: torch.device | str) -> tuple[str, dict] | None:
    """``(table key, peaks)`` for a CUDA device, None for a CPU or a GPU not in the table."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in GPU_PEAKS:
        if key.lower() in name.lower():
            return key, peaks
    return None


def math_precision(dtype: torch.dtype) -> str:
    """The tensor-core precision a GEMM in ``dtype`` runs at (fp32 is tf32 where torch allows it)."""
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


# --- the work a linear layer's backward does (bench/README.md) ------------------------


def backward_flops(M: int, d_in: int, d_out: int, k: int | None) -> int:
    """Useful FLOPs of one backward: ``4*M*in*out`` dense, ``4*M*in*k`` meProp (k=None: dense)."""
    units = d_out if k is None else k
    return 4 * M * d_in * units


def backward_bytes(
    M: int, d_in: int, d_out: int, k: int | None, elem: int, sparse_grad: bool = False
) -> int:
    """Bytes a backward must move at the least (each operand read once, each result written once).

    Dense: read G, W, X; write grad_x and grad_W. meProp: read G once (scores and the dense
    bias gradient), then ``G[:, S]``, ``W[S, :]`` and X; write grad_x and grad_W, whose
    dense form is a full (out x in) write (the zeros included) and whose row-sparse form
    is k rows.
    """
    if k is None:
        return elem * (M * d_out + d_out * d_in + M * d_in + M * d_in + d_out * d_in)
    w_rows = k if sparse_grad else d_out
    return elem * (M * d_out + M * k + k * d_in + M * d_in + M * d_in + w_rows * d_in)


def roofline(device, dtype: torch.dtype, flops: int, nbytes: int, seconds: float) -> dict:
    """Achieved TFLOP/s and GB/s, and the share of the roofline bound reached.

    The bound is ``max(flops / peak_flops, bytes / peak_bandwidth)``; the share is that
    bound divided by the measured time (1.0 would be the hardware's limit). On a CPU, or
    on a GPU not in :data:`GPU_PEAKS`, only the achieved rates are given.
    """
    out = {
        "flops": int(flops),
        "bytes_min": int(nbytes),
        "tflops": round(flops / seconds / 1e12, 4) if seconds > 0 else None,
        "gb_s": round(nbytes / seconds / 1e9, 2) if seconds > 0 else None,
        "roofline_share": None,
    }
    found = gpu_peaks(device)
    if found is None or seconds <= 0:
        return out
    key, peaks = found
    precision = math_precision(dtype)
    bound_s = max(flops / (peaks[precision] * 1e12), nbytes / (peaks["tb_s"] * 1e12))
    out.update(
        roofline_share=round(bound_s / seconds, 4),
        roofline_bound_s=bound_s,
        peak_tflops=peaks[precision],
        peak_tb_s=peaks["tb_s"],
        peak_table_key=key,
        math_precision=precision,
    )
    return out
