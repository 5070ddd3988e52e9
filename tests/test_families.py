"""Every supported MoE family against its `transformers` reference: fp32 logits, greedy tokens at any slot
count and with prefetch on or off, through the API and the CLI; the pieces each family adds (routers,
latent attention's cache, YaRN, dense and shared MLPs) and the clear errors for what stays unsupported."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

import moe_local
from conftest import moe_local_cli
from families import VARIANTS, build_family
from moe_local.config import FAMILIES, PRESETS, ModelConfig, RouterConfig, preset_config
from moe_local.errors import ConfigError
from moe_local.generate import GenerationStats, SamplingParams, generate
from moe_local.routing import route

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module", params=list(VARIANTS))
def family(request, tmp_path_factory, tokenizer_dir):
    """(variant, folder, reference model)."""
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, build_family(request.param, folder, tokenizer_dir)


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    return [1] + torch.randint(3, 320, (n - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    ids = torch.tensor([ids])
    with torch.no_grad():  # an explicit mask: generate would otherwise mask every id equal to pad_token_id
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def greedy(engine, ids: list[int], n: int) -> list[int]:
    return list(generate(engine, ids, n, GREEDY, set(), GenerationStats()))


def test_fp32_logits_match_transformers(family, device):
    variant, folder, reference = family
    ids = prompt_ids(40)
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0]
    # prefill in chunks of 16, so later chunks attend to the cache the earlier ones wrote
    got = moe_local.load(folder, device=device, expert_slots=5, prefill_chunk=16).logits(ids)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize(("slots", "prefetch"), [(1, True), (5, False), ("all", True)])
def test_greedy_tokens_match_transformers_at_any_slot_count(family, slots, prefetch, device):
    variant, folder, reference = family
    cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    slots = cfg.n_moe_layers * cfg.n_experts if slots == "all" else slots
    ids = prompt_ids(10, seed=3)
    want = reference_greedy(reference, ids, 20)
    engine = moe_local.load(folder, device=device, expert_slots=slots, prefetch=prefetch)
    assert greedy(engine, ids, 20) == want


def test_cli_run_greedy_matches_transformers(family):
    variant, folder, reference = family
    result = moe_local_cli("run", str(folder), "-p", "def main():", "--raw", "-n", "8", "--temperature", "0",
                           "--json", "--device", "cpu", "--expert-slots", "3", "--quiet")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    want = reference_greedy(reference, out["prompt_tokens"], 8)
    # the run stops at EOS; up to there it must be transformers' continuation
    assert out["tokens"] == want[: len(out["tokens"])] and len(out["tokens"]) >= 1


def test_info_counts_match_the_checkpoint_tensors(family):
    variant, folder, _ = family
    result = moe_local_cli("info", str(folder), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        sizes = {name: math.prod(f.get_slice(name).get_shape()) for name in f.keys()}
    routed = {name: n for name, n in sizes.items() if ".experts." in name}
    one = sum(routed.values()) // (info["moe_layers"] * info["experts_per_layer"])
    p = info["parameters"]
    assert p["total"] == sum(sizes.values())
    assert p["routed_experts"] == sum(routed.values())
    assert p["per_expert"] == one
    assert p["active_per_token"] == p["resident"] + info["moe_layers"] * info["experts_per_token"] * one
    dense = sum(n for name, n in sizes.items() if ".mlp." in name and ".experts." not in name and "gate." not in name
                and "router." not in name and "shared_expert_gate" not in name)
    assert p["dense_and_shared_mlp"] == dense + sum(n for name, n in sizes.items() if "shared_expert_gate" in name)


@pytest.mark.parametrize("variant", ["deepseek_v2", "deepseek_v3"])
def test_latent_attention_caches_the_latent_not_keys_and_values(variant, tmp_path):
    build_family(variant, tmp_path)
    engine = moe_local.load(tmp_path, device="cpu", ctx_size=100, dtype="fp32")
    cfg = engine.cfg
    per_token = cfg.mla.kv_lora_rank + cfg.mla.rope_dim  # 32 + 8, not 2 x 4 heads x (16 + 8)
    assert engine.kv.nbytes == cfg.n_layers * 100 * per_token * 4
    assert engine.plan.kv_bytes == engine.kv.nbytes


def test_quantized_experts_run_every_family_shape(tmp_path):
    """int8 and int4 experts through a family with dense layers, shared experts and MLA."""
    reference = build_family("deepseek_v3", tmp_path, hidden_size=128, moe_intermediate_size=64)
    ids = prompt_ids(24)
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0]
    for experts_dtype in ("int8", "int4"):
        got = moe_local.load(tmp_path, device="cpu", dtype="fp32", experts_dtype=experts_dtype, expert_slots=4).logits(ids)
        kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="batchmean")
        # random weights route by near-ties, which int4's rounding flips more often than a trained model's
        assert kl <= (0.001 if experts_dtype == "int8" else 0.1)
        assert torch.equal(got, moe_local.load(tmp_path, device="cpu", dtype="fp32", experts_dtype=experts_dtype, expert_slots=16).logits(ids))


# ---- DeepSeek Sparse Attention (DeepSeek-V3.2): the indexer's selection ----------------------------------


@pytest.mark.parametrize("ties", [False, True])
def test_indexer_selects_what_transformers_selects(ties):
    """Our `Indexer` against transformers' DeepseekV32Indexer on the same weights: per query the same `topk`
    keys among those it may see; with every score tied (weights of 0), torch's topk over the same rows picks the
    same ones in both."""
    from transformers import AutoConfig
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32Indexer

    from moe_local.model import Indexer, rope_cos_sin

    torch.manual_seed(0)
    raw = dict(hidden_size=32, q_lora_rank=24, qk_rope_head_dim=8, index_n_heads=4, index_head_dim=16, index_topk=5,
               num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2)
    reference = DeepseekV32Indexer(AutoConfig.for_model("deepseek_v32", **raw), 0).eval()
    for p in reference.parameters():
        torch.nn.init.normal_(p)
    if ties:
        torch.nn.init.zeros_(reference.weights_proj.weight)
    cfg = ModelConfig.from_hf({**AutoConfig.for_model("deepseek_v32", **raw, vocab_size=64, kv_lora_rank=16,
                                                      n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=0).to_dict()})
    ours = Indexer(cfg)
    ours.load_state_dict({"wq.weight": reference.wq_b.weight, "wk.weight": reference.wk.weight, "k_norm.weight": reference.k_norm.weight,
                          "k_norm.bias": reference.k_norm.bias, "weights.weight": reference.weights_proj.weight})
    T = 14
    x, q_latent = torch.randn(1, T, 32), torch.randn(1, T, 24)
    cos, sin = rope_cos_sin(cfg.rope.inv_freq(), torch.arange(T), torch.float32)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    unsigned_sin = sin.clone()
    unsigned_sin[:, :4] = -sin[:, :4]  # ours carries the first half negated
    with torch.no_grad():
        want = reference(x, q_latent, (cos[None], unsigned_sin[None]), causal[None], None)[0]  # [T, 5]
        q, w, k = ours.project(x[0], q_latent[0], cos, sin)
        got = ours.select(q, w, k, causal)  # [T, T]
    for t in range(T):
        if t + 1 > 5:  # more keys than it keeps: exactly transformers' choice
            assert sorted(got[t].nonzero().flatten().tolist()) == sorted(want[t].tolist()), t
        else:  # all it may see (transformers' row also names masked future keys, which its mask then drops)
            assert got[t].tolist() == causal[t].tolist()


def test_the_indexer_scores_a_long_chunk_in_slices_with_the_same_choice(monkeypatch):
    """A long prefill chunk's scores are made a few queries at a time (`SCORE_BYTES`): the same keys kept."""
    from moe_local import model
    from moe_local.model import Indexer

    cfg = ModelConfig.from_hf({**PRESETS["deepseek-v3.2"], "num_hidden_layers": 1, "first_k_dense_replace": 0,
                               "index_n_heads": 4, "index_head_dim": 16, "index_topk": 5, "qk_rope_head_dim": 8})
    indexer = Indexer(cfg)
    gen = torch.Generator().manual_seed(0)
    q, w, keys = torch.randn(30, 4, 16, generator=gen), torch.randn(30, 4, generator=gen), torch.randn(30, 16, generator=gen)
    visible = torch.ones(30, 30, dtype=torch.bool).tril()
    whole = indexer.select(q, w, keys, visible)
    monkeypatch.setattr(model, "SCORE_BYTES", 4 * 4 * 30 * 7)  # 7 queries at a time
    assert torch.equal(indexer.select(q, w, keys, visible), whole)
    assert (whole.sum(-1) == visible.sum(-1).clamp(max=5)).all()


