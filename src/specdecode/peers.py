"""The engines people already use, run by ``specdecode bench --compare`` on the same prompts in the
same process: Hugging Face ``generate`` with its nearest assisted generation (``hf``), and llama.cpp
through llama-cpp-python as its users run it (``llamacpp``: plain decoding and its prompt-lookup
speculation). Each peer turns prompt token ids into (generated token ids, seconds)."""

from __future__ import annotations

import time

from .config import ConfigError, GenerationConfig

COMPARE = ("hf", "llamacpp")
PROMPT_LOOKUP_TOKENS = 10  # tokens proposed per prompt-lookup step, both peers' usual setting


def hf_counterpart(drafter) -> tuple[str, object]:
    """What ``--compare hf`` runs for this drafter: ("prompt_lookup", None) for n-gram lookup (and
    for head+ngram, whose nearest Hugging Face feature it is), ("assistant", model) for a draft
    model, ("none", None) for plain decoding. A lone feature head has no counterpart there."""
    from .drafters.base import NoDrafter
    from .drafters.ngram import HybridDrafter, NgramDrafter

    if isinstance(drafter, (NgramDrafter, HybridDrafter)):
        return "prompt_lookup", None
    if isinstance(drafter, NoDrafter):
        return "none", None
    model = getattr(drafter, "model", None)
    if model is None:
        raise ConfigError("compare", f"Hugging Face has no counterpart of the {drafter.name} drafter; "
                                     "compare with --draft ngram, head+ngram or a draft model")
    return "assistant", model


class HFPeer:
    """Hugging Face's own assisted generation with the nearest drafter it has, greedy (or sampling),
    told the same stopping rules."""

    def __init__(self, model, tokenizer, drafter):
        from .runners import is_torch

        if not is_torch(model):
            raise ConfigError("compare", "hf runs the torch model; use --backend torch with --compare hf")
        self.model, self.tokenizer = model, tokenizer
        self.kind, self.assistant = hf_counterpart(drafter)

    def run(self, prompt_ids: list[int], config: GenerationConfig) -> dict[str, tuple[list[int], float]]:
        import torch

        kwargs = {
            "max_new_tokens": config.max_new_tokens,
            "do_sample": not config.greedy,
            "pad_token_id": self.model.config.eos_token_id,
        }
        if not config.greedy:
            kwargs.update(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k or None)
        if config.ignore_eos:
            kwargs["min_new_tokens"] = config.max_new_tokens
        if config.stop:
            kwargs.update(stop_strings=list(config.stop), tokenizer=self.tokenizer)
        if self.kind == "prompt_lookup":
            kwargs["prompt_lookup_num_tokens"] = PROMPT_LOOKUP_TOKENS
        elif self.kind == "assistant":
            kwargs["assistant_model"] = self.assistant
        ids = torch.tensor([prompt_ids])
        t = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        return {"hf": (out[0, ids.shape[1]:].tolist(), time.perf_counter() - t)}


class LlamaCppPeer:
    """llama.cpp's plain decoding (``llamacpp``) and llama-cpp-python's prompt-lookup speculation
    (``llamacpp_lookup``, ``LlamaPromptLookupDecoding``) of the GGUF file, through its high-level
    ``Llama.generate`` as its users call it: greedy, EOS ends a run unless ``ignore_eos``."""

    def __init__(self, gguf_path, threads: int, context: int):
        try:
            from llama_cpp import Llama
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
        except ImportError:
            raise ConfigError("compare", "llamacpp needs llama-cpp-python: pip install llama-cpp-python") from None
        common = {"model_path": str(gguf_path), "n_ctx": context, "n_threads": threads,
                  "n_threads_batch": threads, "n_gpu_layers": 0, "verbose": False,
                  "flash_attn": True}  # its faster path here, and the attention our backend runs
        self.engines = {
            "llamacpp": Llama(**common),
            # logits_all=True as the draft model implies it anyway: given only the draft model,
            # llama-cpp-python 0.3.36 sizes its score buffer by n_batch and fails on longer prompts
            "llamacpp_lookup": Llama(**common, logits_all=True, draft_model=LlamaPromptLookupDecoding(
                num_pred_tokens=PROMPT_LOOKUP_TOKENS)),
        }

    def run(self, prompt_ids: list[int], config: GenerationConfig) -> dict[str, tuple[list[int], float]]:
        if not config.greedy or config.stop:
            raise ConfigError("compare", "llamacpp is compared under greedy decoding without --stop")
        out = {}
        for name, llm in self.engines.items():
            tokens: list[int] = []
            llm.reset()  # no cache carried over from the previous prompt: each engine starts alike
            t = time.perf_counter()
            for tok in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                    reset=True):
                tokens.append(tok)
                if len(tokens) >= config.max_new_tokens or (not config.ignore_eos and tok == llm.token_eos()):
                    break
            out[name] = (tokens, time.perf_counter() - t)
        return out


def make_peers(compare: str | None, target, drafter, threads: int | None):
    """The peer ``--compare`` names (None: none)."""
    if compare is None:
        return None
    if compare not in COMPARE:
        raise ConfigError("compare", f"must be one of {', '.join(COMPARE)} (got {compare!r})")
    if compare == "hf":
        return HFPeer(target.model, target.tokenizer, drafter)
    from .models import gguf_file
    from .runners.llamacpp import default_threads

    path = gguf_file(target.name, "target")
    if path is None:
        raise ConfigError("compare", "llamacpp runs a GGUF file; the target is not one")
    return LlamaCppPeer(path, threads or default_threads(), target.model.config.max_position_embeddings)
