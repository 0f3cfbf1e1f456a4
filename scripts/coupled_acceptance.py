"""What the coupled (Gumbel-max) rule accepts of the trained head's sampled chains on the default
target (torch backend), with the head drawing each drafted token with the noise the target's token
at that position is drawn with (``DraftPlan.noise``, what both engines do) against the head
drawing from its own generator (the batch engine before both engines shared the rule). Fixed
chains of DRAFT_LEN tokens, tree off, on the first turns of every 24th Spec-Bench question (all
categories). Acceptance does not depend on timings (fixed chains, seeded), so it compares across
machines; each request's tokens are also checked to be the same under both, and the same from the
batch engine holding it.

Usage: python scripts/coupled_acceptance.py [TEMPERATURE ...]   (default 0.7 1.0)
"""

import json
import sys

from specdecode import GenerationConfig, load
from specdecode import engine as engine_mod
from specdecode.batching.engine import BatchEngine

DRAFT_LEN, NEW_TOKENS, EVERY = 4, 96, 24
RULES = ("drafts drawn with the target's noise", "drafts drawn from their own generator")


def main() -> None:
    temperatures = [float(t) for t in sys.argv[1:]] or [0.7, 1.0]
    questions = [json.loads(line) for line in open("../shared/specbench/question.jsonl")][::EVERY]
    decoder = load(None, "head", backend="torch")
    engine = BatchEngine.for_decoder(decoder, 1)
    shared_noise = engine_mod.with_noise
    print("| temperature | head's drafts | prompts | drafted | accepted | acceptance | tokens per pass |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for t in temperatures:
        totals = {rule: [0, 0, 0, 0] for rule in RULES}
        for i, q in enumerate(questions):
            config = GenerationConfig(max_new_tokens=NEW_TOKENS, temperature=t, seed=1000 + i, policy="fixed",
                                      draft_len=DRAFT_LEN, tree=False, ignore_eos=True)
            ids = decoder.encode(q["turns"][0], True)
            outputs = []
            for rule in RULES:
                engine_mod.with_noise = shared_noise if rule == RULES[0] else (lambda plan, noise, at: plan)
                result = decoder.generate(ids, config, chat=False)
                outputs.append(result.token_ids)
                s = result.stats
                row = totals[rule]
                row[0] += s.drafted
                row[1] += s.accepted
                row[2] += s.new_tokens
                row[3] += s.steps
            engine_mod.with_noise = shared_noise
            engine.add(ids, config)
            batched = []
            while engine.running:
                for _, event in engine.step():
                    batched += event.token_ids
            if not outputs[0] == outputs[1] == batched:
                raise SystemExit(f"question {i}: the tokens differ between the rules or engines")
        for rule, (drafted, accepted, new, steps) in totals.items():
            print(f"| {t:g} | {rule} | {len(questions)} | {drafted} | {accepted} | {accepted / drafted:.3f} | "
                  f"{new / steps:.2f} |", flush=True)


if __name__ == "__main__":
    main()
