"""The engines people already use, run by ``specdecode bench --compare`` on the same prompts in the
same process: Hugging Face ``generate`` with its nearest assisted generation (``hf``), and llama.cpp
through llama-cpp-python as its users run it (``llamacpp``: plain decoding and its prompt-lookup
speculation), ik_llama.cpp's plain decoding (``ik``), ik's own server built from the same source
(``ik_server``: plain decoding and its n-gram speculation) and, given its binary, llama.cpp's own
server (``llama_server``, likewise). ``--compare`` takes several, comma-separated (``ik,llamacpp``).
Each peer turns prompt token ids into (generated token ids, seconds)."""

from __future__ import annotations

import os
import time

from .config import ConfigError, GenerationConfig

COMPARE = ("hf", "llamacpp", "ik", "ik_server")
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


class Peer:
    """What bench asks of a peer: ``run`` each prompt, ``close`` at the end (stop what it started)."""

    def run(self, prompt_ids: list[int], config: GenerationConfig) -> dict[str, tuple[list[int], float]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class HFPeer(Peer):
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


class LlamaCppPeer(Peer):
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
        from .runners.llamacpp import high_level_defaults

        with high_level_defaults():
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


class IkPeer(Peer):
    """ik_llama.cpp's plain decoding of the GGUF file (``ik``): the prompt read, then a 1-token pass
    per token, the argmax taken from the logits; flash attention off, as the wheel's own class runs
    it on a CPU it does not know to have AVX-VNNI. Its own tools are C++ and the wheel ships none,
    so the loop is ours, over our declaration of its C API (``runners.ik_api``), and stops at the
    file's end token unless told to ignore it. The prompt is read in calls of the length its
    start-up check found exact here (``runners.ik_probe``): its default of 512-token calls reads
    faster, but where longer calls give other logits (docs/backends.md) it answers something
    else than the model, and a speed of wrong answers is no baseline."""

    def __init__(self, gguf_path, threads: int, context: int):
        from .runners.ik import IkModel
        from .runners.llamacpp import LlamaCppRunner

        self.model = IkModel(gguf_path, threads, context)
        self.runner = LlamaCppRunner(self.model)

    def run(self, prompt_ids: list[int], config: GenerationConfig) -> dict[str, tuple[list[int], float]]:
        from .sampling import argmax

        if not config.greedy or config.stop:
            raise ConfigError("compare", "ik is compared under greedy decoding without --stop")
        eos, tokens = self.model.config.eos_token_id, []
        self.runner.reset()
        t = time.perf_counter()
        logits = self.runner.forward(prompt_ids, 1)
        while True:
            token = int(argmax(logits[0]))
            tokens.append(token)
            if len(tokens) >= config.max_new_tokens or (not config.ignore_eos and token == eos):
                break
            logits = self.runner.forward([token], 1)
        return {"ik": (tokens, time.perf_counter() - t)}


class LlamaServerPeer(Peer):
    """A llama-server (C++) on the GGUF file, as its users run it with one slot: plain decoding
    (``NAME``) and its n-gram speculation (``NAME_ngram``, ``--spec-type ngram-simple``), each its
    own process on 127.0.0.1, started once and asked with the prompt's token ids, prompt caching
    off; the seconds are the request's, HTTP included. llama.cpp's (``llama_server``, flash
    attention on, its faster path here) or ik_llama.cpp's from our build (``ik_server``, flash
    attention off, as the ik backend runs)."""

    def __init__(self, binary: str, gguf_path, threads: int, context: int, name: str = "llama_server",
                 flash_attention: bool = True, param: str = "llama_server", ids_from_logprobs: bool = False):
        """``param``: the option that asked for it, named by a start-up error; ``ids_from_logprobs``:
        the server returns token ids only with log-probabilities (ik's, ``_request``)."""
        from .procs import free_port, start_server

        self.procs, self.bases, self.ids_from_logprobs = [], {}, ids_from_logprobs
        try:
            for label, spec_type in ((name, "none"), (f"{name}_ngram", "ngram-simple")):
                port = free_port()
                base = f"http://127.0.0.1:{port}"
                command = [binary, "-m", str(gguf_path), "--host", "127.0.0.1", "--port", str(port), "-np", "1",
                           "-c", str(context), "-t", str(threads), "-fa", "on" if flash_attention else "off",
                           "--spec-type", spec_type, "--log-disable"]  # ik's writes ./llama.log otherwise
                self.procs.append(start_server(command, base, param, timeout_s=120, quiet=True, name=name))
                self.bases[label] = base
        except BaseException:
            self.close()
            raise

    def run(self, prompt_ids: list[int], config: GenerationConfig) -> dict[str, tuple[list[int], float]]:
        import httpx

        if not config.greedy or config.stop:
            raise ConfigError("compare", "llama-server is compared under greedy decoding without --stop")
        path, body = self._request(list(prompt_ids), config)
        out = {}
        for name, base in self.bases.items():
            t = time.perf_counter()
            reply = httpx.post(base + path, json=body, timeout=600)
            seconds = time.perf_counter() - t
            tokens = self._tokens(reply.json()) if reply.status_code == 200 else None
            if tokens is None:
                raise RuntimeError(f"{name} answered {reply.status_code}: {reply.text[:200]}")
            out[name] = (tokens, seconds)
        return out

    def _request(self, prompt_ids: list[int], config: GenerationConfig) -> tuple[str, dict]:
        """Where and what to send for ``config``'s greedy tokens, their ids returned: llama.cpp's
        /completion returns them when asked (``return_tokens``); ik's has no such field, so its
        OpenAI-style endpoint is asked for each token's log-probability, which carries its id."""
        common = {"prompt": prompt_ids, "temperature": 0.0, "top_k": 1, "cache_prompt": False,
                  "ignore_eos": config.ignore_eos, "stream": False}
        if self.ids_from_logprobs:
            return "/v1/completions", {**common, "max_tokens": config.max_new_tokens, "logprobs": 1}
        return "/completion", {**common, "n_predict": config.max_new_tokens, "return_tokens": True}

    def _tokens(self, reply: dict) -> list[int] | None:
        if not self.ids_from_logprobs:
            return list(reply["tokens"]) if "tokens" in reply else None
        try:
            return [int(entry["id"]) for entry in reply["choices"][0]["logprobs"]["content"]]
        except (KeyError, IndexError, TypeError):
            return None

    def close(self) -> None:
        from .procs import stop_server

        for proc in self.procs:
            stop_server(proc)
        self.procs = []


class Peers(Peer):
    """Several peers run one after another on each prompt."""

    def __init__(self, *peers):
        self.peers = peers

    def run(self, prompt_ids: list[int], config: GenerationConfig) -> dict[str, tuple[list[int], float]]:
        out = {}
        for peer in self.peers:
            out.update(peer.run(prompt_ids, config))
        return out

    def close(self) -> None:
        for peer in self.peers:
            peer.close()


def make_peers(compare: str | None, target, drafter, threads: int | None, llama_server: str | None = None):
    """The peers ``--compare`` names, comma-separated (None: none); ``llama_server``: the path of a
    llama-server binary, run beside llama-cpp-python under ``--compare llamacpp``."""
    names = [name.strip() for name in compare.split(",")] if compare is not None else []
    if llama_server is not None and "llamacpp" not in names:
        raise ConfigError("llama_server", "runs with --compare llamacpp")
    if compare is None:
        return None
    if not names or any(name not in COMPARE for name in names) or len(set(names)) < len(names):
        raise ConfigError("compare", f"must be one or more of {', '.join(COMPARE)}, comma-separated (got {compare!r})")
    if names == ["hf"]:
        return HFPeer(target.model, target.tokenizer, drafter)
    if "hf" in names:
        raise ConfigError("compare", "hf runs the torch model and the others a GGUF file: compare with hf alone")
    from .models import gguf_file
    from .runners.llamacpp import default_threads

    path = gguf_file(target.name, "target")
    if path is None:
        raise ConfigError("compare", f"{compare} runs a GGUF file; the target is not one")
    threads, context = threads or default_threads(), target.model.config.max_position_embeddings
    peers = [_gguf_peer(name, path, threads, context) for name in names]
    if llama_server is not None:
        if not os.path.isfile(llama_server) or not os.access(llama_server, os.X_OK):
            raise ConfigError("llama_server", f"not an executable file: {llama_server}")
        peers.append(LlamaServerPeer(llama_server, path, threads, context))
    return peers[0] if len(peers) == 1 else Peers(*peers)


def _gguf_peer(name: str, path, threads: int, context: int) -> Peer:
    if name == "ik":
        return IkPeer(path, threads, context)
    if name == "ik_server":
        from .runners.ik_api import server_binary

        binary = server_binary()
        if binary is None:
            raise ConfigError("compare", "ik_server needs ik_llama.cpp built from source with its llama-server "
                                         "(make setup, or python ik/build.py); the prebuilt wheel has none")
        from .runners.ik import FLASH_ATTENTION

        return LlamaServerPeer(str(binary), path, threads, context, name="ik_server", flash_attention=FLASH_ATTENTION,
                               param="compare", ids_from_logprobs=True)
    return LlamaCppPeer(path, threads, context)
