"""``specdecode train-draft``: train a feature draft head for a target by self-distillation.

Stages, each resumable (its output is kept under ``OUT/work`` and skipped when already there):

1. prompts: made from templates (``prompts``) or written by the target itself, never from the benchmark;
2. answers: the target's own greedy answers, generated in batches; a second round asks about
   passages the target wrote in the first round, so the head also learns to copy; a third round
   (``--varied-prompts``) asks further kinds of request and samples the answers (temperature 0.7)
   for variety - the labels are always the target's greedy tokens; a fourth asks about topics from
   the target's vocabulary; a fifth (``--self-prompts``) asks what the target itself writes when
   given the chat template up to the user's text (Magpie), the closest thing to real users' requests
   that needs no data from outside;
3. features: at every position, the feature ``f_t`` and the target's greedy next token (the label
   the verifier will check drafts against), captured by hooks while stage 2 generates (where an
   answer was written without them, as by an older version, one target pass per sequence);
4. training: the head learns to predict the next feature and the target's token at answer
   positions, unrolled over ``--depth`` draft steps so that it also learns to continue from its own
   predictions; checkpoints every epoch, so a stopped run resumes where it was;
5. export: ``OUT/model.safetensors`` and ``OUT/config.json`` (with the target's fingerprint).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import ConfigError


def _progress(total, desc, unit):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)


def _read_jsonl(path: Path) -> list[dict]:
    """The records a resumable stage has appended to ``path`` so far."""
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def _pad_id(model, tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.eos_token_id


def _eos_index(ids: list[int], eos) -> int | None:
    """Where the first end-of-sequence token sits in generated ``ids`` (None: it never ended)."""
    return next((i for i, t in enumerate(ids) if t in eos), None)


class _Tap:
    """Forward hooks on a Llama-family Hugging Face model that keep, at every forward pass, the
    outputs of decoder ``layers`` side by side (fp16; the last layer's before the final norm, as
    ``FastRunner.features`` gives them) and the argmax of the logits it computes: the features and
    labels of ``extract_features``, taken while ``generate`` writes the answers instead of in a
    second pass over them."""

    def __init__(self, model, layers: tuple[int, ...]):
        self.model, self.layers = model, layers
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []  # per pass: [B, T, k*H], [B, T']
        self._outputs: list[torch.Tensor] = []

    def __enter__(self):
        decoder = self.model.model.layers
        self._hooks = [decoder[i].register_forward_hook(self._layer) for i in self.layers]
        self._hooks.append(self.model.get_output_embeddings().register_forward_hook(self._logits))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()

    def _layer(self, module, inputs, output):
        self._outputs.append((output[0] if isinstance(output, tuple) else output).to(torch.float16))

    def _logits(self, module, inputs, output):  # kept on the CPU, where training reads them from
        self.steps.append((torch.cat(self._outputs, dim=-1).cpu(), output.argmax(-1).cpu()))
        self._outputs = []

    def sequence(self, row: int, pad: int, prompt_len: int, answer_len: int, filler: int):
        """Features ``[n, k*H]`` and labels ``[n]`` of row ``row`` (``pad`` pad tokens on its left),
        ``n = prompt_len + answer_len``. Pass 0 covered the prompt; pass t covers answer token t-1
        and predicts answer token t. What no pass computed (labels inside the prompt, and the last
        token's feature and label when generation stopped right after it) is never read by
        training: it is left as zeros and ``filler``."""
        n = prompt_len + answer_len
        feats = torch.zeros(n, self.steps[0][0].shape[-1], dtype=torch.float16)
        labels = torch.full((n,), filler, dtype=torch.int32)
        feats[:prompt_len] = self.steps[0][0][row, pad:]
        for t, (f, lab) in enumerate(self.steps[: answer_len + 1]):
            if t:
                feats[prompt_len + t - 1] = f[row, -1]
            labels[prompt_len + t - 1] = lab[row, -1]
        return feats, labels


def _token_ids(record: dict) -> list[int]:
    """The tokens of a self-distillation sequence: the prompt's, then the answer's."""
    return record["prompt_ids"] + record["answer_ids"]


def _save_part(parts: Path, start: int, items: list) -> None:
    parts.mkdir(exist_ok=True)
    tmp = parts / f"{start}.tmp"
    torch.save(items, tmp)
    tmp.replace(parts / f"{start}.pt")


def generate_answers(model, tokenizer, prompts: list[str], path: Path, max_new_tokens: int, batch: int,
                     temperature: float = 0.0, seed: int = 0, capture: tuple[tuple[int, ...], Path] | None = None
                     ) -> list[dict]:
    """The target's answers (greedy, or sampled at ``temperature`` from a seed per batch), appended
    to ``path`` as they come (resumable). With ``capture = (layers, parts)``, each batch's features
    and labels (see ``_Tap``) are saved under the directory ``parts`` as ``{first record}.pt``."""
    done = _read_jsonl(path)
    todo = prompts[len(done):]
    if not todo:
        return done
    from .engine import chat_token_ids, eos_token_ids

    tokenizer.padding_side = "left"
    pad = _pad_id(model, tokenizer)
    eos = eos_token_ids(model, tokenizer)
    bar = _progress(len(prompts), f"answers -> {path.name}", "prompt")
    bar.update(len(done))
    with path.open("a") as f:
        for i in range(0, len(todo), batch):
            chunk = todo[i:i + batch]
            encoded = [chat_token_ids(tokenizer, [{"role": "user", "content": p}]) for p in chunk]
            width = max(len(e) for e in encoded)
            ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=model.device)
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=model.device)
            sampling = {"do_sample": False}
            if temperature > 0:
                torch.manual_seed(seed * 100003 + len(done))
                sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
            tap = _Tap(model, capture[0]) if capture else contextlib.nullcontext()
            with torch.inference_mode(), tap:
                out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling)
            start, captured = len(done), []
            for b, (prompt, e, row) in enumerate(zip(chunk, encoded, out)):
                answer = row[width:].tolist()
                end = _eos_index(answer, eos)
                if end is not None:
                    answer = answer[: end + 1]
                record = {"prompt": prompt, "prompt_ids": e, "answer_ids": answer,
                          "answer": tokenizer.decode(answer, skip_special_tokens=True)}
                f.write(json.dumps(record) + "\n")
                done.append(record)
                if capture:
                    captured.append((_token_ids(record), *tap.sequence(b, width - len(e), len(e), len(answer), pad)))
            f.flush()
            if capture:  # after the answers: a part whose answers were lost would be recomputed anyway
                _save_part(capture[1], start, captured)
            bar.update(len(chunk))
    bar.close()
    return done


def self_prompts(model, tokenizer, n: int, path: Path, batch: int, seed: int, max_new_tokens: int = 64) -> list[str]:
    """``n`` distinct user requests written by the target itself (Magpie, Xu et al. 2024): the chat
    template up to where the user's text would begin, continued by sampling (temperature 1, top-p
    0.95) until the end of the turn. A request that does not end within ``max_new_tokens`` is
    dropped; after ``4 * ceil(n / batch) + 4`` batches the round keeps what it has, with a warning
    (a model that does not end its turns would loop for ever). Batches are appended to ``path`` as
    they come (resumable, a seed per batch)."""
    from .engine import eos_token_ids

    done = _read_jsonl(path)
    seen: dict[str, None] = {}
    for record in done:
        seen.update(dict.fromkeys(record["prompts"]))
    if len(seen) >= n:
        return list(seen)[:n]
    sentinel = "\u2063SPECDECODE\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], add_generation_prompt=True, tokenize=False)
    if sentinel not in text:
        raise ConfigError("self_prompts", "the target's chat template does not place the user's text verbatim; use 0")
    prefix = tokenizer(text[: text.index(sentinel)], add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
    eos = eos_token_ids(model, tokenizer)
    pad = _pad_id(model, tokenizer)
    bar = _progress(n, f"self-written prompts -> {path.name}", "prompt")
    bar.update(len(seen))
    with path.open("a") as f:
        while len(seen) < n:
            k = len(done)
            if k >= 4 * math.ceil(n / batch) + 4:
                bar.write(f"warning: the target wrote {len(seen)} usable requests of {n} in {k} batches; "
                          "training on those (few turns ended within the length limit)", file=sys.stderr)
                break
            torch.manual_seed(seed * 100003 + k)
            with torch.inference_mode():
                out = model.generate(prefix.repeat(batch, 1), attention_mask=torch.ones_like(prefix).repeat(batch, 1),
                                     do_sample=True, temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=max_new_tokens,
                                     pad_token_id=pad)
            got = []
            for row in out[:, prefix.shape[1]:].tolist():
                end = _eos_index(row, eos)
                prompt = tokenizer.decode(row[:end], skip_special_tokens=True).strip() if end is not None else ""
                if len(prompt) >= 8 and prompt not in seen:
                    got.append(prompt)
                    seen[prompt] = None
            record = {"batch": k, "prompts": got}
            f.write(json.dumps(record) + "\n")
            f.flush()
            done.append(record)
            bar.update(min(len(got), n - bar.n))
    bar.close()
    return list(seen)[:n]


def _captured(parts: Path | None, records: list[dict]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Features and labels that ``generate_answers`` captured, by record index; a part that does
    not match its records (answers regenerated after a stop) is ignored."""
    got = {}
    for part in sorted(parts.glob("*.pt")) if parts is not None and parts.is_dir() else []:
        start = int(part.stem)
        for k, (ids, f, lab) in enumerate(torch.load(part), start):
            if k < len(records) and ids == _token_ids(records[k]) and len(f) == len(ids):
                got[k] = (f, lab)
    return got


