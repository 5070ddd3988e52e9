"""One OpenAI answer assembled from the `Batcher`'s Outputs (in the server's HTTP process, without torch): its text,
reasoning, tool calls (read by a `tools.ToolParser`) and logprobs, as a stream's chunks (`Reply.step`) or as the
whole choice (`Reply.whole`), for chat completions and for completions."""

from __future__ import annotations

import secrets
import string

from moe_local.params import Output
from moe_local.tools import Call, Delta, Parsed, Piece, ToolParser, held_back

THINK, UNTHINK = "<think>", "</think>"
GEMMA4_THOUGHT = ("<|channel>thought\n", "<channel|>")  # Gemma 4's thought channel


def thought_markers(template_source: str) -> tuple[str, str] | None:
    """The markers a chat template puts around the model's reasoning: Gemma 4's thought channel, or the <think> tags
    of Qwen3, GLM-4.5 and DeepSeek-V3.1; None where it has neither (a harmony model's channels come apart in the
    engine)."""
    if GEMMA4_THOUGHT[0].rstrip() in template_source:
        return GEMMA4_THOUGHT
    return (THINK, UNTHINK) if UNTHINK in template_source else None


class Thinking:
    """A reasoning model's reasoning between `markers` (<think>...</think>, Gemma 4's <|channel>thought\n...<channel|>)
    split off the answer as it streams: `push(text)` returns (reasoning, answer) now certain. `opened`: the prompt
    ended in the opening marker (the template opened the reasoning); else the answer may begin with it. The newlines
    around the answer's start are not the answer's."""

    def __init__(self, opened: bool, markers: tuple[str, str] = (THINK, UNTHINK)):
        self.state = "thinking" if opened else "start"  # -> "answer"
        self.open, self.close = markers
        self.held = ""

    def push(self, text: str, final: bool = False) -> tuple[str, str]:
        text, self.held = self.held + text, ""
        reasoning = ""
        if self.state == "start":
            begun = text.lstrip()
            if begun.startswith(self.open):
                self.state, text = "thinking", begun[len(self.open):]
            elif self.open.startswith(begun) and not final:  # may be the start of the opening marker
                self.held = text
                return "", ""
            else:
                self.state = "answer"
        if self.state == "thinking":
            end = text.find(self.close)
            if end < 0:
                keep = 0 if final else held_back(text, self.close)
                self.held = text[len(text) - keep:]
                return text[: len(text) - keep], ""
            reasoning, text, self.state = text[:end], text[end + len(self.close):], "after"
        if self.state == "after":  # the newlines between the closing marker and the answer
            text = text.lstrip("\n")
            if not text:
                return reasoning, ""
            self.state = "answer"
        return reasoning, text


class Reader:
    """What the model wrote, read as it streams: its reasoning split off by `thinking` (where the answer is read for
    it), then its calls read by `parser` (where tools were offered); `hidden`: special tokens not to show in the
    answer (the text has them written where `thinking` or `parser` reads it). `push` or `whole`, not both."""

    def __init__(self, parser: ToolParser | None, thinking: Thinking | None, hidden: frozenset[str] = frozenset()):
        self.parser, self.thinking, self.hidden = parser, thinking, sorted(hidden, key=len, reverse=True)

    def push(self, text: str, final: bool) -> Delta:
        reasoning = ""
        if self.thinking is not None:
            reasoning, text = self.thinking.push(text, final)
        if self.parser is None:
            return Delta(self.shown(text), reasoning)
        said = self.parser.push(text, final)
        return Delta(said.content, reasoning + said.reasoning, said.pieces)

    def whole(self, text: str) -> Parsed:
        reasoning = ""
        if self.thinking is not None:
            reasoning, text = self.thinking.push(text, final=True)
        if self.parser is None:
            return Parsed(self.shown(text), reasoning)
        said = self.parser.parse(text)
        return Parsed(said.content, reasoning + said.reasoning, said.calls)

    def shown(self, text: str) -> str:
        for token in self.hidden:
            text = text.replace(token, "")
        return text


def call_id() -> str:
    # nine letters and digits: what Mistral's templates require of a call's id, and any other client takes
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


