"""A decode step's resident MLP through the experts' kernel (`moe_local/cpu_mlp.py`): the torch operations'
results, which MLPs and rows take it, and a Gemma 4 model (its dense MLP beside the experts in every layer)
decoding as without it."""

from __future__ import annotations

import pytest
import torch

import moe_local
from moe_local import cpu_mlp, native
from moe_local.model import DenseMLP

needs_kernel = pytest.mark.skipif(native.unavailable() is not None, reason=f"the kernel cannot be built here: {native.unavailable()}")


def mlp(act: str, dim: int = 96, hidden: int = 64, seed: int = 0) -> DenseMLP:
    torch.manual_seed(seed)
    m = DenseMLP(dim, hidden, act)
    for p in m.parameters():
        p.requires_grad_(False).normal_(0, 0.1)
    return m.bfloat16()


@needs_kernel
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_the_kernel_gives_the_torch_operations_results(act, rows):
    m = mlp(act)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(1)).bfloat16()
    want = m(x)
    assert m.fuse()
    got = m(x)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    # the same roundings; only the products' order of sums differs: one bf16 step at most
    assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=2**-7 * want.abs().max().item())


@needs_kernel
def test_a_prefills_rows_and_other_weights_stay_on_the_torch_operations(monkeypatch):
    m = mlp("silu")
    assert m.fuse() and m.fused(torch.zeros(cpu_mlp.MAX_ROWS + 1, 96).bfloat16()) is None
    assert m.fused(torch.zeros(2, 96)) is None  # fp32 rows
    assert not mlp("silu").float().fuse()  # fp32 weights
    assert not mlp("silu", hidden=40).fuse()  # a width the kernel does not take
    int8 = mlp("silu")
    from moe_local.int8 import Int8Linear

    int8.quantize(Int8Linear.from_linear)  # --resident-dtype: int8_linear's kernel
    assert not int8.fuse()


@needs_kernel
def test_gemma4_decodes_through_the_dense_mlp_kernel_as_without_it(tmp_path, monkeypatch):
    from families import build_family
    from test_cpu_attention import greedy

    build_family("gemma4", tmp_path, intermediate_size=64)  # the tests' 48 is no multiple of 32
    engine = moe_local.load(str(tmp_path), device="cpu", dtype="bf16", ctx_size=64)
    mlps = [layer.ffn.shared.mlp for layer in engine.model.layers]
    assert all(m.fused is not None for m in mlps)
    calls, call = [], cpu_mlp.Fused.__call__
    monkeypatch.setattr(cpu_mlp.Fused, "__call__", lambda self, x: calls.append(x.shape[0]) or call(self, x))
    fused = greedy(engine, [1, 9, 40, 7], 8)
    assert calls.count(1) == 8 * len(mlps)  # every decode step's; the prompt's 4 rows too
    for m in mlps:
        m.fused = None
    unfused = greedy(engine, [1, 9, 40, 7], 8)
    assert torch.equal(fused.argmax(-1), unfused.argmax(-1))
    assert (fused - unfused).norm() <= 0.01 * unfused.norm()
