"""The CPU's Gated DeltaNet decode step (`moe_local/cpu_deltanet.py`, `deltanet_step` in `cpu_kernels.c`): against a
float64 reference of transformers' formulas (that the reference is those formulas is shown first), over several
steps from non-zero states, fp32 and bf16, several head counts and widths, conv states of K - 1 and of K columns,
and a batch step's rows against single rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from test_cpu_attention import greedy  # the logits of n greedy decode steps
from moe_local import cpu_deltanet, native

needs_kernel = pytest.mark.skipif(native.unavailable() is not None, reason=f"the kernel cannot be built here: {native.unavailable()}")


def layer(k_heads, v_heads, k_dim, v_dim, kernel, dtype, seed=0):
    """A layer's weights as a checkpoint holds them (A_log, dt_bias, the conv's [C, 1, K] squeezed)."""
    gen = torch.Generator().manual_seed(seed)
    C = 2 * k_heads * k_dim + v_heads * v_dim
    return dict(
        k_heads=k_heads, v_heads=v_heads, k_dim=k_dim, v_dim=v_dim,
        conv_weight=(torch.randn(C, kernel, generator=gen) * 0.5).to(dtype),
        A_log=torch.rand(v_heads, generator=gen).mul(16).clamp(min=0.01).log(),
        dt_bias=torch.randn(v_heads, generator=gen).to(dtype),
        norm_weight=(1 + 0.1 * torch.randn(v_dim, generator=gen)).to(dtype),
        eps=1e-6,
    )  # fmt: skip


def inputs(w, rows, dtype, seed):
    """One token's projections for `rows` sequences: qkv [B, C], z [B, Hv dv], b, a [B, Hv]."""
    gen = torch.Generator().manual_seed(seed)
    C = w["conv_weight"].shape[0]
    Hv, dv = w["v_heads"], w["v_dim"]
    return [(torch.randn(rows, n, generator=gen) * scale).to(dtype) for n, scale in ((C, 1), (Hv * dv, 1), (Hv, 1), (Hv, 2))]


def states(w, state_len, dtype, seed):
    """A sequence's states part way through: conv state [C, state_len], recurrent state [Hv, dk, dv] fp32."""
    gen = torch.Generator().manual_seed(seed)
    C = w["conv_weight"].shape[0]
    return torch.randn(C, state_len, generator=gen).to(dtype), torch.randn(w["v_heads"], w["k_dim"], w["v_dim"], generator=gen) * 0.1


