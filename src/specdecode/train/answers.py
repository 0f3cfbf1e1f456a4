"""Stages 1-2 of training: prompts, and the target's own answers to them (resumable), with the
features and labels captured by hooks while the answers are written (``capture``)."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

import torch

from ..config import ConfigError
from ..text import chat_token_ids, eos_token_ids
from .capture import Tap
from .common import eos_index, pad_id, progress, read_jsonl, save_part, token_ids


def generate_answers(model, tokenizer, prompts: list[str], path: Path, max_new_tokens: int, batch: int,
                     temperature: float = 0.0, seed: int = 0, capture: tuple[tuple[int, ...], Path] | None = None
                     ) -> list[dict]:
    """The target's answers (greedy, or sampled at ``temperature`` from a seed per batch), appended
    to ``path`` as they come (resumable). With ``capture = (layers, parts)``, each batch's features
    and labels (see ``capture.Tap``) are saved under the directory ``parts`` as ``{first record}.pt``."""
    done = read_jsonl(path)
    todo = prompts[len(done):]
    if not todo:
        return done
    tokenizer.padding_side = "left"
    pad = pad_id(model, tokenizer)
    eos = eos_token_ids(model, tokenizer)
    bar = progress(len(prompts), f"answers -> {path.name}", "prompt")
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
            tap = Tap(model, capture[0]) if capture else contextlib.nullcontext()
            with torch.inference_mode(), tap:
                out = model.generate(
                    ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling
                )
            start, captured = len(done), []
            for b, (prompt, e, row) in enumerate(zip(chunk, encoded, out)):
                answer = row[width:].tolist()
                end = eos_index(answer, eos)
                if end is not None:
                    answer = answer[: end + 1]
                record = {"prompt": prompt, "prompt_ids": e, "answer_ids": answer,
                          "answer": tokenizer.decode(answer, skip_special_tokens=True)}
                f.write(json.dumps(record) + "\n")
                done.append(record)
                if capture:
                    captured.append((token_ids(record), *tap.sequence(b, width - len(e), len(e), len(answer), pad)))
            f.flush()
            if capture:  # after the answers: a part whose answers were lost would be recomputed anyway
                save_part(capture[1], start, captured)
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
    done = read_jsonl(path)
    seen: dict[str, None] = {}
    for record in done:
        seen.update(dict.fromkeys(record["prompts"]))
    if len(seen) >= n:
        return list(seen)[:n]
    sentinel = "\u2063SPECDECODE\u2063"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": sentinel}], add_generation_prompt=True, tokenize=False
    )
    if sentinel not in text:
        raise ConfigError("self_prompts", "the target's chat template does not place the user's text verbatim; use 0")
    prefix = tokenizer(text[: text.index(sentinel)], add_special_tokens=False, return_tensors="pt").input_ids.to(
        model.device
    )
    eos = eos_token_ids(model, tokenizer)
    pad = pad_id(model, tokenizer)
    bar = progress(n, f"self-written prompts -> {path.name}", "prompt")
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
                out = model.generate(
                    prefix.repeat(batch, 1),
                    attention_mask=torch.ones_like(prefix).repeat(batch, 1),
                    do_sample=True,
                    temperature=1.0,
                    top_p=0.95,
                    top_k=0,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad,
                )
            got = []
            for row in out[:, prefix.shape[1]:].tolist():
                end = eos_index(row, eos)
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


