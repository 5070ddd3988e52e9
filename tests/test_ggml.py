"""ggml's block numerics (`moe_local/weights/ggml.py`) and the CPU kernel for a GGUF's Q8_0/Q4_0 experts
(`experts_ggml` in cpu_kernels.c, through `formats.Ggml`), against gguf-py's own quantization and
dequantization (`gguf.quants`, llama.cpp's reference code in numpy)."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from moe_local import native
from moe_local.config import preset_config
from moe_local.experts.formats import Ggml
from moe_local.weights import ggml


def blocks(values: np.ndarray, qtype: T) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.quantize(values.astype(np.float32), qtype))


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q5_0])  # Q5_0: through gguf.quants itself
def test_dequantize_gives_gguf_pys_values(qtype):
    values = np.random.default_rng(0).standard_normal((6, 512)) * 3
    raw = blocks(values, qtype).view(torch.uint8).view(6, -1)
    assert raw.shape[1] == ggml.row_bytes(qtype, 512)
    ours = ggml.dequantize(raw, qtype, 512)
    assert np.array_equal(ours.numpy(), gguf.quants.dequantize(raw.numpy(), qtype).reshape(6, 512))


def experts(qtype: T, n: int, seed: int = 0):
    """A Ggml format for a 256-wide model with FFN 512, and n random experts' views in it, quantized by gguf-py."""
    cfg = dataclasses.replace(preset_config("tiny"), dim=256, ffn_dim=512)
    fmt, rng, views = Ggml(cfg, qtype, qtype), np.random.default_rng(seed), []
    for _ in range(n):
        buffer = torch.empty(fmt.expert_bytes, dtype=torch.uint8)
        fmt.write({"gate_up": blocks(rng.standard_normal((1024, 256)), qtype), "down": blocks(rng.standard_normal((256, 512)), qtype)}, buffer)
        views.append(fmt.unpack(buffer))
    return cfg, fmt, views


def q8_0(x: torch.Tensor) -> torch.Tensor:
    """x rounded to Q8_0 blocks as llama.cpp rounds an activation row before a Q8_0/Q4_0 dot product (float64)."""
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x.numpy(), T.Q8_0), T.Q8_0)).double()


needs_kernel = pytest.mark.skipif(native.unavailable() is not None or not native.library().experts_ggml_blocks,
                                  reason="moe-local's CPU kernels for a GGUF's blocks are not built here (x86 with AVX2 and F16C)")


@needs_kernel
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0])
def test_kernel_is_llama_cpps_arithmetic(qtype):
    """llama.cpp's vec_dot_q8_0_q8_0 / vec_dot_q4_0_q8_0: the weights' values (gguf-py's dequantization) times the
    activations rounded to Q8_0, h = silu(gate) * up rounded to Q8_0 again for down. The kernel's fp32 sums run
    in another order than this float64 reference, so a value of h at a step's midpoint within that difference
    rounds the other way, and its row of outputs moves by one step of h times a column of down (about one row in
    ten at these widths): most rows are within 1e-5 of the scale, every row within 2%."""
    cfg, fmt, views = experts(qtype, 3)
    counts = [2, 0, 20]  # an expert with no rows, one with more than a kernel call takes at once
    xs = torch.randn(sum(counts), cfg.dim, generator=torch.Generator().manual_seed(1))
    y = fmt.forward_grouped(xs, counts, views)
    expected, start = [], 0
    for view, count in zip(views, counts):
        x, start = xs[start : start + count], start + count
        if count:
            gate_up = q8_0(x) @ ggml.dequantize(view["gate_up"], qtype, cfg.dim).double().T  # [n, 2F]
            h = torch.nn.functional.silu(gate_up[:, : cfg.ffn_dim]) * gate_up[:, cfg.ffn_dim :]  # [n, F]
            expected.append(q8_0(h.float()) @ ggml.dequantize(view["down"], qtype, cfg.ffn_dim).double().T)
    expected = torch.cat(expected)
    error, scale = (y.double() - expected).abs().amax(1), expected.abs().max()  # [R], per row
    assert (error <= 1e-5 * scale).float().mean() >= 0.8 and (error <= 0.02 * scale).all()


@needs_kernel
def test_kernel_gives_each_row_the_same_bits_alone_or_grouped():
    cfg, fmt, views = experts(T.Q4_0, 2)
    xs = torch.randn(19, cfg.dim, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(2))
    grouped = fmt.forward_grouped(xs, [1, 18], views)
    assert grouped.dtype == torch.bfloat16
    assert torch.equal(fmt.forward(xs[:1], views[0]), grouped[:1])
    assert torch.equal(torch.cat([fmt.forward(xs[i : i + 1], views[1]) for i in range(1, 19)]), grouped[1:])


def test_without_the_kernels_experts_compute_exactly_on_the_files_values(monkeypatch, rebuilt):
    monkeypatch.setenv("MOE_LOCAL_KERNELS", "0")
    native.library.cache_clear()
    cfg, fmt, views = experts(T.Q8_0, 1)
    x = torch.randn(3, cfg.dim, generator=torch.Generator().manual_seed(3))
    gate_up = x.double() @ torch.from_numpy(gguf.quants.dequantize(views[0]["gate_up"].numpy(), T.Q8_0)).double().T
    h = torch.nn.functional.silu(gate_up[:, : cfg.ffn_dim]) * gate_up[:, cfg.ffn_dim :]
    expected = h @ torch.from_numpy(gguf.quants.dequantize(views[0]["down"].numpy(), T.Q8_0)).double().T
    assert fmt.forward_grouped(x, [3], views) is None
    assert (fmt.forward(x, views[0]).double() - expected).abs().max() <= 1e-5 * expected.abs().max()
