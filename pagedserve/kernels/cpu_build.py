"""Compiles the project's small C kernels with the system compiler and loads them with ctypes.

Built once per source (with the headers beside it), compiler flags, variant (``-D`` defines) and
CPU (``-march=native``) into a user cache directory; anything that goes wrong (no compiler, odd platform) makes
:func:`load_kernel` return None and callers fall back to plain PyTorch.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

logger = logging.getLogger(__name__)

FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _cache_dir() -> Path:
    root = os.environ.get("PAGEDSERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "pagedserve"
    )
    return Path(root) / "kernels"


@cache
def load_kernel(name: str, defines: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """Build (if needed) and load ``<name>.c`` from this package, compiled with ``defines``
    (``-D`` flags that pick a variant); None if that fails."""
    if os.environ.get("PAGEDSERVE_DISABLE_C_KERNELS") == "1":
        return None
    compiler = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if compiler is None or platform.system() != "Linux":
        return None
    source = Path(__file__).with_name(f"{name}.c")
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    flags = [*FLAGS, *defines]
    key = hashlib.sha256(
        source.read_bytes() + headers + " ".join(flags).encode() + _cpu_signature().encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"{name}-{key}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                subprocess.run(
                    [compiler, *flags, str(source), "-o", str(built), "-lm"],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                os.replace(built, target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        logger.warning("C kernel %s unavailable, using PyTorch instead: %s", name, detail)
        return None


Signature = tuple[list[type], type | None]  # (argtypes, restype) of one C function


def bind_kernel(
    name: str, signatures: dict[str, Signature], defines: tuple[str, ...] = ()
) -> ctypes.CDLL | None:
    """:func:`load_kernel` with the argument and result types of its functions set."""
    lib = load_kernel(name, defines)
    if lib is not None:
        for function, (argtypes, restype) in signatures.items():
            getattr(lib, function).argtypes = argtypes
            getattr(lib, function).restype = restype
    return lib
