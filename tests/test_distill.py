"""`specstream distill`: rows re-tokenize (as the trainer tokenizes them) to exactly the ids the
model generated, batched generation equals unbatched greedy decoding, resume and overwrite
rules, error messages, the PyTorch backend, the CLI."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import pytest

from mlx_specstream import load, stream_generate
from mlx_specstream.cli.main import main, wants_fast_blas
from mlx_specstream.datasets import Example, read_jsonl
from mlx_specstream.distill import _OrderedWriter, distill, rejected_path_for, training_ids
from mlx_specstream.testing import write_tiny_model_dir

E2E = ["name[The Eagle], eatType[pub], food[French], priceRange[moderate]",
       "name[Alimentum], area[city centre]",
       "name[The Rice Boat], food[Italian], customer rating[high], area[riverside], familyFriendly[yes], "
       "near[Rainbow Vegetarian Café]",
       "name[Zizzi], eatType[coffee shop]",
       "name[Blue Spice], priceRange[cheap], near[Burger King]"]
CHATS = [[{"role": "user", "content": "hello"}],
         [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2+2?"}],
         [{"role": "user", "content": "a much longer question, so the prompts differ in length"},
          {"role": "assistant", "content": "an old reply, generated again"}],
         [{"role": "user", "content": "x"}]]


EOS_SCALE = 3.0  # so that some replies end before max_tokens
MAXT = 16  # the demo: some replies end before it, some are cut


def text_head_scale(tokenizer, vocab):
    """Per-token factors for a random LM head so that it writes text: printable ASCII bytes keep
    their rows, EOS's grows, every other row becomes 0 (logit 0: an ASCII byte almost surely
    scores higher). A random head emits invalid UTF-8, which no text re-tokenizes to."""
    def printable(i):
        return i < 256 and tokenizer.decode([i]).isascii() and tokenizer.decode([i]).isprintable()

    return [1.0 if printable(i) else EOS_SCALE if i == tokenizer.eos_token_id else 0.0 for i in range(vocab)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trainer_ids(tokenizer, path):
    """The trainer's input ids of every row of an output file (mlx_specstream.train.data)."""
    from mlx_specstream.train_common.data import tokenize_example

    return [tokenize_example(tokenizer, ex, 10**6).input_ids for ex in read_jsonl(path).examples]


