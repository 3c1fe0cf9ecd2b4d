"""``specstream doctor``: what this machine runs MLX on, how fast, and what to do about it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Any, Optional

import typer

from mlx_specstream.cli.common import JsonOpt, fail, print_json
from mlx_specstream.device import describe_device

_MEASURE = "from mlx_specstream.blas import matmul_gflops; print(matmul_gflops({n}))"


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _backend(mx: Any) -> dict[str, Any]:
    metal = bool(getattr(getattr(mx, "metal", None), "is_available", lambda: False)())
    cuda = bool(getattr(getattr(mx, "cuda", None), "is_available", lambda: False)())
    return {
        "default_device": str(mx.default_device()),
        "device": describe_device(),  # what `specstream tune` records as a model's tuned_on
        "metal": metal,
        "cuda": cuda,
        "backend": "metal" if metal else "cuda" if cuda else "cpu",
        "gpu": gpu_info(mx) if metal or cuda else None,
    }


GIB = 1 << 30


def gpu_info(mx: Any) -> dict[str, Any]:
    """The GPU MLX decodes on: name, memory and, on Apple silicon, the working set Metal
    recommends (a model larger than it pages: mlx-lm raises the wired limit towards it)."""
    query = getattr(mx, "device_info", None) or getattr(getattr(mx, "metal", None), "device_info", None)
    try:
        info = dict(query()) if query is not None else {}
    except (RuntimeError, ValueError, TypeError):
        info = {}

    def gib(key: str) -> Optional[float]:
        value = info.get(key)
        return round(value / GIB, 1) if isinstance(value, (int, float)) and value else None

    return {
        "name": info.get("device_name"),
        "architecture": info.get("architecture"),
        "memory_gb": gib("memory_size") or gib("total_memory"),
        "recommended_working_set_gb": gib("max_recommended_working_set_size"),
    }


def _measure_in_subprocess(n: int, preload: Optional[str]) -> Optional[float]:
    """GFLOP/s in a fresh interpreter with (``preload``) or without OpenBLAS preloaded."""
    from mlx_specstream.blas import OPT_OUT_ENV

    env = {k: v for k, v in os.environ.items() if not k.startswith("_SPECSTREAM_")}
    env.pop("LD_PRELOAD", None)
    env[OPT_OUT_ENV] = "1"
    if preload:
        env["LD_PRELOAD"] = preload
    try:
        out = subprocess.run(
            [sys.executable, "-c", _MEASURE.format(n=n)], env=env, capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def _timeout_text(value: Any) -> str:
    """How long OpenBLAS's idle threads spin, from ``OPENBLAS_THREAD_TIMEOUT``."""
    return f"threads spin 2^{value or 28} cycles after work" + ("" if value else " (OpenBLAS's default)")


def _choice_line(b: dict[str, Any]) -> str:
    auto = f"{b['recommended']} on this {b['cpu_vendor'] or 'unknown'} CPU" if b["recommended"] else "no fast BLAS found"
    return f"SPECSTREAM_BLAS={b['choice']}" + (f": {auto}" if b["choice"] == "auto" else f" (auto: {auto})")


def collect(size: int = 1024, compare: bool = False) -> dict[str, Any]:
    """Everything doctor reports, as a JSON-ready dict (``advice`` lists what to do)."""
    try:
        import mlx.core as mx
    except ImportError as exc:
        fail(f"MLX is not importable ({exc}). Install it: pip install 'mlx[cpu]' on Linux, pip install mlx on macOS.")
    from mlx_specstream import blas

    info = blas.blas_info()
    report: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "versions": {
            "mlx": getattr(mx, "__version__", None) or _version("mlx"),
            "mlx-lm": _version("mlx-lm"),
            "mlx-specstream": _version("mlx-specstream") or _package_version(),
        },
        **_backend(mx),
        "blas": {
            "kind": info.kind,
            "library": info.provider,
            "preloaded": info.preloaded,  # a BLAS in LD_PRELOAD (OpenBLAS, BLIS, MKL, ...)
            "preloaded_by": "specstream" if info.via_reexec else ("LD_PRELOAD" if info.preloaded else None),
            "openblas_thread_timeout": info.thread_timeout,  # OPENBLAS_THREAD_TIMEOUT (None: OpenBLAS's 28)
            "system_openblas": info.system_openblas,
            "system_mkl": info.system_mkl,  # an MKL runtime (libmkl_rt) that could be preloaded
            "system_blis": info.system_blis,  # a BLIS that SPECSTREAM_BLAS=blis would preload
            "cpu_vendor": info.cpu_vendor,
            "choice": blas.choice_from(os.environ),  # SPECSTREAM_BLAS
            "recommended": info.recommended[0] if info.recommended else None,  # what "auto" preloads here
            "mlx_reference_blas": info.mlx_reference_blas,
            "opt_out": os.environ.get(blas.OPT_OUT_ENV, "") not in ("", "0"),
        },
        "matmul": {"n": size, "dtype": "float32", "gflops": round(blas.matmul_gflops(size), 1)},
    }
    if compare and info.system_openblas:
        without = _measure_in_subprocess(size, None)
        with_ob = _measure_in_subprocess(size, info.system_openblas)
        report["matmul"]["compare"] = {
            "reference_gflops": None if without is None else round(without, 1),
            "openblas_gflops": None if with_ob is None else round(with_ob, 1),
        }
    report["advice"] = advice(report, info)
    return report


