"""The device this process decodes on, described in one line.

Tuning (``specstream tune``) measures one device: its step costs decide the draft tree and
whether speculation pays at all. The model directory records that device beside the result,
so a verdict measured on one machine is not applied blindly on another (a model tuned on a
2-core Linux CPU, where plain decoding won, still speculates when copied to a Mac's GPU).
"""

from __future__ import annotations

import os
import platform


def describe_device() -> str:
    """``"<cpu|gpu>: <device name> (<architecture>)"`` of MLX's default device, plus the number
    of logical CPUs for a CPU device: e.g. ``"cpu: AMD EPYC (x86_64), 2 cores"`` or
    ``"gpu: Apple M2 Pro (applegpu_g14s)"``. (Virtual machines may name only the CPU family:
    two hosts of one family, same core count, read alike.)

    Asked each time (the default device can change); the name comes from
    ``mx.device_info()`` where this MLX has it (``mx.metal.device_info()`` on older ones),
    else from :mod:`platform`.
    """
    import mlx.core as mx

    kind = "gpu" if mx.default_device().type == mx.gpu else "cpu"
    info = {}
    query = getattr(mx, "device_info", None)
    if query is None and kind == "gpu":  # MLX before mx.device_info(): Metal's own
        query = getattr(getattr(mx, "metal", None), "device_info", None)
    if query is not None:
        try:
            info = dict(query())
        except (RuntimeError, ValueError, TypeError):
            info = {}
    name = str(info.get("device_name") or platform.processor() or "unknown device").strip()
    arch = str(info.get("architecture") or platform.machine() or "unknown").strip()
    cores = f", {os.cpu_count()} cores" if kind == "cpu" and os.cpu_count() else ""  # a 2-core VM is not a 16-core host
    return f"{kind}: {name} ({arch}){cores}"
