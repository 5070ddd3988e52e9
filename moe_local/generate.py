"""Generation: `logits -> probs -> token` under `SamplingParams` (`params.py`), stop strings, and the decode
loop with its timings."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Protocol

import torch

from moe_local.errors import MoeLocalError
from moe_local.params import SamplingParams

if TYPE_CHECKING:
    from moe_local.grammar import Constraint


class Stepper(Protocol):
    """What the decode loop needs of a model (`engine.Engine` is one), named here so that this module, which the
    engine imports, does not import it back."""

    ctx_size: int
    experts: Any  # its `stats`: reset() before a request, as_dict() after

    def prefill(self, ids: list[int], *, marks: tuple[int, ...] = ()) -> tuple[torch.Tensor, int]: ...

    def decode_one(self, token: int) -> torch.Tensor: ...


class StopStrings:
    """Ends a streamed text at the first of some strings (`--stop`): `push` returns what can be shown now,
    holding back an end that could be the start of one, and sets `stopped` when one appears."""

    def __init__(self, strings: list[str]):
        self.strings = [s for s in strings if s]
        self.stopped: str | None = None  # the string that ended the text
        self._held = ""

    def push(self, text: str) -> str:
        held = self._held + text
        found = [(i, s) for s in self.strings if (i := held.find(s)) >= 0]
        if found:
            at, self.stopped = min(found, key=lambda f: f[0])
            self._held = ""
            return held[:at]
        # the longest end of `held` that begins some stop string stays held back
        keep = max((n for s in self.strings for n in range(1, len(s)) if held.endswith(s[:n])), default=0)
        self._held = held[len(held) - keep :]
        return held[: len(held) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def apply_repeat_penalty(logits: torch.Tensor, history: list[int], params: SamplingParams) -> torch.Tensor:
    """llama.cpp's rule: divide positive logits of recently seen tokens by the penalty, multiply negative ones."""
    if params.repeat_penalty == 1.0 or not history or params.repeat_last_n == 0:
        return logits
    recent = torch.tensor(sorted(set(history[-params.repeat_last_n :])), dtype=torch.long)
    seen = logits[recent]
    logits = logits.clone()
    logits[recent] = torch.where(seen > 0, seen / params.repeat_penalty, seen * params.repeat_penalty)
    return logits


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [V] fp32 (after the penalty) -> probabilities [V] after temperature, top-k, top-p, min-p."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # drop a token when the tokens ranked above it already reach top_p; the first always stays
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return probs / probs.sum()


def sample(logits: torch.Tensor, history: list[int], params: SamplingParams, generator: torch.Generator,
           allowed: torch.Tensor | None = None) -> int:
    """The next token; `allowed` [V] bool: only these (a grammar's, `grammar.Constraint`)."""
    logits = logits.float().cpu()  # [V]
    if not torch.isfinite(logits).all():  # else argmax picks a NaN and multinomial raises about "probability tensor"
        raise MoeLocalError(
            "the model produced NaN or infinite logits: its weights may be damaged, or the compute dtype overflows "
            "(try --dtype bf16 or fp32)"
        )
    logits = apply_repeat_penalty(logits, history, params)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if params.temperature == 0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(logits_to_probs(logits, params), 1, generator=generator))


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_tokens_evaluated: int = 0  # the rest came from the KV cache of an earlier turn
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0
    finish_reason: str = ""  # "stop" (EOS), "length" (max new tokens), "context" (no position left)
    seed: int | None = None  # the sampler's seed: given, or drawn when none was
    experts: dict = field(default_factory=dict)

    @property
    def prompt_tok_per_s(self) -> float:
        return self.prompt_tokens_evaluated / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tok_per_s(self) -> float:
        # the first generated token comes from the prefill's logits, so decode time covers the others
        return (self.generated_tokens - 1) / self.decode_seconds if self.decode_seconds and self.generated_tokens > 1 else 0.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "prompt_tokens_evaluated": self.prompt_tokens_evaluated,
            "prompt_seconds": round(self.prompt_seconds, 4),
            "prompt_tok_per_s": round(self.prompt_tok_per_s, 2),
            "generated_tokens": self.generated_tokens,
            "decode_seconds": round(self.decode_seconds, 4),
            "decode_tok_per_s": round(self.decode_tok_per_s, 2),
            "finish_reason": self.finish_reason,
            "seed": self.seed,
            "experts": self.experts,
        }


def generate(
    engine: Stepper,
    prompt: list[int],
    max_new_tokens: int,
    params: SamplingParams,
    stop_ids: set[int],
    stats: GenerationStats,
    marks: tuple[int, ...] = (),
    constraint: Constraint | None = None,
) -> Iterator[int]:
    """Yield generated token ids one by one (EOS is not yielded); `stats` is filled as it goes. `marks`: where in
    the prompt to keep a snapshot of a recurrent state on the way (`Engine.prefill`). With a `constraint` (`run
    --json-schema`), only tokens its grammar allows, until it is complete."""
    # an unseeded run draws its seed here (not torch.seed(), which would reseed the global generator) and
    # reports it, so that `--seed` can repeat it
    stats.seed = params.seed if params.seed is not None else secrets.randbits(63)
    generator = torch.Generator().manual_seed(stats.seed)
    engine.experts.stats.reset()
    stats.prompt_tokens = len(prompt)
    history = list(prompt)
    start = time.perf_counter()
    logits, stats.prompt_tokens_evaluated = engine.prefill(prompt, marks=marks)
    allowed = constraint.allowed if constraint is not None else lambda: None
    token = sample(logits, history, params, generator, allowed())  # the .cpu() in sample waits for the device
    stats.prompt_seconds = time.perf_counter() - start
    start = time.perf_counter()
    stats.finish_reason = "length"
    while stats.generated_tokens < max_new_tokens:
        if token in stop_ids:
            stats.finish_reason = "stop"
            break
        stats.generated_tokens += 1
        history.append(token)
        yield token
        if constraint is not None:
            constraint.accept(token)
            if constraint.done:  # the grammar takes nothing more but an end of text
                stats.finish_reason = "stop"
                break
        if stats.generated_tokens == max_new_tokens:
            break
        if len(history) > engine.ctx_size:  # no position left in the KV cache to feed this token at
            stats.finish_reason = "context"
            break
        token = sample(engine.decode_one(token), history, params, generator, allowed())
        stats.decode_seconds = time.perf_counter() - start
    stats.experts = engine.experts.stats.as_dict()
