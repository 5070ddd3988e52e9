"""The `moe-local` command line: parse, call the library, print. Errors become one line on stderr.

torch and the model code are imported inside the commands that use them, so that `--help`, `--version`
and usage errors answer at once."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable, Iterator, Optional

import typer

from moe_local import __version__
from moe_local.errors import MoeLocalError
from moe_local.threads import set_openmp_defaults

if TYPE_CHECKING:
    from moe_local.checkpoint import Checkpoint
    from moe_local.engine import Engine, Options
    from moe_local.generate import GenerationStats, SamplingParams
    from moe_local.tokenizer import Tokenizer

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
DEMO_MODEL = Path(__file__).parent / "demo"
DEFAULT_MAX_NEW_TOKENS = 256  # run's, when neither -n nor the model's generation_config.json says


def show_version(value: bool) -> None:
    if value:
        print(f"moe-local {__version__}")
        raise typer.Exit()


@app.callback()
def commands(
    version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True, metavar="", help="Show the version and exit."),
) -> None:
    """Run Mixture-of-Experts language models on a GPU too small for them."""


class FlagError(MoeLocalError):
    """A command-line value, or a combination of flags, that the command cannot take. Exit status 2, as for
    the parser's own errors (an unknown flag, a value out of a flag's range): the command line is wrong, where
    status 1 says that what it named failed (a missing model, a budget too small for it)."""


@contextmanager
def checking_flags() -> Iterator[None]:
    """Errors raised while only the flags are checked are FlagErrors."""
    try:
        yield
    except (MoeLocalError, ValueError) as e:
        raise FlagError(str(e)) from None


def stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def clean_errors(debug: bool) -> Iterator[None]:
    """Turn every failure into one line on stderr and a non-zero exit (with --debug: the traceback)."""
    try:
        yield
    except typer.Exit:
        raise
    except BrokenPipeError:
        # the reader left (`| head`): stop quietly, as Unix tools do. Python's recipe: point stdout at
        # devnull so that the flush at exit does not raise again; 141 is what a shell reports for SIGPIPE.
        # (typer itself ends `--help | head` quietly, with status 1.)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(141) from None
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
        raise typer.Exit(2 if isinstance(e, FlagError) else 1) from None


@contextmanager
def progress_bar(label: str, quiet: bool) -> Iterator[Optional[Callable[[int, int], None]]]:
    """A byte-counting progress bar on an interactive stderr; yields its update(done, total) or None."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(label), BarColumn(), DownloadColumn(binary_units=True), TimeRemainingColumn())
    with Progress(*columns, transient=True, console=rich_stderr()) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def load_options(**flags) -> Options:
    """The load-time flags that were given (None: not given), checked now; their defaults live in `Options`."""
    from moe_local.budget import parse_size
    from moe_local.engine import Options

    with checking_flags():
        if flags.get("gpu_memory") is not None:
            parse_size(flags["gpu_memory"])  # `--gpu-memory 12` (no unit) is a usage error, said now
        return Options(**{name: value for name, value in flags.items() if value is not None})


def open_model(model: Optional[str], options: Options) -> tuple[Path, Tokenizer, int]:
    """What the small files say, before the slow read of the experts: the folder (its config.json and
    safetensors headers valid), its tokenizer and the context size, with a warning when --ctx-size goes
    past the positions the model was trained for."""
    from moe_local.checkpoint import open_checkpoint, resolve_model_path
    from moe_local.tokenizer import load_tokenizer

    folder = resolve_model_path(model_or_demo(model))
    cfg = open_checkpoint(folder).config
    ctx_size = options.context_size(cfg)
    warn_past_trained_context(ctx_size, cfg.max_position_embeddings)
    return folder, load_tokenizer(folder), ctx_size


def warn_past_trained_context(ctx_size: int, trained: int) -> None:
    if ctx_size > trained:
        warnings.warn(f"--ctx-size {ctx_size} is more than the {trained} positions this model was trained for: "
                      "expect nonsense past them")


def check_fits(prompt_ids: list[int], ctx_size: int) -> None:
    if len(prompt_ids) > ctx_size:
        raise MoeLocalError(f"the prompt takes {len(prompt_ids)} tokens and the context holds {ctx_size}: "
                            "shorten it or raise --ctx-size")


def load_with_progress(folder: Path, options: Options, quiet: bool, demo: bool) -> Engine:
    """Load the model, showing a progress bar on an interactive stderr while the experts are read (and
    pinned). The demo model's note comes after a successful load, so that a load error stays one line."""
    from moe_local.engine import Engine

    quantizing = options.experts_dtype in ("int8", "int4")
    with progress_bar("loading experts (quantizing on first use)" if quantizing else "loading experts", quiet) as progress:
        engine = Engine.from_folder(folder, options, progress)
    if not quiet:
        for note in engine.notes:
            stderr(note)
        if demo:
            stderr("using the built-in demo model (a toy trained on Python's sources); pass a model folder for real use")
    return engine


def rich_stderr():
    from rich.console import Console

    return Console(stderr=True, width=None if sys.stderr.isatty() else 160)  # a log file is not 80 columns wide


def print_timings(engine: Engine, stats: GenerationStats, load_seconds: float) -> None:
    experts = stats.experts
    recall = experts.get("prefetch_recall")
    # on the CPU a miss is a copy from the store into a slot in the same RAM, not a transfer to a device
    copied = "from host RAM to the GPU" if engine.device.type == "cuda" else "into the CPU's expert slots"
    slots = hasattr(engine.experts, "cache")  # else every expert runs in place from host RAM (--device cpu)
    lines = [
        f"load time     = {load_seconds:8.2f} s   ("
        + (f"{engine.plan.expert_slots} of {engine.plan.total_experts} experts fit in slots on {engine.device.type})"
           if slots else f"all {engine.plan.total_experts} experts run in place from host RAM: no slots, no copies)"),
        f"prompt eval   = {stats.prompt_seconds:8.2f} s / {stats.prompt_tokens_evaluated:5d} tokens "
        f"({stats.prompt_tok_per_s:8.2f} tokens per second)",
        f"generation    = {stats.decode_seconds:8.2f} s / {stats.generated_tokens:5d} tokens "
        f"({stats.decode_tok_per_s:8.2f} tokens per second)",
    ]
    if slots:
        lines += [
            f"expert cache  = {100 * experts.get('hit_rate', 0):6.1f} % hits, prefetch recall "
            + (f"{100 * recall:.1f} %" if recall is not None else "n/a")
            + f", {experts.get('bytes_copied', 0) / 1e9:.3f} GB copied {copied}",
            f"cpu experts   = {experts.get('experts_on_cpu', 0):8d} misses run on the CPU ({experts.get('cpu_busy_s', 0):.2f} s "
            f"computing, {experts.get('cpu_wait_s', 0):.2f} s waited for; --cpu-experts {engine.experts.cpu_experts})",
        ]
    else:
        lines.append("expert cache  = none: every expert runs in place from host RAM, 0 bytes copied")
    lines.append(f"seed          = {stats.seed}")
    stderr("\n" + "\n".join(lines))


