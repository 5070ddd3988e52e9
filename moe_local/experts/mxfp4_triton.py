"""The CUDA decode matmul for MXFP4 (`mxfp4.py` owns the layout): a Triton kernel that reads the 4-bit
blocks and the E8M0 scales straight from device memory, widens them in registers and accumulates x @ W.T
in fp32, for the few rows of a decode step; and `benchmark_decode`, its time against the time to read its
bytes. Imported only when a CUDA tensor needs it: Triton is not a dependency of the CPU runtime."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from moe_local.experts.mxfp4 import BLOCK, _check, dequantize_fast, mxfp4_bytes, quantize


@triton.jit
def _e2m1(code):
    """E2M1 codes (int32, 0..15) -> their values in fp32, without a table."""
    mag = code & 7
    # 2 <= mag <= 7 is a normal number, exponent (mag >> 1) - 1 and mantissa bit (mag & 1): as fp32 bits,
    # mag << 22 puts both in place and 126 << 23 adds the bias; mag = 0 and 1 (0 and 0.5) are subnormal
    normal = ((mag << 22) + (126 << 23)).to(tl.float32, bitcast=True)
    value = tl.where(mag >= 2, normal, mag.to(tl.float32) * 0.5)
    return tl.where(code >= 8, -value, value)


@triton.jit
def _decode_kernel(
    x_ptr, blocks_ptr, scales_ptr, y_ptr,  # x [M, K], blocks uint8 [N, K/2], scales uint8 [N, K/32], y [M, N]
    M, N, K, stride_xm, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_N rows of W (outputs) for all M rows of x, walking K in steps of BLOCK_K weights
    (BLOCK_K / 2 bytes of each row). Even k sit in the low nibbles, odd k in the high ones, so x is read
    as its even and odd columns and no interleaving is needed in registers."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    ms = tl.arange(0, BLOCK_M)  # [BM]
    pairs = tl.arange(0, BLOCK_K // 2)  # [BK/2]: a byte = the weights at k = 2j and 2j + 1
    row_ok = rows < N
    m_ok = ms < M
    row_bytes = K // 2
    row_groups = K // 32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        b = k0 // 2 + pairs  # [BK/2] byte index within a row
        b_ok = b < row_bytes
        w_ok = row_ok[:, None] & b_ok[None, :]
        byte = tl.load(blocks_ptr + rows[:, None] * row_bytes + b[None, :], mask=w_ok, other=0).to(tl.int32)
        # each scale is read by its 16 bytes' lanes: the same address, served by L1
        s = tl.load(scales_ptr + rows[:, None] * row_groups + (b // 16)[None, :], mask=w_ok, other=0).to(tl.int32)
        scale = (s << 23).to(tl.float32, bitcast=True)  # 2**(s - 127) (0 for s = 0, which no block uses)
        w_even = _e2m1(byte & 15) * scale  # [BN, BK/2]: W[n, k0 + 2j]
        w_odd = _e2m1(byte >> 4) * scale  # W[n, k0 + 2j + 1]
        x_ok = m_ok[:, None] & b_ok[None, :]
        x_row = x_ptr + ms[:, None] * stride_xm + 2 * b[None, :]
        x_even = tl.load(x_row, mask=x_ok, other=0.0).to(tl.float32)  # [BM, BK/2]
        x_odd = tl.load(x_row + 1, mask=x_ok, other=0.0).to(tl.float32)
        acc += tl.sum(x_even[:, None, :] * w_even[None, :, :] + x_odd[:, None, :] * w_odd[None, :, :], axis=2)
    y = y_ptr + ms[:, None] * stride_ym + rows[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & row_ok[None, :])


def decode_config(m: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for M rows of x: few rows of W per program, so that even a 2880-row
    matrix makes hundreds of programs, and a long step along K, so that each program issues its loads
    in few round trips to memory; the [BM, BN, BK/2] product stays at 4096 elements or fewer."""
    block_m = triton.next_power_of_2(m)
    block_k = 1024 if block_m <= 2 else 256
    block_n = max(1, min(8, 8192 // (block_m * block_k)))
    return block_n, block_k, 4


def linear_decode(
    x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, config: tuple[int, int, int] | None = None
) -> torch.Tensor:
    """x [M, K] (CUDA, bf16/fp16/fp32) @ W.T -> [M, N] in x's dtype, W = MXFP4 blocks [N, K/32, 16] and
    scales [N, K/32] on the same device; fp32 accumulation. Meant for M <= 16 (`mxfp4.DECODE_MAX_ROWS`)."""
    _check(blocks, scales)
    m, k = x.shape
    n = blocks.shape[0]
    if k != blocks.shape[1] * BLOCK:
        raise ValueError(f"x has {k} columns, the MXFP4 matrix {blocks.shape[1] * BLOCK}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    blocks, scales = blocks.contiguous(), scales.contiguous()
    block_n, block_k, num_warps = config or decode_config(m)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n),)
    _decode_kernel[grid](
        x, blocks, scales, y, m, n, k, x.stride(0), y.stride(0),
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
    )  # fmt: skip
    return y


def _copy_bandwidth(device: torch.device) -> float:
    """Bytes per second the device reads in a large device-to-device copy (a copy reads and writes each
    byte once; both are counted, as memory bandwidth is quoted)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * src.numel() * 10 / (start.elapsed_time(end) / 1e3)


def _graph_us(calls: list, replays: int = 20) -> float:
    """Device time per call of `calls` (closures), captured in one CUDA graph so that the host's launch
    cost does not count."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # warm up (compiles the kernel) outside the capture
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * len(calls))


