"""The same seeded sampled request through every entry point: ``specdecode generate`` (the CLI),
``serve --max-batch 1`` (one request at a time) and ``serve`` (the batch engine), alone and beside
other requests (3 and 15 others: 4 and 16 concurrent, by default). Prints each entry point's text
and whether they agree; exits 1 when they do not.

Usage: python scripts/seeded_identity.py [--backend auto|ik|llamacpp|torch] [--seed 11]
       [--temperature 0.8] [--max-tokens 48] [--beside 3,15]
"""

import argparse
import concurrent.futures
import json
import subprocess
import sys

import httpx

from specdecode.procs import free_port, start_server

PROMPT = "Write a short story about a lighthouse keeper."


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="auto")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--beside", default="3,15", help="how many other requests run beside it, comma-separated")
    args = p.parse_args()
    cli = subprocess.run([sys.executable, "-m", "specdecode", "generate", PROMPT, "--json", "--backend", args.backend,
                          "--temperature", str(args.temperature), "--seed", str(args.seed),
                          "--max-new-tokens", str(args.max_tokens)], capture_output=True, text=True, check=True)
    texts = {"generate (CLI)": json.loads(cli.stdout)["text"]}
    body = {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": args.max_tokens,
            "temperature": args.temperature, "seed": args.seed}
    beside = [int(n) for n in args.beside.split(",")]
    others = [{**body, "messages": [{"role": "user", "content": f"Name {n} animals."}], "seed": n}
              for n in range(2, 2 + max(beside))]
    for name, extra in (("serve --max-batch 1", ["--max-batch", "1"]), ("serve", [])):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc = start_server([sys.executable, "-m", "specdecode", "serve", "--port", str(port), "--model-name", "m",
                             "--backend", args.backend, *extra], base, "serve", quiet=True)
        try:
            def ask(b):
                return httpx.post(base + "/v1/chat/completions", json=b, timeout=300).json()

            texts[f"{name}, alone"] = ask(body)["choices"][0]["message"]["content"]
            for n in beside:
                with concurrent.futures.ThreadPoolExecutor(n + 1) as pool:
                    answers = list(pool.map(ask, [*others[:n], body]))
                texts[f"{name}, beside {n} others"] = answers[-1]["choices"][0]["message"]["content"]
        finally:
            proc.terminate()
            proc.wait(60)
    for name, text in texts.items():
        print(f"{name}: {text!r}")
    same = len(set(texts.values())) == 1
    print(f"backend {args.backend}, seed {args.seed}, temperature {args.temperature}: "
          f"{'one text from all ' + str(len(texts)) if same else 'the texts differ'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