def model_or_demo(model: Optional[str]) -> str:
    if model is not None:
        return model
    if not (DEMO_MODEL / "config.json").is_file():
        raise MoeLocalError(f"no MODEL given and the demo model is missing from {DEMO_MODEL}; pass a model folder")
    return str(DEMO_MODEL)


def read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    """The prompt; bytes that are not UTF-8, in a file, piped or in -p, become U+FFFD instead of an error."""
    from moe_local.tokenizer import replace_surrogates

    if prompt is not None and prompt_file is not None:
        raise FlagError("give -p/--prompt or -f/--file, not both")
    if prompt_file is not None:
        try:
            text = prompt_file.read_bytes().decode("utf-8", errors="replace")
        except OSError as e:
            raise MoeLocalError(f"cannot read the prompt file {prompt_file}: {e.strerror}") from None
    elif prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        text = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    elif prompt is None:
        raise FlagError("no prompt: pass -p/--prompt TEXT or -f/--file FILE, or pipe it on standard input")
    else:
        text = replace_surrogates(prompt)  # argv keeps such bytes as lone surrogates
    if not text.strip():
        raise FlagError("the prompt is empty: pass -p/--prompt TEXT or -f/--file FILE, or pipe text on standard input")
    return text


def chat_messages(system: Optional[str], *messages: dict) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + list(messages)


def sampling_overrides(**flags) -> dict:
    """The sampling flags given, checked before the slow load (SamplingParams says what is out of range)."""
    from moe_local.generate import SamplingParams

    given = {name: value for name, value in flags.items() if value is not None}
    with checking_flags():
        SamplingParams(**given)
    return given


def model_sampling(folder: Path, overrides: dict, flags: bool = True) -> SamplingParams:
    """The model's sampling defaults (its generation_config.json) with the flags given over them, read before the
    load: a bad value in the file fails now, named, and a flag for it replaces it (`flags`: the command has them)."""
    from moe_local.engine import read_json
    from moe_local.generate import SamplingParams

    return SamplingParams().from_generation_config(read_json(folder / "generation_config.json"), overrides, flags)


# Options that `run` and `chat` share. Their defaults live in `Options` (engine.py), the help only says them;
# metavar="" shows a flag as a flag, not as `<bool>` (`--raw true` is not accepted).
ModelArg = Annotated[Optional[str], typer.Argument(help="Model folder (config.json + safetensors + tokenizer), a GGUF file (or the first of its split files) or a cached Hugging Face id such as mistralai/Mixtral-8x7B-v0.1. Default: the small demo model that ships with moe-local.")]
Temperature = Annotated[Optional[float], typer.Option("--temperature", "--temp", help="0 is greedy. Default: the model's generation_config.json, else 0.8.")]
TopK = Annotated[Optional[int], typer.Option("--top-k", help="Keep the k likeliest tokens (0: off). Default 40.")]
TopP = Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling threshold (1: off). Default 0.95.")]
MinP = Annotated[Optional[float], typer.Option("--min-p", help="Drop tokens below min-p x the top probability (0: off). Default 0.05.")]
RepeatPenalty = Annotated[Optional[float], typer.Option("--repeat-penalty", help="Penalise the last 64 tokens (1: off). Default 1.0.")]
Seed = Annotated[Optional[int], typer.Option("--seed", "-s", help="Random seed: the same seed gives the same output. Default: a random one, reported with the timings (and in --json).")]
CtxSize = Annotated[Optional[int], typer.Option("--ctx-size", "-c", help="Context length in tokens (KV cache size). Default: min(4096, the model's).")]
System = Annotated[Optional[str], typer.Option("--system", help="System message for the chat template.")]
Think = Annotated[Optional[bool], typer.Option("--think/--no-think", metavar="", help="Let the model think before it answers, or not: the chat template's enable_thinking (Qwen3, GLM-4.5). Default: the template's.")]
PreserveThinking = Annotated[bool, typer.Option("--preserve-thinking", metavar="", help="Keep the reasoning of every earlier answer in the prompt, not only of those after the last question: the chat template's preserve_thinking (Qwen3.6). Default: the template's (dropped).")]
ReasoningEffort = Annotated[Optional[str], typer.Option("--reasoning-effort", help="How long the model reasons before it answers: low, medium or high (the chat template's reasoning_effort: gpt-oss). Default: the template's (medium).")]
ShowReasoning = Annotated[bool, typer.Option("--show-reasoning", metavar="", help="Show the model's reasoning (gpt-oss's analysis channel), dimmed on stderr. Default: hidden.")]
GpuMemory = Annotated[Optional[str], typer.Option("--gpu-memory", help="Device memory budget for weights, KV cache and expert slots, with a unit: 12GiB, 12GB, 500MiB. Default: 90% of free GPU memory.")]
ExpertSlots = Annotated[Optional[int], typer.Option("--expert-slots", help="Number of device expert slots (overrides what --gpu-memory implies).")]
Device = Annotated[Optional[str], typer.Option("--device", help="cuda or cpu. Default: cuda when available.")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help="Compute dtype: bf16, fp16 or fp32. Default: the checkpoint's.")]
Prefetch = Annotated[Optional[bool], typer.Option("--prefetch/--no-prefetch", metavar="", help="Predict and load the next layer's experts ahead of time. Default: on.")]
ExpertsDtype = Annotated[Optional[str], typer.Option("--experts-dtype", help="How the experts are stored and copied: auto (the default), bf16, fp16, fp32, int8 (per-channel, 2x fewer bytes than bf16), int4 (group-wise, ~3.8x fewer), mxfp4 (gpt-oss's 4.25-bit format, ~3.8x fewer) or fp8 (e4m3 in blocks with fp32 scales, as the FP8 checkpoints publish them, 2x fewer). auto keeps a checkpoint's own MXFP4, compressed-tensors int4 or FP8 (FP8 where it fits in RAM, else int4), else the checkpoint's dtype when the experts fit in RAM with room to spare, else int8, else int4. Quantized experts are cached on disk (MOE_LOCAL_CACHE, default ~/.cache/moe-local; see `moe-local cache`).")]
ResidentDtype = Annotated[Optional[str], typer.Option("--resident-dtype", help="The weights kept on the GPU: auto (the default: the compute dtype), int8 (the attention projections, the dense MLPs and the shared experts in int8, per-channel: about 45% less resident memory for Mixtral, so more expert slots; for 8 GB GPUs) or int4 (in groups of up to 128, as llama.cpp's Q4_0 files keep them: about two thirds less, and less accurate). Routers, norms and the shared experts' gates stay as they are. On --device cpu, where every token reads them, both also keep lm_head in int8 (unless it is the embeddings' table), and int4 decodes fastest.")]
CudaGraphs = Annotated[Optional[bool], typer.Option("--cuda-graphs/--no-cuda-graphs", metavar="", help="Replay each layer's resident work (norms, attention, router) of a decode step as a CUDA graph instead of launching its kernels one by one. Default: on where the device is CUDA (decode 1.3-2.4x faster on an H100).")]
CpuExperts = Annotated[Optional[str], typer.Option("--cpu-experts", help="Where a missed expert runs: auto (the default: copied to the GPU or run on the CPU from host RAM, whichever a cost model measured at load says finishes first), never (always copied) or always (always on the CPU; the slots keep the hot experts). On --device cpu, auto is never.")]
GroupSize = Annotated[Optional[int], typer.Option("--group-size", help="int4 group size: 32, 64, 128 or 256. Default 128, or the largest the model's sizes allow.")]
Policy = Annotated[Optional[str], typer.Option("--policy", help="Expert slot eviction policy: layer-lru (the default: each layer keeps an even share of the slots) or lru (see docs/measurements.md).")]
Threads = Annotated[Optional[int], typer.Option("--threads", "-t", min=1, help="CPU threads for torch and moe-local's kernels, fixed. Default: torch's count (every core, or OMP_NUM_THREADS), on the CPU device lowered while other programs keep cores busy (Linux).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", metavar="", help="No progress bar, notes or timings on stderr.")]
Debug = Annotated[bool, typer.Option("--debug", metavar="", help="Show the traceback of an error.")]
JsonOutput = Annotated[bool, typer.Option("--json", metavar="", help="Print one JSON object.")]


