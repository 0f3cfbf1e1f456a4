"""How close each backend is to the model: top-1 agreement and mean KL divergence against the torch
fp32 reference (the same GGUF weights dequantized), teacher-forced on the reference's own greedy
answers to Spec-Bench first turns.

    python scripts/fidelity.py [--dataset ../shared/specbench/question.jsonl] [--limit 2] [--max-new-tokens 64]

For each question (``--limit`` per category) the reference answers greedily; then each backend scores
prompt + answer in one ``forward`` and, at every answer position, we compare its distribution with
the reference's: top-1 agreement (same argmax) and KL(reference || backend) in nats. A backend that
does not load here is reported and skipped. Prints one row per backend and per category.
"""

import argparse
import statistics
from collections import defaultdict

import torch

from specdecode.bench import load_questions
from specdecode.config import ConfigError, GenerationConfig
from specdecode.drafters.base import NoDrafter
from specdecode.engine import SpeculativeDecoder
from specdecode.models import load_model
from specdecode.runners import make_runner


def scores(runner, ids: list[int], answer: int, vocab: int) -> torch.Tensor:
    """``[answer, vocab]`` log-probabilities at the positions that predict the answer's tokens."""
    runner.reset()
    logits = runner.forward(ids[:-1], answer)[:, :vocab]  # [answer, vocab]
    return torch.log_softmax(logits.double(), dim=-1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="../shared/specbench/question.jsonl")
    p.add_argument("--limit", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args()
    reference = load_model(None, backend="torch")
    vocab = len(reference.tokenizer)
    dec = SpeculativeDecoder(reference.model, reference.tokenizer, NoDrafter())
    others = {}
    for backend in ("llamacpp", "ik"):
        try:
            others[backend] = make_runner(load_model(None, backend=backend).model)
        except ConfigError as exc:
            print(f"{backend}: not run ({exc})")
    ref_runner = make_runner(reference.model)
    agree, kl = defaultdict(list), defaultdict(list)  # (backend, category) -> per-position values
    questions = load_questions(args.dataset, None, args.limit)
    for q in questions:
        prompt = dec.encode(q["turns"][0])
        answer = dec.generate(prompt, GenerationConfig(max_new_tokens=args.max_new_tokens)).token_ids
        ids = prompt + answer
        ref = scores(ref_runner, ids, len(answer), vocab)  # [answer, vocab]
        for name, runner in others.items():
            got = scores(runner, ids, len(answer), vocab)
            for key in ((name, q["category"]), (name, "overall")):
                agree[key] += (got.argmax(-1) == ref.argmax(-1)).tolist()
                kl[key] += (ref.exp() * (ref - got)).sum(-1).tolist()
    categories = sorted({q["category"] for q in questions}) + ["overall"]
    print(f"{len(questions)} questions, {args.max_new_tokens} greedy tokens each from the torch fp32 reference")
    print("| backend | category | positions | top-1 agreement | mean KL (nats) | median KL |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in others:
        for category in categories:
            a, k = agree[(name, category)], kl[(name, category)]
            print(f"| {name} | {category} | {len(a)} | {sum(a) / len(a):.3f} | {statistics.fmean(k):.4f} | "
                  f"{statistics.median(k):.4f} |")


if __name__ == "__main__":
    main()
