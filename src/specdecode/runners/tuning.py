"""Per-machine tuning of the lean runner: which product layout each block size takes, and which
block sizes are padded to a larger, cheaper one.

Timing products one by one misleads: over and over, one weight sits in a cache that a pass,
streaming hundreds of megabytes of weights, never has, and a stream of same-shaped products can
pick the slower layout. So whole forward passes are timed, with each layout, for every block size
up to ``MAX_TUNED``. The result is cached per machine, torch version, thread count and model shape
(tuning takes seconds).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .llama import LeanLlama

MAX_TUNED = 16  # block sizes up to this get their own layout choice; larger ones use x @ w.T
PAD_MARGIN = 0.95  # pad to a larger block only when its pass was measured at least 5% cheaper


@dataclass(frozen=True)
class Layouts:
    """What tuning chose for a model on this machine, by block size."""

    use_wt: list[bool]  # ``x @ w.T`` by the stored transpose, else ``(w @ x.T).T``
    pad_to: list[int]  # the block size a block is run as (``pad_sizes``)


def tune_layouts(model: LeanLlama, cache_file: Path | None = None) -> Layouts:
    """The model's ``Layouts`` from timed passes (which try each layout on it), cached in
    ``cache_file``; the model applies them."""
    shapes = sorted({tuple(lin.w.shape) for lin in model.linears()})
    key = (f"pass|{platform.processor() or platform.machine()}|{_cpu_name()}|torch{torch.__version__}|"
           f"threads{torch.get_num_threads()}|{len(model.layers)} layers|{shapes}|{model.embed.dtype}")
    table = {}
    if cache_file is not None and cache_file.is_file():
        try:
            table = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            table = {}
    if not isinstance(table.get(key), dict):
        table[key] = _time_layouts(model)
        if cache_file is not None:
            _write_atomically(cache_file, json.dumps(table))
    return Layouts(list(table[key]["use_wt"]), pad_sizes(table[key]["ms"]))


def pad_sizes(ms: list[float], margin: float = PAD_MARGIN) -> list[int]:
    """``pad_to[k]`` for blocks of 2 or more tokens: the block size p >= k to run a k-token pass as
    (k real tokens and p - k ignored ones), the cheapest p whose measured pass time ``ms[p]`` beat
    the best so far by the margin; else k. Matrix kernels work in column blocks, so a 3-token pass
    can cost more than a 4-token one. One token is never padded: plain decoding stays a 1-token pass."""
    pad_to = list(range(len(ms)))
    for k in range(2, len(ms)):
        for p in range(k + 1, len(ms)):
            if ms[p] < margin * ms[pad_to[k]]:
                pad_to[k] = p
    return pad_to


def _time_layouts(model: LeanLlama, context: int = 32, rounds: int = 3) -> dict:
    """By block size k: ``use_wt``, whether a pass over k tokens after ``context`` cached ones, all
    logits asked for (as verification asks), ran faster with ``x @ w.T`` than with ``(w @ x.T).T``
    (the two alternate, best of ``rounds`` each), and ``ms``, the faster one's time."""
    cache = model.new_cache(context + MAX_TUNED)
    ids = torch.arange(context + MAX_TUNED, device=model.device) % model.embed.shape[0]
    model.forward(ids[:context], 0, cache, 0)
    choice, ms = [True], [0.0]
    for k in range(1, MAX_TUNED + 1):
        best = {True: float("inf"), False: float("inf")}
        for _ in range(rounds):
            for transposed in best:
                model.use_wt[k] = transposed
                t = time.perf_counter()
                model.forward(ids[context:context + k], context, cache, k)
                best[transposed] = min(best[transposed], time.perf_counter() - t)
        choice.append(best[True] <= best[False])
        ms.append(1000 * min(best.values()))
    return {"use_wt": choice, "ms": ms}


def _write_atomically(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written is only a cache


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"