@app.command()
def run(
    model: ModelArg = None,
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The prompt; '-' or a pipe reads standard input."),
    prompt_file: Optional[Path] = typer.Option(None, "--file", "-f", help="Read the prompt from this file."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n", min=1, help=f"Most tokens to generate. Default: the model's generation_config.json, else {DEFAULT_MAX_NEW_TOKENS}."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="End the answer where this text appears (not printed); repeat the flag for several."),
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    repeat_penalty: RepeatPenalty = None,
    seed: Seed = None,
    ctx_size: CtxSize = None,
    system: System = None,
    think: Think = None,
    reasoning_effort: ReasoningEffort = None,
    show_reasoning: ShowReasoning = False,
    raw: bool = typer.Option(False, "--raw", metavar="", help="Feed the prompt as is, without the chat template."),
    json_output: bool = typer.Option(False, "--json", metavar="", help="Print one JSON object (text, prompt_tokens, tokens, stats; reasoning for models that answer in channels, as gpt-oss) instead of streaming."),
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", help="The answer is JSON that validates against the JSON schema in this file (constrained decoding; needs the server extra's llguidance)."),
    gpu_memory: GpuMemory = None,
    expert_slots: ExpertSlots = None,
    device: Device = None,
    dtype: Dtype = None,
    prefetch: Prefetch = None,
    policy: Policy = None,
    experts_dtype: ExpertsDtype = None,
    group_size: GroupSize = None,
    resident_dtype: ResidentDtype = None,
    cpu_experts: CpuExperts = None,
    cuda_graphs: CudaGraphs = None,
    threads: Threads = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Generate a reply to one prompt, streamed to stdout, with timings on stderr."""
    from moe_local.chat import NO_CHANNELS, ReasoningPrinter
    from moe_local.generate import GenerationStats, StopStrings
    from moe_local.params import max_new_tokens_default
    from moe_local.harmony import ChannelStream, is_harmony
    from moe_local.tokenizer import StreamDecoder, check_reasoning_effort

    with clean_errors(debug):
        sampling = sampling_overrides(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed)
        if raw and think is not None:
            raise FlagError("--think/--no-think set the chat template's enable_thinking, and --raw leaves the template out")
        if raw and (reasoning_effort is not None or show_reasoning):
            raise FlagError("--reasoning-effort and --show-reasoning work through the chat template, and --raw leaves it out")
        if reasoning_effort is not None:
            with checking_flags():
                check_reasoning_effort(reasoning_effort)
        options = load_options(
            device=device, gpu_memory=gpu_memory, expert_slots=expert_slots, ctx_size=ctx_size, dtype=dtype, prefetch=prefetch,
            policy=policy, experts_dtype=experts_dtype, group_size=group_size, resident_dtype=resident_dtype,
            cpu_experts=cpu_experts, cuda_graphs=cuda_graphs, threads=threads,
        )
        text = read_prompt(prompt, prompt_file)
        # everything the tokenizer and the prompt can tell fails here, before the experts are read
        folder, tokenizer, ctx = open_model(model, options)
        if raw:
            prompt_ids = tokenizer.encode(text)
        else:
            prompt_ids = tokenizer.render_chat(chat_messages(system, {"role": "user", "content": text}), **tokenizer.template_options(think, reasoning_effort))
        channels = not raw and is_harmony(tokenizer)  # gpt-oss: the final channel is the answer, the analysis its reasoning
        if show_reasoning and not channels:
            raise MoeLocalError(NO_CHANNELS)
        check_fits(prompt_ids, ctx)
        params = model_sampling(folder, sampling)
        grammar = schema_grammar(json_schema, tokenizer) if json_schema is not None else None
        start = time.perf_counter()
        engine = load_with_progress(folder, options, quiet, demo=model is None)
        load_seconds = time.perf_counter() - start
        limit = max_new_tokens if max_new_tokens is not None else max_new_tokens_default(engine.generation_config, DEFAULT_MAX_NEW_TOKENS)
        stats, tokens, pieces = GenerationStats(), [], []
        decoder, stops = StreamDecoder(tokenizer), StopStrings(stop or [])
        if channels:  # the decoder then gives the answer's text; the reasoning is printed (or not) as it comes
            decoder = ChannelStream(tokenizer, ReasoningPrinter(show_reasoning, quiet) if not json_output else lambda text: None)
        constraint = None
        if grammar is not None:
            from moe_local.grammar import Grammars, vocabulary

            constraint = Grammars(vocabulary(tokenizer, engine.cfg.vocab_size, sorted(engine.stop_ids))).constraint(grammar)
        for token in engine.generate(prompt_ids, limit, params, stats, constraint=constraint):
            tokens.append(token)
            pieces.append(stops.push(decoder.push(token)))
            if not json_output:
                sys.stdout.write(pieces[-1])
                sys.stdout.flush()
            if stops.stopped:
                stats.finish_reason = "stop"
                stats.experts = engine.experts.stats.as_dict()  # the generator, left early, did not
                break
        tail = ""
        if not stops.stopped:  # what the detokenizer and the stop strings still hold back
            tail = stops.push(decoder.flush())
            if stops.stopped:  # the held-back end completed a stop string
                stats.finish_reason = "stop"
            tail += stops.flush()
        pieces.append(tail)
        if json_output:
            result = {"text": "".join(pieces), "prompt_tokens": prompt_ids, "tokens": tokens, "stats": stats.as_dict()}
            if channels:
                result["reasoning"] = decoder.reasoning
            result["stats"]["memory_plan"] = engine.plan.as_dict()
            print(json.dumps(result))
        else:
            sys.stdout.write(pieces[-1] + "\n")
            sys.stdout.flush()
        if not quiet:
            if stats.finish_reason == "context":
                stderr(f"(stopped: the context of {engine.ctx_size} tokens is full; raise --ctx-size for a longer answer)")
            if channels and stats.finish_reason == "length" and not decoder.answer and decoder.reasoning:
                stderr("(stopped while the model was still reasoning, before its answer: raise -n/--max-new-tokens)")
            print_timings(engine, stats, load_seconds)


def schema_grammar(path: Path, tokenizer: Tokenizer) -> str:
    """--json-schema's file as the grammar of the answer, checked before the load."""
    try:
        from moe_local.grammar import answer_grammar
    except ImportError as e:
        raise MoeLocalError(f"--json-schema needs llguidance ({e.name} is missing): pip install 'moe-local[server]'") from None
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise MoeLocalError(f"--json-schema {path}: {e}") from None
    if not isinstance(schema, dict):
        raise MoeLocalError(f"--json-schema {path}: a JSON schema is an object, not {type(schema).__name__}")
    try:
        return answer_grammar(tokenizer, schema)
    except MoeLocalError as e:
        raise MoeLocalError(f"--json-schema {path}: {e}") from None


def check_chat_template(tokenizer: Tokenizer, system: Optional[str], think: Optional[bool], reasoning_effort: Optional[str] = None,
                        preserve_thinking: Optional[bool] = None) -> None:
    """The conversation ChatSession.check_template renders, rendered before the load: a template that
    rejects it (or has no thinking switch for --think) fails in seconds, not after every expert was read."""
    from moe_local.chat import TEMPLATE_PROBE

    options = tokenizer.template_options(think, reasoning_effort, preserve_thinking)
    tokenizer.render_chat(chat_messages(system, *TEMPLATE_PROBE), **options)


@app.command()
def chat(
    model: ModelArg = None,
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n", min=1, help="Most tokens per answer. Default: the model's generation_config.json, else until the end of text or a full context."),
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    repeat_penalty: RepeatPenalty = None,
    seed: Seed = None,
    ctx_size: CtxSize = None,
    system: System = None,
    think: Think = None,
    preserve_thinking: PreserveThinking = False,
    reasoning_effort: ReasoningEffort = None,
    show_reasoning: ShowReasoning = False,
    verbose: bool = typer.Option(False, "--verbose", metavar="", help="After each answer, show its speed: prompt tokens evaluated and generated, tokens per second (/set verbose on|off in the chat)."),
    gpu_memory: GpuMemory = None,
    expert_slots: ExpertSlots = None,
    device: Device = None,
    dtype: Dtype = None,
    prefetch: Prefetch = None,
    policy: Policy = None,
    experts_dtype: ExpertsDtype = None,
    group_size: GroupSize = None,
    resident_dtype: ResidentDtype = None,
    cpu_experts: CpuExperts = None,
    cuda_graphs: CudaGraphs = None,
    threads: Threads = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Chat in the terminal: streamed answers, the conversation kept across turns, /? lists the commands."""
    from moe_local.chat import NO_CHANNELS, ChatSession, chat_loop
    from moe_local.params import max_new_tokens_default
    from moe_local.harmony import is_harmony
    from moe_local.tokenizer import check_reasoning_effort

    with clean_errors(debug):
        sampling = sampling_overrides(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed)
        if reasoning_effort is not None:
            with checking_flags():
                check_reasoning_effort(reasoning_effort)
        options = load_options(
            device=device, gpu_memory=gpu_memory, expert_slots=expert_slots, ctx_size=ctx_size, dtype=dtype, prefetch=prefetch,
            policy=policy, experts_dtype=experts_dtype, group_size=group_size, resident_dtype=resident_dtype,
            cpu_experts=cpu_experts, cuda_graphs=cuda_graphs, threads=threads,
        )
        folder, tokenizer, _ = open_model(model, options)
        preserve = True if preserve_thinking else None  # off: the template's default, which any template has
        check_chat_template(tokenizer, system, think, reasoning_effort, preserve)
        params = model_sampling(folder, sampling)
        if show_reasoning and not is_harmony(tokenizer):
            raise MoeLocalError(NO_CHANNELS)
        engine = load_with_progress(folder, options, quiet, demo=model is None)
        limit = max_new_tokens if max_new_tokens is not None else max_new_tokens_default(engine.generation_config, None)
        session = ChatSession(engine, params, limit, system, think, verbose,
                              reasoning_effort, show_reasoning, preserve)
        session.check_template()
        if not quiet:
            stderr("Send a message (/? for help; Ctrl-C stops an answer; Ctrl-D or /bye exits)")
        chat_loop(session, quiet)


def mxfp4_expert_bytes(cfg) -> int:
    from moe_local.experts.formats import Mxfp4

    return sum(part.nbytes for part in Mxfp4(cfg).parts)


@app.command()
def serve(
    model: ModelArg = None,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. The default answers only this machine; 0.0.0.0 answers every network (then set --api-key)."),
    port: int = typer.Option(8080, "--port", min=0, max=65535, help="TCP port (0: any free one, printed at start)."),
    parallel: int = typer.Option(4, "--parallel", min=1, help="Requests decoded together as one batch, each with a KV cache of --ctx-size tokens of its own."),
    queue: int = typer.Option(16, "--queue", min=0, help="Requests that may wait for a place in the batch; past them the server answers 503 with Retry-After."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MOE_LOCAL_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 (also from MOE_LOCAL_API_KEY)."),
    ctx_size: CtxSize = None,
    gpu_memory: GpuMemory = None,
    expert_slots: ExpertSlots = None,
    device: Device = None,
    dtype: Dtype = None,
    prefetch: Prefetch = None,
    policy: Policy = None,
    experts_dtype: ExpertsDtype = None,
    group_size: GroupSize = None,
    resident_dtype: ResidentDtype = None,
    cpu_experts: CpuExperts = None,
    threads: Threads = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models,
    /health), decoding concurrent requests together. Needs the server extra: pip install 'moe-local\\[server]'."""
    import ipaddress

    with clean_errors(debug):
        try:
            from moe_local.server import Settings, listen, serve as run_server
        except ImportError as e:
            raise MoeLocalError(f"moe-local serve needs the server extra ({e.name} is missing): pip install 'moe-local[server]'") from None
        if api_key is not None and not api_key.strip():
            raise FlagError("--api-key (or MOE_LOCAL_API_KEY) is empty")
        options = load_options(
            device=device, gpu_memory=gpu_memory, expert_slots=expert_slots, ctx_size=ctx_size, dtype=dtype, prefetch=prefetch,
            policy=policy, experts_dtype=experts_dtype, group_size=group_size, resident_dtype=resident_dtype, cpu_experts=cpu_experts,
            sequences=parallel,  # each request decoded together has a KV cache: the budget counts them all
            threads=threads,
        )
        sock = listen(host, port)  # a port in use fails now, not after the load
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback and api_key is None:
            stderr(f"warning: listening on {host} without --api-key: anyone who can reach this port can use the model")
        folder, _, _ = open_model(model, options)
        model_sampling(folder, {}, flags=False)  # the server's defaults: a bad generation_config.json fails before the load
        engine = load_with_progress(folder, options, quiet, demo=model is None)
        model_id = model if model and not Path(model).exists() else folder.name  # a Hugging Face id as given
        settings = Settings.of(engine, model_id, parallel, queue, api_key)
        run_server(engine, settings, sock, (lambda message: None) if quiet else stderr, stderr)


def describe(ckpt: Checkpoint) -> dict:
    """What `info` shows: the config's geometry and the parameter counts its tensors imply."""
    from moe_local.weights.gguf_model import GgufModel

    cfg, itemsize = ckpt.config, ckpt.dtype.itemsize
    resident = cfg.resident_numel()
    if isinstance(ckpt, GgufModel):  # the experts as the file holds them; the rest is dequantized at load
        types, layers = ckpt.expert_types(), range(cfg.n_moe_layers)
        # one expert's bytes as the file holds them, the mean over the MoE layers: a file may mix types by layer
        file_bytes = sum(ckpt.expert_tensor(layer, w).nbytes for layer in layers for w in types)
        gguf = {"model": str(ckpt.files[0]), "architecture": ckpt.arch, "experts_format": "/".join(sorted({t.name for ts in types.values() for t in ts})),
                "expert_bytes": file_bytes // (cfg.n_experts * cfg.n_moe_layers),
                "files": {f.name: f.stat().st_size for f in ckpt.files}, "tensor_bytes_by_type": ckpt.bytes_by_type()}
    else:
        gguf = {}
    return {
        "model": str(ckpt.folder),
        "architecture": (ckpt.raw_config.get("architectures") or [cfg.model_type])[0],
        "model_type": cfg.model_type,
        "dtype": str(ckpt.dtype).removeprefix("torch."),
        "parameters": cfg.parameter_counts(),
        # as stored in the checkpoint: MXFP4 experts (gpt-oss as published) take 4.25 bits a weight, FP8 ones 8 and
        # their scales, compressed-tensors int4 4 and theirs
        "experts_format": "mxfp4" if cfg.mxfp4_experts else " + ".join(ckpt.formats()["experts"]),
        "expert_bytes": mxfp4_expert_bytes(cfg) if cfg.mxfp4_experts else ckpt.expert_stored_bytes() if cfg.quantization else cfg.expert_numel * itemsize,
        "tensor_formats": tensor_formats(ckpt),
        "resident_bytes": resident * itemsize,
        "layers": cfg.n_layers,
        "moe_layers": cfg.n_moe_layers,
        "dense_ffn_size": cfg.dense_ffn_dim if cfg.n_moe_layers < cfg.n_layers else None,
        "shared_expert_ffn_size": cfg.shared_ffn_dim or None,
        "attention": "latent (MLA)" if cfg.mla else "grouped-query" + (" (gated)" if cfg.attn_gate else ""),
        "linear_attention_layers": len(cfg.linear_layers),  # Gated DeltaNet, with a fixed state per sequence
        "kv_cache_bytes_per_token": cfg.kv_cache_numel(1) * itemsize,
        "sequence_state_bytes": cfg.sequence_state_bytes(ckpt.dtype),
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
        "rope_theta": cfg.rope.theta,
        "rope_scaling": cfg.rope.kind if cfg.rope.kind != "default" else None,
        "files": {f.name: f.stat().st_size for f in sorted(ckpt.folder.iterdir()) if f.is_file()},
    } | gguf


STATE_NOTE = ", and the linear-attention layers' fixed state"


def tensor_formats(ckpt: Checkpoint) -> dict[str, dict[str, str]]:
    """Per kind of tensor (experts, attention, other): how the checkpoint stores it and what a load with the
    default options makes of it on this machine."""
    import torch

    from moe_local.errors import BudgetError
    from moe_local.experts.formats import choose_format

    from moe_local.experts.formats import gguf_format
    from moe_local.weights.gguf_model import GgufModel

    stored, compute = ckpt.formats(), str(ckpt.dtype).removeprefix("torch.")
    device, gguf = "cuda" if torch.cuda.is_available() else "cpu", isinstance(ckpt, GgufModel)
    try:
        _, experts = gguf_format(ckpt.layer_expert_types(), ckpt.config, ckpt.dtype, device) if gguf else choose_format("auto", ckpt.config, ckpt.dtype, device, None)
    except BudgetError as e:
        experts = str(e)
    out = {"experts": {"stored": " + ".join(stored["experts"]), "at_load": experts}}
    for kind in ("attention", "other"):
        quantized = [f for f in stored[kind] if (f not in ("F32", "F16", "BF16") if gguf else f.startswith(("fp8", "int4")))]
        becomes = f"{compute}, dequantized at load" if quantized else "as stored"
        if kind == "attention":
            becomes += " (or int8, int4 under --resident-dtype)"
        elif ckpt.config.mlp_matrices:
            becomes += " (the dense and shared MLPs: or int8, int4 under --resident-dtype)"
        out[kind] = {"stored": " + ".join(stored[kind]), "at_load": becomes}
    return out


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
    from moe_local.budget import format_bytes
    from moe_local.checkpoint import open_checkpoint, resolve_model_path

    with clean_errors(debug):
        d = describe(open_checkpoint(resolve_model_path(model_or_demo(model))))
        if json_output:
            print(json.dumps(d))
            return
        p = d["parameters"]
        rows = [
            ("model", d["model"]),
            ("architecture", f"{d['architecture']} ({d['model_type']})"),
            ("parameters", f"{format_count(p['total'])} total"),
            ("active per token", f"{format_count(p['active_per_token'])}: resident {format_count(p['resident'])} + "
             f"{d['experts_per_token']} of {d['experts_per_layer']} experts x {d['moe_layers']} MoE layers; "
             f"{format_count(p['active_without_embeddings'])} without the token embedding table (a token reads one row of it), "
             "as some model cards count"),
            ("routed experts", f"{format_count(p['routed_experts'])} (offloaded to host RAM)"),
            ("expert size", f"{format_count(p['per_expert'])} parameters, {format_bytes(d['expert_bytes'])} in {d['experts_format']} "
             f"(ffn {d['expert_ffn_size']})"),
            ("resident size", format_bytes(d["resident_bytes"])),
            ("dtype", d["dtype"]),
            *((f"{kind} stored as", f"{f['stored']} -> {f['at_load']}") for kind, f in d["tensor_formats"].items()),
            ("layers", f"{d['layers']}, {d['moe_layers']} with experts"
             + (f", {d['layers'] - d['moe_layers']} dense (ffn {d['dense_ffn_size']})" if d["dense_ffn_size"] else "")),
            ("shared expert", f"ffn {d['shared_expert_ffn_size']} in every MoE layer, resident" if d["shared_expert_ffn_size"] else "none"),
            ("hidden size", str(d["hidden_size"])),
            ("attention", f"{d['attention']}, {d['attention_heads']} heads, {d['kv_heads']} KV heads, head dim {d['head_dim']}"
             + (f", sliding window {d['sliding_window']}" if d["sliding_window"] else "")
             + (f"; Gated DeltaNet (linear) in {d['linear_attention_layers']} of {d['layers']} layers" if d["linear_attention_layers"] else "")),
            ("KV cache", f"{format_bytes(d['kv_cache_bytes_per_token'])} per token"
             + (f" + {format_bytes(d['sequence_state_bytes'])} of linear-attention state per sequence" if d["sequence_state_bytes"] else "")),
            ("vocabulary", str(d["vocab_size"])),
            ("context length", f"{d['context_length']} (rope theta {d['rope_theta']:g}"
             + (f", {d['rope_scaling']} scaling)" if d["rope_scaling"] else ")")),
            ("files", ""),
        ]
        rows += [(f"  {name}", format_bytes(size)) for name, size in d["files"].items()]
        if "tensor_bytes_by_type" in d:  # a GGUF
            rows += [("tensor types", ""), *((f"  {name}", format_bytes(size)) for name, size in d["tensor_bytes_by_type"].items())]
        width = 2 + max(len(key) for key, _ in rows)
        for key, value in rows:
            print(f"{key:<{width}}{value}".rstrip())


@app.command()
def plan(
    model: ModelArg = None,
    preset: Optional[str] = typer.Option(None, "--preset", help="Plan a published geometry instead of a checkpoint, such as mixtral-8x7b (a wrong name lists them all)."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="The budget to plan, with a unit, e.g. 12GiB. Default: 90% of this machine's free GPU memory."),
    expert_slots: ExpertSlots = None,
    ctx_size: CtxSize = None,
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16, fp16 or fp32. Default: the checkpoint's (bf16 for a preset)."),
    experts_dtype: ExpertsDtype = None,
    group_size: GroupSize = None,
    resident_dtype: ResidentDtype = None,
    device: Optional[str] = typer.Option(None, "--device", help="cuda (the default: plan for a GPU, this one or one you name with --gpu-memory) or cpu."),
    parallel: int = typer.Option(1, "--parallel", min=1, help="Plan for serve --parallel N: N sequences, each with a KV cache of --ctx-size tokens (and a hybrid's snapshots). Default 1, as run and chat."),
    json_output: JsonOutput = False,
    debug: Debug = False,
) -> None:
    """Show how a GPU memory budget splits into resident weights, KV cache, workspace and expert slots, and
    what to expect from it, without loading the weights (only config.json and the safetensors headers)."""
    import torch

    from moe_local.budget import (check_beside_experts, embeddings_bytes, embeddings_on_host, lm_head_quantized, plan_memory, plan_report,
                                  snapshot_bytes)
    from moe_local.checkpoint import open_checkpoint, resolve_model_path
    from moe_local.config import preset_config
    from moe_local.errors import BudgetError
    from moe_local.experts.formats import ExpertFormat, choose_format, gguf_format, make_format
    from moe_local.weights.gguf_model import GgufModel

    with clean_errors(debug):
        if preset and model:
            raise FlagError("give a MODEL or --preset, not both")
        if preset:
            cfg, name, checkpoint_dtype = preset_config(preset), preset, torch.bfloat16
        else:
            ckpt = open_checkpoint(resolve_model_path(model_or_demo(model)))
            cfg, checkpoint_dtype = ckpt.config, ckpt.dtype
            name = str(ckpt.files[0] if isinstance(ckpt, GgufModel) else ckpt.folder)
        target = torch.device(device or "cuda")
        if target.type == "cuda" and gpu_memory is None and expert_slots is None and not torch.cuda.is_available():
            raise FlagError("this machine has no CUDA GPU to measure: give --gpu-memory SIZE to plan for one (or --device cpu)")
        options = load_options(device=target.type, gpu_memory=gpu_memory, dtype=dtype, ctx_size=ctx_size, experts_dtype=experts_dtype,
                               resident_dtype=resident_dtype)
        ctx, compute = options.context_size(cfg), options.compute_dtype(checkpoint_dtype)
        warn_past_trained_context(ctx, cfg.max_position_embeddings)

        def plan_for(f: ExpertFormat | None):
            return plan_memory(cfg, compute, target, ctx, options.prefill_chunk, gpu_memory, expert_slots,
                               expert_bytes=f.expert_bytes if f else None, attention=options.attention_dtype, sequences=parallel)

        # what lives in host RAM beside the experts, counted as the load counts it: on the CPU the rest of the model, beside a GPU the
        # token embeddings; a hybrid's snapshots on both
        alone = plan_for(None) if target.type == "cpu" else None
        if alone:
            beside = alone.beside_store_bytes
        else:
            beside = (embeddings_bytes(cfg, compute) if embeddings_on_host(cfg, target) else 0) + snapshot_bytes(cfg, compute, parallel)
        try:
            if alone:
                check_beside_experts(alone, ctx, options.attention_dtype)
            if not preset and isinstance(ckpt, GgufModel) and options.experts_dtype == "auto":
                fmt, why = gguf_format(ckpt.layer_expert_types(), cfg, compute, target.type)
            else:
                fmt, why = choose_format(options.experts_dtype, cfg, compute, target.type, group_size, beside, sequences=parallel)
        except BudgetError as e:  # plan may be for another machine: say so, and show the smallest format
            fmt = make_format("int4", cfg, compute, target.type, group_size)
            why = f"{fmt.key}, the smallest; but on this machine {e}"

        report = {"model": name, "experts_format": fmt.key, "why": why, "resident_dtype": options.resident_dtype,
                  "lm_head_int8": lm_head_quantized(cfg, target.type, options.attention_dtype),
                  **plan_report(cfg, plan_for(fmt), ctx), "formats": {}}
        for other in dict.fromkeys((fmt.name, "bf16", "fp8", "int8", "int4", "mxfp4")):
            try:
                f = fmt if other == fmt.name else make_format(other, cfg, compute, target.type, group_size)
                report["formats"][other] = plan_report(cfg, plan_for(f), ctx)
            except MoeLocalError as e:
                report["formats"][other] = {"error": str(e)}
        if json_output:
            print(json.dumps(report))
            return
        print_plan(report, cfg, slots_given=expert_slots is not None)


def print_plan(r: dict, cfg, slots_given: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    from moe_local.budget import format_bytes, snapshots_tip

    table = Table(title=f"{r['model']} on {r['device']}", show_header=False, box=None, padding=(0, 2))
    budget, on_gpu = r["budget_bytes"], r["device"] == "cuda"
    if budget is not None:
        budget_text = format_bytes(budget)
    elif slots_given:
        budget_text = "none: --expert-slots sets the slots"
    else:
        budget_text = "none: on the CPU every expert runs in place from host RAM by default"
    in_place = r["in_place"]
    sequences = f" x {r['sequences']} sequences" if r["sequences"] > 1 else ""
    snapshot = r["snapshot_bytes"] // (r["sequences"] * r["snapshots_per_sequence"] or 1)  # one snapshot
    beside = [f"{format_bytes(r['host_resident_bytes'])} of token embeddings"] if r["host_resident_bytes"] else []
    beside += [f"{format_bytes(r['snapshot_bytes'])} of state snapshots"] if r["snapshot_bytes"] and on_gpu else []
    rows = [
        ("budget", budget_text),
        ("experts", r["why"]),
        ("resident weights", format_bytes(r["resident_bytes"]) + (f" (attention{' and MLPs' if cfg.mlp_matrices else ''} in {r['resident_dtype']}"
                                                                  f"{', lm_head in int8' if r['lm_head_int8'] else ''})"
                                                                  if r["resident_dtype"] != "auto" else "")),
        *([("token embeddings", f"{format_bytes(r['host_resident_bytes'])}, in host RAM")] if r["host_resident_bytes"] else []),
        (f"KV cache ({r['ctx_size']} tokens{sequences}{STATE_NOTE if cfg.linear_layers else ''})", format_bytes(r["kv_bytes"])),
        *([("state snapshots", f"up to {r['snapshots_per_sequence']} per sequence{sequences} x {format_bytes(snapshot)} = "
                               f"{format_bytes(r['snapshot_bytes'])}, in host RAM")] if r["snapshot_bytes"] else []),
        ("workspace (estimated)", format_bytes(r["workspace_bytes"])),
        ("expert slots", "none: no slots, no copies" if in_place
         else f"{r['expert_slots']} x {format_bytes(r['expert_bytes'])} = {format_bytes(r['slot_bytes'])}"),
        ("experts per layer that fit", f"all {cfg.n_experts}, in place" if in_place
         else f"{r['experts_per_layer']:.2f} of {cfg.n_experts} ({r['expert_slots']} of {r['total_experts']} in all)"),
        ("host RAM for the experts" if on_gpu else "host RAM (experts + the rest)",
         f"{format_bytes(r['host_bytes_needed'])} needed"
         + (f" (with {' and '.join(beside)})" if beside else "")
         + f", {format_bytes(r['host_bytes_available'])} available now"),
        ("expected hit rate", "100 %: every expert runs where it lies" if in_place
         else f"{100 * r['expected_hit_rate_uniform']:.1f} % under uniform routing (the worst case)"),
        ("expected copies per token", f"{r['expected_h2d_bytes_per_token_uniform'] / 1e9:.2f} GB"),
    ]
    per_token = r["expected_h2d_bytes_per_token_uniform"]
    if per_token and on_gpu:  # on the CPU a miss is a copy within host RAM: no bus bounds it
        speeds = ", ".join(f"{gbps * 1e9 / per_token:.1f} tok/s at {gbps} GB/s ({bus})" for gbps, bus in ((25, "PCIe 4.0 x16"), (55, "PCIe 5.0 x16")))
        rows.append(("decode bound by copies", speeds))
    for key, value in rows:
        table.add_row(key, value)
    console = Console()
    console.print(table)
    formats = Table(title="each format under this budget (uniform routing)", padding=(0, 1))
    columns = ("experts", "bytes per miss", "slots", "hit rate", "GB/token", "bound at 25 / 55 GB/s", "host RAM")
    columns = columns if on_gpu else tuple(c for c in columns if not c.startswith("bound"))
    for column in columns:
        formats.add_column(column, justify="right")
    for name, f in r["formats"].items():
        if "error" in f:
            formats.add_row(name, f["error"], *[""] * (len(columns) - 2))
            continue
        per_token = f["expected_h2d_bytes_per_token_uniform"]
        bound = [" / ".join(f"{gbps * 1e9 / per_token:.1f}" for gbps in (25, 55)) + " tok/s" if per_token else "no copies"] if on_gpu else []
        formats.add_row(name, format_bytes(f["expert_bytes"]), "in place" if f["in_place"] else str(f["expert_slots"]),
                        f"{100 * f['expected_hit_rate_uniform']:.1f} %",
                        f"{per_token / 1e9:.2f}", *bound, format_bytes(f["host_bytes_needed"]))
    console.print(formats)
    if r["host_bytes_needed"] > r["host_bytes_available"]:
        tip = snapshots_tip(r["snapshot_bytes"], r["sequences"], r["host_bytes_needed"], r["host_bytes_available"])
        console.print(f"[bold red]warning:[/] this machine has less free host RAM than the experts need; loading would be refused{tip}")


# `bench --preset tiny` is the CPU smoke test: a short prompt and decode keep it to seconds
TINY_BENCH_TOKENS = (64, 32)


@app.command()
def bench(
    preset: str = typer.Option("mixtral-8x7b", "--preset", help="Geometry: a published one such as mixtral-8x7b (a wrong name lists them all), or tiny: a CPU smoke test."),
    layers: Optional[int] = typer.Option(None, "--layers", help="Layers to build. Default: the preset's (32 for Mixtral-8x7B)."),
    model: Optional[str] = typer.Option(None, "--model", help="Measure this model's own weights (a folder, a .gguf file or a Hugging Face id), loaded as run loads them, instead of a preset's random ones; no peer."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Device budget, with a unit. Default: 12GiB on CUDA; on the CPU every expert runs in place."),
    expert_slots: ExpertSlots = None,
    prompt_tokens: Optional[int] = typer.Option(None, "--prompt-tokens", min=1, help=f"Prompt length for prefill. Default 512 ({TINY_BENCH_TOKENS[0]} for tiny)."),
    new_tokens: Optional[int] = typer.Option(None, "--new-tokens", min=1, help=f"Decode steps (batch 1), each fed a random token so that routing stays close to uniform. Default 128 ({TINY_BENCH_TOKENS[1]} for tiny)."),
    dtype: str = typer.Option("bf16", "--dtype", help="Compute dtype: bf16, fp16 or fp32."),
    experts_dtype: Optional[str] = typer.Option(None, "--experts-dtype", help="The experts' format: bf16, fp16, fp32, int8, int4, mxfp4, fp8 or auto (as in run). Default: mxfp4 for gpt-oss (as published), else bf16."),
    group_size: GroupSize = None,
    resident_dtype: ResidentDtype = None,
    cpu_experts: CpuExperts = None,
    pageable: bool = typer.Option(False, "--pageable", metavar="", help="Keep the experts in pageable host memory (as a machine that cannot pin them does): copies are slower, which the CPU channel can make up for."),
    device: Device = None,
    policies: list[str] = typer.Option(["layer-lru", "lru"], "--policy", help="Eviction policies to run, the first reported at the top; repeat the flag (layer-lru, lru)."),
    prefetch: bool = typer.Option(True, "--prefetch/--no-prefetch", metavar="", help="Predict and load the next layer's experts ahead of time."),
    prefetch_top: int = typer.Option(1, "--prefetch-top", min=1, help="Experts per token the prefetcher loads, the likeliest first (2 for Mixtral: all it routes to)."),
    compare_prefetch: bool = typer.Option(True, "--compare-prefetch/--no-compare-prefetch", metavar="", help="One more run: the first policy with prefetch the other way."),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", metavar="", help="One more run: the first policy with each layer's resident work (norms, attention, router) replayed as a CUDA graph, to compare with the launches issued one by one."),
    batch: int = typer.Option(1, "--batch", min=1, help="One more run: this many sequences decoded together (as `serve --parallel` does) against one alone, in a plan with a KV cache for each; their aggregate tokens/s and the ratio."),
    peer_layers: int = typer.Option(2, "--peer-layers", min=0, help="Layers of the transformers + accelerate offload peer (0: skip it)."),
    peer_tokens: int = typer.Option(4, "--peer-tokens", min=1, help="Tokens the peer decodes."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights and prompt."),
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Measure prefill and decode on a published geometry with random weights drawn on the device, against
    the PCIe copy bound and transformers + accelerate offloading: one JSON object on stdout, a table on stderr."""
    import torch

    from moe_local.bench import BenchConfig
    from moe_local.bench import bench as run_benchmark

    with clean_errors(debug):
        if device is None and preset != "tiny" and model is None and not torch.cuda.is_available():
            raise MoeLocalError(f"this machine has no CUDA GPU for the {preset} geometry; "
                                "`moe-local bench --preset tiny --device cpu` is a quick smoke test on the CPU")
        tiny = preset == "tiny"
        given = dict(gpu_memory=gpu_memory, expert_slots=expert_slots, group_size=group_size, resident_dtype=resident_dtype, device=device,
                     cpu_experts=cpu_experts)
        with checking_flags():
            config = BenchConfig(
                preset=preset, layers=layers, model=model, dtype=dtype, experts_dtype=experts_dtype, policies=tuple(policies), prefetch=prefetch,
                prompt_tokens=prompt_tokens or (TINY_BENCH_TOKENS[0] if tiny else BenchConfig.prompt_tokens),
                new_tokens=new_tokens or (TINY_BENCH_TOKENS[1] if tiny else BenchConfig.new_tokens),
                prefetch_top=prefetch_top, compare_prefetch=compare_prefetch, peer_layers=peer_layers, peer_tokens=peer_tokens, seed=seed,
                pageable=pageable, batch=batch, cuda_graphs=cuda_graphs,
                **{name: value for name, value in given.items() if value is not None},
            )
        say = (lambda message: None) if quiet else stderr
        # the peer runs transformers as its users do; its deprecation notices are about that code, not this run
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        with warnings.catch_warnings(), progress_bar("drawing experts", quiet) as progress:
            warnings.filterwarnings("ignore", message=".*deprecated", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*deprecated", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*deprecated", category=UserWarning, module="transformers")
            result = run_benchmark(config, progress, say)
        print(json.dumps(result))
        if not quiet:
            print_bench(result)


def print_bench(r: dict) -> None:
    from rich.table import Table

    ch = r["channels"]
    where = (f"all {r['plan']['total_experts']} experts in place" if r["plan"]["in_place"]
             else f"{r['plan']['expert_slots']} of {r['plan']['total_experts']} experts in slots")
    table = Table(title=f"{r['config']['model'] or r['config']['preset']}, {r['config']['n_layers']} layers, {where} on {r['machine']['device']}")
    columns = ("policy", "prefetch", "prefill tok/s", "decode tok/s", "ms/layer (wait)", "hits", "recall", "GB/token", "CPU experts/token",
               "bound tok/s", "efficiency")
    for column in columns:
        table.add_column(column, justify="right")
    for run in r["runs"]:
        recall = run["prefetch_recall"]
        in_place = run["policy"] == "in place"  # no slots: nothing to evict, prefetch or hit
        table.add_row(
            run["policy"] + (" + graphs" if run["cuda_graphs"] else ""), "n/a" if in_place else "on" if run["prefetch"] else "off",
            f"{run['prefill_tok_per_s']:.1f}", f"{run['decode_tok_per_s']:.2f}", f"{run['decode_ms_per_layer']:.2f} ({run['wait_ms_per_layer']:.2f})",
            "n/a" if run["hit_rate"] is None else f"{100 * run['hit_rate']:.1f} %",
            "n/a" if recall is None else f"{100 * recall:.1f} %", f"{run['h2d_bytes_per_token'] / 1e9:.3f}",
            f"{run['experts_on_cpu_per_token']:.2f}",
            *("n/a" if run[key] is None else f"{run[key]:.2f}" for key in ("bound_tok_per_s", "efficiency")),
        )
    console = rich_stderr()
    console.print(table)
    console.print("a decode layer's time: the host's own work (Python, launches) + its waits for the device and the CPU channel; "
                  "meanwhile the device copies and computes experts (their bytes and runs at the channel speeds below):")
    for run in r["runs"]:
        prefetch = "" if run["policy"] == "in place" else f", prefetch {'on' if run['prefetch'] else 'off'}"
        console.print(f"  {run['policy']}{' + graphs' if run['cuda_graphs'] else ''}{prefetch}: {run['decode_ms_per_layer']:.2f} ms = "
                      f"host {run['host_ms_per_layer']:.2f} + wait {run['wait_ms_per_layer']:.2f}; "
                      f"copy {run['copy_ms_per_layer']:.2f}, compute {run['compute_ms_per_layer']:.2f}")
    if r["plan"]["device"] == "cpu":  # one processor: no copy to a device, no second channel
        console.print(f"one expert alone {ch['cpu_expert_ms']:.2f} ms on the CPU ({ch['cpu_threads']} threads, the median of 16 calls; "
                      "a decode layer runs its top-k experts together in one call, beside its attention)")
    else:
        console.print(f"channels: {ch['h2d_gb_per_s']:.1f} GB/s host->{r['plan']['device']} ({'pinned' if ch['pinned'] else 'pageable'}), "
                      f"one expert {ch['device_expert_ms']:.2f} ms on the {r['plan']['device']}, {ch['cpu_expert_ms']:.2f} ms on the CPU "
                      f"({ch['cpu_threads']} threads)")
    if "batch" in r:
        b = r["batch"]
        slots = f"{b['expert_slots']} slots" if b["expert_slots"] else "experts in place"
        console.print(f"{b['sequences']} sequences together: {b['together']['tok_per_s']:.2f} tok/s in all against "
                      f"{b['one']['tok_per_s']:.2f} for one ({b['speedup']:.2f}x); {b['together']['h2d_bytes_per_step'] / 1e9:.3f} GB "
                      f"copied per step against {b['one']['h2d_bytes_per_step'] / 1e9:.3f} ({slots})")
    peer = r["peer"]
    if peer and "ms_per_layer" in peer:
        console.print(f"peer (transformers + accelerate offload, {peer['layers']} layers): {peer['ms_per_layer']:.1f} ms per layer per token; "
                      f"moe-local {r['runs'][0]['decode_ms_per_layer']:.2f} ms: {r['speedup_vs_peer_per_layer']:.1f}x")
    elif peer:
        console.print(f"peer: {peer['skipped']}")


cache_app = typer.Typer(
    help="The quantized-experts cache (MOE_LOCAL_CACHE, default ~/.cache/moe-local): see what it holds, free it.",
    no_args_is_help=True,
)
app.add_typer(cache_app, name="cache")


@cache_app.command("list")
def cache_list(json_output: JsonOutput = False, debug: Debug = False) -> None:
    """List the cached quantized experts: file, format, size and the model folder they were built from."""
    from moe_local.budget import format_bytes
    from moe_local.experts import qcache
    from moe_local.paths import cache_root

    with clean_errors(debug):
        found, root = qcache.entries(), cache_root()
        if json_output:
            print(json.dumps({"folder": str(root), "entries": found}))
            return
        for e in found:
            print(f"{format_bytes(e['bytes']):>11}  {e['format'] or '?':<14} {e['model'] or '(unreadable header)'}\n{'':13}{e['file']}")
        print(f"{len(found)} {'entry' if len(found) == 1 else 'entries'}, {format_bytes(sum(e['bytes'] for e in found))} in {root}")


@cache_app.command("clear")
def cache_clear(debug: Debug = False) -> None:
    """Delete every cached quantization (the next load that needs one quantizes again)."""
    from moe_local.budget import format_bytes
    from moe_local.experts import qcache
    from moe_local.paths import cache_root

    with clean_errors(debug):
        removed, freed, busy = qcache.clear()
        print(f"removed {removed} files, {format_bytes(freed)} freed in {cache_root()}")
        for name in busy:
            stderr(f"kept {name}: a process is building it")


def main() -> None:
    """Run the app; a usage error (unknown flag, bad value) is one line on stderr too, and exit status 2."""
    set_openmp_defaults()  # before any command imports torch, which loads libgomp
    warnings.showwarning = lambda message, *args, **kwargs: stderr(f"warning: {message}")  # one line each
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
