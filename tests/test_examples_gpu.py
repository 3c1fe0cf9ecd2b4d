"""examples/gpu: the scripts prepared for a CUDA machine, dry-run on this CPU.

* ``mlx_step_cost.py``: the tiny CPU run prints a table with a plain row and tree rows and
  writes valid JSON; a spent time budget (soft, or the hard stop) still ends cleanly with a
  table and JSON.
* ``fetch_mlx_cuda.sh``: the split/join plan on a dummy "wheel" (no download): two parts, one
  per call, each call within its limit; the device side's stash + join gives back the same
  bytes, and a join without call 1's part refuses with a message; a wheel that cannot fit two
  calls is refused.
* ``dialogsum_full.py``: arguments (device defaults, ``--dry-run``, ``DEVICE=cpu TINY=1``) and
  the pack/unpack round trip of sharded safetensors within a call's file limits. (Its full tiny
  run takes ~30 s of training here; it is left to the manual dry run.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU = REPO / "examples" / "gpu"
CUDA_WHEEL = "mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_gpu_{name}", GPU / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _step_cost(tmp_path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "step_cost.json"
    proc = subprocess.run(
        [sys.executable, str(GPU / "mlx_step_cost.py"), "--tiny", "--device", "cpu", "--dtypes", "bf16",
         "--trees", "1;1,1", "--context", "32", "--repeats", "2", "--out", str(out), *extra],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, SPECSTREAM_NO_OPENBLAS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


# ---- mlx_step_cost.py ------------------------------------------------------------------------


def test_step_cost_tiny_table_and_json(tmp_path):
    proc, result = _step_cost(tmp_path)
    table = proc.stdout[proc.stdout.index("| shape | dtype | tree |"):]
    rows = [line for line in table.splitlines() if line.startswith("| tiny |")]
    assert [r.split("|")[3].strip() for r in rows] == ["plain", "1", "1,1"], table
    assert rows[0].split("|")[7].strip() == "1.00"  # the plain step is the unit
    assert [r["tree"] for r in result["rows"]] == ["ar", "1", "1,1"]
    assert [r["nodes"] for r in result["rows"]] == [1, 2, 3]
    assert all(r["ms"] > 0 and r["shape"] == "tiny" and r["dtype"] == "bf16" for r in result["rows"])
    assert result["rows"][0]["ratio"] == 1.0
    assert result["stopped"] is None and result["skipped"] == []
    assert result["meta"]["context"] == 32 and result["meta"]["gamma"] == 4
    assert result["models"][0]["layers"] == 4 and result["models"][0]["msa_layers"] == 2


def test_step_cost_time_budget_stops_cleanly(tmp_path):
    # a budget spent before the first model: a clean stop, an empty table, the rest listed
    proc, result = _step_cost(tmp_path, "--time-budget", "0")
    assert "| shape | dtype | tree |" in proc.stdout and "Stopped:" in proc.stdout
    assert result["rows"] == [] and result["skipped"] == ["tiny bf16"]
    assert result["stopped"].startswith("time budget spent")
    # the hard stop, should one step outlast budget + grace: still a table and JSON
    proc, result = _step_cost(tmp_path, "--time-budget", "0.05", "--grace", "0.05")
    assert "| shape | dtype | tree |" in proc.stdout and result["stopped"]


def test_step_cost_shapes_are_the_named_models():
    """The configs build (lazily: nothing is allocated) into models of the named sizes."""
    from mlx.utils import tree_flatten

    from mlx_specstream.models import build_model

    sc = _load("mlx_step_cost")
    for name, expected in {"0.5B": 0.494e9, "1.5B": 1.544e9, "4B": 4.022e9, "8B": 8.030e9}.items():
        n = sum(v.size for _, v in tree_flatten(build_model(sc.SHAPES[name]).parameters()))
        assert abs(n - expected) / expected < 0.01, (name, n)
    from mlx_specstream.tree import parse_tree_spec

    sizes = [parse_tree_spec(t).size for t in sc.TREES]
    assert min(sizes) == 2 and 32 in sizes and all(parse_tree_spec(t).max_depth <= 4 for t in sc.TREES)


# ---- fetch_mlx_cuda.sh -----------------------------------------------------------------------


def _fetch(tmp_path, limit_mib: int, tree_bytes: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(GPU / "fetch_mlx_cuda.sh"), "--dest", str(tmp_path / "w"), "--data-dir", str(tmp_path / "d"),
         "--no-download", "--no-data", "--tree-bytes", str(tree_bytes), "--limit-mib", str(limit_mib),
         "--margin-mib", "0"], capture_output=True, text=True, timeout=60)


@pytest.fixture
def dummy_wheels(tmp_path):
    all_dir = tmp_path / "w" / "all"
    all_dir.mkdir(parents=True)
    big = os.urandom(3 * (1 << 20) + 12345)  # odd size: the halves differ by one byte
    (all_dir / CUDA_WHEEL).write_bytes(big)
    for name in ("mlx-0.32.4-cp312-cp312-manylinux_2_35_x86_64.whl", "mlx_cpu-0.32.4-py3-none-manylinux_2_35_x86_64.whl",
                 "mlx_lm-0.32.2-py3-none-any.whl", "nltk-3.10.4-py3-none-any.whl",
                 "defusedxml-0.7.1-py2.py3-none-any.whl", "rouge_score-0.1.2-py3-none-any.whl"):
        (all_dir / name).write_bytes(os.urandom(10_000))
    return big


def test_fetch_split_and_join(tmp_path, dummy_wheels):
    proc = _fetch(tmp_path, limit_mib=4, tree_bytes=1 << 20)  # 3 MiB free per call
    assert proc.returncode == 0, proc.stdout + proc.stderr
    w = tmp_path / "w"
    parts = sorted(w.glob(f"*/{CUDA_WHEEL}.part-*"))
    assert [p.parent.name for p in parts] == ["call1", "call2"] and not (w / "split").exists()
    assert parts[0].read_bytes() + parts[1].read_bytes() == dummy_wheels
    for call in ("call1", "call2"):  # each call's carried files within the limit left by the tree
        assert sum(f.stat().st_size for f in (w / call).iterdir()) <= 3 << 20
    assert (w / "call2" / "install.sh").is_file() and (w / "cpu" / "install.sh").is_file()
    assert '"' + str(w / "call1") + '"' in proc.stdout and "timeout_s" in proc.stdout  # carry lists printed
    # the device: call 1 stashes its part, call 2 joins and checks (MLX_JOIN_ONLY: no pip install)
    env = dict(os.environ, MLX_STAGE=str(tmp_path / "stage"), MLX_JOIN_ONLY="1")
    subprocess.run(["bash", str(w / "call1" / "stash.sh")], env=env, check=True, capture_output=True)
    join = subprocess.run(["bash", "-c", f". {w / 'call2' / 'install.sh'}"], env=env, capture_output=True, text=True)
    assert join.returncode == 0, join.stderr
    assert f"{CUDA_WHEEL}: OK" in join.stdout
    assert (tmp_path / "stage" / CUDA_WHEEL).read_bytes() == dummy_wheels
    # a machine given back between the calls: call 2 alone refuses, saying what to do
    env["MLX_STAGE"] = str(tmp_path / "fresh")
    lone = subprocess.run(["bash", "-c", f". {w / 'call2' / 'install.sh'}"], env=env, capture_output=True, text=True)
    assert lone.returncode == 3 and "rerun call 1" in lone.stderr


def test_fetch_refuses_what_two_calls_cannot_carry(tmp_path, dummy_wheels):
    proc = _fetch(tmp_path, limit_mib=2, tree_bytes=1 << 20)  # 1 MiB per call for a 3 MiB wheel
    assert proc.returncode == 4 and "does not fit two calls" in proc.stderr


# ---- dialogsum_full.py -----------------------------------------------------------------------


def test_dialogsum_arguments(monkeypatch):
    ds = _load("dialogsum_full")
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.delenv("TINY", raising=False)
    monkeypatch.delenv("DEVICE", raising=False)
    a = ds.parse_args(["run", "--out", "/tmp/o"])
    assert (a.device, a.dtype, a.epochs, a.lr, a.batch_size, a.tiny) == ("cuda", "bfloat16", 5, 5e-4, 32, False)
    a = ds.parse_args(["run", "--dry-run", "--work", "/tmp/w"])
    assert (a.device, a.dtype, a.tiny, a.fresh, a.out, a.max_steps) == ("cpu", "float32", True, True, "/tmp/w/out", 2)
    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.setenv("TINY", "1")
    a = ds.parse_args(["run", "--out", "/tmp/o"])
    assert (a.device, a.dtype, a.tiny) == ("cpu", "float32", True)
    with pytest.raises(SystemExit):
        ds.parse_args(["run"])  # no --out and no $OUT
    a = ds.parse_args(["local", "--from", "/tmp/x"])
    assert (a.runs, a.prefix, a.repeats) == ("runs", "gpu_", 3)


def test_dialogsum_help_runs():
    proc = subprocess.run([sys.executable, str(GPU / "dialogsum_full.py"), "run", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--deadline" in proc.stdout and "--dry-run" in proc.stdout


def test_dialogsum_pack_unpack_round_trip(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    ds = _load("dialogsum_full")
    models = {}
    for name in ds.MODELS:
        d = tmp_path / "src" / name
        d.mkdir(parents=True)
        torch.manual_seed(len(name))
        tensors = {f"model.layers.{i}.w": torch.randn(128, 128) for i in range(6)}  # 6 x 64 KiB
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "name": name}))
        (d / "tokenizer.json").write_text("{}")
        models[name] = d
    out = tmp_path / "out"
    report = ds.pack(models, out, extra={"summary.json": models["dialogsum_ss"] / "config.json"},
                     shard_bytes=200 * 1024, log_reserve=0, header_room=4096)
    assert report["fits"] and report["files"] == 5  # 2 x 2 shards of 3 tensors, meta.tar.gz
    shards = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.safetensors"))
    assert len(shards) == 4 and all(p.stat().st_size <= 200 * 1024 for p in out.rglob("*.safetensors"))
    back = ds.unpack(out, tmp_path / "runs")
    for name, d in back.items():
        index = json.loads((d / "model.safetensors.index.json").read_text())
        loaded = {}
        for shard in set(index["weight_map"].values()):
            loaded.update(load_file(str(d / shard)))
        original = load_file(str(models[name] / "model.safetensors"))
        assert loaded.keys() == original.keys() and all(torch.equal(loaded[k], original[k]) for k in original)
        assert json.loads((d / "config.json").read_text())["name"] == name
    assert (tmp_path / "runs" / "gpu_summary.json").is_file()
    # over a call's limits (8 files): reported, with what to cut
    report = ds.pack(models, tmp_path / "out2", shard_bytes=70 * 1024, log_reserve=0, header_room=4096)
    assert not report["fits"] and report["files"] > 8
    # a corrupted shard is caught
    first = next((out / "dialogsum_ss").glob("*.safetensors"))
    first.write_bytes(first.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="checksum"):
        ds.unpack(out, tmp_path / "runs2")


def test_shard_plan_limits():
    ds = _load("dialogsum_full")
    assert ds.shard_plan({"a": 5, "b": 5, "c": 3}, 10) == [["a", "b"], ["c"]]
    with pytest.raises(ValueError, match="shard limit"):
        ds.shard_plan({"a": 11}, 10)
