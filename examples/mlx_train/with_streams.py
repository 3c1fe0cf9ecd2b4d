"""Write a model directory made of one directory's base (e.g. a 4-bit copy) and another's
streams (trained on the float base), so tools that take one ``--model`` (``specstream bench``)
can run it. ``mlx_specstream.load(base, streams=streams_dir)`` does the same in memory.

    python examples/mlx_train/with_streams.py --base runs/stories260k/base_q4 \
        --streams runs/stories260k/lossless_mlx --output runs/stories260k/lossless_q4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from mlx_specstream.config import CONFIG_KEY, EXTRAS_FILE, read_config
from mlx_specstream.loading import load_model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--streams", required=True)
    ap.add_argument("--output", required=True)
    args = ap.parse_args(argv)
    base, streams, out = Path(args.base), Path(args.streams), Path(args.output)
    load_model(base, streams=streams)  # refuses streams trained on another base
    out.mkdir(parents=True, exist_ok=False)
    for src in base.iterdir():
        if src.is_file() and src.name not in ("config.json", EXTRAS_FILE):
            shutil.copy2(src, out / src.name)
    config = read_config(base)
    trained = read_config(streams)
    config[CONFIG_KEY] = {k: v for k, v in trained[CONFIG_KEY].items() if k not in ("speculate", "tuned_on")}
    if "prompt_template" in trained:
        config["prompt_template"] = trained["prompt_template"]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copy2(streams / EXTRAS_FILE, out / EXTRAS_FILE)
    load_model(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    os.environ.setdefault("SPECSTREAM_NO_OPENBLAS", "1")
    main()
