"""``train_head``: the stages of training a draft head, in order (see the package docstring)."""

from __future__ import annotations

import random
import sys
from dataclasses import replace
from pathlib import Path

import torch

from ..config import ConfigError
from ..drafters.head import FeatureHead, TargetParts
from ..drafters.head_file import SHIPPED_HEAD, draft_config, is_feature_draft, load_feature_draft, save_feature_draft
from ..models import load_model
from ..runners import supports
from .answers import generate_answers, self_prompts
from .capture import extract_features
from .head_training import Sequences, Trainer
from .options import DEFAULT_DRAFT_VOCAB, DEFAULT_FEATURE_LAYERS, TrainOptions, feature_layers
from .prompts import broad_prompts, grounded_prompts, passage_prompts, seed_prompts, varied_prompts, vocabulary_words

SEED_SHARE = 0.7  # of --prompts: template prompts; the rest ask about passages from their answers
VALIDATION_SHARE = 20  # one sequence in this many of each round is held out for validation
MIN_SOURCE_CHARS = 300  # answers at least this long are the documents of --passage-prompts


def train_head(opts: TrainOptions) -> Path:
    """Train a draft head for ``opts.target`` into ``opts.out`` (resumable); returns ``opts.out``."""
    opts.validate()
    if opts.init == "head":
        opts = replace(opts, init=str(SHIPPED_HEAD))
    out = Path(opts.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(opts.seed)
    random.seed(opts.seed)
    model, tok = _target(opts)
    n_layers = model.config.num_hidden_layers
    init, init_cfg = _init_head(opts, model) if opts.init else (None, None)
    layers = init.head.feature_layers if init else feature_layers(opts.feature_layers or DEFAULT_FEATURE_LAYERS,
                                                                  n_layers)
    tag = "" if layers == (n_layers - 1,) else "_layers" + "-".join(map(str, layers))

    def features_file(number: int, suffix: str) -> Path:  # named by the layers they hold
        return work / f"features_{number}{tag}{suffix}"

    rounds = _answer_rounds(opts, model, tok, work, layers, features_file)
    items, val_items = _features(opts, model, rounds, layers, features_file)
    vocab_ids, coverage = _draft_vocabulary(model, items, init.parts.vocab_ids.cpu() if init else None,
                                            opts.draft_vocab or DEFAULT_DRAFT_VOCAB)
    vocab_map = torch.full((model.config.vocab_size,), -100, dtype=torch.long)
    vocab_map[vocab_ids] = torch.arange(len(vocab_ids))
    hidden = model.config.hidden_size
    val, train = Sequences(val_items, vocab_map, hidden), Sequences(items, vocab_map, hidden)

    parts = TargetParts(model, vocab_ids)
    head = init.head.float().train() if init else FeatureHead.for_target(model, opts.inner, layers)
    trainer = Trainer(head.to(model.device), parts, train, val, opts)
    history = trainer.fit(work, layers)

    meta = {
        "target": opts.target or "default",
        "trained_with": opts.recipe(),
        **({"init_trained_with": init_cfg.get("trained_with")} if init else {}),
        "train_sequences": len(train.items),
        "train_positions": sum(int(it[0].shape[0]) - it[3] for it in train.items),
        "draft_vocab_coverage": coverage,
        "history": history,
    }
    save_feature_draft(out, trainer.head, vocab_ids, model, meta)
    last = history[-1]
    print(f"wrote {out}: validation accuracy by draft depth "
          + " ".join(f"{last[f'val_acc_depth{s}']:.3f}" for s in range(opts.depth))
          + f", {last['val_accepted_per_draft']:.2f} tokens accepted per {opts.depth}-token draft; "
          f"draft vocabulary covers {coverage:.3f} of the target's answer tokens", file=sys.stderr)
    return out


def _target(opts: TrainOptions):
    target = load_model(opts.target, param="target", dtype="float32", device=opts.device)
    if not supports(target.model):  # the feature pass and drafting both read features from the lean runner
        raise ConfigError("target", "train-draft needs a Llama-family target (llama, mistral: plain RoPE, no "
                                    f"biases); got {target.model.config.model_type}")
    return target.model, target.tokenizer


def _answer_rounds(opts: TrainOptions, model, tok, work: Path, layers, features_file) -> dict[int, list[dict]]:
    """Stages 1-2, in numbered rounds: greedy answers to template prompts, then questions about
    passages the target wrote, then (sampled, for variety) further kinds of request, then requests
    over the target's vocabulary, then requests the target wrote itself, then long contexts."""
    rounds: dict[int, list[dict]] = {}
    passages: list[str] = []

    def answers(number: int, prompts: list[str], **sampling) -> list[dict]:
        # features and labels are captured as the answers are written (stage 3 in the same pass)
        return generate_answers(model, tok, prompts, work / f"answers_{number}.jsonl", opts.max_new_tokens,
                                opts.batch, capture=(layers, features_file(number, ".parts")), **sampling)

    if opts.prompts:
        n_seed = max(1, int(opts.prompts * SEED_SHARE))
        rounds[1] = answers(1, seed_prompts(n_seed, opts.seed))
        passages = [r["answer"] for r in rounds[1]
                    if r["prompt"].startswith(("Write a paragraph", "What is the history", "Explain"))
                    and len(r["answer"]) > 200] or [r["answer"] for r in rounds[1] if r["answer"]]
        if opts.prompts > n_seed:
            rounds[2] = answers(2, passage_prompts(passages, opts.prompts - n_seed, opts.seed + 1))
    if opts.varied_prompts:
        rounds[3] = answers(3, varied_prompts(opts.varied_prompts, opts.seed + 2, passages), temperature=0.7,
                            seed=opts.seed + 2)
    if opts.broad_prompts:
        rounds[4] = answers(4, broad_prompts(opts.broad_prompts, opts.seed + 3, vocabulary_words(tok), passages))
    if opts.self_prompts:
        requests = self_prompts(model, tok, opts.self_prompts, work / "prompts_5.jsonl", opts.batch, opts.seed + 4)
        if requests:
            rounds[5] = answers(5, requests)
    if not rounds:
        raise ConfigError("self_prompts", "the target wrote no usable requests; add template rounds (--prompts)")
    if opts.passage_prompts:  # long contexts made of the target's answers in the rounds above
        sources = [(r["prompt"], r["answer"]) for records in rounds.values() for r in records
                   if len(r["answer"]) >= MIN_SOURCE_CHARS]
        if not sources:
            raise ConfigError("passage_prompts", f"the other rounds wrote no answers long enough ({MIN_SOURCE_CHARS}+ "
                                                 "characters) to ask about; add a round (--self-prompts, --prompts)")
        rounds[6] = answers(6, grounded_prompts(sources, opts.passage_prompts, opts.seed + 5))
    return rounds


def _features(opts: TrainOptions, model, rounds: dict[int, list[dict]], layers, features_file):
    """Stage 3: (training items, validation items), each ``(features, labels, tokens, prompt length)``.
    Features as captured with the answers (or one target pass per sequence where they were not);
    held out per round, so that adding a round leaves the earlier rounds' split as it was."""
    val_items, items = [], []
    for number, records in rounds.items():
        data = extract_features(model, records, features_file(number, ".pt"), layers, features_file(number, ".parts"))
        got = [(f, lab, t, len(rec["prompt_ids"])) for f, lab, t, rec in
               zip(data["features"], data["labels"], data["tokens"], records)]
        random.Random(opts.seed * 1000 + number - 1).shuffle(got)
        n_val = max(1, len(got) // VALIDATION_SHARE)
        val_items += got[:n_val]
        items += got[n_val:]
    return items, val_items


def _draft_vocabulary(model, items, keep: torch.Tensor | None, size: int) -> tuple[torch.Tensor, float]:
    """The reduced vocabulary: the ``size`` tokens the target itself predicts most often in answers
    (always EOS), or ``keep`` (a head trained further keeps its own); and the share of answer
    tokens it covers."""
    vocab_size = model.config.vocab_size
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for f, lab, t, prompt_len in items:  # the labels training reads
        counts += torch.bincount(lab[max(0, prompt_len - 1):-1].long(), minlength=vocab_size)
    eos = model.config.eos_token_id
    counts[eos] = counts.max() + 1
    vocab_ids = keep if keep is not None else torch.argsort(counts, descending=True)[:size].sort().values
    coverage = float(counts[vocab_ids].sum() - counts[eos]) / max(1.0, float(counts.sum() - counts[eos]))
    return vocab_ids, coverage


def _init_head(opts: TrainOptions, model):
    """``--init DIR``: the draft head in DIR, to train further, and its config; refused when it was
    trained for another target, or when ``--inner``, ``--draft-vocab`` or ``--feature-layers`` ask
    for another shape than it has (it keeps its own)."""
    path = opts.init
    if not is_feature_draft(path):
        raise ConfigError("init", f"{path} is not a draft head directory (config.json and model.safetensors "
                                  "written by specdecode train-draft)")
    init = load_feature_draft(path, model, param="init")
    cfg = draft_config(path)
    n_layers = model.config.num_hidden_layers
    layers = init.head.feature_layers
    asked = {"inner": (opts.inner, cfg["inner_size"]), "draft_vocab": (opts.draft_vocab, cfg["draft_vocab_size"]),
             "feature_layers": (opts.feature_layers and feature_layers(opts.feature_layers, n_layers), layers)}
    for name, (given, has) in asked.items():
        if given is not None and given != has:
            raise ConfigError(name, f"the head given by --init has {has}; leave --{name.replace('_', '-')} out or "
                                    "give that")
    return init, cfg
