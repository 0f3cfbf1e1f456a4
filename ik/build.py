"""Build ik_llama.cpp from the ik-llama-cpp-python sdist with our patches and install it into this
Python environment, in place of the prebuilt wheel.

    python ik/build.py [--work DIR] [--flags wheel|native]

Steps: download the sdist (pinned by version and sha256), unpack it under ``--work``, apply
``ik/patches/*.patch`` in order (each says what it changes and why), and ``pip install`` the tree
(scikit-build-core; the build directory is kept under ``--work``, so a rebuild compiles only what
a patch touched). The install gets a manifest, ``ik_llama_cpp/specdecode-build.json``, naming the
sdist, the patches and the flags; the ``ik`` backend reports it (``ik_api.build_info``).

``--flags wheel`` (default) builds for the instruction sets of the prebuilt wheel (AVX2, FMA,
F16C; no AVX-512), so every x86-64 machine that runs the wheel runs the build and gets its
tokens; ``native`` builds for this CPU (``-march=native``).

Exit status 3, with one line saying why, where this machine cannot build (no cmake, C++ compiler or
patch): the caller keeps the wheel. Any other failure is an error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

SDIST = "ik-llama-cpp-python==0.1.5"
SDIST_FILE = "ik_llama_cpp_python-0.1.5.tar.gz"
SDIST_SHA256 = "33c67eb99e4dcab5e611050433243815709b8b3067753f9ce18375013cf002ad"
PATCHES = Path(__file__).resolve().parent / "patches"
MANIFEST = "specdecode-build.json"  # in the installed ik_llama_cpp package
NO_BUILD = 3  # exit status: this machine cannot build; keep the wheel

# the prebuilt wheel's instruction sets (its llama_print_system_info: AVX2, FMA, F16C, no AVX-512)
FLAGS = {
    "wheel": {"GGML_NATIVE": "OFF", "GGML_AVX": "ON", "GGML_AVX2": "ON", "GGML_FMA": "ON", "GGML_F16C": "ON",
              "GGML_AVX512": "OFF"},
    "native": {"GGML_NATIVE": "ON"},
}
# flash-attention kernels for f16 and q8_0 caches only (ik's default compiles every quantized cache
# type, several minutes more on 2 cores); the ik backend caches f16 and runs without flash attention
COMMON = {"GGML_IQK_FA_ALL_QUANTS": "OFF"}


def missing_tools() -> list[str]:
    need = {"cmake": shutil.which("cmake"), "a C++ compiler": shutil.which("c++") or shutil.which("g++"),
            "patch": shutil.which("patch")}
    return [name for name, found in need.items() if not found]


def fetch_sdist(work: Path) -> Path:
    path = work / SDIST_FILE
    if not path.is_file() or sha256(path) != SDIST_SHA256:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        SDIST, "-d", str(work)], check=True)
    if sha256(path) != SDIST_SHA256:
        raise SystemExit(f"ik/build.py: {path.name} does not have the pinned sha256 {SDIST_SHA256}")
    return path


def installed_package() -> Path | None:
    """Where this environment's ik_llama_cpp package is (None: not installed), asked of a fresh
    interpreter, so that an install this process just made is seen."""
    where = ("import importlib.util as u; s = u.find_spec('ik_llama_cpp'); "
             "print(s.submodule_search_locations[0] if s else '')")
    found = subprocess.run([sys.executable, "-c", where], check=True, capture_output=True, text=True).stdout.strip()
    return Path(found) if found else None


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def unpack_and_patch(sdist: Path, work: Path, patches: list[Path]) -> Path:
    """A fresh source tree with the patches applied. Unchanged files keep the sdist's times, so the
    kept build directory recompiles only the files a patch touched."""
    src = work / "src"
    if src.exists():
        shutil.rmtree(src)
    with tarfile.open(sdist) as tar:
        tar.extractall(work / "unpack", filter="tar")
    (work / "unpack" / sdist.name.removesuffix(".tar.gz")).rename(src)
    shutil.rmtree(work / "unpack")
    for patch in patches:
        subprocess.run(["patch", "-p1", "--forward", "--silent", "-d", str(src), "-i", str(patch)], check=True)
    return src


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path(sys.prefix) / "ik-build",
                        help="where the sdist, the patched tree and the build directory live (default: %(default)s)")
    parser.add_argument("--flags", choices=sorted(FLAGS), default="wheel",
                        help="instruction sets: the prebuilt wheel's, or this CPU's (default: %(default)s)")
    args = parser.parse_args(argv)
    missing = missing_tools()
    if missing:
        print(f"ik/build.py: cannot build ik_llama.cpp here (no {', '.join(missing)}); keeping the prebuilt wheel")
        return NO_BUILD
    patches = sorted(PATCHES.glob("*.patch"))
    manifest = {
        "source": f"{SDIST} (sdist, built here)", "sha256": SDIST_SHA256, "flags": args.flags,
        "defines": {**FLAGS[args.flags], **COMMON},
        "patches": [{"name": p.name, "sha256": sha256(p)[:12]} for p in patches],
    }
    installed = installed_package()
    if installed is not None and (installed / MANIFEST).is_file() and (installed / "lib").is_dir():
        if json.loads((installed / MANIFEST).read_text()) == manifest:
            print(f"ik/build.py: {installed} is this build already")
            return 0
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    src = unpack_and_patch(fetch_sdist(work), work, patches)
    tag = "+".join(["sdist-0.1.5", *(p.name.split("-")[0] for p in patches)])
    defines = [f"-Ccmake.define.{key}={value}" for key, value in manifest["defines"].items()]
    env = {**os.environ, "IK_BUILD_COMMIT": tag, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall",
                    f"-Cbuild-dir={work / 'build'}", *defines, str(src)], check=True, env=env)
    installed = installed_package()
    (installed / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"ik/build.py: installed ik_llama.cpp from {SDIST} with {len(patches)} patches ({args.flags} flags) "
          f"into {installed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
