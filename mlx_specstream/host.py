"""Per-process set-up for the host decoding runs on: the one place, outside the model, cache,
loader and decoding loop, where what helps only some machines is applied.

* Linux CPUs: MLX's wheel links a reference BLAS ~30x slower than a system one; the
  ``specstream`` command preloads a fast one (:mod:`.blas`), and library users get one warning
  with the command that does it.
* Every host: a thread that evaluated MLX arrays destroys its streams before it ends
  (:func:`release_mlx_streams`).
* Every host: once a model is loaded, everything alive (tokenizer libraries, often torch) lives
  as long as the model; moving it out of the garbage collector's view keeps full collections
  cheap during generation (they took ~5% of a small model's decoding step on a CPU with
  transformers and torch imported).
"""

from __future__ import annotations

import gc
import sys


def prepare_for_decoding() -> None:
    """Call once a model is loaded (``mlx_specstream.load`` does)."""
    from .blas import warn_if_slow_blas

    warn_if_slow_blas()  # (its warning points at the caller of load())
    gc.freeze()


def release_mlx_streams() -> None:
    """Destroy the MLX streams of the calling thread, if it used MLX. MLX wants this at the end
    of every thread that evaluated arrays, the main one included: a stream left to the
    interpreter's teardown can abort the process ("terminate called without an active
    exception"), which made `specstream serve` exit with SIGABRT after a SIGTERM now and then."""
    if "mlx.core" in sys.modules:
        sys.modules["mlx.core"].clear_streams()
