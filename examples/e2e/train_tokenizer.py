"""Train a task's SentencePiece tokenizer (E2E NLG or DialogSum) as a Hugging Face tokenizer directory.

    python examples/e2e/train_tokenizer.py --output runs/e2e_tokenizer
    python examples/e2e/train_tokenizer.py --format dialogsum --output runs/dialogsum_tokenizer
    python examples/e2e/train_tokenizer.py --format dialogsum --measure 2048,4096,8192

One script serves both recipes (examples/e2e, examples/dialogsum): the task (``--format``)
chooses the data reader, the default split files and the vocabulary size; everything else
(BPE with byte fallback, the Llama ids, the parity check) is the same. ``--measure`` trains
tokenizers of several sizes in memory and prints dev tokens per input and per output, the
numbers behind each task's vocabulary choice (examples/dialogsum/README.md for DialogSum).

E2E choice: SentencePiece BPE, vocab 1024, byte fallback.
* BPE, not unigram: on the E2E dev set BPE needs fewer tokens per meaning representation
  (30.5 vs 37.1 at 1024) for the same reference length (27.5 vs 27.4), and BPE with byte
  fallback is exactly what transformers' LlamaTokenizer implements, so transformers and
  mlx-lm reproduce the SentencePiece ids (checked below and in tests/test_examples_e2e.py).
* 1024, not 2048: E2E is a small closed domain (about 1,800 word types occur >= 5 times).
  Doubling the vocabulary saves only 3-6% of tokens (dev MR 30.5 -> 29.5, ref 27.5 -> 25.9)
  but doubles the tied embedding / LM head (262k -> 524k parameters at hidden 256), which
  takes room from the transformer layers within the 16 MB budget and costs LM-head work for
  every node of a verified draft tree.
* Trained on the text the models read: the formatted prompts (the project's E2E prompt
  template around each MR, ``mlx_specstream.datasets.E2E_PROMPT_TEMPLATE``) and the
  references. The template then costs ~10 tokens instead of ~35 (prompt 41.6 tokens on
  average on dev, vs 65.5 for a tokenizer trained on bare MRs).
* No whitespace normalization (identity rules, ``remove_extra_whitespaces=False``):
  transformers' Metaspace pre-tokenizer does not collapse spaces, and the two must agree.
  (One known difference: SentencePiece adds its dummy "▁" even before a leading space,
  transformers does not; the data never starts with a space.)
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

from mlx_specstream.datasets import Dataset, read_dialogsum, read_e2e, shared_dir


@dataclasses.dataclass(frozen=True)
class Task:
    """What differs between the recipes' data: reader, split files (under shared/) and sizes."""

    read: Callable[..., Dataset]
    train: str
    dev: str
    vocab_size: int
    model_max_length: int  # the tokenizer's, = the base model's max positions
    spm_options: dict = dataclasses.field(default_factory=dict)  # overrides of train_spm's settings


# Let pieces cross script and digit boundaries, so DialogSum's speaker tags ("\n#Person1#:",
# " #Person2#") are one piece each instead of three or four (dev: -23% tokens per dialogue,
# -24% per summary at 4096; examples/dialogsum/README.md).
CROSS_BOUNDARIES = {"split_by_unicode_script": False, "split_by_number": False, "split_digits": False}

TASKS = {
    "e2e": Task(read_e2e, "data/e2e/trainset.csv.gz", "data/e2e/devset.csv.gz", 1024, 512),
    # 1536 positions hold every train example (longest 1,345 tokens) and every test prompt
    # plus 128 generated tokens (longest 1,120).
    "dialogsum": Task(read_dialogsum, "data/dialogsum/train.jsonl.gz", "data/dialogsum/dev.jsonl.gz",
                      4096, 1536, CROSS_BOUNDARIES),
}
VOCAB_SIZE = TASKS["e2e"].vocab_size
MODEL_MAX_LENGTH = TASKS["e2e"].model_max_length
# SentencePiece skips (with only a log line) training sentences over 4,192 bytes; the longest
# formatted DialogSum train dialogue has 5,211.
SPM_MAX_SENTENCE_BYTES = 4192


def default_shared() -> Path:
    return shared_dir() or Path(__file__).resolve().parents[2].parent / "shared"


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown --format {name!r}; use one of {sorted(TASKS)}.")
    return TASKS[name]


def training_lines(train_data: str | Path, task: str = "e2e") -> list[str]:
    """Unique formatted prompts and references of a train split, in file order.

    Whole prompts, template included, so the template and recurring markup (DialogSum's
    newline + ``#Person2#:``) become few pieces, as in the text the models read.
    """
    examples = get_task(task).read(train_data).examples
    return list(dict.fromkeys(t for e in examples for t in (e.prompt, e.completion.strip())))


def train_spm(lines: list[str], vocab_size: int = VOCAB_SIZE, num_threads: int = 1, **options) -> bytes:
    """Train a SentencePiece BPE model on ``lines``; returns the serialized model.

    ``options`` override the SentencePiece trainer settings below (a task's ``spm_options``).
    """
    import sentencepiece as spm

    settings = dict(
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,  # keep £, é etc. as pieces; anything unseen falls back to bytes
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # Llama's ids
        num_threads=num_threads,
        minloglevel=2,
    )
    settings.update(options)
    longest = max(len(line.encode("utf-8")) for line in lines)
    if longest > SPM_MAX_SENTENCE_BYTES:  # only then, so the E2E tokenizer.model stays byte-identical
        settings["max_sentence_length"] = longest
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, **settings)
    return model.getvalue()


