"""`specstream generate` end to end through a real process."""

import json
import subprocess
import sys

import pytest

from mlx_specstream.testing import write_tiny_model_dir

JSON_KEYS = {
    "text", "tokens", "prompt_tokens", "generation_tokens", "decode_steps",
    "tokens_per_step", "decode_tokens_per_sec", "peak_memory_gb", "speculate",
}


def run(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "mlx_specstream", "generate", *args],
        capture_output=True, text=True, input=stdin, timeout=120,
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(write_tiny_model_dir(tmp_path_factory.mktemp("cli") / "m", "llama"))


def test_json_output_is_one_object_and_lossless(model_dir):
    ss = run("--model", model_dir, "--prompt", "abc", "--max-tokens", "40", "--json", "--tree", "2,2")
    assert ss.returncode == 0, ss.stderr
    out = json.loads(ss.stdout)
    assert set(out) == JSON_KEYS
    assert out["speculate"] is True and out["generation_tokens"] == len(out["tokens"]) <= 40
    ar = json.loads(run("--model", model_dir, "--prompt", "abc", "--max-tokens", "40", "--json", "--no-speculate").stdout)
    assert ar["speculate"] is False and ar["tokens"] == out["tokens"] and ar["text"] == out["text"]
    assert ar["decode_steps"] >= out["decode_steps"]


def test_prompt_lookup_on_a_model_without_streams(tmp_path):
    plain = str(write_tiny_model_dir(tmp_path / "plain", "qwen2", spec=None))
    prompt = "abcabcabcabcabc"
    ar = json.loads(run("--model", plain, "--prompt", prompt, "--max-tokens", "30", "--json").stdout)
    pl = run("--model", plain, "--prompt", prompt, "--max-tokens", "30", "--json", "--lookup", "4")
    assert pl.returncode == 0, pl.stderr
    out = json.loads(pl.stdout)
    assert out["tokens"] == ar["tokens"] and ar["speculate"] is False and out["speculate"] is True


def test_streams_text_with_stats_line_and_stdin(model_dir):
    r = run("--model", model_dir, "--prompt", "-", "--max-tokens", "12", stdin="hello")
    assert r.returncode == 0, r.stderr
    assert "tokens/step" in r.stdout.splitlines()[-1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/model", "--prompt", "x"], "does not exist"),
        (["--prompt", "x", "--tree", "2,x"], "Malformed tree spec"),
        (["--prompt", "x", "--tree", "1,1,1,1,1"], "speculative streams"),
        (["--prompt", "x", "--temp", "-1"], "temp must be"),
    ],
)
def test_bad_input_clear_error(model_dir, args, message):
    if "--model" not in args:
        args = ["--model", model_dir, *args]
    r = run(*args)
    assert r.returncode != 0
    assert message in r.stderr + r.stdout
    assert "Traceback" not in r.stderr


def test_speculate_follows_the_model_unless_the_option_says(model_dir, tmp_path):
    """A model saved with ``"speculate": false`` (tuned to plain decoding) generates without
    speculation by default; ``--speculate`` or ``--tree`` drafts anyway, ``--no-speculate``
    never does."""
    import shutil

    d = tmp_path / "plain_default"
    shutil.copytree(model_dir, d)
    config = json.loads((d / "config.json").read_text())
    config["speculative_streaming"]["speculate"] = False
    (d / "config.json").write_text(json.dumps(config))
    outs = {}
    for name, extra in (("default", []), ("speculate", ["--speculate"]), ("tree", ["--tree", "2"]),
                        ("no", ["--no-speculate"])):
        done = run("--model", str(d), "--prompt", "abc", "--max-tokens", "12", "--json", *extra)
        assert done.returncode == 0, done.stderr
        outs[name] = json.loads(done.stdout)
    assert [outs[n]["speculate"] for n in ("default", "speculate", "tree", "no")] == [False, True, True, False]
    assert outs["default"]["tokens_per_step"] == 1.0 and outs["default"]["decode_steps"] == outs["no"]["decode_steps"]
    assert len({tuple(o["tokens"]) for o in outs.values()}) == 1

    config["speculative_streaming"]["tuned_on"] = "gpu: Apple M9 Imaginary (applegpu_g99)"  # tuned elsewhere
    (d / "config.json").write_text(json.dumps(config))
    done = run("--model", str(d), "--prompt", "abc", "--max-tokens", "12", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["speculate"] is True
    assert "tuned on (gpu: Apple M9 Imaginary (applegpu_g99))" in done.stderr and "specstream tune" in done.stderr
    assert "warning: This model's config" in done.stderr and "UserWarning" not in done.stderr  # one plain line
