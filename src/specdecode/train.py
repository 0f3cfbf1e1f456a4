"""``specdecode train-draft``: train a feature draft head for a target by self-distillation.

Stages, each resumable (its output is kept under ``OUT/work`` and skipped when already there):

1. prompts: made from templates (``prompts``), never from the benchmark;
2. answers: the target's own greedy answers, generated in batches; a second round asks about
   passages the target wrote in the first round, so the head also learns to copy;
3. features: one target pass per sequence gives, at every position, the feature ``f_t`` and the
   target's greedy next token (the label the verifier will check drafts against);
4. training: the head learns to predict the next feature and token, unrolled over two draft
   positions so that it also learns to continue from its own predictions; checkpoints every
   epoch, so a stopped run resumes where it was;
5. export: ``OUT/model.safetensors`` and ``OUT/config.json`` (with the target's fingerprint).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import ConfigError


def _progress(total, desc, unit):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)


def generate_answers(model, tokenizer, prompts: list[str], path: Path, max_new_tokens: int, batch: int) -> list[dict]:
    """Greedy answers of the target, appended to ``path`` as they come (resumable)."""
    done = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    todo = prompts[len(done):]
    if not todo:
        return done
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.eos_token_id
    bar = _progress(len(prompts), f"answers -> {path.name}", "prompt")
    bar.update(len(done))
    with path.open("a") as f:
        for i in range(0, len(todo), batch):
            chunk = todo[i:i + batch]
            encoded = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
                       for p in chunk]
            encoded = [e["input_ids"] if isinstance(e, dict) or hasattr(e, "input_ids") else e for e in encoded]
            width = max(len(e) for e in encoded)
            ids = torch.tensor([[pad] * (width - len(e)) + list(e) for e in encoded])
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            for prompt, e, row in zip(chunk, encoded, out):
                answer = row[width:].tolist()
                eos = model.config.eos_token_id
                if eos in answer:
                    answer = answer[: answer.index(eos) + 1]
                record = {"prompt": prompt, "prompt_ids": list(e), "answer_ids": answer,
                          "answer": tokenizer.decode(answer, skip_special_tokens=True)}
                f.write(json.dumps(record) + "\n")
                done.append(record)
            f.flush()
            bar.update(len(chunk))
    bar.close()
    return done


def extract_features(model, records: list[dict], path: Path):
    """Per sequence: features ``[L, H]`` (fp16) and the target's greedy next token ``[L]``."""
    if path.is_file():
        return torch.load(path)
    from .fastllama import FastLlama, FastRunner

    fast = getattr(model, "_specdecode_fast", None) or FastLlama(model, tune=False)
    runner = FastRunner(fast, capacity=512)
    feats, labels, tokens = [], [], []
    bar = _progress(len(records), "features", "seq")
    for r in records:
        ids = r["prompt_ids"] + r["answer_ids"]
        runner.reset()
        logits = runner.forward(ids, num_logits=len(ids))
        feats.append(runner.hidden.to(torch.float16).clone())
        labels.append(logits.argmax(-1).to(torch.int32))
        tokens.append(torch.tensor(ids, dtype=torch.int32))
        bar.update(1)
    bar.close()
    data = {"features": feats, "labels": labels, "tokens": tokens}
    torch.save(data, path)
    return data


