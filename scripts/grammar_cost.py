"""What constrained decoding costs a token: the time `grammar.Constraint` takes (llguidance's mask for the step, as a
[V] bool, and moving it on by the token sampled) against the decode time of the same model without a grammar.

    python scripts/grammar_cost.py                    # the demo model (2,048 tokens)
    python scripts/grammar_cost.py make /tmp/qwen3v   # a Qwen3-shaped checkpoint with Qwen3's vocabulary size
    python scripts/grammar_cost.py /tmp/qwen3v        # ... measured

The Qwen3-shaped checkpoint: Qwen3-MoE's layout (64 experts of 384, top 8, q/k norms, 8 layers, hidden 1024, random
weights) with 151,936 ids, and a byte-level tokenizer of as many tokens (the tests' trained BPE, then words and
pieces of Python source as the rest of its vocabulary), since a mask's cost grows with the vocabulary."""

from __future__ import annotations

import glob
import json
import re
import statistics
import sys
import sysconfig
import time
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "moe_local" / "demo"
QWEN3_VOCAB = 151_936
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 6}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


def make(folder: Path) -> None:
    import torch
    from tokenizers import Tokenizer
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    sys.path.insert(0, str(DEMO.parent.parent / "tests"))
    from builders import FAMILY_TOKENIZERS, train_bytelevel_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=QWEN3_VOCAB, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, intermediate_size=2816, moe_intermediate_size=384,
                         num_key_value_heads=4, head_dim=64, num_experts=64, num_experts_per_tok=8, norm_topk_prob=True, mlp_only_layers=[])
    Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    train_bytelevel_tokenizer(folder, vocab_size=4096, **FAMILY_TOKENIZERS["qwen3_moe"])
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    byte_char = {b: c for c, b in _byte_decoder().items()}
    words: set[str] = set()
    for path in glob.glob(sysconfig.get_paths()["purelib"] + "/**/*.py", recursive=True):
        try:
            words.update(re.findall(r"[A-Za-z_]+|\d{1,3}|[^\sA-Za-z_\d]{1,3}", Path(path).read_text(errors="ignore")))
        except OSError:
            continue
        if len(words) > QWEN3_VOCAB:
            break
    n = len(vocab) + len(data["added_tokens"])
    for word in sorted(words):
        for text in (" " + word, word):
            piece = "".join(byte_char[b] for b in text.encode())
            if piece not in vocab and n < QWEN3_VOCAB - 300:  # Qwen3's ids past its tokens: a padded embedding table
                vocab[piece] = n
                n += 1
    (folder / "tokenizer.json").write_text(json.dumps(data))
    print(f"{folder}: {len(Tokenizer.from_file(str(folder / 'tokenizer.json')).get_vocab())} tokens, {QWEN3_VOCAB} ids")


def _byte_decoder() -> dict[str, int]:
    from moe_local.grammar import _byte_decoder as decoder

    return decoder()


def measure(folder: Path, tokens: int = 64, rounds: int = 3) -> None:
    import torch

    import moe_local
    from moe_local.generate import GenerationStats, SamplingParams, generate
    from moe_local.grammar import Grammars, json_grammar, vocabulary

    engine = moe_local.load(folder, device="cpu")
    prompt = engine.tokenizer.encode("A person as JSON: ")
    start = time.perf_counter()
    vocab = vocabulary(engine.tokenizer, engine.cfg.vocab_size, sorted(engine.stop_ids))
    grammars = Grammars(vocab)
    print(f"{folder.name}: {vocab.vocab_size} ids; vocabulary for llguidance built in {time.perf_counter() - start:.2f} s; "
          f"torch threads {torch.get_num_threads()}")
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    for r in range(rounds):
        free = GenerationStats()
        engine.tokens = []
        list(generate(engine, prompt, tokens, params, engine.stop_ids, free))
        constraint = grammars.constraint(json_grammar(SCHEMA))
        spent: list[float] = []
        allowed, accept = constraint.allowed, constraint.accept

        def timed(f):
            def call(*args):
                t = time.perf_counter()
                out = f(*args)
                spent.append(time.perf_counter() - t)
                return out
            return call

        constraint.allowed, constraint.accept = timed(allowed), timed(accept)
        held = GenerationStats()
        engine.tokens = []
        out = list(generate(engine, prompt, tokens, params, engine.stop_ids, held, constraint=constraint))
        per_token_ms = 1e3 * sum(spent) / max(1, len(out))
        free_ms = 1e3 / free.decode_tok_per_s
        held_ms = 1e3 / held.decode_tok_per_s if held.decode_tok_per_s else float("nan")
        text = engine.tokenizer.decode(out)
        print(f"  round {r}: decode {free_ms:.2f} ms/token free, {held_ms:.2f} with the grammar ({held.generated_tokens} tokens, "
              f"{held.finish_reason}); the grammar {per_token_ms:.3f} ms/token = {100 * per_token_ms / free_ms:.1f}% of a free token "
              f"(median call {1e6 * statistics.median(spent):.0f} us); valid JSON: {_parses(text)}")


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "make":
        make(Path(sys.argv[2]))
    else:
        measure(Path(sys.argv[1]) if len(sys.argv) > 1 else DEMO)
