"""Between text and token ids: chat templates, end-of-sequence ids, stop strings, and text
streamed from a growing list of ids."""

from __future__ import annotations


def eos_token_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def chat_token_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The chat template applied to ``messages``, with the assistant's turn opened."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # newer tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(stops)
        self.longest = max((len(s) for s in self.stops), default=0)

    def find(self, text: str, start: int) -> int | None:
        """Earliest index where a stop string begins at or after ``start`` - (longest - 1)."""
        lo = max(0, start - self.longest + 1)
        hits = [i for i in (text.find(s, lo) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def holdback(self, text: str) -> int:
        """Characters at the end of ``text`` that could be the start of a stop string."""
        for k in range(min(self.longest - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


class Detokenizer:
    """Incremental text from growing token ids: never emits a partial UTF-8 character or text
    that may turn out to belong to a stop string."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.sent = 0  # characters of the decoded text already emitted
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def advance(self, generated: list[int], stop: StopMatcher) -> tuple[str, int | None]:
        """Return (text safe to emit now, index in ``generated`` to cut at if a stop string completed)."""
        previous = len(self.text)
        self.text = self._decode(generated)
        if stop.stops:
            at = stop.find(self.text, previous)
            if at is not None:
                # the shortest prefix of tokens whose text contains the stop string
                cut = len(generated)
                while cut > 0 and stop.find(self._decode(generated[: cut - 1]), 0) is not None:
                    cut -= 1
                self.text = self.text[:at]
                out = self.text[self.sent :]
                self.sent = len(self.text)
                return out, cut
        safe = len(self.text)
        if self.text.endswith("\ufffd"):
            safe -= 1  # an incomplete multi-byte character; wait for its remaining bytes
        safe -= stop.holdback(self.text[:safe])
        out = self.text[self.sent : max(safe, self.sent)]
        self.sent = max(safe, self.sent)
        return out, None

    def flush(self) -> str:
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out


class Output:
    """What one generation has emitted so far: token ids, the text streamed from them, and why it
    finished. End-of-sequence ids, stop strings and the token limit are applied here, for every
    engine alike."""

    def __init__(self, tokenizer, eos_ids: set[int], stops: tuple[str, ...], max_new_tokens: int,
                 ignore_eos: bool = False):
        self.tokens: list[int] = []
        self.eos_ids = set() if ignore_eos else set(eos_ids)
        self.stop = StopMatcher(stops)
        self.text = Detokenizer(tokenizer)
        self.max_new_tokens = max_new_tokens
        self.finish: str | None = None  # "stop" or "length" once finished

    @property
    def left(self) -> int:
        return self.max_new_tokens - len(self.tokens)

    def add(self, new: list[int]) -> tuple[list[int], str]:
        """Append a step's tokens; return those kept (cut after an end-of-sequence id or the token
        that completed a stop string) and the text safe to stream now (all of it once finished)."""
        for i, tok in enumerate(new):
            if tok in self.eos_ids:
                new, self.finish = new[: i + 1], "stop"
                break
        before = len(self.tokens)
        self.tokens.extend(new)
        delta, stopped_at = self.text.advance(self.tokens, self.stop)
        if stopped_at is not None:  # drop tokens after the one that completed the stop string
            del self.tokens[stopped_at:]
            new = self.tokens[before:]
            self.finish = "stop"
        if self.finish is None and len(self.tokens) >= self.max_new_tokens:
            self.finish = "length"
        if self.finish is not None:
            delta += self.text.flush()
        return new, delta