@pytest.mark.parametrize("variant", ["deepseek_v32", "glm_moe_dsa"])
def test_sparse_attention_really_drops_tokens(variant, tmp_path):
    """With index_topk 6 below the prompt's 40 tokens, the logits (which match transformers') are not what
    dense latent attention over every token gives."""
    build_family(variant, tmp_path / "sparse")
    dense = tmp_path / "dense"
    dense.mkdir()
    for f in (tmp_path / "sparse").iterdir():
        (dense / f.name).write_bytes(f.read_bytes())
    config = json.loads((dense / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps({**config, "index_topk": 4096}))
    ids = prompt_ids(40)
    sparse_logits = moe_local.load(tmp_path / "sparse", device="cpu", dtype="fp32").logits(ids)
    dense_logits = moe_local.load(dense, device="cpu", dtype="fp32").logits(ids)
    # up to topk tokens all are kept (the same but for rounding: an expert's matmul over other rows)
    assert (sparse_logits[:6] - dense_logits[:6]).abs().max() <= 1e-5 * dense_logits.abs().max()
    assert (sparse_logits[6:] - dense_logits[6:]).abs().max() > 0.05 * dense_logits.abs().max()


@pytest.mark.parametrize("fields", [
    {}, {"index_topk_freq": 4, "index_skip_topk_offset": 3}, {"index_topk_freq": 2}, {"index_topk_pattern": "FFSFSSFF"},
    {"indexer_types": ["full", "shared"] * 4},
])
def test_glm_indexer_layers_are_read_as_transformers_reads_them(fields):
    """Which layers run their own indexer: every one by default (GLM-5, 5.1), GLM-5.2's published schedule
    (index_topk_freq 4, index_skip_topk_offset 3: layers 0-2, then every fourth from 6), a pattern, a list."""
    from transformers import AutoConfig

    raw = {**PRESETS["glm-5"], "num_hidden_layers": 8, **fields}
    reference = AutoConfig.for_model(**raw).indexer_types
    ix = ModelConfig.from_hf(raw).indexer
    assert ["full" if ix.own(i) else "shared" for i in range(8)] == reference
    if fields.get("index_topk_freq") == 4:
        assert reference == ["full"] * 3 + ["shared"] * 3 + ["full", "shared"]


def test_glm_5_2_caches_index_keys_only_in_its_21_indexer_layers():
    """GLM-5.2's 78 layers: 21 with an indexer (57 shared ones: its files hold 285 = 57 x 5 tensors fewer than
    GLM-5.1's), so its cache holds 21 index keys a token beside 78 latents."""
    cfg = ModelConfig.from_hf({**PRESETS["glm-5"], "index_topk_freq": 4, "index_skip_topk_offset": 3})
    assert sum(cfg.indexer.own(i) for i in range(78)) == 21
    assert cfg.kv_cache_numel(1000) == 1000 * (78 * (512 + 64) + 21 * 128)
    glm_5 = preset_config("glm-5").parameter_counts()["total"]
    assert glm_5 - cfg.parameter_counts()["total"] == 57 * (32 * 128 * 2048 + 128 * (6144 + 2) + 32 * 6144)


def test_the_indexers_keys_are_cached_and_planned(tmp_path):
    build_family("deepseek_v32", tmp_path)
    engine = moe_local.load(tmp_path, device="cpu", ctx_size=100, dtype="fp32")
    assert [tuple(t.shape) for t in engine.kv.layers[0]] == [(100, 32 + 8), (100, 16)]  # latent + rope key; index key
    assert engine.plan.kv_bytes == engine.kv.nbytes == engine.cfg.n_layers * 100 * (32 + 8 + 16) * 4


def test_a_shared_indexer_layer_keeps_the_full_layers_choice_and_caches_no_keys(tmp_path):
    """GLM-5.2's shared layers (here the second of full, shared, full) have no indexer weights in the checkpoint
    and no index keys in the cache; each of their queries attends to the keys the layer before kept for it."""
    build_family("glm_moe_dsa", tmp_path)
    engine = moe_local.load(tmp_path, device="cpu", ctx_size=100, dtype="fp32", prefill_chunk=16)
    assert [[tuple(t.shape) for t in layer] for layer in engine.kv.layers] == [[(100, 40), (100, 16)], [(100, 40), (100, 0)], [(100, 40), (100, 16)]]
    assert engine.plan.kv_bytes == engine.kv.nbytes == 100 * (3 * 40 + 2 * 16) * 4
    seen = {}

    def watch(i, attend):  # the mask layer i's latent attention is given
        def spy(query, entries, mask):
            seen[i] = mask
            return attend(query, entries, mask)
        return spy

    for i, layer in enumerate(engine.model.layers):
        layer.attention._attend_latent = watch(i, layer.attention._attend_latent)
    engine.logits(prompt_ids(40))  # the last chunk: 8 queries over 33..40 past tokens
    assert engine.model.layers[1].attention.indexer.source is engine.model.layers[0].attention.indexer
    assert (seen[0].sum(-1) == 6).all() and torch.equal(seen[1], seen[0]) and not torch.equal(seen[2], seen[0])


def test_a_sparse_decode_step_reads_only_the_latents_it_keeps(tmp_path):
    """Past index_topk (6) positions a decode step's latent attention is given the 6 kept latents, no mask: its
    work stops growing with the context (a prefill chunk's queries each keep their own, under a mask)."""
    build_family("deepseek_v32", tmp_path)
    engine = moe_local.load(tmp_path, device="cpu", dtype="fp32")
    engine.prefill(prompt_ids(17))
    given = []
    for layer in engine.model.layers:
        attend = layer.attention._attend_latent
        layer.attention._attend_latent = lambda query, entries, mask, attend=attend: given.append((entries.shape[0], mask)) or attend(query, entries, mask)
    engine.decode_one(5)
    assert given == [(6, None)] * engine.cfg.n_layers


@pytest.mark.parametrize("variant", ["deepseek_v32", "glm_moe_dsa"])
def test_sparse_prefill_in_chunks_is_decode_token_by_token(variant, tmp_path):
    """The indexer's keys written chunk by chunk (7 tokens) then one decode step at a time give the logits one
    prefill of the whole sequence gives: each query keeps the same past tokens either way."""
    build_family(variant, tmp_path)
    engine = moe_local.load(tmp_path, device="cpu", dtype="fp32", prefill_chunk=7)
    prompt = prompt_ids(17, seed=7)
    logits, _ = engine.prefill(prompt)
    steps, tokens = [logits], []
    for _ in range(12):
        tokens.append(int(steps[-1].argmax()))
        steps.append(engine.decode_one(tokens[-1]))
    full = moe_local.load(tmp_path, device="cpu", dtype="fp32", prefill_chunk=64).logits(prompt + tokens)
    assert (torch.stack(steps) - full[16:]).abs().max() <= 1e-4 * full.abs().max()


def test_gemma4_published_multimodal_layout_runs_its_text_model(tmp_path):
    """Gemma 4 ships as Gemma4ForConditionalGeneration: the text model's config under text_config, its tensors
    under model.language_model., a vision tower beside them (not read): the same logits as the text model."""
    from families import to_gemma4_multimodal

    reference = build_family("gemma4", tmp_path / "text")
    to_gemma4_multimodal(tmp_path / "text", tmp_path / "multimodal")
    ids = prompt_ids(20)
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0]
    engine = moe_local.load(tmp_path / "multimodal", device="cpu", dtype="fp32")
    assert engine.cfg.model_type == "gemma4" and engine.cfg.eos_token_ids == (reference.config.eos_token_id, 106)
    got = engine.logits(ids)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_gemma4_sliding_and_full_layers_cache_their_own_geometry():
    """26B-A4B: 25 sliding layers keep a ring of 1024 positions of 8 KV heads of 256; 5 full layers the whole
    context of 2 KV heads of 512 (values, the keys' projection, are still cached apart: they are normalised, not rotated)."""
    cfg, ctx = preset_config("gemma-4-26b-a4b"), 8192
    assert cfg.kv_cache_numel(ctx) == 25 * 1024 * 8 * 256 * 2 + 5 * ctx * 2 * 512 * 2
    result = moe_local_cli("plan", "--preset", "gemma-4-26b-a4b", "--gpu-memory", "8GiB", "--json", "--ctx-size", str(ctx))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report.get("chosen", report)["kv_bytes"] == cfg.kv_cache_numel(ctx) * 2


