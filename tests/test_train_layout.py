"""Pure layout functions of the trainer: masks, positions, targets (hand-checked examples)."""

import pytest

torch = pytest.importorskip("torch")

from mlx_specstream.train import layout  # noqa: E402

I = layout.IGNORE_INDEX


def test_msa_mask_matches_the_documented_example():
    # T = 2, γ = 2: rows/cols m0 m1 s01 s02 s11 s12 (module docstring of layout.py)
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 1, 0, 0, 1, 1],
    ], dtype=torch.bool)
    mask = layout.msa_mask(torch.ones(1, 2, dtype=torch.bool), 2)
    assert mask.shape == (1, 1, 6, 6)
    assert torch.equal(mask[0, 0], expected)


def test_msa_mask_rules_on_a_larger_layout():
    T, g = 5, 3
    mask = layout.msa_mask(torch.ones(1, T, dtype=torch.bool), g)[0, 0]
    t, j = layout.node_and_stream(T, g)
    for q in range(len(t)):
        for k in range(len(t)):
            if j[k] == 0:
                want = bool(t[k] <= t[q])  # main keys: causal, for main and stream queries alike
            else:
                want = bool(j[q] > 0 and t[k] == t[q] and j[k] <= j[q])  # same node, lower-or-equal stream
            assert bool(mask[q, k]) == want, (q, k)


def test_msa_mask_with_stream_start_keeps_node_major_order():
    full = layout.msa_mask(torch.ones(1, 4, dtype=torch.bool), 2)[0, 0]
    part = layout.msa_mask(torch.ones(1, 4, dtype=torch.bool), 2, start=2)[0, 0]
    keep = list(range(4)) + list(range(4 + 2 * 2, 4 + 4 * 2))  # main rows + streams of nodes 2, 3
    assert torch.equal(part, full[keep][:, keep])


def test_padding_hides_keys_but_never_empties_a_row():
    valid = torch.tensor([[True, True, False], [False, True, True]])
    mask = layout.msa_mask(valid, 2)[:, 0]
    assert mask.any(-1).all()
    # right padding: no query but the pad itself sees main key 2 of row 0
    assert mask[0, :, 2].nonzero().flatten().tolist() == [2]
    # left padding: main key 0 of row 1 is seen only by itself
    assert mask[1, :, 0].nonzero().flatten().tolist() == [0]
    main = layout.main_mask(valid)[:, 0]
    assert main.any(-1).all() and not main[1, 1, 0]


def test_positions_of_streams_are_node_position_plus_j():
    pos = torch.tensor([[0, 1, 2]])
    got = layout.msa_positions(pos, 2)
    assert got.tolist() == [[0, 1, 2, 1, 2, 2, 3, 3, 4]]
    assert layout.msa_positions(pos, 2, start=1).tolist() == [[0, 1, 2, 2, 3, 3, 4]]
    left_padded = torch.tensor([[False, True, True]])
    assert layout.default_positions(left_padded).tolist() == [[0, 0, 1]]


def test_stream_targets_hand_example():
    labels = torch.tensor([[I, I, 7, 8, 9]])
    got = layout.stream_targets(labels, 2)[0].tolist()
    # [t] = (main -> x_{t+1}, stream 1 -> x_{t+2}, stream 2 -> x_{t+3})
    assert got == [
        [I, 7, 8],
        [7, 8, 9],
        [8, 9, I],
        [9, I, I],
        [I, I, I],
    ]
    assert layout.first_stream_target(layout.stream_targets(labels, 2)) == 0
    late = torch.tensor([[I, I, I, I, I, 5, 6]])
    assert layout.first_stream_target(layout.stream_targets(late, 2)) == 2
