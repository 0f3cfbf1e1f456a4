"""A trained draft head that reads the target's own features (in the spirit of EAGLE, Li et al.
2024, without its attention layer).

The target's last layer output at position t (before the final norm), ``f_t``, already encodes
what the target knows about the context. The head takes ``f_t`` and the embedding of the token at
t+1, predicts the feature ``g_{t+1}`` the target would compute there, and reads a token
distribution off it with the target's own final norm and output embedding, restricted to a
reduced vocabulary (the tokens the target actually produces) to keep it cheap. Drafting further
feeds ``g`` back in place of the target's feature. The verification pass of each step hands the
head fresh target features, so errors do not accumulate across steps.

Cost per drafted token: one fused product (2H -> H), a gated MLP (H -> 2I -> H) and the reduced
output product (H -> V'), about 7M multiply-adds for the default target's head, against 135M for a
target pass.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..sampling import logits_to_probs, sample
from .base import Draft, Drafter

FORMAT = "specdecode-feature-draft"
FORMAT_VERSION = 1


class FeatureHead(torch.nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.fuse = torch.nn.Linear(2 * hidden, hidden, bias=False)
        self.norm = torch.nn.Parameter(torch.ones(hidden))
        self.gate_up = torch.nn.Linear(hidden, 2 * inner, bias=False)
        self.down = torch.nn.Linear(inner, hidden, bias=False)
        self.eps = 1e-5

    def forward(self, feature: torch.Tensor, token_embedding: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` feature at t and embedding of token t+1 -> predicted feature at t+1."""
        x = self.fuse(torch.cat([feature, token_embedding], dim=-1))
        h = F.rms_norm(x, (x.shape[-1],), self.norm, self.eps)
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def target_fingerprint(model) -> str:
    """Identifies a target's weights well enough to refuse a draft trained for another one."""
    cfg = model.config
    h = hashlib.sha256()
    h.update(f"{cfg.model_type}|{cfg.vocab_size}|{cfg.hidden_size}|{cfg.num_hidden_layers}".encode())
    emb = model.get_input_embeddings().weight.detach()
    h.update(emb[:: max(1, emb.shape[0] // 64), :32].float().contiguous().numpy().tobytes())
    h.update(model.model.norm.weight.detach().float().numpy().tobytes())
    return h.hexdigest()[:32]


class TargetParts:
    """The frozen pieces of the target the head uses: embeddings, final norm, output rows."""

    def __init__(self, model, vocab_ids: torch.Tensor):
        self.embed = model.get_input_embeddings().weight.detach()
        self.norm = model.model.norm.weight.detach()
        self.eps = model.config.rms_norm_eps
        self.vocab_ids = vocab_ids
        self.out_rows = model.get_output_embeddings().weight.detach()[vocab_ids].contiguous()  # [V', H]
        self.out_rows_t = self.out_rows.t().contiguous()  # [H, V']: the fast layout for one row at a time

    def logits(self, g: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` predicted features -> ``[..., V']`` logits over the reduced vocabulary."""
        return F.rms_norm(g, (g.shape[-1],), self.norm, self.eps) @ self.out_rows_t


def save_feature_draft(out: Path, head: FeatureHead, vocab_ids: torch.Tensor, target, meta: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    tensors["vocab_ids"] = vocab_ids.to(torch.int64)
    save_file(tensors, str(out / "model.safetensors"))
    config = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "hidden_size": head.fuse.out_features,
        "inner_size": head.down.in_features,
        "draft_vocab_size": int(vocab_ids.numel()),
        "target_fingerprint": target_fingerprint(target),
        "target_vocab_size": int(target.config.vocab_size),
        **meta,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))


def is_feature_draft(path: str) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def load_feature_draft(path: str, target, param: str = "draft") -> "FeatureDrafter":
    from safetensors.torch import load_file

    cfg = json.loads((Path(path) / "config.json").read_text())
    if cfg.get("version") != FORMAT_VERSION:
        raise ConfigError(param, f"{path}: draft format version {cfg.get('version')} is not supported")
    if cfg["target_fingerprint"] != target_fingerprint(target):
        raise ConfigError(
            param,
            f"{path} was trained for another target (fingerprint {cfg['target_fingerprint']}, "
            f"this target is {target_fingerprint(target)}); train one with specdecode train-draft",
        )
    tensors = load_file(str(Path(path) / "model.safetensors"))
    head = FeatureHead(cfg["hidden_size"], cfg["inner_size"])
    head.load_state_dict({k: v for k, v in tensors.items() if k != "vocab_ids"})
    return FeatureDrafter(head.eval(), TargetParts(target, tensors["vocab_ids"]), vocab_size=cfg["target_vocab_size"],
                          name=f"head:{Path(path).name}")


class FeatureDrafter(Drafter):
    name = "head"
    cost_prior = 0.03

    def __init__(self, head: FeatureHead, parts: TargetParts, vocab_size: int, name: str = "head"):
        self.head, self.parts, self.vocab_size, self.name = head, parts, vocab_size, name
        self.target_runner = None

    def attach(self, target_runner) -> None:
        if not hasattr(target_runner, "hidden_at"):
            raise ConfigError("draft", "a feature draft head needs the lean Llama runner for the target (CPU, Llama family)")
        self.target_runner = target_runner

    @torch.inference_mode()
    def propose(self, context, max_tokens, config, generator) -> Draft:
        feature = self.target_runner.hidden_at(len(context) - 2) if len(context) > 1 else None
        if max_tokens <= 0 or feature is None:
            return Draft([])
        token = context[-1]
        tokens, probs, confidence = [], [], []
        ids = self.parts.vocab_ids
        for _ in range(max_tokens):
            feature = self.head(feature, self.parts.embed[token])
            logits = self.parts.logits(feature)  # [V']
            dist = logits_to_probs(logits, config.temperature, config.top_k, config.top_p)
            top = float(torch.softmax(logits, -1).max()) if config.greedy else float(dist.max())
            pick = int(dist.argmax()) if config.greedy else sample(dist, generator)
            token = int(ids[pick])
            tokens.append(token)
            confidence.append(top)
            if not config.greedy:
                full = torch.zeros(self.vocab_size)
                full[ids] = dist
                probs.append(full)
            if top < config.confidence_floor:
                break
        return Draft(tokens, torch.stack(probs) if probs else None, confidence)
