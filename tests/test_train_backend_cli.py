"""`specstream train --backend mlx`: the same command, on the runtime's own model in MLX."""

import json

import mlx.core as mx

from mlx_specstream import load
from mlx_specstream.cli.main import main, wants_fast_blas
from mlx_specstream.generate import generate_step
from mlx_specstream.testing import write_tiny_model_dir


def test_train_backend_mlx_writes_a_model_that_speculates_losslessly(tmp_path):
    base = write_tiny_model_dir(tmp_path / "base", "qwen3", spec=None)
    rows = [{"prompt": f"count {i}:", "completion": " a b c d e f g h"} for i in range(12)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["train", "--backend", "mlx", "--model", str(base), "--data", str(tmp_path / "data.jsonl"),
                 "--output", str(tmp_path / "out"), "--mode", "lossless", "--streams", "2", "--max-steps", "3",
                 "--batch-size", "2", "--chunk-size", "3", "-q"]) == 0
    assert json.loads((tmp_path / "out" / "training_args.json").read_text())["chunk_size"] == 3
    model, _ = load(tmp_path / "out")
    plain, _ = load(base)
    assert model.num_streams == 2 and model.spec.mode == "lossless"
    prompt = mx.array([5, 6, 7, 8], dtype=mx.int32)

    def tokens(m, **kw):
        return [t for s in generate_step(m, prompt, max_tokens=30, **kw) for t in s.tokens][:30]

    assert tokens(model) == tokens(model, speculate=False) == tokens(plain)  # the base's own output


def test_train_backend_mlx_preloads_a_fast_blas_but_torch_training_does_not():
    assert wants_fast_blas(["train", "--backend", "mlx", "--model", "m"])
    assert wants_fast_blas(["train", "--backend=mlx"])
    assert not wants_fast_blas(["train", "--model", "m"])


def test_mlx_only_options_need_the_mlx_backend(tmp_path, capsys):
    (tmp_path / "data.jsonl").write_text(json.dumps({"prompt": "a", "completion": " b"}) + "\n")
    code = main(["train", "--model", str(tmp_path), "--data", str(tmp_path / "data.jsonl"),
                 "--output", str(tmp_path / "out"), "--chunk-size", "16"])
    assert code != 0
    assert "--backend mlx" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