@pytest.mark.parametrize(("overrides", "message"), [
    ({"enable_moe_block": False}, "gemma4 without enable_moe_block is a dense model"),
    ({"hidden_size_per_layer_input": 256}, "unsupported hidden_size_per_layer_input=256 for gemma4"),
    ({"num_kv_shared_layers": 4}, "unsupported num_kv_shared_layers=4 for gemma4"),
    ({"hidden_activation": "silu"}, "unsupported hidden_activation 'silu' for gemma4"),
])
def test_gemma4_options_the_moe_model_does_not_use_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf({**PRESETS["gemma-4-26b-a4b"], **overrides})


def test_gemma4_experts_are_geglu_and_the_cpu_kernels_take_them_but_for_fp8():
    """Gemma 4's experts: GELU's tanh form of the gate times up; the grouped CPU kernels take them (their
    agreement with torch is test_runtime's and test_ggml's) where they take SwiGLU's, but not FP8's."""
    from moe_local import native
    from moe_local.experts.formats import Dense, geglu_tanh, grouped_kernels

    cfg = preset_config("gemma-4-26b-a4b", 2)
    fmt = Dense(cfg, torch.bfloat16)
    views = [fmt.unpack(torch.randn(fmt.expert_bytes // 2).bfloat16().view(torch.uint8)) for _ in range(2)]
    xs = torch.randn(3, cfg.dim).bfloat16()
    gate, up = (xs.float() @ views[0]["gate_up"].float().T).chunk(2, dim=-1)
    want = (torch.nn.functional.gelu(gate, approximate="tanh") * up) @ views[0]["down"].float().T
    assert torch.allclose(fmt.forward(xs.float(), {k: v.float() for k, v in views[0].items()}), want, rtol=1e-4, atol=1e-3)
    assert fmt.activation is geglu_tanh
    assert grouped_kernels(cfg, "fp8", 128) is None
    if native.unavailable() is None:
        assert grouped_kernels(cfg, "bf16") is not None and fmt.decode_table(views) is not None
        assert fmt.forward_grouped(xs, [2, 1], views).shape == (3, cfg.dim)


# ---- routers, each against the transformers module that defines it ----------------------------------


def transformers_router(model_type: str, **options):
    from transformers import AutoConfig
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    cls = {"glm4_moe": Glm4MoeTopkRouter, "deepseek_v2": DeepseekV2TopkRouter, "deepseek_v3": DeepseekV3TopkRouter}[model_type]
    config = AutoConfig.for_model(model_type, hidden_size=16, num_attention_heads=4, num_key_value_heads=4,
                                  n_routed_experts=16, num_experts_per_tok=4, **options)
    router = cls(config)
    torch.nn.init.normal_(router.weight)
    if hasattr(router, "e_score_correction_bias"):
        router.e_score_correction_bias.normal_(0, 0.3)
    return config, router


@pytest.mark.parametrize(("model_type", "options"), [
    ("glm4_moe", dict(n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)),
    ("deepseek_v3", dict(n_group=8, topk_group=3, routed_scaling_factor=1.0, norm_topk_prob=False)),
    ("deepseek_v2", dict(topk_method="greedy", routed_scaling_factor=1.5)),
    ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2)),
])
def test_router_matches_transformers(model_type, options):
    torch.manual_seed(0)
    config, router = transformers_router(model_type, **options)
    cfg = ModelConfig.from_hf({**config.to_dict(), "model_type": model_type, "num_hidden_layers": 2, "first_k_dense_replace": 0})
    x = torch.randn(200, 16)
    _, want_weights, want_indices = router(x)
    bias = getattr(router, "e_score_correction_bias", None)
    weights, indices = route(router(x)[0], 4, cfg.router, bias)
    # the same experts with the same weights, whatever order each returns them in
    want = torch.zeros(200, 16).scatter(1, want_indices, want_weights)
    got = torch.zeros(200, 16).scatter(1, indices, weights)
    assert torch.allclose(got, want, atol=1e-6)


def test_correction_bias_chooses_experts_but_does_not_weight_them():
    logits = torch.tensor([[0.0, 0.0, 0.0, 3.0]])
    bias = torch.tensor([0.0, 5.0, 0.0, 0.0])
    weights, indices = route(logits, 1, RouterConfig(scoring="sigmoid", renormalize=False, correction_bias=True), bias)
    assert indices.tolist() == [[1]]
    assert weights.item() == pytest.approx(0.5)  # sigmoid(0), not sigmoid(0) + 5


# ---- configs: published geometries, and what stays unsupported ----------------------------------------


def test_presets_match_the_published_parameter_counts():
    counts = {name: preset_config(name).parameter_counts() for name in PRESETS}
    # Qwen3-30B-A3B by hand: embeddings and head, 48 layers of attention, norms, router and 128 experts
    d, layers = 2048, 48
    attention = d * 128 * (32 + 4 + 4) + 32 * 128 * d + 2 * 128  # q, k, v, o and the per-head q/k norms
    expert = 3 * d * 768
    total = 2 * 151936 * d + layers * (attention + 2 * d + 128 * d + 128 * expert) + d
    assert counts["qwen3-30b-a3b"]["total"] == total
    assert counts["qwen3-30b-a3b"]["active_per_token"] == total - layers * 120 * expert
    published = {  # name: (billions total, billions active), as the model cards say
        "qwen3-30b-a3b": (30.5, 3.3), "qwen3-235b-a22b": (235, 22), "deepseek-v3": (671, 37),
        "olmoe-1b-7b": (6.9, 1.3), "glm-4.5-air": (106, 12), "deepseek-v2-lite": (15.7, 2.4),
        "mixtral-8x7b": (46.7, 12.9), "minimax-m2": (230, 10), "gemma-4-26b-a4b": (25.2, 3.8),
        "deepseek-v3.2": (671, 37),  # the model card's 685B counts the multi-token-prediction layer
        "glm-5": (744, 40),
    }
    for name, (total_b, active_b) in published.items():
        assert counts[name]["total"] / 1e9 == pytest.approx(total_b, rel=0.02), name
        # active counts differ by whether the model card counts the embeddings
        assert counts[name]["active_per_token"] / 1e9 == pytest.approx(active_b, rel=0.15), name


def test_plan_preset_reports_parameters_and_the_latent_cache():
    result = moe_local_cli("plan", "--preset", "deepseek-v3", "--gpu-memory", "48GiB", "--json", "--ctx-size", "4096")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    chosen = report.get("chosen", report)
    assert chosen["kv_bytes"] == 61 * 4096 * (512 + 64) * 2  # bf16 latent + rope key per token and layer
    assert chosen["total_experts"] == 58 * 256
    assert chosen["parameters"] == preset_config("deepseek-v3").parameter_counts()


def test_published_rope_scaling_reads_like_rope_parameters():
    raw = dict(PRESETS["deepseek-v3"])
    rope = preset_config("deepseek-v3").rope
    assert rope.kind == "yarn" and rope.factor == 40 and rope.original_max_position_embeddings == 4096
    nested = {**raw, "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000, **{k: v for k, v in raw["rope_scaling"].items() if k != "type"}}}
    del nested["rope_scaling"]
    assert ModelConfig.from_hf(nested).rope == rope


@pytest.mark.parametrize(("raw", "message"), [
    ({"model_type": "llama"}, "unsupported model_type 'llama' in config.json (supported: " + ", ".join(FAMILIES) + ")"),
    ({**PRESETS["qwen3-30b-a3b"], "num_experts": 0}, "dense model with no routed experts"),
    ({**PRESETS["qwen3-30b-a3b"], "num_hidden_layers": 2, "mlp_only_layers": [0, 1]}, "dense model with no routed experts"),
    ({**PRESETS["qwen3-30b-a3b"], "rope_scaling": {"rope_type": "longrope", "factor": 4}}, "unsupported RoPE scaling 'longrope'"),
    ({**PRESETS["deepseek-v3"], "topk_method": "greedy"}, "unsupported topk_method 'greedy' for deepseek_v3"),
    ({**PRESETS["glm-4.5-air"], "n_group": 3}, "do not divide 128 experts into groups"),
    ({**PRESETS["glm-5"], "num_hidden_layers": 2, "indexer_types": ["shared", "full"]}, "first layer must run its indexer"),
    ({**PRESETS["glm-5"], "num_hidden_layers": 2, "indexer_types": ["full"]}, "indexer_types must list 'full' or 'shared' for each of the 2 layers"),
    ({**PRESETS["glm-5"], "num_hidden_layers": 2, "mlp_layer_types": ["dense", "moe"]}, "mlp_layer_types must list 'dense' or 'sparse'"),
    ({**PRESETS["glm-5"], "q_lora_rank": None}, "glm_moe_dsa needs q_lora_rank"),
    ([1, 2], "config.json is not a JSON object"),
])
def test_unsupported_configs_get_one_clear_line(raw, message):
    with pytest.raises(ConfigError, match=None) as error:
        ModelConfig.from_hf(raw)
    assert message in str(error.value)


def test_an_unsupported_model_type_is_one_line_at_the_cli(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "hidden_size": 8}))
    result = moe_local_cli("info", str(tmp_path))
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "unsupported model_type 'gemma3'" in result.stderr
    assert "qwen3_moe" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("variant", ["qwen2_moe", "deepseek_v3", "qwen3_5_moe"])
