"""The profiling helper in examples/perf runs the generator's compiled steps."""

import importlib.util
from pathlib import Path

import pytest

from mlx_specstream.config import SpecStreamConfig
from mlx_specstream.testing import random_model, tiny_config

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "perf" / "profile_step.py"


def _script():
    spec = importlib.util.spec_from_file_location("profile_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_step_runs_ar_and_tree_steps_and_refuses_too_deep_trees():
    profile_step = _script()
    model = random_model(tiny_config("llama"), SpecStreamConfig(num_streams=2, num_msa_layers=1), seed=1)
    for tree in ("ar", "1,1", "2,1"):
        step = profile_step.step_loop(model, tree, context=20)
        for _ in range(2):  # the same compiled step again and again: a steady loop
            step()
    with pytest.raises(SystemExit, match="deeper than the model's 2 streams"):
        profile_step.step_loop(model, "1,1,1", context=20)
