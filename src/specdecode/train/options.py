"""The settings of ``specdecode train-draft``: one dataclass, its defaults named once (the CLI's
help reads them), validated in one place."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DEFAULT_DEVICE, ConfigError

# --draft-vocab, --inner and --feature-layers default to None so that --init can tell "not given"
# from a conflicting value; a new head takes these
DEFAULT_DRAFT_VOCAB = 8192
DEFAULT_FEATURE_LAYERS = "last"


@dataclass
class TrainOptions:
    out: str  # output directory; rerunning with the same one resumes
    target: str | None = None  # hub id, local directory or .gguf (None: the default target)
    prompts: int = 1200  # template prompts answered greedily (70%), then questions about passages (30%)
    varied_prompts: int = 1024  # further kinds of request, answers sampled at temperature 0.7
    broad_prompts: int = 2048  # requests over topics from the target's own vocabulary
    self_prompts: int = 0  # requests the target writes itself from its chat template (Magpie)
    passage_prompts: int = 0  # requests over long contexts made of the other rounds' answers
    init: str | None = None  # a head directory to train further ("head": the shipped one)
    max_new_tokens: int = 128  # answer length
    batch: int = 32  # generation batch size
    epochs: int = 8
    batch_tokens: int = 1024  # training batch size, in padded positions
    depth: int = 3  # draft steps unrolled in training (EAGLE-3's training-time test)
    lr: float = 1e-3
    inner: int | None = None  # the head's MLP width (None: the target's, copied from its last layer)
    draft_vocab: int | None = None  # reduced output vocabulary (None: DEFAULT_DRAFT_VOCAB)
    reg_weight: float = 0.5  # weight of the feature regression loss
    soft_labels: float = 0.0  # weight in [0, 1] of the target's whole distribution in the loss
    feature_noise: float = 0.0  # uniform noise on training features, as a fraction of each layer's spread
    feature_layers: str | None = None  # 'last', 'low-mid-last' or layer numbers (None: DEFAULT_FEATURE_LAYERS)
    seed: int = 0
    device: str = DEFAULT_DEVICE

    def validate(self) -> "TrainOptions":
        for name, low in (("prompts", 0), ("varied_prompts", 0), ("broad_prompts", 0), ("self_prompts", 0),
                          ("passage_prompts", 0), ("max_new_tokens", 1), ("epochs", 1), ("batch", 1),
                          ("batch_tokens", 16), ("depth", 1), ("draft_vocab", 16), ("inner", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(name, f"must be >= {low} (got {value})")
        if self.prompts + self.varied_prompts + self.broad_prompts + self.self_prompts < 2:
            raise ConfigError("prompts", "the rounds together must have at least 2 prompts (--prompts, "
                                         "--varied-prompts, --broad-prompts, --self-prompts); --passage-prompts "
                                         "asks about their answers")
        if not self.lr > 0:
            raise ConfigError("lr", f"must be > 0 (got {self.lr})")
        if not 0.0 <= self.soft_labels <= 1.0:
            raise ConfigError("soft_labels", f"must be a weight in [0, 1] (got {self.soft_labels})")
        if not 0.0 <= self.feature_noise < 10.0:
            raise ConfigError("feature_noise",
                              f"must be a fraction of the features' spread in [0, 10) (got {self.feature_noise})")
        return self

    def recipe(self) -> dict:
        """What a trained head records of how it was trained (``trained_with``)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("out", "target", "batch", "device")}


def feature_layers(spec: str, n_layers: int) -> tuple[int, ...]:
    """``--feature-layers``: ``last``; ``low-mid-last`` (EAGLE-3's three: layer 2, the middle one
    and the last); or decoder layer numbers, comma-separated (the last layer is always added)."""
    last = n_layers - 1
    if spec == "last":
        return (last,)
    if spec == "low-mid-last":
        return tuple(sorted({min(2, last), n_layers // 2, last}))
    try:
        numbers = {int(x) for x in spec.split(",")}
    except ValueError:
        numbers = {-1}
    if not numbers or not all(0 <= n <= last for n in numbers):
        raise ConfigError("feature_layers", f"must be 'last', 'low-mid-last' or layer numbers 0-{last} separated by "
                                            f"commas (got {spec!r})")
    return tuple(sorted(numbers | {last}))