def test_int8_attention_works_with_biases_and_latent_attention(variant, tmp_path):
    reference = build_family(variant, tmp_path)
    ids = prompt_ids(24)
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0]
    engine = moe_local.load(tmp_path, device="cpu", dtype="fp32", resident_dtype="int8")
    got = engine.logits(ids)
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="batchmean")
    assert kl <= 0.01
    assert engine.plan.resident_bytes < moe_local.load(tmp_path, device="cpu", dtype="fp32").plan.resident_bytes


@pytest.mark.parametrize("variant", ["qwen3_moe", "glm4_moe", "deepseek_v3", "gemma4"])
def test_chat_through_a_family_checkpoint_with_its_own_tokenizer(variant, tmp_path):
    """`run` with the chat template a real checkpoint of the family ships (byte-level BPE, no BOS for Qwen; Gemma 4's
    byte-fallback BPE with its BOS; EOS ids from generation_config.json): the prompt is transformers'
    apply_chat_template, the answer its greedy continuation up to a stop id, which include the end of a turn."""
    from transformers import AutoTokenizer

    from builders import FAMILY_TOKENIZERS, GEMMA4_GENERATION_EOS, train_bytelevel_tokenizer, train_gemma_tokenizer

    reference = build_family(variant, tmp_path, vocab_size=512, bos_token_id=None, eos_token_id=None)
    if variant == "gemma4":
        special = train_gemma_tokenizer(tmp_path)
        turn_end = [special[t] for t in GEMMA4_GENERATION_EOS]
    else:
        special = train_bytelevel_tokenizer(tmp_path, **FAMILY_TOKENIZERS[variant])
        turn_end = [special[t] for t in FAMILY_TOKENIZERS[variant]["generation_eos"]]
    messages = [{"role": "user", "content": "What does difflib do?"}]
    want_prompt = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want_prompt = list(want_prompt) if isinstance(want_prompt, list) else list(want_prompt["input_ids"])
    result = moe_local_cli("run", str(tmp_path), "-p", messages[0]["content"], "-n", "6", "--temperature", "0",
                           "--json", "--device", "cpu", "--quiet")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["prompt_tokens"] == want_prompt
    want = reference_greedy(reference, want_prompt, 6)
    assert out["tokens"] == want[: len(out["tokens"])] and out["tokens"]
    assert moe_local.load(tmp_path, device="cpu", dtype="fp32").stop_ids == set(turn_end)


