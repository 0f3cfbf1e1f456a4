"""A trained draft head that reads the target's own features (EAGLE, Li et al. 2024).

The target's last layer output at position t (before the final norm), ``f_t``, already encodes
what the target knows about the context. The head takes ``f_t`` and the embedding of the token at
t+1, fuses them (one product 2H -> H) and runs them through one Llama decoder layer of its own,
whose attention looks back over the head's states at earlier positions; the output ``g_{t+1}``
predicts the feature the target would compute at t+1. A token distribution is read off ``g`` with
the target's own final norm and output embedding, restricted to a reduced vocabulary (the tokens
the target produces most) to keep it cheap. Drafting further feeds ``g`` back in place of the
target's feature; training unrolls those steps ("training-time test", EAGLE-3) so the head learns
to continue from its own predictions. The verification pass of each step hands the head fresh
target features, so errors do not accumulate across steps.

A head may also read lower layers of the target (EAGLE-3): ``f_t`` is then the outputs of those
layers and of the last one side by side, mixed down to H by one more product (``fuse``) before
anything else. It starts as the pick of the last layer, so such a head begins where the plain one
does and training decides what the lower layers add. Drafting further feeds the head's own
output in place of the mixed feature.

The head keeps a KV cache over the context, like the target: at each proposal it adds the positions
the target has verified since the last one, then drafts token by token. Cost per drafted token for
the default target: one decoder layer plus the reduced output product, about 9M multiply-adds
against 135M for a target pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..runners.ops import apply_rope, attention_shape, causal_mask, rope_tables, rope_theta, row_major_product


class FeatureHead(torch.nn.Module):
    """[fuse(nH -> H) when it reads n > 1 target layers,] fc(2H -> H), then one Llama decoder layer
    (GQA attention with RoPE, gated MLP)."""

    def __init__(self, hidden: int, inner: int, n_heads: int, n_kv: int, head_dim: int,
                 eps: float = 1e-5, rope_theta: float = 10000.0, max_positions: int = 8192,
                 feature_layers: tuple[int, ...] | None = None):
        super().__init__()
        self.hidden, self.inner, self.n_heads, self.n_kv, self.head_dim = hidden, inner, n_heads, n_kv, head_dim
        self.eps, self.rope_theta, self.max_positions = eps, rope_theta, max_positions
        # the target's decoder layers read, ascending, the last one last (None: the last one only)
        self.feature_layers = tuple(feature_layers) if feature_layers else None
        self.fuse = None
        if self.feature_layers and len(self.feature_layers) > 1:
            n = len(self.feature_layers)
            self.fuse = torch.nn.Linear(n * hidden, hidden, bias=False)
            with torch.no_grad():  # starts as the pick of the last layer: the plain head
                self.fuse.weight.zero_()
                self.fuse.weight[:, (n - 1) * hidden:] = torch.eye(hidden)
        self.fc = torch.nn.Linear(2 * hidden, hidden, bias=False)
        self.ln1 = torch.nn.Parameter(torch.ones(hidden))
        self.qkv = torch.nn.Linear(hidden, (n_heads + 2 * n_kv) * head_dim, bias=False)
        self.o = torch.nn.Linear(n_heads * head_dim, hidden, bias=False)
        self.ln2 = torch.nn.Parameter(torch.ones(hidden))
        self.gate_up = torch.nn.Linear(hidden, 2 * inner, bias=False)
        self.down = torch.nn.Linear(inner, hidden, bias=False)
        cos, sin = rope_tables(rope_theta, head_dim, max_positions)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def shape_config(self) -> dict:
        return {
            "hidden_size": self.hidden,
            "inner_size": self.inner,
            "num_heads": self.n_heads,
            "num_kv_heads": self.n_kv,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.eps,
            "rope_theta": self.rope_theta,
            "max_positions": self.max_positions,
            "feature_layers": list(self.feature_layers or ()),
        }

    @classmethod
    def for_target(
        cls, model, inner: int | None = None, feature_layers: tuple[int, ...] | None = None
    ) -> "FeatureHead":
        """A head shaped like the target's decoder layers, started from the target's last layer."""
        cfg = model.config
        n_heads, n_kv, head_dim = attention_shape(cfg)
        head = cls(cfg.hidden_size, inner or cfg.intermediate_size, n_heads, n_kv, head_dim, cfg.rms_norm_eps,
                   rope_theta(cfg), min(cfg.max_position_embeddings, 8192),
                   feature_layers or (cfg.num_hidden_layers - 1,))
        last = model.model.layers[-1]
        a, m = last.self_attn, last.mlp
        with torch.no_grad():
            head.ln1.copy_(last.input_layernorm.weight)
            head.ln2.copy_(last.post_attention_layernorm.weight)
            head.qkv.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            head.o.weight.copy_(a.o_proj.weight)
            if head.inner == cfg.intermediate_size:
                head.gate_up.weight.copy_(torch.cat([m.gate_proj.weight, m.up_proj.weight]))
                head.down.weight.copy_(m.down_proj.weight)
        return head

    # -- pieces shared by training and drafting ---------------------------------------------
    def mix(self, features: torch.Tensor) -> torch.Tensor:
        """The target's features ``[..., nH]`` -> ``[..., H]``, what the head reads at a context index."""
        return features if self.fuse is None else self.fuse(features)

    def _project(self, x: torch.Tensor, start: int, positions: torch.Tensor | None = None):
        """``[..., T, H]`` -> q ``[..., nh, T, hd]``, k, v ``[..., nkv, T, hd]`` (RoPE at ``positions``,
        by default ``start..start+T-1``)."""
        T = x.shape[-2]
        h = F.rms_norm(x, (self.hidden,), self.ln1, self.eps)
        q, k, v = self.qkv(h).split([self.n_heads * self.head_dim, self.n_kv * self.head_dim,
                                     self.n_kv * self.head_dim], dim=-1)
        if positions is None:
            cos, sin = self.cos[start:start + T], self.sin[start:start + T]
        else:
            cos, sin = self.cos[positions], self.sin[positions]
        lead = x.shape[:-2]
        q = apply_rope(q.view(*lead, T, self.n_heads, self.head_dim), cos, sin).transpose(-2, -3)
        k = apply_rope(k.view(*lead, T, self.n_kv, self.head_dim), cos, sin).transpose(-2, -3)
        v = v.view(*lead, T, self.n_kv, self.head_dim).transpose(-2, -3)
        return q, k, v

    def _finish(self, x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        """Residual stream ``x`` and attention output ``[..., nh, T, hd]`` -> layer output."""
        att = att.transpose(-2, -3).reshape(*x.shape[:-1], self.n_heads * self.head_dim)
        x = x + self.o(att)
        h = F.rms_norm(x, (self.hidden,), self.ln2, self.eps)
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)

    def _expand(self, kv: torch.Tensor) -> torch.Tensor:
        return kv.repeat_interleave(self.n_heads // self.n_kv, dim=-3) if self.n_heads != self.n_kv else kv

    # -- training: all positions at once, unrolled over draft depths ---------------------------
    def forward(self, features: torch.Tensor, token_embeddings: torch.Tensor, depth: int = 1) -> list[torch.Tensor]:
        """features ``[B, T, nH]`` (``f_i``) and embeddings of the next tokens ``[B, T, H]`` (``x_{i+1}``)
        -> for each draft depth s < ``depth``, predicted features ``[B, T, H]`` (for ``f_{i+1}``).

        Depth 0 is the first draft step: every input is the target's. At depth s the input at index
        i is the head's own depth-(s-1) prediction from index i-1, and attention sees, as it will
        when drafting, the target-fed states at indices <= i-s and the depth-k states at index
        i-s+k for k = 1..s."""
        T = features.shape[1]
        scale = 1.0 / math.sqrt(self.head_dim)
        idx = torch.arange(T, device=features.device)
        keys, values, outs = [], [], []
        prev = self.mix(features)
        for s in range(depth):
            if s:
                prev = torch.cat([torch.zeros_like(prev[:, :1]), prev[:, :-1]], dim=1)  # g^{s-1}_{i-1} at i
            x = self.fc(torch.cat([prev, token_embeddings], dim=-1))
            q, k, v = self._project(x, 0)
            keys.append(self._expand(k))
            values.append(self._expand(v))
            scores = [(q @ keys[0].transpose(-1, -2)).masked_fill(idx[None, :] > idx[:, None] - s, float("-inf"))]
            shifted = []
            for j in range(1, s + 1):  # the depth-j state at index i - (s - j)
                lag = s - j
                kj = F.pad(keys[j], (0, 0, lag, 0))[..., :T, :]
                vj = F.pad(values[j], (0, 0, lag, 0))[..., :T, :]
                sc = (q * kj).sum(-1, keepdim=True)
                scores.append(sc.masked_fill((idx < lag)[:, None], float("-inf")))
                shifted.append(vj)
            probs = torch.softmax(torch.cat(scores, dim=-1) * scale, dim=-1)
            att = probs[..., :T] @ values[0]
            for j, vj in enumerate(shifted):
                att = att + probs[..., T + j:T + j + 1] * vj
            prev = self._finish(x, att)
            outs.append(prev)
        return outs

    # -- drafting: one sequence, a KV cache --------------------------------------------------
    def new_cache(self, capacity: int) -> torch.Tensor:
        w = self.fc.weight
        return torch.zeros(2, self.n_kv, capacity, self.head_dim, dtype=w.dtype, device=w.device)

    def step(self, features: torch.Tensor, token_embeddings: torch.Tensor, start: int, cache: torch.Tensor,
             positions: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Cache slots ``start..start+k-1``: ``[k, H]`` inputs (``mix``-ed target features or the
        head's own outputs) and token embeddings -> ``[k, H]`` predicted features; writes
        their keys/values into ``cache`` (``[2, nkv, capacity, hd]``). By default the k inputs are
        consecutive indices from ``start``; drafting a tree passes their ``positions`` and the
        ``mask`` ``[k, start + k]`` of slots each may attend to."""
        k_len = features.shape[0]
        end = start + k_len
        x = self.fc(torch.cat([features, token_embeddings], dim=-1))
        positions = positions.to(x.device) if positions is not None else None
        mask = mask.to(x.device) if mask is not None else None
        q, k, v = self._project(x, start, positions)
        cache[0, :, start:end] = k
        cache[1, :, start:end] = v
        if mask is None and k_len > 1:
            mask = causal_mask(start, end, x.device)
        att = F.scaled_dot_product_attention(q[None], cache[None, 0, :, :end], cache[None, 1, :, :end], attn_mask=mask,
                                             enable_gqa=self.n_heads != self.n_kv)[0]
        return self._finish(x, att)


class TargetParts:
    """The frozen pieces of the target the head uses: embeddings, final norm, output rows."""

    def __init__(self, model, vocab_ids: torch.Tensor):
        self.embed = model.get_input_embeddings().weight.detach()
        self.norm = model.model.norm.weight.detach()
        self.eps = model.config.rms_norm_eps
        self.vocab_ids = vocab_ids
        # [V', H]: the target's output rows for the reduced vocabulary, and [H, V'], its transpose,
        # the fast layout on a CPU for one row at a time; for a few rows at once (a tree's
        # frontier) ``row_major_product`` is the faster one, as in the lean runner
        self.out_rows = model.get_output_embeddings().weight.detach()[vocab_ids].contiguous()
        self.out_rows_t = self.out_rows.t().contiguous()

    def logits(self, g: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` predicted features -> ``[..., V']`` logits over the reduced vocabulary."""
        n = F.rms_norm(g, (g.shape[-1],), self.norm, self.eps)
        if n.dim() == 2 and n.shape[0] > 1 and n.device.type == "cpu" and not n.requires_grad:
            return row_major_product(self.out_rows, n)
        return n @ self.out_rows_t