def train_head(args) -> Path:
    from .drafters.feature import FeatureHead, TargetParts, save_feature_draft
    from .models import load_model
    from .prompts import passage_prompts, seed_prompts

    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    target = load_model(args.target, param="target", dtype="float32", device=args.device)
    model, tok = target.model, target.tokenizer

    # 1-2. prompts and answers
    n_seed = int(args.prompts * 0.7)
    first = generate_answers(model, tok, seed_prompts(n_seed, args.seed), work / "answers_1.jsonl", args.max_new_tokens, args.batch)
    passages = [r["answer"] for r in first if r["prompt"].startswith(("Write a paragraph", "What is the history", "Explain"))
                and len(r["answer"]) > 200] or [r["answer"] for r in first if r["answer"]]
    second = generate_answers(model, tok, passage_prompts(passages, args.prompts - n_seed, args.seed + 1),
                              work / "answers_2.jsonl", args.max_new_tokens, args.batch)
    records = first + second
    rng = random.Random(args.seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    n_val = max(1, len(records) // 20)
    val_records = [records[i] for i in order[:n_val]]
    train_records = [records[i] for i in order[n_val:]]

    # 3. features
    train_data = extract_features(model, train_records, work / "features_train.pt")
    val_data = extract_features(model, val_records, work / "features_val.pt")

    # reduced vocabulary: the tokens the target itself predicts most often (always with EOS)
    counts = torch.zeros(model.config.vocab_size, dtype=torch.long)
    for lab in train_data["labels"]:
        counts += torch.bincount(lab.long(), minlength=model.config.vocab_size)
    eos = model.config.eos_token_id
    counts[eos] = counts.max() + 1
    vocab_ids = torch.argsort(counts, descending=True)[: args.draft_vocab].sort().values
    vocab_map = torch.full((model.config.vocab_size,), -100, dtype=torch.long)
    vocab_map[vocab_ids] = torch.arange(len(vocab_ids))
    coverage = float(counts[vocab_ids].sum() - counts[eos] + 1) / float(counts.sum() - counts[eos] + 1)

    parts = TargetParts(model, vocab_ids)
    head = FeatureHead(model.config.hidden_size, args.inner)
    with torch.no_grad():  # start as "pass the feature through": g = f
        head.fuse.weight.zero_()
        head.fuse.weight[:, : model.config.hidden_size].copy_(torch.eye(model.config.hidden_size))
        head.down.weight.mul_(0.1)
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.0)
    ckpt = work / "checkpoint.pt"
    start_epoch = 0
    if ckpt.is_file():
        state = torch.load(ckpt)
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        start_epoch = state["epoch"]
        torch.set_rng_state(state["rng"])
        print(f"resuming after epoch {start_epoch}", file=sys.stderr)

    def tensors(data):
        f = torch.cat([x[:-2] for x in data["features"]]).float()
        f1 = torch.cat([x[1:-1] for x in data["features"]]).float()
        f2 = torch.cat([x[2:] for x in data["features"]]).float()
        x1 = torch.cat([x[1:-1] for x in data["tokens"]]).long()
        x2 = torch.cat([x[2:] for x in data["tokens"]]).long()
        y1 = vocab_map[torch.cat([x[1:-1] for x in data["labels"]]).long()]
        y2 = vocab_map[torch.cat([x[2:] for x in data["labels"]]).long()]
        return f, f1, f2, x1, x2, y1, y2

    train_t, val_t = tensors(train_data), tensors(val_data)
    n = train_t[0].shape[0]
    # features of a Llama's last layer are large and uneven; the regression works in units of
    # their overall spread so that it neither swamps nor vanishes beside the cross-entropy
    scale = float(train_t[0].std())
    steps_per_epoch = math.ceil(n / args.batch_size)
    total = steps_per_epoch * args.epochs

    def loss_fn(batch):
        f, f1, f2, x1, x2, y1, y2 = batch
        g1 = head(f, parts.embed[x1])
        g2 = head(g1, parts.embed[x2])
        l1 = parts.logits(g1)
        l2 = parts.logits(g2)
        ce = F.cross_entropy(l1, y1, ignore_index=-100) + F.cross_entropy(l2, y2, ignore_index=-100)
        reg = F.smooth_l1_loss(g1 / scale, f1 / scale) + F.smooth_l1_loss(g2 / scale, f2 / scale)
        acc1 = ((l1.argmax(-1) == y1) & (y1 >= 0)).float().sum() / max(1, int((y1 >= 0).sum()))
        acc2 = ((l2.argmax(-1) == y2) & (y2 >= 0)).float().sum() / max(1, int((y2 >= 0).sum()))
        return ce + args.reg_weight * reg, acc1, acc2

    def evaluate():
        with torch.no_grad():
            loss, a1, a2 = loss_fn(val_t)
        return float(loss), float(a1), float(a2)

    history = json.loads((work / "history.json").read_text()) if (work / "history.json").is_file() else []
    if not history:
        history.append({"epoch": 0, **dict(zip(("val_loss", "val_acc_pos1", "val_acc_pos2"), evaluate()))})
    bar = _progress(total, "train", "step")
    bar.update(start_epoch * steps_per_epoch)
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, args.epochs):
        perm = torch.randperm(n)
        for i in range(steps_per_epoch):
            sel = perm[i * args.batch_size:(i + 1) * args.batch_size]
            lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            for group in opt.param_groups:
                group["lr"] = lr
            loss, a1, _ = loss_fn([t[sel] for t in train_t])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc1=f"{a1.item():.2f}", lr=f"{lr:.1e}")
        vl, va1, va2 = evaluate()
        history.append({"epoch": epoch + 1, "val_loss": vl, "val_acc_pos1": va1, "val_acc_pos2": va2})
        torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "epoch": epoch + 1, "rng": torch.get_rng_state()}, ckpt)
        (work / "history.json").write_text(json.dumps(history, indent=1))
    bar.close()

    meta = {
        "target": args.target or "default",
        "trained_with": {k: getattr(args, k) for k in ("prompts", "max_new_tokens", "epochs", "lr", "batch_size", "inner",
                                                       "draft_vocab", "reg_weight", "seed")},
        "train_sequences": len(train_records),
        "train_positions": n,
        "draft_vocab_coverage": coverage,
        "history": history,
    }
    save_feature_draft(out, head, vocab_ids, model, meta)
    print(f"wrote {out}: validation accuracy pos1 {history[-1]['val_acc_pos1']:.3f}, pos2 {history[-1]['val_acc_pos2']:.3f}; "
          f"draft vocabulary covers {coverage:.3f} of the target's tokens", file=sys.stderr)
    return out


def cmd_train(args) -> int:
    for name, low in (("prompts", 2), ("max_new_tokens", 1), ("epochs", 1), ("batch", 1), ("batch_size", 1),
                      ("draft_vocab", 16), ("inner", 1)):
        if getattr(args, name) < low:
            raise ConfigError(name, f"must be >= {low} (got {getattr(args, name)})")
    train_head(args)
    return 0


def register(sub) -> None:
    p = sub.add_parser("train-draft", help="train a feature draft head for a target (self-distillation)")
    p.add_argument("--target", default=None, help="hub id, local directory or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="output directory (resumable: rerun the same command to continue)")
    p.add_argument("--prompts", type=int, default=1200, help="self-distillation prompts")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="generation batch size")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=256, help="training batch (positions)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--inner", type=int, default=1024, help="the head's MLP width")
    p.add_argument("--draft-vocab", type=int, default=8192, help="reduced output vocabulary")
    p.add_argument("--reg-weight", type=float, default=1.0, help="weight of the feature regression loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_train)
