"""GGUF models (`moe_local/weights/`): tiny checkpoints converted by llama.cpp's own converter and quantizer
(from ../shared/tools/llama-cpp, as CI has it beside the repository), run by moe-local and by llama.cpp
(llama-cpp-python's `Llama`) on the same file."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from builders import FAMILY_TOKENIZERS, train_bytelevel_tokenizer, train_gemma_tokenizer
from conftest import build_mixtral
from families import VARIANTS, build_family, to_mxfp4
from test_fp8 import cli  # the command line in this process (a subprocess spends seconds importing torch)
from moe_local import native

TOOLS = Path(__file__).resolve().parents[1].parent / "shared" / "tools" / "llama-cpp"
pytestmark = pytest.mark.skipif(not TOOLS.is_dir(), reason=f"llama.cpp's converter is not at {TOOLS} (CI has ../shared beside the repository)")

# widths of 256, so that llama.cpp's quantizer keeps Q4_0 and the K-quants (blocks of 256) where it is asked to
WIDE = dict(hidden_size=256, intermediate_size=256)
TEXT = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\nprint(fib(10))"
MIXED = "Hello world! Grüße, 你好世界 — привет мир 123456 x</s>  double  spaces\n\ttab ελληνικά 🙂 <|im_end|>"


def convert(jobs: list[tuple[Path, Path, str | None]]) -> None:
    """llama.cpp's convert_hf_to_gguf.py, f32, over (folder, out, pre) jobs in one process (it imports torch and
    transformers once). `pre` names the BPE pre-tokenizer, which the converter otherwise recognises only by a hash
    of published tokenizers (ours are trained in builders.py with Qwen2's split). --no-mtp where the converter
    asks for a multi-token-prediction head's tensors otherwise (Qwen3.5, Qwen3-Next)."""
    calls = "".join(
        f"base.TextModel.get_vocab_base_pre = lambda self, tokenizer: {pre!r}; "
        f"sys.argv = ['convert', {str(folder)!r}, '--outtype', 'f32', *{NO_MTP if folder.name in NO_MTP_FAMILIES else []!r}, '--outfile', {str(out)!r}]; "
        "convert_hf_to_gguf.main(); "
        for folder, out, pre in jobs
    )
    code = f"import sys; from conversion import base; import convert_hf_to_gguf; {calls}"
    env = {"PYTHONPATH": f"{TOOLS / 'gguf-py'}:{TOOLS}", "PATH": "/usr/bin:/bin", "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run([sys.executable, "-c", code], cwd=TOOLS, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]


NO_MTP, NO_MTP_FAMILIES = ["--no-mtp"], {"qwen35", "qwen3next"}


def quantize(src: Path, ftype: str) -> Path:
    """llama.cpp's quantizer (llama_model_quantize), as `llama-quantize src dst ftype` does."""
    import llama_cpp

    dst = src.with_name(src.name.replace("-F32", f"-{ftype}"))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


def rewrite(src: Path, dst: Path, dequantized: bool = False, split_max_tensors: int = 0, replaced: dict | None = None, **metadata) -> Path:
    """`src` written again by gguf-py's writer: every tensor as f32 of its dequantized values (`dequantized`: what
    exact arithmetic on the file's weights is, for llama.cpp), in several files (`split_max_tensors`), with some
    tensors' blocks replaced (`replaced`: name -> (uint8 blocks, their type)), or with metadata values replaced
    (key=value, "." written as "__")."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = metadata.get("general__architecture", reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(dst, arch, split_max_tensors=split_max_tensors)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment") or key.startswith("split."):
            continue
        value = metadata.get(key.replace(".", "__"), field.contents())
        if dequantized and key == "general.file_type":
            value = 0
        writer.add_key_value(key, value, field.types[0], field.types[-1] if len(field.types) > 1 else None)
    for t in reader.tensors:
        if t.name in (replaced or {}):
            writer.add_tensor(t.name, replaced[t.name][0], raw_dtype=replaced[t.name][1])
        elif dequantized:
            writer.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def quantize_experts(src: Path, layer_types: list[tuple[str, str]]) -> Path:
    """`src` (an f32 file) with layer i's experts quantized by ggml's own quantizer (`ggml_quantize_chunk`) to
    layer_types[i] (gate's and up's type, down's), the rest left f32: llama.cpp's quantizer will not make IQ2_XXS
    without an importance matrix, nor an IQ3_XXS file without IQ2_S attention (which wants one too); the matrix
    here is all ones (every column as important)."""
    import gguf
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    replaced = {}
    for t in gguf.GGUFReader(src).tensors:
        layer, _, name = t.name.removeprefix("blk.").partition(".")
        if name.startswith("ffn_") and name.endswith("_exps.weight"):
            qtype = gguf.GGMLQuantizationType[layer_types[int(layer)][name == "ffn_down_exps.weight"]]
            values = np.ascontiguousarray(t.data, dtype=np.float32)  # [E, rows, K]
            k = values.shape[-1]
            out = np.empty((*values.shape[:-1], gguf.quant_shape_to_byte_shape((k,), qtype)[0]), dtype=np.uint8)
            ones = np.ones(k, dtype=np.float32)
            lib.ggml_quantize_chunk(int(qtype), values.ctypes.data, out.ctypes.data, 0, values.size // k, k, ones.ctypes.data)
            replaced[t.name] = (out, qtype)
    kinds = "+".join(dict.fromkeys(t for pair in layer_types for t in pair))
    return rewrite(src, src.with_name(src.name.replace("-F32", f"-{kinds}")), replaced=replaced)


# llama.cpp's architecture -> (our variant in families.py, its options: what llama.cpp's build or converter needs)
ARCHITECTURES = {
    "qwen2": ("qwen2_moe", dict(hidden_size=256, moe_intermediate_size=256, decoder_sparse_step=1, shared_expert_intermediate_size=256)),
    "olmoe": ("olmoe", dict(hidden_size=256, intermediate_size=256, num_key_value_heads=4)),  # llama.cpp's olmoe has no GQA
    # llama.cpp's build wants the DeltaNet's value heads as wide as its key heads, and mrope sections within the
    # rotated quarter of a head (Qwen3.5 always writes them)
    "qwen35": ("qwen3_5_moe", dict(linear_value_head_dim=8, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                                   partial_rotary_factor=0.25, mrope_section=[1, 1, 0]))),
    "qwen3next": ("qwen3_next", dict(linear_value_head_dim=8, mlp_only_layers=[])),  # the converter maps no dense layer of Qwen3-Next
    "gpt-oss": ("gpt_oss", {}),
    "glm4moe": ("glm4_moe", {}),
    "minimax-m2": ("minimax_m2", dict(scoring_func="sigmoid")),  # as the published config.json says it (the converter reads it)
    # DeepSeek-V3 as llama.cpp's deepseek2 with a sigmoid router; and DeepSeek-V2 (softmax), with a query latent (this
    # llama.cpp requires q_lora_rank) and plain greedy routing: llama.cpp scores V2's groups by their best two, as
    # V3's, where DeepSeek's group_limited_greedy (and moe-local, as transformers) takes their best one
    "deepseek3": ("deepseek_v3", dict(scoring_func="sigmoid")),
    "deepseek2": ("deepseek_v2", dict(q_lora_rank=24, topk_method="greedy", n_group=1, topk_group=1)),
    "gemma4": ("gemma4", {}),  # with Gemma 4's tokenizer layout (builders.train_gemma_tokenizer)
}
PRE = {"olmoe": "olmo"}  # the pre-tokenizer each is converted with; Qwen2's split otherwise


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """Tiny Mixtral (llama.cpp's `llama` with experts; the SentencePiece vocabulary) and Qwen3-MoE (`qwen3moe`;
    byte-level BPE with merges and a chat template) in f32, Q8_0 and Q4_0 (Mixtral also in Q4_K_M), with the
    source folders; and every other architecture in f32 (`ARCHITECTURES`), all converted in one process."""
    root = tmp_path_factory.mktemp("gguf")
    build_mixtral(root / "mixtral", tokenizer_dir, **WIDE)
    build_family("qwen3_moe", root / "qwen3", None, hidden_size=256, moe_intermediate_size=256, head_dim=64, vocab_size=512, mlp_only_layers=[])
    train_bytelevel_tokenizer(root / "qwen3", **FAMILY_TOKENIZERS["qwen3_moe"])
    for name, (variant, options) in ARCHITECTURES.items():
        build_family(variant, root / name, None, **{"vocab_size": 512, **options})
        model_type = VARIANTS[variant][0]
        if model_type == "gemma4_text":
            train_gemma_tokenizer(root / name)
        else:
            train_bytelevel_tokenizer(root / name, **FAMILY_TOKENIZERS.get(model_type, FAMILY_TOKENIZERS["qwen3_moe"]))
    build_family("gpt_oss", root / "gpt-oss-mxfp4", None, vocab_size=512)
    train_bytelevel_tokenizer(root / "gpt-oss-mxfp4", **FAMILY_TOKENIZERS["gpt_oss"])
    to_mxfp4(root / "gpt-oss-mxfp4")  # the experts as OpenAI publishes them: the converter keeps them MXFP4
    names = ["mixtral", "qwen3", *ARCHITECTURES, "gpt-oss-mxfp4"]
    files = {name: root / name for name in names} | {f"{name}-F32": root / f"{name}-F32.gguf" for name in names}
    convert([(root / name, files[f"{name}-F32"], None if name == "mixtral" else PRE.get(name, "qwen2")) for name in names])
    for name in ("mixtral", "qwen3"):
        for ftype in ("Q8_0", "Q4_0", *(("Q4_K_M",) if name == "mixtral" else ())):
            files[f"{name}-{ftype}"] = quantize(files[f"{name}-F32"], ftype)
    return files


def llama_cpp_logits(path: Path, ids: list[int]) -> torch.Tensor:
    """llama.cpp's logits for every position of `ids`, with an f32 KV cache (its default f16 cache rounds keys
    and values, which moves logits by ~1e-2)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False, type_k=0, type_v=0)
    llm.eval(ids)
    logits = torch.tensor(np.array(llm.scores[: len(ids)]))
    llm.close()
    return logits


def llama_cpp_greedy(path: Path, ids: list[int], n: int) -> list[int]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, verbose=False, type_k=0, type_v=0)
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(token)
        if len(out) == n:
            break
    llm.close()
    return out


