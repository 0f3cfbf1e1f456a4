"""The GGUF target's tokenizer without transformers (``LightTokenizer``) gives what transformers'
tokenizer of the same file gives: ids, chat-template text and ids, decoded text, vocabulary."""

from __future__ import annotations

import json
import random

import pytest

from specdecode.models import default_gguf_path, gguf_tokenizer
from specdecode.tokenizer import LightTokenizer, _template_environment

TEXTS = [
    "Hello, world!",
    "  leading spaces, trailing spaces  ",
    "Don't stop; it's 3.14159 - isn't it? Yes , it is .",
    "Zürich, naïve café, 東京, emoji 🙂, Ελληνικά, עברית",
    "def f(x):\n\treturn x ** 2  # tabs and newlines\n\n\n",
    "special tokens in text: <|im_start|>user\nhi<|im_end|> <|endoftext|>",
    "",
]
CHATS = [
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke\nwith two lines."}],
    [{"role": "user", "content": "  spaces  \n\n and blank lines \n"}],
]


@pytest.fixture(scope="module")
def pair():
    from transformers import AutoTokenizer

    path = default_gguf_path()
    light = gguf_tokenizer(path, "target")
    hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return light, hf


def test_ids_vocabulary_and_specials_match_transformers(pair):
    light, hf = pair
    assert isinstance(light, LightTokenizer)
    for text in TEXTS:
        assert light(text).input_ids == hf(text).input_ids, text
        assert light(text, add_special_tokens=False)["input_ids"] == hf(text, add_special_tokens=False)["input_ids"]
    assert len(light) == len(hf) and light.get_vocab() == hf.get_vocab()
    assert light.eos_token_id == hf.eos_token_id and light.chat_template == hf.chat_template


def test_chat_template_matches_transformers(pair):
    light, hf = pair
    for chat in CHATS:
        for opened in (True, False):
            want_text = hf.apply_chat_template(chat, add_generation_prompt=opened, tokenize=False)
            assert light.apply_chat_template(chat, add_generation_prompt=opened, tokenize=False) == want_text
            want = hf.apply_chat_template(chat, add_generation_prompt=opened, tokenize=True)
            want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "input_ids") else want
            assert light.apply_chat_template(chat, add_generation_prompt=opened) == list(want)


# blocks on lines of their own (trim_blocks, lstrip_blocks), tojson on non-ASCII and HTML characters,
# a special token's variable, a namespace and loop controls: what templates on the Hub rely on
TEMPLATE = """{% set ns = namespace(turns=0) %}
{% for message in messages %}
    {% if message['role'] == 'system' %}
System: {{ message['content'] }}
    {% else %}
{{ message['role'] | capitalize }}: {{ message['content'] | tojson }}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
    {% if ns.turns > 5 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
Assistant ({{ ns.turns }} turns):{{ ' ' }}{{ eos_token }}
{% endif %}
"""
HTML_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "café <b>&</b> 東京"}]


def test_a_template_renders_as_transformers_renders_it(pair, tmp_path):
    """On a template whose text depends on the environment's settings and filters: the same text
    and ids as transformers; a default Jinja environment renders other text (the control)."""
    import shutil

    import jinja2

    light, hf = pair
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(light.directory / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text(TEMPLATE)
    custom = LightTokenizer(tmp_path)
    for chat in CHATS + [HTML_CHAT]:
        want = hf.apply_chat_template(chat, chat_template=TEMPLATE, add_generation_prompt=True, tokenize=False)
        assert custom.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == want
        want_ids = hf(want, add_special_tokens=False).input_ids
        assert custom.apply_chat_template(chat, add_generation_prompt=True) == want_ids
    assert _template_environment().trim_blocks
    control = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).from_string(TEMPLATE)
    want = hf.apply_chat_template(HTML_CHAT, chat_template=TEMPLATE, add_generation_prompt=True, tokenize=False)
    assert control.render(messages=HTML_CHAT, add_generation_prompt=True, **custom.special_tokens) != want


def test_decoding_matches_transformers(pair):
    light, hf = pair
    rng = random.Random(0)
    sequences = [hf(text).input_ids for text in TEXTS]
    sequences += [hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in CHATS]
    sequences = [s if isinstance(s, list) else hf(s, add_special_tokens=False).input_ids for s in sequences]
    sequences += [[rng.randrange(len(hf)) for _ in range(rng.randrange(1, 40))] for _ in range(200)]
    for ids in sequences:
        for skip in (True, False):
            assert light.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids


def test_tokenization_space_clean_up_is_decided_as_transformers_decides(tmp_path):
    # transformers' clean-up (no space before punctuation and contractions) is skipped for a BPE
    # model such as the default target's unless its config insists; the default's asks for none
    from transformers import AutoTokenizer

    source = gguf_tokenizer(default_gguf_path(), "target").directory
    text = "Wait , what ? I 'm sure it 's fine ! They 're here , we 've seen it . Don 't ."
    insist = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"
    decoded = {}
    for name, config in (("asks", {"clean_up_tokenization_spaces": True}),
                         ("insists", {"clean_up_tokenization_spaces": True, insist: True})):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
        light, hf = LightTokenizer(directory), AutoTokenizer.from_pretrained(directory)
        ids = hf(text, add_special_tokens=False).input_ids
        decoded[name] = light.decode(ids)
        assert decoded[name] == hf.decode(ids), name
    assert decoded["asks"] == text and decoded["insists"] != text  # control: each way was taken


def test_a_broken_tokenizer_directory_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer"):
        LightTokenizer(tmp_path)
