"""CPU kernels for quantized inference: a blocked int4/int8 linear (activations quantized to int8
per 32-block for decoding, to int16 for the head and prefill; AVX512-VNNI / AVX2 / scalar dot
products) and one whole Llama decoder layer per call for decoding. They are compiled from
quant_kernels.cpp for this machine's CPU on first use (torch.utils.cpp_extension, cached by CPU
features + source hash); without a compiler, or with POCKETLM_KERNELS=off, the same math runs in
plain PyTorch (fallback.py). All take plain tensors; the weight layout is the one documented in
pocketlm/quant.py.

    linear(x, q, scale, offset=None, bias=None, tiles=None)   x (M, in) → (M, out)
    tile_scales(scale, offset=None)                        the scales regrouped for linear (or None)
    linear16(x, q, scale, offset=None, bias=None, tiles=None)   the same, int16 activations (head, prefill)
    decode_layer(x, norm1, qkv, o, norm2, gate_up, down, eps, cos, sin, k_cache, v_cache, n,
                 n_head, n_kv_head, key_mask=None)         x (B, C) → (B, C); caches written at n
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import threading
import time
import warnings

import torch

from pocketlm.kernels import fallback

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quant_kernels.cpp")
_OFF_VALUES = ("off", "0", "false", "no")
_load_lock = threading.Lock()
_module = None
_tried = False
_override: bool | None = None  # set by use_compiled()


def _enabled() -> bool:
    if _override is not None:
        return _override
    return os.environ.get("POCKETLM_KERNELS", "").strip().lower() not in _OFF_VALUES


@contextlib.contextmanager
def use_compiled(enabled: bool):
    """Within the block, use (True) or bypass (False) the compiled kernels whatever
    POCKETLM_KERNELS says; the fallback still runs where the kernels could not be built."""
    global _override
    previous, _override = _override, enabled
    try:
        yield
    finally:
        _override = previous


def compiled():
    """The compiled kernel module (building it on first call), or None when it is switched off or
    could not be built (then a warning said why, once)."""
    if not _enabled():
        return None
    if _tried:  # the common case: no lock once loading has been attempted
        return _module
    with _load_lock:
        if not _tried:
            _load()
        return _module


def linear(x, q, scale, offset=None, bias=None, tiles=None):
    """x (M, in) float32 times the blocked weight (out, in), plus bias: (M, out) float32. `tiles`,
    from tile_scales(scale, offset), saves regrouping the scales on every call."""
    return _product("linear", x, q, scale, offset, bias, tiles)


def tile_scales(scale, offset=None):
    """The scales (and offsets) regrouped by output tile, the layout the compiled products read
    (made once per weight and kept by its owner); None when the fallback runs."""
    module = compiled()
    return None if module is None else module.tile_scales(scale, offset)


def linear16(x, q, scale, offset=None, bias=None, tiles=None):
    """As linear, with the activations quantized to int16 per block (258× finer steps than int8):
    for the output head, whose logits pick every token, and for long inputs (prefill), whose keys
    and values every later token reads."""
    return _product("linear16", x, q, scale, offset, bias, tiles)


def _product(name, x, q, scale, offset, bias, tiles):
    module = compiled()
    if module is None:
        return getattr(fallback, name)(x, q, scale, offset, bias)
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    return getattr(module, name)(x.contiguous(), q, scale, offset, bias, tiles)


def decode_layer(x, norm1, qkv, o, norm2, gate_up, down, eps, cos, sin, k_cache, v_cache, n,
                 n_head, n_kv_head, key_mask=None, lengths=None, rows=None):
    """One decoder layer for one new token per row (math: fallback.decode_layer). Each weight is
    (q, scale, offset) or (q, scale, offset, tiles) with tiles from tile_scales. Every row goes to
    position n of its own cache row, unless lengths (B,) gives each row's position and rows (B,)
    its cache row (the server's slots: rows of different lengths in one batch)."""
    module = compiled()
    weights = [tuple(w) + (None,) * (4 - len(w)) for w in (qkv, o, gate_up, down)]
    if module is None:
        qkv, o, gate_up, down = (w[:3] for w in weights)
        return fallback.decode_layer(x, norm1, qkv, o, norm2, gate_up, down, eps, cos, sin,
                                     k_cache, v_cache, n, n_head, n_kv_head, key_mask, lengths, rows)
    qkv, o, gate_up, down = weights
    return module.decode_layer(x, norm1, qkv, o, norm2, gate_up, down, float(eps), cos, sin,
                               k_cache, v_cache, int(n), int(n_head), int(n_kv_head), key_mask, lengths, rows)


# --- building -------------------------------------------------------------------------------------

def _flags() -> tuple[list[str], list[str]]:
    """Compiler and linker flags. -march=native: the build is for this CPU (the cache name carries
    its features). -fopenmp: at::parallel_for's OpenMP backend is inline in the headers, so without
    it every kernel runs on one thread. -ffp-contract=off: no silent a*b+c fusion, so rounding is
    the same wherever the same source line runs (batch invariance)."""
    if sys.platform == "win32":
        return ["/O2", "/arch:AVX2", "/openmp"], []
    arch = "-march=native" if platform.machine().lower() in ("x86_64", "amd64", "i686") else "-mcpu=native"
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    extra = os.environ.get("POCKETLM_KERNELS_CFLAGS", "").split()  # e.g. -mno-avx512f to test AVX2
    return ["-O3", arch, "-ffp-contract=off", "-DNDEBUG", *openmp, *extra], openmp


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {torch.backends.cpu.get_cpu_capability()}"


def _extension_name(cflags: list[str]) -> str:
    """torch caches a build by name alone, so the name carries everything the binary depends on."""
    digest = hashlib.sha256()
    with open(_SOURCE, "rb") as f:
        digest.update(f.read())
    for part in (" ".join(cflags), torch.__version__, _cpu_features(), sys.version):
        digest.update(b"\0" + part.encode())
    return f"pocketlm_kernels_{digest.hexdigest()[:12]}"


def _import_built(name: str):
    """The already built module, imported straight from torch's cache folder (skips load()'s ninja
    run, which costs more than the import itself), or None."""
    from torch.utils import cpp_extension
    try:
        folder = cpp_extension._get_build_directory(name, verbose=False)
        path = os.path.join(folder, name + (".pyd" if sys.platform == "win32" else ".so"))
        if not os.path.exists(path) or os.path.exists(os.path.join(folder, "lock")):
            return None
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception:  # a half-written or foreign file: let load() rebuild it
        return None


STALE_LOCK_S = 600  # a build holds torch's lock for under a minute; one this old was left by a killed build


def _clear_stale_lock(folder: str, max_age: float = STALE_LOCK_S) -> bool:
    """Remove the lock a killed build left in `folder` (torch would wait on it forever); a lock
    younger than max_age belongs to a build still running and is left alone. True if removed."""
    lock = os.path.join(folder, "lock")
    try:
        if time.time() - os.path.getmtime(lock) < max_age:
            return False
        os.remove(lock)
    except OSError:  # no lock, or another process removed it first
        return False
    sys.stderr.write(f"pocketlm: removed a stale build lock left by an interrupted compile ({lock})\n")
    return True


def _build(name: str, cflags: list[str], ldflags: list[str]):
    from torch.utils import cpp_extension
    _clear_stale_lock(cpp_extension._get_build_directory(name, verbose=False))
    compiler = os.environ.get("CXX", "cl" if sys.platform == "win32" else "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler}) on PATH")
    _put_ninja_on_path()
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("the ninja build tool is missing (pip install ninja)")
    start = time.monotonic()
    message = "pocketlm: compiling CPU kernels for this machine (first use only, ~40 s)…"
    done = threading.Event()
    if sys.stderr.isatty():
        def tick():
            while not done.wait(1.0):
                sys.stderr.write(f"\r{message} {time.monotonic() - start:.0f} s")
                sys.stderr.flush()
        threading.Thread(target=tick, daemon=True).start()
    sys.stderr.write(message + ("" if sys.stderr.isatty() else "\n"))
    sys.stderr.flush()
    try:
        module = cpp_extension.load(name=name, sources=[_SOURCE], extra_cflags=cflags,
                                    extra_ldflags=ldflags, verbose=False)
    except BaseException:
        if sys.stderr.isatty():
            sys.stderr.write("\n")  # end the ticking line before the warning
        raise
    finally:
        done.set()
    ending = "\r" + message + " " if sys.stderr.isatty() else "pocketlm: CPU kernels "
    sys.stderr.write(f"{ending}done in {time.monotonic() - start:.0f} s\n")
    return module


def _put_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; the ninja package (a pocketlm dependency) installs it beside
    the interpreter, which is not on PATH when a venv's python runs without being activated."""
    try:
        import ninja
    except ImportError:
        return
    folder = getattr(ninja, "BIN_DIR", None)
    if folder and folder not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")


def _failure_reason(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and "Error building extension" not in line]
    return ((errors or lines or [type(error).__name__])[0])[:300]


def _load() -> None:
    global _module, _tried
    try:
        cflags, ldflags = _flags()
        name = _extension_name(cflags)
        _module = _import_built(name) or _build(name, cflags, ldflags)
    except Exception as error:
        warnings.warn(f"pocketlm: could not build the CPU kernels ({_failure_reason(error)}); "
                      "using the slower pure-PyTorch fallback", RuntimeWarning, stacklevel=4)
    _tried = True
