"""The `moe-local` command line: parse, call the library, print. Errors become one line on stderr."""

from __future__ import annotations

import json
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

import typer

from moe_local.engine import Engine, Options, load
from moe_local.errors import MoeLocalError
from moe_local.generate import GenerationStats, SamplingParams
from moe_local.tokenizer import StreamDecoder

app = typer.Typer(
    help="Run Mixture-of-Experts language models on a GPU too small for them: experts live in host RAM "
    "behind a cache of GPU expert slots.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
DEFAULTS = Options()
DEMO_MODEL = Path(__file__).parent / "demo"


@app.callback()
def commands() -> None:
    """Run Mixture-of-Experts language models on a GPU too small for them."""


def stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def clean_errors(debug: bool) -> Iterator[None]:
    """Turn every failure into one line on stderr and a non-zero exit (with --debug: the traceback)."""
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        stderr("interrupted")
        raise typer.Exit(130) from None
    except Exception as e:
        if debug:
            traceback.print_exc()
        if isinstance(e, (MoeLocalError, ValueError)):
            stderr(f"error: {e}")
        else:
            stderr(f"error: unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)")
        raise typer.Exit(1) from None


def load_with_progress(model: str, quiet: bool, **options) -> Engine:
    """Load, showing a progress bar on an interactive stderr while the experts are read."""
    if quiet or not sys.stderr.isatty():
        return load(model, **options)
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("loading experts"), BarColumn(), DownloadColumn(binary_units=True), TimeRemainingColumn())
    with Progress(*columns, transient=True, console=rich_stderr()) as bar:
        task = bar.add_task("load", total=None)
        return load(model, progress=lambda done, total: bar.update(task, completed=done, total=total), **options)


def rich_stderr():
    from rich.console import Console

    return Console(stderr=True)


def print_timings(engine: Engine, stats: GenerationStats, load_seconds: float) -> None:
    experts = stats.experts
    recall = experts.get("prefetch_recall")
    lines = [
        f"load time     = {load_seconds:8.2f} s   ({engine.plan.expert_slots} of {engine.plan.total_experts} experts fit "
        f"in slots on {engine.device.type})",
        f"prompt eval   = {stats.prompt_seconds:8.2f} s / {stats.prompt_tokens_evaluated:5d} tokens "
        f"({stats.prompt_tok_per_s:8.2f} tokens per second)",
        f"generation    = {stats.decode_seconds:8.2f} s / {stats.generated_tokens:5d} tokens "
        f"({stats.decode_tok_per_s:8.2f} tokens per second)",
        f"expert cache  = {100 * experts.get('hit_rate', 0):6.1f} % hits, prefetch recall "
        + (f"{100 * recall:.1f} %" if recall is not None else "n/a")
        + f", {experts.get('bytes_copied', 0) / 1e9:.3f} GB copied to the {engine.device.type}",
    ]
    stderr("\n" + "\n".join(lines))


def model_or_demo(model: Optional[str], quiet: bool) -> str:
    if model is not None:
        return model
    if not (DEMO_MODEL / "config.json").is_file():
        raise MoeLocalError(f"no MODEL given and the demo model is missing from {DEMO_MODEL}; pass a model folder")
    if not quiet:
        stderr("using the built-in demo model (a toy trained on Python's sources); pass a model folder for real use")
    return str(DEMO_MODEL)


def read_prompt(prompt: Optional[str]) -> str:
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        return sys.stdin.read()
    if prompt is None:
        raise MoeLocalError("no prompt: pass -p/--prompt TEXT, or pipe it on standard input")
    return prompt


@app.command()
def run(
    model: Optional[str] = typer.Argument(None, help="Model folder (config.json + safetensors + tokenizer) or a cached Hugging Face id such as mistralai/Mixtral-8x7B-v0.1. Default: the small demo model that ships with moe-local."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The prompt; '-' or a pipe reads standard input."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", min=0, help="Most tokens to generate."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "--temp", help="0 is greedy. Default: the model's generation_config.json, else 0.8."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Keep the k likeliest tokens (0: off). Default 40."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling threshold (1: off). Default 0.95."),
    min_p: Optional[float] = typer.Option(None, "--min-p", help="Drop tokens below min-p x the top probability (0: off). Default 0.05."),
    repeat_penalty: Optional[float] = typer.Option(None, "--repeat-penalty", help="Penalise the last 64 tokens (1: off). Default 1.0."),
    seed: Optional[int] = typer.Option(None, "--seed", "-s", help="Random seed: the same seed gives the same output."),
    ctx_size: Optional[int] = typer.Option(DEFAULTS.ctx_size, "--ctx-size", "-c", help="Context length in tokens (KV cache size). Default: min(4096, the model's)."),
    system: Optional[str] = typer.Option(None, "--system", help="System message for the chat template."),
    raw: bool = typer.Option(False, "--raw", help="Feed the prompt as is, without the chat template."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object (text, prompt_tokens, tokens, stats) instead of streaming."),
    gpu_memory: Optional[str] = typer.Option(DEFAULTS.gpu_memory, "--gpu-memory", help="Device memory budget for weights, KV cache and expert slots, e.g. 12GiB, 12GB, 500MiB. Default: 90% of free GPU memory."),
    expert_slots: Optional[int] = typer.Option(DEFAULTS.expert_slots, "--expert-slots", help="Number of device expert slots (overrides what --gpu-memory implies)."),
    device: Optional[str] = typer.Option(DEFAULTS.device, "--device", help="cuda or cpu. Default: cuda when available."),
    dtype: Optional[str] = typer.Option(DEFAULTS.dtype, "--dtype", help="Compute dtype: bf16, fp16 or fp32. Default: the checkpoint's."),
    prefetch: bool = typer.Option(DEFAULTS.prefetch, "--prefetch/--no-prefetch", help="Predict and load the next layer's experts ahead of time."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no timings on stderr."),
    debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error."),
) -> None:
    """Generate a reply to one prompt, streamed to stdout, with timings on stderr."""
    with clean_errors(debug):
        text = read_prompt(prompt)
        start = time.perf_counter()
        engine = load_with_progress(
            model_or_demo(model, quiet), quiet, device=device, gpu_memory=gpu_memory, expert_slots=expert_slots,
            ctx_size=ctx_size, dtype=dtype, prefetch=prefetch,
        )
        load_seconds = time.perf_counter() - start
        tokenizer = engine.tokenizer
        if raw:
            prompt_ids = tokenizer.encode(text)
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            prompt_ids = tokenizer.render_chat(messages)
        overrides = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed)
        params = replace(engine.sampling_defaults(), **{k: v for k, v in overrides.items() if v is not None})
        stats = GenerationStats()
        tokens = []
        decoder = StreamDecoder(tokenizer)
        for token in engine.generate(prompt_ids, max_new_tokens, params, stats):
            tokens.append(token)
            if not json_output:
                sys.stdout.write(decoder.push(token))
                sys.stdout.flush()
        if json_output:
            result = {"text": tokenizer.decode(tokens), "prompt_tokens": prompt_ids, "tokens": tokens, "stats": stats.as_dict()}
            result["stats"]["memory_plan"] = engine.plan.as_dict()
            print(json.dumps(result))
        else:
            sys.stdout.write(decoder.flush() + "\n")
            sys.stdout.flush()
        if not quiet:
            print_timings(engine, stats, load_seconds)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