def moe_local_run(path: Path, ids: list[int], n: int) -> tuple[torch.Tensor, list[int], set[int]]:
    """moe-local's logits for every position of `ids`, its greedy continuation (up to n tokens, ending early at an
    end-of-generation id) and those ids."""
    from moe_local.engine import load
    from moe_local.params import SamplingParams

    engine = load(path, device="cpu", dtype="fp32")
    logits = engine.logits(ids)
    greedy = list(engine.generate(ids, n, SamplingParams(temperature=0.0)))
    return logits, greedy, engine.stop_ids


def ids_of(path: Path) -> list[int]:
    from moe_local.tokenizer import load_tokenizer

    return load_tokenizer(path).encode(TEXT)


def test_each_file_holds_the_types_it_is_named_for(ggufs):
    """llama.cpp falls back to other types where a tensor does not suit the one asked for: the experts here do."""
    from moe_local.weights.gguf_model import GgufModel

    for name in ("mixtral", "qwen3"):
        for ftype, expected in (("F32", {"F32"}), ("Q8_0", {"Q8_0"}), ("Q4_0", {"Q4_0"}), *((("Q4_K_M", {"Q4_K", "Q6_K"}),) if name == "mixtral" else ())):
            types = GgufModel([ggufs[f"{name}-{ftype}"]]).expert_types()
            held = {t.name for ts in types.values() for t in ts}
            assert held <= expected and (ftype != "Q4_K_M" or "Q4_K" in held), (name, ftype, held)