def _eager_us(calls: list, rounds: int = 5) -> float:
    """Time per call issued from Python one by one (the host's launch cost included)."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(rounds):
        for call in calls:
            call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (rounds * len(calls))


@torch.inference_mode()
def benchmark_decode(
    n: int, k: int, m: int = 1, dtype: torch.dtype = torch.bfloat16, config: tuple[int, int, int] | None = None
) -> dict[str, float]:
    """Time one x [M, K] @ W.T with W an MXFP4 [N, K] matrix on the current CUDA device. Enough distinct
    copies of W are cycled through that they do not fit in L2 twice over, so each call reads its weights
    from device memory, as a decode step does. Returns microseconds per call: `kernel_us` (CUDA graph:
    device time alone), `eager_us` (launched from Python), `read_us` (mxfp4_bytes(n, k) at the measured
    copy bandwidth), `dense_us` (F.linear on the same matrix widened to `dtype`, also out of L2) and
    `prefill_widen_us` (dequantize_fast alone, what a prefill chunk pays per matrix); and `ratio` =
    kernel_us / read_us (the target is <= 2)."""
    device = torch.device("cuda")
    nbytes = mxfp4_bytes(n, k)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    copies = max(2, math.ceil(2 * l2 / nbytes))
    blocks, scales = quantize(torch.randn(n, k, device=device) * 0.02)
    mats = [(blocks.clone(), scales.clone()) for _ in range(copies)]
    x = torch.randn(m, k, device=device, dtype=dtype)
    kernel = [lambda b=b, s=s: linear_decode(x, b, s, config) for b, s in mats]
    dense_copies = max(2, math.ceil(2 * l2 / (n * k * dtype.itemsize)))
    dense = [dequantize_fast(blocks, scales, dtype) for _ in range(dense_copies)]
    bandwidth = _copy_bandwidth(device)
    result = {
        "kernel_us": _graph_us(kernel),
        "eager_us": _eager_us(kernel),
        "read_us": nbytes / bandwidth * 1e6,
        "dense_us": _graph_us([lambda w=w: torch.nn.functional.linear(x, w) for w in dense]),
        "prefill_widen_us": _graph_us([lambda b=b, s=s: dequantize_fast(b, s, dtype) for b, s in mats]),
        "bandwidth_gbps": bandwidth / 1e9,
    }
    result["ratio"] = result["kernel_us"] / result["read_us"]
    return result