def extract_features(model, records: list[dict], path: Path, layers: tuple[int, ...], parts: Path | None = None):
    """Per sequence: features ``[L, len(layers) * H]`` (fp16; the outputs of decoder ``layers``
    side by side) and the target's greedy next token ``[L]`` (at least from the last prompt position
    on, where the head is trained). Those captured while the answers were written (``parts``) are
    taken as they are; the rest come from one lean-runner pass per sequence. Saved to ``path``; a
    round grown since (a larger ``--broad-prompts``, say) gets its new sequences appended."""
    data = torch.load(path) if path.is_file() else {"features": [], "labels": [], "tokens": []}
    have = len(data["tokens"])
    for k, (r, t) in enumerate(zip(records, data["tokens"])):
        if t.tolist() != _token_ids(r):
            raise ConfigError("out", f"{path} does not hold the features of {path.parent}'s answers (sequence {k} "
                                     "differs); remove it to extract them again")
    if have >= len(records):
        return data
    from .fastllama import FastRunner
    from .runner import lean_model

    captured = _captured(parts, records)
    runner = None
    bar = _progress(len(records), f"features -> {path.name}", "seq")
    bar.update(have)
    for k, r in enumerate(records[have:], have):
        ids = _token_ids(r)
        if k in captured:
            f, lab = captured[k]
        else:
            if runner is None:
                runner = FastRunner(lean_model(model), capacity=512)
                runner.capture_layers(layers)
            runner.reset()
            logits = runner.forward(ids, num_logits=len(ids))
            f, lab = runner.features(0, len(ids)).to("cpu", torch.float16).clone(), logits.argmax(-1).to(torch.int32)
        data["features"].append(f)
        data["labels"].append(lab)
        data["tokens"].append(torch.tensor(ids, dtype=torch.int32))
        bar.update(1)
    bar.close()
    torch.save(data, path)
    if parts is not None and parts.is_dir():
        shutil.rmtree(parts)
    return data


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


