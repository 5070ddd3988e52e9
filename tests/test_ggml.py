"""ggml's block numerics (`moe_local/weights/ggml.py`) and the CPU kernel for a GGUF's Q8_0/Q4_0/Q4_K/Q5_K/Q6_K/...
experts (`experts_ggml` in cpu_kernels.c, through `formats.Ggml`), against gguf-py's own quantization and
dequantization (`gguf.quants`, llama.cpp's reference code in numpy). gguf-py cannot quantize to the K-quants
or the IQ types, so their blocks are random bytes with scales of a sensible size: every bit pattern of the values is one a file
may hold."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from moe_local import native
from moe_local.config import preset_config
from moe_local.experts.formats import Ggml
from moe_local.weights import ggml


K_QUANTS = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS, T.IQ2_XXS, T.IQ3_XXS]  # (blocks of 256, activations rounded to Q8_K)


def blocks(values: np.ndarray, qtype: T) -> torch.Tensor:
    """values [rows, n] in `qtype`'s blocks, uint8 [rows, row bytes]: gguf-py's quantization, or for a K-quant
    random blocks (with fp16 scales that keep the values near 1)."""
    rows, n = values.shape
    if qtype not in K_QUANTS:
        return torch.from_numpy(gguf.quants.quantize(values.astype(np.float32), qtype)).view(torch.uint8).view(rows, -1)
    rng, size = np.random.default_rng(int(values[0, 0] * 1e6) % 2**32), ggml.row_bytes(qtype, 256)
    raw = rng.integers(0, 256, (rows, n // 256, size), dtype=np.uint8)
    scales = {T.Q2_K: slice(80, 84), T.Q3_K: slice(108, 110), T.Q6_K: slice(208, 210)}.get(qtype, slice(0, 4) if qtype in (T.Q4_K, T.Q5_K) else slice(0, 2))  # Q4_K/Q5_K: d, dmin first
    low, high = (-2e-3, 2e-3) if qtype in (T.Q3_K, T.Q6_K, T.IQ2_XXS, T.IQ3_XXS) else (1e-3, 4e-3)
    raw[:, :, scales] = rng.uniform(low, high, raw[:, :, scales].shape[:2] + (raw[:, :, scales].shape[2] // 2,)).astype(np.float16).view(np.uint8)
    return torch.from_numpy(raw.reshape(rows, -1))


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q5_0, *K_QUANTS, T.Q5_1])  # Q5_1: through gguf.quants itself
def test_dequantize_gives_gguf_pys_values(qtype):
    values = np.random.default_rng(0).standard_normal((6, 512)) * 3
    raw = blocks(values, qtype)
    assert raw.shape[1] == ggml.row_bytes(qtype, 512)
    ours = ggml.dequantize(raw, qtype, 512)
    assert np.array_equal(ours.numpy(), gguf.quants.dequantize(raw.numpy(), qtype).reshape(6, 512))


def experts(gate_up: T, n: int, seed: int = 0, down: T | None = None, act: str = "silu", dim: int = 256, ffn: int = 512):
    """A Ggml format for a `dim`-wide model with FFN `ffn` (one MoE layer), and n random experts' views in it."""
    down = gate_up if down is None else down
    cfg = dataclasses.replace(preset_config("tiny"), dim=dim, ffn_dim=ffn, expert_act=act)
    fmt, rng, views = Ggml(cfg, [(gate_up, down)]), np.random.default_rng(seed), []
    for _ in range(n):
        buffer = torch.empty(fmt.expert_bytes, dtype=torch.uint8)
        parts = {"gate_up": blocks(rng.standard_normal((2 * ffn, dim)), gate_up), "down": blocks(rng.standard_normal((dim, ffn)), down),
                 "types": torch.tensor([gate_up, down], dtype=torch.uint8)}  # fmt: skip
        fmt.pack_native(lambda name: parts, buffer)
        views.append(fmt.unpack(buffer))
    return cfg, fmt, views


