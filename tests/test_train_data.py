"""Tokenization (prompt masking, EOS, chat), bucketing and collation."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from mlx_specstream.datasets import Example  # noqa: E402
from mlx_specstream.train.data import collate  # noqa: E402
from mlx_specstream.train_common.data import bucketed_batches, tokenize_all, tokenize_example  # noqa: E402
from mlx_specstream.train.layout import IGNORE_INDEX as I  # noqa: E402
from mlx_specstream.train.tiny import byte_tokenizer  # noqa: E402

BOS, EOS, PAD = 257, 258, 256


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_byte_tokenizer_round_trips_any_text(tok):
    text = "Café £30, naïve — ok\n"
    ids = tok(text)["input_ids"]
    assert ids[0] == BOS and len(ids) == 1 + len(text.encode("utf-8"))
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)) == (BOS, EOS, PAD, 259)


def test_prompt_tokens_are_masked_and_eos_is_a_target(tok):
    t = tokenize_example(tok, Example(prompt="Q:", completion=" ab"), max_length=64)
    assert t.input_ids == [BOS, ord("Q"), ord(":"), ord(" "), ord("a"), ord("b"), EOS]
    assert t.labels == [I, I, I, ord(" "), ord("a"), ord("b"), EOS]
    # the prompt is tokenized exactly as inference tokenizes the formatted prompt
    assert t.input_ids[:3] == tok("Q:")["input_ids"]


def test_truncation_and_dropping(tok):
    t = tokenize_example(tok, Example(prompt="Q:", completion=" abcdef"), max_length=5)
    assert len(t.input_ids) == 5 and t.labels[-2:] == [ord(" "), ord("a")]
    kept, dropped = tokenize_all(tok, [Example(prompt="long prompt", completion=" x"),
                                       Example(prompt="Q", completion=" y")], max_length=6)
    assert dropped == 1 and len(kept) == 1


def test_chat_examples_train_on_the_last_reply_only(tok):
    msgs = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"})
    t = tokenize_example(tok, Example(prompt="", completion="yo", messages=msgs), max_length=64)
    text = tok.decode(t.input_ids)
    assert text == "<|bos|>user: hi\nassistant: yo\n<|eos|>"
    target = tok.decode([x for x in t.labels if x != I])
    assert target == " yo\n<|eos|>"


def test_buckets_are_deterministic_cover_everything_and_group_lengths():
    lengths = [(i * 37) % 101 for i in range(200)]
    b1 = bucketed_batches(lengths, 8, seed=3, epoch=0)
    assert b1 == bucketed_batches(lengths, 8, seed=3, epoch=0)
    assert b1 != bucketed_batches(lengths, 8, seed=3, epoch=1)
    assert sorted(i for b in b1 for i in b) == list(range(200))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in b1) / len(b1)
    assert spread < 10  # vs ~90 for random batches
    b2 = bucketed_batches(lengths[:197], 8, seed=3, epoch=0, world_size=2)
    assert len(b2) % 2 == 0


def test_collate_right_pads(tok):
    a = tokenize_example(tok, Example(prompt="Q:", completion=" a"), 64)
    b = tokenize_example(tok, Example(prompt="Q:", completion=" abc"), 64)
    batch = collate([a, b], PAD)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][0, -2:].tolist() == [PAD, PAD]
    assert batch["attention_mask"].sum(1).tolist() == [6, 8]
    assert batch["labels"][0, -2:].tolist() == [I, I]
