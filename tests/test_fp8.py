"""Checkpoints as the big MoEs publish them: FP8 blocks with fp32, UE8M0 or bf16 scales (Mixtral's layout, Qwen3-FP8,
DeepSeek-V3, GLM-4.5-FP8, MiniMax-M2, the hybrids Qwen3-Next-FP8 and Qwen3.5/3.6-FP8) and compressed-tensors int4
experts (Kimi-K2), each against transformers running the same weights dequantized; the numerics of
`moe_local/weights/`; one clear line for a broken scale."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moe_local
from conftest import build_mixtral
from families import build_family
from moe_local import native
from moe_local.checkpoint import Checkpoint
from moe_local.cli import describe, main
from moe_local.config import FAMILIES, ModelConfig
from moe_local.experts.formats import choose_format, make_format
from moe_local.experts.store import ExpertStore
from moe_local.errors import CheckpointError, ConfigError
from moe_local.generate import GenerationStats, SamplingParams, generate
from moe_local.weights import compressed, fp8
from moe_local.weights.schemes import scheme
from quantized import add_fp8_extras, to_compressed_int4, to_fp8, to_qwen35_multimodal

GREEDY = SamplingParams(temperature=0)


@dataclass(frozen=True)
class Published:
    """A family's FP8 repos shrunk: blocks smaller than the matrices (hidden 64, expert FFN 32), ragged where they
    do not divide them; the scales' format (`to_fp8`'s `scales`); the modules kept unconverted beyond the
    embeddings and lm_head (modules_to_not_convert, under the text model's names); FP8 tensors the model does not
    read beside its own (multi-token prediction); `multimodal`: Qwen3.5's published wrapper around the text model."""

    block: tuple[int, int]
    scales: str
    keep: tuple[str, ...] = ("model.layers.0.self_attn.o_proj",)
    extras: tuple[tuple[str, tuple[int, int]], ...] = ()
    multimodal: bool = False


HYBRID_MTP = (("mtp.fc.weight", (64, 128)), ("mtp.layers.0.mlp.experts.0.gate_proj.weight", (32, 64)))
FP8_VARIANTS = {
    "mixtral": Published((16, 48), "fp32"),
    "qwen3_moe": Published((24, 32), "fp32"),
    "deepseek_v3": Published((16, 32), "e8m0"),
    "glm4_moe": Published((24, 48), "ue8m0"),
    "minimax_m2": Published((32, 16), "fp32"),
    # Qwen3-Next-FP8: the fused in_proj_ba unconverted, per-expert FP8 experts, an FP8 MTP head beside the model
    "qwen3_next": Published((24, 16), "fp32", tuple(f"model.layers.{i}.linear_attn.in_proj_ba" for i in (1, 2)), HYBRID_MTP),
    # Qwen3.5/3.6-FP8: in_proj_a and _b unconverted, bf16 scales, per-expert FP8 experts (where the bf16 repos
    # stack them), under model.language_model. beside a vision tower and an MTP head
    "qwen3_5_moe": Published((16, 24), "bf16", tuple(f"model.layers.{i}.linear_attn.in_proj_{p}" for i in (0, 2) for p in "ab"),
                             HYBRID_MTP, multimodal=True),
}
SCALE_BYTES = {"fp32": 4, "ue8m0": 4, "e8m0": 1, "bf16": 2}


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
    published = FP8_VARIANTS[variant]
    root = tmp_path_factory.mktemp(f"fp8-{variant}")
    folder, reference = root / "fp8", root / "dequantized"
    build(variant, folder, tokenizer_dir)
    to_fp8(folder, reference, published.block, published.scales, published.keep)
    add_fp8_extras(folder, dict(published.extras), published.block)
    if published.multimodal:
        to_qwen35_multimodal(folder)
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


@pytest.mark.gpu
def test_fp8_experts_on_cuda_match_transformers(fp8_family):
    """CUDA's fp8 experts: prefill's dequantized matmuls, and each decode token's experts read from their slots by
    the Triton kernel (`fp8_triton`, which no GPU has run yet), against the reference as on the CPU."""
    variant, folder, reference = fp8_family
    ids = prompt_ids(10, seed=3)
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0]
    engine = moe_local.load(folder, device="cuda", dtype="fp32", experts_dtype="fp8", expert_slots=3)
    assert engine.store.format.name == "fp8"
    assert (engine.logits(ids).cpu() - want).abs().max() <= 1e-3 * want.abs().max()
    assert list(generate(engine, ids, 16, GREEDY, set(), GenerationStats())) == reference_greedy(reference, ids, 16)


