"""The `moe-local` command line: parse, call the library, print. Errors become one line on stderr."""

from __future__ import annotations

import json
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from moe_local.budget import format_bytes
from moe_local.chat import ChatSession, chat_loop
from moe_local.checkpoint import Checkpoint, resolve_model_path
from moe_local.engine import Engine, Options, load
from moe_local.errors import MoeLocalError
from moe_local.generate import GenerationStats, SamplingParams
from moe_local.tokenizer import StreamDecoder

try:  # typer >= 0.26 ships its own copy of click
    from typer._click.exceptions import UsageError
except ImportError:
    from click.exceptions import UsageError

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


def load_with_progress(model: Optional[str], quiet: bool, **options) -> Engine:
    """Load MODEL (None: the demo model), showing a progress bar on an interactive stderr while the experts
    are read. The demo model's note comes after a successful load, so that a load error stays one line."""
    if quiet or not sys.stderr.isatty():
        engine = load(model_or_demo(model), **options)
    else:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("loading experts"), BarColumn(), DownloadColumn(binary_units=True), TimeRemainingColumn())
        with Progress(*columns, transient=True, console=rich_stderr()) as bar:
            task = bar.add_task("load", total=None)
            engine = load(model_or_demo(model), progress=lambda done, total: bar.update(task, completed=done, total=total), **options)
    if model is None and not quiet:
        stderr("using the built-in demo model (a toy trained on Python's sources); pass a model folder for real use")
    return engine


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


def model_or_demo(model: Optional[str]) -> str:
    if model is not None:
        return model
    if not (DEMO_MODEL / "config.json").is_file():
        raise MoeLocalError(f"no MODEL given and the demo model is missing from {DEMO_MODEL}; pass a model folder")
    return str(DEMO_MODEL)


def read_prompt(prompt: Optional[str]) -> str:
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        return sys.stdin.read()
    if prompt is None:
        raise MoeLocalError("no prompt: pass -p/--prompt TEXT, or pipe it on standard input")
    return prompt


def sampling_overrides(**flags) -> dict:
    """The sampling flags given, checked before the slow load (SamplingParams says what is out of range)."""
    given = {name: value for name, value in flags.items() if value is not None}
    SamplingParams(**given)
    return given


# Options that `run` and `chat` share.
ModelArg = Annotated[Optional[str], typer.Argument(help="Model folder (config.json + safetensors + tokenizer) or a cached Hugging Face id such as mistralai/Mixtral-8x7B-v0.1. Default: the small demo model that ships with moe-local.")]
Temperature = Annotated[Optional[float], typer.Option("--temperature", "--temp", help="0 is greedy. Default: the model's generation_config.json, else 0.8.")]
TopK = Annotated[Optional[int], typer.Option("--top-k", help="Keep the k likeliest tokens (0: off). Default 40.")]
TopP = Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling threshold (1: off). Default 0.95.")]
MinP = Annotated[Optional[float], typer.Option("--min-p", help="Drop tokens below min-p x the top probability (0: off). Default 0.05.")]
RepeatPenalty = Annotated[Optional[float], typer.Option("--repeat-penalty", help="Penalise the last 64 tokens (1: off). Default 1.0.")]
Seed = Annotated[Optional[int], typer.Option("--seed", "-s", help="Random seed: the same seed gives the same output.")]
CtxSize = Annotated[Optional[int], typer.Option("--ctx-size", "-c", help="Context length in tokens (KV cache size). Default: min(4096, the model's).")]
System = Annotated[Optional[str], typer.Option("--system", help="System message for the chat template.")]
GpuMemory = Annotated[Optional[str], typer.Option("--gpu-memory", help="Device memory budget for weights, KV cache and expert slots, e.g. 12GiB, 12GB, 500MiB. Default: 90% of free GPU memory.")]
ExpertSlots = Annotated[Optional[int], typer.Option("--expert-slots", help="Number of device expert slots (overrides what --gpu-memory implies).")]
Device = Annotated[Optional[str], typer.Option("--device", help="cuda or cpu. Default: cuda when available.")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help="Compute dtype: bf16, fp16 or fp32. Default: the checkpoint's.")]
Prefetch = Annotated[bool, typer.Option("--prefetch/--no-prefetch", help="Predict and load the next layer's experts ahead of time.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, notes or timings on stderr.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")]


