"""Train speculative streams in MLX from the command line (until ``specstream train --backend mlx``
exists): every option of :class:`mlx_specstream.mlx_train.TrainOptions` as ``--name value``.

    python examples/mlx_train/train.py --model runs/stories260k/base \
        --data runs/stories260k/data/train.jsonl --output runs/stories260k/lossless_mlx \
        --mode lossless --streams 4 --msa-layers 2 --epochs 3 --lr 1e-3 --batch-size 16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing

from mlx_specstream.mlx_train import TrainOptions, train


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(TrainOptions)
    for f in dataclasses.fields(TrainOptions):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        required = f.default is dataclasses.MISSING
        if kind is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
            continue
        args = typing.get_args(kind)
        base = next((a for a in args if a is not type(None)), kind)
        if "tuple" in str(base):  # lora_targets: comma-separated names
            ap.add_argument(flag, type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()), default=None)
        else:
            ap.add_argument(flag, type=base, required=required, default=None if required else f.default)
    return ap


def main(argv=None) -> None:
    from mlx_specstream.blas import warn_if_slow_blas

    warn_if_slow_blas()
    opts = vars(_parser().parse_args(argv))
    result = train(opts.pop("model"), opts.pop("data"), opts.pop("output"), **opts)
    m = result.metrics
    print(json.dumps({"output": str(result.output_dir), "steps": m["steps"], "eval": m["eval"],
                      "seconds_per_step": m["seconds_per_step"], "peak_memory_bytes": m["peak_memory_bytes"]},
                     indent=2))


if __name__ == "__main__":
    main()
