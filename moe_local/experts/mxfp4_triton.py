"""The CUDA decode matmul for MXFP4 (`weights/mxfp4.py` owns the layout): a Triton kernel that reads the 4-bit
blocks and the E8M0 scales straight from device memory, widens them in registers and accumulates x @ W.T
in fp32, for the few rows of a decode step; and `benchmark_decode`, its time against the time to read its
bytes. Imported only when a CUDA tensor needs it: Triton is not a dependency of the CPU runtime."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from moe_local.weights.mxfp4 import BLOCK, _check, dequantize_fast, mxfp4_bytes, quantize


@triton.jit
def _e2m1_times_2_14(code):
    """E2M1 codes (int32, 0..15) -> value * 2**-14, in fp32: the code's sign and 3 magnitude bits placed in
    an fp16's sign, exponent and top mantissa bits make exactly that fp16 (0.5 a subnormal, which the
    conversion to fp32 keeps); 6 integer operations and a conversion, no table, no branch."""
    bits = ((code & 7) << 9) | ((code & 8) << 12)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _decode_kernel(
    x_ptr, blocks_ptr, scales_ptr, y_ptr,  # x [M, K], blocks uint8 [N, K/32, 16], scales uint8 [N, K/32], y [M, N]
    N, K, stride_xm, stride_ym,
    slots_ptr, stride_slot,  # GROUPED: row m's W lies slots[m] * stride_slot bytes further on
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, GROUPED: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_N rows of W (outputs) for one row of x (program_id 1), walking K by BLOCK_G
    blocks of 32 weights. Even k sit in the low nibbles, odd k in the high ones, so x is read as its even
    and odd columns and nothing is interleaved in registers; each block's 16 bytes are one thread's
    vector load, its 32 products are summed in that thread, then scaled once. GROUPED: each row of x has
    its own W, an expert in a slot of the pool (the same arithmetic, another address)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    x_row = x_ptr + tl.program_id(1) * stride_xm
    if GROUPED:
        base = tl.load(slots_ptr + tl.program_id(1)).to(tl.int64) * stride_slot
        blocks_ptr += base
        scales_ptr += base
    groups = tl.arange(0, BLOCK_G)  # [BG]
    pairs = tl.arange(0, 16)  # [16]: byte j of a block = the weights at k = 2j and 2j + 1
    n_groups = K // 32
    row_ok = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
    for g0 in range(0, n_groups, BLOCK_G):
        g = g0 + groups  # [BG]
        g_ok = g < n_groups
        ok = row_ok[:, None] & g_ok[None, :]  # [BN, BG]
        byte_at = blocks_ptr + (rows[:, None] * n_groups + g[None, :])[:, :, None] * 16 + pairs[None, None, :]
        byte = tl.load(byte_at, mask=ok[:, :, None], other=0).to(tl.int32)  # [BN, BG, 16]
        s = tl.load(scales_ptr + rows[:, None] * n_groups + g[None, :], mask=ok, other=0).to(tl.int32)
        # [BN, BG]: 2**(s - 127) times 2**14; s = 0 gives 0, not 2**-127 (quantize writes 0 only for all-zero blocks)
        scale = (s << 23).to(tl.float32, bitcast=True) * 16384.0
        k_even = g[:, None] * 32 + 2 * pairs[None, :]  # [BG, 16]
        x_even = tl.load(x_row + k_even, mask=g_ok[:, None], other=0.0).to(tl.float32)
        x_odd = tl.load(x_row + k_even + 1, mask=g_ok[:, None], other=0.0).to(tl.float32)
        products = _e2m1_times_2_14(byte & 15) * x_even[None, :, :] + _e2m1_times_2_14(byte >> 4) * x_odd[None, :, :]
        acc += tl.sum(products, axis=2) * scale  # [BN, BG]
    y = tl.sum(acc, axis=1)  # [BN]
    tl.store(y_ptr + tl.program_id(1) * stride_ym + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


# (BLOCK_N, BLOCK_G, num_warps): rows of W per program (a 2880-row matrix makes 360 programs per row of x)
# and blocks of 32 per step along K. Swept on an H200 for M = 1 (2880 x 2880 and 5760 x 2880): BLOCK_N 4..8
# with BLOCK_G 16..32 are within 5% of each other (8.0..8.5 and 11.2..12.3 us); fewer rows per program, or
# the whole of K in one step (BLOCK_G 128), are slower; loading the next step's bytes before this step's
# arithmetic, or x in the weights' own layout, moved it by +-10% either way, so neither is here.
DECODE_CONFIG = (8, 16, 4)


def linear_decode(
    x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, config: tuple[int, int, int] | None = None
) -> torch.Tensor:
    """x [M, K] (CUDA, bf16/fp16/fp32) @ W.T -> [M, N] in x's dtype, W = MXFP4 blocks [N, K/32, 16] and
    scales [N, K/32] on the same device; fp32 accumulation. Meant for a few rows (`mxfp4.DECODE_MAX_ROWS`):
    each row of x is its own set of programs."""
    _check(blocks, scales)
    m, k = x.shape
    n = blocks.shape[0]
    if k != blocks.shape[1] * BLOCK:
        raise ValueError(f"x has {k} columns, the MXFP4 matrix {blocks.shape[1] * BLOCK}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    blocks, scales = blocks.contiguous(), scales.contiguous()
    block_n, block_g, num_warps = config or DECODE_CONFIG
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n), m)  # each row of x reads W again, from L2 after the first
    _decode_kernel[grid](
        x, blocks, scales, y, n, k, x.stride(0), y.stride(0), blocks, 0,
        BLOCK_N=block_n, BLOCK_G=block_g, GROUPED=False, num_warps=num_warps,
    )  # fmt: skip
    return y


def linear_grouped(
    x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor, stride_slot: int, n: int,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Row m of x [G, K] (or the one row of x [1, K] for every m) @ W_m.T -> [G, N] in x's dtype, one launch
    for a decode token's G experts: W_m is the MXFP4 [N, K] matrix whose blocks start at byte
    slots[m] * stride_slot of `blocks` and whose scales start there in `scales` (1-d uint8 views of a slot
    pool, each starting at the part's offset within a slot; slots int64 [G] on x's device). Each W_m gives
    the same bits as `linear_decode` on it."""
    g = slots.shape[0]
    k = x.shape[1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    block_n, block_g, num_warps = config or DECODE_CONFIG
    y = torch.empty(g, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n), g)
    _decode_kernel[grid](
        x, blocks, scales, y, n, k, x.stride(0) if x.shape[0] > 1 else 0, y.stride(0), slots, stride_slot,
        BLOCK_N=block_n, BLOCK_G=block_g, GROUPED=True, num_warps=num_warps,
    )  # fmt: skip
    return y


