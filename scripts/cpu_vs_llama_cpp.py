"""`moe-local --device cpu` against llama.cpp's CPU backend on the same weights (Mixtral, Qwen3-MoE, Qwen3.5-MoE, Gemma 4 or MiniMax-M2 architecture).

    python scripts/cpu_vs_llama_cpp.py make /tmp/cpu-peer          # checkpoint + bf16/q8_0/q4_0 GGUFs
    python scripts/cpu_vs_llama_cpp.py make /tmp/qwen-peer --family qwen3   # the same in Qwen3-MoE's layout
    python scripts/cpu_vs_llama_cpp.py make /tmp/q35-peer --family qwen35 --pairs bf16,q4_0   # Qwen3.6-35B-A3B's widths, 4 layers
    python scripts/cpu_vs_llama_cpp.py make /tmp/g4-peer --family gemma4 --pairs bf16,q4_0    # Gemma-4-26B-A4B's widths, 4 layers
    python scripts/cpu_vs_llama_cpp.py make /tmp/mm-peer --family minimax --pairs bf16,q4_0   # MiniMax-M2's widths, 3 layers
    python scripts/cpu_vs_llama_cpp.py run /tmp/cpu-peer --rounds 2 --tokens 64
    python scripts/cpu_vs_llama_cpp.py run /tmp/cpu-peer --rounds 2 --tokens 64 --prompt-tokens 900   # a chat's context
    python scripts/cpu_vs_llama_cpp.py run /tmp/q35-peer --pairs bf16,q4_0 --tokens 16 --prompt-tokens 512 --second-turn 32

`make` writes a random Mixtral checkpoint (dim 1024, 8 experts of 2816, 8 layers: 576 M parameters, bf16, the
demo model's tokenizer), or with `--family qwen3` a Qwen3-MoE one (64 experts of 384, top 8, q/k norms: 630 M; a
byte-level BPE tokenizer trained as the tests train it), or with `--family qwen35` a text-only Qwen3.5-MoE one
(`Qwen3_5MoeForCausalLM`, the hybrid: Qwen3.6-35B-A3B's widths, 256 experts of 512 top 8 with a shared expert,
Gated DeltaNet with 16 key and 32 value heads, gated attention with 16 heads and 2 KV heads of 256, but 4
layers, three linear and one full, and the tests' 2048-token vocabulary: 3.3 G parameters, 6.6 GB in bf16,
drawn in bf16), or with `--family gemma4` a text-only Gemma 4 one (`Gemma4ForCausalLM`, Gemma-4-26B-A4B's widths: the
dense GeGLU MLP of 2112 beside experts of 704, top 8, sliding layers with 8 KV heads of 256 and a full one with 2 of
512 whose values are the keys' projection; 4 layers, three sliding and one full, 64 of its 128 experts, a 2048-token
Gemma-layout tokenizer: 1.6 G parameters, 3.3 GB), or with `--family minimax` a MiniMax-M2 one (its widths: 48 heads
and 8 KV heads of 128, q/k norms over the whole projections, 64 of 128 dimensions rotated, sigmoid router with
selection bias, experts of 1536, top 8; 3 layers and 32 of its 256 experts: 1.5 G parameters, 3.0 GB). Fewer experts
than published keep the files small; a token's work is the same (top 8 at the real width). `make` converts it with llama.cpp's converter (LLAMA_CPP_TOOLS, default
/work/shared/tools/llama-cpp). `run` prefills a prompt of `--prompt-tokens`, then decodes `--tokens` greedy
tokens, with each engine and format pair (bf16 vs bf16, q8_0 vs int8, q4_0 vs int4; llama.cpp's
quantized files hold the attention projections and the dense and shared MLPs quantized too, so those moe-local
runs use `--resident-dtype int8` and `int4`, which quantize the same), one after the other, `--rounds` times (interleaved, so that a noisy shared machine slows both
alike), each in its own process with the same thread count; it prints one markdown row per pair with both speeds
and their ratio, for decode and for the prompt's prefill (a whole prompt's evaluation from an empty cache,
llama.cpp's in batches of 512); with `--second-turn U`, a chat's second turn too (the answer and U new ids after
the prompt, which leaves the first prompt before its generation prompt: see GENERATION_PROMPT), its time to the
first token and to the last of `--tokens`, moe-local resuming from its snapshot, llama.cpp evaluating it all. `--pairs` picks some of the formats (make converts only those); the pairs
`q8_0-gguf`, `q4_0-gguf` and `q4_k_m-gguf` run moe-local on the GGUF file itself (its experts in the file's own
blocks, the attention as int8 or int4), the same file llama.cpp runs:

    python scripts/cpu_vs_llama_cpp.py make /tmp/cpu-peer --pairs q8_0-gguf,q4_k_m-gguf
    python scripts/cpu_vs_llama_cpp.py run /tmp/cpu-peer --pairs q8_0-gguf,q4_k_m-gguf --prompt-tokens 512 llama.cpp runs
in the Python of LLAMA_PYTHON (default /tmp/llama/bin/python, the venv its README describes)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TOOLS = Path(os.environ.get("LLAMA_CPP_TOOLS", "/work/shared/tools/llama-cpp"))
LLAMA_PYTHON = os.environ.get("LLAMA_PYTHON", "/tmp/llama/bin/python")
DEMO = Path(__file__).resolve().parent.parent / "moe_local" / "demo"
# llama.cpp's file; moe-local's --experts-dtype (or "gguf": moe-local runs the same GGUF file, its experts in the
# file's own blocks) and --resident-dtype. llama.cpp's quantized files quantize the attention projections and the
# dense and shared MLPs too, so the nearest moe-local runs do as well.
PAIRS = [("bf16", "bf16", "auto"), ("q8_0", "int8", "int8"), ("q4_0", "int4", "int4"),
         ("q8_0", "gguf", "int8"), ("q4_0", "gguf", "int4"), ("q4_k_m", "gguf", "int4")]  # fmt: skip
QUANTIZED = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}  # made from bf16.gguf by llama.cpp's quantizer


def pair_name(pair: tuple[str, str, str]) -> str:
    gguf, fmt, _ = pair
    return f"{gguf}-gguf" if fmt == "gguf" else gguf


def prompt_ids(n: int) -> list[int]:
    """n token ids: the beginning of text, then ids spread over the vocabulary."""
    return [1] + [100 * (i + 1) % 2000 + 3 for i in range(n - 1)]


# A chat's second turn (--second-turn U): the first prompt ends with a generation prompt of GENERATION_PROMPT ids
# that the next prompt renders otherwise (Qwen3.5's template drops the empty thinking block of earlier answers), so
# the second prompt leaves the first one there: first[:-4] + the answer (the n tokens decoded) + U new ids + the
# generation prompt again. moe-local resumes from the snapshot it kept at that mark (as `chat` marks it);
# llama.cpp (llama-cpp-python's `generate`) finds the shared prefix, cannot cut a recurrent state back to it
# (`kv_cache_seq_rm` refuses, which the run checks) and evaluates the whole second prompt again.
GENERATION_PROMPT = 4

MOE_LOCAL = """
import json, sys, time, torch, moe_local
folder, fmt, resident, n, threads, prompt, slots, second = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), json.loads(sys.argv[6]), json.loads(sys.argv[7]), json.loads(sys.argv[8])
torch.set_num_threads(threads)
start = time.perf_counter()
engine = moe_local.load(folder, device="cpu", dtype="bf16", experts_dtype="auto" if fmt == "gguf" else fmt, resident_dtype=resident,
                      ctx_size=len(prompt) + (2 * n + len(second) if second else n) + 1, expert_slots=slots)