def reference(w, qkv, z, b, a, conv_state, state, dtype):
    """One row's step in float64 by transformers' formulas, each value rounded to dtype where its torch operations
    round it -> (out [Hv dv], new conv state, new state)."""
    rnd = (lambda t: t.to(dtype).double()) if dtype != torch.float32 else (lambda t: t)
    Hk, Hv, dk, dv = w["k_heads"], w["v_heads"], w["k_dim"], w["v_dim"]
    conv_weight = w["conv_weight"].double()
    window = torch.cat([conv_state.double(), qkv.double()[:, None]], dim=1)  # [C, S + 1]
    x = rnd(F.silu(rnd((window[:, -conv_weight.shape[1] :] * conv_weight).sum(-1))))  # [C]
    q, k, v = x.split([Hk * dk, Hk * dk, Hv * dv])
    q, k = (t.view(Hk, dk).repeat_interleave(Hv // Hk, dim=0) for t in (q, k))  # [Hv, dk]
    q = q / (q.square().sum(-1, keepdim=True) + 1e-6).sqrt() / dk**0.5
    k = k / (k.square().sum(-1, keepdim=True) + 1e-6).sqrt()
    beta = rnd(b.double().sigmoid())
    decay = (-w["A_log"].double().exp() * F.softplus(a.double() + w["dt_bias"].double())).exp()
    s = state.double() * decay[:, None, None]  # [Hv, dk, dv]
    delta = (v.view(Hv, dv) - torch.einsum("hij,hi->hj", s, k)) * beta[:, None]
    s = s + k[:, :, None] * delta[:, None, :]
    o = rnd(torch.einsum("hij,hi->hj", s, q))  # [Hv, dv]
    n = rnd(o / (o.square().mean(-1, keepdim=True) + w["eps"]).sqrt())
    out = rnd(rnd(n * w["norm_weight"].double()) * F.silu(z.double().view(Hv, dv)))
    return out.flatten(), window[:, 1:], s


def assert_close(got, want, dtype):
    """fp32: within 1e-5 of the largest value; bf16 (computed where the reference rounds): the same values but for
    a few roundings that fell the other way, by one step of bf16 (2^-7 relative or less)."""
    got = got.double()
    if dtype == torch.float32:
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    else:
        differ = got != want
        assert differ.double().mean() <= 0.02 and torch.all((got - want)[differ].abs() <= 2**-7 * want[differ].abs())


def build(w, state_len):
    step = cpu_deltanet.Step.build(**w, state_len=state_len)
    assert step is not None
    return step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_reference_is_transformers_formulas(dtype):
    """transformers' own functions (conv state of K columns, as its cache keeps it) in dtype against the reference."""
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as qwen

    w = layer(2, 4, 32, 16, 4, dtype)
    (qkv, z, b, a), (conv_state, state) = inputs(w, 1, dtype, 1), states(w, 4, dtype, 2)
    want, want_conv, want_state = reference(w, qkv[0], z[0], b[0], a[0], conv_state, state, dtype)
    Hk, Hv, dk, dv = w["k_heads"], w["v_heads"], w["k_dim"], w["v_dim"]
    conv_state = conv_state[None].clone()
    x = qwen.causal_conv1d_update(qkv[:, :, None], conv_state, w["conv_weight"], None, "silu")[:, :, 0]
    q, k, v = x.split([Hk * dk, Hk * dk, Hv * dv], dim=-1)
    g = -w["A_log"].float().exp() * F.softplus(a.float() + w["dt_bias"])
    o, new_state = qwen.torch_recurrent_gated_delta_rule(
        q.view(1, 1, Hk, dk), k.view(1, 1, Hk, dk), v.view(1, 1, Hv, dv), g=g[None], beta=b.sigmoid()[None],
        initial_state=state[None].clone(), output_final_state=True, use_qk_l2norm_in_kernel=True,
    )  # fmt: skip
    norm = qwen.Qwen3_5MoeRMSNormGated(dv, eps=w["eps"]).to(dtype)
    norm.weight.data.copy_(w["norm_weight"])
    got = norm(o.reshape(-1, dv), z.view(-1, dv)).flatten()
    assert torch.equal(conv_state[0].double(), want_conv)
    assert torch.allclose(new_state[0].double(), want_state, rtol=1e-5, atol=1e-5 * want_state.abs().max().item())
    assert_close(got, want, dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k_heads,v_heads,k_dim,v_dim,state_len", [(2, 4, 32, 16, 3), (4, 4, 64, 32, 4), (1, 3, 128, 128, 3), (2, 2, 24, 48, 5)])
def test_the_kernel_matches_the_reference_over_several_steps(dtype, k_heads, v_heads, k_dim, v_dim, state_len):
    w = layer(k_heads, v_heads, k_dim, v_dim, 4, dtype)
    step = build(w, state_len)
    conv_state, state = states(w, state_len, dtype, 1)
    want_conv, want_state = conv_state.double(), state.double()
    for t in range(3):
        qkv, z, b, a = inputs(w, 1, dtype, 10 + t)
        want, want_conv, want_state = reference(w, qkv[0], z[0], b[0], a[0], want_conv.to(dtype), want_state.float(), dtype)
        got = step(qkv, z, b, a, [conv_state], [state])
        assert got is not None and got.dtype == dtype and got.shape == (1, v_heads * v_dim)
        assert torch.equal(conv_state.double(), want_conv)  # the inputs shifted in, exactly
        assert torch.allclose(state.double(), want_state, rtol=1e-5, atol=1e-5 * want_state.abs().max().item())  # fp32 in both
        assert_close(got[0], want, dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_batch_steps_rows_are_single_rows(dtype):
    """The server's batch step: B sequences' rows (states in a pool's rows, inputs views of one wider
    projection) give, bit for bit, what each gives alone."""
    w = layer(2, 4, 32, 32, 4, dtype)
    step = build(w, 3)
    B = 5
    qkv, z, b, a = inputs(w, B, dtype, 3)
    wide = torch.cat([qkv, z, b, a], dim=1)  # one projection's output, split by views
    C, Hv = qkv.shape[1], w["v_heads"]
    views = wide.split([C, z.shape[1], Hv, Hv], dim=1)
    pool_conv = torch.stack([states(w, 3, dtype, 20 + r)[0] for r in range(B + 2)])
    pool_state = torch.stack([states(w, 3, dtype, 20 + r)[1] for r in range(B + 2)])
    singles = [pool_conv.clone(), pool_state.clone()]
    got = step(*views, [pool_conv[r + 1] for r in range(B)], [pool_state[r + 1] for r in range(B)])
    for r in range(B):
        alone = step(qkv[r : r + 1], z[r : r + 1], b[r : r + 1], a[r : r + 1], [singles[0][r + 1]], [singles[1][r + 1]])
        assert torch.equal(got[r], alone[0])
    assert torch.equal(pool_conv, singles[0]) and torch.equal(pool_state, singles[1])  # rows 0 and B + 1 untouched too


@needs_kernel
def test_what_the_kernel_does_not_take_is_left_to_torch():
    w = layer(2, 4, 32, 16, 4, torch.bfloat16)
    assert cpu_deltanet.Step.build(**{**w, "v_dim": 24}, state_len=3) is None  # value heads not a multiple of 16 wide
    assert cpu_deltanet.Step.build(**{**w, "conv_weight": w["conv_weight"].half()}, state_len=3) is None
    assert cpu_deltanet.Step.build(**w, state_len=2) is None  # a conv state shorter than the kernel's K - 1
    step = build(w, 3)
    qkv, z, b, a = inputs(w, 1, torch.bfloat16, 0)
    conv_state, state = states(w, 3, torch.bfloat16, 0)
    assert step(qkv.float(), z, b, a, [conv_state], [state]) is None  # inputs in another dtype
    assert step(qkv, z, b, a, [conv_state], [state.to(torch.bfloat16)]) is None  # a state not in fp32
    assert step(qkv, z, b, a, [conv_state.t()], [state]) is None  # a conv state not contiguous


class _Layer(torch.nn.Module):
    """What `Fused.build` reads of `model.LinearAttention`: its sizes, one input projection (q|k|v, z, b, a),
    the conv, A_log, dt_bias, the gated norm and out_proj; `torch_step` is the same block as torch operations
    around the kernel's core (`Step`)."""

    def __init__(self, w, dim, dtype):
        super().__init__()
        self.k_heads, self.v_heads, self.k_dim, self.v_dim = w["k_heads"], w["v_heads"], w["k_dim"], w["v_dim"]
        C = w["conv_weight"].shape[0]
        self.split = [C, self.v_heads * self.v_dim, self.v_heads, self.v_heads]
        gen = torch.Generator().manual_seed(5)
        self.in_proj = torch.nn.Linear(dim, sum(self.split), bias=False).to(dtype)
        self.out_proj = torch.nn.Linear(self.v_heads * self.v_dim, dim, bias=False).to(dtype)
        for p in (self.in_proj, self.out_proj):
            p.weight.data.copy_(torch.randn(p.weight.shape, generator=gen) * p.weight.shape[1] ** -0.5)
        self.conv, self.A_log, self.dt_bias = w["conv_weight"], w["A_log"], w["dt_bias"]
        self.norm = torch.nn.Module()
        self.norm.weight, self.norm.eps = w["norm_weight"], w["eps"]
        self.step = build(w, w["conv_weight"].shape[1] - 1)

    def torch_step(self, x, conv_states, states):
        y = self.step(*self.in_proj(x).split(self.split, dim=-1), conv_states, states)
        return self.out_proj(y)


@needs_kernel
@pytest.mark.parametrize("resident", ["bf16", "int8", "int4"])
def test_a_fused_block_gives_the_projections_around_the_core(resident):
    """The whole block in one call (`Fused`, `deltanet_block`) against torch's projections around `Step`, for
    3 sequences at once: int8 and int4 projections are the same kernels' (`Int8Linear`, `Int4Linear` run them), so
    the bits are the same; bf16 projections sum in another order, so within bf16's rounding."""
    from moe_local.int4 import Int4Linear
    from moe_local.int8 import Int8Linear

    lib = native.library()
    if resident != "bf16" and not (lib.experts_int4 if resident == "int4" else lib.experts_int8):
        pytest.skip(f"this CPU has no {resident} kernels")
    w = layer(2, 32, 32, 16, 4, torch.bfloat16)  # 2 x 32 + 2 x 32 + 32 x 16 + 32 + 32 rows in: int4 takes 64 at a time
    block = _Layer(w, 128, torch.bfloat16)
    if resident == "int8":
        block.in_proj, block.out_proj = Int8Linear.from_linear(block.in_proj), Int8Linear.from_linear(block.out_proj)
    elif resident == "int4":
        block.in_proj, block.out_proj = Int4Linear.from_linear(block.in_proj, 64), Int4Linear.from_linear(block.out_proj, 64)
    fused = cpu_deltanet.Fused.build(block)
    assert fused is not None
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    conv = torch.stack([states(w, 3, torch.bfloat16, r)[0] for r in range(3)])
    state = torch.stack([states(w, 3, torch.bfloat16, r)[1] for r in range(3)])
    conv_torch, state_torch = conv.clone(), state.clone()
    for _ in range(2):
        got = fused(x, list(conv.unbind()), list(state.unbind()))
        want = block.torch_step(x, list(conv_torch.unbind()), list(state_torch.unbind()))
        assert torch.equal(conv, conv_torch)
        if resident == "bf16":
            assert torch.allclose(state, state_torch, rtol=1e-2, atol=1e-2 * state_torch.abs().max().item())
            assert torch.allclose(got.float(), want.float(), rtol=2**-6, atol=2**-6 * want.abs().max().item())
        else:
            assert torch.equal(state, state_torch) and torch.equal(got, want)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,k_heads,v_heads,k_dim,v_dim", [(130, 2, 4, 16, 32), (64, 1, 1, 32, 16), (5, 2, 2, 16, 48)])
def test_the_chunked_kernel_is_the_step_by_step_rule(dtype, T, k_heads, v_heads, k_dim, v_dim):
    """A prompt's delta rule in the kernel (`cpu_deltanet.chunked`, chunks of 64: whole chunks, a partial one, a
    single short one) from a state that is not zero, q, k and v strided views of one matrix as the model's
    convolution leaves them: the outputs and the final state of T `recurrent_step`s within fp32's rounding, as
    the torch operations' chunked form."""
    from moe_local.model import chunked_delta_rule, recurrent_step

    gen = torch.Generator().manual_seed(0)
    widths = [k_heads * k_dim, k_heads * k_dim, v_heads * v_dim]
    mixed = torch.randn(sum(widths), T, generator=gen).to(dtype).t()  # [T, C], each position's channels T apart
    q, k, v = (part.reshape(T, -1, d) for part, d in zip(mixed.split(widths, dim=-1), (k_dim, k_dim, v_dim)))
    g, beta = -torch.rand(T, v_heads, generator=gen), torch.rand(T, v_heads, generator=gen).to(dtype)
    start = torch.randn(v_heads, k_dim, v_dim, generator=gen)
    state, stepped, chunked = start.clone(), start.clone()[None], start.clone()
    y = cpu_deltanet.chunked(q, k, v, g, beta, state)
    steps = torch.cat([recurrent_step(q[t : t + 1], k[t : t + 1], v[t : t + 1], g[t : t + 1], beta[t : t + 1], stepped) for t in range(T)])
    assert y.shape == (T, v_heads, v_dim) and y.dtype == torch.float32
    for got, want in ((y, steps), (state, stepped[0]), (y, chunked_delta_rule(q, k, v, g, beta, chunked)), (state, chunked)):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # widths it does not take, and tensors not on the CPU's terms, are left to the torch operations
    assert cpu_deltanet.chunked(q[..., :8], k[..., :8], v, g, beta, start[:, :8].clone()) is None
    assert cpu_deltanet.chunked(q, k, v, g, beta, start.double()) is None


# The hybrids' tiny checkpoints with sizes the kernel takes (value heads 16 wide; tests/families.py's are 12).
KERNEL_SIZES = dict(linear_key_head_dim=16, linear_value_head_dim=16)


@pytest.fixture(scope="module", params=["qwen3_5_moe", "qwen3_next"])
def hybrid(request, tmp_path_factory):
    from families import build_family

    folder = tmp_path_factory.mktemp(request.param)
    build_family(request.param, folder, **KERNEL_SIZES)
    return folder


def linear_layers(engine) -> list:
    return [block.attention for block in engine.model.layers if hasattr(block.attention, "fuse")]


def assert_decodes_as_without_the_kernel(engine, run, fused: torch.Tensor) -> None:
    """`run()` again with the torch operations in every linear-attention layer: the same greedy tokens, the
    logits within bf16's rounding."""
    for attention in linear_layers(engine):
        attention.fused = None
    unfused = run()
    assert torch.equal(fused.argmax(-1), unfused.argmax(-1))
    assert (fused - unfused).norm() <= 0.01 * unfused.norm()


@needs_kernel
def test_int8_projections_take_the_kernel_and_decode_as_without_it(hybrid, monkeypatch):
    """`--resident-dtype int8`: the input projection and out_proj in int8 inside the kernel's call (bf16's
    engine-level check is tests/test_hybrid.py's)."""
    import moe_local

    if not native.library().experts_int8:
        pytest.skip("this CPU has no int8 kernels")
    engine = moe_local.load(str(hybrid), device="cpu", dtype="bf16", resident_dtype="int8", ctx_size=64)
    layers = linear_layers(engine)
    assert layers and all(a.fused is not None for a in layers)
    results, call = [], cpu_deltanet.Fused.__call__
    monkeypatch.setattr(cpu_deltanet.Fused, "__call__", lambda self, *args: results.append(call(self, *args)) or results[-1])

    def run() -> torch.Tensor:
        engine.tokens = []  # from the start each time: the state holds the last run's tokens
        return greedy(engine, list(range(3, 15)), 8)

    fused = run()
    assert len(results) == 8 * len(layers) and all(r is not None for r in results)  # the prompt's 12 rows: torch's
    assert_decodes_as_without_the_kernel(engine, run, fused)


@needs_kernel
def test_a_prefill_in_chunks_through_the_kernel_is_decode_token_by_token(hybrid, monkeypatch):
    """fp32, 150 positions: prefill chunks of 100 (the chunked kernel in every linear layer, the second chunk from
    the first's state) against one token at a time (the decode step), logits within 1e-4 of their scale."""
    import moe_local

    ids = [1] + torch.randint(3, 320, (149,), generator=torch.Generator().manual_seed(1)).tolist()
    results, chunked = [], cpu_deltanet.chunked
    monkeypatch.setattr(cpu_deltanet, "chunked", lambda *args: results.append(chunked(*args)) or results[-1])
    engine = moe_local.load(str(hybrid), device="cpu", prefill_chunk=100)
    prefilled = engine.logits(ids)
    assert len(results) == 2 * len(linear_layers(engine)) and all(r is not None for r in results)
    stepped = moe_local.load(str(hybrid), device="cpu", prefill_chunk=1).logits(ids)
    assert (prefilled - stepped).abs().max() <= 1e-4 * stepped.abs().max()


def test_without_the_kernels_linear_attention_runs_the_torch_operations_and_the_load_says_why(rebuilt, monkeypatch, hybrid):
    import moe_local

    monkeypatch.setenv("MOE_LOCAL_KERNELS", "0")
    assert cpu_deltanet.Step.build(**layer(2, 4, 32, 16, 4, torch.bfloat16), state_len=3) is None
    engine = moe_local.load(str(hybrid), device="cpu", dtype="bf16", ctx_size=64)
    assert "moe-local's CPU kernels are not built, torch's are slower" in " ".join(engine.notes)
    assert linear_layers(engine) and all(a.fused is None for a in linear_layers(engine))
    assert greedy(engine, list(range(3, 15)), 3).shape == (3, engine.cfg.vocab_size)