@pytest.mark.parametrize("name", ["mixtral", "qwen3", *(name for name in ARCHITECTURES if name != "gemma4")])
def test_f32_gguf_gives_llama_cpps_logits_and_tokens(ggufs, name):
    """On f32 weights llama.cpp and moe-local differ only by the order of their fp32 sums (measured 3e-7 to 1e-5 of
    the logit scale)."""
    path = ggufs[f"{name}-F32"]
    ids = ids_of(path)
    ours, greedy, stop = moe_local_run(path, ids, 8)
    reference = llama_cpp_logits(path, ids)
    assert (ours - reference).abs().max() <= 1e-4 * reference.abs().max()
    theirs = llama_cpp_greedy(path, ids, 8)
    assert greedy == theirs[: len(greedy)] and (len(greedy) == 8 or theirs[len(greedy)] in stop)


def test_gemma4_gguf_gives_transformers_logits_on_its_weights_and_llama_cpps_tokens(ggufs):
    """On Gemma 4's f32 file moe-local gives transformers' logits on the source checkpoint (3e-7 to 7e-7 of the
    logit scale: the file's weights are the checkpoint's), where llama.cpp is 7e-4 away from both, from its
    first position on (consistent with ggml's GELU, computed through an fp16 table); the greedy tokens are
    llama.cpp's."""
    from transformers import AutoModelForCausalLM

    path = ggufs["gemma4-F32"]
    ids = ids_of(path)
    ours, greedy, stop = moe_local_run(path, ids, 8)
    with torch.no_grad():
        exact = AutoModelForCausalLM.from_pretrained(ggufs["gemma4"], dtype=torch.float32).eval()(torch.tensor([ids])).logits[0]
    assert (ours - exact).abs().max() <= 1e-5 * exact.abs().max()
    assert (ours - llama_cpp_logits(path, ids)).abs().max() <= 2e-3 * exact.abs().max()
    theirs = llama_cpp_greedy(path, ids, 8)
    assert greedy == theirs[: len(greedy)] and (len(greedy) == 8 or theirs[len(greedy)] in stop)


