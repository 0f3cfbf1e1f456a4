"""Llama building blocks shared by the lean runner (``llama.py``) and the draft head
(``drafters/head.py``): rotary embeddings, attention masks and the CPU's faster product layout."""

from __future__ import annotations

import torch


def attention_shape(cfg) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of a Llama-family config."""
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    return n_heads, n_kv, getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads


def rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(cfg, "rope_theta", 10000.0))


def rope_tables(theta: float, head_dim: int, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[positions, head_dim]`` for the rotate-half rotary embedding (``apply_rope``)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half convention (as the Hugging Face Llama): x ``[..., k, heads, hd]``,
    cos/sin ``[k, hd]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def causal_mask(start: int, end: int, device=None) -> torch.Tensor:
    """``[end - start, end]``: query i (position start+i) sees keys 0..start+i."""
    return torch.arange(end, device=device)[None, :] <= torch.arange(start, end, device=device)[:, None]


def row_major_product(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` for ``w`` [out, in] computed as ``(w @ x.T).T``, the faster way on a CPU for a
    few rows of ``x``; row-major in and out (fed a transposed view, the next product would take a
    much slower kernel)."""
    return (w @ x.contiguous().t()).t().contiguous()