def _package_version() -> str:
    from mlx_specstream import __version__

    return __version__


def advice(report: dict[str, Any], info: Any) -> list[str]:
    """What the user should do, one sentence each (empty when all is well)."""
    from mlx_specstream import blas

    tips = []
    if sys.platform == "darwin" and not report["metal"]:
        tips.append("MLX does not see a Metal GPU: use an Apple Silicon Mac and the native arm64 Python.")
    if report["backend"] != "cpu":
        return tips  # decoding runs on the GPU: the CPU's BLAS does not matter
    if sys.platform.startswith("linux") and info.mlx_reference_blas and not info.fast:
        if report["blas"]["opt_out"]:
            tips.append(
                f"{blas.OPT_OUT_ENV} is set, so MLX runs on its slow reference BLAS; unset it for ~30x faster "
                "float32 matmul."
            )
        elif info.recommended is None:
            tips.append(
                f"Install OpenBLAS ({blas.INSTALL_HINT}) or, on an Intel CPU, MKL ({blas.MKL_INSTALL_HINT}); "
                "specstream then preloads it by itself (~30x faster float32 matmul)."
            )
        else:
            tips.append(
                f"MLX runs on its slow reference BLAS. The specstream command preloads {info.recommended[0]} by "
                f"itself; in your own Python programs run `{blas.preload_command(info.recommended[1])}` first."
            )
    elif (report["blas"]["kind"] == "openblas" and info.recommended and info.recommended[0] == "mkl"
          and report["blas"]["preloaded_by"] == "LD_PRELOAD"):
        tips.append(
            "MKL is installed and decodes faster than OpenBLAS on Intel CPUs (docs/linux-cpu.md): "
            f"run `{blas.preload_command(info.recommended[1])}` instead (the specstream command picks it by itself)."
        )
    if (sys.platform.startswith("linux") and info.cpu_vendor == "GenuineIntel" and info.system_mkl is None
            and report["blas"]["kind"] != "mkl"):
        tips.append(
            f"On this Intel CPU, MKL decodes faster than OpenBLAS: {blas.MKL_INSTALL_HINT} "
            "(or install this package with its mkl extra); specstream then preloads it by itself."
        )
    if report["blas"]["kind"] == "openblas" and not report["blas"]["openblas_thread_timeout"]:
        tips.append(
            f"OpenBLAS's idle threads spin for ~0.1 s after each multi-threaded product and slow decoding "
            f"on small machines: run `export {blas.TIMEOUT_ENV}={blas.THREAD_TIMEOUT}` before starting Python "
            "(the specstream command sets it when it preloads OpenBLAS)."
        )
    return tips


def doctor(
    size: int = typer.Option(1024, "--size", min=64, max=8192, help="Matrix size of the matmul benchmark."),
    compare: bool = typer.Option(False, "--compare", help="Also measure matmul with and without OpenBLAS preloaded."),
    as_json: JsonOpt = False,
) -> None:
    """Report platform, MLX version and back-end, the BLAS in use, its matmul speed, and what to do.

    Example: specstream doctor --compare
    """
    report = collect(size=size, compare=compare)
    if as_json:
        print_json(report)
        return
    b, m = report["blas"], report["matmul"]
    how = {"specstream": " (preloaded by specstream)", "LD_PRELOAD": " (preloaded via LD_PRELOAD)"}.get(
        b["preloaded_by"] or "", ""
    )
    lines = [
        ("platform", f"{report['platform']} ({report['machine']}), Python {report['python']}"),
        ("versions", ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v)),
        ("back-end", f"{report['backend']} (default device {report['default_device']}; "
                     f"tuning records it as {report['device']!r})"),
    ]
    if report["gpu"]:
        g = report["gpu"]
        text = f"{g['name'] or 'unknown'}" + (f", {g['memory_gb']} GB" if g["memory_gb"] else "")
        if g["recommended_working_set_gb"]:
            text += f", recommended working set {g['recommended_working_set_gb']} GB"
        lines.append(("GPU", text))
    lines += [
        ("BLAS", f"{b['kind']}{how}: {b['library'] or 'not found'}"
                 + (f", {_timeout_text(b['openblas_thread_timeout'])}" if b["kind"] == "openblas" else "")),
        ("system OpenBLAS", b["system_openblas"] or "none found"),
        ("MKL", b["system_mkl"] or "none found"),
        ("BLIS", b["system_blis"] or "none found"),
        ("choice", _choice_line(b)),
        ("matmul", f"{m['gflops']:.1f} GFLOP/s (float32, {m['n']}x{m['n']})"),
    ]
    if "compare" in m:
        c = m["compare"]
        ref, ob = c["reference_gflops"], c["openblas_gflops"]
        text = f"reference BLAS {ref if ref is not None else '?'} GFLOP/s, OpenBLAS {ob if ob is not None else '?'} GFLOP/s"
        if ref and ob:
            text += f" ({ob / ref:.0f}x)"
        lines.append(("compare", text))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        typer.echo(f"{key:<{width}}  {value}")
    if report["advice"]:
        typer.echo("")
        for tip in report["advice"]:
            typer.secho(f"to do: {tip}", fg=typer.colors.YELLOW)
    else:
        typer.secho("All good: nothing to do.", fg=typer.colors.GREEN)