@triton.jit
def _widen_kernel(blocks_ptr, scales_ptr, w_ptr, n_blocks, BLOCK_B: tl.constexpr):
    """BLOCK_B blocks of 32 weights per program: 16 bytes and a scale each -> 32 values of w's dtype, the
    low nibble first (w [N, K] and blocks [N, K/32, 16] walk the same order)."""
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BB]
    ok = b < n_blocks
    byte = tl.load(blocks_ptr + b[:, None] * 16 + tl.arange(0, 16)[None, :], mask=ok[:, None], other=0).to(tl.int32)
    s = tl.load(scales_ptr + b, mask=ok, other=0).to(tl.int32)
    scale = ((s << 23).to(tl.float32, bitcast=True) * 16384.0)[:, None]  # as the decode kernel's
    pairs = tl.interleave(_e2m1_times_2_14(byte & 15) * scale, _e2m1_times_2_14(byte >> 4) * scale)  # [BB, 32]
    tl.store(w_ptr + b[:, None] * 32 + tl.arange(0, 32)[None, :], pairs.to(w_ptr.dtype.element_ty), mask=ok[:, None])


WIDEN_BLOCKS = 64  # blocks of 32 weights per program


def widen(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks [N, K/32, 16], scales [N, K/32] (CUDA) -> W [N, K] in `dtype`, in one launch: what a prefill
    chunk multiplies by. The bits of `mxfp4.dequantize` for every scale byte but 0, which gives 0 here
    (`quantize` writes it only for all-zero blocks), as in the decode kernel."""
    _check(blocks, scales)
    n, g, _ = blocks.shape
    blocks, scales = blocks.contiguous(), scales.contiguous()
    w = torch.empty(n, g * BLOCK, dtype=dtype, device=blocks.device)
    _widen_kernel[(triton.cdiv(n * g, WIDEN_BLOCKS),)](blocks, scales, w, n * g, BLOCK_B=WIDEN_BLOCKS)
    return w


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
    `prefill_widen_us` (`widen` alone, what a prefill chunk pays per matrix; `torch_widen_us`: the same
    with torch's ops, `mxfp4.dequantize_fast`); and `ratio` =
    kernel_us / read_us (the target is <= 2).

    On an H200 (bf16, M = 1): 2880 x 2880 8.3 us against 1.0 us to read it (ratio 8.0; bf16 F.linear on the
    widened matrix 9.9 us), 5760 x 2880 11.3 us against 2.1 us (5.4; F.linear 11.5 us). About 5 us of it is
    fixed whatever the size, so the target is not met for matrices this small; eager_us (launched from
    Python) is 21..45 us, so a decode step that launches kernels one by one is bound by the host."""
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
        "prefill_widen_us": _graph_us([lambda b=b, s=s: widen(b, s, dtype) for b, s in mats]),
        "torch_widen_us": _graph_us([lambda b=b, s=s: dequantize_fast(b, s, dtype) for b, s in mats]),
        "bandwidth_gbps": bandwidth / 1e9,
    }
    result["ratio"] = result["kernel_us"] / result["read_us"]
    return result