@app.command()
def run(
    model: ModelArg = None,
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The prompt; '-' or a pipe reads standard input."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", min=0, help="Most tokens to generate."),
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    repeat_penalty: RepeatPenalty = None,
    seed: Seed = None,
    ctx_size: CtxSize = DEFAULTS.ctx_size,
    system: System = None,
    raw: bool = typer.Option(False, "--raw", help="Feed the prompt as is, without the chat template."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object (text, prompt_tokens, tokens, stats) instead of streaming."),
    gpu_memory: GpuMemory = DEFAULTS.gpu_memory,
    expert_slots: ExpertSlots = DEFAULTS.expert_slots,
    device: Device = DEFAULTS.device,
    dtype: Dtype = DEFAULTS.dtype,
    prefetch: Prefetch = DEFAULTS.prefetch,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Generate a reply to one prompt, streamed to stdout, with timings on stderr."""
    with clean_errors(debug):
        sampling = sampling_overrides(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed)
        text = read_prompt(prompt)
        start = time.perf_counter()
        engine = load_with_progress(
            model, quiet, device=device, gpu_memory=gpu_memory, expert_slots=expert_slots,
            ctx_size=ctx_size, dtype=dtype, prefetch=prefetch,
        )
        load_seconds = time.perf_counter() - start
        tokenizer = engine.tokenizer
        if raw:
            prompt_ids = tokenizer.encode(text)
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            prompt_ids = tokenizer.render_chat(messages)
        params = replace(engine.sampling_defaults(), **sampling)
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


@app.command()
def chat(
    model: ModelArg = None,
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n", min=1, help="Most tokens per answer. Default: until the end of text or a full context."),
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    repeat_penalty: RepeatPenalty = None,
    seed: Seed = None,
    ctx_size: CtxSize = DEFAULTS.ctx_size,
    system: System = None,
    gpu_memory: GpuMemory = DEFAULTS.gpu_memory,
    expert_slots: ExpertSlots = DEFAULTS.expert_slots,
    device: Device = DEFAULTS.device,
    dtype: Dtype = DEFAULTS.dtype,
    prefetch: Prefetch = DEFAULTS.prefetch,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Chat in the terminal: streamed answers, the conversation kept across turns, /? lists the commands."""
    with clean_errors(debug):
        sampling = sampling_overrides(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed)
        engine = load_with_progress(
            model, quiet, device=device, gpu_memory=gpu_memory, expert_slots=expert_slots,
            ctx_size=ctx_size, dtype=dtype, prefetch=prefetch,
        )
        session = ChatSession(engine, replace(engine.sampling_defaults(), **sampling), max_new_tokens, system)
        session.check_template()
        if not quiet:
            stderr("Send a message (/? for help; Ctrl-C stops an answer; Ctrl-D or /bye exits)")
        chat_loop(session)


def describe(ckpt: Checkpoint) -> dict:
    """What `info` shows: the config's geometry and the parameter counts its tensors imply."""
    cfg, itemsize = ckpt.config, ckpt.dtype.itemsize
    resident = cfg.resident_numel()
    return {
        "model": str(ckpt.folder),
        "architecture": (ckpt.raw_config.get("architectures") or [cfg.model_type])[0],
        "model_type": cfg.model_type,
        "dtype": str(ckpt.dtype).removeprefix("torch."),
        "parameters": {
            "total": resident + cfg.n_layers * cfg.n_experts * cfg.expert_numel,
            "active_per_token": resident + cfg.n_layers * cfg.top_k * cfg.expert_numel,
            "resident": resident,
            "per_expert": cfg.expert_numel,
        },
        "expert_bytes": cfg.expert_numel * itemsize,
        "resident_bytes": resident * itemsize,
        "layers": cfg.n_layers,
        "experts_per_layer": cfg.n_experts,
        "experts_per_token": cfg.top_k,
        "hidden_size": cfg.dim,
        "expert_ffn_size": cfg.ffn_dim,
        "attention_heads": cfg.n_heads,
        "kv_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.max_position_embeddings,
        "sliding_window": cfg.sliding_window,
        "rope_theta": cfg.rope_theta,
        "files": {f.name: f.stat().st_size for f in sorted(ckpt.folder.iterdir()) if f.is_file()},
    }


def format_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit} ({n:,})"
    return str(n)


@app.command()
def info(
    model: ModelArg = None,
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object."),
    debug: Debug = False,
) -> None:
    """Describe a model from its config.json and safetensors headers, without loading the weights."""
    with clean_errors(debug):
        d = describe(Checkpoint(resolve_model_path(model_or_demo(model))))
        if json_output:
            print(json.dumps(d))
            return
        p = d["parameters"]
        rows = [
            ("model", d["model"]),
            ("architecture", f"{d['architecture']} ({d['model_type']})"),
            ("parameters", f"{format_count(p['total'])} total"),
            ("active per token", f"{format_count(p['active_per_token'])}: resident {format_count(p['resident'])} + "
             f"{d['experts_per_token']} of {d['experts_per_layer']} experts x {d['layers']} layers"),
            ("expert size", f"{format_count(p['per_expert'])} parameters, {format_bytes(d['expert_bytes'])} in {d['dtype']} "
             f"(ffn {d['expert_ffn_size']})"),
            ("resident size", format_bytes(d["resident_bytes"])),
            ("dtype", d["dtype"]),
            ("layers", str(d["layers"])),
            ("hidden size", str(d["hidden_size"])),
            ("attention", f"{d['attention_heads']} heads, {d['kv_heads']} KV heads, head dim {d['head_dim']}"
             + (f", sliding window {d['sliding_window']}" if d["sliding_window"] else "")),
            ("vocabulary", str(d["vocab_size"])),
            ("context length", f"{d['context_length']} (rope theta {d['rope_theta']:g})"),
            ("files", ""),
        ]
        rows += [(f"  {name}", format_bytes(size)) for name, size in d["files"].items()]
        width = 2 + max(len(key) for key, _ in rows)
        for key, value in rows:
            print(f"{key:<{width}}{value}".rstrip())


def main() -> None:
    """Run the app; a usage error (unknown flag, bad value) is one line on stderr too, and exit status 2."""
    try:
        code = app(standalone_mode=False, prog_name="moe-local")
    except UsageError as e:
        if type(e).__name__ != "NoArgsIsHelpError":  # that one has shown the help already
            hint = f" (try '{e.ctx.command_path} --help')" if e.ctx else ""
            stderr(f"error: {e.format_message()}{hint}")
        code = 2
    except typer.Abort:
        stderr("error: aborted")
        code = 2
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