def matrix(view, name: str, qtype: T, cfg) -> torch.Tensor:
    """An expert's matrix `name` as gguf-py's values, float64 [rows, K]."""
    rows, k = (2 * cfg.ffn_dim, cfg.dim) if name == "gate_up" else (cfg.dim, cfg.ffn_dim)
    raw = view[name][: rows * ggml.row_bytes(qtype, k)].view(rows, -1)
    return torch.from_numpy(gguf.quants.dequantize(raw.numpy(), qtype)).double().view(rows, k)


def q8_0(x: torch.Tensor) -> torch.Tensor:
    """x rounded to Q8_0 blocks as llama.cpp rounds an activation row before a Q8_0/Q4_0 dot product (float64)."""
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x.numpy(), T.Q8_0), T.Q8_0)).double()


def q8_k(x: torch.Tensor) -> torch.Tensor:
    """x rounded to Q8_K blocks as llama.cpp rounds an activation row before a K-quant dot product
    (quantize_row_q8_K_ref: the value of largest magnitude is -127 steps of d, fp32 arithmetic), float64."""
    v = x.numpy().astype(np.float32).reshape(-1, 256)
    top = v[np.arange(len(v)), np.abs(v).argmax(1)]  # [B]: signed
    inverse = np.float32(-127) / top
    q = np.minimum(127, np.rint(inverse[:, None] * v))
    return torch.from_numpy(q * (np.float32(1) / inverse)[:, None].astype(np.float64)).view(x.shape)


def rounded(x: torch.Tensor, qtype: T) -> torch.Tensor:
    return q8_k(x) if qtype in K_QUANTS else q8_0(x)


needs_kernel = pytest.mark.skipif(native.unavailable() is not None or not native.library().experts_ggml_blocks,
                                  reason="moe-local's CPU kernels for a GGUF's blocks are not built here (x86 with AVX2 and F16C)")


@needs_kernel
@pytest.mark.parametrize("gate_up,down", [(T.Q8_0, T.Q8_0), (T.Q4_0, T.Q4_0), (T.Q4_K, T.Q6_K), (T.Q5_K, T.Q5_K), (T.Q6_K, T.Q4_K),
                                          (T.Q4_K, T.Q5_0), (T.Q2_K, T.Q3_K), (T.IQ4_XS, T.Q6_K), (T.IQ3_XXS, T.IQ2_XXS), (T.IQ2_XXS, T.IQ3_XXS)])  # fmt: skip
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_kernel_is_llama_cpps_arithmetic(gate_up, down, act):
    _check_llama_cpps_arithmetic(gate_up, down, act)


@needs_kernel
def test_kernel_is_llama_cpps_arithmetic_at_widths_of_an_odd_number_of_blocks():
    """Blocks of 32 are taken two at a time by the many-row path: widths of 9 and 11 blocks leave one over."""
    _check_llama_cpps_arithmetic(T.Q8_0, T.Q5_0, "silu", dim=288, ffn=352)


def _check_llama_cpps_arithmetic(gate_up, down, act, **widths):
    """llama.cpp's vec_dot_*_q8_0 / vec_dot_*_q8_K: the weights' values (gguf-py's dequantization) times the
    activations rounded as llama.cpp rounds them for the weights' type (Q8_0 blocks of 32 for Q8_0/Q4_0, Q8_K
    blocks of 256 for the K-quants), h = silu(gate) * up rounded again for down. The kernel's fp32 sums run in
    another order than this float64 reference, so a value of h at a step's midpoint within that difference
    rounds the other way, and its row of outputs moves by one step of h times a column of down (about one row in
    ten at these widths): most rows are within 1e-5 of the scale, every row within 2%. Gemma 4's experts are GeGLU's
    (GELU's tanh form in place of SiLU)."""
    cfg, fmt, views = experts(gate_up, 3, down=down, act=act, **widths)
    counts = [2, 0, 20]  # an expert with no rows, one with more than a kernel call takes at once
    xs = torch.randn(sum(counts), cfg.dim, generator=torch.Generator().manual_seed(1))
    y = fmt.forward_grouped(xs, counts, views)
    expected, start = [], 0
    for view, count in zip(views, counts):
        x, start = xs[start : start + count], start + count
        if count:
            gu = rounded(x, gate_up) @ matrix(view, "gate_up", gate_up, cfg).T  # [n, 2F]
            h = fmt.activation(gu, cfg)  # [n, F]
            expected.append(rounded(h.float(), down) @ matrix(view, "down", down, cfg).T)
    expected = torch.cat(expected)
    error, scale = (y.double() - expected).abs().amax(1), expected.abs().max()  # [R], per row
    assert (error <= 1e-5 * scale).float().mean() >= 0.8 and (error <= 0.02 * scale).all()