def write_hf_tokenizer(spm_path: str | Path, out_dir: str | Path, model_max_length: int) -> None:
    """tokenizer.model + tokenizer_config.json (LlamaTokenizer settings) + tokenizer.json.

    tokenizer.json lets mlx-lm choose its SentencePiece streaming detokenizer and lets older
    transformers versions load without a SentencePiece conversion.
    """
    from transformers import LlamaTokenizer

    out_dir = Path(out_dir)
    if Path(spm_path).resolve() != (out_dir / "tokenizer.model").resolve():
        shutil.copyfile(spm_path, out_dir / "tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok = LlamaTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    tok.backend_tokenizer.save(str(out_dir / "tokenizer.json"))


def check_parity(tokenizer_dir: str | Path, texts: list[str]) -> int:
    """Number of ``texts`` whose transformers ids differ from SentencePiece's (BOS included)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(Path(tokenizer_dir) / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    return sum(hf.encode(t) != [sp.bos_id()] + sp.encode(t) for t in texts)


def measure_vocab(train_data: str | Path, dev_data: str | Path, sizes: list[int],
                  task: str = "e2e") -> list[dict]:
    """Mean dev tokens per raw input, per prompt and per completion for each vocabulary size.

    Trains each tokenizer in memory (nothing written) on the same lines as
    :func:`train_tokenizer`; counts exclude BOS/EOS. Completion tokens are counted after the
    prompt (prompt + completion minus prompt), as the model generates them: alone, the
    completion's leading space would cost an extra "▁". For a task with ``spm_options``, each
    size is measured with them and with the plain (E2E) settings, to show what they buy.
    """
    import sentencepiece as spm

    spec = get_task(task)
    lines = training_lines(train_data, task)
    dev = spec.read(dev_data).examples
    texts = {"input": [e.input for e in dev], "prompt": [e.prompt for e in dev],
             "full": [e.prompt + e.completion for e in dev]}
    variants = [spec.spm_options, {}] if spec.spm_options else [{}]
    rows = []
    for size in sizes:
        for options in variants:
            sp = spm.SentencePieceProcessor(model_proto=train_spm(lines, size, **options))
            mean = {k: sum(len(ids) for ids in sp.encode(v)) / len(dev) for k, v in texts.items()}
            rows.append({"vocab_size": size, "spm_options": options, "input_tokens": round(mean["input"], 1),
                         "prompt_tokens": round(mean["prompt"], 1),
                         "completion_tokens": round(mean["full"] - mean["prompt"], 1)})
    return rows


def train_tokenizer(train_data: str | Path, output: str | Path, vocab_size: int | None = None,
                    force: bool = False, task: str = "e2e") -> Path:
    """Train on the prompts and references of ``train_data``; write the directory ``output`` atomically.

    ``vocab_size`` None: the task's own (1024 for E2E, 4096 for DialogSum).
    """
    output = Path(output)
    if output.exists() and not force:
        raise FileExistsError(f"{output} already exists; pass --force to replace it.")
    spec = get_task(task)
    lines = training_lines(train_data, task)

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        (tmp / "tokenizer.model").write_bytes(train_spm(lines, vocab_size or spec.vocab_size, **spec.spm_options))
        write_hf_tokenizer(tmp / "tokenizer.model", tmp, spec.model_max_length)
        sample = lines[:: max(1, len(lines) // 2000)] + [e.prompt + e.completion for e in
                                                         spec.read(train_data, limit=500).examples]
        bad = check_parity(tmp, sample)
        if bad:
            raise RuntimeError(f"transformers and SentencePiece disagree on {bad}/{len(sample)} texts.")
        os.chmod(tmp, 0o755)
        if output.exists():
            shutil.rmtree(output)
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated vocabulary sizes like 2048,4096, got {text!r}") from None
    return sizes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--format", default="e2e", choices=sorted(TASKS), help="task data (default e2e)")
    ap.add_argument("--train-data", "--train-csv", dest="train_data",
                    help="train split (default: the task's file under the shared folder)")
    ap.add_argument("--dev-data", help="dev split for --measure (default: the task's)")
    ap.add_argument("--output", help="tokenizer directory to create (required unless --measure)")
    ap.add_argument("--vocab-size", type=int, help="default: the task's (e2e 1024, dialogsum 4096)")
    ap.add_argument("--force", action="store_true", help="replace --output if it exists")
    ap.add_argument("--measure", type=parse_sizes, metavar="SIZES",
                    help="print dev token counts for these vocabulary sizes (e.g. 2048,4096); write nothing")
    args = ap.parse_args(argv)
    task = TASKS[args.format]
    train = args.train_data or str(default_shared() / task.train)
    try:
        if args.measure:
            for row in measure_vocab(train, args.dev_data or str(default_shared() / task.dev), args.measure,
                                     args.format):
                print(json.dumps(row))
            return
        if not args.output:
            ap.error("--output is required (or pass --measure SIZES)")
        out = train_tokenizer(train, args.output, args.vocab_size, force=args.force, task=args.format)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