# ---- gpt-oss: the published MXFP4 experts, the sliding layers' ring cache -----------------------------


@pytest.fixture(scope="module")
def gpt_oss_mxfp4(tmp_path_factory, tokenizer_dir):
    """(folder, reference): a tiny gpt-oss with its experts in the published MXFP4 layout; the reference is
    transformers' model with those experts widened to fp32 (`mxfp4.dequantize`, bit for bit transformers'
    conversion: test_mxfp4.py). Not transformers' loading of the MXFP4 file itself: where a GPU is present
    and its `kernels` package is not, it widens them to bf16 whatever dtype is asked for."""
    from families import to_mxfp4
    from moe_local.weights import mxfp4

    folder = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    reference = build_family("gpt_oss", folder, tokenizer_dir)
    to_mxfp4(folder)
    with safe_open(folder / "model.safetensors", "pt") as f, torch.no_grad():
        for i, layer in enumerate(reference.model.layers):
            for name in ("gate_up_proj", "down_proj"):  # [E, in, out]; the file holds each expert as [out, in]
                prefix = f"model.layers.{i}.mlp.experts.{name}"
                blocks, scales = f.get_tensor(prefix + "_blocks"), f.get_tensor(prefix + "_scales")
                widened = torch.stack([mxfp4.dequantize(b, s, torch.float32).T for b, s in zip(blocks, scales)])
                getattr(layer.mlp.experts, name).copy_(widened)
    return folder, reference