@needs_kernel
@pytest.mark.parametrize("gate_up,down,widths", [(T.Q4_K, T.Q6_K, {}), (T.Q8_0, T.Q5_0, {}), (T.Q3_K, T.Q2_K, {}), (T.Q4_0, T.Q8_0, dict(dim=288, ffn=352)),
                                                 (T.IQ4_XS, T.Q5_K, {}), (T.IQ2_XXS, T.IQ3_XXS, {})])  # fmt: skip
def test_kernel_gives_each_row_the_same_bits_alone_or_grouped(gate_up, down, widths):
    """A decode step's row alone, and a prefill's rows taken several at a time with each weight block (4 rows for
    blocks of 32, 2 for the K-quants; the counts leave 1, 2 and 3 over; widths of an odd number of blocks of 32)."""
    cfg, fmt, views = experts(gate_up, 4, down=down, **widths)
    counts = [1, 18, 3, 7]
    xs = torch.randn(sum(counts), cfg.dim, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(2))
    grouped = fmt.forward_grouped(xs, counts, views)
    assert grouped.dtype == torch.bfloat16
    each = [view for view, count in zip(views, counts) for _ in range(count)]  # row i's expert
    alone = [fmt.forward(xs[i : i + 1], view) for i, view in enumerate(each)]
    assert torch.equal(torch.cat(alone), grouped)


@needs_kernel
def test_a_decode_tokens_experts_in_one_call_give_the_grouped_kernels_bits_mixed_as_the_runtime_mixes():
    from moe_local.experts.runtime import weigh

    cfg, fmt, views = experts(T.Q4_K, 4, down=T.Q6_K)
    table = fmt.decode_table(views)
    x = torch.randn(1, cfg.dim, generator=torch.Generator().manual_seed(4)).bfloat16()
    weights, indices = torch.tensor([[0.7, 0.3]]), torch.tensor([[3, 1]])
    ys = fmt.forward_grouped(torch.cat([x, x]), [1, 1], [views[3], views[1]])  # [2, D] bf16
    assert torch.equal(table(x, weights, indices), weigh(ys, weights, torch.bfloat16))


def test_a_family_with_expert_biases_keeps_them_beside_the_blocks():
    """gpt-oss's experts have biases and the clamped SwiGLU: the kernel declines them, torch runs the file's values."""
    cfg = dataclasses.replace(preset_config("tiny"), dim=256, ffn_dim=512, expert_bias=True, expert_act="swiglu_oai")
    fmt, rng = Ggml(cfg, [(T.Q8_0, T.Q8_0)]), np.random.default_rng(5)
    parts = {"gate_up": blocks(rng.standard_normal((1024, 256)), T.Q8_0), "down": blocks(rng.standard_normal((256, 512)), T.Q8_0),
             "types": torch.tensor([T.Q8_0, T.Q8_0], dtype=torch.uint8)}  # fmt: skip
    biases = {name: torch.randn(n) for name, n in (("b1", 512), ("b2", 256), ("b3", 512))}
    buffer = torch.empty(fmt.expert_bytes, dtype=torch.uint8)
    fmt.pack_native(lambda name: parts if name == "ggml" else biases[name], buffer)
    view, x = fmt.unpack(buffer), torch.randn(2, 256)
    gate_up = x @ matrix(view, "gate_up", T.Q8_0, cfg).float().T + torch.cat([biases["b1"], biases["b3"]]).bfloat16().float()
    h = fmt.activation(gate_up, cfg)
    expected = h @ matrix(view, "down", T.Q8_0, cfg).float().T + biases["b2"].bfloat16().float()
    torch.testing.assert_close(fmt.forward(x, view), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_K])
