"""Native CPU kernels, compiled on the machine that runs them (``torch.utils.cpp_extension``).

``bn_act()`` returns the fused training BatchNorm2d(+ReLU6) module built from ``bn_act.cpp``;
``dw_conv()`` the depthwise-convolution weight gradient built from ``dw_conv.cpp``. Each is ``None``
when it cannot be used here (no C++ compiler or ninja, a failed build, or ``DENSENAS_NATIVE=0``);
callers then use aten's ops, which give the same results up to float rounding. The first call on a
machine compiles (about a minute each; ``make`` does it once at set-up: ``python -m densenas.native``);
later calls load the cached build from ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``).
The build is keyed by the source, the flags and the CPU's instruction set, since it is compiled with
``-march=native``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

__all__ = ["bn_act", "dw_conv", "native_enabled", "build_all"]

_SOURCES = {"bn_act": "the fused BatchNorm kernel", "dw_conv": "the depthwise weight-gradient kernel"}
_FLAGS = ["-O3", "-march=native", "-fopenmp"]
_lock = threading.Lock()
_cache: dict[str, ModuleType | None] = {}
_MISSING = object()


def native_enabled() -> bool:
    """False when ``DENSENAS_NATIVE`` is set to 0 / false / no / off."""
    return os.environ.get("DENSENAS_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_key() -> str:
    """A short hash of the CPU's model and flags: a ``-march=native`` build is only valid on a like CPU."""
    text = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features")):
                text += line
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        pass
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _build(name: str, verbose: bool = False) -> ModuleType:
    # Importing cpp_extension logs "No CUDA runtime is found" on every CPU machine: not news here.
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        log.setLevel(level)

    # setup.py installs ninja into the environment; its bin folder is not on PATH unless activated.
    bin_dir = str(Path(sys.executable).parent)
    if shutil.which("ninja") is None and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    source = Path(__file__).with_name(f"{name}.cpp")
    return load(name=f"densenas_{name}_{_cpu_key()}", sources=[str(source)], extra_cflags=_FLAGS,
                extra_ldflags=["-fopenmp"], verbose=verbose)


def _module(name: str) -> ModuleType | None:
    if not native_enabled():
        return None
    mod = _cache.get(name, _MISSING)  # built (or failed) already: no lock, called per layer per step
    if mod is not _MISSING:
        return mod  # type: ignore[return-value]
    with _lock:
        if name not in _cache:
            try:
                _cache[name] = _build(name)
            except Exception as e:  # a missing compiler, ninja or headers: fall back to aten, say so once
                warnings.warn(f"densenas.native: {_SOURCES[name]} could not be built ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}); using aten's "
                              f"ops instead (same results, slower on CPU). Set DENSENAS_NATIVE=0 to skip the build.",
                              RuntimeWarning, stacklevel=3)
                _cache[name] = None
        return _cache[name]


def bn_act() -> ModuleType | None:
    """The compiled BatchNorm(+ReLU6) module (``forward``, ``backward``), or None where it cannot be used
    (warned once)."""
    return _module("bn_act")


def dw_conv() -> ModuleType | None:
    """The compiled depthwise-convolution module (``weight_grad``), or None where it cannot be used (warned
    once)."""
    return _module("dw_conv")


def build_all(verbose: bool = True) -> bool:
    """Compile every native module now (set-up time); True when all built."""
    if not native_enabled():
        print("densenas.native: DENSENAS_NATIVE=0, nothing built")
        return True
    ok = True
    for name, what in _SOURCES.items():
        try:
            _build(name, verbose=verbose)
        except Exception as e:
            print(f"densenas.native: {what} failed to build, aten's ops will be used instead: {e}")
            ok = False
            continue
        print(f"densenas.native: {what} built")
    return ok