load_s = time.perf_counter() - start
token = int(engine.prefill(prompt)[0].argmax())
for _ in range(4): engine.decode_one(token)  # warm-up, then start again from the prompt
engine.tokens = []  # forget the cache: prefill would take the prompt from it (a recurrent state restarts at position 0)
marks = (len(prompt) - 4,) if second else ()  # where the second prompt leaves this one, as `chat` marks it
start = time.perf_counter()
logits, evaluated = engine.prefill(prompt, marks=marks)
prefill = evaluated / (time.perf_counter() - start)
token = int(logits.argmax())
assert evaluated == len(prompt)
answer, start = [token], time.perf_counter()
for _ in range(n):
    token = int(engine.decode_one(token).argmax())
    answer.append(token)
out = {"tok_per_s": n / (time.perf_counter() - start), "prefill_tok_per_s": prefill, "bytes_copied": engine.experts.stats.total().bytes_copied,
       "load_s": load_s, "experts": engine.store.format.key}
if second:
    turn = prompt[:-4] + answer[:n] + second + prompt[-4:]
    start = time.perf_counter()
    logits, evaluated = engine.prefill(turn)
    token = int(logits.argmax())
    first_token = time.perf_counter() - start
    for _ in range(n - 1):
        token = int(engine.decode_one(token).argmax())
    out.update(turn_tokens=len(turn), turn_evaluated=evaluated, turn_first_s=first_token, turn_total_s=time.perf_counter() - start)