def test_which_matrices_are_fp8_follows_the_checkpoint(fp8_family):
    variant, folder, _ = fp8_family
    ckpt = Checkpoint(folder)
    layers = FAMILIES[ckpt.config.model_type].prefix + "layers."
    for module in FP8_VARIANTS[variant].keep:  # kept in fp32, as modules_to_not_convert says
        name = module.replace("model.layers.", layers) + ".weight"
        assert name not in ckpt.fp8_scales and ckpt.values(name).dtype == torch.float32
    # every other matrix the decoder layers publish in FP8 is read as FP8 (the MTP head's and vision tower's are not read)
    published = {name.removesuffix("_scale_inv") for name in ckpt.tensors if name.endswith("_scale_inv")}
    assert set(ckpt.fp8_scales) == {name for name in published if name.startswith(layers)}
    assert published - set(ckpt.fp8_scales) == {name for name, _ in FP8_VARIANTS[variant].extras} | (
        {"model.visual.blocks.0.mlp.linear_fc1.weight"} if FP8_VARIANTS[variant].multimodal else set())


def test_fp8_attention_under_resident_int8_is_quantized_from_the_fp8_values(fp8_mixtral):
    """--resident-dtype int8: the attention projections in int8, quantized from the FP8 values the load dequantized
    (no bf16 copy of the checkpoint needed), within half a step of them."""
    from moe_local.int8 import Int8Linear

    ids = prompt_ids(10)
    dense = moe_local.load(fp8_mixtral, device="cpu", dtype="fp32")
    engine = moe_local.load(fp8_mixtral, device="cpu", dtype="fp32", resident_dtype="int8")
    wqkv = engine.model.layers[1].attention.wqkv
    assert isinstance(wqkv, Int8Linear)
    ckpt = Checkpoint(fp8_mixtral)
    q = ckpt.values("model.layers.1.self_attn.q_proj.weight")  # the FP8 values, dequantized by the reference
    assert torch.equal(dense.model.layers[1].attention.wqkv.weight[: q.shape[0]], q)
    seen = wqkv.weight[: q.shape[0]].float() * wqkv.scale[: q.shape[0], None].float()
    assert torch.all((seen - q).abs() <= wqkv.scale[: q.shape[0], None].float() / 2 + 1e-6)
    want, got = dense.logits(ids), engine.logits(ids)
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


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


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The command line's exit status, stdout and stderr for `args`, run in this process (the same `main` as
    the installed command's; a subprocess would spend seconds importing torch)."""
    monkeypatch.setattr(sys, "argv", ["moe-local", *args])
    with pytest.raises(SystemExit) as exit:
        main()
    out, err = capsys.readouterr()
    return exit.value.code or 0, out, err


def test_a_missing_scale_is_one_clear_line(fp8_family, tmp_path, monkeypatch, capsys):
    """In every family's published layout: an expert's scale gone (Qwen3.5's under model.language_model.)."""
    _, folder, _ = fp8_family
    matrix = next(name for name in Checkpoint(folder).fp8_scales if ".experts.3." in name)
    copy = damaged(folder, tmp_path, lambda state: state.pop(matrix + "_scale_inv"))
    line = f"tensor {matrix} is float8 but the checkpoint has no {matrix}_scale_inv beside it"
    with pytest.raises(CheckpointError, match=re.escape(line)):
        Checkpoint(copy)
    code, _, err = cli(monkeypatch, capsys, "info", str(copy))
    assert code == 1 and err.strip().splitlines() == [f"error: {line}"]


def test_a_misshaped_scale_is_one_clear_line(fp8_family, tmp_path):
    """A projection's scales a column short: the linear attention's where the family has it."""
    _, folder, _ = fp8_family
    names = list(Checkpoint(folder).fp8_scales)
    matrix = next((n for n in names if "linear_attn." in n), next(n for n in names if "self_attn." in n))
    block = list(Checkpoint(folder).config.quantization.block)
    scale = load_file(folder / "model.safetensors")[matrix + "_scale_inv"]
    copy = damaged(folder, tmp_path, lambda state: state.__setitem__(matrix + "_scale_inv", scale[:, :-1].contiguous()))
    short, want = [scale.shape[0], scale.shape[1] - 1], list(scale.shape)
    with pytest.raises(CheckpointError, match=re.escape(f"{matrix}_scale_inv has shape {short}, but {matrix} ") + rf"\[\d+, \d+\] in blocks of "
                       + re.escape(f"{block} (weight_block_size) needs {want}")):  # fmt: skip
        Checkpoint(copy)


