"""How often the default target answers questions with known answers, per backend and decoding setting.

    python scripts/answer_accuracy.py [--backends ik,llamacpp,torch] [--seeds 3] [--max-new-tokens 48]

The questions are tests/data/known_answers.jsonl (30 short factual and arithmetic questions, each
with the strings a right answer contains); an answer counts as right when one of them appears in
it as a word (a number not inside a longer one). Plain decoding (speculation gives the same tokens),
the chat template applied. Settings: greedy; llama.cpp's sampling defaults as far as specdecode has
them (temperature 0.8, top-k 40, top-p 0.95; min-p it has not); SmolLM2-Instruct's model card
(temperature 0.2, top-p 0.9). Sampled settings run ``--seeds`` seeds and report the mean.
"""

import argparse
import json
import re
import statistics
from pathlib import Path

QUESTIONS = Path(__file__).resolve().parents[1] / "tests" / "data" / "known_answers.jsonl"
SETTINGS = {
    "greedy": {"temperature": 0.0},
    "llama.cpp sampling (T 0.8, top-k 40, top-p 0.95)": {"temperature": 0.8, "top_k": 40, "top_p": 0.95},
    "model card (T 0.2, top-p 0.9)": {"temperature": 0.2, "top_p": 0.9},
}


def load_questions(path: Path = QUESTIONS) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_right(answer: str, accepted: list[str]) -> bool:
    """Whether ``answer`` contains one of ``accepted`` as a word (case-insensitive)."""
    text = answer.lower()
    return any(re.search(rf"(?<![\w]){re.escape(a.lower())}(?![\w])", text) for a in accepted)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backends", default="ik,llamacpp,torch")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--show", action="store_true", help="print every answer")
    args = p.parse_args()
    from specdecode import GenerationConfig, load

    questions = load_questions()
    print(f"{len(questions)} questions from {QUESTIONS.name}, {args.max_new_tokens} new tokens, plain decoding")
    print("| backend | setting | right (of %d) |" % len(questions))
    print("| --- | --- | --- |")
    for backend in args.backends.split(","):
        dec = load(draft="none", backend=backend)
        for name, options in SETTINGS.items():
            seeds = [None] if options["temperature"] == 0 else list(range(args.seeds))
            scores = []
            for seed in seeds:
                config = GenerationConfig(max_new_tokens=args.max_new_tokens, seed=seed, **options)
                right = 0
                for q in questions:
                    text = dec.generate(q["question"], config).text
                    right += is_right(text, q["answers"])
                    if args.show:
                        print(f"  [{backend} {name} {seed}] {q['question']} -> {text[:100]!r}")
                scores.append(right)
            spread = f" ({min(scores)}-{max(scores)} over {len(scores)} seeds)" if len(scores) > 1 else ""
            print(f"| {backend} | {name} | {statistics.fmean(scores):.1f}{spread} |", flush=True)


if __name__ == "__main__":
    main()