def distill_loss(logits: torch.Tensor, labels: torch.Tensor, target_probs: torch.Tensor | None, soft: float) -> torch.Tensor:
    """Cross-entropy of the head's ``logits`` ``[N, V']`` against the target: its argmax ``labels``
    ``[N]`` with weight ``1 - soft`` and its whole distribution ``target_probs`` ``[N, V']`` with
    weight ``soft`` (EAGLE's and DistillSpec's soft labels: the head also learns how sure the target
    is and what came second, which the argmax alone does not say)."""
    hard = F.cross_entropy(logits, labels)
    if not soft:
        return hard
    full = -(target_probs * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    return full if soft == 1 else (1 - soft) * hard + soft * full


def train_head(args) -> Path:
    from .drafters.feature import FeatureHead, TargetParts, save_feature_draft
    from .fastllama import supports
    from .models import load_model
    from .prompts import broad_prompts, grounded_prompts, passage_prompts, seed_prompts, varied_prompts, vocabulary_words

    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    target = load_model(args.target, param="target", dtype="float32", device=args.device)
    model, tok = target.model, target.tokenizer
    device = model.device
    if not supports(model):  # the feature pass and drafting both read features from the lean runner
        raise ConfigError("target", "train-draft needs a Llama-family target (llama, mistral: plain RoPE, no biases); "
                                    f"got {model.config.model_type}")
    n_layers = model.config.num_hidden_layers
    init, init_cfg = _init_head(args, model) if args.init else (None, None)
    layers = init.head.feature_layers if init else feature_layers(args.feature_layers or DEFAULT_FEATURE_LAYERS, n_layers)
    tag = "" if layers == (n_layers - 1,) else "_layers" + "-".join(map(str, layers))

    def features_file(number: int, suffix: str) -> Path:  # named by the layers they hold
        return work / f"features_{number}{tag}{suffix}"

    # 1-2. prompts and answers, in numbered rounds: greedy answers to template prompts, then
    # questions about passages the target wrote, then (sampled, for variety) further kinds of
    # request, then requests over the target's vocabulary, then requests the target wrote itself
    rounds: dict[int, list[dict]] = {}
    passages: list[str] = []

    def answers(number: int, prompts: list[str], **sampling) -> list[dict]:
        # features and labels are captured as the answers are written (stage 3 in the same pass)
        return generate_answers(model, tok, prompts, work / f"answers_{number}.jsonl", args.max_new_tokens, args.batch,
                                capture=(layers, features_file(number, ".parts")), **sampling)

    if args.prompts:
        n_seed = max(1, int(args.prompts * 0.7))
        rounds[1] = answers(1, seed_prompts(n_seed, args.seed))
        passages = [r["answer"] for r in rounds[1] if r["prompt"].startswith(("Write a paragraph", "What is the history", "Explain"))
                    and len(r["answer"]) > 200] or [r["answer"] for r in rounds[1] if r["answer"]]
        if args.prompts > n_seed:
            rounds[2] = answers(2, passage_prompts(passages, args.prompts - n_seed, args.seed + 1))
    if args.varied_prompts:
        rounds[3] = answers(3, varied_prompts(args.varied_prompts, args.seed + 2, passages), temperature=0.7, seed=args.seed + 2)
    if args.broad_prompts:
        rounds[4] = answers(4, broad_prompts(args.broad_prompts, args.seed + 3, vocabulary_words(tok), passages))
    if args.self_prompts:
        requests = self_prompts(model, tok, args.self_prompts, work / "prompts_5.jsonl", args.batch, args.seed + 4)
        if requests:
            rounds[5] = answers(5, requests)
    if not rounds:
        raise ConfigError("self_prompts", "the target wrote no usable requests; add template rounds (--prompts)")
    if args.passage_prompts:  # long contexts made of the target's answers in the rounds above
        sources = [(r["prompt"], r["answer"]) for records in rounds.values() for r in records if len(r["answer"]) >= 300]
        if not sources:
            raise ConfigError("passage_prompts", "the other rounds wrote no answers long enough (300+ characters) to "
                                                 "ask about; add a round (--self-prompts, --prompts)")
        rounds[6] = answers(6, grounded_prompts(sources, args.passage_prompts, args.seed + 5))

    # 3. features, as captured with the answers (or one target pass per sequence where they were
    # not, as for answers written before); 5% of each round held out for validation (per round, so
    # that adding a round leaves the earlier rounds' split as it was)
    val_items, items = [], []
    for number, records in rounds.items():
        data = extract_features(model, records, features_file(number, ".pt"), layers, features_file(number, ".parts"))
        got = [(f, lab, t, len(rec["prompt_ids"])) for f, lab, t, rec in
               zip(data["features"], data["labels"], data["tokens"], records)]
        random.Random(args.seed * 1000 + number - 1).shuffle(got)
        n_val = max(1, len(got) // 20)
        val_items += got[:n_val]
        items += got[n_val:]

    # reduced vocabulary: the tokens the target itself predicts most often in answers (always EOS);
    # a head trained further (--init) keeps its own
    vocab_size = model.config.vocab_size
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for f, lab, t, prompt_len in items:
        counts += torch.bincount(lab[max(0, prompt_len - 1):-1].long(), minlength=vocab_size)  # the labels training reads
    eos = model.config.eos_token_id
    counts[eos] = counts.max() + 1
    if init:
        vocab_ids = init.parts.vocab_ids.cpu()
    else:
        vocab_ids = torch.argsort(counts, descending=True)[: args.draft_vocab or DEFAULT_DRAFT_VOCAB].sort().values
    vocab_map = torch.full((vocab_size,), -100, dtype=torch.long)
    vocab_map[vocab_ids] = torch.arange(len(vocab_ids))
    coverage = float(counts[vocab_ids].sum() - counts[eos]) / max(1.0, float(counts.sum() - counts[eos]))
    hidden = model.config.hidden_size
    val, train = Sequences(val_items, vocab_map, hidden), Sequences(items, vocab_map, hidden)

    parts = TargetParts(model, vocab_ids)
    head = init.head.float().train() if init else FeatureHead.for_target(model, args.inner, layers)
    head = head.to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.0)
    ckpt = work / "checkpoint.pt"
    start_epoch = phase_start = 0
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu")  # a run stopped on one device resumes on another
        trained = tuple(state.get("feature_layers", (n_layers - 1,)))
        if trained != layers:
            raise ConfigError("feature_layers", f"{ckpt} was trained reading layers {trained}, not {layers}; "
                                                "give the same --feature-layers or another --out")
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        start_epoch = phase_start = state["epoch"]
        torch.set_rng_state(state["rng"])
        if state.get("train_sequences", len(train.items)) == len(train.items):
            phase_start = state.get("phase_start", 0)
            print(f"resuming after epoch {start_epoch}", file=sys.stderr)
        else:  # a round was added: continue from these weights with a fresh learning-rate schedule
            print(f"resuming after epoch {start_epoch} on new data ({state.get('train_sequences')} -> "
                  f"{len(train.items)} sequences): new warm-up and cosine schedule over epochs "
                  f"{start_epoch + 1}-{args.epochs}", file=sys.stderr)
    if start_epoch >= args.epochs and phase_start == start_epoch:
        raise ConfigError("epochs", f"the checkpoint has {start_epoch} epochs already; give more to train on the new data")

    # features of a Llama's last layer are large and uneven; the regression works in units of
    # their overall spread so that it neither swamps nor vanishes beside the cross-entropy
    sample = torch.cat([it[0][:64].float() for it in train.items[:256]])
    scale = float(sample[:, -hidden:].std())
    # --feature-noise: uniform noise on the features the head reads, in units of each layer's spread
    # (EAGLE trains so): at drafting time it reads features of text unlike its training data
    spread = sample.view(len(sample), -1, hidden).std(dim=(0, 2)).repeat_interleave(hidden).to(device)
    weights = [0.8 ** s for s in range(args.depth)]

    def loss_fn(batch, noise: float = 0.0):
        f, emb, f_next, y, mask = batch
        if noise:
            f = f + (torch.rand_like(f) * 2 - 1) * (noise * spread)
        outs = head(f, emb, depth=args.depth)
        yy, fm, total, correct = y[mask], f_next[mask], 0.0, []
        soft = None
        if args.soft_labels:  # the target's whole distribution (over the draft vocabulary), read off its own feature
            with torch.no_grad():
                soft = torch.softmax(parts.logits(fm), dim=-1)
        for w, g in zip(weights, outs):
            gm = g[mask]
            logits = parts.logits(gm)
            ce = distill_loss(logits, yy, soft, args.soft_labels)
            total = total + w * (ce + args.reg_weight * F.smooth_l1_loss(gm / scale, fm / scale))
            correct.append(logits.argmax(-1) == yy)
        return total, correct

    def evaluate() -> dict:
        """Loss, accuracy per draft depth, and the expected accepted draft length over answer positions."""
        loss, n, hits, accepted, starts = 0.0, 0, [0] * args.depth, 0.0, 0
        with torch.no_grad():
            for sel in val.batches(args.batch_tokens):
                batch = val.batch(sel, parts.embed)
                mask = batch[-1]
                l, correct = loss_fn(batch)
                ok = []
                for s, c in enumerate(correct):  # back from answer positions to [B, T]
                    right = torch.zeros_like(mask)
                    right[mask] = c
                    hits[s] += int(c.sum())
                    ok.append(right)
                m = int(mask.sum())
                loss, n = loss + float(l) * m, n + m
                # a draft starting at index j gets token s+1 right when depth s is right at j+s
                run = mask.clone()
                for s in range(args.depth):
                    shifted = torch.zeros_like(run)
                    shifted[:, : run.shape[1] - s] = ok[s][:, s:]
                    run &= shifted
                    accepted += float(run.sum())
                starts += m
        return {"val_loss": loss / max(1, n), **{f"val_acc_depth{s}": hits[s] / max(1, n) for s in range(args.depth)},
                "val_accepted_per_draft": accepted / max(1, starts)}

    history = json.loads((work / "history.json").read_text()) if (work / "history.json").is_file() else []
    if not history or (phase_start == start_epoch > 0 and history[-1].get("new_data") != len(train.items)):
        history.append({"epoch": start_epoch, **evaluate(), "new_data": len(train.items)})
    steps_per_epoch = len(train.batches(args.batch_tokens))
    total = steps_per_epoch * (args.epochs - phase_start)  # steps of the current schedule
    warmup = min(50, total // 10)
    bar = _progress(steps_per_epoch * args.epochs, "train", "step")
    bar.update(start_epoch * steps_per_epoch)
    step = (start_epoch - phase_start) * steps_per_epoch
    for epoch in range(start_epoch, args.epochs):
        for sel in train.batches(args.batch_tokens, random.Random(args.seed * 1000 + epoch)):
            lr = args.lr * min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * step / total))
            for group in opt.param_groups:
                group["lr"] = lr
            loss, correct = loss_fn(train.batch(sel, parts.embed), args.feature_noise)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc0=f"{correct[0].float().mean().item():.2f}", lr=f"{lr:.1e}")
        history.append({"epoch": epoch + 1, **evaluate()})
        bar.write(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in history[-1].items() if k.startswith("val")))
        torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "epoch": epoch + 1, "rng": torch.get_rng_state(),
                    "phase_start": phase_start, "train_sequences": len(train.items), "feature_layers": list(layers)}, ckpt)
        (work / "history.json").write_text(json.dumps(history, indent=1))
    bar.close()

    meta = {
        "target": args.target or "default",
        "trained_with": {k: getattr(args, k) for k in ("prompts", "varied_prompts", "broad_prompts", "self_prompts", "passage_prompts", "max_new_tokens",
                                                       "epochs", "lr", "batch_tokens", "depth", "inner", "draft_vocab", "reg_weight", "soft_labels",
                                                       "feature_noise", "feature_layers", "seed", "init")},
        **({"init_trained_with": init_cfg.get("trained_with")} if init else {}),
        "train_sequences": len(train.items),
        "train_positions": sum(int(it[0].shape[0]) - it[3] for it in train.items),
        "draft_vocab_coverage": coverage,
        "history": history,
    }
    save_feature_draft(out, head, vocab_ids, model, meta)
    last = history[-1]
    print(f"wrote {out}: validation accuracy by draft depth "
          + " ".join(f"{last[f'val_acc_depth{s}']:.3f}" for s in range(args.depth))
          + f", {last['val_accepted_per_draft']:.2f} tokens accepted per {args.depth}-token draft; "
          f"draft vocabulary covers {coverage:.3f} of the target's answer tokens", file=sys.stderr)
    return out