@pytest.mark.parametrize("slots", [1, 4, 24])
def test_mxfp4_experts_stay_mxfp4_and_match_transformers(gpt_oss_mxfp4, slots, device):
    folder, reference = gpt_oss_mxfp4
    engine = moe_local.load(folder, device=device, dtype="fp32", expert_slots=slots, prefill_chunk=16)
    assert engine.store.format.name == "mxfp4"  # auto keeps the checkpoint's format
    ids = prompt_ids(40)
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0]
    got = engine.logits(ids)
    # the same MXFP4 values; on CUDA the kernel sums in another order
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("slots, prefetch", [(2, True), (2, False), (24, True)])  # 24: a token's experts run together
def test_mxfp4_greedy_tokens_match_transformers(gpt_oss_mxfp4, slots, prefetch, device):
    folder, reference = gpt_oss_mxfp4
    ids = prompt_ids(10, seed=3)
    engine = moe_local.load(folder, device=device, dtype="fp32", expert_slots=slots, prefetch=prefetch)
    assert greedy(engine, ids, 20) == reference_greedy(reference, ids, 20)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mxfp4_token_experts_in_one_launch_give_each_experts_bits(gpt_oss_mxfp4, dtype):
    """`forward_slots` on CUDA (the grouped Triton kernel, biases gathered) against one `forward` per expert."""
    folder, _ = gpt_oss_mxfp4
    engine = moe_local.load(folder, device="cuda", dtype="fp32", expert_slots=24)
    cache = engine.experts.cache
    for e in range(4):
        cache.load((0, e), set())
    slots = [cache.acquire_slot((0, e)) for e in (3, 0, 2)]
    fmt = engine.store.format
    x = torch.randn(1, engine.cfg.dim, device="cuda", dtype=dtype)
    want = torch.cat([fmt.forward(x, cache.views[slot]) for slot in slots])
    assert torch.equal(fmt.forward_slots(x, cache.slots, slots, cache.views), want)


