"""The CPU's decode attention kernel (`moe_local/cpu_attention.py`, `attend` in `cpu_kernels.c`): against a float64
reference (masks, sinks, several chunks of keys, DeepSeek's latent with values inside the keys, strided
cache views, fp32 and bf16), which calls take it, and what happens where it cannot be built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moe_local
from moe_local import cpu_attention, native
from moe_local.errors import ConfigError
from moe_local.model import attend, rope_cos_sin

needs_kernel = pytest.mark.skipif(native.unavailable() is not None, reason=f"the kernel cannot be built here: {native.unavailable()}")


def reference(q, keys, values, mask, scale, sinks) -> torch.Tensor:
    s = q.double() @ keys.double().transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double().expand(*s.shape[:-1], 1)], dim=-1)
    p = torch.softmax(s, dim=-1)
    return (p[..., :-1] if sinks is not None else p) @ values.double()


def case(heads, queries, dim, value_dim, positions, dtype, seed=0):
    """q [1, heads, queries, dim], and keys and values as views of longer caches, as the model passes them;
    a value_dim of None: DeepSeek's latent, the values the first 512 of each key."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, queries, dim, generator=gen).to(dtype)
    keys = torch.randn(heads, positions + 7, dim, generator=gen).to(dtype)[None, :, :positions]
    if value_dim is None:
        return q, keys, keys[..., :512]
    return q, keys, torch.randn(heads, positions + 7, value_dim, generator=gen).to(dtype)[None, :, :positions]


