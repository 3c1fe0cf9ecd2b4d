"""Tree shapes, masks and positions against hand-written worked examples."""

import numpy as np
import pytest

from mlx_specstream.tree import (
    ancestor_mask,
    cartesian_tree,
    parse_tree_spec,
    path_matrix,
    sparse_tree,
    stream_layout,
)


def test_cartesian_tree_worked_example():
    tree = parse_tree_spec("2,1")
    assert tree.paths == ((), (0,), (1,), (0, 0), (1, 0))
    assert tree.parents.tolist() == [-1, 0, 0, 1, 2]
    assert tree.depth.tolist() == [0, 1, 1, 2, 2]
    assert tree.ranks.tolist() == [0, 0, 1, 0, 0]
    assert tree.width() == [2, 1]
    expected = np.array(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 0, 1, 0, 0],
            [1, 1, 0, 1, 0],
            [1, 0, 1, 0, 1],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(ancestor_mask(tree.parents), expected)
    np.testing.assert_array_equal(
        path_matrix(tree.parents, tree.depth), [[0, 0, 0], [0, 1, 1], [0, 2, 2], [0, 1, 3], [0, 2, 4]]
    )


def test_cartesian_sizes():
    assert cartesian_tree([4, 2, 2, 1]).size == 1 + 4 + 8 + 16 + 16
    assert cartesian_tree([1, 1, 1]).size == 4


def test_sparse_tree_sorted_breadth_first():
    tree = parse_tree_spec("[[1], [0, 0], [0]]")
    assert tree.paths == ((), (0,), (1,), (0, 0))
    assert tree.parents.tolist() == [-1, 0, 0, 1]
    assert tree.width() == [2, 1]
    assert sparse_tree([[0], [0, 0], [0, 0, 0]]).max_depth == 3


def test_stream_layout_worked_example():
    # two main tokens in a chain, streams on node 1 only, two streams
    main = np.array([[1, 0], [1, 1]], dtype=bool)
    mask, offsets = stream_layout(main, np.array([0, 1]), np.array([1]), 2)
    np.testing.assert_array_equal(
        mask.astype(int), [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    )
    assert offsets.tolist() == [0, 1, 2, 3]


def test_stream_layout_tree_streams_see_only_their_node():
    tree = parse_tree_spec("2")  # root, (0,), (1,)
    main = ancestor_mask(tree.parents)
    mask, offsets = stream_layout(main, tree.depth, np.arange(3), 2)
    assert mask.shape == (9, 9)
    # stream (node 2, j=1) is row 3 + 2*2 = 7: sees root and node 2, itself, not node 1 or others
    assert mask[7].astype(int).tolist() == [1, 0, 1, 0, 0, 0, 0, 1, 0]
    # stream (node 2, j=2) sees stream (2,1) too
    assert mask[8].astype(int).tolist() == [1, 0, 1, 0, 0, 0, 0, 1, 1]
    # main rows never see streams
    assert not mask[:3, 3:].any()
    assert offsets.tolist() == [0, 1, 1, 1, 2, 2, 3, 2, 3]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "Empty tree spec"),
        ("4,x", "Malformed tree spec"),
        ("4,0", ">= 1"),
        ("[[0, 0]]", "no parent"),
        ("[[0]", "not valid JSON"),
    ],
)
def test_bad_tree_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_tree_spec(spec)
