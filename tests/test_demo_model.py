"""The bundled demo model loads by default, applies its prompt template, and is lossless."""

from mlx_specstream import load, stream_generate
from mlx_specstream.prompting import format_prompt

MR = "name[The Eagle], eatType[coffee shop], food[French], area[riverside], near[Burger King]"


def _tokens_and_rate(model, tok, prompt, **kwargs) -> tuple[list[int], float]:
    """40 tokens of the demo's generation and its tokens per step."""
    ids = []
    for r in stream_generate(model, tok, prompt, max_tokens=40, **kwargs):
        ids += r.token_ids
    return ids, r.tokens_per_step


def test_demo_model_default_and_lossless():
    model, tok = load()
    assert model.num_streams == 4 and model.spec.default_tree
    prompt = format_prompt(model, MR)
    assert prompt.startswith("Describe the restaurant") and MR in prompt
    runs = {}
    for speculate in (True, False):
        ids, text = [], ""
        for r in stream_generate(model, tok, prompt, max_tokens=60, speculate=speculate):
            ids += r.token_ids
            text += r.text
        runs[speculate] = (ids, text, r)
    assert runs[True][0] == runs[False][0]
    assert "The Eagle" in runs[True][1]
    assert runs[True][2].tokens_per_step > 1.0


def test_a_model_tuned_to_plain_decoding_decodes_without_speculation_unless_asked():
    """``"speculate": false`` (what `specstream tune` saves when no tree beat plain decoding)
    makes plain decoding the default; ``speculate=True`` or a tree still drafts, with the
    same tokens."""
    model, tok = load()
    prompt = format_prompt(model, MR)

    assert model.spec.speculate is None
    default_ids, default_rate = _tokens_and_rate(model, tok, prompt)
    assert default_rate > 1.0
    model.spec.speculate = False
    try:
        plain_ids, plain_rate = _tokens_and_rate(model, tok, prompt)
        asked_ids, asked_rate = _tokens_and_rate(model, tok, prompt, speculate=True)
        tree_ids, tree_rate = _tokens_and_rate(model, tok, prompt, tree="1,1")
    finally:
        model.spec.speculate = None
    assert plain_rate == 1.0 and asked_rate > 1.0 and tree_rate > 1.0
    assert plain_ids == asked_ids == tree_ids == default_ids


def test_plain_decoding_tuned_on_another_device_still_speculates_here():
    """A ``"speculate": false`` whose ``tuned_on`` names another device (a model tuned on a
    CPU, then copied to a Mac) is not applied: the demo drafts, warns, and stays lossless;
    tuned on this device, it decodes plainly."""
    import pytest

    from mlx_specstream.device import describe_device

    model, tok = load()
    prompt = format_prompt(model, MR)

    model.spec.speculate = False
    try:
        model.spec.tuned_on = "gpu: Apple M9 Imaginary (applegpu_g99)"
        with pytest.warns(UserWarning, match="so it speculates here"):
            other_ids, other_rate = _tokens_and_rate(model, tok, prompt)
        model.spec.tuned_on = describe_device()
        here_ids, here_rate = _tokens_and_rate(model, tok, prompt)
    finally:
        model.spec.speculate = model.spec.tuned_on = None
    assert other_rate > 1.0 and here_rate == 1.0 and other_ids == here_ids