def reference(model_dir, rows, max_tokens):
    """(prompt ids, generated ids, stop token or None) per row: one prompt at a time, plain decoding."""
    model, wrapper = load(model_dir)
    tok = wrapper._tokenizer
    out = []
    for row in rows:
        if "messages" in row:
            text = tok.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(row["prompt"])["input_ids"]
        gen, last = [], None
        for last in stream_generate(model, wrapper, ids, max_tokens=max_tokens, speculate=False):
            gen += last.token_ids
        stop = tok.eos_token_id if last.finish_reason == "stop" else None
        out.append((ids, gen, stop))
    return tok, out


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo model (prompt template, no chat template) on five E2E inputs."""
    d = tmp_path_factory.mktemp("demo")
    prompts = write_jsonl(d / "prompts.jsonl", [{"prompt": p} for p in E2E])
    result = distill(None, prompts, d / "out.jsonl", max_tokens=MAXT, batch_size=3, progress=False)
    return prompts, d / "out.jsonl", result


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    """A tiny llama with a chat template whose head can only pick ASCII bytes or EOS, so its
    replies are text (a random head emits invalid UTF-8)."""
    from transformers import AutoTokenizer

    path = write_tiny_model_dir(tmp_path_factory.mktemp("chat") / "llama", "llama")
    weights = dict(mx.load(str(path / "model.safetensors")))
    head = weights["lm_head.weight"]
    scale = mx.array(text_head_scale(AutoTokenizer.from_pretrained(path), head.shape[0]))[:, None]
    weights["lm_head.weight"] = head * scale
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    return path


def test_prompt_rows_retokenize_to_the_generated_ids(demo_run):
    _, out, result = demo_run
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(E2E))) and result.written == len(E2E)
    assert all(r["prompt"].startswith("Describe the restaurant") and E2E[r["index"]] in r["prompt"] for r in rows)
    assert all(r["exact"] for r in rows) and result.inexact == result.rejected == 0
    tok, ref = reference(None, rows, MAXT)
    assert {r["finish_reason"] for r in rows} == {"stop", "length"}  # both endings covered
    for row, ids, (p, gen, stop) in zip(rows, trainer_ids(tok, out), ref):
        assert row["finish_reason"] == ("stop" if stop is not None else "length")
        want = p + gen + ([stop] if stop is not None else [])  # batched == unbatched greedy
        assert ids == want  # a reply cut at --max-tokens gets no EOS the model never produced


def test_chat_rows_retokenize_to_the_generated_ids(chat_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS])
    out = tmp_path / "out.jsonl"
    result = distill(chat_dir, prompts, out, max_tokens=24, batch_size=4, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert result.written == len(CHATS) and all(r["exact"] for r in rows)
    assert rows[2]["messages"][:-1] == CHATS[2][:1]  # the old reply was replaced
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
    tok, ref = reference(chat_dir, rows, 24)
    assert {stop for *_, stop in ref} == {None, tok.eos_token_id}  # both endings covered
    for ids, (p, gen, stop) in zip(trainer_ids(tok, out), ref):
        want = p + gen + ([stop] if stop is not None else [])
        if stop is None:  # cut at the limit: neither EOS nor the template's end of turn follows
            assert ids == want
        else:  # the template may close the turn with more tokens
            assert ids[: len(want)] == want


def test_batched_equals_unbatched(demo_run, tmp_path):
    prompts, full, _ = demo_run  # written with batch_size 3
    for batch_size in (1, 5):  # one prompt at a time; all prompts prefilled together, left-padded
        out = tmp_path / f"b{batch_size}.jsonl"
        distill(None, prompts, out, max_tokens=MAXT, batch_size=batch_size, progress=False)
        assert out.read_bytes() == full.read_bytes(), batch_size


def test_sampling_is_reproducible_with_a_seed(demo_run, tmp_path):
    prompts, full, _ = demo_run
    outs = [tmp_path / f"s{i}.jsonl" for i in range(3)]
    for out, seed in zip(outs, (7, 7, 8)):
        distill(None, prompts, out, max_tokens=MAXT, temp=1.0, top_p=0.9, seed=seed, batch_size=3, progress=False)
    assert outs[0].read_bytes() == outs[1].read_bytes() != outs[2].read_bytes()
    assert outs[0].read_bytes() != full.read_bytes()


def test_training_ids_agree_with_the_trainer(chat_dir, demo_run):
    from mlx_specstream.train_common.data import tokenize_example

    _, wrapper = load(chat_dir)
    chat_tok = wrapper._tokenizer
    _, wrapper = load()
    demo_tok = wrapper._tokenizer
    cases = [(demo_tok, {"prompt": "Describe the restaurant.\nDescription:", "completion": " A pub."}),
             (demo_tok, {"prompt": "Descrip", "completion": "tion: merges across the boundary"}),
             (chat_tok, {"prompt": "ab", "completion": "cd"}),
             (chat_tok, {"messages": CHATS[1] + [{"role": "assistant", "content": "4"}]})]
    for tok, row in cases:
        ex = Example(prompt="", completion=row["messages"][-1]["content"], messages=tuple(row["messages"])) \
            if "messages" in row else Example(prompt=row["prompt"], completion=row["completion"])
        p, c = training_ids(tok, row)
        assert p + c == tokenize_example(tok, ex, 10**6).input_ids


def test_inexact_rows_are_flagged_or_moved(tmp_path):
    path = write_tiny_model_dir(tmp_path / "random", "llama")  # a random head: invalid UTF-8 bytes
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"prompt {i}"} for i in range(6)])
    kept = distill(path, prompts, tmp_path / "kept.jsonl", max_tokens=16, batch_size=6, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert kept.written == 6 and kept.inexact == sum(not r["exact"] for r in rows) > 0
    out = tmp_path / "exact.jsonl"
    moved = distill(path, prompts, out, max_tokens=16, batch_size=6, exact_only=True, progress=False)
    rejected = [json.loads(line) for line in rejected_path_for(out).read_text().splitlines()]
    assert rejected_path_for(out).name == "exact.rejected.jsonl"
    assert moved.rejected == len(rejected) == kept.inexact and moved.written == 6 - kept.inexact
    assert all(r["exact"] for r in map(json.loads, out.read_text().splitlines()))
    tok = load(path)[1]._tokenizer
    for r in rejected:  # the trainer would not see the generated ids
        assert r["reason"] == "inexact" and rows[r["index"]]["exact"] is False
        p, c = training_ids(tok, r)
        assert c[: len(r["token_ids"])] != r["token_ids"]
    # resuming counts the rejects file's rows as done
    with pytest.raises(FileExistsError, match="already holds"):
        distill(path, prompts, out, max_tokens=16, exact_only=True, progress=False)


def test_resume_after_interruption_gives_the_uninterrupted_file(demo_run, tmp_path, monkeypatch):
    prompts, full, _ = demo_run
    expected = full.read_bytes()
    # a run killed while writing its third row: two whole lines and part of one
    lines = expected.split(b"\n")
    out = tmp_path / "cut.jsonl"
    out.write_bytes(b"\n".join(lines[:2]) + b"\n" + lines[2][:17])
    with pytest.warns(UserWarning, match="partly written"):
        r = distill(None, prompts, out, max_tokens=MAXT, batch_size=2, progress=False)
    assert r.resumed == 2 and r.written == len(E2E) - 2 and out.read_bytes() == expected

    # a run interrupted after its first written rows (Ctrl-C), then run again
    real_flush, out2 = _OrderedWriter.flush, tmp_path / "interrupted.jsonl"

    def flush_then_stop(self, result):
        real_flush(self, result)
        if result.written:
            raise KeyboardInterrupt

    monkeypatch.setattr(_OrderedWriter, "flush", flush_then_stop)
    with pytest.raises(KeyboardInterrupt):
        distill(None, prompts, out2, max_tokens=MAXT, batch_size=3, progress=False)
    monkeypatch.undo()
    assert 0 < len(out2.read_bytes().splitlines()) < len(E2E)
    distill(None, prompts, out2, max_tokens=MAXT, batch_size=3, progress=False)
    assert out2.read_bytes() == expected


def test_refuses_to_overwrite_a_finished_file(demo_run, tmp_path):
    prompts, full, _ = demo_run
    out = tmp_path / "out.jsonl"
    shutil.copy(full, out)
    with pytest.raises(FileExistsError, match="already holds the rows of all 5 prompts; pass --overwrite"):
        distill(None, prompts, out, max_tokens=MAXT, progress=False)
    out.write_text(out.read_text().replace("Describe", "Explain", 1))  # another data set's row
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:3]))
    with pytest.raises(ValueError, match="another prompt than line 1"):
        distill(None, prompts, out, max_tokens=MAXT, progress=False)
    r = distill(None, prompts, out, max_tokens=MAXT, batch_size=5, overwrite=True, progress=False)
    assert r.resumed == 0 and out.read_bytes() == full.read_bytes()
    other, line = tmp_path / "train.jsonl", '{"prompt": "a", "completion": "b"}'  # not a distill output
    for text, message in [(line, "not a distill row"), (line + "\n", "no 'index' field")]:
        other.write_text(text)
        with pytest.raises(ValueError, match=message):
            distill(None, prompts, other, max_tokens=MAXT, progress=False)
        assert other.read_text() == text  # left as it was


@pytest.mark.parametrize("content, message", [
    (None, "Prompts file not found"),
    ('{"prompt": "a"}\n{"prompt": "b",}\n', "line 2: not valid JSON"),
    ("", "contains no prompts"),
    ('{"prompt": "a"}\n{"messages": [{"role": "user", "content": "b"}]}\n', "line 2: mixes chat"),
    ('{"text": "a"}\n', "line 1: expected a 'prompt' string or a 'messages' list"),
    ('{"messages": [{"role": "user", "content": "b"}]}\n', "line 1: chat ('messages') rows need a tokenizer "
                                                           "with a chat template"),
])
def test_errors_name_the_problem(tmp_path, capsys, content, message):
    prompts = tmp_path / "p.jsonl"
    if content is not None:
        prompts.write_text(content)
    code = main(["distill", "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and message in err and err.strip().splitlines()[-1].startswith("error: "), err
    assert not (tmp_path / "o.jsonl").exists()  # nothing written


def test_missing_output_folder(demo_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; create it"):
        distill(None, demo_run[0], tmp_path / "no" / "out.jsonl", progress=False)


def test_cli_writes_the_same_rows(demo_run, tmp_path, capsys):
    prompts, full, _ = demo_run
    out = tmp_path / "cli.jsonl"
    code = main(["distill", "--prompts", str(prompts), "--output", str(out), "--max-tokens", str(MAXT), "-b", "4"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert out.read_bytes() == full.read_bytes()
    assert "distill: 5/5 rows" in err and f"Wrote 5 rows to {out}" in err and "cut at --max-tokens" in err


def test_torch_backend_runs_without_a_preloaded_blas():
    assert not wants_fast_blas(["distill", "--backend", "torch", "--prompts", "p.jsonl", "-o", "o.jsonl"])
    assert not wants_fast_blas(["distill", "--backend=torch"])
    assert wants_fast_blas(["distill", "--prompts", "torch", "-o", "o.jsonl"])  # MLX: OpenBLAS helps


def test_torch_backend_on_a_tiny_hf_checkpoint(tmp_path):
    import torch

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlx_specstream.train.tiny import save_tiny_checkpoint

    from safetensors.torch import load_file, save_file

    path = save_tiny_checkpoint("llama", tmp_path / "hf", prompt_template="Q: {input}\nA:")
    weights = load_file(path / "model.safetensors")
    scale = text_head_scale(AutoTokenizer.from_pretrained(path), weights["lm_head.weight"].shape[0])
    weights["lm_head.weight"] *= torch.tensor(scale)[:, None]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    texts = ["hello", "a longer prompt, so the batch is padded", "x", "what is 2+2?", "tiny"]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": t} for t in texts])
    outs = []
    for batch_size in (1, 3):
        out = tmp_path / f"b{batch_size}.jsonl"
        distill(path, prompts, out, backend="torch", device="cpu", max_tokens=12, batch_size=batch_size,
                progress=False)
        outs.append(out)
    assert outs[0].read_bytes() == outs[1].read_bytes()  # left-padded batches == one prompt at a time
    tok, hf = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = [json.loads(line) for line in outs[1].read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(5)) and all(r["exact"] for r in rows)
    assert {r["finish_reason"] for r in rows} == {"stop", "length"}
    for r, text in zip(rows, texts):
        assert r["prompt"] == f"Q: {text}\nA:"  # the checkpoint's prompt_template
        ids = tok(r["prompt"])["input_ids"]
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                          pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()  # ends in EOS if it stopped
        p, c = training_ids(tok, r)
        assert p == ids and c[: len(ref)] == ref
