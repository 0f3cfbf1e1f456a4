"""A lean forward pass for Llama-family models, used instead of the Hugging Face module when it can.

Why: on a small CPU the Hugging Face forward of the default target spends more time around its
matrix products than in them, and the product it picks for a block of 2-16 tokens
(``F.linear``) runs 2-4x slower than the same product written the other way round. Verification
passes over a block are what speculative decoding pays for, so this matters twice.

What it does (in the spirit of gpt-fast): plain functions over the Hugging Face weights, with
q/k/v and gate/up fused into one product each, a preallocated KV cache written at explicit
positions (cutting it back is setting a shorter length), and on a CPU, for every weight both
layouts, each used for the block sizes where whole passes ran faster with it on this machine at
load time (on a GPU one layout, ``F.linear``; there a small model's pass is bound by kernel
launches, which only CUDA graphs would cut - not done). Both layouts take and give row-major
activations: a product fed the transposed output of the one before it takes another, much slower,
kernel. On the default target these two choices made a 2-token pass cost about what a 1-token
pass does, instead of 1.5x. Blocks are padded with ignored tokens to a larger size where that size
was measured cheaper (kernels work in column blocks: a 4-token pass can cost less than a 3-token one).

It computes the same function as the Hugging Face model (tests compare logits and greedy
output); float rounding differs in the last bits, as it does between any two matmul kernels.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .runner import common_prefix

SUPPORTED = ("llama", "mistral")
MAX_TUNED = 16  # block sizes up to this get their own layout choice; larger ones use x @ w.T


def supports(model: torch.nn.Module) -> bool:
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
    block size. On a GPU, one layout (the library's own ``F.linear``), which is what its BLAS is
    tuned for, and no second copy of the weights."""

    def __init__(self, weight: torch.Tensor, use_wt: list[bool] | None = None):
        self.w = weight.detach().contiguous()  # [out, in]: (w @ x.T).T
        self.wt = self.w.t().contiguous() if self.w.device.type == "cpu" else None  # [in, out]: x @ wt
        # index: block size; a model's products share one list (``FastLlama.use_wt``), tuned for its passes
        self.use_wt = use_wt if use_wt is not None else [True] * (MAX_TUNED + 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: [k, in] -> [k, out]
        if self.wt is None:
            return F.linear(x, self.w)
        k = x.shape[0]
        return self.product(x, k > MAX_TUNED or self.use_wt[k])

    def product(self, x: torch.Tensor, transposed: bool) -> torch.Tensor:
        """``x @ w.T`` by the stored transpose, or as ``(w @ x.T).T``; row-major in and out in
        both (fed a transposed view, the next product would take a much slower kernel)."""
        return x @ self.wt if transposed else row_major_product(self.w, x)


def row_major_product(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` for ``w`` [out, in] computed as ``(w @ x.T).T``, the faster way on a CPU for a
    few rows of ``x``; row-major in and out (fed a transposed view, the next product would take a
    much slower kernel)."""
    return (w @ x.contiguous().t()).t().contiguous()


def tune_layouts(fast: "FastLlama", cache_file: Path | None = None) -> list[bool]:
    """Pick, per block size, the faster of ``x @ w.T`` (stored transposed) and ``(w @ x.T).T`` for
    the model's products, by timing whole forward passes over a block of that size with each.
    Timing products one by one misleads: over and over, one weight sits in a cache that a pass,
    streaming hundreds of megabytes of weights, never has, and even a stream of same-shaped
    products picked the slower layout for blocks of 3-12 tokens on the default target. The pass
    times also set which block sizes are padded to a cheaper larger one (``pad_sizes``). Results
    are cached per machine, torch version, thread count and model shape: tuning takes seconds."""
    shapes = sorted({tuple(lin.w.shape) for lin in fast.linears()})
    key = (f"pass|{platform.processor() or platform.machine()}|{_cpu_name()}|torch{torch.__version__}|"
           f"threads{torch.get_num_threads()}|{len(fast.layers)} layers|{shapes}|{fast.embed.dtype}")
    table = {}
    if cache_file is not None and cache_file.is_file():
        try:
            table = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            table = {}
    if not isinstance(table.get(key), dict):
        table[key] = _time_layouts(fast)
        if cache_file is not None:
            try:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps(table))
                os.replace(tmp, cache_file)
            except OSError:
                pass
    fast.use_wt[:] = table[key]["use_wt"]  # in place: the list every product reads
    fast.pad_to = pad_sizes(table[key]["ms"])
    return list(fast.use_wt)


def pad_sizes(ms: list[float], margin: float = 0.95) -> list[int]:
    """``pad_to[k]`` for blocks of 2 or more tokens: the block size p >= k to run a k-token pass as
    (k real tokens and p - k ignored ones), the cheapest p whose measured pass time ``ms[p]`` beat
    the best so far by the margin; else k. Matrix kernels work in column blocks, so on this CPU a
    3-token pass cost 1.15x a 4-token one and 9-15 tokens more than 16. One token is never padded:
    plain decoding stays a 1-token pass."""
    pad_to = list(range(len(ms)))
    for k in range(2, len(ms)):
        for p in range(k + 1, len(ms)):
            if ms[p] < margin * ms[pad_to[k]]:
                pad_to[k] = p
    return pad_to


def _time_layouts(fast: "FastLlama", context: int = 32, rounds: int = 3) -> dict:
    """By block size k: ``use_wt``, whether a pass over k tokens after ``context`` cached ones, all
    logits asked for (as verification asks), ran faster with ``x @ w.T`` than with ``(w @ x.T).T``
    (the two alternate, best of ``rounds`` each), and ``ms``, the faster one's time."""
    cache = fast.new_cache(context + MAX_TUNED)
    ids = torch.arange(context + MAX_TUNED, device=fast.device) % fast.embed.shape[0]
    fast.forward(ids[:context], 0, cache, 0)
    choice, ms = [True], [0.0]
    for k in range(1, MAX_TUNED + 1):
        best = {True: float("inf"), False: float("inf")}
        for _ in range(rounds):
            for transposed in best:
                fast.use_wt[k] = transposed
                t = time.perf_counter()
                fast.forward(ids[context:context + k], context, cache, k)
                best[transposed] = min(best[transposed], time.perf_counter() - t)
        choice.append(best[True] <= best[False])
        ms.append(1000 * min(best.values()))
    return {"use_wt": choice, "ms": ms}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def attention_shape(cfg) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of a Llama-family config."""
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    return n_heads, n_kv, getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads


def rope_tables(theta: float, head_dim: int, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[positions, head_dim]`` for the rotate-half rotary embedding (``_rope``)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


class FastLlama:
    """Weights and shapes of a Llama-family model, and its forward over a preallocated cache."""

    def __init__(self, model: torch.nn.Module, tune: bool = True, tuning_cache: Path | None = None):
        cfg = model.config
        self.n_heads, self.n_kv, self.head_dim = attention_shape(cfg)
        self.eps = cfg.rms_norm_eps
        self.hidden = cfg.hidden_size
        self.max_positions = cfg.max_position_embeddings
        inner = model.model
        # by block size: whether the products run as x @ w.T (else (w @ x.T).T); one choice for the
        # whole model, set by timing its passes (``tune_layouts``), shared by every product
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
        self.pad_to = list(range(MAX_TUNED + 1))  # identity until tuned (``pad_sizes``)
        theta = _rope_theta(cfg)
        cos, sin = rope_tables(theta, self.head_dim, self.max_positions)
        self.device = self.embed.device
        self.cos, self.sin = cos.to(self.device, self.embed.dtype), sin.to(self.device, self.embed.dtype)
        if tune and self.device.type == "cpu":  # on a GPU: one layout, nothing to choose
            tune_layouts(self, tuning_cache)

    def linears(self):
        for _, qkv, o, _, gate_up, down in self.layers:
            yield from (qkv, o, gate_up, down)
        yield self.lm_head

    def padding(self, k: int, start: int) -> int:
        """How many ignored tokens to append to a k-token pass at cache position ``start`` to make
        it cheaper (``pad_sizes``); none past the model's positions."""
        p = self.pad_to[k] if k < len(self.pad_to) else k
        return p - k if start + p <= self.max_positions else 0

    def new_cache(self, capacity: int) -> list[torch.Tensor]:
        shape = (2, 1, self.n_kv, capacity, self.head_dim)
        return [torch.empty(shape, dtype=self.embed.dtype, device=self.device) for _ in self.layers]

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, start: int, cache: list[torch.Tensor], num_logits: int,
                tree: "TreeLayout | None" = None, capture: tuple[int, ...] = ()) -> torch.Tensor:
        """ids ``[k]`` into cache slots ``start..start+k-1``; writes their keys/values into ``cache``;
        returns logits ``[num_logits, vocab]`` for the last ``num_logits`` of them. Leaves the
        outputs of the decoder layers numbered in ``capture`` (by default only the last one's), side
        by side, in ``last_hidden`` ``[k, len(capture) * hidden]``: features for draft heads.

        Without ``tree`` the k tokens continue the sequence (positions ``start..start+k-1``, causal).
        With it they are the nodes of a token tree (``TreeLayout``): each sits at position
        ``start + depth`` and sees the cached context and its own ancestors only."""
        k = ids.shape[0]
        end = start + k
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        x = self.embed[ids]  # [k, hidden]
        if tree is None:
            cos, sin = self.cos[start:end], self.sin[start:end]  # [k, hd]
            mask = None
            if k > 1:  # query i (position start+i) sees keys 0..start+i
                mask = causal_mask(start, end, ids.device)  # [k, end]
        else:
            positions = start + tree.depth.to(self.device)
            cos, sin = self.cos[positions], self.sin[positions]
            mask = tree.mask(start).to(self.device)
        captured = []
        for i, ((ln1, qkv, o, ln2, gate_up, down), kv) in enumerate(zip(self.layers, cache)):
            h = F.rms_norm(x, (self.hidden,), ln1, self.eps)
            q, key, val = qkv(h).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            q = _rope(q.view(k, nh, hd), cos, sin).transpose(0, 1)  # [nh, k, hd]
            kv[0, 0, :, start:end] = _rope(key.view(k, nkv, hd), cos, sin).transpose(0, 1)
            kv[1, 0, :, start:end] = val.view(k, nkv, hd).transpose(0, 1)
            att = F.scaled_dot_product_attention(
                q[None], kv[0, :, :, :end], kv[1, :, :, :end], attn_mask=mask, enable_gqa=nh != nkv
            )  # [1, nh, k, hd]
            x = x + o(att[0].transpose(0, 1).reshape(k, nh * hd))
            h = F.rms_norm(x, (self.hidden,), ln2, self.eps)
            g, u = gate_up(h).chunk(2, dim=-1)
            x = x + down(F.silu(g) * u)
            if i in capture:
                captured.append(x)
        self.last_hidden = torch.cat(captured, dim=-1) if len(captured) > 1 else x  # before the final norm
        if num_logits == 0:
            return x[:0, :0]
        x = F.rms_norm(x[-num_logits:], (self.hidden,), self.norm, self.eps)
        return self.lm_head(x)  # [num_logits, vocab]


class TreeLayout:
    """A block of k tokens that form a tree rather than a sequence: ``parents[i]`` is the index in
    the block of token i's parent (-1: its parent is the last cached token). Parents come before
    their children. Used to verify many drafted continuations in one pass (SpecInfer, Miao et al.
    2024; EAGLE-2): siblings share a position, and attention is restricted to each token's own
    branch, so every token's logits are exactly those of its branch read as a sequence."""

    def __init__(self, parents: list[int]):
        k = len(parents)
        depth = [0] * k
        seen = torch.eye(k, dtype=torch.bool)  # [i, j]: j is i or an ancestor of i
        for i, p in enumerate(parents):
            if not -1 <= p < i:
                raise ValueError(f"tree parent {p} of token {i} must come before it")
            if p >= 0:
                depth[i] = depth[p] + 1
                seen[i] |= seen[p]
        self.parents = list(parents)
        self.depth = torch.tensor(depth, dtype=torch.long)
        self.ancestry = seen

    def mask(self, start: int) -> torch.Tensor:
        """``[k, start + k]``: what each token may attend to - the cached context and its branch."""
        k = len(self.parents)
        return torch.cat([torch.ones(k, start, dtype=torch.bool), self.ancestry], dim=1)


def causal_mask(start: int, end: int, device=None) -> torch.Tensor:
    """``[end - start, end]``: query i (position start+i) sees keys 0..start+i."""
    return torch.arange(end, device=device)[None, :] <= torch.arange(start, end, device=device)[:, None]


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(cfg, "rope_theta", 10000.0))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half convention (as the Hugging Face Llama): x ``[..., k, heads, hd]``,
    cos/sin ``[k, hd]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class FastRunner:
    """Same interface as ``runner.ModelRunner``, over :class:`FastLlama`."""

    def __init__(self, fast: FastLlama, vocab_size: int | None = None, capacity: int = 256):
        self.fast = fast
        self.vocab_size = vocab_size
        self.cached: list[int] = []
        self._cache = fast.new_cache(capacity)
        # the outputs of these decoder layers (the last one's before the final norm) at every cached
        # position, side by side: what draft heads read (``capture_layers``)
        self.feature_layers: tuple[int, ...] = (len(fast.layers) - 1,)
        self._features = torch.empty(capacity, fast.hidden, dtype=fast.embed.dtype, device=fast.device)

    def capture_layers(self, layers: tuple[int, ...] | None) -> None:
        """Keep the outputs of decoder ``layers`` (ascending, ending with the last layer; None: the
        last layer only, as a ``FeatureHead`` built without ``feature_layers`` reads) as features
        from now on. Changing them empties the cache, whose stored features have the old width."""
        n = len(self.fast.layers)
        layers = (n - 1,) if layers is None else tuple(layers)
        if layers == self.feature_layers:
            return
        if not layers or list(layers) != sorted(set(layers)) or layers[-1] != n - 1 or layers[0] < 0:
            raise ValueError(f"feature layers must be ascending, distinct, and end with the last layer {n - 1}; got {layers}")
        self.feature_layers = layers
        self._features = self._features.new_empty(self._features.shape[0], len(layers) * self.fast.hidden)
        self.reset()

    def reset(self) -> None:
        self.cached = []

    def truncate(self, length: int) -> None:
        del self.cached[length:]  # the buffer beyond this length is simply overwritten later

    def sync(self, context: list[int]) -> int:
        n = common_prefix(self.cached, context)
        self.truncate(n)
        return n

    def _ensure(self, length: int) -> None:
        capacity = self._cache[0].shape[3]
        if length <= capacity:
            return
        new_capacity = min(max(length, 2 * capacity), self.fast.max_positions)
        if length > new_capacity:
            raise ValueError(f"context of {length} tokens exceeds the model's {self.fast.max_positions}")
        grown = self.fast.new_cache(new_capacity)
        n = len(self.cached)
        for old, new in zip(self._cache, grown):
            new[:, :, :, :n] = old[:, :, :, :n]
        self._cache = grown
        features = self._features.new_empty(new_capacity, self._features.shape[1])
        features[:n] = self._features[:n]
        self._features = features

    def forward(self, token_ids: list[int], num_logits: int = 1, tree: TreeLayout | None = None) -> torch.Tensor:
        start, k = len(self.cached), len(token_ids)
        # Padded to a block size the kernels run faster: the extra tokens come after the real ones
        # (as roots of their own, in a tree), so no real token attends to them; their keys sit
        # past the cache's length and their logits and features are dropped.
        pad = self.fast.padding(k, start)
        ids = token_ids + token_ids[-1:] * pad
        if pad and tree is not None:
            tree = TreeLayout(tree.parents + [-1] * pad)
        self._ensure(start + k + pad)
        logits = self.fast.forward(torch.tensor(ids, dtype=torch.long, device=self.fast.device), start, self._cache,
                                   num_logits + pad if num_logits else 0, tree, self.feature_layers)
        logits = logits[:num_logits]
        self._features[start:start + k] = self.fast.last_hidden[:k]
        self.cached.extend(token_ids)
        if self.vocab_size is not None:
            logits = logits[:, : self.vocab_size]
        return logits.float().cpu()  # the engine's acceptance arithmetic runs on the CPU, as with ModelRunner

    def forward_tree(self, token_ids: list[int], parents: list[int]) -> torch.Tensor:
        """Score a token tree (see ``TreeLayout``) appended after the cache in one pass: logits
        ``[k, vocab]`` at every node. Until ``keep_branch`` the cache holds the whole tree."""
        return self.forward(token_ids, len(token_ids), TreeLayout(parents))

    def keep_branch(self, start: int, nodes: list[int]) -> None:
        """After ``forward_tree`` at cache length ``start``: keep the tree nodes ``nodes`` (block
        indices of one branch, root first) as the sequence continuing the cache, drop the rest.
        Their keys were rotated for position ``start + depth``, which is where they now sit."""
        src = torch.tensor(nodes, dtype=torch.long, device=self.fast.device) + start
        end = start + len(nodes)
        for kv in self._cache:
            kv[:, :, :, start:end] = kv[:, :, :, src]  # advanced indexing copies before writing
        self._features[start:end] = self._features[src]
        self.cached[start:] = [self.cached[i] for i in src.tolist()]

    def features(self, start: int, end: int) -> torch.Tensor | None:
        """``[end - start, len(feature_layers) * hidden]``: the feature layers' outputs (the last
        layer's before the final norm) at positions ``start..end-1``, or None unless all of them
        are in the cache."""
        if not 0 <= start <= end <= len(self.cached):
            return None
        return self._features[start:end]

    def cache_tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.cached)
        return [(kv[0, :, :, :n], kv[1, :, :, :n]) for kv in self._cache]
