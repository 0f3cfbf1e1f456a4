"""``python -m specdecode.runners.ik_probe FILE.gguf``: what ``ik_api.probe`` checks, in a process
of its own (a library built for another CPU kills the process that runs it).

It scores ``PROBE_TOKENS`` tokens of the file one at a time, then blocks of each of ``SIZES``
tokens from the first position and from the middle of that context, and prints as JSON the
longest block length up to which every block's logits are bit-identical to the 1-token passes'.
Speculation is exact only where they are (a drafted block scored in one pass must give what
plain decoding would), and a build whose longer passes take another kernel breaks that: the
prebuilt ik_llama.cpp 0.1.5 repacks the weights for products of 32 or more rows, so its passes of
32+ tokens give other logits (on Q4_1, off by up to ~40: that kernel dropped a row's last blocks,
which our patch 0003 mends). Our build with the switch off (``ik_api.NEVER_REPACK``) matches at
every length.
"""

from __future__ import annotations

import json
import sys

import torch

from ..config import MAX_BLOCK

PROBE_TOKENS = 128  # the context the blocks are checked in
SIZES = (2, 3, 4, 8, 16, 24, 31, 32, 48, 64)  # block lengths checked, ascending
MIDDLE = PROBE_TOKENS - SIZES[-1]  # where the second block of each length starts


def exact_block(runner, vocab: int) -> int:
    """The longest of ``SIZES`` up to which every block matched its 1-token passes (1: none did;
    ``MAX_BLOCK`` when all did)."""
    ids = torch.randint(100, vocab, (PROBE_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()
    runner.reset()
    one = torch.cat([runner.forward([token], 1) for token in ids])  # [PROBE_TOKENS, vocab]
    if not torch.isfinite(one).all():
        raise SystemExit("1-token passes gave non-finite logits")
    def matches(start: int, size: int) -> bool:  # the cache holds at least ``start`` tokens
        runner.truncate(start)
        return torch.equal(runner.forward(ids[start:start + size], size), one[start:start + size])

    in_middle = [size for size in SIZES if matches(MIDDLE, size)]
    from_start = [size for size in SIZES if matches(0, size)]
    longest = 1
    for size in SIZES:
        if size not in in_middle or size not in from_start:
            return longest
        longest = size
    return MAX_BLOCK


def main(path: str) -> int:
    from .ik import IkModel
    from .llamacpp import LlamaCppRunner

    model = IkModel(path, context=PROBE_TOKENS, max_block=MAX_BLOCK)
    longest = exact_block(LlamaCppRunner(model), model.config.vocab_size)
    ok = longest >= 2
    reason = "" if ok else "no 2-token pass gives its 1-token logits here: speculation would not be exact"
    print(json.dumps({"ok": ok, "reason": reason, "exact_block": longest}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
