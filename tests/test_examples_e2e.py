"""examples/e2e: the SentencePiece tokenizer and the from-scratch base model trainer (tiny runs)."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SPECSTREAM_SHARED") or REPO.parent / "shared")
E2E = SHARED / "data" / "e2e"
SKIP_REASON = f"E2E data not found under {E2E}; set SPECSTREAM_SHARED to the shared/ folder"

pytestmark = pytest.mark.skipif(not (E2E / "trainset.csv.gz").is_file(), reason=SKIP_REASON)


def _load_example(name: str):
    path = REPO / "examples" / "e2e" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"e2e_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one thread is fastest; restore the count after."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    tok = _load_example("train_tokenizer")
    return tok.train_tokenizer(E2E / "trainset.csv.gz", tmp_path_factory.mktemp("e2e") / "tokenizer")


@pytest.fixture(scope="module")
def small_csvs(tmp_path_factory):
    """The first 160 train rows and 40 dev rows, as plain CSV files."""
    out = tmp_path_factory.mktemp("e2e_small")
    paths = []
    for name, n in (("trainset", 160), ("devset", 40)):
        with gzip.open(E2E / f"{name}.csv.gz", "rt", encoding="utf-8", newline="") as f:
            rows = [r for _, r in zip(range(n), csv.DictReader(f))]
        path = out / f"{name}.csv"
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["mr", "ref"])
            writer.writeheader()
            writer.writerows(rows)
        paths.append(path)
    return paths


def test_tokenizer_loads_offline_and_matches_sentencepiece(tokenizer_dir):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from mlx_specstream.datasets import read_e2e

    assert sorted(p.name for p in tokenizer_dir.iterdir()) == ["tokenizer.json", "tokenizer.model",
                                                               "tokenizer_config.json"]
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    assert sp.vocab_size() == len(hf) == 1024
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0)
    dev = read_e2e(E2E / "devset.csv.gz", limit=200).examples
    for e in dev:
        text = e.prompt + e.completion
        assert hf.encode(text) == [1] + sp.encode(text)
        assert hf.decode(hf.encode(text), skip_special_tokens=True) == text
    # The template was in the tokenizer's training text, so it costs few tokens.
    assert len(hf.encode(dev[0].prompt)) - len(hf.encode(dev[0].input)) <= 14


def test_mlx_lm_loads_tokenizer_with_spm_detokenizer(tokenizer_dir):
    pytest.importorskip("mlx.core")
    from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer, load

    wrapper = load(tokenizer_dir)
    assert isinstance(wrapper.detokenizer, SPMStreamingDetokenizer)
    ids = wrapper.encode("name[The Vaults], eatType[pub] The Vaults is a pub near Café Adriatic.")
    assert ids[0] == 1 and wrapper.decode(ids[1:]).endswith("near Café Adriatic.")
    assert wrapper.eos_token_ids == {2}


def test_tokenizer_refuses_existing_output(tokenizer_dir):
    tok = _load_example("train_tokenizer")
    with pytest.raises(FileExistsError, match="--force"):
        tok.train_tokenizer(E2E / "trainset.csv.gz", tokenizer_dir)


def test_default_base_model_fits_16_mb():
    import torch
    from transformers import LlamaForCausalLM

    pre = _load_example("pretrain_base")
    args = pre.parse_args(["--tokenizer", "x", "--output", "y"])
    with torch.device("meta"):  # shapes only
        model = LlamaForCausalLM(pre.build_config(args, 1024))
    n = sum(p.numel() for p in model.parameters())
    assert 3_000_000 < n and 4 * n <= pre.MAX_MODEL_BYTES
    assert model.config.tie_word_embeddings and args.threads == 1
    assert (args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate, args.max_positions,
            args.batch_size, args.format) == (256, 6, 4, 2, 512, 512, 32, "e2e")
    assert args.train_data.endswith("e2e/trainset.csv.gz") and args.dev_data.endswith("e2e/devset.csv.gz")


def test_resume_accepts_runs_saved_before_the_format_option():
    """training_args.json of runs started before --format has no 'format': they were E2E runs."""
    pre = _load_example("pretrain_base")
    args = pre.parse_args(["--tokenizer", "x", "--output", "y", "--train-csv", "t.csv", "--epochs", "2"])
    saved = {k: getattr(args, k) for k in pre.ARCH_KEYS if k != "format"}
    assert args.train_data == "t.csv" and pre.changed_settings(saved, args) == {}
    args.format = "dialogsum"
    assert pre.changed_settings(saved, args) == {"format": ("e2e", "dialogsum")}


def test_epoch_batches_cover_every_example_once_and_are_deterministic():
    pre = _load_example("pretrain_base")
    lengths = [(i * 37) % 50 + 5 for i in range(1000)]
    batches = pre.epoch_batches(lengths, 32, seed=3, epoch=1)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert batches == pre.epoch_batches(lengths, 32, seed=3, epoch=1)
    assert batches != pre.epoch_batches(lengths, 32, seed=3, epoch=2)
    # length-sorted pools: padding stays small
    waste = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert waste < 0.05 * sum(lengths)


def test_pretrain_tiny_run_writes_resumable_hf_model(tokenizer_dir, small_csvs, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from mlx_specstream.datasets import E2E_PROMPT_TEMPLATE, PROMPT_TEMPLATE_KEY

    pre = _load_example("pretrain_base")
    out = tmp_path / "base"
    train_csv, dev_csv = small_csvs
    args = ["--tokenizer", str(tokenizer_dir), "--output", str(out), "--train-csv", str(train_csv),
            "--dev-csv", str(dev_csv), "--hidden", "32", "--layers", "2", "--heads", "2", "--kv-heads", "1",
            "--intermediate", "64", "--batch-size", "16", "--epochs", "2", "--log-every", "5",
            "--eval-every", "10", "--eval-examples", "16", "--checkpoint-minutes", "0"]
    pre.main(args)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert config[PROMPT_TEMPLATE_KEY] == E2E_PROMPT_TEMPLATE and config["rope_theta"] == 10000.0
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "train.log"):
        assert (out / name).is_file()
    # checkpoint every step (--checkpoint-minutes 0), the newest two kept
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000019", "step-000020"]
    log = (out / "train.log").read_text()
    assert "step 20/20" in log and "dev_loss" in log

    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True)
    assert sum(p.numel() for p in model.parameters()) == json.loads((out / "training_args.json").read_text())[
        "parameters"]

    capsys.readouterr()
    pre.main(args)  # a rerun resumes from the last checkpoint and finds nothing to do
    assert "already finished (20/20 steps)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="different settings"):
        pre.main(args + ["--lr", "1e-4"])

    # Interrupted after step 19: resuming gives exactly the uninterrupted weights.
    finished = load_file(str(out / "model.safetensors"))
    shutil.rmtree(out / "checkpoints" / "step-000020")
    (out / "model.safetensors").unlink()
    pre.main(args)
    assert "resumed from" in capsys.readouterr().out
    resumed = load_file(str(out / "model.safetensors"))
    assert finished.keys() == resumed.keys()
    assert all(torch.equal(finished[k], resumed[k]) for k in finished)


def test_distill_data_is_the_models_own_greedy_text(tmp_path, small_csvs):
    pytest.importorskip("mlx.core")
    from mlx_specstream import generate, load

    distill = _load_example("distill_data")
    out = tmp_path / "d.csv.gz"
    distill.main(["--model", str(REPO / "mlx_specstream" / "demo"), "--output", str(out),
                  "--train-csv", str(small_csvs[0]), "--limit", "3", "--max-tokens", "48"])
    with gzip.open(out, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and len({r["mr"] for r in rows}) == 3
    model, tokenizer = load(REPO / "mlx_specstream" / "demo")
    template = model.config["prompt_template"]
    for row in rows:
        text = generate(model, tokenizer, template.replace("{input}", row["mr"]), max_tokens=48, speculate=False)
        assert row["ref"] == text.strip()
    with pytest.raises(SystemExit, match="exists"):  # never overwrites without --force
        distill.main(["--model", str(REPO / "mlx_specstream" / "demo"), "--output", str(out),
                      "--train-csv", str(small_csvs[0]), "--limit", "1"])