@needs_kernel
@pytest.mark.parametrize("flags", ["", "-mno-avx512bf16"])  # bf16 keys as bf16 pairs where the CPU can, and widened
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,queries,dim,value_dim,positions", [(8, 2, 64, 64, 900), (4, 3, 128, 128, 7), (2, 8, 64, 64, 1), (1, 16, 576, None, 1100)])
def test_the_kernel_matches_the_reference(rebuilt, monkeypatch, flags, heads, queries, dim, value_dim, positions, dtype):
    monkeypatch.setenv("MOE_LOCAL_KERNEL_FLAGS", flags)
    q, keys, values = case(heads, queries, dim, value_dim, positions, dtype)
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(queries, positions, generator=gen) > 0.3
    mask[:, -1] = True  # every query sees a key
    mask[0, : positions * 2 // 3] = False  # and one sees none of its first chunk of 512
    sinks = torch.randn(1, heads, queries, 1, generator=gen)
    for m, s, scale in ((None, None, None), (mask, None, 0.1), (mask, sinks, None), (None, sinks, 0.3)):
        got = cpu_attention.attend(q, keys, values, m, scale, s)
        assert got is not None and got.dtype == dtype and got.shape == (1, heads, queries, values.shape[-1])
        want = reference(q, keys, values, m, scale, s)
        tolerance = 1e-5 if dtype == torch.float32 else 2**-8  # bf16: the output's own rounding
        assert torch.allclose(got.double(), want, rtol=tolerance, atol=tolerance * want.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads,queries,dim", [(2, 3, 32), (1, 16, 576)])
def test_a_pools_rows_each_with_its_own_mask_match_the_reference(dtype, kv_heads, queries, dim):
    """The server's batched step: the rows lo..lo+n-1 of a KV pool [N, Hkv, C, d], each sequence masked to
    its own positions ([n, 1, 1, S]); DeepSeek's latent pool as [n, 1, S, 576] with the values inside."""
    gen = torch.Generator().manual_seed(2)
    pool = torch.randn(5, kv_heads, 40, dim, generator=gen).to(dtype)
    keys = pool[1:4, :, :33]
    values = keys[..., :512] if dim == 576 else torch.randn(5, kv_heads, 40, dim, generator=gen).to(dtype)[1:4, :, :33]
    q = torch.randn(3, kv_heads, queries, dim, generator=gen).to(dtype)
    mask = torch.rand(3, 1, 1, 33, generator=gen) > 0.4
    mask[..., 0] = True
    sinks = torch.randn(kv_heads, queries, 1, generator=gen) if dim != 576 else None  # gpt-oss's, one per query head
    got = cpu_attention.attend(q, keys, values, mask, None, sinks)
    want = reference(q, keys, values, mask, None, sinks)
    tolerance = 1e-5 if dtype == torch.float32 else 2**-8
    assert got is not None and torch.allclose(got.double(), want, rtol=tolerance, atol=tolerance * want.abs().max().item())


@needs_kernel
def test_decode_steps_take_the_kernel_and_prefill_chunks_sdpa():
    q, keys, values = case(8, 2, 64, 64, 300, torch.float32)
    assert torch.equal(attend(q, keys, values, None, None, None), cpu_attention.attend(q, keys, values, None, None, None))
    most, most_latent = cpu_attention.MAX_QUERIES[False]  # fp32: keys widened, as bf16 ones where the CPU cannot pair them
    many, _, _ = case(8, most + 1, 64, 64, 300, torch.float32)
    assert cpu_attention.attend(many, keys, values, None, None, None) is None  # a prefill chunk's many queries
    assert torch.equal(attend(many, keys, values, None, None, None), F.scaled_dot_product_attention(many, keys, values))
    assert cpu_attention.attend(q[0], keys[0], values[0], None, None, None) is None  # not [B, Hkv, Q, D]: SDPA's to broadcast
    heads_apart = torch.randn(8, 2, 300, 64).transpose(0, 1)  # [2, 8, ...] with no one stride between its 16 heads
    assert cpu_attention.attend(torch.cat([q, q]), heads_apart, heads_apart, None, None, None) is None
    latent, keys, values = case(1, most_latent, 576, None, 300, torch.float32)
    assert cpu_attention.attend(latent, keys, values, None, None, None) is not None
    assert cpu_attention.attend(case(1, most_latent + 1, 576, None, 300, torch.float32)[0], keys, values, None, None, None) is None


@pytest.mark.parametrize(
    "env,why",
    [({"MOE_LOCAL_KERNELS": "0"}, "MOE_LOCAL_KERNELS=0"), ({"CC": "/nonexistent/cc"}, "the C compiler (/nonexistent/cc) could not run"),
     ({"CC": "false"}, "false could not build moe-local's CPU kernels")],
)
def test_without_the_kernels_attention_stays_on_sdpa_and_the_load_says_why(rebuilt, monkeypatch, tmp_path, env, why):
    monkeypatch.setenv("MOE_LOCAL_CACHE", str(tmp_path))  # nothing built before
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert native.unavailable().startswith(why)
    q, keys, values = case(8, 2, 64, 64, 30, torch.float32)
    assert cpu_attention.attend(q, keys, values, None, None, None) is None
    assert torch.equal(attend(q, keys, values, None, None, None), F.scaled_dot_product_attention(q, keys, values))
    engine = moe_local.load(moe_local.__path__[0] + "/demo", device="cpu")
    assert f"moe-local's CPU kernels are not built, torch's are slower (decode attention ~1.5x, MXFP4 experts ~18x): {why}" in " ".join(engine.notes)


# what each adds to the fused block: (variant, overrides), the layers it fuses; MLPs 64 wide, which int4's packing
# takes (`--resident-dtype int4` quantizes them too)
FUSED_VARIANTS = {
    "mixtral": (("mixtral", {}), [0, 1, 2]),
    "qwen3_moe": (("qwen3_moe", {}), [0, 1, 2]),  # q/k norms per head, head_dim 24
    "qwen2_moe": (("qwen2_moe", {"shared_expert_intermediate_size": 64}), [0, 1, 2]),  # q/k/v biases
    "glm4_moe": (("glm4_moe", {}), [0, 1, 2]),  # partial rotary, biases, q/k norms
    "olmoe": (("olmoe", {"clip_qkv": None}), [0, 1, 2]),  # q/k norms over the whole projection
    "olmoe-clip": (("olmoe", {}), []),  # clipping: not the kernel's
    "gpt_oss": (("gpt_oss", {}), [0, 1, 2]),  # sinks; sliding windows of 6 (rings) and full attention
    "mixtral-window": (("mixtral", {"sliding_window": 6}), [0, 1, 2]),  # every layer a ring
    "deepseek_v2": (("deepseek_v2", {}), []),  # latent attention
    "minimax_m2": (("minimax_m2", {}), [0, 1, 2]),  # q/k norms over the whole projection, a quarter of each head rotated
    # norms after the attention, none before the MoE, v norms, full layers' own head size (64: int4's packing takes
    # their q|k projection of 5 heads) and values from keys
    "gemma4": (("gemma4", {"intermediate_size": 64, "global_head_dim": 64}), [0, 1, 2, 3]),
}


@needs_kernel
@pytest.mark.parametrize("resident", ["auto", "int8", "int4"])
@pytest.mark.parametrize("variant", FUSED_VARIANTS)
def test_a_decode_tokens_fused_attention_block_gives_the_torch_operations_results(tmp_path, variant, resident):
    """Block by block, from the same input and cache: the kernel's x after attention, the MoE's input and the
    cache entry it writes against the torch operations'. int8 and int4 projections are the same kernels' in
    both, so only the norms' order of sums differs; bf16 ones sum in another order than torch's matmul."""
    from conftest import build_mixtral
    from families import build_family

    (name, overrides), fused = FUSED_VARIANTS[variant]
    if name == "mixtral":
        build_mixtral(tmp_path, None, **overrides)
    else:
        build_family(name, tmp_path, **overrides)
    if resident == "int4" and name == "deepseek_v2":  # kv_a's 40 output rows: a clear error before anything loads
        with pytest.raises(ConfigError, match="int4 on CPU needs matrices of a multiple of 16 rows"):
            moe_local.load(str(tmp_path), device="cpu", dtype="bf16", resident_dtype=resident, ctx_size=64)
        return
    engine = moe_local.load(str(tmp_path), device="cpu", dtype="bf16", resident_dtype=resident, ctx_size=64)
    model = engine.model
    assert [i for i, block in enumerate(model.layers) if block.fused is not None] == fused
    gen = torch.Generator().manual_seed(0)
    pos = 37
    for i in fused:
        block = model.layers[i]
        inv_freq, rope = model.inv_freqs[model.rope_of[i]], model.ropes[model.rope_of[i]]  # Gemma 4: the layer's own
        cos, sin = rope_cos_sin(inv_freq, torch.tensor([pos]), torch.bfloat16, rope.attention_factor)
        x = torch.randn(1, model.cfg.dim, generator=gen).bfloat16()
        cache = tuple(torch.randn(t.shape, generator=gen).bfloat16() for t in engine.kv.layers[i])
        ours = tuple(t.clone() for t in cache)
        got_x, got_h = block.fused(x, cos, sin, [ours], [pos])
        want_x = x + block.attention_out_norm(block.attention(block.attention_norm(x), cos, sin, cache, pos))
        want_h = block.ffn_norm(want_x)
        for got, want in ((ours[0], cache[0]), (ours[1], cache[1]), (got_x, want_x), (got_h, want_h)):
            if resident != "auto":  # one bf16 step apart at most, where the norms' sums round differently
                assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=0)
            else:
                assert (got.float() - want.float()).norm() <= 0.01 * want.float().norm()
        slot = pos % cache[0].shape[1]  # a ring's slot for pos, or pos
        assert torch.equal(ours[0][:, :slot], cache[0][:, :slot]) and torch.equal(ours[0][:, slot + 1 :], cache[0][:, slot + 1 :])
        # a batch step: three sequences, each at its own position over its own cache, against `forward_batch`'s
        # torch operations; each row's result is the one it gets alone
        positions = [3, 37, 12]  # with a window of 6: a ring not yet full, and two wrapped
        xs = torch.randn(3, model.cfg.dim, generator=gen).bfloat16()
        cos3, sin3 = rope_cos_sin(inv_freq, torch.tensor(positions), torch.bfloat16, rope.attention_factor)
        caches = [tuple(torch.randn(t.shape, generator=gen).bfloat16() for t in engine.kv.layers[i]) for _ in positions]
        ours = [tuple(t.clone() for t in cache) for cache in caches]
        got_x, got_h = block.fused(xs, cos3, sin3, ours, positions)
        want_x = xs + block.attention_out_norm(block.attention.forward_batch(block.attention_norm(xs), cos3, sin3, caches, positions))
        for got, want in ((got_x, want_x), (got_h, block.ffn_norm(want_x)), *zip(ours[1], caches[1])):
            assert (got.float() - want.float()).norm() <= 0.01 * want.float().norm()
        alone = [tuple(t.clone() for t in cache) for cache in caches[1:2]]
        assert all(torch.equal(a, b) for a, b in zip(block.fused(xs[1:2], cos3[1:2], sin3[1:2], alone, positions[1:2]), (got_x[1:2], got_h[1:2])))


def greedy(engine, prompt: list[int], n: int) -> torch.Tensor:
    """The logits [n, V] of n greedy decode steps after `prompt` (its cached prefix reused)."""
    token, steps = int(engine.prefill(prompt)[0].argmax()), []
    for _ in range(n):
        steps.append(engine.decode_one(token))
        token = int(steps[-1].argmax())
    return torch.stack(steps)


def assert_decodes_as_without_fusion(engine, run, fused: torch.Tensor) -> None:
    """`run()` again with the torch operations in place of every fused block: the same greedy tokens as `fused`
    (its logits with them), the logits within bf16's rounding."""
    for block in engine.model.layers:
        block.fused = None
    unfused = run()
    assert torch.equal(fused.argmax(-1), unfused.argmax(-1))
    assert (fused - unfused).norm() <= 0.01 * unfused.norm()


@needs_kernel
@pytest.mark.parametrize("flags", ["", "-mno-avx512vbmi", "-mno-avx512bf16 -mno-avx512vnni"])  # bf16 pairs, int8 and int4; not int4; none
def test_decode_tokens_take_the_fused_block_and_decode_as_without_it(rebuilt, tiny, monkeypatch, flags):
    monkeypatch.setenv("MOE_LOCAL_KERNEL_FLAGS", flags)
    for resident, kernel in (("int8", native.library().experts_int8), ("int4", native.library().experts_int4)):
        quantized = moe_local.load(str(tiny[0]), device="cpu", dtype="bf16", resident_dtype=resident, ctx_size=64)
        assert all((block.fused is not None) == kernel for block in quantized.model.layers)
    engine = moe_local.load(str(tiny[0]), device="cpu", dtype="bf16", ctx_size=64)
    results, call = [], cpu_attention.Fused.__call__
    monkeypatch.setattr(cpu_attention.Fused, "__call__", lambda self, *args: results.append(call(self, *args)) or results[-1])

    def run() -> torch.Tensor:
        return greedy(engine, list(range(3, 15)), 6)

    fused = run()
    assert len(results) == 6 * engine.cfg.n_layers and all(r is not None for r in results)  # the prompt's 12 rows: torch's
    assert_decodes_as_without_fusion(engine, run, fused)


@needs_kernel
def test_a_batch_step_takes_the_fused_block_for_all_its_rows_and_decodes_as_without_it(tiny, monkeypatch):
    engine = moe_local.load(str(tiny[0]), device="cpu", dtype="bf16", ctx_size=64, sequences=3)
    seqs = [engine.sequence] + [engine.new_sequence() for _ in range(2)]
    rows, call = [], cpu_attention.Fused.__call__
    monkeypatch.setattr(cpu_attention.Fused, "__call__", lambda self, x, *args: rows.append(x.shape[0]) or call(self, x, *args))

    def steps() -> torch.Tensor:
        tokens = [int(engine.prefill(list(range(3 + s, 12 + 2 * s)), seq)[0].argmax()) for s, seq in enumerate(seqs)]
        out = []
        for _ in range(4):
            out.append(engine.decode_batch(seqs, tokens))
            tokens = out[-1].argmax(-1).tolist()
        return torch.stack(out)

    fused = steps()
    assert rows.count(3) == 4 * engine.cfg.n_layers  # each step's three rows in one call a layer
    assert_decodes_as_without_fusion(engine, steps, fused)


@needs_kernel
@pytest.mark.parametrize("variant", ["mixtral-window", "gemma4"])  # Gemma 4: rings of 6 between full layers
def test_a_sliding_layers_ring_decodes_through_the_fused_block_as_without_it(tmp_path, variant):
    from families import build_variant

    build_variant(variant, tmp_path)
    engine = moe_local.load(str(tmp_path), device="cpu", dtype="bf16", ctx_size=64)
    assert engine.kv.layers[0][0].shape[1] == 6 and all(block.fused is not None for block in engine.model.layers)
    prompt = [1, 9, 40, 7]

    def run() -> torch.Tensor:
        return greedy(engine, prompt, 12)  # past the window: the ring wraps twice

    fused = run()
    # the tokens one prefill of the prompt and the tokens fed would choose (a prefill rounds bf16 otherwise than
    # a decode step, fused or not: Gemma 4's random tiny logits differ by ~5%, so the tokens are what is compared)
    first = int(engine.prefill(prompt)[0].argmax())
    full = engine.logits(prompt + [first] + fused[:-1].argmax(-1).tolist())[len(prompt) :]
    assert torch.equal(fused.argmax(-1), full.argmax(-1))
    assert_decodes_as_without_fusion(engine, run, fused)
