"""run_training end to end: real E2E slice, modes, output directory, resume, CLI errors."""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from mlx_specstream import datasets as ds  # noqa: E402
from mlx_specstream.config import EXTRAS_FILE  # noqa: E402
from mlx_specstream.train import SpecStreamLM, TrainArgs, run_training  # noqa: E402
from mlx_specstream.train import loop as loop_mod  # noqa: E402
from mlx_specstream.train.tiny import save_tiny_checkpoint, train_bpe_tokenizer  # noqa: E402

torch.set_num_threads(1)


def _jsonl(path, n=48):
    words = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]
    rows = [{"prompt": f"Repeat: {words[i % 8]} {words[(i * 3) % 8]}\n",
             "completion": f"{words[i % 8]} {words[(i * 3) % 8]} {words[i % 8]}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_checkpoint("llama", tmp_path_factory.mktemp("base") / "llama", seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _jsonl(tmp_path_factory.mktemp("data") / "train.jsonl")


def args(base, data, out, **kw):
    defaults = dict(model=str(base), data=str(data), output=str(out), streams=2, msa_layers=2, batch_size=4,
                    max_steps=4, lr=5e-3, max_length=64, progress=False, num_threads=1)
    defaults.update(kw)
    return TrainArgs(**defaults)


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_e2e_slice_lowers_every_stream_loss_and_round_trips(tmp_path):
    root = ds.shared_dir()
    if root is None or not (root / "data/e2e/trainset.csv.gz").is_file():
        pytest.skip("../shared/data/e2e not found (set SPECSTREAM_SHARED)")
    train_csv = root / "data/e2e/trainset.csv.gz"
    slice_ = ds.read_e2e(train_csv, limit=600).examples
    tok = train_bpe_tokenizer([e.prompt + e.completion for e in slice_], vocab_size=1000)
    base = save_tiny_checkpoint("llama", tmp_path / "base", tokenizer=tok, seed=0)
    out = tmp_path / "out"
    result = run_training(TrainArgs(
        model=str(base), data=str(train_csv), output=str(out), mode="shared", streams=3, msa_layers=2,
        lora_rank=0, lr=1e-2, warmup_steps=10, batch_size=8, max_steps=200, epochs=100, max_examples=600,
        eval_examples=64, max_length=96, progress=False, num_threads=1))
    first, last = result.metrics["initial_eval"], result.metrics["eval"]
    for name in ("main", "stream1", "stream2", "stream3", "prune"):
        assert last[f"{name}.loss"] < 0.8 * first[f"{name}.loss"], (name, first, last)
        assert last[f"{name}.acc"] > 0.04, (name, last)

    # the output directory follows the checkpoint convention
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["prompt_template"] == ds.E2E_PROMPT_TEMPLATE
    block = cfg["speculative_streaming"]
    assert (block["num_streams"], block["num_msa_layers"], block["mode"]) == (3, 2, "shared")
    for name in (EXTRAS_FILE, "model.safetensors", "tokenizer.json", "training_args.json", "train_metrics.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "train_metrics.json").read_text())
    assert set(saved["eval"]) >= {"stream3.loss", "stream3.acc", "prune.acc"}
    assert not list(tmp_path.glob(".out.tmp-*"))

    # save -> load gives identical logits
    x = torch.tensor([tok(slice_[0].prompt)["input_ids"]])
    loaded = SpecStreamLM.from_pretrained(out)
    a, b = _logits(result.model, x), _logits(loaded, x)
    assert torch.equal(a.main_logits, b.main_logits) and torch.equal(a.stream_logits, b.stream_logits)
    assert torch.equal(a.prune_logits, b.prune_logits)


def test_shared_lora_merges_into_plain_hf_weights(tmp_path, base, data):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    result = run_training(args(base, data, tmp_path / "o", mode="shared", lora_rank=4))
    names = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert not any("lora" in k for k in names)
    x = torch.tensor([[257, 82, 101, 112, 101]])
    a = _logits(result.model, x)
    b = _logits(SpecStreamLM.from_pretrained(tmp_path / "o"), x)
    assert torch.equal(a.main_logits, b.main_logits) and torch.equal(a.stream_logits, b.stream_logits)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, a.main_logits, rtol=0, atol=1e-5)
    base_hf = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        assert not torch.allclose(base_hf(x).logits, hf(x).logits)  # shared mode changes the model


def test_lossless_run_keeps_base_weights_and_main_logits(tmp_path, base, data):
    from safetensors.torch import load_file

    result = run_training(args(base, data, tmp_path / "o", mode="lossless", lora_rank=4, stream_init="linear",
                               stream_init_rank=4))
    before, after = load_file(str(base / "model.safetensors")), load_file(str(tmp_path / "o" / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    x = torch.tensor([[257, 82, 101, 112, 101, 97, 116]])
    trained = _logits(SpecStreamLM.from_pretrained(tmp_path / "o"), x)
    from mlx_specstream.config import SpecStreamConfig

    plain = _logits(SpecStreamLM.from_pretrained(base, SpecStreamConfig(num_streams=2, num_msa_layers=2)), x)
    assert torch.equal(trained.main_logits, plain.main_logits)
    extras = load_file(str(tmp_path / "o" / EXTRAS_FILE))
    assert any(k.startswith("stream_lora.3.self_attn.o_proj") for k in extras)
    assert result.metrics["trainable_parameters"] < result.metrics["total_parameters"] / 5


def test_eval_data_subsampled_evenly(tmp_path, base, data):
    evald = _jsonl(tmp_path / "eval.jsonl", n=40)
    result = run_training(args(base, data, tmp_path / "o", max_steps=1, eval_data=str(evald), eval_examples=10))
    assert result.metrics["eval_examples"] == 10
    assert result.metrics["eval"]["main.loss"] > 0


def test_zero_streams_is_plain_fine_tuning(tmp_path, base, data):
    result = run_training(args(base, data, tmp_path / "o", streams=0, lora_rank=0))
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert "speculative_streaming" not in cfg and cfg["prompt_template"] == "{input}"
    assert not (tmp_path / "o" / EXTRAS_FILE).exists()
    assert set(result.metrics["train"]) == {"main.loss", "main.acc", "loss"}


def test_interrupt_keeps_the_last_checkpoint_and_resume_matches_an_uninterrupted_run(tmp_path, base, data,
                                                                                   monkeypatch):
    kw = dict(max_steps=6, save_every=2, lora_rank=4)
    full = run_training(args(base, data, tmp_path / "full", **kw))

    calls = {"n": 0}
    real_collate = loop_mod.collate

    def interrupting_collate(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # during step 6, after the step-4 checkpoint
            raise KeyboardInterrupt
        return real_collate(*a, **k)

    monkeypatch.setattr(loop_mod, "collate", interrupting_collate)
    with pytest.raises(KeyboardInterrupt):
        run_training(args(base, data, tmp_path / "cut", **kw))
    monkeypatch.setattr(loop_mod, "collate", real_collate)
    ck = tmp_path / "cut.checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000002", "step-00000004"]
    assert not (tmp_path / "cut").exists()

    with pytest.raises(FileExistsError, match="--resume"):
        run_training(args(base, data, tmp_path / "cut", **kw))
    with pytest.raises(ValueError, match=r"\['lr'\] differ"):
        run_training(args(base, data, tmp_path / "cut", resume=True, **dict(kw, lr=1e-3)))
    resumed = run_training(args(base, data, tmp_path / "cut", resume=True, **kw))
    assert resumed.steps == 6
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(FileExistsError, match="--overwrite"):
        run_training(args(base, data, tmp_path / "cut", **kw))


# ---- the CLI: bad input gives one clear line and a non-zero exit ---------------------------------

def _cli(argv, capsys):
    import typer

    from mlx_specstream.cli import common
    from mlx_specstream.cli.train import train

    app = typer.Typer()
    app.command("train")(train)
    app.command("noop")(lambda: None)  # two commands keep 'train' as a sub-command
    code = common.run_app(app, ["train", *argv])
    return code, capsys.readouterr().err


def test_cli_trains(tmp_path, base, data, capsys):
    code, err = _cli(["--model", str(base), "--data", str(data), "--output", str(tmp_path / "o"), "--streams", "2",
                      "--msa-layers", "1", "--max-steps", "2", "--batch-size", "4", "--quiet", "--threads", "1"],
                     capsys)
    assert code == 0, err
    assert "Saved" in err and (tmp_path / "o" / EXTRAS_FILE).is_file()


@pytest.mark.parametrize("case,match", [
    ("missing_data", "Data file not found"),
    ("malformed", "line 3: not valid JSON"),
    ("empty_line", "line 2: empty line"),
    ("unknown_model", "Unsupported model_type 'gpt2'"),
    ("too_many_msa", "--msa-layers 9 exceeds the model's 4 layers"),
    ("bad_mode", "--mode must be one of"),
    ("output_exists", "already exists; pass --overwrite"),
])
def test_cli_bad_input(tmp_path, base, data, capsys, case, match):
    argv = ["--model", str(base), "--data", str(data), "--output", str(tmp_path / "o"), "--quiet"]
    if case == "missing_data":
        argv[3] = str(tmp_path / "missing.jsonl")
    elif case in ("malformed", "empty_line"):
        lines = ['{"prompt": "a", "completion": "b"}'] * 2 + ['{"prompt": "a", ']
        if case == "empty_line":
            lines[1] = ""
        (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
        argv[3] = str(tmp_path / "bad.jsonl")
    elif case == "unknown_model":
        gpt2 = tmp_path / "gpt2"
        gpt2.mkdir()
        (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
        argv[1] = str(gpt2)
    elif case == "too_many_msa":
        argv += ["--msa-layers", "9"]
    elif case == "bad_mode":
        argv += ["--mode", "frozen"]
    elif case == "output_exists":
        (tmp_path / "o").mkdir()
    code, err = _cli(argv, capsys)
    assert code != 0
    assert err.startswith("error: ") and match in err, err


@pytest.mark.parametrize("mode, lora_rank", [("shared", 4), ("lossless", 4), ("shared", 0)])
def test_export_writes_the_checkpoint_weights(tmp_path, base, data, mode, lora_rank, capsys):
    from safetensors.torch import load_file

    from mlx_specstream.cli.main import main

    run_training(args(base, data, tmp_path / "o", mode=mode, lora_rank=lora_rank, max_steps=4, save_every=2))
    step = tmp_path / "o.checkpoints" / "step-00000002"
    code = main(["export", "--checkpoint", str(step), "--output", str(tmp_path / "x")])
    assert code == 0, capsys.readouterr().err
    saved = load_file(str(step / "trainable.safetensors"))
    got = SpecStreamLM.from_pretrained(tmp_path / "x")
    params = dict(got.named_parameters())
    for name, tensor in saved.items():
        if "lora_" in name and mode == "shared":
            continue  # merged below
        torch.testing.assert_close(params[name.replace(".base_layer", "")], tensor, rtol=0, atol=0)
    if mode == "shared" and lora_rank:  # peft LoRA folded in: W = W0 + (alpha / r) B A
        w0 = dict(SpecStreamLM.from_pretrained(base, got.spec).named_parameters())
        prefix = next(k for k in saved if k.endswith("q_proj.lora_A.default.weight")).rsplit(".lora_A", 1)[0]
        a, b = saved[prefix + ".lora_A.default.weight"], saved[prefix + ".lora_B.default.weight"]
        name = prefix.replace("base_model.model.", "") + ".weight"
        want = w0[name] + (2 * lora_rank / lora_rank) * b @ a
        torch.testing.assert_close(params[name], want, rtol=1e-6, atol=1e-6)
    assert json.loads((tmp_path / "x" / "config.json").read_text())["prompt_template"] == "{input}"
    assert json.loads((tmp_path / "x" / "training_args.json").read_text())["step"] == 2
    # not a checkpoint: one clear line, nothing written
    code = main(["export", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "y")])
    assert code != 0 and "is not a training checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_lossless_stage_warm_starts_streams_of_a_shared_checkpoint(tmp_path, base, data, capsys):
    from safetensors.torch import load_file

    first = tmp_path / "shared"
    run_training(args(base, data, first, mode="shared", lora_rank=0, max_steps=3))
    second = tmp_path / "lossless"
    run_training(args(first, data, second, mode="lossless", lora_rank=4, max_steps=1, lr=1e-9))
    assert "Warm start from" in capsys.readouterr().err
    a, b = load_file(str(first / EXTRAS_FILE)), load_file(str(second / EXTRAS_FILE))
    torch.testing.assert_close(b["stream_embeddings"], a["stream_embeddings"], rtol=0, atol=1e-6)
    assert any(k.startswith("stream_lora.") for k in b) and not any(k.startswith("stream_lora.") for k in a)
    x = torch.tensor([[3, 5, 7, 9, 11]])
    main_a = _logits(SpecStreamLM.from_pretrained(first), x).main_logits
    main_b = _logits(SpecStreamLM.from_pretrained(second), x).main_logits
    torch.testing.assert_close(main_b, main_a, rtol=0, atol=0)  # the main stream is untouched
