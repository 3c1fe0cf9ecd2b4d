"""The scripts in examples/perf that reproduce BENCHMARKS.md: the shared step builder runs the
generator's compiled steps and times them (examples/gpu uses it too); the pipelining A/B runs on
two prompts and finds the same outputs in every setting."""

import importlib
from pathlib import Path

import pytest

from mlx_specstream.config import SpecStreamConfig
from mlx_specstream.testing import random_model, tiny_config

PERF = Path(__file__).resolve().parents[1] / "examples" / "perf"


def _small_run_args() -> list[str]:
    """The arguments that run pipeline.py on 2 dev MRs, 1 round, 12 tokens
    (skips the test when the shared data is absent)."""
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e" / "devset.csv.gz"
    if not data.exists():
        pytest.skip(f"{data} is not here")
    return ["--data", str(data), "--num-samples", "2", "--rounds", "1", "--max-tokens", "12"]


def _run_ab_script(monkeypatch, capsys, name: str) -> str:
    """Run an A/B script of examples/perf in this process on a small run; its stdout."""
    module = importlib.import_module(name)
    monkeypatch.setattr("sys.argv", [f"{name}.py", *_small_run_args()])
    module.main()
    return capsys.readouterr().out


def _first_round(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("| 1 |")][0].strip("|").split("|")


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


def test_pipeline_ab_prints_four_speeds_and_no_differing_outputs(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(PERF))
    out = _run_ab_script(monkeypatch, capsys, "pipeline")
    cells = _first_round(out)
    assert len(cells) == 1 + 4 and all(float(c) > 0 for c in cells[1:])
    assert "were not all the same: 0 of 2" in out  # pipelined steps decode the same tokens


def test_interleaved_rounds_rotates_settings_and_counts_per_round_or_cumulatively(monkeypatch):
    monkeypatch.syspath_prepend(str(PERF))
    pipeline = importlib.import_module("pipeline")

    def results(cumulative):
        order = []

        def run(name, prompt):  # round r: r tokens in 1 s; "b" decodes other tokens for p1
            r = len(order) // 4 + 1
            order.append(name)
            return [1 if (name, prompt) == ("b", "p1") else 0] * r, 1.0

        out = list(pipeline.interleaved_rounds(["a", "b"], ["p0", "p1"], run, rounds=2, warmup=0,
                                               cumulative=cumulative))
        assert order == ["a", "b", "b", "a"] * 2  # each prompt starts with the next setting in turn
        return [tps for _, tps, _ in out], [differ for _, _, differ in out]

    speeds, differ = results(cumulative=True)
    assert speeds == [{"a": 1.0, "b": 1.0}, {"a": 1.5, "b": 1.5}]  # (2 + 4) tokens in 4 s
    assert differ == [1, 2]
    speeds, _ = results(cumulative=False)
    assert speeds == [{"a": 1.0, "b": 1.0}, {"a": 2.0, "b": 2.0}]  # round 2 alone: 4 tokens in 2 s


def test_step_cost_times_each_step_kind_and_skips_trees_deeper_than_the_streams(monkeypatch):
    """The functions examples/gpu's scripts import from step_cost.py."""
    import mlx.core as mx

    monkeypatch.syspath_prepend(str(PERF))
    step_cost = importlib.import_module("step_cost")
    model = random_model(tiny_config("llama"), SpecStreamConfig(num_streams=2, num_msa_layers=1), seed=1)
    fn, step_args, nodes, msa = step_cost.prepared_step(model, "1,1", context=20, compile=True)
    assert (nodes, msa) == (3, 9)
    mx.eval(fn(*step_args))
    calls = []
    assert step_cost.median_time(lambda: calls.append(1), repeats=3) >= 0
    assert len(calls) == 2 + 3  # two warm-up calls, then the timed ones
    rows = step_cost.step_costs(model, ["1", "1,1", "1,1,1"], repeats=1, compile=True)
    assert [row[:3] for row in rows] == [("autoregressive", 1, 1), ("1", 2, 4), ("1,1", 3, 9)]  # 1,1,1: 3 > 2 streams
    assert all(row[3] > 0 for row in rows)