IQ_XXS = [("IQ2_XXS", "IQ2_XXS"), ("IQ3_XXS", "IQ2_XXS"), ("IQ3_XXS", "IQ3_XXS")]  # per layer: gate's and up's type, down's


@pytest.mark.parametrize("file", ["mixtral-Q4_0", "qwen3-Q8_0", "mixtral-Q4_K_M", "mixtral-Q2_K", "mixtral-IQ4_XS", "mixtral-IQ2_XXS+IQ3_XXS"])
def test_quantized_gguf_is_as_close_to_llama_cpp_as_llama_cpp_is_to_exact_arithmetic(ggufs, file, tmp_path, monkeypatch, rebuilt):
    """The reference for exact arithmetic on the file's weights: llama.cpp on an f32 file of them (gguf-py's
    dequantization). llama.cpp itself rounds every activation to Q8_0 before a Q8_0 or Q4_0 dot product; that
    (Q8_K for the K-quants of the Q4_K_M file, whose last layer's down is Q6_K where the others' is Q4_K)
    is how far it is from exact arithmetic, measured here on the same tokens: on these random models 1-5% of the
    logit scale at the first position, up to 60% later where such a rounding flips a near-tied routing choice
    (greedy tokens then differ too, so they are compared only on f32 files). moe-local's experts do as llama.cpp
    does (`experts_ggml`), its attention and lm_head compute exactly on the dequantized weights: it lands between
    the two, within 1.5x llama.cpp's own distance from exact arithmetic of llama.cpp (measured 0.99-1.02x; 0.50x on
    the IQ2_XXS/IQ3_XXS file, 4e-5x at its first position).
    Without the kernels, moe-local is exact arithmetic on the file's values. (Q2_K and IQ4_XS files are made here,
    for this test alone: llama.cpp's Q2_K keeps the experts' down in Q3_K; the IQ2_XXS and IQ3_XXS experts by ggml's
    quantizer, mixed over the layers as `IQ_XXS` says.)"""
    from moe_local.experts.formats import Ggml, gguf_format
    from moe_local.weights.gguf_model import GgufModel

    name, ftype = file.split("-", 1)
    path = ggufs[file] if file in ggufs else quantize_experts(ggufs[f"{name}-F32"], IQ_XXS) if "XXS" in ftype else quantize(ggufs[f"{name}-F32"], ftype)
    model = GgufModel([path])
    assert isinstance(gguf_format(model.layer_expert_types(), model.config, torch.bfloat16, "cpu")[0], Ggml)  # the file's own blocks
    ids = ids_of(path)
    exact = llama_cpp_logits(rewrite(path, tmp_path / "dequantized.gguf", dequantized=True), ids)
    llama = llama_cpp_logits(path, ids)
    ours, _, _ = moe_local_run(path, ids, 1)
    assert (ours - llama).abs().max() <= 1.5 * (llama - exact).abs().max()
    monkeypatch.setenv("MOE_LOCAL_KERNELS", "0")
    native.library.cache_clear()
    widened, _, _ = moe_local_run(path, ids, 1)
    assert (widened - exact).abs().max() <= 1e-4 * exact.abs().max()


