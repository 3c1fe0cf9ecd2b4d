"""The bundled demo model loads by default, applies its prompt template, and is lossless."""

from mlx_specstream import load, stream_generate
from mlx_specstream.prompting import format_prompt

MR = "name[The Eagle], eatType[coffee shop], food[French], area[riverside], near[Burger King]"


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
