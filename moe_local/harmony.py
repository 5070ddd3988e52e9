"""gpt-oss's harmony format: which tokenizers speak it, and `ChannelStream`, which splits what the model generates
into its channels as the ids stream: the answer (`final`) and the reasoning (`analysis`, and `commentary`)."""

from __future__ import annotations

from typing import Callable

from moe_local.tokenizer import StreamDecoder, Tokenizer

START, CHANNEL, CONSTRAIN, MESSAGE = "<|start|>", "<|channel|>", "<|constrain|>", "<|message|>"
# What ends a message: <|end|> (another message follows: the model goes on), <|return|> (the answer is done),
# <|call|> (a tool call). Only the last two end generation (generation_config.json's eos_token_id).
END, RETURN, CALL = "<|end|>", "<|return|>", "<|call|>"


def is_harmony(tokenizer: Tokenizer) -> bool:
    """Whether the model answers in harmony messages: its tokenizer has their tokens and its chat template writes them."""
    tokens = (START, CHANNEL, MESSAGE, END)
    return all(tokenizer.token_id(t) is not None for t in tokens) and CHANNEL in tokenizer.template_source


class ChannelStream:
    """Reads what a harmony model generates after the prompt's `<|start|>assistant`: messages, each a header
    (`<|channel|>analysis`, perhaps a recipient `to=functions.f` or `<|constrain|>json`), `<|message|>`, the text,
    and an end token; the next message starts with `<|start|>assistant`. Used as a `StreamDecoder` is: `push`
    returns the text the answer (the final channel) gains; the text of the other channels, the reasoning, goes to
    `on_reasoning` as it comes, with a newline after each message. Headers are not text of either."""

    def __init__(self, tokenizer: Tokenizer, on_reasoning: Callable[[str], None] = lambda text: None):
        self._tokenizer, self.on_reasoning = tokenizer, on_reasoning
        self._start, self._channel, self._constrain, self._message = map(tokenizer.token_id, (START, CHANNEL, CONSTRAIN, MESSAGE))
        self._ends = {tokenizer.token_id(t) for t in (END, RETURN, CALL)}
        self._header: list[int] = []  # the current header's ids after <|start|>
        self._body: StreamDecoder | None = None  # inside a message's text
        self.channel: str | None = None  # the channel of the message being read; None in a header
        self.answer = ""
        self._reasoning: list[str] = []  # each reasoning message's text

    @property
    def reasoning(self) -> str:
        return "\n".join(self._reasoning)

    def push(self, token: int) -> str:
        if self._body is None:
            if token == self._message:
                self.channel, self._body = self._channel_name(), StreamDecoder(self._tokenizer)
                if self.channel != "final":
                    self._reasoning.append("")
            elif token == self._start:
                self._header = []
            else:
                self._header.append(token)
            return ""
        if token in self._ends or token == self._start:  # a <|start|> with no <|end|> before it ends the message too
            return self._close()
        return self._add(self._body.push(token))

    def flush(self) -> str:
        """The rest of the answer's text, at the end of generation (which may cut a message short)."""
        return self._close() if self._body is not None else ""

    def _channel_name(self) -> str:
        # "<|channel|>commentary to=functions.f <|constrain|>json": the word after the last <|channel|>. A header
        # with none breaks the format; its text is shown as the answer rather than lost.
        if self._channel not in self._header:
            return "final"
        after = self._header[len(self._header) - self._header[::-1].index(self._channel) :]
        if self._constrain in after:
            after = after[: after.index(self._constrain)]
        words = self._tokenizer.decode(after).split()
        return words[0] if words else "final"

    def _add(self, text: str) -> str:
        if self.channel == "final":
            self.answer += text
            return text
        if text:
            self._reasoning[-1] += text
            self.on_reasoning(text)
        return ""

    def _close(self) -> str:
        text = self._add(self._body.flush())
        if self.channel != "final" and self._reasoning[-1] and not self._reasoning[-1].endswith("\n"):
            self.on_reasoning("\n")  # the answer, or the next message, starts on a line of its own
        self._body, self.channel, self._header = None, None, []
        return text


def split_channels(tokenizer: Tokenizer, ids: list[int]) -> tuple[str, str]:
    """(answer, reasoning) of a whole generated harmony reply."""
    stream = ChannelStream(tokenizer)
    for token in ids:
        stream.push(token)
    stream.flush()
    return stream.answer, stream.reasoning