print(json.dumps(out))
"""

LLAMA = """
import json, sys, time, numpy as np
from llama_cpp import Llama
path, n, threads, prompt, second = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]), json.loads(sys.argv[5])
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_gpu_layers=0, n_ctx=len(prompt) + (2 * n + len(second) if second else n) + 8,
            verbose=False, logits_all=False)
def greedy():  # llm.scores holds nothing without logits_all: read the last position's logits from the context
    return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))))
llm.eval(prompt); token = greedy()
for _ in range(4): llm.eval([token])  # warm-up, then start again from the prompt
llm.reset(); start = time.perf_counter(); llm.eval(prompt); token = greedy()
prefill = len(prompt) / (time.perf_counter() - start)
answer, start = [token], time.perf_counter()
for _ in range(n):
    llm.eval([token]); token = greedy(); answer.append(token)
out = {"tok_per_s": n / (time.perf_counter() - start), "prefill_tok_per_s": prefill}
if second:
    turn = prompt[:-4] + answer[:n] + second + prompt[-4:]
    # what generate() tries first: cut the cache back to the shared prefix; a recurrent state refuses
    assert not llm._ctx.kv_cache_seq_rm(-1, len(prompt) - 4, -1), "llama.cpp cut its state back: not the re-evaluation measured here"
    start = time.perf_counter()
    tokens = llm.generate(turn, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)  # reset=True: re-evaluates the prompt
    next(tokens)
    first_token = time.perf_counter() - start
    for _ in range(n - 1):
        next(tokens)
    out.update(turn_tokens=len(turn), turn_evaluated=len(turn), turn_first_s=first_token, turn_total_s=time.perf_counter() - start)
