"""A lean forward pass for Llama-family models, used instead of the Hugging Face module when it can.

Why: on a small CPU the Hugging Face forward spends more time around its matrix products than in
them, and the product it picks for a block of 2-16 tokens (``F.linear``) runs several times slower
than the same product written the other way round. Verification passes over a block are what
speculative decoding pays for, so this matters twice.

What it does (in the spirit of gpt-fast): plain functions over the Hugging Face weights, with
q/k/v and gate/up fused into one product each, and a preallocated KV cache written at explicit
positions (cutting it back is setting a shorter length). On a CPU every weight is kept in both
layouts, each used for the block sizes where whole passes ran faster with it on this machine
(``tuning``); on a GPU one layout, ``F.linear``, where a small model's pass is bound by kernel
launches instead. Both layouts take and give row-major activations: a product fed the transposed
output of the one before it takes another, much slower, kernel.

It computes the same function as the Hugging Face model (tests compare logits and greedy
output); float rounding differs in the last bits, as it does between any two matmul kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .ops import apply_rope, attention_shape, causal_mask, rope_tables, rope_theta, row_major_product
from .tree import TreeLayout
from .tuning import MAX_TUNED, tune_layouts

SUPPORTED = ("llama", "mistral")


def supports(model: torch.nn.Module) -> bool:
    """Whether ``LeanLlama`` computes this Hugging Face model exactly."""
    cfg = model.config
    rope = getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    params = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(params, dict):
        rope_type = params.get("rope_type", rope_type)
    return (
        getattr(cfg, "model_type", None) in SUPPORTED
        and not getattr(cfg, "attention_bias", False)
        and not getattr(cfg, "mlp_bias", False)
        and rope_type == "default"
        and getattr(cfg, "sliding_window", None) in (None, 0)
        and getattr(cfg, "hidden_act", "silu") == "silu"
        and next(model.parameters()).device.type in ("cpu", "cuda")
    )


class _Linear:
    """One weight in both layouts on the CPU; ``__call__`` uses the one measured faster for the
    block size. On a GPU one layout (``F.linear``), what its BLAS is tuned for, and no second copy."""

    def __init__(self, weight: torch.Tensor, use_wt: list[bool]):
        self.w = weight.detach().contiguous()  # [out, in]: (w @ x.T).T
        self.wt = self.w.t().contiguous() if self.w.device.type == "cpu" else None  # [in, out]: x @ wt
        self.use_wt = use_wt  # by block size; the model's products share one list (``LeanLlama.use_wt``)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: [k, in] -> [k, out]
        if self.wt is None:
            return F.linear(x, self.w)
        k = x.shape[0]
        return self.product(x, k > MAX_TUNED or self.use_wt[k])

    def product(self, x: torch.Tensor, transposed: bool) -> torch.Tensor:
        """``x @ w.T`` by the stored transpose, or as ``(w @ x.T).T``; row-major in and out."""
        return x @ self.wt if transposed else row_major_product(self.w, x)


class LeanLlama:
    """Weights and shapes of a Llama-family model, and its forward over a preallocated cache."""

    def __init__(self, model: torch.nn.Module, tune: bool = True, tuning_cache: Path | None = None):
        cfg = model.config
        self.n_heads, self.n_kv, self.head_dim = attention_shape(cfg)
        self.eps = cfg.rms_norm_eps
        self.hidden = cfg.hidden_size
        self.max_positions = cfg.max_position_embeddings
        inner = model.model
        # by block size: whether the products run as x @ w.T (else (w @ x.T).T); one choice for the
        # whole model, set by timing its passes (``tuning``), shared by every product
        self.use_wt = [True] * (MAX_TUNED + 1)
        with torch.no_grad():
            self.embed = inner.embed_tokens.weight.detach()
            self.layers = []
            for layer in inner.layers:
                a, m = layer.self_attn, layer.mlp
                self.layers.append(
                    (
                        layer.input_layernorm.weight.detach(),
                        _Linear(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), self.use_wt),
                        _Linear(a.o_proj.weight, self.use_wt),
                        layer.post_attention_layernorm.weight.detach(),
                        _Linear(torch.cat([m.gate_proj.weight, m.up_proj.weight]), self.use_wt),
                        _Linear(m.down_proj.weight, self.use_wt),
                    )
                )
            self.norm = inner.norm.weight.detach()
            self.lm_head = _Linear(model.get_output_embeddings().weight, self.use_wt)
        self.pad_to = list(range(MAX_TUNED + 1))  # identity until tuned (``tuning.pad_sizes``)
        cos, sin = rope_tables(rope_theta(cfg), self.head_dim, self.max_positions)
        self.device = self.embed.device
        self.cos, self.sin = cos.to(self.device, self.embed.dtype), sin.to(self.device, self.embed.dtype)
        if tune and self.device.type == "cpu":  # on a GPU: one layout, nothing to choose
            layouts = tune_layouts(self, tuning_cache)
            self.use_wt[:] = layouts.use_wt  # in place: the list every product reads
            self.pad_to = layouts.pad_to

    def linears(self):
        for _, qkv, o, _, gate_up, down in self.layers:
            yield from (qkv, o, gate_up, down)
        yield self.lm_head

    def padding(self, k: int, start: int) -> int:
        """How many ignored tokens to append to a k-token pass at cache position ``start`` to make
        it cheaper (``tuning.pad_sizes``); none past the model's positions."""
        p = self.pad_to[k] if k < len(self.pad_to) else k
        return p - k if start + p <= self.max_positions else 0

    def new_cache(self, capacity: int) -> list[torch.Tensor]:
        """Per layer ``[2 (keys, values), 1, kv_heads, capacity, head_dim]``."""
        shape = (2, 1, self.n_kv, capacity, self.head_dim)
        return [torch.empty(shape, dtype=self.embed.dtype, device=self.device) for _ in self.layers]

    def forward(self, ids: torch.Tensor, start: int, cache: list[torch.Tensor], num_logits: int,
                tree: TreeLayout | None = None, capture: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """ids ``[k]`` into cache slots ``start..start+k-1``; writes their keys/values into ``cache``.
        Returns logits ``[num_logits, vocab]`` for the last ``num_logits`` of them, and the outputs
        of the decoder layers numbered in ``capture`` (by default only the last one's, before the
        final norm) side by side, ``[k, len(capture) * hidden]``: features for draft heads.

        Without ``tree`` the k tokens continue the sequence (positions ``start..start+k-1``, causal).
        With it they are the nodes of a token tree (``TreeLayout``): each sits at position
        ``start + depth`` and sees the cached context and its own ancestors only."""
        logits, hidden = self.forward_segments([Segment(ids, start, cache, num_logits, tree)], capture)
        return logits[0], hidden

    @torch.inference_mode()
    def forward_segments(self, segments: list["Segment"], capture: tuple[int, ...] = ()
                         ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Several sequences in one pass (continuous batching): each segment's tokens continue its
        own cache, as ``forward`` describes; the products run over all their tokens together, the
        attention over each segment's own cache. Returns each segment's logits and the captured
        layer outputs of all tokens, segment after segment."""
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        ids = segments[0].ids if len(segments) == 1 else torch.cat([s.ids for s in segments])
        n = ids.shape[0]
        x = self.embed[ids]  # [n, hidden]
        rows, cos, sin, masks, at = [], [], [], [], 0
        for s in segments:
            k = s.ids.shape[0]
            end = s.start + k
            rows.append((at, at + k))
            at += k
            if s.tree is None:
                cos.append(self.cos[s.start:end])  # [k, hd]
                sin.append(self.sin[s.start:end])
                masks.append(causal_mask(s.start, end, ids.device) if k > 1 else None)  # [k, end]
            else:
                positions = s.start + s.tree.depth.to(self.device)
                cos.append(self.cos[positions])
                sin.append(self.sin[positions])
                masks.append(s.tree.mask(s.start).to(self.device))
        cos = cos[0] if len(segments) == 1 else torch.cat(cos)
        sin = sin[0] if len(segments) == 1 else torch.cat(sin)
        captured = []
        for i, (ln1, qkv, o, ln2, gate_up, down) in enumerate(self.layers):
            h = F.rms_norm(x, (self.hidden,), ln1, self.eps)
            q, key, val = qkv(h).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            q = apply_rope(q.view(n, nh, hd), cos, sin).transpose(0, 1)  # [nh, n, hd]
            key = apply_rope(key.view(n, nkv, hd), cos, sin).transpose(0, 1)  # [nkv, n, hd]
            val = val.view(n, nkv, hd).transpose(0, 1)
            outs = []
            for s, (a, b), mask in zip(segments, rows, masks):
                kv, end = s.cache[i], s.start + b - a
                kv[0, 0, :, s.start:end] = key[:, a:b]
                kv[1, 0, :, s.start:end] = val[:, a:b]
                att = F.scaled_dot_product_attention(
                    q[None, :, a:b], kv[0, :, :, :end], kv[1, :, :, :end], attn_mask=mask, enable_gqa=nh != nkv
                )  # [1, nh, k, hd]
                outs.append(att[0].transpose(0, 1).reshape(b - a, nh * hd))
            x = x + o(outs[0] if len(outs) == 1 else torch.cat(outs))
            h = F.rms_norm(x, (self.hidden,), ln2, self.eps)
            g, u = gate_up(h).chunk(2, dim=-1)
            x = x + down(F.silu(g) * u)
            if i in capture:
                captured.append(x)
        hidden = torch.cat(captured, dim=-1) if len(captured) > 1 else x  # before the final norm
        picks = [(b - s.num_logits, b) for s, (_, b) in zip(segments, rows) if s.num_logits]
        if not picks:
            return [x[:0, :0] for _ in segments], hidden
        if len(segments) == 1:
            last = x[picks[0][0]:]
        else:
            last = x[torch.cat([torch.arange(a, b, device=x.device) for a, b in picks])]
        logits = self.lm_head(F.rms_norm(last, (self.hidden,), self.norm, self.eps))  # [sum num_logits, vocab]
        out, at = [], 0
        for s in segments:
            out.append(logits[at:at + s.num_logits])
            at += s.num_logits
        return out, hidden  # per segment [num_logits, vocab]; [n, len(capture) * hidden]


@dataclass
class Segment:
    """One sequence's tokens in a pass: ids ``[k]`` at cache slots ``start..start+k-1`` of ``cache``
    (``LeanLlama.new_cache``), logits for the last ``num_logits``, a tree layout or a chain."""

    ids: torch.Tensor
    start: int
    cache: list[torch.Tensor]
    num_logits: int
    tree: TreeLayout | None = None
