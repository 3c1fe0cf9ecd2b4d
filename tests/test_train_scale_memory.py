"""Training at scale, memory: at T = 2,048 the multi-stream layers build nothing quadratic in
``L = T(1 + γ)``, while the dense ``[L, L]`` reference does (measured with the same probe)."""

import contextlib

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from mlx_specstream.train import layout  # noqa: E402
from mlx_specstream.train.loss import specstream_loss  # noqa: E402

from test_train_scale_attention import dense_forward_hidden, dense_loss, ids, make  # noqa: E402

torch.set_num_threads(2)


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@contextlib.contextmanager
def _saved_bytes(record):
    """Sums the bytes of distinct storages autograd saves for the backward pass."""
    seen = set()

    def pack(t):
        try:
            st = t.untyped_storage()
            key = (st.data_ptr(), st.nbytes())
        except (RuntimeError, NotImplementedError):
            return t
        if key not in seen:
            seen.add(key)
            record[0] += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def _probe(step):
    """(largest tensor's element count, bytes saved for backward) of ``step()``."""
    saved = [0]
    mode = _LargestTensor()
    with mode, _saved_bytes(saved):
        step()
    return mode.largest, saved[0]


def test_peak_memory_at_2048_tokens_stays_far_below_a_dense_implementation():
    """Tiny llama (hidden 32, MLP 64, 4 heads, vocab 259), γ = 4, 2 of 4 layers MSA, T = 2,048,
    B = 1: L = T(1 + γ) = 10,240 rows in the MSA layers. Training memory is what autograd keeps
    for the backward pass plus the largest transient tensor; we measure both.

    A dense implementation holds an ``[L, L]`` mask (L^2 = 104.9M elements, 100 MiB as bool)
    in each MSA layer and keeps it for the backward pass: measured here, its largest tensor has
    >= L^2 elements and it saves ~900 MiB. The decomposition has nothing quadratic in L: every
    stream attends with sdpa's causal path (no mask on this right-padded-free batch), so its
    largest tensor is an activation (L x MLP width = 655k elements), asserted below a quarter of
    one ``[T, T + γ]`` block (1.05M), and it saves ~90 MiB, asserted under 128 MiB -- a bound
    the dense ``[L, L]`` masks of the two MSA layers alone (200 MiB) exceed.
    """
    T, gamma = 2048, 4
    model = make("llama", gamma=gamma, msa=2)
    x = ids(B=1, T=T, seed=4)
    L = T * (1 + gamma)
    targets = layout.stream_targets(x, gamma)

    def step(dense):
        def run():
            model.zero_grad(set_to_none=True)
            if dense:
                loss = dense_loss(model, dense_forward_hidden(model, x), targets)
            else:
                loss = specstream_loss(model, model.forward_hidden(x), targets)[0]
            loss.backward()
        return run

    largest, saved = _probe(step(False))
    assert largest < T * (T + gamma) / 4, largest
    assert saved < 128 * 2**20, saved / 2**20

    dense_largest, dense_saved = _probe(step(True))
    assert dense_largest >= L * L and dense_saved > 128 * 2**20 + 2 * L * L, (dense_largest, dense_saved / 2**20)
