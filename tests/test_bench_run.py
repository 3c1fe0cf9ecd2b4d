"""``specstream bench`` on a tiny random model: timing conventions on hand-made steps, the JSON keys
and their sanity, lossless greedy outputs, the baselines, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest

from mlx_specstream.bench import report
from mlx_specstream.bench.baselines import Mode, parse_baselines
from mlx_specstream.bench.runner import Run, decode_rates, summarize, time_generation
from mlx_specstream.cli.main import main
from mlx_specstream.testing import write_tiny_model_dir

from test_bench_data import E2E_ROWS, write_csv, write_jsonl

TOP_KEYS = {
    "speedup", "tokens_per_step", "identical_fraction", "ar_decode_tokens_per_sec", "ss_decode_tokens_per_sec",
    "ar_peak_memory_gb", "ss_peak_memory_gb", "num_samples", "baselines", "ar_latency_s", "ss_latency_s",
    "stream_acceptance", "tokens_per_step_distribution", "speedup_per_repeat", "modes", "settings",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return dict(
        model=str(write_tiny_model_dir(root / "m", "llama")),
        draft=str(write_tiny_model_dir(root / "d", "llama", spec=None, num_hidden_layers=1, seed=3)),
        e2e=str(write_csv(root / "e2e.csv.gz", E2E_ROWS)),
        generic=str(write_jsonl(root / "g.jsonl", [{"prompt": "abc abc abc", "reference": "abc"},
                                                    {"prompt": "the cat the cat", "reference": "x"}])),
        root=root,
    )


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- timing conventions on hand-made steps ---------------------------------------------------

def test_time_generation_splits_prefill_and_stops_at_eos_or_max_tokens():
    steps = [([5], 0), ([6, 7, 8], 2), ([9, 99, 10], 1), ([11], 0)]
    run_ = time_generation(iter(steps), max_tokens=100, eos={99})
    assert run_.tokens == [5, 6, 7, 8, 9, 99]  # EOS kept, nothing after it
    assert run_.decode_tokens == 5 and run_.accepted == [2, 1]
    capped = time_generation(iter(steps), max_tokens=3, eos=set())
    assert capped.tokens == [5, 6, 7] and capped.decode_tokens == 2 and capped.accepted == [2]
    # mlx-lm draft decoding: the first step holds several tokens, all counted as prefill
    first = time_generation(iter([([1, 2, 3], 2), ([4], 0)]), max_tokens=10, eos=set())
    assert first.decode_tokens == 1 and first.accepted == [0]


def test_summary_aggregates_total_tokens_over_total_time_then_median():
    def r(tokens, seconds, accepted):
        return Run(list(range(tokens + 1)), 0.5, seconds, tokens, accepted, 1000)

    repeats = [[r(10, 1.0, [1] * 5), r(30, 1.0, [2] * 10)],  # 40 tokens / 2 s = 20
               [r(10, 2.0, [1] * 5), r(30, 2.0, [2] * 10)],  # 10
               [r(10, 0.5, [1] * 5), r(30, 0.5, [2] * 10)]]  # 40
    assert decode_rates(repeats) == [20.0, 10.0, 40.0]
    s = summarize(Mode("x", None, 10_000), repeats, reference=repeats)
    assert s["decode_tokens_per_sec"] == 20.0
    assert s["tokens_per_step"] == pytest.approx(120 / 45)
    assert s["tokens_per_step_distribution"] == {"1": 0.0, "2": pytest.approx(1 / 3), "3": pytest.approx(2 / 3)}
    assert s["stream_acceptance"] == [1.0, pytest.approx(2 / 3)]
    assert s["identical_fraction"] == 1.0 and s["latency_s"] == 1.5 and s["peak_memory_gb"] == 11_000 / 1e9


def test_parse_baselines(files):
    assert parse_baselines(f"mlx-lm, lookup,draft:{files['draft']}") == [
        ("mlx-lm", ""), ("lookup", ""), ("draft", files["draft"])]
    assert parse_baselines(None) == []
    for bad, msg in [("medusa", "Unknown baseline"), ("draft", "Unknown baseline"), ("draft:/no/dir", "config.json"),
                     ("lookup,lookup", "twice")]:
        with pytest.raises(ValueError, match=msg):
            parse_baselines(bad)


# ---- end to end through the CLI --------------------------------------------------------------

def test_bench_json_keys_lossless_and_baselines(files, capsys, tmp_path):
    out_json = tmp_path / "r.json"
    code, out, err = run(capsys, "bench", "--model", files["model"], "--data", files["e2e"], "--num-samples", "2",
                         "--max-tokens", "12", "--tree", "2,1", "--repeats", "2", "--json", str(out_json),
                         "--baselines", f"mlx-lm,lookup,draft:{files['draft']}", "--num-draft", "2")
    assert code == 0, err
    assert "| mode | decode tok/s |" in out and "speedup" in out
    r = json.loads(out_json.read_text())
    assert TOP_KEYS <= set(r) and {"rouge1", "rougeLsum", "ar_rouge1"} <= set(r)
    assert r["num_samples"] == 2 and len(r["speedup_per_repeat"]) == 2
    assert r["identical_fraction"] == 1.0  # greedy float32: speculative output == autoregressive output
    assert r["speedup"] > 0 and r["ar_decode_tokens_per_sec"] > 0 and r["ss_decode_tokens_per_sec"] > 0
    assert 1.0 <= r["tokens_per_step"] <= 3.0  # a 2-level tree emits at most 3 tokens per step
    assert len(r["stream_acceptance"]) <= 2 and abs(sum(r["tokens_per_step_distribution"].values()) - 1) < 1e-9
    assert 0 < r["ar_peak_memory_gb"] < 0.1 and 0 < r["ss_peak_memory_gb"] < 0.1
    assert 0.0 <= r["rouge1"] <= 100.0 and r["settings"]["tree"] == "2,1" and r["settings"]["format"] == "e2e"
    names = [b["name"] for b in r["baselines"]]
    assert names == ["mlx-lm", "lookup", f"draft:{files['draft']}"]
    for b in r["baselines"]:
        assert b["identical_fraction"] == 1.0, b["name"]  # every greedy baseline reproduces AR's tokens
        assert b["decode_tokens_per_sec"] > 0 and b["ss_speedup_over"] > 0 and b["tokens_per_step"] >= 1.0
    assert r["baselines"][0]["tokens_per_step"] == 1.0  # mlx-lm generate: one token per step
    outputs = r["modes"]["ar"]["outputs"]
    assert len(outputs) == 2 and outputs == r["modes"]["ss"]["outputs"]  # texts, for cross-run comparisons
    assert report.markdown(r).splitlines()[0] == out.splitlines()[0]  # the JSON alone renders the report
    why = report.plot(r, tmp_path / "p.png")
    assert (tmp_path / "p.png").is_file() if why is None else "matplotlib" in why


def test_bench_generic_exact_match_json_to_stdout(files, capsys):
    code, out, err = run(capsys, "bench", "--model", files["model"], "--data", files["generic"], "--max-tokens", "8",
                         "--tree", "1", "--repeats", "1", "--json", "-")
    assert code == 0, err
    r = json.loads(out)  # only the JSON object on stdout
    assert r["num_samples"] == 2 and 0.0 <= r["exact_match"] <= 1.0 and "rouge1" not in r
    assert r["baselines"] == [] and r["identical_fraction"] == 1.0


@pytest.mark.parametrize("args, message", [
    (["--data", "/no/such/data.csv"], "Data file not found: /no/such/data.csv"),
    (["--baselines", "medusa"], "Unknown baseline 'medusa'"),
    (["--tree", "2,x"], "Malformed tree spec"),
    (["--tree", "1,1,1,1,1"], "speculative streams"),
    (["--tree", "2", "--tune"], "--tune chooses the tree"),
    (["--model", "/no/such/model"], "/no/such/model"),
    (["--json", "/no/such/dir/r.json"], "does not exist"),
])
def test_bad_input_is_one_clear_line(files, capsys, args, message):
    argv = ["bench", "--model", files["model"], "--data", files["e2e"], "--max-tokens", "4", *args]
    code, out, err = run(capsys, *argv)
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err
    assert "Traceback" not in err


def test_help_has_the_example(capsys):
    code, out, _ = run(capsys, "bench", "--help")
    assert code == 0 and "Example: specstream bench" in " ".join(out.split())


def test_mlx_lm_baselines_run_on_our_stream():
    """mlx-lm's generators get the default stream (with MKL, a second BLAS-calling thread slows
    every later product); a generator without a ``stream`` argument gets nothing."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step, speculative_generate_step

    from mlx_specstream.bench.baselines import _on_our_stream

    for fn in (generate_step, speculative_generate_step):
        assert _on_our_stream(fn) == {"stream": mx.default_stream(mx.default_device())}
    assert _on_our_stream(lambda prompt, model: None) == {}


def test_bench_attaches_streams_to_another_copy_of_their_base(tmp_path, capsys):
    """--streams: the streams of a float model benchmarked on its 4-bit copy, losslessly."""
    from test_loading_sources import SPEC, _quantized_plain_copy

    streams_dir = write_tiny_model_dir(tmp_path / "float", "llama", spec=SPEC, hidden_size=64)
    q_dir = _quantized_plain_copy(streams_dir, tmp_path / "q4")
    data = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "abc abc abc", "reference": "abc"}])
    code, out, err = run(capsys, "bench", "--model", str(q_dir), "--streams", str(streams_dir), "--data", str(data),
                         "--max-tokens", "16", "--repeats", "1", "--tree", "2,1", "--json", "-")
    assert code == 0, err
    r = json.loads(out)
    assert r["settings"]["num_streams"] == 3 and r["settings"]["streams"] == str(streams_dir)
    assert r["identical_fraction"] == 1.0 and r["tokens_per_step"] >= 1.0
    code, _, err = run(capsys, "bench", "--model", str(q_dir), "--streams", str(streams_dir), "--data", str(data),
                       "--tune")
    assert code != 0 and "--streams" in err and not err.count("\n") > 1
