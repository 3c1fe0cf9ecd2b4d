"""torchrun --nproc_per_node 2 on CPU (gloo): two DDP steps leave both ranks with identical weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from mlx_specstream.train.tiny import save_tiny_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

WORKER = """
import json, os, sys, torch
from mlx_specstream.train import TrainArgs, run_training
base, data, out, dump = sys.argv[1:5]
r = run_training(TrainArgs(model=base, data=data, output=out, mode="shared", streams=2, msa_layers=2,
                           lora_rank=4, batch_size=2, max_steps=2, lr=1e-2, progress=False, num_threads=1))
torch.save({k: v.clone() for k, v in r.model.state_dict().items()}, f"{dump}/rank{os.environ['RANK']}.pt")
with open(f"{dump}/rank{os.environ['RANK']}.json", "w") as f:
    json.dump({"steps": r.steps, "output": str(r.output_dir) if r.output_dir else None}, f)
"""


def test_torchrun_two_ranks_end_with_identical_weights(tmp_path):
    base = save_tiny_checkpoint("llama", tmp_path / "base", seed=0)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"n{i}:", "completion": f" {i} {i + 1} {i + 2}"}) + "\n"
                            for i in range(16)))
    (tmp_path / "worker.py").write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tmp_path / "worker.py"), str(base), str(data), str(tmp_path / "out"), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0.keys() == r1.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    # the steps did something, and only rank 0 wrote the output directory
    from safetensors.torch import load_file

    before = load_file(str(base / "model.safetensors"))
    assert any(not torch.equal(before[k], r0[f"hf.{k}"]) for k in before)
    assert (tmp_path / "out" / "speculative_streams.safetensors").is_file()
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert reports == [{"steps": 2, "output": str(tmp_path / "out")}, {"steps": 2, "output": None}]
    state = json.loads((tmp_path / "out" / "training_args.json").read_text())
    assert state["world_size"] == 2
