"""examples/dialogsum: the DialogSum tokenizer and base model (the E2E scripts with --format
dialogsum), the recipe's sizes, and the benchmark reading the test split."""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import pytest

# The scripts live in examples/e2e; share that test module's loader and its one-thread fixture.
from test_examples_e2e import _load_example, one_torch_thread  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SPECSTREAM_SHARED") or REPO.parent / "shared")
DS = SHARED / "data" / "dialogsum"
SKIP_REASON = f"DialogSum data not found under {DS}; set SPECSTREAM_SHARED to the shared/ folder"

pytestmark = pytest.mark.skipif(not (DS / "train.jsonl.gz").is_file(), reason=SKIP_REASON)


def _encode_all(tokenizer, texts: list[str], special: bool = True) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=special)["input_ids"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    tok = _load_example("train_tokenizer")
    return tok.train_tokenizer(DS / "train.jsonl.gz", tmp_path_factory.mktemp("dialogsum") / "tokenizer",
                               task="dialogsum")


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


@pytest.fixture(scope="module")
def small_jsonl(tmp_path_factory):
    """The first 48 train and 16 dev dialogues, as plain JSONL files."""
    out = tmp_path_factory.mktemp("dialogsum_small")
    paths = []
    for name, n in (("train", 48), ("dev", 16)):
        with gzip.open(DS / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
            lines = [line for _, line in zip(range(n), f)]
        path = out / f"{name}.jsonl"
        path.write_text("".join(lines), encoding="utf-8")
        paths.append(path)
    return paths


def test_tokenizer_matches_sentencepiece_on_dev(tokenizer_dir, hf_tokenizer):
    import sentencepiece as spm

    from mlx_specstream.datasets import read_dialogsum

    assert sorted(p.name for p in tokenizer_dir.iterdir()) == ["tokenizer.json", "tokenizer.model",
                                                               "tokenizer_config.json"]
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    assert sp.vocab_size() == len(hf_tokenizer) == 4096
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.unk_token_id) == (1, 2, 0)
    dev = read_dialogsum(DS / "dev.jsonl.gz").examples
    texts = [e.prompt + e.completion for e in dev]
    for text, ids, spm_ids in zip(texts, _encode_all(hf_tokenizer, texts), sp.encode(texts)):
        assert ids == [1] + spm_ids
        assert hf_tokenizer.decode(ids, skip_special_tokens=True) == text
    # Speaker tags are single pieces (pieces cross script and digit boundaries).
    assert hf_tokenizer.tokenize("Hi.\n#Person2#: Hello. #Person1# agrees.") == [
        "▁Hi", ".\n#Person2#:", "▁Hello.", "▁#Person1#", "▁agrees."]
    # The README's numbers: mean dev tokens per prompt and per summary at vocab 4096.
    prompt_tokens = sum(map(len, _encode_all(hf_tokenizer, [e.prompt for e in dev], False))) / len(dev)
    summary_tokens = sum(map(len, _encode_all(hf_tokenizer, [e.completion for e in dev], False))) / len(dev)
    assert prompt_tokens == pytest.approx(162.3, abs=0.1)
    assert summary_tokens == pytest.approx(27.9, abs=0.1)


def test_max_positions_hold_every_train_example_and_test_generation(hf_tokenizer):
    from mlx_specstream.datasets import read_dialogsum

    max_len = hf_tokenizer.model_max_length
    assert max_len == _load_example("train_tokenizer").TASKS["dialogsum"].model_max_length == 1536
    train = read_dialogsum(DS / "train.jsonl.gz").examples
    longest = max(map(len, _encode_all(hf_tokenizer, [e.prompt + e.completion for e in train])))
    assert longest + 1 == 1345 <= max_len  # + EOS: pretraining needs no example dropped
    test = read_dialogsum(DS / "test.jsonl.gz").examples
    assert max(map(len, _encode_all(hf_tokenizer, [e.prompt for e in test]))) + 128 <= max_len


def test_measure_vocab_reports_both_piece_settings():
    tok = _load_example("train_tokenizer")
    rows = tok.measure_vocab(DS / "train.jsonl.gz", DS / "dev.jsonl.gz", [4096], task="dialogsum")
    assert [r["spm_options"] for r in rows] == [tok.CROSS_BOUNDARIES, {}]
    crossing, split = rows
    assert crossing["prompt_tokens"] == pytest.approx(162.3, abs=0.1)
    assert split["prompt_tokens"] == pytest.approx(209.5, abs=0.1)
    assert split["completion_tokens"] == pytest.approx(36.8, abs=0.1)
    assert crossing["input_tokens"] < crossing["prompt_tokens"]


def test_default_base_model_size_and_run_all_flags_agree():
    import torch
    from transformers import LlamaForCausalLM

    pre = _load_example("pretrain_base")
    args = pre.parse_args(["--format", "dialogsum", "--tokenizer", "x", "--output", "y"])
    assert (args.hidden, args.layers, args.intermediate, args.max_positions, args.batch_size) == (
        256, 8, 768, 1536, 16)
    assert args.train_data.endswith("dialogsum/train.jsonl.gz") and args.threads == 1
    with torch.device("meta"):  # shapes only
        model = LlamaForCausalLM(pre.build_config(args, 4096))
    assert sum(p.numel() for p in model.parameters()) == 7_344_384
    # run_all.sh: N_s = N/2, and the fine-tunes keep every example the base model saw.
    script = (REPO / "examples" / "dialogsum" / "run_all.sh").read_text()
    assert int(re.search(r"--msa-layers (\d+)", script).group(1)) == args.layers // 2
    assert int(re.search(r"--max-length (\d+)", script).group(1)) == args.max_positions
    assert "--format dialogsum" in script and "--streams 0" in script


def test_pretrain_tiny_run_records_dialogsum_template(tokenizer_dir, small_jsonl, tmp_path, capsys):
    from mlx_specstream.datasets import DIALOGSUM_PROMPT_TEMPLATE, PROMPT_TEMPLATE_KEY

    pre = _load_example("pretrain_base")
    out = tmp_path / "base"
    train, dev = small_jsonl
    args = ["--format", "dialogsum", "--tokenizer", str(tokenizer_dir), "--output", str(out),
            "--train-data", str(train), "--dev-data", str(dev), "--hidden", "32", "--layers", "2",
            "--heads", "2", "--kv-heads", "1", "--intermediate", "64", "--epochs", "2", "--log-every", "2",
            "--eval-every", "6", "--eval-examples", "8", "--checkpoint-minutes", "0"]
    pre.main(args)
    config = json.loads((out / "config.json").read_text())
    assert config[PROMPT_TEMPLATE_KEY] == DIALOGSUM_PROMPT_TEMPLATE
    assert config["vocab_size"] == 4096 and config["max_position_embeddings"] == 1536
    saved = json.loads((out / "training_args.json").read_text())
    assert saved["format"] == "dialogsum" and saved["total_steps"] == 6  # 48 dialogues / 16, 2 epochs
    log = (out / "train.log").read_text()
    assert "step 6/6" in log and "48 train examples" in log
    sample = next(line for line in log.splitlines() if " sample: " in line)
    assert "#Person1#" in sample and re.search(r"\.\.\.[\"'] -> ", sample)  # long dialogue shortened
    capsys.readouterr()
    pre.main(args)
    assert "already finished (6/6 steps)" in capsys.readouterr().out
    # The same flags under --format e2e would train another model: E2E presets fill the rest.
    as_e2e = pre.parse_args([a if a != "dialogsum" else "e2e" for a in args])
    assert pre.changed_settings(saved, as_e2e) == {
        "format": ("dialogsum", "e2e"), "max_positions": (1536, 512), "batch_size": (16, 32)}


def test_bench_reads_dialogsum_test_split_with_the_model_template(tokenizer_dir):
    from mlx_specstream.bench import bench_prompt, load_bench_data
    from mlx_specstream.datasets import DIALOGSUM_PROMPT_TEMPLATE, format_prompt

    data = load_bench_data(DS / "test.jsonl.gz")
    assert data.format == "dialogsum" and data.metric == "rouge" and len(data.examples) == 500
    assert all(len(ex.references) == 3 for ex in data.examples)
    first = data.examples[0]
    assert first.input.startswith("#Person1#:") and first.references[0] != first.references[1]
    model = type("Model", (), {"config": {"prompt_template": DIALOGSUM_PROMPT_TEMPLATE}})()
    assert bench_prompt(model, first, data) == format_prompt(DIALOGSUM_PROMPT_TEMPLATE, first.input)
    assert bench_prompt(model, first, data).endswith("\nSummary:")