# --draft-vocab and --feature-layers default to None so that --init can tell "not given" from a
# conflicting value; a new head takes these
DEFAULT_DRAFT_VOCAB = 8192
DEFAULT_FEATURE_LAYERS = "last"


def _init_head(args, model):
    """``--init DIR``: the draft head in DIR, to train further, and its config; refused when it was
    trained for another target, or when ``--inner``, ``--draft-vocab`` or ``--feature-layers`` ask
    for another shape than it has (it keeps its own)."""
    from .drafters.feature import draft_config, is_feature_draft, load_feature_draft

    if not is_feature_draft(args.init):
        raise ConfigError("init", f"{args.init} is not a draft head directory (config.json and model.safetensors "
                                  "written by specdecode train-draft)")
    init = load_feature_draft(args.init, model, param="init")
    cfg = draft_config(args.init)
    n_layers = model.config.num_hidden_layers
    layers = init.head.feature_layers
    asked = {"inner": (args.inner, cfg["inner_size"]), "draft_vocab": (args.draft_vocab, cfg["draft_vocab_size"]),
             "feature_layers": (args.feature_layers and feature_layers(args.feature_layers, n_layers), layers)}
    for name, (given, has) in asked.items():
        if given is not None and given != has:
            raise ConfigError(name, f"the head given by --init has {has}; leave --{name.replace('_', '-')} out or give that")
    return init, cfg


