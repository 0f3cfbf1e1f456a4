"""bench's table and JSON on a small model; train-draft end to end on a tiny model; the shipped head."""

import json
import re
from types import SimpleNamespace

import pytest
import torch

from specdecode import GenerationConfig
from specdecode.api import SHIPPED_HEAD, make_drafter
from specdecode.bench import BenchSettings, PromptResult, format_table, run_bench, summarize, write_plots
from specdecode.cli import main
from specdecode.config import ConfigError
from specdecode.drafters.base import NoDrafter
from specdecode.drafters.head_file import target_fingerprint
from specdecode.engine import SpeculativeDecoder
from specdecode.models import load_model

from conftest import DEVICES, assert_drawn, perturbed


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_target, tokenizer):
    d = tmp_path_factory.mktemp("tiny")
    tiny_target.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def bench_run(tiny_dir, dataset, config: GenerationConfig | None = None, **kw):
    settings = dict(dataset=str(dataset), limit=2, compare="hf", progress=False, target=tiny_dir and str(tiny_dir),
                    draft="ngram", device="cpu")
    settings.update(kw)
    config = config or GenerationConfig(max_new_tokens=12, draft_len=4, ignore_eos=True)
    return run_bench(BenchSettings(**settings), config)


def test_bench_table_and_json(tiny_dir, tmp_path, capsys):
    data = tmp_path / "q.jsonl"
    rows = [
        {"question_id": i, "category": c, "turns": [f"Repeat: a b c a b c {i}"]}
        for i, c in enumerate(["x", "x", "x", "y"])
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    summary = bench_run(tiny_dir, data)
    assert set(summary["categories"]) == {"x", "y"}
    assert summary["categories"]["x"]["prompts"] == 2  # --limit per category
    assert summary["overall"]["prompts"] == 3
    for block in [summary["overall"], *summary["categories"].values()]:
        tps = block["tokens_per_second"]
        assert block["speedup"] == pytest.approx(tps / block["baseline_tokens_per_second"])
        assert block["ratio_vs_hf"] == pytest.approx(tps / block["hf_tokens_per_second"])
        assert block["efficiency"] == pytest.approx(block["speedup"] / block["predicted_speedup"])
        assert 0.0 <= block["acceptance_rate"] <= 1.0 and block["draft_cost_ratio"] >= 0.0
        assert block["greedy_match"] is True
        assert block["mean_accepted_tokens"] >= 1.0
    assert summary["cost_model"]["target_pass_ms"]
    for block in [summary["overall"], *summary["categories"].values()]:  # a prefix of counts never growing
        reached = block["reached_by_position"]
        assert len(reached) == len(block["acceptance_by_position"]) and reached == sorted(reached, reverse=True)
    plots = write_plots(summary, tmp_path)
    assert [p.name for p in plots] == ["speedup_by_category.png", "acceptance_by_position.png"]
    for p in plots:
        assert_drawn(p)
    table = format_table(summary)
    assert "overall" in table and "vs hf" in table
    code = main(["bench", "--dataset", str(data), "--target", str(tiny_dir), "--categories", "nope"])
    assert code == 2 and "--categories: unknown nope" in capsys.readouterr().err


def test_bench_honours_ignore_eos_and_stop(default_target, tmp_path):
    """bench decodes with the settings generate would use: a short answer ends at EOS unless
    --ignore-eos, and --stop cuts a long one at the first stop string (for every contender)."""
    def tokens(question, **kw):
        data = tmp_path / "q.jsonl"
        data.write_text(json.dumps({"question_id": 1, "category": "x", "turns": [question]}))
        config = GenerationConfig(max_new_tokens=40, draft_len=4, ignore_eos=kw.get("ignore_eos", False),
                                  stop=tuple(kw.get("stop", ())))
        summary = bench_run(None, data, config, compare=None, backend="torch")  # the lengths below are torch's
        assert summary["overall"]["greedy_match"] is True
        return summary["prompts"][0]["tokens"], summary["config"]

    short = "Answer with one word: what colour is the sky on a clear day?"
    assert tokens(short, ignore_eos=False)[0] < 40  # the answer ends by itself
    n, config = tokens(short, ignore_eos=True)
    assert n == 40 and config["ignore_eos"] is True
    long = "Write three sentences about the sea."
    assert tokens(long, ignore_eos=False)[0] == 40
    n, config = tokens(long, ignore_eos=False, stop=["."])
    assert n < 40 and config["stop"] == ["."]


def test_calibration_survives_a_stall_of_the_machine():
    """bench's pass-time curve: a stall lasting four passes in a row spoils at most one of each
    size's five timings, so every size keeps its true cost. (Measured size by size, as before,
    three of the five timings of one size were stalled and its median with them.)"""
    from specdecode.costmodel import measure_target_curve

    now, calls = [0.0], [0]

    class Runner:
        def reset(self):
            pass

        def truncate(self, n):
            pass

        def forward(self, ids, num_logits=1):
            calls[0] += 1
            now[0] += 0.010 + 0.001 * len(ids)
            if 20 <= calls[0] < 24:
                now[0] += 0.5

    curve = measure_target_curve(Runner(), n_max=4, context=8, reps=5, clock=lambda: now[0])
    assert calls[0] == 1 + 6 * 4
    assert curve == {n: pytest.approx(0.010 + 0.001 * n) for n in range(1, 5)}


@pytest.mark.parametrize("device", DEVICES)
def test_train_draft_tiny_run_loads_and_is_refused_elsewhere(tiny_dir, tmp_path, tiny_target, tokenizer, default_target,
                                                              capsys, device):
    out = tmp_path / "head"
    args = ["train-draft", "--target", str(tiny_dir), "--out", str(out), "--prompts", "6", "--varied-prompts", "3",
            "--max-new-tokens", "12", "--batch", "3", "--batch-tokens", "128", "--draft-vocab", "512", "--depth", "2",
            "--device", device]
    assert main(args + ["--broad-prompts", "0", "--epochs", "2"]) == 0
    first = json.loads((out / "config.json").read_text())["history"]
    assert [h["epoch"] for h in first] == [0, 1, 2]
    # a round added later continues from the checkpoint with a schedule of its own, and needs epochs to do it in
    capsys.readouterr()
    assert main(args + ["--broad-prompts", "6", "--epochs", "2"]) == 2
    assert "--epochs: the checkpoint has 2 epochs already" in capsys.readouterr().err
    assert main(args + ["--broad-prompts", "6", "--epochs", "3"]) == 0
    assert "on new data" in capsys.readouterr().err
    assert len((out / "work" / "answers_4.jsonl").read_text().splitlines()) == 6
    config = json.loads((out / "config.json").read_text())
    history = config["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 2, 3] and history[3]["new_data"] == config["train_sequences"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]  # training lowered the loss
    mode = {name: (out / name).stat().st_mode & 0o777 for name in ("model.safetensors", "config.json")}
    assert mode["model.safetensors"] == mode["config.json"], mode  # not left 0600 by safetensors
    target = load_model(str(tiny_dir), device=device, dtype="float32")
    drafter = make_drafter(str(out), target)
    dec = SpeculativeDecoder(target.model, target.tokenizer, drafter)
    plain = SpeculativeDecoder(target.model, target.tokenizer, NoDrafter())
    cfg = GenerationConfig(max_new_tokens=20, policy="fixed", draft_len=3, ignore_eos=True)
    # the head follows its target to the CPU and into bfloat16 (a GPU's default): same fingerprint, it drafts there
    for elsewhere in (
        load_model(str(tiny_dir), device="cpu"),
        load_model(str(tiny_dir), device=device, dtype="bfloat16"),
    ):
        assert target_fingerprint(elsewhere.model) == target_fingerprint(target.model)
        got = SpeculativeDecoder(elsewhere.model, elsewhere.tokenizer, make_drafter(str(out), elsewhere)).generate(
            "The cat", cfg
        )
        assert len(got.token_ids) == 20 and got.stats.drafted > 0
    assert target_fingerprint(perturbed(tiny_target, 0.01, seed=5)) != target_fingerprint(
        tiny_target
    )  # negative control
    got = dec.generate("The cat sat on the mat", cfg)
    assert got.token_ids == plain.generate("The cat sat on the mat", cfg).token_ids
    assert got.stats.drafted > 0
    hybrid = make_drafter(f"{out}+ngram", target)  # a head of one's own, with n-gram matches first
    assert hybrid.name == f"{drafter.name}+ngram"
    prompt = "one two three four one two three four one two"
    got = SpeculativeDecoder(target.model, target.tokenizer, hybrid).generate(prompt, cfg)
    assert got.token_ids == plain.generate(prompt, cfg).token_ids and got.stats.drafted > 0
    for bad in ("ngram+ngram", "+ngram", "head+ngram+ngram"):
        with pytest.raises(ConfigError, match=r"\+ngram follows head"):
            make_drafter(bad, target)
    with pytest.raises(ConfigError, match="trained for another target"):
        make_drafter(str(out), default_target)


def test_features_captured_while_answering_equal_a_second_pass(tiny_target, tokenizer, tmp_path):
    """train-draft takes features and labels from hooks while generate writes the answers (left-padded
    batches, greedy and sampled): where training reads them they equal one lean-runner pass per
    sequence. A stop between batches resumes: saved parts are used, a lost one is recomputed."""
    from specdecode.train.answers import generate_answers
    from specdecode.train.capture import _captured, extract_features

    layers = (0, 1)
    prompts = ["Hi", "Tell me a long story about a cat, a dog and a bird", "What is 2+2?", "Name a colour",
               "Why is the sky blue on a clear summer day?"]
    for temperature in (0.0, 0.7):
        work = tmp_path / str(temperature)
        work.mkdir()
        parts = work / "parts"
        args = (tiny_target, tokenizer)
        generate_answers(*args, prompts[:4], work / "a.jsonl", 12, 2, temperature, seed=3, capture=(layers, parts))
        (parts / "2.pt").unlink()  # stopped after writing the second batch's answers, before its part
        records = generate_answers(
            *args, prompts, work / "a.jsonl", 12, 2, temperature, seed=3, capture=(layers, parts)
        )
        assert len(records) == 5 and sorted(_captured(parts, records)) == [0, 1, 4]
        fresh = extract_features(tiny_target, records, work / "fresh.pt", layers)  # a runner pass for every sequence
        data = extract_features(tiny_target, records, work / "features.pt", layers, parts)
        assert not parts.exists()
        for k, r in enumerate(records):
            p, n = len(r["prompt_ids"]), len(r["prompt_ids"]) + len(r["answer_ids"])
            f, want = data["features"][k][: n - 1].float(), fresh["features"][k][: n - 1].float()
            assert f.shape == (n - 1, 2 * tiny_target.config.hidden_size)
            torch.testing.assert_close(f, want, atol=2e-3, rtol=2e-3)
            assert not torch.allclose(f[1:], want[:-1], atol=2e-2)  # negative control: one position off fails
            assert torch.equal(data["labels"][k][p - 1: n - 1], fresh["labels"][k][p - 1: n - 1])
        # the round grows (a rerun with more prompts): only the new sequence is added to the saved features
        more = generate_answers(*args, prompts + ["Say hello"], work / "a.jsonl", 12, 2, temperature, seed=3,
                                capture=(layers, parts))
        grown = extract_features(tiny_target, more, work / "features.pt", layers, parts)
        assert len(grown["tokens"]) == 6 and all(torch.equal(a, b) for a, b in zip(grown["features"], data["features"]))
        assert grown["tokens"][5].tolist() == more[5]["prompt_ids"] + more[5]["answer_ids"]
        with pytest.raises(ConfigError, match="does not hold the features"):
            extract_features(tiny_target, more[1:], work / "features.pt", layers)


def test_train_draft_reading_lower_layers(tiny_dir, tmp_path, capsys):
    """--feature-layers: the head reads those layers and the last, loads with them, stays lossless;
    a checkpoint is not resumed with other layers, and a layer the target lacks is refused."""
    out = tmp_path / "wide"
    args = ["train-draft", "--target", str(tiny_dir), "--out", str(out), "--prompts", "4", "--varied-prompts", "0",
            "--broad-prompts", "0", "--max-new-tokens", "12", "--batch", "2", "--batch-tokens", "128",
            "--draft-vocab", "512", "--depth", "2", "--epochs", "1"]
    assert main(args + ["--feature-layers", "0", "--soft-labels", "0.5"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["feature_layers"] == [0, 1] and config["version"] == 3
    assert config["trained_with"]["soft_labels"] == 0.5
    assert (out / "work" / "features_1_layers0-1.pt").is_file()
    target = load_model(str(tiny_dir))
    drafter = make_drafter(str(out), target)
    assert drafter.head.fuse is not None
    cfg = GenerationConfig(max_new_tokens=20, policy="fixed", draft_len=3, ignore_eos=True)
    got = SpeculativeDecoder(target.model, target.tokenizer, drafter).generate("The cat sat on the mat", cfg)
    want = SpeculativeDecoder(target.model, target.tokenizer, NoDrafter()).generate("The cat sat on the mat", cfg)
    assert got.token_ids == want.token_ids and got.stats.drafted > 0
    capsys.readouterr()
    assert main(args[:-2] + ["--epochs", "2", "--feature-layers", "last"]) == 2
    assert "--feature-layers:" in capsys.readouterr().err
    assert main(args + ["--feature-layers", "0,7"]) == 2
    assert "--feature-layers: must be 'last', 'low-mid-last' or layer numbers 0-1" in capsys.readouterr().err
    assert main(args + ["--soft-labels", "1.5"]) == 2
    assert "--soft-labels: must be a weight in [0, 1] (got 1.5)" in capsys.readouterr().err


def test_soft_labels_lead_the_head_to_the_targets_whole_distribution():
    """distill_loss with soft labels is least where the head's distribution is the target's (it is
    stationary there); the argmax-only loss is not, it pushes on towards one-hot (negative control)."""
    from specdecode.train.head_training import distill_loss

    torch.manual_seed(0)
    target_logits = torch.randn(6, 32) * 2
    probs = torch.softmax(target_logits, dim=-1)
    labels = probs.argmax(-1)
    grads = {}
    for soft in (1.0, 0.0, 0.5):
        x = target_logits.clone().requires_grad_()
        distill_loss(x, labels, probs, soft).backward()
        grads[soft] = x.grad.abs().max().item()
    assert grads[1.0] < 1e-6 and grads[0.0] > 1e-2 and grads[0.5] > 1e-2
    assert torch.allclose(
        distill_loss(target_logits, labels, probs, 0.0), torch.nn.functional.cross_entropy(target_logits, labels)
    )
    # trained from scratch, soft labels reach the target's distribution, the argmax alone does not
    for soft, close in ((1.0, True), (0.0, False)):
        x = torch.zeros_like(target_logits, requires_grad=True)
        opt = torch.optim.Adam([x], lr=0.1)
        for _ in range(300):
            opt.zero_grad()
            distill_loss(x, labels, probs, soft).backward()
            opt.step()
        assert (torch.softmax(x, -1) - probs).abs().max().item() < 0.02 if close else \
            (torch.softmax(x, -1) - probs).abs().max().item() > 0.1


def test_shipped_head_loads_and_is_lossless(default_target):
    assert (SHIPPED_HEAD / "model.safetensors").stat().st_size < 25 * 2**20
    plain = SpeculativeDecoder(default_target.model, default_target.tokenizer, NoDrafter())
    cfg = GenerationConfig(max_new_tokens=40)
    prompts = ["Explain why the sky is blue.", "Write a haiku about autumn.",
               "Repeat this list exactly: apples, pears, plums, apples, pears, plums."]
    expected = [plain.generate(p, cfg).token_ids for p in prompts]
    for spec in ("head", "head+ngram"):
        drafter = make_drafter(spec, default_target)
        assert drafter.name.startswith("head")
        dec = SpeculativeDecoder(default_target.model, default_target.tokenizer, drafter)
        accepted = 0
        for prompt, want in zip(prompts, expected):
            got = dec.generate(prompt, cfg)
            assert got.token_ids == want
            accepted += got.stats.accepted
        assert accepted > 0


def test_auto_is_the_head_where_it_fits_and_ngram_elsewhere(tiny_dir, default_target):
    assert make_drafter("auto", default_target).name == "head:smollm2-135m-instruct+ngram"
    assert make_drafter("auto", default_target, fast=False).name == "ngram"  # no lean runner, no features
    assert make_drafter("auto", load_model(str(tiny_dir))).name == "ngram"  # trained for another target


def test_compare_hf_runs_the_nearest_hugging_face_drafter(default_target, tiny_draft):
    from specdecode.drafters.model import ModelDrafter
    from specdecode.peers import hf_counterpart

    assert hf_counterpart(make_drafter("ngram", default_target)) == ("prompt_lookup", None)
    assert hf_counterpart(make_drafter("auto", default_target)) == ("prompt_lookup", None)
    assert hf_counterpart(make_drafter("none", default_target)) == ("none", None)
    assert hf_counterpart(ModelDrafter(tiny_draft, vocab_size=100)) == ("assistant", tiny_draft)
    with pytest.raises(ConfigError, match="compare.*no counterpart of the head"):
        hf_counterpart(make_drafter("head", default_target))


def test_train_draft_refuses_a_target_it_cannot_read_features_from(tmp_path, tokenizer, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=49152, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    code = main(["train-draft", "--target", str(d), "--out", str(tmp_path / "out"), "--prompts", "2"])
    assert code == 2
    assert "--target: train-draft needs a Llama-family target (llama, mistral" in capsys.readouterr().err
    assert not (tmp_path / "out" / "work" / "answers_1.jsonl").exists()
    none = ["--prompts", "0", "--varied-prompts", "0", "--broad-prompts", "0"]
    code = main(["train-draft", "--target", str(d), "--out", str(tmp_path / "out"), *none, "--self-prompts", "1"])
    assert code == 2 and "--prompts: the rounds together must have at least 2 prompts" in capsys.readouterr().err


class ScriptedWriter:
    """Stands in for a target writing user requests: each generate() call returns the next batch of
    scripted continuations after the prompt, and records the prompt and the seed it was called with."""

    def __init__(self, batches, eos):
        self.batches, self.calls = list(batches), []
        self.config = SimpleNamespace(eos_token_id=eos)
        self.generation_config = SimpleNamespace(eos_token_id=eos)
        self.device = torch.device("cpu")  # as a Hugging Face model says where it runs

    def generate(self, ids, attention_mask=None, max_new_tokens=0, **kw):
        import torch

        self.calls.append((ids[0].tolist(), torch.initial_seed(), kw))
        rows = self.batches.pop(0) if self.batches else [[5] * max_new_tokens] * ids.shape[0]
        width = max(len(r) for r in rows)
        return torch.tensor([ids[0].tolist() + r + [0] * (width - len(r)) for r in rows])


def test_self_prompts_keep_ended_distinct_requests_and_resume(tokenizer, tmp_path, capsys):
    from specdecode.train.answers import self_prompts

    eos = tokenizer.eos_token_id
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    first = [enc("How do I bake bread?") + [eos, eos], enc("Hi") + [eos], enc("Name three rivers in Asia.") + [eos],
             enc("How do I bake bread?") + [eos], enc("This one runs on and never ends its turn")]
    second = [
        enc("Translate 'good morning' into French.") + [eos],
        enc("Write a limerick about a cat.") + [eos],
        enc("Name three rivers in Asia.") + [eos],
        enc("Explain recursion to a child.") + [eos],
        enc("ok") + [eos],
    ]
    writer = ScriptedWriter([first, second], eos)
    path = tmp_path / "prompts_5.jsonl"
    got = self_prompts(writer, tokenizer, 4, path, batch=5, seed=7)
    # ended (by the end-of-turn token), long enough, and each request once, in the order written
    assert got == ["How do I bake bread?", "Name three rivers in Asia.", "Translate 'good morning' into French.",
                   "Write a limerick about a cat."]
    prefix, seed, kw = writer.calls[0]
    assert tokenizer.decode(prefix).endswith("<|im_start|>user\n")  # the template up to the user's text
    assert kw["do_sample"] and kw["temperature"] == 1.0
    assert [c[1] for c in writer.calls] == [7 * 100003, 7 * 100003 + 1]  # a seed per batch
    # rerun with more: the batches written are read back, not generated again; the next one has its own seed
    writer2 = ScriptedWriter([[enc("What is the capital of Peru?") + [eos]] * 5], eos)
    assert self_prompts(writer2, tokenizer, 5, path, batch=5, seed=7)[4] == "Explain recursion to a child."
    assert writer2.calls == []
    assert self_prompts(writer2, tokenizer, 6, path, batch=5, seed=7)[5] == "What is the capital of Peru?"
    assert [c[1] for c in writer2.calls] == [7 * 100003 + 2]
    # a writer that never ends its turn gives up after a bounded number of batches, with a warning
    stuck = ScriptedWriter([], eos)
    assert self_prompts(stuck, tokenizer, 3, tmp_path / "stuck.jsonl", batch=2, seed=0) == []
    assert len(stuck.calls) == 4 * 2 + 4
    assert "wrote 0 usable requests of 3" in capsys.readouterr().err


def test_feature_noise_perturbs_training_inputs_only(tiny_dir, tmp_path, capsys):
    """--feature-noise changes what the head learns from (same seed, same data, other weights), not
    what it is measured on: the evaluation before any step is the same with and without it."""
    from safetensors.torch import load_file

    args = ["train-draft", "--target", str(tiny_dir), "--prompts", "4", "--varied-prompts", "0", "--broad-prompts", "0",
            "--max-new-tokens", "12", "--batch", "2", "--batch-tokens", "128", "--draft-vocab", "512", "--depth", "2",
            "--epochs", "1"]
    runs = {}
    for name, noise in (("plain", "0"), ("again", "0"), ("noisy", "0.5")):
        assert main(args + ["--out", str(tmp_path / name), "--feature-noise", noise]) == 0
        config = json.loads((tmp_path / name / "config.json").read_text())
        runs[name] = (config, load_file(str(tmp_path / name / "model.safetensors")))
    assert runs["noisy"][0]["trained_with"]["feature_noise"] == 0.5
    assert runs["noisy"][0]["history"][0] == runs["plain"][0]["history"][0]  # evaluation reads clean features
    same = [torch.equal(runs["again"][1][k], v) for k, v in runs["plain"][1].items()]
    assert all(same)  # seeded: without noise a rerun is the same head (the control for the next line)
    assert not all(torch.equal(runs["noisy"][1][k], v) for k, v in runs["plain"][1].items())
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "bad"), "--feature-noise", "-0.1"]) == 2
    assert (
        "--feature-noise: must be a fraction of the features' spread in [0, 10) (got -0.1)" in capsys.readouterr().err
    )


def test_grounded_prompts_ask_over_the_targets_own_answers():
    from specdecode.train.prompts import grounded_prompts

    sources = [(f"Question number {i}?", f"Answer {i} says this. " * 30 + "And it was cut off mid") for i in range(20)]
    got = grounded_prompts(sources, 60, seed=3, max_chars=1200)
    assert (
        got
        == grounded_prompts(sources, 60, seed=3, max_chars=1200)
        != grounded_prompts(sources, 60, seed=4, max_chars=1200)
    )  # seeded
    docs = [p for p in got if "Document 1:" in p]
    assert docs and len(docs) < len(got)  # both kinds: questions over documents, and work on an article
    for p in docs:  # the question asked is one whose answer is among the documents
        i = int(p.rsplit("Question number ", 1)[1].split("?")[0])
        assert f"Answer {i} says this." in p
    for p in got:
        context = p.replace("Document", "")
        assert "says this." in context and "cut off mid" not in context  # whole sentences of the answers
        assert len(p) < 1200 + 200  # the context stays under max_chars, plus the request around it


def test_train_draft_further_from_a_head(tiny_dir, tmp_path, capsys):
    """--init: training continues from a given head (its weights and vocabulary, whatever the new
    data's counts); --passage-prompts asks over the other rounds' answers; a head for another
    target, a directory that holds none, or another shape asked for is refused with a message."""
    from safetensors.torch import load_file

    base = ["train-draft", "--target", str(tiny_dir), "--prompts", "4", "--varied-prompts", "0", "--broad-prompts", "0",
            "--max-new-tokens", "80", "--batch", "2", "--batch-tokens", "256", "--depth", "2", "--epochs", "1"]
    first = tmp_path / "first"
    assert main(base + ["--out", str(first), "--draft-vocab", "512"]) == 0
    more = base + ["--passage-prompts", "3", "--seed", "1"]
    assert main(more + ["--out", str(tmp_path / "init"), "--init", str(first), "--lr", "1e-12"]) == 0
    assert main(more + ["--out", str(tmp_path / "fresh"), "--draft-vocab", "512", "--lr", "1e-12"]) == 0
    a, b, c = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("first", "init", "fresh"))
    assert torch.equal(a["vocab_ids"], b["vocab_ids"]) and not torch.equal(a["vocab_ids"], c["vocab_ids"])
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # started from the given head
    assert not all(torch.allclose(a[k], c[k], atol=1e-6) for k in a if k != "vocab_ids")  # control: a new head
    asked = [json.loads(x)["prompt"] for x in (tmp_path / "init" / "work" / "answers_6.jsonl").read_text().splitlines()]
    answers = [
        json.loads(x)["answer"] for x in (tmp_path / "init" / "work" / "answers_1.jsonl").read_text().splitlines()
    ]
    assert len(asked) == 3 and all(any(s[:40] in p for s in answers) for p in asked)
    config = json.loads((tmp_path / "init" / "config.json").read_text())
    assert config["trained_with"]["init"] == str(first) and config["init_trained_with"]["prompts"] == 4
    capsys.readouterr()
    for extra, message in (
        (["--init", str(SHIPPED_HEAD)], "--init: .* was trained for another target"),
        (["--init", str(tmp_path)], "--init: .* is not a draft head directory"),
        (["--init", str(first), "--draft-vocab", "256"], "--draft-vocab: the head given by --init has 512"),
        (["--init", str(first), "--feature-layers", "0"], "--feature-layers: the head given by --init has"),
    ):
        assert main(base + ["--out", str(tmp_path / "refused")] + extra) == 2
        assert re.search(message, capsys.readouterr().err)
    none = ["--prompts", "0", "--varied-prompts", "0", "--broad-prompts", "0", "--self-prompts", "0"]
    alone = ["--out", str(tmp_path / "alone"), *none, "--passage-prompts", "5"]
    assert main(base[:3] + alone) == 2
    assert "--prompts: the rounds together must have at least 2 prompts" in capsys.readouterr().err


def test_summary_counts_the_prompts_where_a_peer_decoded_as_our_plain_decoding():
    from specdecode.costmodel import CostModel

    def result(category: str, same: bool | None, peer_s: float) -> PromptResult:
        return PromptResult(0, category, 10, 1.0, 10, 0.5, True, [], {
            "drafted": 0, "accepted": 0, "steps": 1, "draft_s": 0.0, "drafted_at": [], "reached_at": [],
            "accepted_at": []}, peers={"peer": (10, peer_s, same)})

    results = [result("a", True, 1.0), result("a", False, 2.0), result("b", True, 1.0)]
    summary = summarize(results, CostModel(target_s={1: 0.01}))
    assert summary["overall"]["peer_identical_to_plain"] == 2
    assert summary["categories"]["a"]["peer_identical_to_plain"] == 1
    assert summary["overall"]["ratio_vs_peer"] == pytest.approx((30 / 1.5) / (30 / 4.0))
    unchecked = summarize([result("a", None, 1.0)], CostModel(target_s={1: 0.01}))
    assert unchecked["overall"]["peer_identical_to_plain"] is None  # no greedy comparison was made


def test_the_bench_table_keeps_every_peer_header_apart_and_explains_its_columns():
    row = {"prompts": 2, "speedup": 1.1, "median_speedup": 1.0, "min_speedup": 0.9, "predicted_speedup": 1.2,
           "efficiency": 0.9, "mean_accepted_tokens": 1.5, "acceptance_rate": 0.5, "draft_cost_ratio": 0.01,
           "tokens_per_second": 100.0, "baseline_tokens_per_second": 90.0, "greedy_match": True}
    for peer in ("ik", "llamacpp", "ik_server_ngram"):
        row |= {f"{peer}_tokens_per_second": 80.0, f"ratio_vs_{peer}": 1.25}
    summary = {"overall": row, "categories": {"qa": row}, "config": {"engine": "ik_llama.cpp: test"},
               "cost_model": {"pass_ratio": {2: 1.2}, "target_pass_ms": {1: 5.0}, "draft_cost_ratio": 0.01,
                              "best_tau": 2, "best_predicted_speedup": 1.1}}
    lines = format_table(summary).splitlines()
    for peer in ("ik", "llamacpp", "ik_server_ngram"):
        assert f" {peer} tok/s" in lines[0] and f" vs {peer}" in lines[0]
    assert any(line.startswith("speedup: ") and "pred: " in line and "base" in line for line in lines)
    assert lines[-1] == "engine: ik_llama.cpp: test"