def test_experts_in_ram_are_the_files_bytes_each_layer_in_its_own_types(ggufs):
    """Q4_K_M keeps some layers' ffn_down in Q6_K (here the last of three): each layer's experts keep the file's
    bytes in their own types, in a part sized for the widest."""
    from moe_local.engine import load
    from moe_local.weights.gguf_model import GgufModel

    path = ggufs["mixtral-Q4_K_M"]
    engine = load(path, device="cpu")
    fmt = engine.store.format
    assert fmt.name == "gguf-q4_k-q4_k+q6_k"
    unused = f"({100 * fmt.padding_bytes / engine.store.total_bytes:.1f}%) of the store unused"
    assert fmt.padding_bytes > 0 and any("the file's own blocks, 2 combinations over the layers" in note and unused in note for note in engine.notes)
    model = GgufModel([path])
    assert [t["w2"].name for t in model.layer_expert_types()] == ["Q4_K", "Q4_K", "Q6_K"]
    for layer, expert in ((0, 0), (2, 7)):
        views = fmt.unpack(engine.store.buffer((layer, expert)))
        gate, up, down = (model.expert_blocks(layer, expert, w) for w in ("w1", "w3", "w2"))
        assert views["types"].tolist() == [model.expert_tensor(layer, "w1").qtype, model.expert_tensor(layer, "w2").qtype]
        assert torch.equal(views["gate_up"][: gate.numel() + up.numel()], torch.cat([gate, up]).view(-1))
        assert torch.equal(views["down"][: down.numel()], down.view(-1))
    file_bytes = sum(model.expert_tensor(layer, w).nbytes for layer in range(3) for w in ("w1", "w2", "w3"))
    assert engine.store.total_bytes - fmt.padding_bytes - file_bytes < 3 * 8 * 3 * 256  # the rest: each part's alignment


def test_experts_without_a_kernel_are_converted_once_and_cached(ggufs):
    from moe_local.engine import load
    from moe_local.weights.gguf_model import GgufModel

    path = quantize(ggufs["mixtral-F32"], "Q5_1")
    assert {t.name for ts in GgufModel([path]).expert_types().values() for t in ts} == {"Q5_1"}
    first = load(path, device="cpu")
    assert first.store.format.key == "int8-bf16"
    assert any("no kernel for Q5_1" in note for note in first.notes)
    assert any("cached them" in note for note in first.notes)
    again = load(path, device="cpu")
    assert any("read the int8-bf16 experts from the cache" in note for note in again.notes)


def test_gemma4_tokenizer_matches_its_checkpoints_and_llama_cpps_on_mixed_scripts(ggufs):
    """Gemma 4's `gemma4` vocabulary tokenizes as the checkpoint's tokenizer.json does; llama.cpp agrees on the
    mixed-script text, and splits a newline off a piece that holds one ("):\n" in the code) where the checkpoint's
    BPE does not."""
    import llama_cpp
    from tokenizers import Tokenizer

    from moe_local.tokenizer import load_tokenizer

    path = ggufs["gemma4-F32"]
    ours, source = load_tokenizer(path), Tokenizer.from_file(str(ggufs["gemma4"] / "tokenizer.json"))
    for text in (MIXED, TEXT):
        assert ours.encode(text) == source.encode(text).ids
    llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False, vocab_only=True)
    assert ours.encode(MIXED) == llm.tokenize(MIXED.encode(), add_bos=True, special=True)
    assert ours.decode(ours.encode(TEXT)) == TEXT


@pytest.mark.parametrize("name", ["mixtral", "qwen3"])
def test_tokenizer_matches_llama_cpps_on_mixed_scripts(ggufs, name):
    import llama_cpp

    from moe_local.tokenizer import load_tokenizer

    path = ggufs[f"{name}-Q8_0"]
    llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False, vocab_only=True)
    ours = load_tokenizer(path)
    assert ours.encode(MIXED) == llm.tokenize(MIXED.encode(), add_bos=ours.add_bos, special=True)
    assert ours.encode(TEXT, bos=False) == llm.tokenize(TEXT.encode(), add_bos=False, special=True)
    assert ours.decode(ours.encode(TEXT)) == TEXT