def feature_layers(spec: str, n_layers: int) -> tuple[int, ...]:
    """``--feature-layers``: ``last``; ``low-mid-last`` (EAGLE-3's three: layer 2, the middle one
    and the last); or decoder layer numbers, comma-separated (the last layer is always added)."""
    last = n_layers - 1
    if spec == "last":
        return (last,)
    if spec == "low-mid-last":
        return tuple(sorted({min(2, last), n_layers // 2, last}))
    try:
        numbers = {int(x) for x in spec.split(",")}
    except ValueError:
        numbers = {-1}
    if not numbers or not all(0 <= n <= last for n in numbers):
        raise ConfigError("feature_layers", f"must be 'last', 'low-mid-last' or layer numbers 0-{last} separated by "
                                            f"commas (got {spec!r})")
    return tuple(sorted(numbers | {last}))


def cmd_train(args) -> int:
    for name, low in (("prompts", 0), ("varied_prompts", 0), ("broad_prompts", 0), ("self_prompts", 0), ("passage_prompts", 0),
                      ("max_new_tokens", 1), ("epochs", 1), ("batch", 1), ("batch_tokens", 16), ("depth", 1), ("draft_vocab", 16)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            raise ConfigError(name, f"must be >= {low} (got {getattr(args, name)})")
    if args.prompts + args.varied_prompts + args.broad_prompts + args.self_prompts < 2:
        raise ConfigError("prompts", "the rounds together must have at least 2 prompts (--prompts, --varied-prompts, "
                                     "--broad-prompts, --self-prompts); --passage-prompts asks about their answers")
    if args.inner is not None and args.inner < 1:
        raise ConfigError("inner", f"must be >= 1 (got {args.inner})")
    if not args.lr > 0:
        raise ConfigError("lr", f"must be > 0 (got {args.lr})")
    if not 0.0 <= args.soft_labels <= 1.0:
        raise ConfigError("soft_labels", f"must be a weight in [0, 1] (got {args.soft_labels})")
    if args.init == "head":
        from .api import SHIPPED_HEAD

        args.init = str(SHIPPED_HEAD)
    if not 0.0 <= args.feature_noise < 10.0:
        raise ConfigError("feature_noise", f"must be a fraction of the features' spread in [0, 10) (got {args.feature_noise})")
    train_head(args)
    return 0


def register(sub) -> None:
    p = sub.add_parser("train-draft", help="train a feature draft head for a target (self-distillation)")
    p.add_argument("--target", default=None, help="hub id, local directory or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="output directory (resumable: rerun the same command to continue)")
    p.add_argument("--prompts", type=int, default=1200, help="self-distillation prompts answered greedily")
    p.add_argument("--varied-prompts", type=int, default=1024, help="further prompts of other kinds, answered by sampling")
    p.add_argument("--broad-prompts", type=int, default=2048,
                   help="prompts over topics from the target's own vocabulary, answered greedily")
    p.add_argument("--self-prompts", type=int, default=0,
                   help="requests the target writes itself from its chat template (Magpie), answered greedily")
    p.add_argument("--passage-prompts", type=int, default=0,
                   help="requests over long contexts made of the target's answers in the other rounds (summaries, "
                        "extraction, questions over documents), answered greedily")
    p.add_argument("--init", default=None,
                   help="a draft head directory to train further (the shipped one: 'head'), keeping its shape and "
                        "vocabulary, instead of a new head started from the target's last layer")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=32, help="generation batch size")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-tokens", type=int, default=1024, help="training batch size, in padded positions")
    p.add_argument("--depth", type=int, default=3, help="draft steps unrolled in training")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--inner", type=int, default=None, help="the head's MLP width (default: the target's, copied from its last layer)")
    p.add_argument("--draft-vocab", type=int, default=None, help=f"reduced output vocabulary (default {DEFAULT_DRAFT_VOCAB})")
    p.add_argument("--reg-weight", type=float, default=0.5, help="weight of the feature regression loss")
    p.add_argument("--soft-labels", type=float, default=0.0,
                   help="weight in [0, 1] of the target's whole next-token distribution in the loss, against its "
                        "argmax token (0: the argmax only)")
    p.add_argument("--feature-noise", type=float, default=0.0,
                   help="uniform noise on the features the head reads in training, as a fraction of each layer's "
                        "spread (EAGLE uses 0.1; 0: none)")
    p.add_argument("--feature-layers", default=None,
                   help=f"target layers the head reads: '{DEFAULT_FEATURE_LAYERS}' (default), 'low-mid-last' (EAGLE-3) or numbers such as "
                        "2,15 (the last layer is always read)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (a GPU where there is one), cpu or cuda[:N]")
    p.set_defaults(func=cmd_train)
