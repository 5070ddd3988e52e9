"""The Gated DeltaNet hybrids (Qwen3-Next, Qwen3.5/3.6-MoE) beyond what every family is checked for in
test_families.py: the chunked delta rule against the step-by-step one, prefill in chunks against
token-by-token decode, a recurrent state that a new prompt cannot cut back, the published multimodal
layout (text model under model.language_model, stacked experts, vision and MTP tensors beside it), the
errors for misshaped checkpoints, and the presets."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import moe_local
from conftest import moe_local_cli
from moe_local import cpu_deltanet, native
from families import BASE, VARIANTS, build_family
from moe_local.batch import Batcher, Request
from moe_local.config import PRESETS, preset_config
from moe_local.generate import SamplingParams
from moe_local.config import ModelConfig
from moe_local.errors import CheckpointError, ConfigError
from moe_local.model import KVPool, LinearAttention, chunked_delta_rule, recurrent_step

HYBRIDS = ["qwen3_5_moe", "qwen3_next"]
needs_kernel = pytest.mark.skipif(native.unavailable() is not None, reason=f"the kernel cannot be built here: {native.unavailable()}")


@pytest.fixture(scope="module", params=HYBRIDS)
def hybrid(request, tmp_path_factory, tokenizer_dir):
    """(variant, folder, reference model)."""
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, build_family(request.param, folder, tokenizer_dir)


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    return [1] + torch.randint(3, 320, (n - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4) -> bool:
    return bool((got - want).abs().max() <= rtol * want.abs().max())


def test_the_chunked_delta_rule_is_the_step_by_step_one():
    """130 positions (two whole chunks of 64 and a padded one) from a state that is not zero, with two value
    heads per key head: the same outputs and the same final state as 130 `recurrent_step`s."""
    gen = torch.Generator().manual_seed(0)
    T, Hk, Hv, dk, dv = 130, 2, 4, 8, 12
    q, k = torch.randn(T, Hk, dk, generator=gen), torch.randn(T, Hk, dk, generator=gen)
    v = torch.randn(T, Hv, dv, generator=gen)
    g = -torch.rand(T, Hv, generator=gen)  # log decay
    beta = torch.rand(T, Hv, generator=gen)
    start = torch.randn(Hv, dk, dv, generator=gen)
    chunked_state, stepped_state = start.clone(), start.clone()[None]
    y = chunked_delta_rule(q, k, v, g, beta, chunked_state)
    steps = torch.cat([recurrent_step(q[t : t + 1], k[t : t + 1], v[t : t + 1], g[t : t + 1], beta[t : t + 1], stepped_state) for t in range(T)])
    assert y.shape == (T, Hv, dv)
    assert close(y, steps, 1e-5) and close(chunked_state, stepped_state[0], 1e-5)


def test_prefill_in_chunks_is_decode_token_by_token(hybrid):
    """150 positions: the engine's prefill chunks of 100 (each in chunks of 64 of the delta rule, the second
    from the first's state; experts through 5 slots) against one token at a time (experts in place), and both
    against transformers."""
    variant, folder, reference = hybrid
    ids = prompt_ids(150, seed=1)
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0]
    prefilled = moe_local.load(folder, device="cpu", expert_slots=5, prefill_chunk=100).logits(ids)
    stepped = moe_local.load(folder, device="cpu", prefill_chunk=1).logits(ids)
    assert close(prefilled, want) and close(stepped, want) and close(prefilled, stepped)


def test_a_recurrent_state_is_not_cut_back_to_a_shared_prefix(hybrid):
    """A prompt that extends everything the cache holds evaluates only its new tokens; one that shares only
    a prefix of it is evaluated from the start (the state holds the rest too), and both give what a fresh
    sequence gives."""
    variant, folder, reference = hybrid
    engine = moe_local.load(folder, device="cpu")
    assert not engine.kv.can_truncate
    first = prompt_ids(20, seed=2)
    engine.prefill(first)
    extended = first + prompt_ids(6, seed=3)[1:]
    logits, evaluated = engine.prefill(extended)
    assert evaluated == len(extended) - len(first)
    fresh = engine.new_sequence()
    assert close(logits, engine.prefill(extended, fresh)[0], 1e-5)
    diverging = first[:12] + prompt_ids(9, seed=4)[1:]
    logits, evaluated = engine.prefill(diverging)
    assert evaluated == len(diverging)
    assert close(logits, engine.prefill(diverging, engine.new_sequence())[0], 1e-5)


def run(batcher: Batcher, request: Request) -> None:
    batcher.submit(request)
    for _ in range(100):  # the loop's steps, on this thread
        batcher.poll()
        if not batcher.waiting and not batcher.running:
            return
    raise AssertionError("the request did not finish in 100 steps")


def test_the_server_admits_a_prompt_to_the_sequence_whose_state_it_extends(hybrid):
    """Two idle sequences: one holds 16 ids of which the new prompt shares 13 (no use to a recurrent state),
    the other 11 ids the prompt starts with; the request takes the second and evaluates only its new tokens
    (with keys and values it would take the first and 13); a request that shares only a prefix with each is
    evaluated whole; both answer as a fresh run. (Each prompt is one prefill chunk: the end of each chunk keeps
    a snapshot of the state, which a shorter prompt would resume from: tests/test_hybrid_turns.py.)"""
    variant, folder, reference = hybrid
    engine, greedy = moe_local.load(folder, device="cpu", prefill_chunk=16), SamplingParams(temperature=0)
    batcher = Batcher(engine, parallel=2)
    first = prompt_ids(16, seed=8)
    second = first[:11]
    for prompt in (first, second):
        run(batcher, Request(prompt, 1, greedy, lambda out: None))
    held = [s.tokens for s in batcher.free]
    assert sorted(map(len, held)) == [11, 16]
    for prompt, cached in ((first[:13] + prompt_ids(7, seed=10)[1:], 11), (first[:10] + prompt_ids(5, seed=11)[1:], 0)):
        outs = []
        run(batcher, Request(prompt, 3, greedy, outs.append))
        assert (outs[-1].prompt_tokens, outs[-1].cached_tokens) == (len(prompt), cached)
        engine.tokens = []
        assert [o.text for o in outs] and "".join(o.text for o in outs) == engine.tokenizer.decode(list(engine.generate(prompt, 3, greedy)))


def test_only_linear_attention_makes_a_cache_that_cannot_be_cut_back():
    for name, truncates in [("qwen3-30b-a3b", True), ("deepseek-v3", True), ("qwen3.6-35b-a3b", False), ("qwen3-next-80b-a3b", False)]:
        cfg = preset_config(name, n_layers=4)
        assert KVPool(cfg, 8, torch.bfloat16, torch.device("meta"), 1).can_truncate is truncates, name


def test_the_pool_holds_the_linear_layers_state_in_fp32_and_plans_its_bytes():
    cfg = preset_config("qwen3.6-35b-a3b", n_layers=4)  # three linear layers, then a full one
    pool = KVPool(cfg, 64, torch.bfloat16, torch.device("meta"), 2)
    conv, state = pool.layers[0]
    assert conv.shape == (2, 2 * 16 * 128 + 32 * 128, 3) and conv.dtype == torch.bfloat16
    assert state.shape == (2, 32, 128, 128) and state.dtype == torch.float32
    keys, values = pool.layers[3]
    assert keys.shape == values.shape == (2, 2, 64, 256)
    per_sequence = sum(t.nbytes for layer in pool.layers for t in layer) // 2
    assert cfg.kv_cache_bytes(64, torch.bfloat16) == per_sequence


def multimodal(folder, stacked: bool):
    """A Qwen3.5-MoE checkpoint as transformers saves `Qwen3_5MoeForConditionalGeneration` (the text model
    under model.language_model, a vision tower under model.visual), with an MTP tensor as the published
    files have; `stacked`: its experts rewritten as the published files hold them, per layer gate_up
    [E, 2F, D] and down [E, D, F]. Returns the transformers model."""
    from transformers.models.qwen3_5_moe import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    _, options = VARIANTS["qwen3_5_moe"]
    text = {**BASE, **options, "tie_word_embeddings": False}
    torch.manual_seed(0)
    config = Qwen3_5MoeConfig(text_config=text, tie_word_embeddings=False, vision_config=dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
        spatial_merge_size=1, temporal_patch_size=2))
    model = Qwen3_5MoeForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") and not p.any():
                p.copy_(torch.randn(p.shape) * 0.2)
    model.save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    state["mtp.fc.weight"] = torch.zeros(4, 4)
    if stacked:
        for layer in range(config.text_config.num_hidden_layers):
            moe = f"model.language_model.layers.{layer}.mlp.experts."
            n = config.text_config.num_experts
            gate_up = [torch.cat([state.pop(f"{moe}{e}.gate_proj.weight"), state.pop(f"{moe}{e}.up_proj.weight")]) for e in range(n)]
            state[moe + "gate_up_proj"] = torch.stack(gate_up)
            state[moe + "down_proj"] = torch.stack([state.pop(f"{moe}{e}.down_proj.weight") for e in range(n)])
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return model


@pytest.mark.parametrize("stacked", [False, True])
def test_the_multimodal_checkpoint_loads_its_text_model(tmp_path, stacked):
    reference = multimodal(tmp_path, stacked)
    ids = prompt_ids(30, seed=5)
    with torch.no_grad():
        want = reference(input_ids=torch.tensor([ids])).logits[0]
    engine = moe_local.load(tmp_path, device="cpu", expert_slots=5, prefill_chunk=16)
    assert engine.cfg.model_type == "qwen3_5_moe" and engine.cfg.linear_layers == (0, 2)
    assert close(engine.logits(ids), want)


def test_a_misshaped_or_missing_linear_attention_tensor_is_one_line(tmp_path):
    build_family("qwen3_5_moe", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    z = "model.layers.0.linear_attn.in_proj_z.weight"
    save_file({**state, z: state[z][:-1]}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    result = moe_local_cli("info", str(tmp_path))
    assert result.returncode != 0 and result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "model.layers.0.linear_attn.in_proj_z.weight" in result.stderr and "[47, 64]" in result.stderr
    del state["model.layers.0.linear_attn.A_log"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lacks tensor model.layers.0.linear_attn.A_log"):
        moe_local.load(tmp_path, device="cpu")


def test_the_hybrid_presets_are_their_published_sizes():
    published = {"qwen3.6-35b-a3b": (35, 3), "qwen3.5-122b-a10b": (122, 10), "qwen3.5-397b-a17b": (397, 17),
                 "qwen3-next-80b-a3b": (80, 3)}
    for name, (total_b, active_b) in published.items():
        counts = preset_config(name).parameter_counts()
        assert counts["total"] / 1e9 == pytest.approx(total_b, rel=0.03), name
        assert counts["active_per_token"] / 1e9 == pytest.approx(active_b, rel=0.3), name
    cfg = preset_config("qwen3.6-35b-a3b")
    assert len(cfg.linear_layers) == 30 and cfg.linear_layers[:4] == (0, 1, 2, 4) and cfg.rope.dim == 64


def test_plan_counts_the_full_layers_keys_and_the_linear_layers_state():
    result = moe_local_cli("plan", "--preset", "qwen3.6-35b-a3b", "--gpu-memory", "8GiB", "--json", "--ctx-size", "4096", "--parallel", "2")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    chosen = report.get("chosen", report)
    keys_values = 10 * 2 * 2 * 256 * 4096 * 2  # 10 full layers, 2 KV heads of 256, bf16
    state = 30 * ((2 * 2048 + 4096) * 3 * 2 + 32 * 128 * 128 * 4)  # conv inputs in bf16, recurrent state in fp32
    assert chosen["kv_bytes"] == 2 * (keys_values + state)  # two sequences (serve --parallel 2)
    assert chosen["snapshot_bytes"] == 2 * 4 * state  # up to 4 copies of each one's state, in host RAM beside the GPU
    experts = chosen["total_experts"] * chosen["expert_bytes"]
    assert chosen["host_bytes_needed"] == experts + chosen["host_resident_bytes"] + chosen["snapshot_bytes"]
    table = moe_local_cli("plan", "--preset", "qwen3.6-35b-a3b", "--gpu-memory", "8GiB", "--ctx-size", "4096", "--parallel", "2",
                          env={**os.environ, "COLUMNS": "200"})
    rows = {" ".join(line.split()[:2]): " ".join(line.split()[2:]) for line in table.stdout.splitlines() if line.startswith("  ")}
    assert rows["state snapshots"] == "up to 4 per sequence x 2 sequences x 61.41 MiB = 491.25 MiB, in host RAM"
    assert "with 970.00 MiB of token embeddings and 491.25 MiB of state snapshots" in rows["host RAM"]
    assert "qwen3.6-35b-a3b" in PRESETS


@needs_kernel
@pytest.mark.parametrize("variant", HYBRIDS)
def test_decode_steps_take_the_deltanet_kernel_and_decode_as_without_it(tmp_path, monkeypatch, variant):
    """In bf16 on the CPU every linear layer's decode step is one `cpu_deltanet.Fused` call, for one sequence
    and for a batch of two (a pool's rows, updated in place); the gated full-attention layers stay on the
    torch operations (`cpu_attention.Fused` computes neither the gate nor the zero-centred norms). Greedy
    tokens as the torch operations give them, logits within bf16's rounding."""
    build_family(variant, tmp_path, linear_key_head_dim=16, linear_value_head_dim=16)
    engine = moe_local.load(tmp_path, device="cpu", dtype="bf16", ctx_size=64, sequences=2)
    linear = [block.attention for block in engine.model.layers if isinstance(block.attention, LinearAttention)]
    assert len(linear) == 2 and all(a.fused is not None for a in linear)
    assert all(block.fused is None for block in engine.model.layers)
    rows, call = [], cpu_deltanet.Fused.__call__
    monkeypatch.setattr(cpu_deltanet.Fused, "__call__", lambda self, x, *args: rows.append((x.shape[0], call(self, x, *args))) or rows[-1][1])
    other = engine.new_sequence()

    def run() -> torch.Tensor:
        token, steps = int(engine.prefill(prompt_ids(9, seed=6))[0].argmax()), []
        for _ in range(4):
            steps.append(engine.decode_one(token))
            token = int(steps[-1].argmax())
        tokens = [token, int(engine.prefill(prompt_ids(5, seed=7), other)[0].argmax())]
        for _ in range(3):
            steps.extend(engine.decode_batch([engine.sequence, other], tokens))
            tokens = [int(row.argmax()) for row in steps[-2:]]
        return torch.stack(steps)

    fused = run()
    assert [n for n, _ in rows] == [1] * 4 * 2 + [2] * 3 * 2 and all(y is not None for _, y in rows)
    for a in linear:
        a.fused = None
    engine.sequence.tokens, other.tokens = [], []
    unfused = run()
    assert torch.equal(fused.argmax(-1), unfused.argmax(-1))
    assert (fused - unfused).norm() <= 0.01 * unfused.norm()


@pytest.mark.parametrize(("raw", "message"), [
    ({"model_type": "qwen3_5_moe"}, "config.json lacks the field 'text_config'"),
    ({"model_type": "qwen3_5_moe", "text_config": {**PRESETS["qwen3.6-35b-a3b"], "hidden_act": "gelu"}}, "unsupported hidden_act 'gelu'"),
    ({**PRESETS["qwen3.6-35b-a3b"], "layer_types": ["linear_attention"] * 39 + ["sliding_attention"]}, "unsupported layer type 'sliding_attention'"),
    ({**PRESETS["qwen3.6-35b-a3b"], "linear_num_value_heads": 24}, "linear_num_value_heads=24 is not a multiple of linear_num_key_heads=16"),
])
def test_hybrid_configs_that_cannot_run_are_one_line(raw, message):
    with pytest.raises(ConfigError) as error:
        ModelConfig.from_hf(raw)
    assert message in str(error.value) and "\n" not in str(error.value)