def test_a_gguf_tokenizer_loads_without_torch(ggufs):
    """The server's HTTP process loads the tokenizer and must not load torch, for a GGUF model too."""
    code = (
        "import sys; from moe_local.tokenizer import load_tokenizer; "
        f"load_tokenizer({str(ggufs['qwen3-Q8_0'])!r}).encode('hi'); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["False"]


def test_chat_template_renders_as_transformers_renders_it(ggufs):
    from transformers import AutoTokenizer

    from moe_local.tokenizer import load_tokenizer

    ours = load_tokenizer(ggufs["qwen3-Q8_0"])
    theirs = AutoTokenizer.from_pretrained(ggufs["qwen3"])
    assert ours.chat_template == theirs.chat_template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Grüße, 你好"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "And?"}]  # fmt: skip
    for think in (True, False):
        text = ours.render_chat_text(messages, enable_thinking=think)
        assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=think)
    assert ours.eos_token == "<|im_end|>"


def test_split_files_read_as_one_model_from_any_part_or_the_folder(ggufs, tmp_path, monkeypatch, capsys):
    from moe_local.engine import load

    whole = ggufs["qwen3-Q8_0"]
    rewrite(whole, tmp_path / "split.gguf", split_max_tensors=12)
    parts = sorted(tmp_path.glob("split-*-of-*.gguf"))
    assert len(parts) == 4
    ids = ids_of(whole)
    expected = load(whole, device="cpu", dtype="fp32").logits(ids)
    for given in (parts[0], parts[2], tmp_path):
        assert torch.equal(load(given, device="cpu", dtype="fp32").logits(ids), expected)
    parts[3].unlink()
    code, _, err = cli(monkeypatch, capsys, "info", str(parts[0]))
    assert code == 1 and "lacks its part(s) split-00004-of-00004.gguf" in err


def corrupt(src: Path, dst: Path, edit) -> Path:
    data = bytearray(src.read_bytes())
    edit(data)
    dst.write_bytes(bytes(data))
    return dst


def unknown_type(data: bytearray) -> None:
    """Set output_norm.weight's ggml type (after its name, dimension count and dimensions) to 99."""
    at = data.index(b"output_norm.weight") + len(b"output_norm.weight")
    n_dims = int.from_bytes(data[at : at + 4], "little")
    at += 4 + 8 * n_dims
    data[at : at + 4] = (99).to_bytes(4, "little")


