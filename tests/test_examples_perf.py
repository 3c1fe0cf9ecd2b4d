"""The helpers of the scripts in examples/perf: the shared step builder runs the generator's
compiled steps; the LoRA A/B strips exactly the stream-only adapters."""

import importlib
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_specstream.config import SpecStreamConfig, StreamLoRAConfig
from mlx_specstream.testing import random_model, tiny_config

PERF = Path(__file__).resolve().parents[1] / "examples" / "perf"


def test_profile_step_runs_ar_and_tree_steps_and_refuses_too_deep_trees(monkeypatch):
    monkeypatch.syspath_prepend(str(PERF))  # the scripts import each other as they do when run
    profile_step = importlib.import_module("profile_step")
    model = random_model(tiny_config("llama"), SpecStreamConfig(num_streams=2, num_msa_layers=1), seed=1)
    for tree, nodes, msa_tokens in (("ar", 1, 1), ("1,1", 3, 9), ("2,1", 5, 15)):
        step, n, msa = profile_step.step_runner(model, tree, context=20)
        assert (n, msa) == (nodes, msa_tokens)
        for _ in range(2):  # the same compiled step again and again: a steady loop
            step()
    with pytest.raises(SystemExit, match="deeper than the model's 2 streams"):
        profile_step.step_runner(model, "1,1,1", context=20)


def test_lora_share_strips_exactly_the_stream_only_lora(monkeypatch):
    monkeypatch.syspath_prepend(str(PERF))
    lora_share = importlib.import_module("lora_share")
    spec = SpecStreamConfig(num_streams=2, num_msa_layers=2, mode="lossless",
                            stream_lora=StreamLoRAConfig(rank=4, alpha=8, target_modules=("q_proj", "down_proj")))
    model = random_model(tiny_config("llama"), spec, seed=2)
    tokens = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    main_before, streams_before, _ = model.all_logits(tokens)
    assert lora_share.strip_stream_lora(model) == 4  # 2 targets x 2 multi-stream layers
    assert model.stream_lora_modules() == {}
    main_after, streams_after, _ = model.all_logits(tokens)
    # the main stream never saw the adapters; the streams did
    np.testing.assert_array_equal(np.array(main_after), np.array(main_before))
    assert not np.allclose(np.array(streams_after), np.array(streams_before))
    assert lora_share.strip_stream_lora(model) == 0
