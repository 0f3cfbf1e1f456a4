"""Helpers the training stages share: progress bars, resumable JSONL files, token ids."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def progress(total, desc, unit):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)


def read_jsonl(path: Path) -> list[dict]:
    """The records a resumable stage has appended to ``path`` so far."""
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def pad_id(model, tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.eos_token_id


def eos_index(ids: list[int], eos) -> int | None:
    """Where the first end-of-sequence token sits in generated ``ids`` (None: it never ended)."""
    return next((i for i, t in enumerate(ids) if t in eos), None)


def token_ids(record: dict) -> list[int]:
    """The tokens of a self-distillation sequence: the prompt's, then the answer's."""
    return record["prompt_ids"] + record["answer_ids"]


def save_part(parts: Path, start: int, items: list) -> None:
    parts.mkdir(exist_ok=True)
    tmp = parts / f"{start}.tmp"
    torch.save(items, tmp)
    tmp.replace(parts / f"{start}.pt")


