"""The device this process decodes on, described in one line.

Tuning (``specstream tune``) measures one device: its step costs decide the draft tree and
whether speculation pays at all. The model directory records that device beside the result,
so a verdict measured on one machine is not applied blindly on another (a model tuned on a
2-core Linux CPU, where plain decoding won, still speculates when copied to a Mac's GPU).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Optional

CPUINFO = Path("/proc/cpuinfo")


def describe_device() -> str:
    """``"<cpu|gpu>: <device name> (<architecture>)"`` of MLX's default device, plus the number
    of logical CPUs for a CPU device: e.g. ``"cpu: AMD EPYC (x86_64, family 25 model 17), 2
    cores"`` or ``"gpu: Apple M2 Pro (applegpu_g14s)"``. On Linux the CPU's model numbers
    from ``/proc/cpuinfo`` follow the architecture: virtual machines often name only the
    product line ("AMD EPYC"), and two such hosts of different generations decode at very
    different speeds.

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
    model = cpu_model_numbers() if kind == "cpu" else None
    if model:
        arch = f"{arch}, {model}"
    cores = f", {os.cpu_count()} cores" if kind == "cpu" and os.cpu_count() else ""  # a 2-core VM is not a 16-core host
    return f"{kind}: {name} ({arch}){cores}"


def cpu_model_numbers(cpuinfo: Path = CPUINFO) -> Optional[str]:
    """The first CPU's model numbers from a Linux ``/proc/cpuinfo``: ``"family 25 model 17"``
    on x86 (the microarchitecture, which the product name may not tell), ``"implementer
    0x41 part 0xd0c"`` on Arm; None where the file is missing or has neither."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    if fields.get("cpu family") and fields.get("model"):
        return f"family {fields['cpu family']} model {fields['model']}"
    if fields.get("cpu implementer") and fields.get("cpu part"):
        return f"implementer {fields['cpu implementer']} part {fields['cpu part']}"
    return None
