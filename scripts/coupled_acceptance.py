"""What the coupled (Gumbel-max) rule costs in acceptance against the standard rule, for the
trained head's sampled chains on the default target (torch backend): the single-request engine
(standard rule: accept x with min(1, p(x)/q(x)), resample from the residual) against the batch
engine holding one request (coupled rule: accept x when it is the target's Gumbel-max token under
the request's position noise). Both draft fixed chains of DRAFT_LEN tokens, tree off, on the
first turns of every 24th Spec-Bench question (all categories), interleaved per prompt.

Usage: python scripts/coupled_acceptance.py [TEMPERATURE ...]   (default 0.7 1.0)
"""

import json
import sys
import time

from specdecode import GenerationConfig, load
from specdecode.batching.engine import BatchEngine

DRAFT_LEN, NEW_TOKENS, EVERY = 4, 96, 24


def main() -> None:
    temperatures = [float(t) for t in sys.argv[1:]] or [0.7, 1.0]
    questions = [json.loads(line) for line in open("../shared/specbench/question.jsonl")][::EVERY]
    decoder = load(None, "head", backend="torch")
    engine = BatchEngine.for_decoder(decoder, 1)
    print("| temperature | rule | prompts | drafted | accepted | acceptance | tokens per pass | tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for t in temperatures:
        totals = {"standard (single engine)": [0, 0, 0, 0, 0.0], "coupled (batch engine)": [0, 0, 0, 0, 0.0]}
        for i, q in enumerate(questions):
            config = GenerationConfig(max_new_tokens=NEW_TOKENS, temperature=t, seed=1000 + i, policy="fixed",
                                      draft_len=DRAFT_LEN, tree=False, ignore_eos=True)
            ids = decoder.encode(q["turns"][0], True)
            start = time.perf_counter()
            stats = decoder.generate(ids, config, chat=False).stats
            single_s = time.perf_counter() - start
            start = time.perf_counter()
            seq = engine.add(ids, config)
            while engine.running:
                engine.step()
            batch_s = time.perf_counter() - start
            for name, s, secs in (("standard (single engine)", stats, single_s),
                                  ("coupled (batch engine)", seq.stats, batch_s)):
                row = totals[name]
                row[0] += s.drafted
                row[1] += s.accepted
                row[2] += s.new_tokens
                row[3] += s.steps
                row[4] += secs
        for name, (drafted, accepted, new, steps, secs) in totals.items():
            print(f"| {t:g} | {name} | {len(questions)} | {drafted} | {accepted} | {accepted / drafted:.3f} | "
                  f"{new / steps:.2f} | {new / secs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
