"""Options several subcommands share, with their defaults read from the library's."""

from __future__ import annotations

import argparse

from ..config import (
    BACKENDS,
    DEFAULT_BACKEND,
    DEFAULT_DEVICE,
    DEFAULT_DRAFT,
    DEFAULT_DTYPE,
    DEFAULT_TARGET_HELP,
    DEFAULTS,
    DTYPE_NAMES,
    POLICIES,
    TREE_CHOICES,
    GenerationConfig,
)

TREE_NAMES = {value: name for name, value in TREE_CHOICES.items()}  # GenerationConfig.tree -> --tree


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None,
                   help=f"hub id, local directory or .gguf file (default: {DEFAULT_TARGET_HELP})")
    p.add_argument("--draft", default=DEFAULT_DRAFT,
                   help="none (plain decoding), ngram (prompt lookup), head (the shipped draft head of the default "
                        "target), head+ngram (the head, or a long n-gram match when the context has one), auto "
                        "(head+ngram on the default target on the torch backend, ngram otherwise), or a draft "
                        "model / trained head path, PATH+ngram to prefer n-gram matches with it "
                        "(default: %(default)s)")
    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=BACKENDS,
                   help="torch, llamacpp or ik (a GGUF file in its own quantization, through llama.cpp or "
                        "ik_llama.cpp) or auto (default: for a GGUF target ik where it loads and passes a check "
                        "pass here, else llamacpp; torch otherwise)")
    p.add_argument("--threads", type=int, default=None,
                   help="llama.cpp's or ik_llama.cpp's threads (default: the machine's cores)")
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=DTYPE_NAMES,
                   help="a torch target's (default: %(default)s)")
    p.add_argument("--device", default=DEFAULT_DEVICE, help="auto, cpu or cuda[:N] (default: %(default)s)")


def add_sampling_args(p: argparse.ArgumentParser, defaults: GenerationConfig = DEFAULTS) -> None:
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=defaults.top_k, help="0 = off")
    p.add_argument("--top-p", type=float, default=defaults.top_p, help="in (0, 1]; 1 = off")
    p.add_argument("--seed", type=int, default=defaults.seed, help="same seed, same output")
    add_speculation_args(p, defaults)
    p.add_argument("--confidence", type=float, default=defaults.confidence,
                   help="threshold for --policy confidence (default: %(default)s)")
    p.add_argument("--tree", default=TREE_NAMES[defaults.tree], choices=TREE_CHOICES,
                   help="the trained head drafts a tree of alternatives (on) or one chain (off); auto (default): "
                        "trees under greedy decoding, chains under sampling")
    p.add_argument("--no-tree", dest="tree", action="store_const", const="off", help="same as --tree off")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")


def add_speculation_args(p: argparse.ArgumentParser, defaults: GenerationConfig = DEFAULTS) -> None:
    p.add_argument("--draft-len", type=int, default=defaults.draft_len,
                   help="largest draft block, tau (default: %(default)s)")
    p.add_argument("--policy", default=defaults.policy, choices=POLICIES,
                   help="how tau is chosen each step (default: %(default)s)")


def config_from_args(args) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
        draft_len=args.draft_len,
        policy=args.policy,
        confidence=args.confidence,
        ignore_eos=args.ignore_eos,
        tree=TREE_CHOICES[args.tree],
    ).validate()
