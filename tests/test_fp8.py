"""Checkpoints as the big MoEs publish them: FP8 blocks with fp32 or UE8M0 scales (DeepSeek-V3, Qwen3-FP8,
GLM-4.5-FP8, MiniMax-M2) and compressed-tensors int4 experts (Kimi-K2), each against transformers running the
same weights dequantized; the numerics of `moe_local/weights/`; one clear line for a broken scale."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moe_local
from conftest import build_mixtral, moe_local_cli
from families import build_family
from moe_local.checkpoint import Checkpoint
from moe_local.errors import CheckpointError, ConfigError
from moe_local.generate import GenerationStats, SamplingParams, generate
from moe_local.weights import compressed, fp8, scheme
from quantized import to_compressed_int4, to_fp8

GREEDY = SamplingParams(temperature=0)

# variant -> (FP8 blocks, UE8M0 scales, stored as F8_E8M0 bytes): blocks smaller than the matrices (hidden 64,
# expert FFN 32), ragged where they do not divide them (48 columns of 64, 24 rows of 32 or 64)
FP8_VARIANTS = {
    "mixtral": ((16, 48), False, False),
    "qwen3_moe": ((24, 32), False, False),
    "deepseek_v3": ((16, 32), True, True),
    "glm4_moe": ((24, 48), True, False),
}


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    return [1] + torch.randint(3, 320, (n - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


def build(variant: str, folder, tokenizer_dir) -> None:
    if variant == "mixtral":
        build_mixtral(folder, tokenizer_dir)
    else:
        build_family(variant, folder, tokenizer_dir)


@pytest.fixture(scope="module", params=list(FP8_VARIANTS))
def fp8_family(request, tmp_path_factory, tokenizer_dir):
    """(variant, FP8 folder, transformers on the same weights dequantized)."""
    variant = request.param
    block, ue8m0, e8m0_bytes = FP8_VARIANTS[variant]
    root = tmp_path_factory.mktemp(f"fp8-{variant}")
    folder, reference = root / "fp8", root / "dequantized"
    build(variant, folder, tokenizer_dir)
    to_fp8(folder, reference, block, ue8m0, e8m0_bytes, keep=("model.layers.0.self_attn.o_proj",))
    return variant, folder, AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()


def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def test_fp8_checkpoint_logits_match_transformers_on_the_dequantized_weights(fp8_family):
    variant, folder, reference = fp8_family
    ids = prompt_ids(40)
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0]
    got = moe_local.load(folder, device="cpu", dtype="fp32", expert_slots=5, prefill_chunk=16).logits(ids)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("slots", [1, "in place"])
def test_fp8_checkpoint_greedy_tokens_match_at_every_cache_budget(fp8_family, slots):
    variant, folder, reference = fp8_family
    ids = prompt_ids(10, seed=3)
    engine = moe_local.load(folder, device="cpu", dtype="fp32", **({} if slots == "in place" else {"expert_slots": slots}))
    assert list(generate(engine, ids, 16, GREEDY, set(), GenerationStats())) == reference_greedy(reference, ids, 16)


def test_which_matrices_are_fp8_follows_the_checkpoint(fp8_family):
    variant, folder, _ = fp8_family
    ckpt = Checkpoint(folder)
    assert "model.layers.0.self_attn.o_proj.weight" not in ckpt.fp8_scales  # kept in fp32, as modules_to_not_convert says
    assert "model.layers.1.self_attn.o_proj.weight" in ckpt.fp8_scales
    assert ckpt.values("model.layers.0.self_attn.o_proj.weight").dtype == torch.float32


# ---- the numerics ---------------------------------------------------------------------------------


def test_fp8_blocks_dequantize_as_transformers_does():
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    w = torch.randn(40, 72) * torch.logspace(-3, 2, 72)  # a wide range, ragged blocks of 16 x 32 both ways
    for ue8m0 in (False, True):
        q, scale = fp8.quantize(w, (16, 32), ue8m0)
        assert scale.shape == (3, 3)
        want = _dequantize_fp8_weight(q, scale, [16, 32], torch.float32)
        assert torch.equal(fp8.dequantize(q, scale, (16, 32)), want)
        assert (fp8.dequantize(q, scale, (16, 32)) - w).abs().max() <= w.abs().max() / 16  # e4m3: 3 mantissa bits
    _, scale = fp8.quantize(w, (16, 32), ue8m0=True)
    assert torch.equal(scale, torch.exp2(torch.log2(scale).round()))  # powers of two, exact as UE8M0 bytes
    assert torch.equal(scale.to(torch.float8_e8m0fnu).float(), scale)


def test_dequantizing_a_tall_matrix_in_pieces_gives_the_whole_result(monkeypatch):
    q, scale = fp8.quantize(torch.randn(100, 64), (24, 32))
    whole = fp8.dequantize(q, scale, (24, 32))
    monkeypatch.setattr(fp8, "DEQUANTIZE_ROWS", 48)
    assert torch.equal(fp8.dequantize(q, scale, (24, 32), torch.float32), whole)


def test_compressed_int4_packing_is_compressed_tensors_layout():
    q = torch.randint(-8, 8, (3, 64), dtype=torch.int8)
    packed = compressed.pack(q)
    assert packed.dtype == torch.int32 and packed.shape == (3, 8)
    word = sum((int(q[0, i]) + 8) << (4 * i) for i in range(8))  # column i of the first eight in bits 4i..4i+3
    assert packed[0, 0].item() & 0xFFFFFFFF == word
    assert torch.equal(compressed.unpack(packed, 64).to(torch.int8) - 8, q)


def test_quantization_configs_are_read_or_refused_in_one_line():
    assert scheme({"quant_method": "fp8", "weight_block_size": [128, 128]}) == fp8.Fp8Blocks((128, 128))
    assert scheme({"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}).ue8m0
    assert scheme({"quant_method": "mxfp4"}) is None and scheme(None) is None
    with pytest.raises(ConfigError, match="weight_block_size"):
        scheme({"quant_method": "fp8"})
    with pytest.raises(ConfigError, match="activation_scheme"):
        scheme({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"})
    with pytest.raises(ConfigError, match="awq"):
        scheme({"quant_method": "awq"})


# ---- broken checkpoints -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp8_mixtral(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("fp8-broken")
    build_mixtral(root / "fp8", tokenizer_dir)
    to_fp8(root / "fp8", root / "dequantized", (16, 32))
    return root / "fp8"


def damaged(folder, tmp_path, change):
    copy = tmp_path / "damaged"
    shutil.copytree(folder, copy)
    state = load_file(copy / "model.safetensors")
    change(state)
    save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


def test_a_missing_scale_is_one_clear_line(fp8_mixtral, tmp_path):
    name = "model.layers.1.self_attn.q_proj.weight_scale_inv"
    folder = damaged(fp8_mixtral, tmp_path, lambda state: state.pop(name))
    result = moe_local_cli("info", str(folder))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"error: tensor model.layers.1.self_attn.q_proj.weight is float8 but the checkpoint has no {name} beside it"]


def test_a_misshaped_scale_is_one_clear_line(fp8_mixtral, tmp_path):
    name = "model.layers.1.self_attn.q_proj.weight_scale_inv"
    folder = damaged(fp8_mixtral, tmp_path, lambda state: state.__setitem__(name, state[name][:, :1].contiguous()))
    with pytest.raises(CheckpointError, match=r"weight_scale_inv has shape \[4, 1\], but .* in blocks of \[16, 32\] .* needs \[4, 2\]"):
        Checkpoint(folder)


def test_an_fp8_tensor_without_an_fp8_config_is_refused(fp8_mixtral, tmp_path):
    folder = tmp_path / "noconfig"
    shutil.copytree(fp8_mixtral, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="is float8, but config.json has no fp8 quantization_config"):
        Checkpoint(folder)
