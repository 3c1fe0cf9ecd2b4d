"""Which BLAS MLX's CPU back-end calls, how fast it is, and the fast BLAS path on Linux.

MLX's Linux CPU wheel links a bundled *reference* BLAS (``mlx_cpu.libs/libblas-*.so``): a float32
1024x1024 matmul runs at ~8 GFLOP/s. A system OpenBLAS, or Intel's MKL runtime
(``libmkl_rt``), exports the same CBLAS symbols, so preloading it (``LD_PRELOAD``) makes the
dynamic linker bind MLX's ``cblas_sgemm`` to it instead (~250 GFLOP/s on the same machine),
and tree verification becomes cheap.

Which one: ``SPECSTREAM_BLAS`` = ``auto`` (default), ``mkl``, ``openblas`` or ``blis``. ``auto``
takes MKL on Intel CPUs when it is installed (``pip install mkl``, or the ``mkl`` extra of this
package): on a 2-core Intel Xeon VM it made plain decoding of the demo 28% faster than OpenBLAS
and speculative decoding 40% faster, its few-row products gaining the most (docs/lab/2026-12-blas.md, "MKL
on an Intel host"); elsewhere OpenBLAS (on an AMD EPYC VM MKL decoded 9-25% slower than
OpenBLAS: docs/lab/2026-12-cpu-hosts.md), then MKL if it is the only one found. With MKL, keep MLX
on one stream: a second thread calling MKL slowed every later product in the process ("MKL on
an Intel host"). ``blis`` (Debian's ``libblis4-pthread``, one thread) is never picked by
``auto``: on the AMD EPYC VMs it decoded 31-60% faster than OpenBLAS without speculation and
at the same speed with it, but its single thread halves the speed of large products (long
prompts) against OpenBLAS's two (docs/lab/2026-12-blas.md, "Which BLAS").

The preload has to be in the environment before the process starts, so:

* the ``specstream`` command re-executes itself once with that BLAS preloaded
  (:func:`maybe_reexec_with_fast_blas`; opt out with ``SPECSTREAM_NO_OPENBLAS=1``);
* library users get one warning with the exact command to run (:func:`warn_if_slow_blas`).

A BLAS the user preloads themselves (OpenBLAS, BLIS, MKL, ...) is left alone: on some hosts
BLIS runs MLX's 1-row products faster than OpenBLAS (docs/linux-cpu.md).

OpenBLAS's worker threads keep spinning (``sched_yield``) for 2^28 CPU cycles, ~0.1 s, after
each multi-threaded product before they sleep. On a small machine that spinner takes a core
from MLX's own threads: after a prompt's prefill it slowed the plain decoding that followed by
~20% on a 2-core VM. The re-exec and :func:`preload_command` therefore also set
``OPENBLAS_THREAD_TIMEOUT=23`` (2^23 cycles, a few ms: long enough to stay awake between the
products of one decoding step), unless the user set it (docs/lab/2026-12-blas.md, "OpenBLAS's spinning
threads").

Nothing here imports MLX at module import time: the re-exec check runs before MLX is loaded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import glob
import importlib.util
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

OPT_OUT_ENV = "SPECSTREAM_NO_OPENBLAS"  # "1": never re-exec, never warn
PATH_ENV = "SPECSTREAM_OPENBLAS"  # explicit path to a libopenblas.so to preload
MKL_PATH_ENV = "SPECSTREAM_MKL"  # explicit path to a libmkl_rt.so to preload
BLIS_PATH_ENV = "SPECSTREAM_BLIS"  # explicit path to a CBLAS-exporting libblis.so to preload
CHOICE_ENV = "SPECSTREAM_BLAS"  # which BLAS the specstream command preloads
CHOICES = ("auto", "mkl", "openblas", "blis")
TIMEOUT_ENV = "OPENBLAS_THREAD_TIMEOUT"  # read by OpenBLAS once, when it loads: spin 2^value cycles
THREAD_TIMEOUT = "23"  # ours (module docstring); OpenBLAS's default is 28
# Set in the re-executed child only: guards against loops and remembers the user's LD_PRELOAD.
_REEXEC_ENV = "_SPECSTREAM_OPENBLAS_REEXEC"
_ORIG_PRELOAD_ENV = "_SPECSTREAM_ORIG_LD_PRELOAD"

# Where distributions put a CBLAS-exporting OpenBLAS, preferred first (pthread build first:
# the OpenMP build can fight with other OpenMP runtimes in the same process).
OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
INSTALL_HINT = "sudo apt-get install libopenblas0-pthread"  # Debian / Ubuntu
# Debian's BLIS builds export CBLAS; the pthread build runs one thread unless BLIS_NUM_THREADS says more.
BLIS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/blis-pthread/libblis.so.4",
    "/usr/lib/aarch64-linux-gnu/blis-pthread/libblis.so.4",
    "/usr/lib/x86_64-linux-gnu/blis-openmp/libblis.so.4",
    "/usr/lib/aarch64-linux-gnu/blis-openmp/libblis.so.4",
    "/usr/lib/x86_64-linux-gnu/blis-serial/libblis.so.4",
    "/usr/lib/aarch64-linux-gnu/blis-serial/libblis.so.4",
    "/usr/lib64/libblis.so.4",
    "/usr/lib/libblis.so.4",
)
BLIS_INSTALL_HINT = "sudo apt-get install libblis4-pthread"
MKL_INSTALL_HINT = "pip install mkl"
# Where MKL's single dynamic runtime lives: the environment's own lib folder (the PyPI wheel),
# the user's (pip --user), Debian's intel-mkl package, oneAPI's default install.
_MKL_GLOBS = ("{prefix}/lib/libmkl_rt.so*", "{user}/lib/libmkl_rt.so*",
              "/usr/lib/x86_64-linux-gnu/libmkl_rt.so*", "/opt/intel/oneapi/mkl/latest/lib*/libmkl_rt.so*")

_warned = False


@dataclasses.dataclass
class BlasInfo:
    """What this process's BLAS looks like (see :func:`blas_info`)."""

    provider: Optional[str]  # file that provides cblas_sgemm in this process (None: not loaded yet)
    kind: str  # "openblas" | "blis" | "mkl" | "accelerate" | "reference" | "other" | "unknown"
    preloaded: bool  # a BLAS library is in this process's LD_PRELOAD
    via_reexec: bool  # ... put there by the specstream command's re-exec
    thread_timeout: Optional[str]  # OPENBLAS_THREAD_TIMEOUT in this process's environment
    system_openblas: Optional[str]  # a system OpenBLAS that could be preloaded
    mlx_reference_blas: Optional[str]  # the reference BLAS bundled with the MLX CPU wheel
    system_mkl: Optional[str] = None  # an MKL runtime that could be preloaded
    cpu_vendor: Optional[str] = None  # /proc/cpuinfo's vendor_id: "GenuineIntel", "AuthenticAMD", ...
    system_blis: Optional[str] = None  # a BLIS that SPECSTREAM_BLAS=blis would preload

    @property
    def recommended(self) -> Optional[tuple[str, str]]:
        """``(kind, path)`` the ``auto`` choice would preload here, or None."""
        return choose_blas("auto", self.cpu_vendor, self.system_mkl, self.system_openblas)

    @property
    def fast(self) -> bool:
        return self.kind in ("openblas", "blis", "accelerate", "mkl")


