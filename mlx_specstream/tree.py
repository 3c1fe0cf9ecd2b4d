"""Draft trees, their attention masks and positions: pure functions over numpy arrays.

A tree is described by the *path of ranks* of each node: the root is ``()``, ``(0,)`` is the
top-1 token of stream 1, ``(0, 1)`` the top-2 token of stream 2 under it, and so on. Node
``i`` at depth ``d`` (``d >= 1``) carries token ``topk(stream_d)[rank_i]``, all taken from the
streams of the node accepted in the previous step (DESIGN.md rule 7).

Worked example, spec ``"2,1"`` (Cartesian product: 1 + 2 + 2 = 5 nodes, breadth first)::

    node  path     parent  depth   ancestor-or-self mask (row attends to column)
    0     ()       -1      0        1 0 0 0 0
    1     (0,)      0      1        1 1 0 0 0
    2     (1,)      0      1        1 0 1 0 0
    3     (0, 0)    1      2        1 1 0 1 0
    4     (1, 0)    2      2        1 0 1 0 1

Node ``i`` sits at position ``prefix_length + depth[i]``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Sequence, Union

import numpy as np

TreeSpec = Union[str, Sequence[int], Sequence[Sequence[int]]]


@dataclasses.dataclass(frozen=True)
class Tree:
    paths: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        if not self.paths or self.paths[0] != ():
            raise ValueError("A tree's first node must be the root, with the empty path ().")
        index = {p: i for i, p in enumerate(self.paths)}
        if len(index) != len(self.paths):
            raise ValueError("A tree lists the same path twice.")
        for p in self.paths[1:]:
            if p[:-1] not in index:
                raise ValueError(f"Tree path {list(p)} has no parent {list(p[:-1])}; list every prefix.")
            if any(r < 0 for r in p):
                raise ValueError(f"Tree path {list(p)} has a negative rank.")
        depths = [len(p) for p in self.paths]
        if depths != sorted(depths):
            raise ValueError("Tree nodes must be in breadth-first order (shallower nodes first).")

    @property
    def size(self) -> int:
        return len(self.paths)

    @property
    def depth(self) -> np.ndarray:
        """``[T]`` depth of each node (root 0)."""
        return np.array([len(p) for p in self.paths], dtype=np.int32)

    @property
    def max_depth(self) -> int:
        return len(self.paths[-1])

    @property
    def parents(self) -> np.ndarray:
        """``[T]`` parent index of each node (root -1)."""
        index = {p: i for i, p in enumerate(self.paths)}
        return np.array([-1] + [index[p[:-1]] for p in self.paths[1:]], dtype=np.int32)

    @property
    def ranks(self) -> np.ndarray:
        """``[T]`` top-k rank of each node's token within its stream (root 0)."""
        return np.array([p[-1] if p else 0 for p in self.paths], dtype=np.int32)

    def width(self) -> list[int]:
        """Largest rank used at each depth plus one: how many top-k tokens each stream needs."""
        out = [0] * self.max_depth
        for p in self.paths[1:]:
            out[len(p) - 1] = max(out[len(p) - 1], p[-1] + 1)
        return out

    def subtree(self, keep: Sequence[int]) -> "Tree":
        """The tree made of the nodes ``keep`` (indices, root included, parents before children)."""
        return Tree(tuple(self.paths[i] for i in keep))


def cartesian_tree(ks: Sequence[int]) -> Tree:
    """``ks = [k_1, ..., k_D]``: top-k_1 of stream 1, top-k_2 of stream 2 under each, ..."""
    if any(k < 1 for k in ks):
        raise ValueError(f"Every per-depth top-k must be >= 1, got {list(ks)}.")
    paths: list[tuple[int, ...]] = [()]
    for d in range(1, len(ks) + 1):
        paths.extend(itertools.product(*(range(k) for k in ks[:d])))
    return Tree(tuple(paths))


