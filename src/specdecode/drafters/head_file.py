"""A trained draft head on disk: ``config.json`` (shape, draft vocabulary, the target it was
trained for) and ``model.safetensors``, written by ``specdecode train-draft``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..config import ConfigError
from .head import FeatureHead, TargetParts

# the draft head trained for the default target (``specdecode train-draft``; docs/draft-head.md),
# shipped inside the package
SHIPPED_HEAD = Path(__file__).parent.parent / "drafts" / "smollm2-135m-instruct"
FORMAT = "specdecode-feature-draft"
FORMAT_VERSION = 3  # 3 added feature_layers; version 2 heads read the last layer only and still load


def target_fingerprint(model, exact: bool = False) -> str:
    """Identifies a target's weights well enough to refuse a draft trained for another one: a hash
    of its shape and of samples of its weights, rounded to bfloat16 so that the same model loaded
    in float32 (the CPU's default) or bfloat16 (a GPU's) has the same fingerprint wherever it
    lives. ``exact``: the unrounded hash, which heads written before the rounding carry (still
    accepted)."""
    cfg = model.config
    h = hashlib.sha256()
    h.update(f"{cfg.model_type}|{cfg.vocab_size}|{cfg.hidden_size}|{cfg.num_hidden_layers}".encode())
    emb = model.get_input_embeddings().weight.detach()
    for w in (emb[:: max(1, emb.shape[0] // 64), :32], model.model.norm.weight.detach()):
        w = w.cpu() if exact else w.to("cpu", torch.bfloat16)
        h.update(w.float().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def save_feature_draft(out: Path, head: FeatureHead, vocab_ids: torch.Tensor, target, meta: dict) -> None:
    from safetensors.torch import save

    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    tensors["vocab_ids"] = vocab_ids.to(torch.int64)
    # written as bytes: safetensors' save_file creates its file 0600, unlike every other file here
    (out / "model.safetensors").write_bytes(save(tensors))
    config = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        **head.shape_config(),
        "draft_vocab_size": int(vocab_ids.numel()),
        "target_fingerprint": target_fingerprint(target),
        "target_vocab_size": int(target.config.vocab_size),
        **meta,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))


def draft_config(path: str | Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def trained_for(cfg: dict, target) -> bool:
    """Whether the draft head with config ``cfg`` was trained for ``target`` (by its weights)."""
    return cfg.get("target_fingerprint") in (target_fingerprint(target), target_fingerprint(target, exact=True))


def is_feature_draft(path: str) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def load_feature_draft(path: str, target, param: str = "draft"):
    """The ``FeatureDrafter`` in directory ``path``, refused unless it was trained for ``target``."""
    from safetensors.torch import load_file

    from .feature import FeatureDrafter

    cfg = draft_config(path)
    if cfg.get("version") not in (2, FORMAT_VERSION):
        raise ConfigError(
            param,
            f"{path}: draft format version {cfg.get('version')} is not supported "
            f"(this specdecode reads versions 2-{FORMAT_VERSION}); retrain it with specdecode train-draft",
        )
    if not trained_for(cfg, target):
        raise ConfigError(
            param,
            f"{path} was trained for another target (fingerprint {cfg['target_fingerprint']}, "
            f"this target is {target_fingerprint(target)}); train one with specdecode train-draft",
        )
    tensors = load_file(str(Path(path) / "model.safetensors"))
    head = FeatureHead(cfg["hidden_size"], cfg["inner_size"], cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"],
                       cfg["rms_norm_eps"], cfg["rope_theta"], cfg["max_positions"],
                       cfg.get("feature_layers") or (target.config.num_hidden_layers - 1,))
    head.load_state_dict({k: v for k, v in tensors.items() if k != "vocab_ids"})
    embed = target.get_input_embeddings().weight  # the head runs where the target does, in its dtype
    head = head.to(embed.device, embed.dtype)
    return FeatureDrafter(head.eval(), TargetParts(target, tensors["vocab_ids"]), vocab_size=cfg["target_vocab_size"],
                          name=f"head:{Path(path).name}")


