"""Stage 4 of training: the head learns the target's next feature and token at answer positions,
unrolled over ``depth`` draft steps; checkpoints every epoch, so a stopped run resumes."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..drafters.head import FeatureHead, TargetParts
from .common import progress
from .options import TrainOptions

DEPTH_WEIGHT = (
    0.8  # the loss of draft depth s weighs DEPTH_WEIGHT ** s: later depths matter less, as they are reached less
)
MAX_WARMUP = 50  # learning-rate warm-up steps, at most (a tenth of the schedule when it is short)


class Sequences:
    """Self-distillation sequences, batched by length, as the head's training inputs.

    Index i of a sequence is fed the target's feature ``f_i`` and the token ``x_{i+1}``; it must
    predict ``f_{i+1}`` and the target's greedy token after ``x_{i+1}``. Only indices whose label is
    part of the target's answer count in the loss: drafting happens there and nowhere else."""

    def __init__(self, items: list[tuple], vocab_map: torch.Tensor, hidden: int):
        self.items = sorted(items, key=lambda it: it[0].shape[0])  # (features, labels, tokens, prompt_len)
        self.vocab_map = vocab_map
        self.hidden = hidden  # the last H feature columns are the last layer's: the regression target

    def batches(self, max_tokens: int, rng: random.Random | None = None) -> list[list[int]]:
        out, cur, width = [], [], 0
        for k, it in enumerate(self.items):
            width = max(width, it[0].shape[0])
            if cur and width * (len(cur) + 1) > max_tokens:
                out.append(cur)
                cur, width = [], it[0].shape[0]
            cur.append(k)
        if cur:
            out.append(cur)
        if rng is not None:
            rng.shuffle(out)
        return out

    def batch(self, sel: list[int], embed: torch.Tensor):
        items = [self.items[k] for k in sel]
        width = max(it[0].shape[0] for it in items)
        feats = torch.zeros(len(items), width, items[0][0].shape[1])
        tokens = torch.zeros(len(items), width, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros(len(items), width - 1, dtype=torch.bool)
        for b, (f, lab, tok, prompt_len) in enumerate(items):
            n = f.shape[0]
            feats[b, :n] = f.float()
            tokens[b, :n] = tok.long()
            labels[b, :n] = self.vocab_map[lab.long()]
            mask[b, max(0, prompt_len - 2):n - 2] = True  # label index i+1 in [prompt_len-1, n-2]
        y = labels[:, 1:]
        mask &= y >= 0
        on = embed.device  # built where the head trains: the target's embeddings live there
        return feats[:, :-1].to(on), embed[tokens[:, 1:]], feats[:, 1:, -self.hidden:].to(on), y.to(on), mask.to(on)


def distill_loss(
    logits: torch.Tensor, labels: torch.Tensor, target_probs: torch.Tensor | None, soft: float
) -> torch.Tensor:
    """Cross-entropy of the head's ``logits`` ``[N, V']`` against the target: its argmax ``labels``
    ``[N]`` with weight ``1 - soft`` and its whole distribution ``target_probs`` ``[N, V']`` with
    weight ``soft`` (EAGLE's and DistillSpec's soft labels: the head also learns how sure the target
    is and what came second, which the argmax alone does not say)."""
    hard = F.cross_entropy(logits, labels)
    if not soft:
        return hard
    full = -(target_probs * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    return full if soft == 1 else (1 - soft) * hard + soft * full


class Trainer:
    """The head, its optimiser and the loss, over training and validation ``Sequences``."""

    def __init__(self, head: FeatureHead, parts: TargetParts, train: Sequences, val: Sequences, opts: TrainOptions):
        self.head, self.parts, self.train, self.val, self.opts = head, parts, train, val, opts
        self.opt = torch.optim.AdamW(head.parameters(), lr=opts.lr, weight_decay=0.0)
        hidden = train.hidden
        # features of a Llama's last layer are large and uneven; the regression works in units of
        # their overall spread so that it neither swamps nor vanishes beside the cross-entropy
        sample = torch.cat([it[0][:64].float() for it in train.items[:256]])
        self.scale = float(sample[:, -hidden:].std())
        # --feature-noise: uniform noise on the features the head reads, in units of each layer's spread
        # (EAGLE trains so): at drafting time it reads features of text unlike its training data
        device = parts.embed.device
        self.spread = sample.view(len(sample), -1, hidden).std(dim=(0, 2)).repeat_interleave(hidden).to(device)
        self.weights = [DEPTH_WEIGHT ** s for s in range(opts.depth)]

    def loss(self, batch, noise: float = 0.0):
        """The weighted loss over draft depths, and per depth whether each position's token was right."""
        f, emb, f_next, y, mask = batch
        if noise:
            f = f + (torch.rand_like(f) * 2 - 1) * (noise * self.spread)
        outs = self.head(f, emb, depth=self.opts.depth)
        yy, fm, total, correct = y[mask], f_next[mask], 0.0, []
        soft = None
        if (
            self.opts.soft_labels
        ):  # the target's whole distribution (over the draft vocabulary), read off its own feature
            with torch.no_grad():
                soft = torch.softmax(self.parts.logits(fm), dim=-1)
        for w, g in zip(self.weights, outs):
            gm = g[mask]
            logits = self.parts.logits(gm)
            ce = distill_loss(logits, yy, soft, self.opts.soft_labels)
            total = total + w * (ce + self.opts.reg_weight * F.smooth_l1_loss(gm / self.scale, fm / self.scale))
            correct.append(logits.argmax(-1) == yy)
        return total, correct

    def evaluate(self) -> dict:
        """Loss, accuracy per draft depth, and the expected accepted draft length over answer positions."""
        depth = self.opts.depth
        loss, n, hits, accepted, starts = 0.0, 0, [0] * depth, 0.0, 0
        with torch.no_grad():
            for sel in self.val.batches(self.opts.batch_tokens):
                batch = self.val.batch(sel, self.parts.embed)
                mask = batch[-1]
                batch_loss, correct = self.loss(batch)
                ok = []
                for s, c in enumerate(correct):  # back from answer positions to [B, T]
                    right = torch.zeros_like(mask)
                    right[mask] = c
                    hits[s] += int(c.sum())
                    ok.append(right)
                m = int(mask.sum())
                loss, n = loss + float(batch_loss) * m, n + m
                # a draft starting at index j gets token s+1 right when depth s is right at j+s
                run = mask.clone()
                for s in range(depth):
                    shifted = torch.zeros_like(run)
                    shifted[:, : run.shape[1] - s] = ok[s][:, s:]
                    run &= shifted
                    accepted += float(run.sum())
                starts += m
        return {"val_loss": loss / max(1, n), **{f"val_acc_depth{s}": hits[s] / max(1, n) for s in range(depth)},
                "val_accepted_per_draft": accepted / max(1, starts)}

    def resume(self, ckpt: Path, layers: tuple[int, ...]) -> tuple[int, int]:
        """Load ``ckpt`` if there is one: (epochs done, epoch the current schedule started at)."""
        if not ckpt.is_file():
            return 0, 0
        n_train, epochs = len(self.train.items), self.opts.epochs
        state = torch.load(ckpt, map_location="cpu")  # a run stopped on one device resumes on another
        trained = tuple(state.get("feature_layers", layers[-1:]))  # older checkpoints: the last layer
        if trained != layers:
            raise ConfigError("feature_layers", f"{ckpt} was trained reading layers {trained}, not {layers}; "
                                                "give the same --feature-layers or another --out")
        self.head.load_state_dict(state["head"])
        self.opt.load_state_dict(state["opt"])
        start_epoch = phase_start = state["epoch"]
        torch.set_rng_state(state["rng"])
        if state.get("train_sequences", n_train) == n_train:
            phase_start = state.get("phase_start", 0)
            print(f"resuming after epoch {start_epoch}", file=sys.stderr)
        else:  # a round was added: continue from these weights with a fresh learning-rate schedule
            print(f"resuming after epoch {start_epoch} on new data ({state.get('train_sequences')} -> "
                  f"{n_train} sequences): new warm-up and cosine schedule over epochs "
                  f"{start_epoch + 1}-{epochs}", file=sys.stderr)
        if start_epoch >= epochs and phase_start == start_epoch:
            raise ConfigError("epochs", f"the checkpoint has {start_epoch} epochs already; give more to train on "
                                        "the new data")
        return start_epoch, phase_start

    def fit(self, work: Path, layers: tuple[int, ...]) -> list[dict]:
        """Train to ``opts.epochs`` (warm-up, then a cosine schedule), resuming from ``work``'s
        checkpoint; returns the validation history, one entry per epoch."""
        opts, n_train = self.opts, len(self.train.items)
        ckpt = work / "checkpoint.pt"
        start_epoch, phase_start = self.resume(ckpt, layers)
        history = json.loads((work / "history.json").read_text()) if (work / "history.json").is_file() else []
        if not history or (phase_start == start_epoch > 0 and history[-1].get("new_data") != n_train):
            history.append({"epoch": start_epoch, **self.evaluate(), "new_data": n_train})
        steps_per_epoch = len(self.train.batches(opts.batch_tokens))
        total = steps_per_epoch * (opts.epochs - phase_start)  # steps of the current schedule
        warmup = min(MAX_WARMUP, total // 10)
        bar = progress(steps_per_epoch * opts.epochs, "train", "step")
        bar.update(start_epoch * steps_per_epoch)
        step = (start_epoch - phase_start) * steps_per_epoch
        for epoch in range(start_epoch, opts.epochs):
            for sel in self.train.batches(opts.batch_tokens, random.Random(opts.seed * 1000 + epoch)):
                lr = opts.lr * min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * step / total))
                for group in self.opt.param_groups:
                    group["lr"] = lr
                loss, correct = self.loss(self.train.batch(sel, self.parts.embed), opts.feature_noise)
                self.opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.head.parameters(), 1.0)
                self.opt.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", acc0=f"{correct[0].float().mean().item():.2f}",
                                lr=f"{lr:.1e}")
            history.append({"epoch": epoch + 1, **self.evaluate()})
            bar.write(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in history[-1].items()
                                                        if k.startswith("val")))
            torch.save({"head": self.head.state_dict(), "opt": self.opt.state_dict(), "epoch": epoch + 1,
                        "rng": torch.get_rng_state(), "phase_start": phase_start, "train_sequences": n_train,
                        "feature_layers": list(layers)}, ckpt)
            (work / "history.json").write_text(json.dumps(history, indent=1))
        bar.close()
        return history