@pytest.mark.parametrize("problem, edit, message", [
    ("truncated", lambda d: d.__delitem__(slice(len(d) // 2, None)), "is truncated"),
    ("magic", lambda d: d.__setitem__(slice(0, 4), b"GGUG"), "is not a GGUF file (it starts with b'GGUG'"),
    ("architecture", lambda d: d.__setitem__(slice(None), d.replace(b"qwen3moe", b"qwen9moe")), "unsupported GGUF architecture 'qwen9moe'"),
    ("tensor type", unknown_type, "holds a tensor of an unknown ggml type"),
])  # fmt: skip
def test_a_broken_file_is_one_clear_line(ggufs, tmp_path, monkeypatch, capsys, problem, edit, message):
    from moe_local.checkpoint import open_checkpoint
    from moe_local.errors import MoeLocalError

    path = corrupt(ggufs["qwen3-Q4_0"], tmp_path / "broken.gguf", edit)
    with pytest.raises(MoeLocalError) as raised:
        open_checkpoint(path)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    if problem == "magic":  # and the command line prints it as that one line (any MoeLocalError, `clean_errors`)
        code, _, err = cli(monkeypatch, capsys, "info", str(path))
        assert code == 1 and err.count("\n") == 1 and message in err, err


def test_info_and_plan_read_a_gguf(ggufs, monkeypatch, capsys):
    """Q4_K_M mixes types by layer (here the last layer's down is Q6_K): `info` gives an expert's bytes over every
    layer as the file holds them, `plan` the store's (each expert's part sized for the widest layer)."""
    import json

    from moe_local.engine import load
    from moe_local.weights.gguf_model import GgufModel

    path = ggufs["mixtral-Q4_K_M"]
    info = json.loads(cli(monkeypatch, capsys, "info", str(path), "--json")[1])
    assert info["architecture"] == "llama" and info["model_type"] == "mixtral"
    assert {"Q4_K", "F32"} <= set(info["tensor_bytes_by_type"]) and sum(info["tensor_bytes_by_type"].values()) < path.stat().st_size
    model = GgufModel([path])
    file_bytes = sum(model.expert_tensor(layer, w).nbytes for layer in range(3) for w in ("w1", "w2", "w3"))
    assert info["expert_bytes"] * info["experts_per_layer"] * info["moe_layers"] == file_bytes and info["experts_format"] == "Q4_K/Q6_K"
    plan = json.loads(cli(monkeypatch, capsys, "plan", str(path), "--device", "cpu", "--json")[1])
    assert plan["expert_bytes"] == load(path, device="cpu").store.format.expert_bytes
    plan = json.loads(cli(monkeypatch, capsys, "plan", str(ggufs["qwen3-Q8_0"]), "--device", "cpu", "--json")[1])
    assert plan["experts_format"] == "gguf-q8_0" and plan["in_place"]


# ---- a GGUF model has every feature a safetensors checkpoint has ------------------------------------------


def test_sequences_decoded_together_on_a_gguf_match_each_alone(ggufs):
    """Rows of one KV pool decoded together, joining and leaving, give what each gives alone (test_batch's
    protocol: fp32 logits within 1e-5, the same greedy tokens), on an f32 file. On a Q8_0 file the experts' rows
    are computed alone either way (`experts_ggml`), but the resident matmuls' fp32 rounding over a batch (3e-7 of
    the logit scale) can move an activation across a Q8_0 rounding step, which llama.cpp's arithmetic amplifies to
    ~1% of the logit scale: not within that protocol's tolerance, as for llama.cpp itself."""
    from moe_local.engine import load
    from test_batch import join_and_leave, pool_rows

    join_and_leave(load(ggufs["qwen3-F32"], device="cpu", dtype="fp32"), pool_rows)


def test_the_cpu_channel_runs_a_ggufs_experts_as_they_run_in_place(ggufs):
    """Misses of a few slots run on the CPU channel from the store's buffer (the file's blocks): the same logits,
    bit for bit, as every expert in place."""
    from moe_local.engine import load

    path = ggufs["qwen3-Q4_0"]
    ids = ids_of(path)
    in_place = load(path, device="cpu", dtype="fp32").logits(ids)
    channel = load(path, device="cpu", dtype="fp32", expert_slots=4, cpu_experts="always")
    assert channel.experts.cpu_experts == "always"
    assert torch.equal(channel.logits(ids), in_place) and channel.experts.stats.as_dict()["experts_on_cpu"] > 0


def test_bench_measures_a_ggufs_own_weights(ggufs):
    """`bench --model FILE`: the file loaded as `run` loads it (its Q8_0 blocks), every policy giving the same
    tokens, and a batch run; the peer, which draws a preset's random weights, is skipped."""
    from moe_local.bench import BenchConfig, bench
    from moe_local.errors import ConfigError

    path = str(ggufs["qwen3-Q8_0"])
    said = []
    result = bench(BenchConfig(model=path, device="cpu", expert_slots=6, prompt_tokens=8, new_tokens=3, batch=2), say=said.append)
    assert result["experts_format"]["key"] == "gguf-q8_0" and "the file's own blocks" in result["experts_format"]["why"]
    assert result["config"]["n_layers"] == 3 and len(result["runs"]) == 3 and result["same_tokens_in_every_run"]
    assert result["batch"]["sequences"] == 2 and result["peer"] is None and any("peer: skipped" in s for s in said)
    with pytest.raises(ConfigError, match="--layers applies to a preset's random weights"):
        BenchConfig(model=path, layers=2)


def test_chat_answers_with_the_ggufs_template(ggufs):
    """A chat's prompt is the GGUF's template rendered (Qwen3's ChatML), and its answer is the model's greedy one."""
    from moe_local.chat import ChatSession
    from moe_local.engine import load
    from moe_local.params import SamplingParams

    engine = load(ggufs["qwen3-Q8_0"], device="cpu", dtype="fp32")
    chat = ChatSession(engine, SamplingParams(temperature=0.0), max_new_tokens=4)
    chat.ask("Grüße")
    answer = list(chat.reply())
    text, ids = chat.render([{"role": "user", "content": "Grüße"}])
    assert text.startswith("<|im_start|>user\nGrüße<|im_end|>\n<|im_start|>assistant\n") and chat.prompt == ids, text
    expected = list(load(ggufs["qwen3-Q8_0"], device="cpu", dtype="fp32").generate(chat.prompt, 4, SamplingParams(temperature=0.0)))
    assert answer == expected