print(json.dumps(out))
"""


# llama.cpp's converter names a BPE tokenizer's pre-tokenizer by a hash of how it splits a test text; the one the
# tests train for Qwen-style checkpoints splits as Qwen2's does, but its hash is not in the converter's list
CONVERT_QWEN = """
import runpy, sys
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def make(out: Path, family: str, pairs: list[tuple[str, str, str]]) -> None:
    """A random checkpoint of `family` (mixtral: 8 experts of 2816, top 2; qwen3: Qwen3-MoE's layout, 64 experts of
    384, top 8, q/k norms; qwen35: Qwen3.6-35B-A3B's widths in 4 layers; gemma4, minimax: their widths, fewer layers
    and experts), its tokenizer, and the GGUFs of `pairs`
    (bf16 always: q4_0 is quantized from it)."""
    import shutil

    import torch
    from transformers import (Gemma4ForCausalLM, Gemma4TextConfig, MiniMaxM2Config, MiniMaxM2ForCausalLM, MixtralConfig,
                              MixtralForCausalLM, Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM)

    from moe_local.config import PRESETS

    folder = out / "hf"
    folder.mkdir(parents=True, exist_ok=True)
    shared = dict(vocab_size=2048, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, max_position_embeddings=1024,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    if family == "mixtral":
        cfg = MixtralConfig(**shared, intermediate_size=2816, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2)
        MixtralForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
        for name in ("tokenizer.model", "tokenizer_config.json"):
            shutil.copy(DEMO / name, folder / name)
    elif family == "qwen35":  # drawn in bf16: float32 would need twice the 6.6 GB
        preset = {k: v for k, v in PRESETS["qwen3.6-35b-a3b"].items() if k not in ("model_type", "dtype")}
        cfg = Qwen3_5MoeTextConfig(**{**preset, "vocab_size": 2048, "num_hidden_layers": 4, "max_position_embeddings": 1024,
                                      "layer_types": ["linear_attention"] * 3 + ["full_attention"], "eos_token_id": 2})
        torch.set_default_dtype(torch.bfloat16)
        Qwen3_5MoeForCausalLM(cfg).save_pretrained(folder)
        torch.set_default_dtype(torch.float32)
    elif family == "gemma4":  # drawn in bf16 as qwen35
        preset = {k: v for k, v in PRESETS["gemma-4-26b-a4b"].items() if k not in ("model_type", "dtype")}
        cfg = Gemma4TextConfig(**{**preset, "vocab_size": 2048, "num_hidden_layers": 4, "max_position_embeddings": 1024,
                                  "num_experts": 64, "layer_types": ["sliding_attention"] * 3 + ["full_attention"]})
        torch.set_default_dtype(torch.bfloat16)
        Gemma4ForCausalLM(cfg).save_pretrained(folder)
        torch.set_default_dtype(torch.float32)
    elif family == "minimax":
        preset = {k: v for k, v in PRESETS["minimax-m2"].items() if k not in ("model_type", "dtype")}
        cfg = MiniMaxM2Config(**{**preset, "vocab_size": 2048, "num_hidden_layers": 3, "max_position_embeddings": 1024,
                                 "num_local_experts": 32, "bos_token_id": 1, "eos_token_id": 2})
        torch.set_default_dtype(torch.bfloat16)
        model = MiniMaxM2ForCausalLM(cfg)
        with torch.no_grad():  # transformers starts the selection bias at 0: give it something to select by
            for name, buffer in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buffer.copy_(torch.randn(buffer.shape) * 0.1)
        model.save_pretrained(folder)
        del model
        torch.set_default_dtype(torch.float32)
    else:
        cfg = Qwen3MoeConfig(**shared, intermediate_size=2816, moe_intermediate_size=384, num_key_value_heads=4, head_dim=64,
                             num_experts=64, num_experts_per_tok=8, norm_topk_prob=True, mlp_only_layers=[])
        Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    sys.path.insert(0, str(DEMO.parent.parent / "tests"))  # the tokenizers the tests train
    if family == "gemma4":
        from builders import train_gemma_tokenizer

        train_gemma_tokenizer(folder, vocab_size=2048)
    elif family != "mixtral":
        from builders import FAMILY_TOKENIZERS, train_bytelevel_tokenizer

        train_bytelevel_tokenizer(folder, vocab_size=2048, **FAMILY_TOKENIZERS["qwen3_moe"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TOOLS), str(TOOLS / "gguf-py")])}
    # Mixtral's tokenizer.model and Gemma's byte-fallback BPE need no pre-tokenizer name
    convert = [str(TOOLS / "convert_hf_to_gguf.py")] if family in ("mixtral", "gemma4") else ["-c", CONVERT_QWEN, str(TOOLS / "convert_hf_to_gguf.py")]
    no_mtp = ["--no-mtp"] if family == "qwen35" else []  # the converter wants the MTP head's tensors unless told
    for outtype in ["bf16"] + ["q8_0"] * any(gguf == "q8_0" for gguf, _, _ in pairs):
        subprocess.run([sys.executable, *convert, str(folder), "--outtype", outtype, "--outfile", str(out / f"{outtype}.gguf"), *no_mtp],
                       check=True, env=env)
    quantize = ("import llama_cpp, sys; p = llama_cpp.llama_model_quantize_default_params(); "
                "p.ftype = getattr(llama_cpp, sys.argv[3]); "
                "assert llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p) == 0")
    for name, ftype in QUANTIZED.items():
        if any(gguf == name for gguf, _, _ in pairs):
            subprocess.run([LLAMA_PYTHON, "-c", quantize, str(out / "bf16.gguf"), str(out / f"{name}.gguf"), ftype], check=True)


