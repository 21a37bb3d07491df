"""Process-wide settings that make XLA:CPU train steps faster. Imports neither jax nor TensorFlow,
so entry points can call :func:`configure_cpu_runtime` before their heavy imports.

Why: XLA:CPU allocates each step's temporaries (about 2.1 GB for the ViT-B/16 384x128 + text towers at
batch 8) and its outputs with one malloc per buffer, from its worker threads. glibc serves such blocks
with a fresh mmap() (a thread arena cannot hold blocks > 64 MB, and the dynamic mmap threshold is at
most 32 MB) and munmap()s them on free, so every step the kernel faults in and zeroes every 4 KiB page
again: ~600k minor page faults and 1-2 CPU-seconds of kernel time per step for the two towers, a third
of the tiny IRRA step. With no mmap()ed blocks, no heap trimming and one arena for all threads, freed
blocks are reused from the heap. The cost: the process keeps its peak heap, and all threads share one
malloc arena (which is why the settings are skipped where an accelerator does the work).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys

# glibc malloc settings as a GLIBC_TUNABLES value (glibc reads it at process start).
CPU_GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776:glibc.malloc.arena_max=1"
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8   # mallopt() parameter numbers (malloc.h)
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin",
                        "libtpu")


def _accelerator_configured() -> bool:
    """True when JAX_PLATFORMS names a non-CPU platform first, or (unset) an accelerator plugin is
    installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() not in ("cpu", "")
    return any(importlib.util.find_spec(m) is not None for m in _ACCELERATOR_PLUGINS)


def _can_reexec() -> bool:
    main = sys.modules.get("__main__")
    return (hasattr(sys, "orig_argv") and not sys.flags.interactive and "pytest" not in sys.modules
            and main is not None and bool(getattr(main, "__file__", None) or "-c" in sys.orig_argv))


def configure_cpu_runtime(force: bool = False, reexec: bool = True) -> dict:
    """Apply CPU_GLIBC_TUNABLES to this process; call first thing in a program's entry point.

    glibc reads the arena limit before the first thread allocates, so mallopt() in a running process
    has only a partial effect. With reexec=True (default) the program re-executes itself (same
    interpreter and arguments) with GLIBC_TUNABLES set, unless it is already set that way, it runs
    interactively or under pytest, or sys.orig_argv is missing; otherwise the settings are applied
    with mallopt(). Launchers can instead export GLIBC_TUNABLES=<CPU_GLIBC_TUNABLES> themselves.

    Skipped with XMR_CPU_RUNTIME=0, off Linux/glibc, and when an accelerator platform is configured or
    its JAX plugin is installed, unless force=True. Returns a dict saying what was done (for the log).
    """
    if os.environ.get("XMR_CPU_RUNTIME") == "0":
        return {"skipped": "XMR_CPU_RUNTIME=0"}
    if not sys.platform.startswith("linux"):
        return {"skipped": "not linux"}
    if not force and _accelerator_configured():
        return {"skipped": "accelerator platform configured or installed"}
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
    except (OSError, AttributeError):
        return {"skipped": "not glibc"}
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if CPU_GLIBC_TUNABLES in tunables:
        return {"glibc": version, "GLIBC_TUNABLES": tunables}
    if reexec and _can_reexec():
        env = dict(os.environ)
        env["GLIBC_TUNABLES"] = ":".join(x for x in (tunables, CPU_GLIBC_TUNABLES) if x)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable] + list(sys.orig_argv[1:]), env)
    # mallopt(M_TRIM_THRESHOLD, -1): the int -1 becomes SIZE_MAX inside glibc = never trim.
    return {"glibc": version, "mallopt": {name: bool(libc.mallopt(param, value)) for name, param, value in (
        ("M_ARENA_MAX=1", _M_ARENA_MAX, 1), ("M_MMAP_MAX=0", _M_MMAP_MAX, 0),
        ("M_TRIM_THRESHOLD=max", _M_TRIM_THRESHOLD, -1))}}
