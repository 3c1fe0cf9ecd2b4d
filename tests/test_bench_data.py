"""Benchmark inputs: E2E grouping by MR, DialogSum references, generic JSONL, gzip, errors with line
numbers, prompt formatting; and the metrics on hand-checked examples."""

from __future__ import annotations

import csv
import gzip
import json
import types

import pytest

from mlx_specstream.bench import bench_prompt, exact_match, load_bench_data, rouge
from mlx_specstream.bench.metrics import quality
from mlx_specstream.datasets import E2E_PROMPT_TEMPLATE, shared_dir

E2E_ROWS = [
    ("name[A], food[Thai]", "A serves Thai food."),
    ("name[B], area[riverside]", "B is by the river."),
    ("name[A], food[Thai]", "Thai food at A."),
    ("name[C]", "C."),
]


def write_csv(path, rows, header=("mr", "ref")):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_jsonl(path, objs):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for o in objs:
            f.write((o if isinstance(o, str) else json.dumps(o)) + "\n")
    return path


@pytest.mark.parametrize("name", ["e2e.csv", "e2e.csv.gz"])
def test_e2e_groups_references_by_mr_in_file_order(tmp_path, name):
    data = load_bench_data(write_csv(tmp_path / name, E2E_ROWS))
    assert data.format == "e2e" and data.metric == "rouge"
    assert [ex.input for ex in data.examples] == ["name[A], food[Thai]", "name[B], area[riverside]", "name[C]"]
    assert data.examples[0].references == ("A serves Thai food.", "Thai food at A.")
    assert len(load_bench_data(tmp_path / name, num_samples=2).examples) == 2


def test_e2e_official_test_split_has_630_mrs():
    shared = shared_dir()
    path = shared / "data/e2e/testset_w_refs.csv.gz" if shared else None
    if path is None or not path.is_file():
        pytest.skip("shared E2E test split not present (../shared/data/e2e)")
    data = load_bench_data(path)
    assert len(data.examples) == 630
    assert sum(len(ex.references) for ex in data.examples) == 4693


def test_dialogsum_test_style_references(tmp_path):
    rows = [{"fname": "t1", "dialogue": "#P1#: Hi.\n#P2#: Hello.", "summary1": "They greet.",
             "summary2": "Two people say hi.", "summary3": "Greetings."},
            {"fname": "t2", "dialogue": "#P1#: Bye.", "summary": "One leaves."}]
    data = load_bench_data(write_jsonl(tmp_path / "test.jsonl.gz", rows))
    assert data.format == "dialogsum" and data.metric == "rouge"
    assert data.examples[0].references == ("They greet.", "Two people say hi.", "Greetings.")
    assert data.examples[1].references == ("One leaves.",)


def test_generic_jsonl_reference_forms(tmp_path):
    rows = [{"prompt": "a", "reference": "x"}, {"prompt": "b", "references": ["y", "z"]},
            {"prompt": "c", "completion": " w"}]
    data = load_bench_data(write_jsonl(tmp_path / "g.jsonl.gz", rows))
    assert data.format == "jsonl" and data.metric == "exact_match"
    assert [ex.references for ex in data.examples] == [("x",), ("y", "z"), (" w",)]
    bare = load_bench_data(write_jsonl(tmp_path / "bare.jsonl", [{"prompt": "a"}, {"prompt": "b"}]))
    assert bare.metric is None and bare.examples[1].input == "b"


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a", "reference": "x"}', '{"prompt": "b", '], "line 2: not valid JSON"),
    (['{"prompt": "a"}', '{"prompt": "b"}', '{"text": "c"}'], "line 3: expected a non-empty string 'prompt'"),
    (['{"prompt": "a", "reference": "x"}', '{"prompt": "b"}'], "line 2: some lines have a 'reference'"),
    (['{"prompt": "a", "references": []}'], "line 1: 'references' must be a non-empty list"),
    (['{"prompt": "a"}', '', '{"prompt": "b"}'], "line 2: empty line"),
])
def test_malformed_jsonl_names_the_line(tmp_path, lines, message):
    with pytest.raises(ValueError, match=message):
        load_bench_data(write_jsonl(tmp_path / "bad.jsonl", lines))


def test_malformed_csv_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="line 3: empty 'mr' or 'ref'"):
        load_bench_data(write_csv(tmp_path / "bad.csv", [("name[A]", "A."), ("name[B]", "")]))
    with pytest.raises(ValueError, match="columns 'mr' and 'ref'"):
        load_bench_data(write_csv(tmp_path / "cols.csv", [("x", "y")], header=("a", "b")))
    with pytest.raises(FileNotFoundError, match="Data file not found"):
        load_bench_data(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="num-samples"):
        load_bench_data(tmp_path / "cols.csv", num_samples=0)


def test_prompt_uses_the_models_template_else_the_datasets(tmp_path):
    data = load_bench_data(write_csv(tmp_path / "e2e.csv", E2E_ROWS))
    ex = data.examples[2]
    plain = types.SimpleNamespace(config={})
    assert bench_prompt(plain, ex, data) == E2E_PROMPT_TEMPLATE.replace("{input}", "name[C]")
    templated = types.SimpleNamespace(config={"prompt_template": "MR: {input} ->"})
    assert bench_prompt(templated, ex, data) == "MR: name[C] ->"


def test_rouge_on_hand_examples():
    # 5 of 6 unigrams shared both ways: P = R = F = 5/6
    assert rouge(["the cat sat on the mat"], [["the cat is on the mat"]])["rouge1"] == pytest.approx(500 / 6)
    # Porter stemming: cats/cat, running/run match; were/was do not -> 3/4
    assert rouge(["The cats were running"], [["the cat was run"]])["rouge1"] == pytest.approx(75.0)
    # the best reference counts: P = 1, R = 3/4 -> F = 6/7
    assert rouge(["x y z"], [["x q r", "x y z w"]])["rouge1"] == pytest.approx(600 / 7)
    # Lsum is sentence-level: reordered sentences still match fully (plain LCS would give 50)
    assert rouge(["a b. c d."], [["c d. a b."]])["rougeLsum"] == pytest.approx(100.0)
    two = rouge(["a b", "c d"], [["a b"], ["x y"]])
    assert two == {"rouge1": pytest.approx(50.0), "rougeLsum": pytest.approx(50.0)}


def test_exact_match_and_quality_dispatch():
    assert exact_match([" yes ", "no", "maybe"], [["yes"], ["nope", "no"], ["perhaps"]]) == pytest.approx(2 / 3)
    assert quality("exact_match", ["a"], [["a"]]) == {"exact_match": 1.0}
    assert set(quality("rouge", ["a"], [["a"]])) == {"rouge1", "rougeLsum"}
    assert quality(None, ["a"], [()]) == {}
    with pytest.raises(ValueError):
        exact_match(["a"], [])