def test_mxfp4_experts_take_four_and_a_quarter_bits_a_weight_plus_biases(gpt_oss_mxfp4):
    from moe_local.weights import mxfp4

    folder, _ = gpt_oss_mxfp4
    engine = moe_local.load(folder, device="cpu", dtype="fp32")
    cfg, fmt = engine.cfg, engine.store.format
    d, f = cfg.dim, cfg.ffn_dim
    weights = mxfp4.mxfp4_bytes(2 * f, d) + mxfp4.mxfp4_bytes(d, f)
    assert weights * 8 == 4.25 * 3 * d * f
    exact = weights + (2 * f + d) * 2  # bf16 biases
    assert sum(p.nbytes for p in fmt.parts) == exact
    assert exact <= fmt.expert_bytes < exact + len(fmt.parts) * 256  # each part aligned to 256 bytes
    assert engine.store.memory()["pinned_bytes"] + engine.store.memory()["pageable_bytes"] >= cfg.n_moe_layers * cfg.n_experts * exact


def test_sliding_layers_cache_only_their_window(tmp_path):
    build_family("gpt_oss", tmp_path)
    engine = moe_local.load(tmp_path, device="cpu", ctx_size=64)
    positions = [layer[0].shape[1] for layer in engine.kv.layers]
    assert positions == [6, 64, 6]  # sliding, full, sliding
    assert engine.plan.kv_bytes == engine.kv.nbytes == 2 * (6 + 64 + 6) * 2 * 16 * engine.dtype.itemsize