def one(command: list[str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{command[0]} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(out: Path, rounds: int, tokens: int, threads: int, slots: int | None, prompt_tokens: int, pairs: list[tuple[str, str, str]],
        second_turn: int) -> None:  # fmt: skip
    prompt = json.dumps(prompt_ids(prompt_tokens))
    second = json.dumps([7 * (i + 3) % 2000 + 3 for i in range(second_turn)] if second_turn else None)  # the next message's ids
    speeds: dict[tuple[str, str], list[float]] = {}
    prefills: dict[tuple[str, str], list[float]] = {}
    turns: dict[tuple[str, str], list[dict]] = {}
    for r in range(rounds):
        for gguf, fmt, resident in pairs:
            model = out / f"{gguf}.gguf" if fmt == "gguf" else out / "hf"
            ours = one([sys.executable, "-c", MOE_LOCAL, str(model), fmt, resident, str(tokens), str(threads), prompt, json.dumps(slots), second])
            theirs = one([LLAMA_PYTHON, "-c", LLAMA, str(out / f"{gguf}.gguf"), str(tokens), str(threads), prompt, second])
            key = pair_name((gguf, fmt, resident))
            speeds.setdefault(("moe-local", key), []).append(ours["tok_per_s"])
            speeds.setdefault(("llama.cpp", key), []).append(theirs["tok_per_s"])
            prefills.setdefault(("moe-local", key), []).append(ours["prefill_tok_per_s"])
            prefills.setdefault(("llama.cpp", key), []).append(theirs["prefill_tok_per_s"])
            turns.setdefault(("moe-local", key), []).append(ours)
            turns.setdefault(("llama.cpp", key), []).append(theirs)
            turn = "".join(f", second turn: first token {run['turn_first_s']:.2f} s ({run['turn_evaluated']} of {run['turn_tokens']} evaluated), "
                           f"all {tokens} {run['turn_total_s']:.2f} s" for run in (ours, theirs) if second_turn)  # fmt: skip
            print(f"round {r + 1}: {fmt} ({ours['experts']}, loaded in {ours['load_s']:.1f} s) {ours['tok_per_s']:.1f} tok/s, "
                  f"prefill {ours['prefill_tok_per_s']:.1f} tok/s "
                  f"({ours['bytes_copied'] / 1e9:.2f} GB copied), llama.cpp {gguf} {theirs['tok_per_s']:.1f} tok/s, "
                  f"prefill {theirs['prefill_tok_per_s']:.1f} tok/s{turn}",
                  file=sys.stderr, flush=True)
    if second_turn:
        print(f"| llama.cpp | first token / all {tokens}, s | moe-local | first token / all {tokens}, s | speed-up per round, first token / all "
              f"({time.strftime('%Y-%m-%d')}, {threads} threads, second turn: the answer and {second_turn} new ids after a {prompt_tokens}-id prompt) |")
        print("| --- | --- | --- | --- | --- |")
        for gguf, fmt, resident in pairs:
            key = pair_name((gguf, fmt, resident))
            ours, theirs = turns[("moe-local", key)], turns[("llama.cpp", key)]
            name = fmt if resident == "auto" else f"{fmt}, resident {resident}"
            cells = [" / ".join(f"{t['turn_first_s']:.2f}, {t['turn_total_s']:.2f}" for t in runs) for runs in (theirs, ours)]
            ratios = ", ".join(f"{b['turn_first_s'] / a['turn_first_s']:.1f}x / {b['turn_total_s'] / a['turn_total_s']:.1f}x" for a, b in zip(ours, theirs))
            print(f"| {gguf} ({theirs[0]['turn_evaluated']} evaluated) | {cells[0]} | {name} ({ours[0]['turn_evaluated']} evaluated) | {cells[1]} | {ratios} |")
        print()
    for what, table in ((f"{tokens} tokens decoded after {prompt_tokens}", speeds), (f"prefill of {prompt_tokens}", prefills)):
        print(f"| llama.cpp | tok/s | moe-local | tok/s | ratio per round ({time.strftime('%Y-%m-%d')}, {threads} threads, {what}) |")
        print("| --- | --- | --- | --- | --- |")
        for gguf, fmt, resident in pairs:
            key = pair_name((gguf, fmt, resident))
            ours, theirs = table[("moe-local", key)], table[("llama.cpp", key)]
            ratios = ", ".join(f"{a / b:.2f}" for a, b in zip(ours, theirs))
            what = f"{gguf}.gguf itself" if fmt == "gguf" else fmt
            name = what if resident == "auto" else f"{what}, resident {resident}"
            print(f"| {gguf} | {' / '.join(f'{s:.1f}' for s in theirs)} | {name} | {' / '.join(f'{s:.1f}' for s in ours)} | {ratios} |")
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("make", "run"))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--prompt-tokens", type=int, default=8, help="the context decoding starts from (the model holds 1,024)")
    parser.add_argument("--second-turn", type=int, default=0, metavar="U",
                        help="also time a chat's second turn: the answer and U new ids after the prompt (see GENERATION_PROMPT)")
    parser.add_argument("--expert-slots", type=int, help="moe-local through a pool of this many slots (a memcpy per miss), not in place")
    parser.add_argument("--family", choices=("mixtral", "qwen3", "qwen35", "gemma4", "minimax"), default="mixtral", help="make: the model's architecture")
    names = [pair_name(pair) for pair in PAIRS]
    parser.add_argument("--pairs", default="bf16,q8_0,q4_0",
                        help="what to compare (make converts only what these need), from " + ", ".join(names) + " (NAME-gguf: moe-local runs the GGUF file itself)")
    args = parser.parse_args()
    chosen = args.pairs.split(",")
    if unknown := [name for name in chosen if name not in names]:
        parser.error(f"--pairs: unknown pair {unknown[0]!r} (choose from {', '.join(names)})")
    pairs = [pair for pair in PAIRS if pair_name(pair) in chosen]
    if args.command == "make":
        make(args.folder, args.family, pairs)
    else:
        room = 1024 - 8 - (2 * args.tokens + args.second_turn if args.second_turn else args.tokens)
        if not 1 <= args.prompt_tokens <= room:
            parser.error(f"--prompt-tokens must be from 1 to {room}: the test model holds 1,024 positions")
        if args.second_turn and (args.prompt_tokens <= GENERATION_PROMPT or args.tokens < 1):
            parser.error(f"--second-turn needs a prompt of more than {GENERATION_PROMPT} ids and --tokens of 1 or more")
        run(args.folder, args.rounds, args.tokens, args.threads, args.expert_slots, args.prompt_tokens, pairs, args.second_turn)


if __name__ == "__main__":
    main()
