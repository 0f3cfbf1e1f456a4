"""``specdecode train-draft``: train a feature draft head for a target (self-distillation)."""

from __future__ import annotations

from ..config import DEFAULT_TARGET_NAME
from ..train.options import DEFAULT_DRAFT_VOCAB, DEFAULT_FEATURE_LAYERS, TrainOptions

D = TrainOptions  # its defaults are the options' defaults


def register(sub) -> None:
    p = sub.add_parser("train-draft", help="train a feature draft head for a target (self-distillation)")
    p.add_argument(
        "--target", default=D.target, help=f"hub id, local directory or .gguf (default: {DEFAULT_TARGET_NAME})"
    )
    p.add_argument("--out", required=True, help="output directory (resumable: rerun the same command to continue)")
    p.add_argument("--prompts", type=int, default=D.prompts, help="self-distillation prompts answered greedily")
    p.add_argument(
        "--varied-prompts",
        type=int,
        default=D.varied_prompts,
        help="further prompts of other kinds, answered by sampling",
    )
    p.add_argument("--broad-prompts", type=int, default=D.broad_prompts,
                   help="prompts over topics from the target's own vocabulary, answered greedily")
    p.add_argument("--self-prompts", type=int, default=D.self_prompts,
                   help="requests the target writes itself from its chat template (Magpie), answered greedily")
    p.add_argument("--passage-prompts", type=int, default=D.passage_prompts,
                   help="requests over long contexts made of the target's answers in the other rounds (summaries, "
                        "extraction, questions over documents), answered greedily")
    p.add_argument("--init", default=D.init,
                   help="a draft head directory to train further (the shipped one: 'head'), keeping its shape and "
                        "vocabulary, instead of a new head started from the target's last layer")
    p.add_argument("--max-new-tokens", type=int, default=D.max_new_tokens, help="tokens per answer")
    p.add_argument("--batch", type=int, default=D.batch, help="generation batch size")
    p.add_argument("--epochs", type=int, default=D.epochs, help="passes over the captured features")
    p.add_argument("--batch-tokens", type=int, default=D.batch_tokens, help="training batch size, in padded positions")
    p.add_argument("--depth", type=int, default=D.depth, help="draft steps unrolled in training")
    p.add_argument("--lr", type=float, default=D.lr, help="learning rate")
    p.add_argument(
        "--inner",
        type=int,
        default=D.inner,
        help="the head's MLP width (default: the target's, copied from its last layer)",
    )
    p.add_argument(
        "--draft-vocab",
        type=int,
        default=D.draft_vocab,
        help=f"reduced output vocabulary (default {DEFAULT_DRAFT_VOCAB})",
    )
    p.add_argument("--reg-weight", type=float, default=D.reg_weight, help="weight of the feature regression loss")
    p.add_argument("--soft-labels", type=float, default=D.soft_labels,
                   help="weight in [0, 1] of the target's whole next-token distribution in the loss, against its "
                        "argmax token (0: the argmax only)")
    p.add_argument("--feature-noise", type=float, default=D.feature_noise,
                   help="uniform noise on the features the head reads in training, as a fraction of each layer's "
                        "spread (EAGLE uses 0.1; 0: none)")
    p.add_argument(
        "--feature-layers",
        default=D.feature_layers,
        help=f"target layers the head reads: '{DEFAULT_FEATURE_LAYERS}' (default), 'low-mid-last' (EAGLE-3) "
        "or numbers such as "
        "2,15 (the last layer is always read)",
    )
    p.add_argument("--seed", type=int, default=D.seed, help="seed of prompts, sampling and training")
    p.add_argument("--device", default=D.device, help="auto (a GPU where there is one), cpu or cuda[:N]")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..train import train_head

    names = TrainOptions.__dataclass_fields__
    train_head(TrainOptions(**{k: v for k, v in vars(args).items() if k in names}).validate())
    return 0
