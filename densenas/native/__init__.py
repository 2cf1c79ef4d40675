"""Native CPU kernels, compiled on the machine that runs them (``torch.utils.cpp_extension``).

``bn_act()`` returns the fused training BatchNorm2d(+ReLU6) module built from ``bn_act.cpp``, or
``None`` when it cannot be used here (no C++ compiler or ninja, a failed build, or ``DENSENAS_NATIVE=0``);
callers then use aten's ops, which give the same results up to float rounding. The first call on a
machine compiles (about a minute; ``make`` does it once at set-up: ``python -m densenas.native``);
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

__all__ = ["bn_act", "native_enabled", "build_all"]

_SOURCE = Path(__file__).with_name("bn_act.cpp")
_FLAGS = ["-O3", "-march=native", "-fopenmp"]
_lock = threading.Lock()
_cache: dict[str, ModuleType | None] = {}


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


def _build(verbose: bool = False) -> ModuleType:
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
    return load(name=f"densenas_bn_act_{_cpu_key()}", sources=[str(_SOURCE)], extra_cflags=_FLAGS,
                extra_ldflags=["-fopenmp"], verbose=verbose)


def bn_act() -> ModuleType | None:
    """The compiled module (``forward``, ``backward``), or None where it cannot be used (warned once)."""
    if not native_enabled():
        return None
    with _lock:
        if "bn_act" not in _cache:
            try:
                _cache["bn_act"] = _build()
            except Exception as e:  # a missing compiler, ninja or headers: fall back to aten, say so once
                warnings.warn(f"densenas.native: the fused BatchNorm kernel could not be built ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}); using aten's "
                              f"BatchNorm (same results, slower on CPU). Set DENSENAS_NATIVE=0 to skip the build.",
                              RuntimeWarning, stacklevel=2)
                _cache["bn_act"] = None
        return _cache["bn_act"]


def build_all(verbose: bool = True) -> bool:
    """Compile every native module now (set-up time); True when all built."""
    if not native_enabled():
        print("densenas.native: DENSENAS_NATIVE=0, nothing built")
        return True
    try:
        _build(verbose=verbose)
    except Exception as e:
        print(f"densenas.native: build failed, aten's ops will be used instead: {e}")
        return False
    print("densenas.native: fused BatchNorm kernel built")
    return True
