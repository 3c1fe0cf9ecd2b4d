"""Data readers and prompt templates (pure Python: runs without torch)."""

import gzip
import json

import pytest

from mlx_specstream import datasets as ds


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_prompt_completion_jsonl(tmp_path):
    p = _write(tmp_path / "d.jsonl", [json.dumps({"prompt": "Q: 1+1\nA:", "completion": " 2"}),
                                      json.dumps({"prompt": "Q: 2+2\nA:", "completion": " 4"})])
    d = ds.load_dataset(p)
    assert d.format == "jsonl" and d.prompt_template == "{input}"
    assert [(e.prompt, e.completion) for e in d.examples] == [("Q: 1+1\nA:", " 2"), ("Q: 2+2\nA:", " 4")]
    assert len(ds.load_dataset(p, limit=1).examples) == 1


def test_chat_jsonl(tmp_path):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    p = _write(tmp_path / "c.jsonl", [json.dumps({"messages": msgs})])
    d = ds.load_dataset(p)
    assert d.format == "chat" and d.prompt_template is None
    assert d.examples[0].messages == tuple(msgs)


def test_distilled_rows_cut_at_the_limit_do_not_end(tmp_path):
    """specstream distill's rows cut at --max-tokens are unfinished: no EOS is trained after them."""
    pytest.importorskip("torch")  # the byte tokenizer lives with the PyTorch trainer's test models
    from mlx_specstream.train.tiny import byte_tokenizer
    from mlx_specstream.train_common.data import training_ids

    rows = [{"prompt": "a", "completion": " b", "finish_reason": "stop"},
            {"prompt": "a", "completion": " b", "finish_reason": "length"},
            {"prompt": "a", "completion": " b"}]
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = ds.read_jsonl(p).examples
    assert [ex.ends for ex in examples] == [True, False, True]
    tok = byte_tokenizer()
    ended, cut, plain = (training_ids(tok, ex) for ex in examples)
    assert ended == plain and ended[1][-1] == tok.eos_token_id
    assert cut[0] == ended[0] and cut[1] == ended[1][:-1]


@pytest.mark.parametrize("lines,match", [
    (['{"prompt": "a", "completion": "b"}', "", '{"prompt": "c", "completion": "d"}'], "line 2: empty line"),
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": '], "line 2: not valid JSON"),
    (['[1, 2]'], "line 1: expected a JSON object"),
    (['{"text": "a"}'], "line 1: expected keys 'prompt' and 'completion', or 'messages'"),
    (['{"prompt": "a", "completion": ""}'], "line 1: 'completion' is empty"),
    (['{"messages": [{"role": "user", "content": "x"}]}'], "line 1: the last message must be the assistant"),
    (['{"prompt": "a", "completion": "b"}',
      '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}'], "line 2: mixes"),
])
def test_malformed_jsonl_names_the_line(tmp_path, lines, match):
    p = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=match):
        ds.load_dataset(p)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no examples"):
        ds.load_dataset(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="Data file not found"):
        ds.load_dataset(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="Unknown data format"):
        ds.load_dataset(tmp_path / "empty.jsonl", format="parquet")


def test_e2e_csv_reader_and_template(tmp_path):
    p = tmp_path / "e2e.csv.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write('mr,ref\n"name[A], food[Thai]",A serves Thai food.\n"name[A], food[Thai]","Thai food, at A."\n'
                '"name[B]",B is a pub.\n')
    d = ds.load_dataset(p)
    assert d.format == "e2e" and d.prompt_template == ds.E2E_PROMPT_TEMPLATE
    assert len(d.examples) == 3
    e = d.examples[0]
    assert e.prompt == ds.format_prompt(ds.E2E_PROMPT_TEMPLATE, "name[A], food[Thai]")
    assert e.prompt.endswith("Description:") and e.completion == " A serves Thai food."
    grouped = ds.read_e2e(p, group_references=True)
    assert [x.references for x in grouped.examples] == [("A serves Thai food.", "Thai food, at A."),
                                                        ("B is a pub.",)]
    assert len(ds.read_e2e(p, group_references=True, limit=1).examples) == 1


def test_dialogsum_reader(tmp_path):
    rows = [{"fname": "t0", "dialogue": "#Person1#: Hi.\n#Person2#: Hello.", "summary1": "They greet.",
             "summary2": "Greeting.", "summary3": "Hi and hello.", "topic1": "greeting"}]
    p = _write(tmp_path / "test.jsonl", [json.dumps(r) for r in rows])
    d = ds.load_dataset(p)
    assert d.format == "dialogsum" and d.prompt_template == ds.DIALOGSUM_PROMPT_TEMPLATE
    e = d.examples[0]
    assert e.input == rows[0]["dialogue"] and e.references == ("They greet.", "Greeting.", "Hi and hello.")
    assert e.prompt == "Summarize the dialogue.\n#Person1#: Hi.\n#Person2#: Hello.\nSummary:"


def test_format_prompt_is_plain_substitution():
    assert ds.format_prompt("A {input} B", "x{y}") == "A x{y} B"
    with pytest.raises(ValueError, match="no '{input}'"):
        ds.format_prompt("no field", "x")


def test_real_shared_data_when_present():
    root = ds.shared_dir()
    if root is None or not (root / "data/e2e/devset.csv.gz").is_file():
        pytest.skip("../shared/data not found (set SPECSTREAM_SHARED)")
    e2e = ds.read_e2e(root / "data/e2e/testset_w_refs.csv.gz", group_references=True)
    assert len(e2e.examples) == 630
    dsum = ds.read_dialogsum(root / "data/dialogsum/test.jsonl.gz")
    assert len(dsum.examples) == 500 and all(len(e.references) == 3 for e in dsum.examples)
    assert len(ds.read_dialogsum(root / "data/dialogsum/dev.jsonl.gz", limit=5).examples) == 5