def sparse_tree(paths: Sequence[Sequence[int]]) -> Tree:
    """A tree from an explicit list of rank paths (Medusa style); root added, sorted breadth first."""
    unique = sorted({tuple(int(r) for r in p) for p in paths if len(p)}, key=lambda p: (len(p), p))
    return Tree(tuple([()] + unique))


def parse_tree_spec(spec: TreeSpec) -> Tree:
    """``"4,2,2,1"`` (Cartesian), ``"[[0],[1],[0,0]]"`` (JSON list of paths) or the lists themselves."""
    if isinstance(spec, Tree):
        return spec
    if isinstance(spec, str):
        text = spec.strip()
        if not text:
            raise ValueError("Empty tree spec; give per-depth top-k like '4,2,2,1' or paths like '[[0],[0,0]]'.")
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"Tree spec {spec!r} is not valid JSON: {e}.") from e
            return parse_tree_spec(parsed)
        try:
            ks = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(
                f"Malformed tree spec {spec!r}: expected comma-separated integers like '4,2,2,1'."
            ) from None
        return cartesian_tree(ks)
    items = list(spec)
    if items and all(isinstance(x, (int, np.integer)) for x in items):
        return cartesian_tree([int(x) for x in items])
    if all(isinstance(x, (list, tuple)) for x in items):
        return sparse_tree(items)
    raise ValueError(f"Malformed tree spec {spec!r}: give a list of ints or a list of paths.")


def ancestor_mask(parents: np.ndarray) -> np.ndarray:
    """``[T]`` parents (parents before children) -> ``[T, T]`` bool, row i sees its ancestors and itself."""
    t = len(parents)
    mask = np.eye(t, dtype=bool)
    for i in range(1, t):
        mask[i] |= mask[parents[i]]
    return mask


def path_matrix(parents: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """``[T, D + 1]`` node indices from the root to each node, padded with the node itself."""
    t, d = len(parents), int(depth.max()) if len(depth) else 0
    out = np.zeros((t, d + 1), dtype=np.int32)
    for i in range(t):
        chain = [i]
        while parents[chain[-1]] >= 0:
            chain.append(int(parents[chain[-1]]))
        chain.reverse()
        out[i, : len(chain)] = chain
        out[i, len(chain) :] = i
    return out


def stream_layout(
    main_mask: np.ndarray, depth: np.ndarray, stream_nodes: np.ndarray, num_streams: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mask and position offsets of the multi-stream layers (DESIGN.md rule 3 and 4).

    Tokens are laid out as ``[main 0..T-1, then streams node-major: (n, 1..γ) for n in
    stream_nodes]``, ``S = T + len(stream_nodes) * γ``.

    Returns ``mask [S, S]`` (True = may attend) and ``offsets [S]``: the position of each token
    relative to the step's first position (main: its depth; stream (n, j): depth[n] + j).

    Example, T = 2 main tokens in a chain, streams on node 1 only, γ = 2::

        tokens  m0 m1 s(1,1) s(1,2)      offsets 0 1 2 3
        m0       1  0  0      0
        m1       1  1  0      0
        s(1,1)   1  1  1      0
        s(1,2)   1  1  1      1
    """
    t, n, g = main_mask.shape[0], len(stream_nodes), num_streams
    s = t + n * g
    mask = np.zeros((s, s), dtype=bool)
    mask[:t, :t] = main_mask
    offsets = np.zeros(s, dtype=np.int32)
    offsets[:t] = depth
    lower = np.tril(np.ones((g, g), dtype=bool))
    for k, node in enumerate(stream_nodes):
        rows = slice(t + k * g, t + (k + 1) * g)
        mask[rows, :t] = main_mask[node]
        mask[rows, rows] = lower
        offsets[rows] = depth[node] + np.arange(1, g + 1)
    return mask, offsets


def causal_mask(t: int) -> np.ndarray:
    return np.tril(np.ones((t, t), dtype=bool))