def _first_file(env: str, candidates: tuple[str, ...]) -> Optional[str]:
    """``$env`` if set (None when it names no file), else the first of ``candidates`` that exists."""
    explicit = os.environ.get(env)
    if explicit:
        return explicit if os.path.isfile(explicit) else None
    return next((path for path in candidates if os.path.isfile(path)), None)


def find_system_openblas() -> Optional[str]:
    """Path of a system OpenBLAS shared library, or None. ``$SPECSTREAM_OPENBLAS`` wins."""
    return _first_file(PATH_ENV, OPENBLAS_CANDIDATES)


def find_blis() -> Optional[str]:
    """Path of a system BLIS shared library, or None. ``$SPECSTREAM_BLIS`` wins."""
    return _first_file(BLIS_PATH_ENV, BLIS_CANDIDATES)


def find_mkl() -> Optional[str]:
    """Path of an MKL runtime (``libmkl_rt.so``), or None. ``$SPECSTREAM_MKL`` wins."""
    explicit = os.environ.get(MKL_PATH_ENV)
    if explicit:
        return explicit if os.path.isfile(explicit) else None
    import site

    for pattern in _MKL_GLOBS:
        hits = sorted(glob.glob(pattern.format(prefix=sys.prefix, user=site.getuserbase())))
        hits = [h for h in hits if os.path.isfile(h)]
        if hits:
            return hits[-1]  # the newest soname: libmkl_rt.so.3 over libmkl_rt.so.2
    return None


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> Optional[str]:
    """The CPU's vendor_id ("GenuineIntel", "AuthenticAMD", ...), or None where there is none."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def choice_from(environ: dict[str, str]) -> str:
    """``SPECSTREAM_BLAS`` of ``environ``, normalised (unset or empty: ``auto``); not validated."""
    return environ.get(CHOICE_ENV, "").strip().lower() or "auto"


def choose_blas(choice: str, vendor: Optional[str], mkl: Optional[str], openblas: Optional[str],
                blis: Optional[str] = None) -> Optional[tuple[str, str]]:
    """``(kind, path)`` of the BLAS to preload for ``choice`` (one of :data:`CHOICES`), or None
    (pure: unit-tested). ``auto``: MKL on Intel CPUs, else OpenBLAS, else MKL (never BLIS)."""
    if choice not in CHOICES:
        raise ValueError(f"{CHOICE_ENV}={choice!r} is not one of {', '.join(CHOICES)}; unset it for 'auto'.")
    forced = {"mkl": mkl, "openblas": openblas, "blis": blis}
    if choice in forced:
        return (choice, forced[choice]) if forced[choice] else None
    if mkl and vendor == "GenuineIntel":
        return "mkl", mkl
    if openblas:
        return "openblas", openblas
    return ("mkl", mkl) if mkl else None


def mlx_reference_blas() -> Optional[str]:
    """The reference BLAS bundled with the ``mlx[cpu]`` Linux wheel, found without importing MLX."""
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return None
    site = Path(list(spec.submodule_search_locations)[0]).parent
    hits = sorted(glob.glob(str(site / "mlx_cpu.libs" / "libblas*.so*")))
    return hits[0] if hits else None


def _classify(path: Optional[str]) -> str:
    if path is None:
        return "unknown"
    name = os.path.basename(path).lower()
    if "openblas" in name:
        return "openblas"
    if "accelerate" in path.lower() or "veclib" in path.lower():
        return "accelerate"
    if "mkl" in name:
        return "mkl"
    if "blis" in path.lower():  # Debian's BLIS: .../blis-pthread/libblas.so.3, or libblis.so.4
        return "blis"
    if name.startswith("libblas") or name.startswith("libcblas"):
        return "reference"
    return "other"


def _dladdr_file(address: int) -> Optional[str]:
    class _DlInfo(ctypes.Structure):
        _fields_ = [
            ("dli_fname", ctypes.c_char_p),
            ("dli_fbase", ctypes.c_void_p),
            ("dli_sname", ctypes.c_char_p),
            ("dli_saddr", ctypes.c_void_p),
        ]

    libdl = ctypes.CDLL(ctypes.util.find_library("dl") or None)
    info = _DlInfo()
    if libdl.dladdr(ctypes.c_void_p(address), ctypes.byref(info)) and info.dli_fname:
        return os.path.realpath(info.dli_fname.decode())
    return None


def _symbol_provider(library: Optional[str], symbol: str = "cblas_sgemm") -> Optional[str]:
    """File that provides ``symbol`` to ``library`` (MLX's extension module).

    The dynamic linker binds a library's undefined symbols from the global scope first (the
    executable, ``LD_PRELOAD``, ``RTLD_GLOBAL`` libraries), then from the library's own
    dependencies: look the symbol up in that order.
    """
    handles = [None]
    if library is not None:
        handles.append(library)
    for handle in handles:
        try:
            lib = ctypes.CDLL(handle, mode=os.RTLD_NOLOAD) if handle else ctypes.CDLL(None)
            address = ctypes.cast(getattr(lib, symbol), ctypes.c_void_p).value
        except (AttributeError, OSError):
            continue
        if address:
            return _dladdr_file(address)
    return None


# Substrings of a preloaded library's path that mark it as a BLAS the user chose (OpenBLAS,
# BLIS, MKL, FlexiBLAS, any libblas / libcblas): the re-exec leaves such a process alone.
_BLAS_MARKERS = ("openblas", "blis", "mkl", "flexiblas", "libblas", "libcblas")


def _preloaded_blas(environ: Optional[dict[str, str]] = None) -> bool:
    """Whether ``LD_PRELOAD`` (of ``environ``, default this process's) names a BLAS library
    (judged by the file's name and its folder's: ``.../blis-pthread/libblas.so.3``)."""
    preload = (os.environ if environ is None else environ).get("LD_PRELOAD", "")
    for path in preload.replace(" ", ":").split(":"):
        tail = "/".join(Path(path).parts[-2:]).lower()
        if path and any(marker in tail for marker in _BLAS_MARKERS):
            return True
    return False


def blas_info(load_mlx: bool = True) -> BlasInfo:
    """Describe the BLAS in use. ``load_mlx`` imports MLX first so its libraries are mapped."""
    core = None
    if load_mlx:
        import mlx.core as core  # maps libmlx and its BLAS into the process
    provider = None
    if sys.platform.startswith("linux"):
        provider = _symbol_provider(getattr(core, "__file__", None))
    kind = _classify(provider)
    if sys.platform == "darwin":
        kind = "accelerate"  # MLX on macOS always uses Accelerate
    return BlasInfo(
        provider=provider,
        kind=kind,
        preloaded=_preloaded_blas() or os.environ.get(_REEXEC_ENV) == "1",
        via_reexec=os.environ.get(_REEXEC_ENV) == "1",
        thread_timeout=os.environ.get(TIMEOUT_ENV),
        system_openblas=find_system_openblas() if sys.platform.startswith("linux") else None,
        mlx_reference_blas=mlx_reference_blas(),
        system_mkl=find_mkl() if sys.platform.startswith("linux") else None,
        cpu_vendor=cpu_vendor() if sys.platform.startswith("linux") else None,
        system_blis=find_blis() if sys.platform.startswith("linux") else None,
    )


def matmul_gflops(n: int = 1024, repeats: int = 3, dtype: str = "float32") -> float:
    """Best-of-``repeats`` float32 ``n x n`` matmul throughput on MLX's CPU device, in GFLOP/s."""
    import mlx.core as mx

    with mx.stream(mx.cpu):
        a = mx.random.normal((n, n)).astype(getattr(mx, dtype))
        b = mx.random.normal((n, n)).astype(getattr(mx, dtype))
        mx.eval(a, b, a @ b)  # warm-up: thread pools, page faults
        best = float("inf")
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            mx.eval(a @ b)
            best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best / 1e9


def preload_command(path: Optional[str] = None) -> str:
    """The shell line that makes a Python process use the BLAS at ``path`` (default: a system
    OpenBLAS), OpenBLAS's threads sleeping soon after their work (module docstring), for messages."""
    path = path or find_system_openblas() or OPENBLAS_CANDIDATES[0]
    extra = f" {TIMEOUT_ENV}={THREAD_TIMEOUT}" if _classify(path) == "openblas" else ""
    return f"export LD_PRELOAD={path}{extra}"


def preload_env(kind: str) -> dict[str, str]:
    """Environment the re-exec adds beside the preload (the user's own values win)."""
    return {TIMEOUT_ENV: THREAD_TIMEOUT} if kind == "openblas" else {}


def fix_hint(info: BlasInfo) -> Optional[str]:
    """What the user should do about a slow BLAS, or None when nothing is needed."""
    if info.fast or not sys.platform.startswith("linux") or info.mlx_reference_blas is None:
        return None
    picked = info.recommended
    if picked is None:
        return (
            f"MLX is using its slow reference BLAS. Install OpenBLAS ({INSTALL_HINT}) or, on an "
            f"Intel CPU, MKL ({MKL_INSTALL_HINT}); the specstream command then preloads it automatically."
        )
    return (
        "MLX is using its slow reference BLAS (~30x slower float32 matmul). "
        f"Run `{preload_command(picked[1])}` before starting Python "
        "(the specstream command does this by itself)."
    )


_MISSING_HINTS = {
    "mkl": f"{MKL_INSTALL_HINT} (or set {MKL_PATH_ENV}=/path/to/libmkl_rt.so)",
    "openblas": f"{INSTALL_HINT} (or set {PATH_ENV}=/path/to/libopenblas.so)",
    "blis": f"{BLIS_INSTALL_HINT} (or set {BLIS_PATH_ENV}=/path/to/libblis.so)",
}


def _should_reexec(environ: dict[str, str], platform: str) -> Optional[tuple[str, str]]:
    """``(kind, path)`` of the BLAS to preload by re-executing, or None (unit-tested; raises
    ValueError for an unknown ``SPECSTREAM_BLAS``, or a named one that is not installed)."""
    if not platform.startswith("linux"):
        return None
    if environ.get(OPT_OUT_ENV, "") not in ("", "0") or environ.get(_REEXEC_ENV):
        return None
    if _preloaded_blas(environ):  # the user chose a BLAS (OpenBLAS, BLIS, MKL, ...): keep it
        return None
    if mlx_reference_blas() is None:  # not the reference-BLAS CPU wheel: nothing to gain
        return None
    choice = choice_from(environ)
    picked = choose_blas(choice, cpu_vendor(), find_mkl(), find_system_openblas(), find_blis())
    if picked is None and choice != "auto":
        raise ValueError(f"{CHOICE_ENV}={choice} but no {choice} library was found: {_MISSING_HINTS[choice]}, "
                         f"or unset {CHOICE_ENV} to let specstream pick.")
    return picked


def maybe_reexec_with_fast_blas(argv: Optional[list[str]] = None) -> None:
    """Re-execute this process with a fast BLAS preloaded when that helps (Linux ``specstream``
    only; which one: module docstring).

    Called first thing by the CLI, before MLX is imported. In the re-executed child it restores
    the user's own ``LD_PRELOAD`` in ``os.environ`` so subprocesses are not affected
    (``OPENBLAS_THREAD_TIMEOUT`` stays: it only changes how long OpenBLAS threads spin).
    """
    if os.environ.get(_REEXEC_ENV) == "1":
        original = os.environ.pop(_ORIG_PRELOAD_ENV, None)
        if original is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = original
        return  # _REEXEC_ENV stays set: blas_info reports how the BLAS got here
    picked = _should_reexec(dict(os.environ), sys.platform)
    if picked is None:
        return
    kind, path = picked
    env = dict(os.environ)
    original = env.get("LD_PRELOAD")
    if original is not None:
        env[_ORIG_PRELOAD_ENV] = original
    env["LD_PRELOAD"] = f"{path}:{original}" if original else path
    for key, value in preload_env(kind).items():
        env.setdefault(key, value)  # the user's own value wins
    env[_REEXEC_ENV] = "1"
    args = argv if argv is not None else list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *args[1:]], env)
    except OSError:
        return  # could not re-exec: carry on with the slow BLAS; doctor explains


def warn_if_slow_blas() -> None:
    """Warn once, with the exact fix, when MLX runs on its reference BLAS (library users)."""
    global _warned
    if _warned or not sys.platform.startswith("linux"):
        return
    _warned = True
    if os.environ.get(OPT_OUT_ENV, "") not in ("", "0"):
        return
    info = blas_info()
    hint = fix_hint(info)
    if hint is not None:
        warnings.warn(f"{hint} Silence with {OPT_OUT_ENV}=1.", RuntimeWarning, stacklevel=4)
