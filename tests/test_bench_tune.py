"""Tree tuning: the pure pieces on hand-made numbers, the acceptance replay against real greedy
speculative decoding, and ``bench --tune`` writing a default tree that loads back."""

from __future__ import annotations

import json
import re
import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlx_specstream.bench import report
from mlx_specstream.bench import tune as tune_mod
from mlx_specstream.bench.tune import (
    Calibration,
    _monotone,
    calibrate,
    cartesian_candidates,
    greedy_paths,
    TuneResult,
    save_default_tree,
    tokens_per_step,
)
from mlx_specstream.cli.main import main
from mlx_specstream.config import SpecStreamConfig
from mlx_specstream.device import cpu_model_numbers, describe_device
from mlx_specstream.generate import generate_step, resolve_tree, speculates_by_default, will_speculate
from mlx_specstream.loading import load_model
from mlx_specstream.testing import write_tiny_model_dir
from mlx_specstream.tree import parse_tree_spec

from test_bench_data import write_jsonl


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = write_tiny_model_dir(tmp_path_factory.mktemp("tune") / "m", "llama")
    save_default_tree(d, "2,1")  # calibration decodes with the default tree: keep it cheap
    return d


def test_monotone_fit():
    assert _monotone([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert _monotone([2.0, 1.0, 1.0]) == pytest.approx([4 / 3] * 3)


def test_cartesian_candidates_are_small_non_increasing_trees():
    cands = cartesian_candidates(4)
    assert (4, 2, 1) in cands and (1, 1, 1, 1) in cands and (8,) in cands and (4, 2, 2, 1) not in cands  # 45 nodes
    for ks in cands:
        assert list(ks) == sorted(ks, reverse=True) and len(ks) <= 4
        assert parse_tree_spec(list(ks)).size <= tune_mod.MAX_NODES


def test_greedy_paths_follow_products_of_rank_acceptance():
    acc = np.zeros((2, tune_mod.MAX_RANK))
    acc[0, :3] = [0.6, 0.2, 0.1]
    acc[1, :2] = [0.5, 0.3]
    # 0.6, (0,0) .3, 0.2, (0,1) .18, 0.1, (1,0) .1, (1,1) .06, (2,0) .05, (2,1) .03
    assert greedy_paths(acc) == [(0,), (0, 0), (1,), (0, 1), (1, 0), (2,), (1, 1), (2, 0), (2, 1)]


def test_replay_on_hand_made_ranks():
    cal = Calibration(ranks=[[(0, 0), (1, 8), (0, 1), (8, 8), (0, 0), (0, 0)]], emitted=[7], contexts=[[1]])
    # chain "1,1": steps accept 2 (p=0 -> 3), 0 (p=3 -> 4), 2 -> truncated to the 7 tokens
    assert tokens_per_step(cal, parse_tree_spec("1,1")) == pytest.approx(6 / 3)
    # "2,2": (0,0) 2 -> p=3: (8,8) 0 -> p=4: (0,0) 2 -> done, same steps
    assert tokens_per_step(cal, parse_tree_spec("2,2")) == pytest.approx(6 / 3)
    # "[[1]]": p=0 (0,0) miss -> p=1 (1,8) 1 -> p=3 miss -> p=4 miss -> p=5 miss -> 6 tokens, 5 steps
    assert tokens_per_step(cal, parse_tree_spec([[1]])) == pytest.approx(6 / 5)


def test_replay_matches_real_greedy_speculative_decoding(model_dir):
    model, _ = load_model(model_dir)
    prompts = [[256, 97, 98, 99, 97, 98], [256, 120, 121]]
    cal = calibrate(model, prompts, max_tokens=16, eos=set())
    assert cal.emitted == [16, 16] and len(cal.ranks[0]) == 16 and len(cal.ranks[0][0]) == model.num_streams
    acc = cal.rank_acceptance(model.num_streams)
    assert acc.shape == (model.num_streams, tune_mod.MAX_RANK) and (acc.sum(axis=1) <= 1 + 1e-9).all()
    for spec in ["3,1", "2,2,2", "[[0],[1],[0,0],[0,1],[0,0,0]]"]:
        tokens = steps = 0
        for ids in prompts:
            out = list(generate_step(model, mx.array(ids), max_tokens=16, tree=spec))
            emitted = [t for s in out for t in s.tokens][:16]
            tokens += len(emitted) - 1
            steps += len(out) - 1
        assert tokens_per_step(cal, parse_tree_spec(spec)) == pytest.approx(tokens / steps), spec


def test_save_default_tree_is_atomic_and_validated(model_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    save_default_tree(d, "[[0],[1],[0,0]]")
    model, config = load_model(d)
    assert model.spec.default_tree == "[[0],[1],[0,0]]" and resolve_tree(model, None).size == 4
    assert sorted(p.name for p in d.iterdir()) == sorted(p.name for p in model_dir.iterdir())  # no temp file left
    for bad in ["x", "1,1,1,1", "[]"]:
        with pytest.raises(ValueError, match="Malformed|levels of drafts"):
            save_default_tree(d, bad)
    assert json.loads((d / "config.json").read_text())["speculative_streaming"]["default_tree"] == "[[0],[1],[0,0]]"
    plain = write_tiny_model_dir(tmp_path / "plain", "llama", spec=None)
    with pytest.raises(ValueError, match="no 'speculative_streaming' block"):
        save_default_tree(plain, "2")


def test_save_default_tree_records_whether_the_model_should_speculate(model_dir, tmp_path):
    """speculate=False saves ``"speculate": false`` beside the tree (the model then decodes
    without speculation by default); tuning again to a tree that pays removes it."""
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    save_default_tree(d, "1", speculate=False)
    block = json.loads((d / "config.json").read_text())["speculative_streaming"]
    assert block["default_tree"] == "1" and block["speculate"] is False
    model, _ = load_model(d)
    assert model.spec.speculate is False and not speculates_by_default(model)
    save_default_tree(d, "2,1")
    block = json.loads((d / "config.json").read_text())["speculative_streaming"]
    assert "speculate" not in block and block["default_tree"] == "2,1"
    assert speculates_by_default(load_model(d)[0])


def test_a_tuned_verdict_holds_on_the_device_it_was_measured_on(model_dir, tmp_path):
    """Tuning records the device (``tuned_on``); ``"speculate": false`` measured on another
    device does not stop this one from speculating, and says so."""
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    here = describe_device()
    save_default_tree(d, "1", speculate=False)
    assert json.loads((d / "config.json").read_text())["speculative_streaming"]["tuned_on"] == here
    model = load_model(d)[0]
    assert model.spec.tuned_on == here and not speculates_by_default(model)

    elsewhere = "gpu: Apple M9 Imaginary (applegpu_g99)"
    save_default_tree(d, "1", speculate=False, device=elsewhere)
    model = load_model(d)[0]
    assert model.spec.tuned_on == elsewhere
    with pytest.warns(UserWarning, match=r"tuned on \(gpu: Apple M9 Imaginary.*specstream tune"):
        assert speculates_by_default(model) and will_speculate(model, None)
    assert not will_speculate(model, False)

    model.spec.tuned_on = None  # a hand-written "speculate": false, no device: taken at its word
    assert not speculates_by_default(model)


def test_tuned_on_is_optional_and_must_be_a_string():
    assert "tuned_on" not in SpecStreamConfig().to_dict()
    cfg = SpecStreamConfig.from_dict(dict(num_streams=2, tuned_on="cpu: X (x86_64)", speculate=False))
    assert SpecStreamConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="tuned_on must be a device description"):
        SpecStreamConfig.from_dict(dict(num_streams=2, tuned_on=3))


def test_describe_device_names_the_kind_name_and_architecture():
    import os
    import platform
    import re

    text = describe_device()
    assert re.fullmatch(r"(cpu: .+ \(.+\), \d+ cores|gpu: .+ \(.+\))", text)
    if mx.default_device() == mx.cpu:
        arch = mx.device_info().get("architecture") or platform.machine()
        model = cpu_model_numbers()
        detail = f"{arch}, {model}" if model else arch
        assert text.startswith("cpu: ") and text.endswith(f"({detail}), {os.cpu_count()} cores")


X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 49
model name\t: AMD EPYC
"""

ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 243.75
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd0c
"""


@pytest.mark.parametrize("text, expected", [
    (X86_CPUINFO, "family 25 model 17"),  # the first processor's, not "model name"'s
    (ARM_CPUINFO, "implementer 0x41 part 0xd0c"),
    ("processor\t: 0\nmodel name\t: Some CPU\n", None),
])
def test_cpu_model_numbers_tell_apart_hosts_of_one_product_name(tmp_path, text, expected):
    info = tmp_path / "cpuinfo"
    info.write_text(text)
    assert cpu_model_numbers(info) == expected
    assert cpu_model_numbers(tmp_path / "missing") is None


def test_describe_device_falls_back_to_platform_where_mlx_cannot_say(monkeypatch):
    import platform

    def broken():
        raise RuntimeError("no device info here")

    monkeypatch.setattr(mx, "device_info", broken)
    monkeypatch.setattr(platform, "processor", lambda: "Some CPU")
    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    text = describe_device()
    assert text.split(": ", 1)[1].startswith("Some CPU (riscv64")
    monkeypatch.delattr(mx, "device_info")
    assert describe_device() == text


@pytest.mark.parametrize("speedup, speculate", [(0.93, False), (0.999, False), (1.0, True), (1.6, True)])
def test_a_tuned_tree_is_the_default_only_when_it_beat_plain_decoding(speedup, speculate):
    result = TuneResult(tree="1", size=2, expected_tokens_per_step=1.4, expected_speedup=speedup,
                        expected_ss_tokens_per_sec=100.0 * speedup, expected_ar_tokens_per_sec=100.0,
                        step_cost_ar_s=1e-3, step_cost_s={}, step_cost_raw_s={}, rank_acceptance=[],
                        best_speedup_by_size={}, candidates=[], finalists=[], calibration_prompts=4,
                        calibration_tokens=64)
    assert result.speculate is speculate
    details = dict(result.to_dict(), saved_to="m/config.json")
    lines = report._tune_details(details)
    assert any("now decodes without speculation" in line for line in lines) is (not speculate)
    details["saved_to"] = None
    assert any("--no-speculate" in line for line in report._tune_details(details)) is (not speculate)


def _short_sweep(monkeypatch):
    monkeypatch.setattr(tune_mod, "MAX_NODES", 8)  # keep the step-cost sweep short on the reference BLAS
    monkeypatch.setattr(tune_mod, "COST_STEPS", 4)
    monkeypatch.setattr(tune_mod, "COST_ROUNDS", 1)
    monkeypatch.setattr(tune_mod, "FINAL_ROUNDS", 1)


def test_bench_tune_writes_a_default_tree_that_loads_back(model_dir, tmp_path, capsys, monkeypatch):
    _short_sweep(monkeypatch)
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "abcabc"}, {"prompt": "hello hello"}])
    out_json = tmp_path / "r.json"
    code = main(["bench", "--model", str(d), "--data", str(data), "--max-tokens", "12", "--repeats", "1", "--tune",
                 "--json", str(out_json)])
    out = capsys.readouterr()
    assert code == 0, out.err
    r = json.loads(out_json.read_text())
    t = r["tune"]
    model, _ = load_model(d)
    assert model.spec.default_tree == t["tree"] == r["settings"]["tree"]
    assert resolve_tree(model, None).size == t["size"] <= 8
    # in-sample greedy calibration predicts the measured tokens per step exactly
    assert t["expected_tokens_per_step"] == pytest.approx(t["measured_tokens_per_step"])
    assert t["expected_speedup"] > 0 and t["step_cost_ar_s"] > 0
    assert set(t["step_cost_s"]) == {str(d) for d in range(1, model.num_streams + 1)}  # per tree depth
    for costs in t["step_cost_s"].values():  # non-decreasing; None past the sizes timed (pruned)
        timed = [c for c in costs if c is not None]
        assert len(costs) == 8 and timed == sorted(timed) and costs[len(timed):] == [None] * (8 - len(timed))
    assert 0 < t["cost_shapes_timed"] <= t["cost_shapes_total"] == len(tune_mod.cost_shapes(model.num_streams))
    assert all(c["step_cost_s"] is not None for c in t["candidates"])
    # the choice is the fastest of the best-modelled trees, timed in generations
    fin = t["finalists"]
    assert 1 <= len(fin) <= tune_mod.FINALISTS
    assert {f["tree"] for f in fin} <= {c["tree"] for c in t["candidates"]}
    assert fin[0]["tree"] == t["tree"] and t["expected_speedup"] == fin[0]["speedup"]
    assert [f["speedup"] for f in fin] == sorted((f["speedup"] for f in fin), reverse=True)
    for f in fin:  # one round: the speedup is that round's ratio of decode rates
        assert f["speedup"] == pytest.approx(f["ss_tokens_per_sec"] / t["expected_ar_tokens_per_sec"])
        assert f["tokens_per_step"] == pytest.approx(f["expected_tokens_per_step"])  # in-sample greedy replay
    assert "### tuning: chose tree" in out.out and "finalists timed in generations" in out.out
    # the report says so when no tree is expected to pay on this device
    assert ("no tree is expected" in out.out) == (t["expected_speedup"] < 1)
    for expected, says in ((0.8, True), (1.2, False)):
        t["expected_speedup"] = expected
        assert ("no tree is expected to beat plain decoding" in report.markdown(r)) == says


