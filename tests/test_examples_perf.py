"""The helpers of the scripts in examples/perf: the shared step builder runs the generator's
compiled steps; the LoRA A/B strips exactly the stream-only adapters; the A/B scripts run on
two prompts and find the same outputs in every setting."""

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np
import pytest

from mlx_specstream.config import SpecStreamConfig, StreamLoRAConfig
from mlx_specstream.testing import random_model, tiny_config

PERF = Path(__file__).resolve().parents[1] / "examples" / "perf"


def _small_run_args() -> list[str]:
    """The arguments that run an A/B script of examples/perf on 2 dev MRs, 1 round, 12 tokens
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


def test_graph_ops_counts_the_compiled_steps_primitives(monkeypatch):
    monkeypatch.syspath_prepend(str(PERF))
    graph_ops = importlib.import_module("graph_ops")
    step_cost = importlib.import_module("step_cost")
    model = random_model(tiny_config("llama"), SpecStreamConfig(num_streams=2, num_msa_layers=1), seed=1)
    ar = graph_ops.primitive_counts(step_cost.step_outputs(model, "ar", context=20))
    tree = graph_ops.primitive_counts(step_cost.step_outputs(model, "1,1", context=20))
    layers = len(model.base.layers)
    assert ar["Matmul"] >= 7 * layers  # q, k, v, o, gate, up, down in every layer
    assert ar["Compiled"] > 0  # elementwise runs were fused
    assert sum(tree.values()) > sum(ar.values())  # streams, acceptance and drafting on top


def _run_perf_script(name: str, env_changes: dict[str, str], extra: Sequence[str] = ()) -> str:
    """Run examples/perf/NAME.py in a fresh interpreter on a small run (``extra`` arguments after
    it), without this environment's BLAS settings; its stdout."""
    args = [*_small_run_args(), *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "OPENBLAS_THREAD_TIMEOUT")}
    env.update(env_changes)
    done = subprocess.run([sys.executable, str(PERF / f"{name}.py"), *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_blas_threads_ab_switches_openblas_threads_without_changing_outputs():
    from mlx_specstream.blas import find_system_openblas

    openblas = find_system_openblas()
    if not sys.platform.startswith("linux") or openblas is None:
        pytest.skip("needs Linux and a system OpenBLAS")
    out = _run_perf_script("blas_threads", {"LD_PRELOAD": openblas})
    cells = _first_round(out)
    assert len(cells) == 1 + 4 + 3
    assert all(float(c) > 0 for c in cells[1:5])
    assert "were not all the same: 0 of 2" in out


def _needs_blas_switch(monkeypatch, *libraries: str) -> None:
    """Skip unless gcc (to build blas_switch.c) and blas_choice's ``libraries`` (names of its
    default paths) are here."""
    monkeypatch.syspath_prepend(str(PERF))
    blas_choice = importlib.import_module("blas_choice")  # its defaults; the runs are fresh interpreters
    paths = [getattr(blas_choice, name) for name in libraries]
    if shutil.which("gcc") is None or not all(os.path.exists(p) for p in paths):
        pytest.skip(f"needs gcc and {', '.join(paths)} (Debian: libblis4-pthread, libopenblas0-pthread)")


def test_blas_choice_routes_products_between_two_libraries_in_one_process(monkeypatch):
    _needs_blas_switch(monkeypatch, "DEFAULT_SMALL", "DEFAULT_LARGE")
    out = _run_perf_script("blas_choice", {})
    cells = _first_round(out)
    assert len(cells) == 1 + 6
    assert all(float(c) > 0 for c in cells[1:])
    assert "6 outputs were not all the same: 0 of 2" in out


def test_blas_choice_names_each_library_by_its_folder_or_its_file(monkeypatch):
    monkeypatch.syspath_prepend(str(PERF))
    blas_choice = importlib.import_module("blas_choice")
    assert blas_choice.library_label("/usr/lib/x86_64-linux-gnu/blis-pthread/libblas.so.3") == "blis-pthread"
    assert blas_choice.library_label("/home/me/.venv/lib/libmkl_rt.so.3") == "libmkl_rt"
    assert blas_choice.library_label(f"{blas_choice.LIBDIR}/libopenblas.so.0") == "libopenblas"


def test_blas_timeout_compares_two_copies_of_openblas_in_one_process(monkeypatch):
    _needs_blas_switch(monkeypatch, "DEFAULT_LARGE")
    out = _run_perf_script("blas_timeout", {}, extra=["--gap", "0.01"])
    cells = _first_round(out)
    assert len(cells) == 1 + 4 + 2
    assert all(float(c) > 0 for c in cells[1:5])
    assert "4 outputs were not all the same: 0 of 2" in out


def test_blas_trace_times_each_product_shape_of_a_step(monkeypatch):
    """The demo's AR step makes six 1-row gate/up products (one per layer, q/k/v and gate/up
    fused); a ``1,1`` step makes three 3-row ones (3 nodes, the base layers) and three 9-row
    ones (3 nodes x 3 tokens, the multi-stream layers); the per-shape times add up to the
    BLAS time the table's heading reports."""
    _needs_blas_switch(monkeypatch, "DEFAULT_LARGE")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "OPENBLAS_THREAD_TIMEOUT")}
    done = subprocess.run([sys.executable, str(PERF / "blas_trace.py"), "--trees", "ar;1,1", "--steps", "3"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    tables = {}
    for block in done.stdout.split("\n### ")[1:]:
        heading, *lines = block.strip().splitlines()
        rows = [line.strip("|").split("|") for line in lines if line.startswith("| ") and line[2].isdigit()]
        tables[heading.split(":")[0]] = (heading, {tuple(int(c) for c in r[:3]) + (r[3].strip(),): r for r in rows})
    assert set(tables) == {"ar", "1,1"}
    hidden, gate_up = 256, 1024
    assert float(tables["ar"][1][(1, gate_up, hidden, "NN")][4]) == 6.0
    assert float(tables["1,1"][1][(3, gate_up, hidden, "NN")][4]) == 3.0
    assert float(tables["1,1"][1][(9, gate_up, hidden, "NN")][4]) == 3.0
    for heading, rows in tables.values():
        blas_ms = float(heading.split("of which BLAS ")[1].split(" ms")[0])
        assert sum(float(r[6]) for r in rows.values()) / 1e3 == pytest.approx(blas_ms, abs=0.011)


def test_serve_decode_reads_the_decode_rate_a_server_reports(monkeypatch):
    import threading

    from test_server import FakeModel, encode

    from mlx_specstream.server import create_server

    monkeypatch.syspath_prepend(str(PERF))
    serve_decode = importlib.import_module("serve_decode")
    assert serve_decode.decode_rate([{"completion_tokens": 11, "decode_tokens_per_sec": 100.0},
                                     {"completion_tokens": 21, "decode_tokens_per_sec": 400.0},
                                     {"completion_tokens": 1, "decode_tokens_per_sec": 0.0}]) == pytest.approx(200.0)
    server = create_server(FakeModel().generate, encode, "tiny", port=0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        usage = serve_decode.complete(server.server_address[1], "tiny", "hello", 6)
        assert usage["completion_tokens"] == 6 and usage["decode_tokens_per_sec"] > 0
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
