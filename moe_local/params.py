"""What a generation request asks for and what it gets back, as plain data without torch, so that the
server's HTTP process (`server.front`) can check requests and read outputs without importing it:
`SamplingParams`, `max_new_tokens_default`, `Output`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

from moe_local.errors import ConfigError


MAX_SEED = 2**64 - 1


class SamplingRangeError(ValueError):
    """A sampling setting out of its range. Said with the command line's name for it (`top-p must be in
    (0, 1]`); `field` is the dataclass's and the API's name (`top_p`), for the server's error object."""

    def __init__(self, field: str, rule: str):
        super().__init__(f"{field.replace('_', '-')} {rule}")
        self.field, self.rule = field, rule


@dataclass(frozen=True)
class SamplingParams:
    """Defaults as llama.cpp's; a model's generation_config.json overrides them (see `from_generation_config`)."""

    temperature: float = 0.8  # 0 means greedy
    top_k: int = 40  # 0 disables
    top_p: float = 0.95  # 1 disables
    min_p: float = 0.05  # 0 disables
    repeat_penalty: float = 1.0  # 1 disables
    repeat_last_n: int = 64  # how many recent tokens the penalty looks at
    seed: int | None = None  # None: a fresh random one, which `generate` reports in the stats

    def __post_init__(self) -> None:
        checks = [
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_k", self.top_k >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repeat_penalty", self.repeat_penalty > 0, "must be > 0"),
            ("repeat_last_n", self.repeat_last_n >= 0, "must be >= 0"),
            # what torch.Generator.manual_seed takes; past it torch says only "Overflow when unpacking long long"
            ("seed", self.seed is None or 0 <= self.seed <= MAX_SEED, f"must be a whole number from 0 to {MAX_SEED}"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise SamplingRangeError(name, rule)

    def from_generation_config(self, gen: dict, overrides: dict | None = None, flags: bool = False) -> SamplingParams:
        """The model's own defaults where its generation_config.json states them, then `overrides` (the command
        line's flags, checked already). A value of the file's that is not a number or is out of range is an
        error that names the file and the field, unless an override replaces it (`flags`: the error says so)."""
        overrides = overrides or {}
        updates = {"temperature": 0.0} if gen.get("do_sample") is False else {}
        for theirs, ours in GENERATION_CONFIG.items():
            value = gen.get(theirs)
            if value is None or ours in overrides or ours in updates:
                continue
            hint = f" (fix the file, or override it with --{ours.replace('_', '-')})" if flags else " (fix the file)"
            whole = ours == "top_k"
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (whole and value != int(value)):
                raise ConfigError(f"generation_config.json: {theirs} must be {'an integer' if whole else 'a number'}, not {json.dumps(value)}{hint}")
            try:
                replace(self, **{ours: int(value) if whole else float(value)})
            except SamplingRangeError as e:
                raise ConfigError(f"generation_config.json: {theirs} {e.rule}, not {value}{hint}") from None
            updates[ours] = int(value) if whole else float(value)
        return replace(self, **updates, **overrides)


# generation_config.json's sampling fields -> SamplingParams's (do_sample: false means temperature 0)
GENERATION_CONFIG = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "repetition_penalty": "repeat_penalty"}


def max_new_tokens_default(gen: dict, fallback: int | None) -> int | None:
    """generation_config.json's max_new_tokens where it states one (the demo model, which never writes an
    end of text, does), else `fallback`. A value that is not a positive integer is an error that names the field."""
    value = gen.get("max_new_tokens")
    if value is None:
        return fallback
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise ConfigError(f"generation_config.json: max_new_tokens must be a positive integer, not {json.dumps(value)} "
                          "(fix the file, or override it with --max-new-tokens)")
    return int(value)


@dataclass
class Output:
    """What a request receives, in order: text as it is generated, then one last Output with finish_reason
    ("stop": end of text or a stop string; "length": max_tokens or a full context) or error set."""

    text: str = ""
    reasoning: str = ""  # a harmony model's (gpt-oss) other channels: its reasoning, not its answer
    finish_reason: str | None = None
    stop_sequence: str | None = None  # the stop string that ended it (finish_reason "stop"), if one did
    error: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt, whose keys and values a sequence's KV cache already held
    completion_tokens: int = 0
    logprobs: list = field(default_factory=list)  # per generated token (its text in this or an earlier Output): (id, logprob, [(id, logprob), ...])