def openai_calls(calls: list[Call]) -> list[dict]:
    return [{"id": call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


class Reply:
    """`chat`: a chat completion's choice (message / delta), else a completion's (text). `pieces[id]`: each token's
    text, for logprobs; `top`: how many alternatives each token's logprobs list (None: no logprobs); `parser`,
    `thinking`, `hidden`: how the text is read (see `Reader`), where it is."""

    def __init__(self, chat: bool, parser: ToolParser | None = None, top: int | None = None, pieces: list[bytes] | None = None,
                 thinking: Thinking | None = None, hidden: frozenset[str] = frozenset()):
        self.chat, self.parser, self.top, self.pieces, self.thinking = chat, parser, top, pieces, thinking
        self.reader = Reader(parser, thinking, hidden) if parser is not None or thinking is not None else None
        self.calls = 0  # calls begun in the stream so far
        self.offset = 0  # characters of text so far (a completion's logprobs give each token's offset)

    # --- streamed ---------------------------------------------------------------------------------------------------

    def step(self, output: Output) -> dict | None:
        """The chunk's choice for `output` (the last one has finish_reason); None when it says nothing yet."""
        text, reasoning, calls = output.text, output.reasoning, []
        if self.reader is not None:
            said = self.reader.push(output.text, final=output.finish_reason is not None)
            text, reasoning = said.content, reasoning + said.reasoning
            calls = [self.tool_call(piece) for piece in said.pieces]
        reason = self.reason(output.finish_reason, self.calls)
        logprobs = self.logprobs(output.logprobs)
        if not (text or reasoning or calls or reason or logprobs):
            return None
        if not self.chat:
            return self.completion(text, reason, logprobs)
        delta = ({"content": text} if text else {}) | ({"reasoning_content": reasoning} if reasoning else {})
        delta |= {"tool_calls": calls} if calls else {}
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}

    def tool_call(self, piece: Piece) -> dict:
        """OpenAI's delta of a call: the first with its id, type and name, then its arguments as they come."""
        if piece.name is None:
            return {"index": piece.index, "function": {"arguments": piece.arguments}}
        self.calls += 1
        return {"index": piece.index, "id": call_id(), "type": "function", "function": {"name": piece.name, "arguments": piece.arguments}}

    # --- whole --------------------------------------------------------------------------------------------------------

    def whole(self, outputs: list[Output]) -> dict:
        last = outputs[-1]
        text, reasoning = "".join(o.text for o in outputs), "".join(o.reasoning for o in outputs)
        logprobs = self.logprobs([entry for o in outputs for entry in o.logprobs])
        if not self.chat:
            return self.completion(text, last.finish_reason, logprobs)
        calls = []
        if self.reader is not None:
            said = self.reader.whole(text)
            text, reasoning, calls = said.content, reasoning + said.reasoning, openai_calls(said.calls)
        message = {"role": "assistant", "content": text or (None if calls else "")}
        message |= ({"reasoning_content": reasoning} if reasoning else {}) | ({"tool_calls": calls} if calls else {})
        return {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": self.reason(last.finish_reason, len(calls))}

    # --- parts ----------------------------------------------------------------------------------------------------------

    @staticmethod
    def reason(finish_reason: str | None, calls: int) -> str | None:
        return "tool_calls" if calls and finish_reason == "stop" else finish_reason

    def completion(self, text: str, reason: str | None, logprobs: dict | None) -> dict:
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def piece(self, token: int) -> tuple[str, list[int]]:
        data = self.pieces[token] if 0 <= token < len(self.pieces) else b""
        if data.startswith(b"\xff"):  # a special token: its text, as the tokenizer writes it
            data = data[1:]
        return data.decode("utf-8", "replace"), list(data)

    def logprobs(self, entries: list[tuple]) -> dict | None:
        """OpenAI's logprobs object of the tokens `entries` ((id, logprob, [(id, logprob), ...]) each)."""
        if self.top is None or (not entries and self.chat):
            return None
        if self.chat:
            def item(token, logprob):
                text, data = self.piece(token)
                return {"token": text, "logprob": logprob, "bytes": data}
            return {"content": [item(t, lp) | {"top_logprobs": [item(i, v) for i, v in others]} for t, lp, others in entries],
                    "refusal": None}
        tokens, offsets = [], []
        for t, _, _ in entries:
            tokens.append(self.piece(t)[0])
            offsets.append(self.offset)
            self.offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{self.piece(i)[0]: v for i, v in others} for _, _, others in entries], "text_offset": offsets}