def test_bf16_gpt_oss_experts_convert_to_mxfp4_int8_and_int4(tmp_path):
    """Unquantized gpt-oss checkpoints load too, and every expert format applies to them."""
    reference = build_family("gpt_oss", tmp_path, hidden_size=128, intermediate_size=64)
    ids = prompt_ids(24)
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0]
    for experts_dtype, bound in (("mxfp4", 0.1), ("int8", 0.001), ("int4", 0.1)):
        got = moe_local.load(tmp_path, device="cpu", dtype="fp32", experts_dtype=experts_dtype, expert_slots=4).logits(ids)
        kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="batchmean")
        assert kl <= bound, experts_dtype


def test_plan_and_info_know_mxfp4(gpt_oss_mxfp4):
    result = moe_local_cli("plan", "--preset", "gpt-oss-120b", "--gpu-memory", "24GiB", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["experts_format"] == "mxfp4"  # as published
    assert 12.5 * 2**20 < report["expert_bytes"] < 12.7 * 2**20  # 3 x 2880 x 2880 x 4.25 bits + biases
    assert report["host_bytes_needed"] / 1e9 == pytest.approx(61, rel=0.02)  # 57 GiB of experts
    assert report["formats"]["mxfp4"]["expert_slots"] > report["formats"]["int8"]["expert_slots"]
    folder, _ = gpt_oss_mxfp4
    info = json.loads(moe_local_cli("info", str(folder), "--json").stdout)
    assert info["experts_format"] == "mxfp4"
    assert info["expert_bytes"] == sum(p.nbytes for p in moe_local.load(folder, device="cpu").store.format.parts)


def test_logits_of_no_tokens_is_a_message(tmp_path):
    build_family("qwen3_moe", tmp_path)
    with pytest.raises(moe_local.errors.MoeLocalError, match="no token ids to evaluate"):
        moe_local.load(tmp_path, device="cpu").logits([])


def test_mxfp4_experts_are_the_published_bytes(gpt_oss_mxfp4):
    """A checkpoint in MXFP4 is copied, not widened and quantized again: the store holds its very bytes."""
    from safetensors import safe_open

    folder, _ = gpt_oss_mxfp4
    engine = moe_local.load(folder, device="cpu")
    parts = engine.store.format.unpack(engine.store.buffer((1, 5)))  # MoE layer 1, expert 5
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        blocks = f.get_tensor("model.layers.1.mlp.experts.gate_up_proj_blocks")[5]  # rows: gate, up, gate, up, ...
        scales = f.get_tensor("model.layers.1.mlp.experts.down_proj_scales")[5]
    assert torch.equal(parts["gate_up.blocks"], torch.cat([blocks[0::2], blocks[1::2]]))
    assert torch.equal(parts["down.scales"], scales)


def test_mxfp4_checkpoints_need_no_quantized_cache(gpt_oss_mxfp4, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LOCAL_CACHE", str(tmp_path / "cache"))
    folder, _ = gpt_oss_mxfp4
    engine = moe_local.load(folder, device="cpu")
    assert engine.store.format.name == "mxfp4" and not (tmp_path / "cache").exists()