def test_without_the_kernels_experts_compute_exactly_on_the_files_values(monkeypatch, rebuilt, qtype):
    monkeypatch.setenv("MOE_LOCAL_KERNELS", "0")
    native.library.cache_clear()
    cfg, fmt, views = experts(qtype, 1, down=T.Q6_K)
    x = torch.randn(3, cfg.dim, generator=torch.Generator().manual_seed(3))
    gate_up = x.double() @ matrix(views[0], "gate_up", qtype, cfg).T
    h = torch.nn.functional.silu(gate_up[:, : cfg.ffn_dim]) * gate_up[:, cfg.ffn_dim :]
    expected = h @ matrix(views[0], "down", T.Q6_K, cfg).T
    assert fmt.forward_grouped(x, [3], views) is None
    assert (fmt.forward(x, views[0]).double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def pooled(fmt, views) -> torch.Tensor:
    """The experts `views` as the slots of a pool, uint8 [len(views), expert_bytes]."""
    pool = torch.zeros(len(views), fmt.expert_bytes, dtype=torch.uint8)
    for slot, view in zip(pool, views):
        fmt.write(view, slot)
    return pool


def exact_expert(x: torch.Tensor, view, fmt, cfg) -> torch.Tensor:
    """An expert on gguf-py's values in float64, the activations as they are: x [M, D] -> [M, D]."""
    gate_up, down = (T(int(t)) for t in view["types"])
    h = fmt.activation(x.double() @ matrix(view, "gate_up", gate_up, cfg).T, cfg)
    return h @ matrix(view, "down", down, cfg).T


TRITON_CHECK = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"  # Triton's interpreter: the kernels' arithmetic on the CPU
import gguf, numpy as np, torch
sys.path.insert(0, "tests")
import dataclasses
from test_ggml import blocks, experts, exact_expert, matrix, pooled
from moe_local.config import preset_config
from moe_local.experts import ggml_triton
from moe_local.experts.formats import Ggml
from moe_local.weights import ggml

def close(got, want, what):  # fp32 sums against float64: within 1e-5 of the largest output
    error = (got.double() - want).abs().max().item()
    assert error <= 1e-5 * want.abs().max().item(), f"{what}: off by {error}, largest {want.abs().max().item()}"

assert set(ggml_triton.TYPES) == set(Ggml.TYPES)
n, k, gen = 20, 512, torch.Generator().manual_seed(0)  # 20 rows: the last program's rows ragged
for qtype in ggml_triton.TYPES:  # each type's matrices in slots 0..2 of a pool, after a part of 256 bytes holding the type
    rng, stride = np.random.default_rng(int(qtype)), -(-(256 + n * ggml.row_bytes(qtype, k)) // 256) * 256
    pool, values = torch.zeros(3, stride, dtype=torch.uint8), []
    for slot in range(3):
        raw = blocks(rng.standard_normal((n, k)), qtype)
        pool[slot, 0], pool[slot, 256 : 256 + raw.numel()] = int(qtype), raw.reshape(-1)
        values.append(torch.from_numpy(gguf.quants.dequantize(raw.numpy(), qtype)).double().view(n, k))
    flat, slots = pool.view(-1), [2, 0]
    for x in (torch.randn(2, k, generator=gen), torch.randn(1, k, generator=gen)):  # a row per expert, or one for all
        got = ggml_triton.linear_grouped(x, flat[256:], flat, torch.tensor(slots), stride, n)
        for i, slot in enumerate(slots):
            close(got[i], x[min(i, len(x) - 1)].double() @ values[slot].T, f"{qtype.name} slot {slot}")
    widened = ggml_triton.widen(pool[1, 256:], pool[1], n, k, torch.float32)
    assert torch.equal(widened.double(), values[1]), f"{qtype.name}: widened values differ from gguf-py's"
pool[0, 0] = int(gguf.GGMLQuantizationType.F16)  # a type the kernel has no branch for: NaN, not a quiet zero
assert ggml_triton.linear_grouped(x, flat[256:], flat, torch.tensor([0]), stride, n).isnan().all()
# through the format: a decode token's experts from their slots, and one expert's rows (decode kernel, then widened)
for gate_up, down in ((ggml.Q4_K, ggml.Q6_K), (ggml.Q8_0, ggml.Q5_0), (ggml.IQ3_XXS, ggml.Q3_K)):
    cfg, fmt, views = experts(gate_up, 3, down=down, ffn=256)
    pool, x = pooled(fmt, views), torch.randn(1, cfg.dim, generator=gen)
    got = fmt.forward_slots_triton(x, pool, torch.tensor([2, 0]))
    for i, slot in enumerate([2, 0]):
        close(got[i], exact_expert(x, views[slot], fmt, cfg)[0], f"{gate_up.name}/{down.name} slot {slot}")
    for rows in (2, fmt.CUDA_DECODE_MAX_ROWS + 1):
        xs = torch.randn(rows, cfg.dim, generator=gen)
        h = fmt.activation(fmt.linear_triton(xs, views[1], "gate_up"), cfg)
        close(fmt.linear_triton(h, views[1], "down"), exact_expert(xs, views[1], fmt, cfg), f"{gate_up.name}/{down.name} {rows} rows")
# gpt-oss's experts have biases and the clamped SwiGLU: the biases gathered from the slots
cfg = dataclasses.replace(preset_config("tiny"), dim=256, ffn_dim=256, expert_bias=True, expert_act="swiglu_oai")
fmt, rng, want = Ggml(cfg, [(ggml.Q8_0, ggml.Q4_K)]), np.random.default_rng(7), []
pool = torch.zeros(2, fmt.expert_bytes, dtype=torch.uint8)
x = torch.randn(1, 256, generator=gen)
for slot in pool:
    parts = {"gate_up": blocks(rng.standard_normal((512, 256)), ggml.Q8_0), "down": blocks(rng.standard_normal((256, 256)), ggml.Q4_K),
             "types": torch.tensor([ggml.Q8_0, ggml.Q4_K], dtype=torch.uint8)}
    biases = {name: torch.randn(256, generator=gen) for name in ("b1", "b2", "b3")}
    fmt.pack_native(lambda name: parts if name == "ggml" else biases[name], slot)
    view = fmt.unpack(slot)
    gate_up = x.double() @ matrix(view, "gate_up", ggml.Q8_0, cfg).T + torch.cat([biases["b1"], biases["b3"]]).bfloat16().double()
    want.append(fmt.activation(gate_up, cfg)[0] @ matrix(view, "down", ggml.Q4_K, cfg).T + biases["b2"].bfloat16().double())
got = fmt.forward_slots_triton(x, pool, torch.tensor([1, 0]))
close(got[0], want[1], "biases, slot 1")
close(got[1], want[0], "biases, slot 0")
print("ok")
"""


def test_the_triton_kernels_read_each_type_from_the_slots_as_gguf_pys_values():
    """CUDA's kernels for a GGUF's experts, in Triton's interpreter (no GPU here): each type's matrices read from
    their slots (the type from each slot's buffer) against gguf-py's dequantization times the activations in
    float64, within 1e-5 of the largest output (fp32 sums; llama.cpp's CUDA kernels would also round the
    activations to Q8_1, ~2^-8 of each block of 32's largest: this is exact arithmetic up to the sums); the
    widened matrix is gguf-py's values bit for bit; through `Ggml`, a token's experts from a pool and one expert's
    rows (decode kernel for 2 rows, widened for 9) against the whole expert in float64."""
    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, "-c", TRITON_CHECK], capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).parent.parent)  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_the_cuda_kernel_has_a_branch_for_every_type_ggml_keeps():
    """ggml_triton's kernel branches on each slot's type code, and writes NaN for a type it has no branch for: every
    type `Ggml` keeps must have one (read from the source, so this holds where triton is not installed)."""
    source = (Path(__file__).parent.parent / "moe_local/experts/ggml_triton.py").read_text()
    assert not [t.name for t in Ggml.TYPES if f"qtype == {int(t)}:" not in source]


@pytest.mark.gpu
@pytest.mark.parametrize("gate_up,down", [(T.Q4_K, T.Q6_K), (T.Q8_0, T.Q5_0), (T.Q5_K, T.Q4_0), (T.Q2_K, T.Q3_K), (T.IQ4_XS, T.IQ2_XXS),
                                          (T.IQ3_XXS, T.Q6_K)])  # fmt: skip
def test_on_cuda_experts_in_slots_compute_exactly_on_the_files_values(gate_up, down):
    """The CUDA path (`ggml_triton`'s kernels, never run on a GPU before this test): a decode token's experts from
    their slots, one expert's few rows (decode kernel) and many (widened), against gguf-py's values times the
    activations in float64: fp32 within 1e-5 of the largest output, bf16 within its rounding."""
    cfg, fmt, views = experts(gate_up, 3, down=down)
    pool = pooled(fmt, views).cuda()
    on_cuda = [fmt.unpack(slot) for slot in pool]
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1, cfg.dim, generator=gen)
    got = fmt.forward_slots(x.cuda(), pool, [2, 0], on_cuda).cpu()
    for row, slot in zip(got, [2, 0]):
        want = exact_expert(x, views[slot], fmt, cfg)[0]
        assert (row.double() - want).abs().max() <= 1e-5 * want.abs().max()
    for rows in (2, 20):
        xs = torch.randn(rows, cfg.dim, generator=gen)
        want = exact_expert(xs, views[1], fmt, cfg)
        assert (fmt.forward(xs.cuda(), on_cuda[1]).cpu().double() - want).abs().max() <= 1e-5 * want.abs().max()
        y = fmt.forward(xs.cuda().bfloat16(), on_cuda[1])
        assert y.dtype == torch.bfloat16 and (y.cpu().double() - want).abs().max() <= 3e-2 * want.abs().max()


@pytest.mark.parametrize("capability", [80, 90])
def test_the_triton_kernels_compile_to_machine_code_for_a100_and_h100(capability):
    """What the interpreter does not check (types across the type branches, layouts, the backend's passes): the
    decode and widening kernels built for sm_80 / sm_90 by Triton's compiler and its own ptxas, with no GPU."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moe_local.experts import ggml_triton

    signature = {"x_ptr": "*bf16", "w_ptr": "*u8", "types_ptr": "*u8", "out_ptr": "*bf16", "tables_ptr": "*u8", "N": "i32", "K": "i32",
                 "stride_xm": "i32", "stride_om": "i32", "slots_ptr": "*i64", "stride_slot": "i32", "BLOCK_N": "constexpr", "BLOCK_G": "constexpr",
                 "WIDEN": "constexpr"}  # fmt: skip
    for widen in (False, True):
        source = ASTSource(fn=ggml_triton._kernel, signature=signature, constexprs={"BLOCK_N": ggml_triton.BLOCK_N, "BLOCK_G": ggml_triton.BLOCK_G, "WIDEN": widen})
        assert triton.compile(source, target=GPUTarget("cuda", capability, 32)).asm["cubin"]
