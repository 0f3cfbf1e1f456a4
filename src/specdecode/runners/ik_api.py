"""The C API of ik_llama.cpp that the ``ik`` backend calls, declared once.

ik_llama.cpp is a fork of llama.cpp with faster CPU kernels (batched kernels for Q4_1 among them);
the ``ik-llama-cpp-python`` wheel ships it as a shared library with a thin ctypes binding
(``ik_llama_cpp._ctypes_api``: the library handle, the structs of its ``llama.h`` and a few
functions). We take the handle and the structs from it and declare here, against the wheel's
``include/llama.h``, every function we call that it does not: KV removal and copy by position,
the logits buffer, the model's metadata, threads, embeddings, logging. Nothing reads the wheel's
high-level ``IkLlama`` class. ``IK_LLAMA_CPP_LIB_PATH`` (the wheel's own loader) points it at
another build of the same C API.

Loading the library can fail (another Python, no wheel) and so can its first pass on a CPU the
build does not fit (an illegal instruction kills the process): ``probe`` checks both in a child
process before ``auto`` picks this backend (``models.resolve_backend``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

WHEEL = "ik-llama-cpp-python==0.1.5"  # the build this module is declared against (its include/llama.h)
PROBE_TIMEOUT_S = 120.0  # loading the model and one pass take about a second; a hung child is a failure

c_bool, c_int32, c_uint32, c_void_p, c_char_p, c_size_t = (
    ctypes.c_bool, ctypes.c_int32, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t)
c_float_p = ctypes.POINTER(ctypes.c_float)
LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, c_char_p, c_void_p)  # ggml_log_callback

# name -> (argument types, result type), as include/llama.h declares them
DECLARED = {
    "llama_kv_cache_seq_rm": ([c_void_p, c_int32, c_int32, c_int32], c_bool),  # ctx, seq, p0, p1
    "llama_kv_cache_seq_cp": ([c_void_p, c_int32, c_int32, c_int32, c_int32], None),  # ctx, src, dst, p0, p1
    "llama_kv_cache_seq_pos_max": ([c_void_p, c_int32], c_int32),
    "llama_get_logits": ([c_void_p], c_float_p),  # [outputs, n_vocab], in batch order
    "llama_get_embeddings": ([c_void_p], c_float_p),  # [outputs, n_embd]: the last layer's output, normed
    "llama_n_layer": ([c_void_p], c_int32),
    "llama_n_ctx_train": ([c_void_p], c_int32),
    "llama_n_ctx": ([c_void_p], c_uint32),
    "llama_model_meta_val_str": ([c_void_p, c_char_p, ctypes.c_char_p, c_size_t], c_int32),
    "llama_vocab_eos": ([c_void_p], c_int32),
    "llama_set_n_threads": ([c_void_p, c_uint32, c_uint32], None),
    "llama_print_system_info": ([], c_char_p),
    "llama_log_set": ([LOG_CALLBACK, c_void_p], None),
}
# our patches' additions (ik/patches), absent from the prebuilt wheel: None in ``load``'s namespace there
PATCHED = {
    "iqk_set_repack_min_rows": ([ctypes.c_int], None),  # 0004: which products take the repacking kernel
    "iqk_get_repack_min_rows": ([], ctypes.c_int),
    "llama_kv_cache_seq_streams": ([ctypes.c_void_p, ctypes.c_bool], ctypes.c_bool),  # 0005: a KV stream per sequence
}
# iqk_set_repack_min_rows's argument for "no product repacks": every product keeps its weight
# type's own kernel whatever the pass's size, so a token's logits do not depend on how many
# tokens share its pass (batch-invariant) and no call has to be cut short (docs/backends.md)
NEVER_REPACK = 2**31 - 1
# taken from the wheel's binding as it declares them
FROM_WHEEL = ("llama_backend_init", "llama_model_default_params", "llama_context_default_params",
              "llama_model_load_from_file", "llama_free_model", "llama_model_n_embd", "llama_init_from_model",
              "llama_free", "llama_model_get_vocab", "llama_vocab_n_tokens", "llama_batch_init", "llama_batch_free",
              "llama_decode", "llama_kv_cache_clear", "llama_set_embeddings")


class IkUnavailable(RuntimeError):
    """ik_llama.cpp cannot run here; the message says why."""


def _quiet_log(level, text, user_data):  # errors still reach the caller as return codes
    pass


_QUIET_LOG = LOG_CALLBACK(_quiet_log)  # kept alive for as long as the library may call it


@functools.cache
def load() -> SimpleNamespace:
    """The library's functions we call, declared, with the backend started (IkUnavailable where the
    wheel is missing or its library does not load)."""
    try:
        from ik_llama_cpp import _ctypes_api as wheel
    except (ImportError, OSError) as exc:  # OSError: the shared library did not load
        raise IkUnavailable(f"ik_llama.cpp is not installed or does not load ({exc}); "
                            f"pip install {WHEEL}") from None
    lib = wheel._lib
    api = {name: getattr(wheel, name) for name in FROM_WHEEL}
    for name, (argtypes, restype) in {**DECLARED, **PATCHED}.items():
        func = getattr(lib, name, None)
        if func is None and name in PATCHED:
            api[name] = None
            continue
        func.argtypes, func.restype = argtypes, restype
        api[name] = func
    if api["iqk_set_repack_min_rows"] is not None:
        api["iqk_set_repack_min_rows"](NEVER_REPACK)
    api["llama_log_set"](_QUIET_LOG, None)  # it logs every load to stderr otherwise
    api["llama_backend_init"]()
    return SimpleNamespace(**api, library=Path(lib._name))


def library_path() -> Path | None:
    """Where the library ``load`` would open is, without loading it (None: no wheel)."""
    override = os.environ.get("IK_LLAMA_CPP_LIB_PATH")
    if override:
        return Path(override)
    import importlib.util

    spec = importlib.util.find_spec("ik_llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "lib" / "libllama.so"


MANIFEST = "specdecode-build.json"  # ik/build.py writes it into the ik_llama_cpp package it installs


def build_info() -> dict:
    """Which build of ik_llama.cpp the backend runs: ``source`` (the sdist with ``patches`` applied
    by ik/build.py, or the prebuilt wheel), ``flags`` and ``library``; ``source`` None where
    neither is installed."""
    lib = library_path()
    if lib is None:
        return {"source": None, "patches": [], "flags": None, "library": None}
    manifest = lib.parent.parent / MANIFEST
    info = {"source": f"{WHEEL} (prebuilt wheel)", "patches": [], "flags": "wheel"}
    if manifest.is_file() and not os.environ.get("IK_LLAMA_CPP_LIB_PATH"):
        try:
            info = json.loads(manifest.read_text())
        except (OSError, ValueError):
            pass
    return {**info, "library": str(lib)}


def describe() -> str:
    """One line for logs and ``--version``: the build the ik backend runs."""
    info = build_info()
    if info["source"] is None:
        return f"ik_llama.cpp: not installed (pip install {WHEEL}, or make setup to build it)"
    patches = ", ".join(p["name"].removesuffix(".patch") for p in info["patches"]) or "none"
    return f"ik_llama.cpp: {info['source']}, {info['flags']} flags, patches: {patches}"


def server_binary() -> Path | None:
    """ik's own llama-server from the build in use (ik/build.py installs it beside the library;
    the prebuilt wheel has none)."""
    lib = library_path()
    path = lib.parent.parent / "bin" / "llama-server" if lib is not None else None
    return path if path is not None and path.is_file() and os.access(path, os.X_OK) else None


@dataclass(frozen=True)
class Probe:
    ok: bool
    reason: str  # why not, when not ok
    # the longest pass whose logits are bit-identical to 1-token passes here (``ik_probe``): the
    # runner cuts every longer input into calls of at most this many tokens
    exact_block: int = 0


PROBE_CACHE = "ik-probe.json"  # under the cache directory (``models.cache_dir``): ``probe``'s results
_PROBED: dict[str, Probe] = {}  # this process's results by ``_probe_key``, whether or not the file could be written


def probe(gguf: Path, cache: Path | None = None) -> Probe:
    """Whether ik_llama.cpp loads ``gguf`` and scores blocks of it exactly here, checked in a child
    process (a build that does not fit this CPU dies of an illegal instruction) and remembered in
    ``cache`` (default: ``PROBE_CACHE`` in the cache directory) by library, file and CPU
    (``ik_probe``)."""
    lib = library_path()
    if lib is None or not lib.is_file():
        return Probe(False, f"ik_llama.cpp is not installed (pip install {WHEEL})")
    if cache is None:
        from ..models import cache_dir

        cache = cache_dir() / PROBE_CACHE
    key = _probe_key(lib, gguf)
    if key in _PROBED:
        return _PROBED[key]
    try:
        known = json.loads(cache.read_text()) if cache.is_file() else {}
        if key in known:
            _PROBED[key] = Probe(**known[key])
            return _PROBED[key]
    except (OSError, ValueError, TypeError):
        known = {}
    try:
        done = subprocess.run([sys.executable, "-m", "specdecode.runners.ik_probe", str(gguf)],
                              capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
        result = Probe(**json.loads(done.stdout)) if done.returncode == 0 else Probe(False, _why(done))
    except subprocess.TimeoutExpired:
        result = Probe(False, f"ik_llama.cpp did not finish its check on {gguf.name} within {PROBE_TIMEOUT_S:.0f} s")
    except (ValueError, TypeError) as exc:
        result = Probe(False, f"ik_llama.cpp's check printed no result ({exc})")
    _PROBED[key] = result
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({**known, key: result.__dict__}))
        os.replace(tmp, cache)
    except OSError:
        pass
    return result


def _why(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in (done.stderr or "").strip().splitlines() if line.strip()]
    if done.returncode < 0:
        return f"ik_llama.cpp's check died of signal {-done.returncode} (a build for another CPU?)"
    return f"ik_llama.cpp's check failed: {lines[-1] if lines else f'exit code {done.returncode}'}"


def _probe_key(lib: Path, gguf: Path) -> str:
    def stamp(path: Path) -> str:
        st = path.stat()
        return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"

    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        cpu = ""
    text = "\n".join((stamp(lib), stamp(gguf), cpu, sys.version))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
