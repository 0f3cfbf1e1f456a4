"""A GGUF file's tokenizer without transformers: its ``tokenizer.json`` run by the ``tokenizers``
library (the object transformers' fast tokenizers wrap) and its chat template rendered as
transformers renders it. Importing transformers takes seconds, most of a llama.cpp target's
start-up; this takes tens of milliseconds.

It answers the part of transformers' tokenizer interface this package uses (calling it on text,
``decode``, ``apply_chat_template``, ``chat_template``, ``eos_token_id``, ``get_vocab``,
``len``), with the same ids and text (tests/test_tokenizer.py compares the two).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Encoding(dict):
    """``{"input_ids": [...]}``, also readable as ``.input_ids`` (as transformers' BatchEncoding)."""

    @property
    def input_ids(self) -> list[int]:
        return self["input_ids"]


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken's dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _template_environment():
    """A sandboxed Jinja environment with the settings and helpers transformers gives chat templates."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    # transformers' own ``dict`` and ``namespace`` differ from Jinja's only in refusing what a
    # sandbox escape needs; the immutable sandbox refuses that already
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class LightTokenizer:
    """The tokenizer saved in ``directory`` (``tokenizer.json``, ``tokenizer_config.json`` and, where
    the template is kept apart, ``chat_template.jinja``)."""

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer

        self.directory = directory = Path(directory)
        try:
            self._tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
            config = json.loads((directory / "tokenizer_config.json").read_text())
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"could not read the tokenizer in {directory}: {exc}") from exc
        template_file = directory / "chat_template.jinja"
        self.chat_template = template_file.read_text() if template_file.is_file() else config.get("chat_template")
        self.special_tokens = {name: text for name in SPECIAL_TOKENS if (text := _token_text(config.get(name)))}
        self.eos_token = self.special_tokens.get("eos_token")
        self.eos_token_id = None if self.eos_token is None else self._tokenizer.token_to_id(self.eos_token)
        # as transformers decodes: its space clean-up, made for WordPiece, is skipped for BPE models
        # (it would strip spaces the text has) unless the config insists
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(self._tokenizer.model).__name__ != "BPE"
            or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)))
        self._template = None

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, text: str, add_special_tokens: bool = True) -> Encoding:
        return Encoding(input_ids=self.encode(text, add_special_tokens))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self.clean_up_tokenization_spaces else text

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = True):
        """The chat template over ``messages`` (ids, or the text with ``tokenize=False``); the
        rendered text is tokenized without adding special tokens, as transformers does."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        if self._template is None:
            self._template = _template_environment().from_string(self.chat_template)
        text = self._template.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self.special_tokens)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _clean_up_spaces(text: str) -> str:
    """transformers' ``clean_up_tokenization``: no space before punctuation and English contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text
