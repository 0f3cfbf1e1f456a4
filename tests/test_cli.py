"""The command line: JSON output on the default target, and one clear line for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from specdecode.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["generate", ""], "prompt"),
        (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", "hi", "--temperature", "-0.5"], "--temperature"),
        (["generate", "hi", "--top-p", "0"], "--top-p"),
        (["generate", "hi", "--top-p", "1.01"], "--top-p"),
        (["generate", "hi", "--top-k", "-1"], "--top-k"),
        (["generate", "hi", "--draft-len", "-2"], "--draft-len"),
        (["generate", "hi", "--target", "/no/such/model"], "--target"),
        (["generate", "hi", "--target", "missing.gguf"], "--target"),
        (["generate", "hi", "--draft", "./no/such/draft"], "--draft"),
        (["serve", "--max-batch", "65"], "--max-batch"),
        (["serve", "--slot-context", "8"], "--slot-context"),
        (["serve", "--max-queue", "0"], "--max-queue"),
        (["serve", "--keep-alive-timeout", "0"], "--keep-alive-timeout"),
        (["serve", "--port", "99999"], "--port"),
    ],
)
def test_bad_input_is_one_clear_line(capsys, argv, flag):
    code, out, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"specdecode: error: {flag}: ")
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [["generate", "hi", "--tree", "maybe"], ["generate", "hi", "--policy", "fast"]])
def test_bad_choice_names_the_option_and_the_choices(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"specdecode: error: {argv[2]}: invalid choice: '{argv[3]}' (choose from")
    assert err.strip().endswith("(see: specdecode generate --help)")


@pytest.mark.parametrize("argv, flag", [(["generate", "hi", "--max-new-tokens", "many"], "--max-new-tokens"),
                                        (["bench"], "the following arguments are required: --dataset"),
                                        (["generate", "hi", "--no-such-option"], "unrecognized arguments")])
def test_a_usage_error_is_one_line_not_the_whole_usage(capsys, argv, flag):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and "usage:" not in err
    assert err.startswith(f"specdecode: error: {flag}")


def test_tokenizer_mismatch_is_refused(capsys, tmp_path, tiny_target):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="b").save_pretrained(tmp_path)
    tiny_target.save_pretrained(tmp_path)
    capsys.readouterr()  # drop save_pretrained's progress output
    code, out, err = run(capsys, "generate", "hi", "--draft", str(tmp_path), "--max-new-tokens", "4")
    assert code == 2
    assert err.startswith("specdecode: error: --draft: the draft model's tokenizer differs")
    assert len(err.strip().splitlines()) == 1


def test_generate_json_on_default_target(capsys):
    code, out, err = run(
        capsys, "generate", "What is the capital of France?", "--json", "--max-new-tokens", "12", "--draft", "ngram",
        "--backend", "torch",
    )
    assert code == 0
    obj = json.loads(out)
    assert "Paris" in obj["text"]
    stats = obj["stats"]
    assert stats["new_tokens"] == len(obj["token_ids"]) <= 12
    assert obj["finish_reason"] == ("length" if len(obj["token_ids"]) == 12 else "stop")
    assert stats["mean_accepted_length"] == pytest.approx(stats["new_tokens"] / stats["steps"])
    assert stats["acceptance_rate"] == (stats["accepted"] / stats["drafted"] if stats["drafted"] else 0.0)
    assert stats["tokens_per_second"] > 0


def test_generate_streams_text_and_writes_trace(capsys, tmp_path):
    trace = tmp_path / "t.jsonl"
    code, out, err = run(capsys, "generate", "Repeat: one two three one two three", "--max-new-tokens", "16",
                         "--trace", str(trace), "--seed", "1")
    assert code == 0 and out.strip()
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    assert lines[0]["type"] == "run" and lines[-1]["type"] == "summary"
    steps = [x for x in lines if x["type"] == "step"]
    assert sum(s["emitted"] for s in steps) == lines[-1]["new_tokens"]
    assert "tok/s" in err


def test_the_command_line_parses_its_options_without_importing_torch():
    # torch's import takes seconds on a small CPU: --help, and subcommands that run no model, skip it
    code = ("import sys; from specdecode.cli import build_parser; "
            "build_parser().parse_args(['generate', 'hi']); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_version_names_the_package_and_the_engine_builds_without_loading_a_model(capsys):
    from specdecode import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    lines = capsys.readouterr().out.splitlines()
    assert exit_.value.code == 0 and lines[0] == f"specdecode {__version__}"
    assert lines[1].startswith("ik_llama.cpp: ") and lines[2].startswith("llama.cpp: ")


def test_serve_on_a_port_in_use_is_one_line_naming_port_before_any_model_loads(capsys, monkeypatch):
    import socket

    from specdecode.server import app

    monkeypatch.setattr(app.ModelSpec, "load", lambda self: pytest.fail("loaded a model"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, out, err = run(capsys, "serve", "--port", str(taken.getsockname()[1]))
    assert code == 2 and err.startswith("specdecode: error: --port: cannot listen on 127.0.0.1:")
    assert "serving" not in out


def test_every_option_with_a_default_says_it_in_its_help():
    import argparse

    from specdecode.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        formatter = command._get_formatter()
        for action in command._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            if action.default not in (None, False, [], argparse.SUPPRESS):
                assert "default" in formatter._get_help_string(action), f"{name} {action.option_strings[0]}"


@pytest.mark.parametrize("env, says", [({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
                                       ({"HF_ENDPOINT": "http://127.0.0.1:1"}, "(127.0.0.1) cannot be reached")])
def test_a_name_that_is_no_path_and_not_cached_fails_at_once_where_the_hub_is_out_of_reach(monkeypatch, env, says):
    from specdecode.config import ConfigError
    from specdecode.models import load_model

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as err:
        load_model("nobody-here/banana", param="draft")
    assert err.value.param == "draft" and says in err.value.message
    assert "'nobody-here/banana' is not a local directory or .gguf file" in err.value.message