def test_an_fp8_tensor_without_an_fp8_config_is_refused(fp8_mixtral, tmp_path):
    folder = tmp_path / "noconfig"
    shutil.copytree(fp8_mixtral, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="is float8, but config.json has no fp8 quantization_config"):
        Checkpoint(folder)


# ---- the fp8 expert format and its CPU kernel -----------------------------------------------------


def fp8_config(block: tuple[int, int] | None, **overrides) -> ModelConfig:
    raw = dict(model_type="mixtral", vocab_size=32, hidden_size=96, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)  # fmt: skip
    if block:
        raw["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(block)}
    return ModelConfig.from_hf({**raw, **overrides})


def swiglu64(x, gate, up, down):
    """The expert in float64 on the dequantized weights: the exact result the kernel approximates."""
    g, u = x @ gate.T, x @ up.T
    return (g * torch.sigmoid(g) * u) @ down.T


@pytest.mark.skipif(native.unavailable() is not None, reason=f"moe-local's CPU kernels: {native.unavailable()}")
@pytest.mark.parametrize("flags", ["", "-mno-avx512f"])  # AVX512F's 16 lanes, and AVX2's 8
# ragged row blocks (24 of 64 and of 96) and several column blocks in each row: of 32 columns, narrower than the 64
# weights AVX512's path takes at a time; of 64, where it takes a row's 64 at once, apart from zeros and subnormals
@pytest.mark.parametrize("block", [(24, 32), (24, 64)])
def test_the_fp8_kernel_runs_a_layers_experts_within_bf16_rounding_of_the_exact_result(rebuilt, monkeypatch, flags, block):
    monkeypatch.setenv("MOE_LOCAL_KERNEL_FLAGS", flags)
    cfg = fp8_config(block)
    fmt = make_format("fp8", cfg, torch.bfloat16, "cpu")
    store = ExpertStore(cfg, fmt, pin=False)
    gen = torch.Generator().manual_seed(0)
    # odd experts: a wide range of magnitudes, so that scales differ between blocks and e4m3's zeros and subnormals
    # are many; even ones: a trained matrix's range, where few rows of 64 weights have one
    store.fill_from(lambda layer, expert, w: torch.randn(cfg.expert_shapes[w], generator=gen)
                    * (torch.logspace(-4, 0, cfg.expert_shapes[w][1]) if expert % 2 else 1), torch.device("cpu"))  # fmt: skip
    experts = [fmt.unpack(store.buffer((0, e))) for e in (2, 0, 3, 1)]
    exponent_0 = torch.cat([(w["gate_up"].view(torch.uint8)[:, :64] & 0x78 == 0).any(1) for w in experts])
    assert exponent_0.any() and not exponent_0.all()  # rows of 64 with and without zeros or subnormals
    counts = [1, 3, 0, 16]
    xs = torch.randn(sum(counts), cfg.dim, generator=gen).bfloat16()
    got = fmt.forward_grouped(xs, counts, experts)
    assert got is not None and got.dtype == torch.bfloat16
    f = cfg.ffn_dim
    for rows, w in zip(xs.split(counts), experts):
        if not len(rows):
            continue
        gate_up, down = fmt.dequantize(w, "gate_up", torch.float64), fmt.dequantize(w, "down", torch.float64)
        exact = swiglu64(rows.double(), gate_up[:f], gate_up[f:], down)
        mine = got[: len(rows)].double()
        got = got[len(rows) :]
        # the products, silu and h are rounded to bf16 where torch's bf16 path rounds them: a few 2^-8 of the output
        torch.testing.assert_close(mine, exact, rtol=2**-6, atol=2**-6 * exact.abs().max().item())
        torch_path = fmt.forward(rows, w).double()  # the weights dequantized to bf16, then bf16 matmuls
        assert (mine - exact).norm() <= (torch_path - exact).norm() * 1.5
    # a decode token's experts through the layer's table, mixed as the runtime mixes them: the same bits
    table = fmt.decode_table([fmt.unpack(store.buffer((0, e))) for e in range(cfg.n_experts)])
    x, weights, indices = xs[:1], torch.tensor([[0.7, 0.3]]), torch.tensor([[3, 1]])
    ys = fmt.forward_grouped(torch.cat([x, x]), [1, 1], [experts[2], experts[3]])
    assert torch.equal(table(x, weights, indices), (ys[0:1].float() * 0.7).bfloat16().float().add((ys[1:2].float() * 0.3).bfloat16().float()).bfloat16())


def test_fp8_experts_from_a_bf16_checkpoint_are_quantized_in_128_blocks_and_from_fp8_ones_copied(fp8_family):
    variant, folder, _ = fp8_family
    ckpt = Checkpoint(folder)
    fmt = make_format("fp8", ckpt.config, torch.bfloat16, "cpu")
    assert fmt.native and fmt.key == "fp8-b{}x{}".format(*FP8_VARIANTS[variant].block)
    buffer = torch.empty(fmt.expert_bytes, dtype=torch.uint8)
    assert fmt.pack_native(lambda w: ckpt.expert(0, 1, w), buffer)
    views = fmt.unpack(buffer)
    f = ckpt.config.ffn_dim
    assert torch.equal(fmt.dequantize(views, "gate_up", torch.float32)[:f], ckpt.expert(0, 1, "w1"))  # the published values
    assert torch.equal(fmt.dequantize(views, "down", torch.float32), ckpt.expert(0, 1, "w2"))
    assert make_format("fp8", fp8_config(None), torch.bfloat16, "cpu").key == "fp8-b128x128"


def test_auto_keeps_fp8_experts_where_they_fit_and_else_takes_int4(fp8_family):
    variant, folder, _ = fp8_family
    cfg = Checkpoint(folder).config
    fmt, why = choose_format("auto", cfg, torch.bfloat16, "cpu", None, available=1 << 40)
    assert fmt.name == "fp8" and "fp8" in why
    one = cfg.n_moe_layers * cfg.n_experts * fmt.expert_bytes
    fmt, why = choose_format("auto", cfg, torch.bfloat16, "cpu", None, available=int(one / 0.85) - 1)
    assert fmt.name == "int4" and "fp8 would need" in why


# ---- compressed-tensors int4 (Kimi-K2's routed experts) ----------------------------------------------


@pytest.fixture(scope="module")
def kimi(tmp_path_factory, tokenizer_dir):
    """(folder, transformers on the dequantized weights): a tiny DeepSeek-V3 whose routed experts are
    compressed-tensors int4 in groups of 32, as Kimi-K2-Thinking ships them."""
    root = tmp_path_factory.mktemp("kimi")
    build_family("deepseek_v3", root / "int4", tokenizer_dir, hidden_size=128, moe_intermediate_size=64)
    to_compressed_int4(root / "int4", root / "dequantized")
    return root / "int4", AutoModelForCausalLM.from_pretrained(root / "dequantized", dtype=torch.float32).eval()


def test_compressed_int4_experts_become_the_int4_format_exactly(kimi):
    folder, _ = kimi
    engine = moe_local.load(folder, device="cpu")
    fmt = engine.store.format
    assert fmt.key == "int4-g32-cpu" and "compressed-tensors" in engine.notes[0]
    ckpt = Checkpoint(folder)
    for layer, expert in ((0, 1), (1, 7)):
        views = fmt.unpack(engine.store.buffer((layer, expert)))
        published = ckpt.expert(layer, expert, "int4")  # w -> (nibbles q + 8, bf16 scales)
        for name, ws in (("gate_up", ("w1", "w3")), ("down", ("w2",))):
            nibbles, scale = torch.cat([published[w][0] for w in ws]), torch.cat([published[w][1] for w in ws])
            # the int4 format's w = (nibble - 8) * scale + zero: the published nibbles and scales, and zero 0,
            # is the published q * scale, value for value
            assert torch.equal(views[f"{name}.scale_zero"][..., 0], scale.T)
            assert torch.equal(views[f"{name}.scale_zero"][..., 1], torch.zeros_like(scale.T))
            assert torch.equal(views[name], torch._convert_weight_to_int4pack_for_cpu(nibbles.int(), 1))
            values = compressed.dequantize(compressed.pack(nibbles.to(torch.int8) - 8), scale, tuple(nibbles.shape), 32)
            assert torch.equal(values, torch.cat([ckpt.expert(layer, expert, w) for w in ws]))


def test_compressed_int4_checkpoint_matches_transformers_on_the_dequantized_weights(kimi):
    folder, reference = kimi
    ids = prompt_ids(24)
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0]
    dequantized = moe_local.load(folder, device="cpu", dtype="fp32", experts_dtype="fp32", expert_slots=4).logits(ids)
    assert (dequantized - want).abs().max() <= 1e-4 * want.abs().max()
    # as int4: the same weights; torch's int4 kernel takes the activations in bf16
    got = moe_local.load(folder, device="cpu", dtype="fp32", expert_slots=4).logits(ids)
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="batchmean")
    assert kl <= 1e-3
    assert torch.equal(got, moe_local.load(folder, device="cpu", dtype="fp32").logits(ids))  # in place as in slots


