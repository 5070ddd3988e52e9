"""Train the demo MoE that ships in moe_local/demo, so `moe-local run -p "..."` works with no download.

What it makes: a small Mixtral-architecture model (transformers.MixtralForCausalLM: 4 layers, 8 experts per
layer, top-2 routing, ~7.8 M parameters, ~15.5 MB in bfloat16) and a sentencepiece BPE tokenizer, both trained
from scratch on a few MB of the CPython standard library's own *.py sources, found offline on any machine
at sysconfig.get_paths()["stdlib"]. Those sources are under the Python Software Foundation License, which
allows copying and redistribution, so the weights can ship with the package. The model writes
Python-looking text; it is a toy for trying the tool (offloading, routing, sampling), nothing more.

Training is on CPU for a fixed wall-clock budget, so the result depends on the machine's speed; the corpus,
tokenizer and batch order are fixed by --seed. Needs transformers, sentencepiece and torch. Rerun with:

    python scripts/train_demo.py --minutes 15 --out moe_local/demo --seed 0
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sysconfig
import time
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import MixtralConfig, MixtralForCausalLM

VOCAB = 2048
SEQ = 256
BATCH = 8
PEAK_LR = 2e-3
CORPUS_CHARS = 4_000_000
HELD_OUT = 16  # sequences of SEQ tokens kept out of training, for the final loss and routing shares


def stdlib_sources(seed: int) -> list[str]:
    """A few MB of the standard library's own sources (tests left out), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not {"test", "tests", "site-packages"} & set(p.parts))
    random.Random(seed).shuffle(files)  # spread the cap over the whole library, not just a-e
    texts, total = [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total > CORPUS_CHARS:
            break
    return texts


def chunks(texts: list[str], lines: int = 8) -> list[str]:
    """Groups of lines with their newlines (sentencepiece wants short "sentences"), so that newline and
    indentation pieces are learned too."""
    out = []
    for text in texts:
        rows = text.splitlines(keepends=True)
        out += ["".join(rows[i : i + lines]) for i in range(0, len(rows), lines)]
    return [c for c in out if c.strip() and len(c.encode()) < 4000]


def train_tokenizer(texts: list[str], out: Path) -> spm.SentencePieceProcessor:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(chunks(texts[::4])), model_writer=model, vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=0.9995,
        # Code: keep every space and newline as written, and let runs of spaces (indentation) be pieces.
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        num_threads=2, input_sentence_size=200_000, shuffle_input_sentence=False, minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def model_config() -> MixtralConfig:
    return MixtralConfig(
        vocab_size=VOCAB, hidden_size=192, intermediate_size=352, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
        rope_theta=10000.0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        # Adds the load-balancing loss during training. transformers' default weight (0.001) left an expert
        # unused in a 20-minute run; 0.02 keeps every expert of every layer in use.
        output_router_logits=True, router_aux_loss_coef=0.02,
    )


def count_params(config: MixtralConfig, model: MixtralForCausalLM) -> tuple[int, int]:
    """(total, active per token): active counts num_experts_per_tok of the experts in each layer."""
    total = sum(p.numel() for p in model.parameters())
    expert = 3 * config.hidden_size * config.intermediate_size
    idle = config.num_hidden_layers * (config.num_local_experts - config.num_experts_per_tok) * expert
    return total, total - idle


def routing_shares(model: MixtralForCausalLM, held_out: torch.Tensor) -> tuple[float, list[list[float]]]:
    """Held-out LM loss, and per layer the fraction of (token, top-k slot) assignments each expert gets."""
    k, n = model.config.num_experts_per_tok, model.config.num_local_experts
    with torch.no_grad():
        out = model(input_ids=held_out, labels=held_out, output_router_logits=True)
    shares = []
    for logits in out.router_logits:
        counts = torch.bincount(logits.topk(k, dim=-1).indices.flatten(), minlength=n).float()
        shares.append((counts / counts.sum()).tolist())
    return (out.loss - model.config.router_aux_loss_coef * out.aux_loss).item(), shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-clock training time (default 15)")
    parser.add_argument("--out", type=Path, default=Path("moe_local/demo"), help="output model folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    texts = stdlib_sources(args.seed)
    sp = train_tokenizer(texts, args.out)
    ids = [i for text in texts for i in [1, *sp.encode(text), 2]]  # <s> file </s>: EOS teaches it to stop
    data = torch.tensor(ids)
    held_out, data = data[: SEQ * HELD_OUT].view(HELD_OUT, SEQ), data[SEQ * HELD_OUT :]
    print(f"{len(texts)} files, {sum(map(len, texts)):,} chars, {len(data):,} training tokens")

    config = model_config()
    model = MixtralForCausalLM(config)
    total, active = count_params(config, model)
    print(f"{total / 1e6:.2f} M parameters ({active / 1e6:.2f} M active per token), {total * 2 / 1e6:.1f} MB in bf16")
    assert total * 2 <= 16e6, "too big to ship in the package"
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=0.1, betas=(0.9, 0.95))
    budget_s, start, step = args.minutes * 60, time.time(), 0
    model.train()
    while (elapsed := time.time() - start) < budget_s:
        frac = elapsed / budget_s  # linear warmup over the first 3% of the time, then cosine down to 10%
        lr = PEAK_LR * min(1.0, frac / 0.03) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - SEQ - 1, (BATCH,)).tolist()
        batch = torch.stack([data[s : s + SEQ] for s in starts])
        out = model(input_ids=batch, labels=batch)  # loss includes router_aux_loss_coef * load-balancing loss
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0:
            print(f"step {step:5d}  {elapsed:6.0f} s  lr {lr:.2e}  loss {out.loss.item():.3f}  aux {out.aux_loss.item():.3f}", flush=True)
        step += 1
    print(f"trained {step} steps of {BATCH}x{SEQ} tokens in {time.time() - start:.0f} s; last loss {out.loss.item():.3f}")

    # Save in bfloat16. transformers 5 always writes safetensors (safe_serialization is gone from its API).
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(args.out)
    (args.out / "model.safetensors").chmod(0o644)  # save_pretrained makes it owner-only; it ships as package data
    generation = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.7, "top_p": 0.95, "top_k": 40}
    (args.out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (args.out / "README.md").write_text(
        f"# moe-local demo model\n\nA toy Mixtral-architecture Mixture-of-Experts model ({total / 1e6:.1f} M parameters, "
        f"{active / 1e6:.1f} M active per token: 4 layers, 8 experts, top-2 routing) with a {VOCAB}-piece sentencepiece "
        f"tokenizer, trained from scratch for {args.minutes:g} minutes ({step} steps of {BATCH}x{SEQ} tokens) on a "
        "2-core CPU on the CPython standard library's own sources (Python Software Foundation License).\n\n"
        "It writes Python-looking text and is here only so that `moe-local run` works with no download; "
        "it is not useful for anything else.\n\n"
        f"Made by `python scripts/train_demo.py --minutes {args.minutes:g} --out {args.out} --seed {args.seed}`.\n"
    )

    # What ships: reload the bf16 folder and show samples and how evenly layer 0 routes held-out text.
    model = MixtralForCausalLM.from_pretrained(args.out).float().eval()
    loss, shares = routing_shares(model, held_out)
    print(f"held-out LM loss {loss:.3f}")
    for layer, row in enumerate(shares):
        print(f"layer {layer} routing shares: " + " ".join(f"{s:.3f}" for s in row))
    for prompt in ["def ", "import os\n"]:
        prompt_ids = torch.tensor([[1, *sp.encode(prompt)]])
        for name, kwargs in [("greedy", {"do_sample": False}), ("sampled", {})]:
            torch.manual_seed(args.seed)
            new = model.generate(prompt_ids, max_new_tokens=80, **kwargs)[0, 1:].tolist()
            print(f"--- {name}, prompt {prompt!r}:\n{sp.decode(new)}\n")


if __name__ == "__main__":
    main()