def test_the_report_shows_each_depths_largest_timed_tree():
    """Sizes 2, 4, 8, ... where timed, plus the largest timed: a depth whose bigger trees tune
    skipped after 3 nodes still shows that cost instead of an empty list."""
    ms = 1e-3
    costs = {"1": [2 * ms] * 3 + [None] * 5,  # 1 node repeats 2; timed up to 3 nodes
             "2": [3 * ms] * 3 + [None] * 5,
             "3": [4 * ms, 4 * ms, 4 * ms, 4 * ms, 5 * ms, 6 * ms, 7 * ms, 8 * ms]}
    line = next(x for x in report._tune_details(dict(
        step_cost_ar_s=ms, step_cost_s=costs, rank_acceptance=[], candidates=[], expected_speedup=1.2,
        cost_shapes_timed=9, cost_shapes_total=12, cost_prune_below=0.6)) if x.startswith("- step cost"))
    assert "d=1: 2: 2.00, 3: 2.00; d=2: 3: 3.00; d=3: 4: 4.00, 8: 8.00 (9 of 12 shapes timed" in line


def test_cost_sweep_stops_timing_a_depth_whose_trees_cannot_pay(monkeypatch):
    """Fake timers: a tree of n nodes costs n/2 AR steps at every depth. With the most tokens
    per step a depth can reach (``ceiling``), bigger trees are timed only while that could
    still decode at PRUNE_BELOW of plain speed; later rounds time only the survivors."""
    monkeypatch.setattr(tune_mod, "PRUNE_BELOW", 0.8)
    shapes = [(1, n) for n in (2, 3, 4, 6, 8)] + [(2, n) for n in (3, 4, 6, 8, 12, 16)]
    calls = []

    def tree(d, n):
        calls.append((d, n))
        return 0.01 * n / 2

    c_ar, costs = tune_mod.cost_sweep(shapes, lambda: 0.01, tree, rounds=2, ceiling={1: 1.9, 2: 2.5})
    assert c_ar == pytest.approx(0.01)
    # depth 1: 1.9 / 3 < 0.8 at n=6 (cost ratio 3), the last timed; depth 2: 2.5 / 4 < 0.8 at n=8
    assert sorted(costs) == [(1, 2), (1, 3), (1, 4), (1, 6), (2, 3), (2, 4), (2, 6), (2, 8)]
    assert costs[(2, 8)] == pytest.approx(0.04)
    assert calls[:8] == calls[8:] == sorted(costs)  # round 2 times the same shapes, no others
    _, everything = tune_mod.cost_sweep(shapes, lambda: 0.01, tree, rounds=1)
    assert sorted(everything) == sorted(shapes)  # no ceiling: nothing skipped