def test_a_compressed_int4_matrix_without_its_scale_is_one_clear_line(kimi, tmp_path):
    folder, _ = kimi
    name = "model.layers.1.mlp.experts.3.up_proj.weight_scale"
    copy = damaged(folder, tmp_path, lambda state: state.pop(name))
    with pytest.raises(CheckpointError, match=f"has model.layers.1.mlp.experts.3.up_proj.weight_packed but lacks {name} beside it"):
        Checkpoint(copy)


def test_info_shows_each_kind_of_tensor_as_stored_and_as_loaded(fp8_family):
    variant, folder, _ = fp8_family
    published = FP8_VARIANTS[variant]
    bn, bk = published.block
    ckpt = Checkpoint(folder)
    info = describe(ckpt)
    fp8_name = f"fp8 e4m3, {bn} x {bk} blocks, {'ue8m0' if published.scales in ('ue8m0', 'e8m0') else published.scales} scales"
    formats = info["tensor_formats"]
    assert formats["experts"]["stored"] == info["experts_format"] == fp8_name
    assert formats["experts"]["at_load"].startswith(f"experts in fp8-b{bn}x{bk} (auto")
    assert formats["attention"]["stored"] == f"{fp8_name} + float32"  # the kept projections
    assert formats["attention"]["at_load"].startswith("float32, dequantized at load")
    cfg = ckpt.config
    scales = 2 * -(-cfg.ffn_dim // bn) * -(-cfg.dim // bk) + -(-cfg.dim // bn) * -(-cfg.ffn_dim // bk)
    assert info["expert_bytes"] == cfg.expert_numel + scales * SCALE_BYTES[published.scales]  # e4m3 and the scales as stored


def test_info_says_compressed_int4_experts_stay_int4(kimi, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "info", str(kimi[0]))
    assert code == 0, err
    assert "experts stored as         int4 (compressed-tensors, symmetric, groups of 32) -> experts in int4-g32" in out
    assert "attention stored as       float32 -> as stored" in out


def test_plan_takes_an_fp8_checkpoint_in_its_own_format(fp8_mixtral, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "plan", str(fp8_mixtral), "--device", "cpu", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["experts_format"] == "fp8-b16x32" and plan["why"].startswith("experts in fp8-b16x32 (auto")
    assert plan["formats"]["fp8"]["expert_bytes"] < plan["formats"]["bf16"]["expert_bytes"]


TRITON_CHECK = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"  # Triton's interpreter: the kernel's arithmetic on the CPU
import torch
sys.path.insert(0, "tests")
from test_fp8 import fp8_config
from moe_local.experts import fp8_triton
from moe_local.experts.formats import make_format
for block in ((24, 32), (16, 48)):  # ragged row blocks; a block narrower than the kernel's lanes
    cfg = fp8_config(block)
    fmt = make_format("fp8", cfg, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(0)
    pool = torch.empty(3, fmt.expert_bytes, dtype=torch.uint8)
    for slot in range(3):
        w = {w: torch.randn(cfg.expert_shapes[w], generator=gen) * torch.logspace(-3, 0, cfg.expert_shapes[w][1]) for w in ("w1", "w2", "w3")}
        fmt.pack(w["w1"], w["w2"], w["w3"], pool[slot])
    part = {p.name: p for p in fmt.parts}
    slots, f, d = [2, 0], cfg.ffn_dim, cfg.dim
    x = torch.randn(2, d, generator=gen)
    for name, n, rows, xs in (("gate_up", 2 * f, f, x), ("down", d, d, x[:1, :f])):
        got = fp8_triton.linear_grouped(xs, pool.view(-1)[part[name].offset:], pool.view(-1)[part[name + ".scale"].offset:],
                                        torch.tensor(slots), pool.stride(0), n, rows, fmt.block)
        for i, slot in enumerate(slots):
            want = xs[min(i, len(xs) - 1)].double() @ fmt.dequantize(fmt.unpack(pool[slot]), name, torch.float64).T
            torch.testing.assert_close(got[i].double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
print("ok")
"""


def test_the_triton_kernel_reads_fp8_experts_from_their_slots_as_the_reference(tmp_path):
    """CUDA's decode kernel for a token's FP8 experts, in Triton's interpreter (no GPU here): each expert's rows
    against its own slot's matrix, fp32 sums within rounding of the float64 product on the dequantized weights."""
    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, "-c", TRITON_CHECK], capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).parent.parent)  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
