"""Teacher-forced agreement of draft heads with the default target, on requests that are not
Spec-Bench: how often a head's first draft token is the target's greedy token, read off one
target pass over the target's own greedy answer (no drafting loop), split by how sure the target
is of that token (its top-1 probability there).

    python scripts/head_agreement.py                          # the shipped head, scripts/own_requests.json
    python scripts/head_agreement.py --head DIR --head head   # several heads side by side
    python scripts/head_agreement.py --answers WORK/answers_5.jsonl --limit 60   # a train-draft round's answers

The README's "How far the head's own validation carries" figures come from this script.
"""

import argparse
import json
from pathlib import Path

import torch

import specdecode
from specdecode.api import SHIPPED_HEAD
from specdecode.config import GenerationConfig
from specdecode.drafters.head_file import load_feature_draft
from specdecode.runners import make_runner

EDGES = [0.0, 0.3, 0.5, 0.7, 0.9, 1.01]


def sequences(dec, args) -> dict[str, list[tuple[int, list[int]]]]:
    """(prompt length, prompt + greedy answer ids) per request, by group."""
    if args.answers:  # a train-draft work file: the answers are already the target's greedy ones
        rows = [json.loads(line) for line in open(args.answers)][: args.limit]
        return {Path(args.answers).name: [(len(r["prompt_ids"]), r["prompt_ids"] + r["answer_ids"]) for r in rows]}
    groups = json.loads(Path(args.requests).read_text())
    out = {}
    for name, prompts in groups.items():
        out[name] = []
        for prompt in prompts[: args.limit]:
            ids = dec.encode(prompt)
            res = dec.generate(prompt, GenerationConfig(max_new_tokens=args.max_new_tokens))
            out[name].append((len(ids), ids + list(res.token_ids)))
    return out


@torch.inference_mode()
def agreement(model, head, seqs) -> tuple[list[int], list[int], float]:
    """Per sureness bin: positions and hits; and the target's mean top-1 probability."""
    hits, total, sure = [0] * (len(EDGES) - 1), [0] * (len(EDGES) - 1), 0.0
    for n_prompt, seq in seqs:
        runner = make_runner(model)
        runner.capture_layers(head.head.feature_layers)
        logits = runner.forward(seq, len(seq))
        features = runner.features(0, len(seq))
        cache = head.head.new_cache(len(seq) + 8)
        # index i reads the target's feature at i and token i+1, and guesses token i+2
        g = head.head.step(head.head.mix(features[:-1]), head.parts.embed[torch.tensor(seq[1:])], 0, cache)
        guess = head.parts.vocab_ids[head.parts.logits(g).float().argmax(-1)]
        top1 = torch.softmax(logits.float(), -1).max(-1).values  # top1[j]: the target's sureness of token j+1
        for i in range(n_prompt - 2, len(seq) - 2):
            p = float(top1[i + 1])
            b = next(k for k in range(len(EDGES) - 1) if EDGES[k] <= p < EDGES[k + 1])
            total[b] += 1
            hits[b] += int(guess[i]) == seq[i + 2]
            sure += p
    return hits, total, sure / max(1, sum(total))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--head", action="append", help="a trained head's directory, or 'head' (the shipped one); repeatable"
    )
    p.add_argument("--requests", default=str(Path(__file__).with_name("own_requests.json")),
                   help="JSON object: group name -> list of requests")
    p.add_argument("--answers", help="a train-draft answers_N.jsonl instead of --requests")
    p.add_argument("--limit", type=int, default=None, help="at most N requests per group")
    p.add_argument("--max-new-tokens", type=int, default=128)
    args = p.parse_args()
    dec = specdecode.load(draft="none")
    groups = sequences(dec, args)
    for path in args.head or ["head"]:
        head = load_feature_draft(str(SHIPPED_HEAD) if path == "head" else path, dec.model)
        print(f"== {path}")
        for name, seqs in groups.items():
            hits, total, sure = agreement(dec.model, head, seqs)
            n = sum(total)
            bins = "  ".join(
                f"[{EDGES[k]:.1f},{min(EDGES[k + 1], 1.0):.1f}): {hits[k] / total[k]:.2f} ({total[k] / n:.2f})"
                for k in range(len(total))
                if total[k]
            )
            print(f"{name}: {len(seqs)} requests, {n} positions, agreement {sum(hits) / n:.3f}, "
                  f"target's mean top-1 {sure:.2f}\n   by target top-1 (share of positions): {bins}")


if __name__ == "__main__":
    main()