def test_cost_trees_have_the_size_and_depth_asked_for():
    for n, d in [(2, 1), (5, 4), (9, 2), (32, 4)]:
        tree = tune_mod.cost_tree(n, d)
        assert (tree.size, tree.max_depth) == (n, d)


def test_tune_command_saves_the_choice_and_no_save_leaves_the_model_alone(model_dir, tmp_path, capsys, monkeypatch):
    _short_sweep(monkeypatch)
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "abcabc"}, {"prompt": "hello hello"}, {"prompt": "zzz"}])
    before = (d / "config.json").read_bytes()
    out_json = tmp_path / "t.json"
    code = main(["tune", "--model", str(d), "--data", str(data), "--num-samples", "2", "--max-tokens", "12",
                 "--no-save", "--json", str(out_json)])
    out = capsys.readouterr()
    assert code == 0, out.err
    r = json.loads(out_json.read_text())
    assert (d / "config.json").read_bytes() == before and r["saved_to"] is None and "not saved" in out.out
    assert r["previous_tree"] == "2,1" and r["calibration_prompts"] == 2
    assert r["finalists"][0]["tree"] == r["tree"] and f"chose tree {r['tree']}" in out.out
    stages = [line for line in out.err.splitlines() if line.startswith("Tuning ")]  # each stage, timed
    assert [line[:10] for line in stages] == ["Tuning 1/3", "Tuning 2/3", "Tuning 3/3"]
    assert all(re.search(r" done \(\d+\.\ds\)$", line) for line in stages)
    assert f"step cost of up to {len(tune_mod.cost_shapes(r['settings']['num_streams']))} tree shapes, 1 round " in stages[1]

    code = main(["tune", "--model", str(d), "--data", str(data), "--num-samples", "2", "--max-tokens", "12",
                 "--json", "-"])
    out = capsys.readouterr()
    assert code == 0, out.err
    r = json.loads(out.out)  # '-': only the JSON object on stdout
    model, _ = load_model(d)
    assert r["saved_to"] == str(d / "config.json") and model.spec.default_tree == r["tree"]
    assert resolve_tree(model, None).size == r["size"] <= 8
    assert sorted(p.name for p in d.iterdir()) == sorted(p.name for p in model_dir.iterdir())  # no temp file left


@pytest.mark.parametrize("command", [["tune"], ["bench", "--tune", "--repeats", "1"]])
def test_tuning_will_not_edit_the_bundled_demo_or_an_unwritable_model(command, model_dir, tmp_path, capsys,
                                                                      monkeypatch):
    from mlx_specstream.loading import DEMO_DIR

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "abc"}])
    before = (DEMO_DIR / "config.json").read_bytes()
    monkeypatch.setattr(tune_mod, "tune_tree", lambda *a, **k: pytest.fail("tuned before checking the destination"))
    assert main([*command, "--data", str(data)]) == 1
    assert "would edit the bundled demo model" in capsys.readouterr().err
    assert (DEMO_DIR / "config.json").read_bytes() == before
    # a model folder the tuned tree cannot be written to (faked: root may write anywhere)
    monkeypatch.setattr(tune_mod, "_writable", lambda path: False)
    assert main([*command, "--model", str(model_dir), "--data", str(data)]) == 1
    assert "Cannot write" in capsys.readouterr().err
