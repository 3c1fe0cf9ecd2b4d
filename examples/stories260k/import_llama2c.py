"""Import a llama2.c checkpoint (e.g. Karpathy's stories260K) as a Hugging Face Llama directory.

    python examples/stories260k/import_llama2c.py \
        --checkpoint ../shared/models/stories260K/stories260K.bin \
        --tokenizer ../shared/models/stories260K/tok512.model \
        --output runs/stories260k/base

llama2.c's legacy format ("version 0"): 7 little-endian int32 (dim, hidden_dim, n_layers,
n_heads, n_kv_heads, vocab_size, seq_len; vocab_size < 0 means an untied classifier), then
float32 tensors, each an ``nn.Linear.weight`` ([out, in], row-major), in this order:

    tok_embeddings [V, D] | attention_norm [L, D] | wq [L, D, D] | wk [L, KV, D] | wv [L, KV, D]
    | wo [L, D, D] | ffn_norm [L, D] | w1 [L, H, D] | w2 [L, D, H] | w3 [L, H, D] | norm [D]
    | freq_cis_real, freq_cis_imag [S, hd/2] each (unused) | output [V, D] if untied

Transforms (the only ones; everything else is a copy under the Hugging Face name):
* wq / wk rows: llama2.c applies rotary embeddings to interleaved pairs (0,1), (2,3), ...;
  Hugging Face rotates halves (i, i + hd/2). Within each head, row 2i goes to i and row 2i+1
  to hd/2 + i.
* w1 -> gate_proj, w3 -> up_proj, w2 -> down_proj (SwiGLU: down(silu(gate(x)) * up(x))).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

HEADER = struct.Struct("<7i")
BOS_ID, EOS_ID = 1, 2
RMS_NORM_EPS = 1e-5  # llama2.c's RMSNorm epsilon
ROPE_THETA = 10000.0


def read_llama2c(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Parse a llama2.c legacy checkpoint into (header dict, Hugging Face-named float32 tensors)."""
    data = Path(path).read_bytes()
    if len(data) < HEADER.size:
        raise ValueError(f"{path} is too short to be a llama2.c checkpoint ({len(data)} bytes).")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = HEADER.unpack_from(data)
    tied = vocab > 0
    vocab = abs(vocab)
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len) <= 0 or dim % n_heads:
        raise ValueError(
            f"{path}: implausible llama2.c header {HEADER.unpack_from(data)}; "
            "expected the legacy (version 0) export format."
        )
    head_dim = dim // n_heads
    kv_dim = n_kv_heads * head_dim
    hdr = dict(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads,
               n_kv_heads=n_kv_heads, vocab_size=vocab, seq_len=seq_len, tied=tied)

    shapes = [
        ("tok_embeddings", (vocab, dim)),
        ("attention_norm", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv_dim, dim)),
        ("wv", (n_layers, kv_dim, dim)),
        ("wo", (n_layers, dim, dim)),
        ("ffn_norm", (n_layers, dim)),
        ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)),
        ("norm", (dim,)),
        ("freq_cis_real", (seq_len, head_dim // 2)),
        ("freq_cis_imag", (seq_len, head_dim // 2)),
    ]
    if not tied:
        shapes.append(("output", (vocab, dim)))
    expected = HEADER.size + 4 * sum(int(np.prod(s)) for _, s in shapes)
    if len(data) != expected:
        raise ValueError(
            f"{path}: {len(data)} bytes, but the header {hdr} implies {expected}. "
            "Is this a llama2.c legacy (version 0) checkpoint?"
        )
    raw, offset = {}, HEADER.size
    for name, shape in shapes:
        count = int(np.prod(shape))
        raw[name] = np.frombuffer(data, dtype="<f4", count=count, offset=offset).reshape(shape)
        offset += 4 * count

    tensors = {"model.embed_tokens.weight": raw["tok_embeddings"], "model.norm.weight": raw["norm"]}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = raw["attention_norm"][i]
        tensors[p + "self_attn.q_proj.weight"] = interleaved_to_halves(raw["wq"][i], n_heads)
        tensors[p + "self_attn.k_proj.weight"] = interleaved_to_halves(raw["wk"][i], n_kv_heads)
        tensors[p + "self_attn.v_proj.weight"] = raw["wv"][i]
        tensors[p + "self_attn.o_proj.weight"] = raw["wo"][i]
        tensors[p + "post_attention_layernorm.weight"] = raw["ffn_norm"][i]
        tensors[p + "mlp.gate_proj.weight"] = raw["w1"][i]
        tensors[p + "mlp.down_proj.weight"] = raw["w2"][i]
        tensors[p + "mlp.up_proj.weight"] = raw["w3"][i]
    if not tied:
        tensors["lm_head.weight"] = raw["output"]
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}

    n_params = sum(v.size for v in tensors.values())
    expected_params = (vocab * dim * (1 if tied else 2) + dim
                       + n_layers * (2 * dim + 2 * dim * dim + 2 * kv_dim * dim + 3 * dim * hidden))
    assert n_params == expected_params, (n_params, expected_params)
    return hdr, tensors


def interleaved_to_halves(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k projection rows from llama2.c's interleaved rotary layout to Hugging Face's.

    w: [n_heads * head_dim, in]. Within a head, llama2.c rotates rows (2i, 2i+1) together; HF
    rotates (i, i + head_dim/2). Example, head_dim 4: rows [a0 a1 b0 b1] -> [a0 b0 a1 b1].
    """
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


def hf_config(hdr: dict) -> dict:
    """config.json for transformers' LlamaForCausalLM and mlx-lm's llama model."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": hdr["vocab_size"],
        "hidden_size": hdr["dim"],
        "intermediate_size": hdr["hidden_dim"],
        "num_hidden_layers": hdr["n_layers"],
        "num_attention_heads": hdr["n_heads"],
        "num_key_value_heads": hdr["n_kv_heads"],
        "head_dim": hdr["dim"] // hdr["n_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": hdr["seq_len"],
        "rms_norm_eps": RMS_NORM_EPS,
        # Both spellings: transformers >= 5 reads rope_parameters, mlx-lm and transformers 4 rope_theta.
        "rope_theta": ROPE_THETA,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": hdr["tied"],
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "torch_dtype": "float32",
    }


def write_hf_tokenizer(spm_path: str | Path, out_dir: str | Path, model_max_length: int) -> None:
    """Write tokenizer.model, tokenizer.json and tokenizer_config.json for a SentencePiece BPE model.

    transformers' LlamaTokenizer (BPE with byte fallback, Metaspace) reproduces SentencePiece
    BPE models; tokenizer.json lets mlx-lm pick its SentencePiece streaming detokenizer and
    lets older transformers load without converting.
    """
    from transformers import LlamaTokenizer

    out_dir = Path(out_dir)
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
    # Built from tokenizer.model + tokenizer_config.json; save only its tokenizer.json.
    tok = LlamaTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    tok.backend_tokenizer.save(str(out_dir / "tokenizer.json"))


def import_llama2c(checkpoint: str | Path, tokenizer: str | Path, output: str | Path,
                   force: bool = False) -> Path:
    """Convert ``checkpoint`` + SentencePiece ``tokenizer`` into the HF directory ``output``.

    Written to a temporary directory beside ``output`` and renamed into place, so a crash
    never leaves a half-written model. Refuses to replace an existing ``output`` unless force.
    """
    from safetensors.numpy import save_file

    output = Path(output)
    if output.exists() and not force:
        raise FileExistsError(f"{output} already exists; pass --force to replace it.")
    if not Path(tokenizer).is_file():
        raise FileNotFoundError(f"SentencePiece model {tokenizer} not found.")
    hdr, tensors = read_llama2c(checkpoint)

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config(hdr), indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_hf_tokenizer(tokenizer, tmp, hdr["seq_len"])
        _chmod_like_umask(tmp)
        if output.exists():
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            os.rename(output, old)
            os.rename(tmp, output)
            shutil.rmtree(old)
        else:
            os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def _chmod_like_umask(directory: Path) -> None:
    """mkdtemp makes a 0700 directory; give it (and its files) the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~umask)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shared = Path(os.environ.get("SPECSTREAM_SHARED", Path(__file__).resolve().parents[2].parent / "shared"))
    ap.add_argument("--checkpoint", default=str(shared / "models/stories260K/stories260K.bin"))
    ap.add_argument("--tokenizer", default=str(shared / "models/stories260K/tok512.model"))
    ap.add_argument("--output", required=True, help="model directory to create")
    ap.add_argument("--force", action="store_true", help="replace --output if it exists")
    args = ap.parse_args(argv)
    try:
        out = import_llama2c(args.checkpoint, args.tokenizer, args.output, force=args.force)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
