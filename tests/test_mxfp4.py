"""MXFP4: the numerics (`moe_local/weights/mxfp4.py`: the checkpoint layout as transformers reads it, quantizing)
and the matmuls on the CPU and (marked gpu) CUDA (`moe_local/experts/mxfp4.py`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_local import native
from moe_local.experts import mxfp4 as matmuls
from moe_local.experts.mxfp4 import NATIVE_MAX_ROWS, linear, linear_cpu
from moe_local.weights import mxfp4

GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # E2M1 magnitudes
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def random_mxfp4(n: int, k: int, seed: int = 0, scales: tuple[int, int] = (0, 255)):
    """Random blocks [N, K/32, 16] and scales [N, K/32] (every byte, every finite scale by default)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (n, k // 32, 16), dtype=torch.uint8, generator=gen)
    return blocks, torch.randint(*scales, (n, k // 32), dtype=torch.uint8, generator=gen)


def weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Random weights whose 32-blocks span many magnitudes, with some all-zero blocks and exact zeros."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k // 32, 32, generator=gen) * torch.exp2(torch.randint(-20, 10, (n, k // 32, 1), generator=gen))
    w[0, 0] = 0.0
    w[w.abs() < 1e-7] = 0.0
    return w.view(n, k)


def test_mxfp4_is_4_25_bits_per_weight():
    assert mxfp4.mxfp4_bytes(2880, 2880) * 8 / (2880 * 2880) == 4.25
    blocks, scales = mxfp4.quantize(torch.randn(64, 96))
    assert blocks.numel() + scales.numel() == mxfp4.mxfp4_bytes(64, 96)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_dequantize_equals_transformers_conversion_bit_for_bit(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = random_mxfp4(3 * 24, 128)
    blocks, scales = blocks.view(3, 24, 4, 16), scales.view(3, 24, 4)  # the checkpoint's [E, R, K/32, 16]
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, K, R]: x @ W for transformers
    for e in range(3):
        want = theirs[e].T.contiguous().view(BITS[dtype])  # our [R, K]: rows are outputs
        assert torch.equal(mxfp4.dequantize(blocks[e], scales[e], dtype).view(BITS[dtype]), want)
        assert torch.equal(mxfp4.dequantize_fast(blocks[e], scales[e], dtype).view(BITS[dtype]), want)


def test_checkpoint_rows_are_outputs_with_gate_and_up_interleaved():
    """gate_up_proj_blocks[e] is W [2F, D] in F.linear's orientation: transformers' expert computes
    x @ gate_up_proj[e] and takes columns 0::2 as gate and 1::2 as up; row 2i of W is gate unit i."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    f, d = 8, 64
    gate, up = torch.randn(f, d), torch.randn(f, d)
    blocks, scales = mxfp4.quantize(torch.stack([gate, up], dim=1).view(2 * f, d))  # rows gate0, up0, gate1, ...
    gate_up = convert_moe_packed_tensors(blocks[None], scales[None], dtype=torch.float32)[0]  # [D, 2F]
    x = torch.randn(3, d)
    ours = linear_cpu(x, blocks, scales)  # [3, 2F]
    torch.testing.assert_close(ours, x @ gate_up, rtol=1e-5, atol=1e-5)
    w = mxfp4.dequantize(blocks, scales, torch.float32)
    assert torch.equal(gate_up[:, 0::2].T, w[0::2]) and torch.equal(gate_up[:, 1::2].T, w[1::2])
    assert torch.equal(w[0::2], mxfp4.dequantize(*mxfp4.quantize(gate), torch.float32))  # rows are quantized alone


def test_low_nibble_is_the_even_column():
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x72  # low nibble 2 (1.0) at k = 0, high nibble 7 (6.0) at k = 1
    w = mxfp4.dequantize(blocks, torch.full((1, 1), 127, dtype=torch.uint8), torch.float32)
    assert w[0, :3].tolist() == [1.0, 6.0, 0.0]


def test_every_value_is_within_half_an_e2m1_step_of_the_scaled_grid():
    w = weights(48, 256)
    blocks, scales = mxfp4.quantize(w)
    scale = torch.ldexp(torch.ones(scales.shape), scales.int() - 127)[..., None]  # [N, G, 1]
    amax = w.view(48, 8, 32).abs().amax(dim=-1, keepdim=True)
    # the scale is the smallest power of two that fits the block's largest value in 6 (no clipping)
    assert (amax / scale <= 6).all() and ((amax / scale > 3) | (amax == 0)).all()
    scaled = w.view(48, 8, 32) / scale
    got = mxfp4.dequantize(blocks, scales, torch.float32).view(48, 8, 32) / scale
    nearest = (scaled.abs()[..., None] - GRID).abs().amin(dim=-1)  # distance to the closest grid value
    assert torch.equal((scaled - got).abs(), nearest)  # what was chosen is a closest grid value...
    assert (torch.sign(got) * torch.sign(scaled) >= 0).all()  # ...on the same side of zero
    steps = torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 2.0, 2.0])  # gap to the next grid value above
    assert ((scaled - got).abs() <= steps[torch.bucketize(got.abs(), GRID)] / 2).all()


def test_midpoints_round_away_from_zero():
    w = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0] + [0.0] * 22)[None]
    blocks, scales = mxfp4.quantize(w)
    assert scales.item() == 127
    got = mxfp4.dequantize(blocks, scales, torch.float32)[0, :10].tolist()
    assert got == [6.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.5, -6.0]


def test_representable_values_round_trip_exactly():
    blocks, scales = random_mxfp4(32, 128, scales=(100, 150))
    blocks[:, :, 0] = 0x77  # a 6.0 in every block, so that its scale is the one quantize picks
    w = mxfp4.dequantize(blocks, scales, torch.float32)
    again_blocks, again_scales = mxfp4.quantize(w)
    assert torch.equal(again_blocks, blocks) and torch.equal(again_scales, scales)
    assert torch.equal(mxfp4.dequantize(*mxfp4.quantize(w.bfloat16()), torch.float32), w)


def test_quantize_names_a_width_that_is_not_a_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.quantize(torch.randn(4, 48))


@pytest.mark.parametrize("chunk_rows", [1024, 32])
@pytest.mark.parametrize("m", [1, 5])
def test_linear_cpu_equals_dequantize_then_linear(m, chunk_rows, monkeypatch):
    monkeypatch.setattr(matmuls, "CPU_CHUNK_ROWS", chunk_rows)  # 32: W is widened in 3 chunks
    blocks, scales = random_mxfp4(96, 160, scales=(115, 130))
    x = torch.randn(m, 160)
    want = F.linear(x, mxfp4.dequantize(blocks, scales, torch.float32))
    torch.testing.assert_close(linear_cpu(x, blocks, scales), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    # bf16: the widened weights are exact; only x and the output are rounded to bf16's 8 bits, and
    # the matmul accumulates in fp32, so the error is that of x's and y's rounding: within 2**-7 of |y|max
    xb = x.bfloat16()
    got = linear_cpu(xb, blocks, scales)
    assert got.dtype == torch.bfloat16
    want_b = F.linear(xb.float(), mxfp4.dequantize(blocks, scales, torch.float32))
    torch.testing.assert_close(got.float(), want_b, rtol=2**-7, atol=2**-7 * want_b.abs().max().item())


@pytest.mark.skipif(native.unavailable() is not None, reason=f"moe-local's CPU kernels: {native.unavailable()}")
@pytest.mark.parametrize("flags", ["", "-mno-avx512bf16"])  # bf16 pairs where the CPU has them, and widened to fp32
def test_the_cpu_kernel_takes_a_bf16_tokens_product_and_reads_nibbles_and_scales_like_the_reference(rebuilt, monkeypatch, flags):
    monkeypatch.setenv("MOE_LOCAL_KERNEL_FLAGS", flags)
    blocks, scales = random_mxfp4(48, 256, scales=(100, 140))
    scales[:, 0], scales[0, 1] = 0, 200  # the subnormal 2^-127, and a large one
    w = mxfp4.dequantize(blocks, scales, torch.float32)
    # one-hot rows pick columns of W: every widened weight, exactly (bf16 holds each E2M1 value times a power of 2)
    for rows in (torch.eye(256)[i : i + 4] for i in range(0, 256, 4)):
        got = linear_cpu(rows.bfloat16(), blocks, scales)
        assert torch.equal(got, (rows @ w.T).bfloat16())
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(NATIVE_MAX_ROWS, 256, generator=gen).bfloat16()
    together = linear_cpu(x, blocks, scales)
    want = x.double() @ w.double().T  # fp32 sums of exact products: only the output's bf16 rounding is left
    torch.testing.assert_close(together.double(), want, rtol=2**-8, atol=2**-8 * want.abs().max().item())
    for m in (1, 2, 3, 5):  # a row's result does not depend on the rows beside it
        assert torch.equal(linear_cpu(x[m : m + m], blocks, scales), together[m : m + m])
    # more rows, or an odd number of blocks: widened by torch, as before
    many = torch.randn(NATIVE_MAX_ROWS + 1, 256, generator=gen).bfloat16()
    assert torch.equal(linear_cpu(many, blocks, scales), F.linear(many, mxfp4.dequantize_fast(blocks, scales, torch.bfloat16)))
    odd, odd_scales = random_mxfp4(16, 160, scales=(115, 130))
    assert torch.equal(linear_cpu(x[:1, :160], odd, odd_scales), F.linear(x[:1, :160], mxfp4.dequantize_fast(odd, odd_scales, torch.bfloat16)))


# --- CUDA (skipped without a GPU): python -m pytest -q -m gpu tests/test_mxfp4.py -s


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", [(64, 96), (2880, 2880), (5760, 2880)])
@pytest.mark.parametrize("m", [1, 4, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_linear_equals_dequantize_then_linear(n, k, m, dtype):
    """m <= 16 runs the Triton kernel, 64 the widened matmul (prefill)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    blocks, scales = mxfp4.quantize(weights(n, k) * 0.01)
    x = torch.randn(m, k, dtype=dtype)
    want = F.linear(x.float(), mxfp4.dequantize(blocks, scales, torch.float32))  # CPU fp32 reference
    got = linear(x.cuda(), blocks.cuda(), scales.cuda()).cpu()
    assert got.dtype == dtype and got.shape == (m, n)
    tol = 1e-5 if dtype == torch.float32 else 2**-7  # fp32 sums in another order; bf16 rounds y (and x)
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.gpu
def test_cuda_kernel_reads_scales_and_nibbles_like_the_reference():
    """Random bytes and every scale a weight of gpt-oss could have: the kernel widens what `dequantize`
    widens (fp32 x, so that only the order of the sums differs)."""
    blocks, scales = random_mxfp4(256, 512, scales=(100, 140))
    x = torch.randn(3, 512)
    want = F.linear(x, mxfp4.dequantize(blocks, scales, torch.float32))
    got = linear(x.cuda(), blocks.cuda(), scales.cuda()).cpu()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert torch.equal(mxfp4.dequantize_fast(blocks.cuda(), scales.cuda(), torch.bfloat16).cpu(), mxfp4.dequantize(blocks, scales))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_cuda_widening_for_prefill_gives_the_reference_bits(dtype):
    from moe_local.experts.mxfp4_triton import widen

    blocks, scales = random_mxfp4(100, 416, scales=(100, 140))  # 1300 blocks: the last program is partly masked
    assert torch.equal(widen(blocks.cuda(), scales.cuda(), dtype).cpu(), mxfp4.dequantize(blocks, scales, dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 3])
def test_cuda_grouped_decode_gives_each_matrix_the_bits_of_its_own_launch(rows):
    """`linear_grouped`: row m of x times the matrix in slot slots[m] of a pool (one row of x: shared)."""
    from moe_local.experts.mxfp4_triton import linear_decode, linear_grouped

    n, k, stride = 64, 128, 8192  # blocks take the first 4096 bytes of a slot, scales the next 256
    mats = [random_mxfp4(n, k, seed=s, scales=(110, 130)) for s in range(5)]
    pool = torch.zeros(5, stride, dtype=torch.uint8)
    for slot, (blocks, scales) in enumerate(mats):
        pool[slot, : blocks.numel()] = blocks.view(-1)
        pool[slot, 4096 : 4096 + scales.numel()] = scales.view(-1)
    flat = pool.view(-1).cuda()
    slots = [3, 0, 4]
    x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
    got = linear_grouped(x, flat, flat[4096:], torch.tensor(slots, device="cuda"), stride, n)
    for m, slot in enumerate(slots):
        blocks, scales = mats[slot]
        assert torch.equal(got[m], linear_decode(x[m % rows][None], blocks.cuda(), scales.cuda())[0])


@pytest.mark.gpu
def test_benchmark_decode_reports_the_kernel_against_the_bytes_it_reads():
    from moe_local.experts.mxfp4_triton import benchmark_decode

    result = benchmark_decode(2880, 2880)
    print("\nMXFP4 decode 2880x2880, M=1, bf16:", {key: round(v, 2) for key, v in result.items()})
    assert result["kernel_us"] > 0 and result["read_us"] > 0
