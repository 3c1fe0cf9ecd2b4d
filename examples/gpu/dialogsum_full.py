"""The DialogSum recipe in full on a CUDA machine, brought back as safetensors shards.

``run`` (on the device, PyTorch): the recipe of ``examples/dialogsum/`` with the paper's
fine-tuning budget instead of the CPU's:

1. SentencePiece tokenizer (``examples/e2e/train_tokenizer.py --format dialogsum``, vocab 4096);
2. the from-scratch Llama base (``examples/e2e/pretrain_base.py --format dialogsum``: hidden 256,
   8 layers, 7.34M parameters, 2 epochs of 16 dialogues). That script has no ``--device`` /
   ``--dtype``: this one runs its ``main()`` under ``torch.set_default_device("cuda")`` and a
   bfloat16 autocast (weights and AdamW state stay float32, as in ``specstream train``);
3. the Speculative Streaming fine-tune and the plain fine-tune, side by side on the one GPU
   (two processes; the model is tiny, so each is bound by kernel launches, not the GPU):
   ``specstream train --mode shared --lora-rank 0 --streams 4 --msa-layers 4
   --stream-loss-weight 0.1 --epochs 5 --lr 5e-4 --batch-size 32 --max-length 1536
   --device cuda --dtype bfloat16`` (the plain one with ``--streams 0``): the paper's 5 epochs and
   linear lr 5e-4 where the CPU run managed 450 steps of 1 epoch;
4. ``pack``: each model directory as safetensors shards of <= 16 MiB (Hugging Face's sharded
   layout, ``model.safetensors.index.json`` + ``model-0000k-of-0000n.safetensors``, with a sha256
   per shard) plus one ``meta.tar.gz`` of everything else (configs, tokenizers, stream extras,
   training logs), checked against what a call brings back (8 files, 16 MiB each, 64 MiB in all).

``--deadline SECONDS`` bounds the whole run: the base is stopped at its share (its newest
checkpoint, written every minute, becomes the base) and the fine-tunes at the deadline minus
the packing time (Ctrl-C, then ``specstream export`` of the newest checkpoint, saved every
``--save-every`` steps), so the call always brings a model back.

``local`` (here, MLX): unpack what came back, convert to MLX float32, benchmark the 500 test
dialogues (``--print-only`` prints the commands instead of running them).

    # device (examples/gpu/README.md, call 3):
    python3 examples/gpu/dialogsum_full.py run --data .gpu_data/dialogsum --out $OUT --deadline 240
    # here, afterwards (FROM = the call's files_at folder):
    python examples/gpu/dialogsum_full.py local --from FROM --runs runs
    # dry run of everything on this CPU at tiny size (< 2 min), or DEVICE=cpu TINY=1:
    python examples/gpu/dialogsum_full.py run --dry-run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
SHARD_BYTES = 16 * MIB  # what one file from $OUT may hold
MAX_FILES = 8           # files a call brings back
MAX_TOTAL = 64 * MIB    # bytes a call brings back
LOG_RESERVE = 1 * MIB   # room kept for the call's own log file in $OUT
MODELS = ("dialogsum_ss", "dialogsum_plain")
WEIGHT_STEM = "model"
# Dry-run sizes: a few dialogues, a model of hidden 64 and 4 layers.
TINY_DATA = {"train": 48, "dev": 8, "test": 4}
TINY_BASE = ["--hidden", "64", "--layers", "4", "--heads", "4", "--kv-heads", "2", "--intermediate", "128",
             "--batch-size", "8", "--log-every", "2", "--eval-every", "1000", "--eval-examples", "8"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sub_env() -> dict:
    """The environment of every step: this checkout importable (installed or not)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, TOKENIZERS_PARALLELISM="false")


def self_cmd(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def specstream_cli(argv: list[str]) -> int:
    """The ``specstream`` CLI from this checkout, installed or not (pyproject maps the repository's
    ``cli/`` and ``convert/`` to ``mlx_specstream.cli`` / ``.convert``)."""
    sys.path.insert(0, str(REPO))
    import mlx_specstream

    if str(REPO) not in mlx_specstream.__path__:
        mlx_specstream.__path__.append(str(REPO))
    from mlx_specstream.cli.main import main

    return main(argv)


def pretrain(device: str, dtype: str, argv: list[str]) -> int:
    """``examples/e2e/pretrain_base.py``'s main() on ``device`` (its tensors follow torch's default
    device) under an autocast of ``dtype`` (parameters and optimizer state stay float32)."""
    import contextlib
    import importlib.util

    import torch

    path = REPO / "examples" / "e2e" / "pretrain_base.py"
    spec = importlib.util.spec_from_file_location("pretrain_base", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ctx = contextlib.nullcontext()
    if device != "cpu":
        torch.set_default_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if dtype != "float32":
        ctx = torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype))
    with ctx:
        module.main(argv)
    return 0


# ---------------------------------------------------------------------------------------------
# Processes under a deadline


class Step:
    """A child process (in its own process group, so Ctrl-C reaches it and its children alone)."""

    live: list["Step"] = []

    def __init__(self, name: str, cmd: list[str]):
        self.name, self.cmd, self.start = name, cmd, time.monotonic()
        log(f"{name}: {' '.join(cmd)}")
        self.proc = subprocess.Popen(cmd, env=sub_env(), cwd=REPO, start_new_session=True)
        Step.live.append(self)

    @classmethod
    def kill_all(cls) -> None:
        """End every child still running (this process is ending: none may outlive it)."""
        for step in cls.live:
            if step.proc.poll() is None:
                os.killpg(step.proc.pid, signal.SIGKILL)
                step.proc.wait()

    def interrupt(self, grace: float = 60.0) -> int:
        """Ctrl-C (the trainers leave complete checkpoints), then wait; kill after ``grace``."""
        if self.proc.poll() is None:
            log(f"{self.name}: deadline reached after {time.monotonic() - self.start:.0f} s, interrupting")
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def wait_all(steps: list[Step], until: float | None, status=None, every: float = 30.0) -> bool:
    """Wait for every step or until ``until`` (monotonic); True when all ended by themselves."""
    last = time.monotonic()
    while any(s.proc.poll() is None for s in steps):
        now = time.monotonic()
        if until is not None and now >= until:
            return False
        if status is not None and now - last >= every:
            status()
            last = now
        time.sleep(0.5)
    return True


def checkpoints(root: Path, marker: str) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first: ``step-*`` folders holding ``marker``
    (both trainers write a hidden temporary folder and rename it when complete)."""
    return sorted(p for p in root.glob("step-*") if (p / marker).is_file())


# ---------------------------------------------------------------------------------------------
# Packing: model directories -> shards + meta.tar.gz, and back


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MIB), b""):
            h.update(chunk)
    return h.hexdigest()


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / f"{WEIGHT_STEM}.safetensors.index.json"
    if index.is_file():
        return sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = model_dir / f"{WEIGHT_STEM}.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"no {WEIGHT_STEM}.safetensors (or index) in {model_dir}")
    return [single]


def shard_plan(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Tensor names in file order, grouped greedily into shards of at most ``limit`` bytes of data
    (a safetensors header adds a few KiB: the caller leaves room for it)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes.items():
        if n > limit:
            raise ValueError(f"tensor {name} alone is {n / MIB:.1f} MiB, over the {limit / MIB:.0f} MiB shard limit")
        if shards[-1] and used + n > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def pack(models: dict[str, Path], out: Path, *, extra: dict[str, Path] | None = None,
         shard_bytes: int = SHARD_BYTES, max_files: int = MAX_FILES, max_total: int = MAX_TOTAL,
         log_reserve: int = LOG_RESERVE, header_room: int = 64 * 1024) -> dict:
    """Write each model of ``models`` ({name: HF model dir}) into ``out`` as ``out/name/model-*``
    shards and everything else into ``out/meta.tar.gz`` (with ``extra`` {arcname: file}); check the
    call's limits (files and bytes, ``log_reserve`` kept for a log file beside them). A shard holds
    at most ``shard_bytes - header_room`` bytes of tensor data (its JSON header takes the rest)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    manifest = {"models": {}, "shard_bytes": shard_bytes}
    limit = shard_bytes - header_room
    with tempfile.TemporaryDirectory() as tmp_name:
        meta_root = Path(tmp_name) / "meta"
        for name, model_dir in models.items():
            files = weight_files(model_dir)
            tensors, sizes, metadata = {}, {}, None
            for f in files:
                with safe_open(str(f), framework="pt") as st:
                    metadata = metadata or st.metadata()
                    for key in st.keys():
                        tensors[key] = st.get_tensor(key)
                        sizes[key] = tensors[key].numel() * tensors[key].element_size()
            groups = shard_plan(sizes, limit)
            (out / name).mkdir(exist_ok=True)
            weight_map, shard_info = {}, {}
            for k, group in enumerate(groups, 1):
                shard = f"{WEIGHT_STEM}-{k:05d}-of-{len(groups):05d}.safetensors"
                save_file({key: tensors[key].contiguous() for key in group}, str(out / name / shard),
                          metadata=metadata or {"format": "pt"})
                size = (out / name / shard).stat().st_size
                if size > shard_bytes:
                    raise AssertionError(f"{shard} is {size} bytes, over {shard_bytes}")
                shard_info[shard] = {"bytes": size, "sha256": sha256(out / name / shard)}
                weight_map.update({key: shard for key in group})
            index = {"metadata": {"total_size": sum(sizes.values()), "shards": shard_info}, "weight_map": weight_map}
            dest = meta_root / name
            dest.mkdir(parents=True)
            for f in sorted(model_dir.iterdir()):
                if f.is_file() and f not in files and f.name != f"{WEIGHT_STEM}.safetensors.index.json":
                    shutil.copyfile(f, dest / f.name)
            (dest / f"{WEIGHT_STEM}.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
            manifest["models"][name] = {"shards": shard_info, "parameters": sum(t.numel() for t in tensors.values()),
                                        "dtype": sorted({str(t.dtype) for t in tensors.values()})}
            del tensors
        for arc, path in (extra or {}).items():
            if path.is_file():
                (meta_root / arc).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, meta_root / arc)
        (meta_root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        with tarfile.open(out / "meta.tar.gz", "w:gz") as tar:
            tar.add(meta_root, arcname="meta")
    files = [p for p in out.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    report = {"files": len(files), "bytes": total, "manifest": manifest,
              "fits": len(files) + 1 <= max_files and total + log_reserve <= max_total
              and all(p.stat().st_size <= shard_bytes for p in files)}
    log(f"packed {len(files)} files, {total / MIB:.1f} MiB in {out} (+1 log file): "
        + ("fits" if report["fits"] else "DOES NOT FIT") + f" the call's {max_files} files / {max_total / MIB:.0f} MiB")
    if not report["fits"]:
        log("to cut: bring back the SS model only (--skip-plain), or train with --dtype bfloat16 "
            "(the trainer saves in its --dtype: half the bytes of float32)")
    return report


def unpack(src: Path, dest_root: Path, prefix: str = "gpu_") -> dict[str, Path]:
    """The model directories packed by :func:`pack` from ``src`` (a call's files) under
    ``dest_root/prefix+name``: sharded Hugging Face directories, shard checksums verified."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        with tarfile.open(src / "meta.tar.gz") as tar:
            tar.extractall(tmp_name, filter="data")
        meta = Path(tmp_name) / "meta"
        manifest = json.loads((meta / "manifest.json").read_text())
        for name, info in manifest["models"].items():
            dest = dest_root / f"{prefix}{name}"
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(meta / name, dest)
            for shard, sh in info["shards"].items():
                shutil.copyfile(src / name / shard, dest / shard)
                if sha256(dest / shard) != sh["sha256"]:
                    raise ValueError(f"{src / name / shard}: checksum mismatch (a truncated transfer?)")
            out[name] = dest
            log(f"unpacked {name} -> {dest} ({len(info['shards'])} shard(s), {info['parameters']:,} parameters)")
        for f in meta.iterdir():
            if f.is_file() and f.name != "manifest.json":
                shutil.copyfile(f, dest_root / f"{prefix}{f.name}")
    return out


# ---------------------------------------------------------------------------------------------
# run


def cut_data(src: Path, dest: Path, counts: dict[str, int]) -> None:
    import gzip

    dest.mkdir(parents=True, exist_ok=True)
    for split, n in counts.items():
        with gzip.open(src / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
            lines = [line for _, line in zip(range(n), f)]
        with gzip.open(dest / f"{split}.jsonl.gz", "wt", encoding="utf-8") as f:
            f.writelines(lines)


def cmd_run(a: argparse.Namespace) -> int:
    t_start = time.monotonic()
    deadline = t_start + a.deadline if a.deadline else None
    work = Path(a.work)
    if a.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    data = Path(a.data)
    if a.tiny:
        cut_data(data, work / "data", TINY_DATA)
        data = work / "data"
    train, dev = data / "train.jsonl.gz", data / "dev.jsonl.gz"
    for f in (train, dev):
        if not f.is_file():
            raise SystemExit(f"error: {f} is missing (--data: a folder with train/dev/test.jsonl.gz)")
    log(f"DialogSum on {a.device} ({a.dtype}), data {data}, work {work}, out {a.out}"
        + (f", deadline {a.deadline:.0f} s" if a.deadline else "") + (" [tiny dry run]" if a.tiny else ""))
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("error: no CUDA device (pass --device cpu, or --dry-run)")
        log(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")

    def left(reserve: float = 0.0) -> float | None:
        return None if deadline is None else deadline - time.monotonic() - reserve

    # 1. tokenizer
    t = time.monotonic()
    tok = work / "dialogsum_tokenizer"
    if not (tok / "tokenizer.json").is_file():
        cmd = [sys.executable, "examples/e2e/train_tokenizer.py", "--format", "dialogsum",
               "--train-data", str(train), "--output", str(tok), "--force"]
        if a.tiny:
            cmd += ["--vocab-size", str(a.tiny_vocab)]
        step = Step("tokenizer", cmd)
        if not wait_all([step], None if deadline is None else deadline) or step.proc.returncode:
            step.interrupt(5)
            raise SystemExit("error: the tokenizer failed")
    timings["tokenizer_s"] = round(time.monotonic() - t, 1)

    # 2. base pretraining (checkpoints every minute: the newest is the fallback at the deadline)
    t = time.monotonic()
    base = work / "dialogsum_base"
    if not (base / "model.safetensors").is_file():
        cmd = self_cmd("_pretrain", "--device", a.device, "--dtype", a.dtype, "--",
                       "--format", "dialogsum", "--tokenizer", str(tok), "--output", str(base),
                       "--train-data", str(train), "--dev-data", str(dev), "--epochs", str(a.base_epochs),
                       "--threads", str(a.threads), "--checkpoint-minutes", str(a.base_checkpoint_minutes))
        if a.base_batch_size:
            cmd += ["--batch-size", str(a.base_batch_size)]
        cmd += TINY_BASE if a.tiny else []
        step = Step("base", cmd)
        # the base gets --base-share of the time left after the tokenizer
        limit = None if deadline is None else time.monotonic() + a.base_share * left(a.pack_reserve)
        finished = wait_all([step], limit)
        if not finished:
            step.interrupt(30)
            found = checkpoints(base / "checkpoints", "model.safetensors")
            if not found:
                raise SystemExit("error: the base was stopped before its first checkpoint; raise --deadline")
            log(f"base: using its newest checkpoint {found[-1].name}")
            base = found[-1]
        elif step.proc.returncode:
            raise SystemExit(f"error: the base pretraining failed (exit {step.proc.returncode})")
    timings["base_s"] = round(time.monotonic() - t, 1)

    # 3. fine-tunes, side by side
    t = time.monotonic()
    common = ["--data", str(train), "--format", "dialogsum", "--mode", "shared", "--lora-rank", "0",
              "--epochs", str(a.epochs), "--lr", str(a.lr), "--batch-size", str(a.batch_size),
              "--max-length", "1536", "--eval-data", str(dev), "--threads", str(a.threads),
              "--device", a.device, "--dtype", a.dtype, "--overwrite", "-q"]
    if a.save_every:
        common += ["--save-every", str(a.save_every)]
    if a.tiny:
        common += ["--eval-examples", "4"]
    if a.max_steps:
        common += ["--max-steps", str(a.max_steps)]
    layers = int(json.loads((base / "config.json").read_text())["num_hidden_layers"])
    runs = {"dialogsum_ss": ["--streams", "4", "--msa-layers", str(layers // 2), "--stream-loss-weight", "0.1"]}
    if not a.skip_plain:
        runs["dialogsum_plain"] = ["--streams", "0"]
    outputs = {name: work / name for name in runs}
    steps = []
    for name, extra in runs.items():
        cmd = self_cmd("_cli", "train", "--model", str(base), *common, *extra, "--output", str(outputs[name]))
        steps.append(Step(name, cmd))
        if a.sequential:
            wait_all(steps[-1:], None if deadline is None else deadline - a.pack_reserve)

    def status() -> None:
        for s, name in zip(steps, runs):
            ck = checkpoints(Path(f"{outputs[name]}.checkpoints"), "state.json")
            log(f"{name}: running {time.monotonic() - s.start:.0f} s, newest checkpoint "
                f"{ck[-1].name if ck else 'none'}")

    finished = wait_all(steps, None if deadline is None else deadline - a.pack_reserve, status)
    for s, name in zip(steps, runs):
        code = s.proc.returncode if finished else s.interrupt(60)
        if (outputs[name] / "config.json").is_file() and s.proc.returncode == 0:
            continue
        ck = checkpoints(Path(f"{outputs[name]}.checkpoints"), "state.json")
        if not ck:
            raise SystemExit(f"error: {name} ended (exit {code}) with no model and no checkpoint")
        log(f"{name}: exporting its newest checkpoint {ck[-1].name}")
        exp = Step(f"{name} export", self_cmd("_cli", "export", "--checkpoint", str(ck[-1]),
                                              "--output", str(outputs[name]), "--overwrite"))
        if exp.proc.wait():
            raise SystemExit(f"error: exporting {ck[-1]} failed")
    timings["fine_tunes_s"] = round(time.monotonic() - t, 1)

    # 4. pack for the trip back
    t = time.monotonic()
    out = Path(a.out)
    summary = {"timings": timings, "args": vars(a)}
    for name in runs:
        m = outputs[name] / "train_metrics.json"
        summary[name] = json.loads(m.read_text()) if m.is_file() else None
    (work / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    extra = {"summary.json": work / "summary.json", "base_train.log": work / "dialogsum_base" / "train.log",
             "base_config.json": base / "config.json", "base_training_args.json": base / "training_args.json"}
    report = pack(outputs, out, extra=extra, shard_bytes=a.shard_mib * MIB)
    timings["pack_s"] = round(time.monotonic() - t, 1)
    timings["total_s"] = round(time.monotonic() - t_start, 1)
    log(f"timings: {json.dumps(timings)}")
    for name in runs:
        s = summary[name] or {}
        ev = (s.get("eval") or {})
        log(f"{name}: {s.get('steps')} steps, eval {json.dumps(ev)[:300]}")
    if not report["fits"]:
        return 5
    if a.dry_run and not a.no_local:  # the local step too, at tiny size: unpack, convert, bench
        log("dry run: the local step (unpack, convert, bench 1 test dialogue)")
        return cmd_local(argparse.Namespace(
            src=str(out), runs=str(work / "runs"), prefix="gpu_", data=str(data), repeats=1, ss_only=True,
            baselines="lookup", bench_extra="--num-samples 1 --max-tokens 8", print_only=False, in_process_cli=True))
    return 0


# ---------------------------------------------------------------------------------------------
# local


def cmd_local(a: argparse.Namespace) -> int:
    src, runs = Path(a.src), Path(a.runs)
    ds = Path(a.data)
    runs.mkdir(parents=True, exist_ok=True)
    spec = [sys.executable, str(Path(__file__).resolve()), "_cli"] if a.in_process_cli else ["specstream"]
    ss, plain = runs / f"{a.prefix}dialogsum_ss", runs / f"{a.prefix}dialogsum_plain"
    cmds = [
        [*spec, "convert", "--hf-path", str(ss), "--mlx-path", f"{ss}_mlx", "--dtype", "float32", "--force"],
        [*spec, "bench", "--model", f"{ss}_mlx", "--data", str(ds / "test.jsonl.gz"), "--max-tokens", "128",
         "--repeats", str(a.repeats), "--baselines", a.baselines, "--json", f"{ss}_bench.json", *a.bench_extra.split()],
    ]
    if not a.ss_only:
        cmds[1:1] = [[*spec, "convert", "--hf-path", str(plain), "--mlx-path", f"{plain}_mlx", "--dtype", "float32",
                      "--force"]]
        cmds.append([*spec, "bench", "--model", f"{plain}_mlx", "--data", str(ds / "test.jsonl.gz"),
                     "--max-tokens", "128", "--repeats", "1", "--json", f"{plain}_bench.json", *a.bench_extra.split()])
    if a.print_only:
        print(f"python {Path(__file__).relative_to(REPO)} local --from {src} --runs {runs}  # unpack, then:")
        for c in cmds:
            print(" ".join(c))
        return 0
    unpack(src, runs, a.prefix)
    for c in cmds:
        log(" ".join(c))
        code = subprocess.call(c, env=sub_env() if a.in_process_cli else None)
        if code:
            return code
    return 0


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="tokenizer, base, fine-tunes, pack (the device call)")
    env_tiny = os.environ.get("TINY") == "1"
    r.add_argument("--data", default=str(Path(os.environ.get("SPECSTREAM_SHARED", REPO.parent / "shared"))
                                         / "data" / "dialogsum"), help="folder of train/dev/test.jsonl.gz")
    r.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "dialogsum_gpu"), help="scratch folder")
    r.add_argument("--out", default=os.environ.get("OUT"),
                   help="where the packed files go (default $OUT; --dry-run: WORK/out)")
    r.add_argument("--device", default=os.environ.get("DEVICE", "cuda"), choices=("cuda", "cpu"))
    r.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="autocast dtype (default bfloat16 on cuda, float32 on cpu); the fine-tunes save in it")
    r.add_argument("--deadline", type=float, help="seconds for the whole run (stops training in time)")
    r.add_argument("--base-epochs", type=float, default=2.0)
    r.add_argument("--base-batch-size", type=int, help="default: the recipe's 16")
    r.add_argument("--base-share", type=float, default=0.4,
                   help="the base's share of the time --deadline leaves after the tokenizer")
    r.add_argument("--base-checkpoint-minutes", type=float, default=1.0)
    r.add_argument("--epochs", type=int, default=5, help="fine-tune epochs (the paper's 5)")
    r.add_argument("--lr", type=float, default=5e-4)
    r.add_argument("--batch-size", type=int, default=32, help="fine-tune batch (the CPU recipe's: 16)")
    r.add_argument("--max-steps", type=int, help="cap the fine-tunes' steps")
    r.add_argument("--save-every", type=int, default=100, help="fine-tune checkpoint period (the deadline's fallback)")
    r.add_argument("--threads", type=int, default=4, help="CPU threads per process")
    r.add_argument("--skip-plain", action="store_true", help="no plain fine-tune (the quality baseline)")
    r.add_argument("--sequential", action="store_true", help="fine-tunes one after the other")
    r.add_argument("--pack-reserve", type=float, default=25.0, help="seconds kept for packing")
    r.add_argument("--shard-mib", type=int, default=16)
    r.add_argument("--fresh", action="store_true", help="delete --work first")
    r.add_argument("--tiny", action="store_true", default=env_tiny, help="tiny data and model (env TINY=1)")
    r.add_argument("--tiny-vocab", type=int, default=400)
    r.add_argument("--dry-run", action="store_true",
                   help="= --tiny --device cpu --fresh, out in WORK/out, then the local step at tiny size")
    r.add_argument("--no-local", action="store_true", help="--dry-run without the local step")
    loc = sub.add_parser("local", help="here: unpack a call's files, convert to MLX, bench the 500 test dialogues")
    loc.add_argument("--from", dest="src", required=True, help="the folder the call's files came back to")
    loc.add_argument("--runs", default="runs")
    loc.add_argument("--prefix", default="gpu_")
    loc.add_argument("--data", default=str(Path(os.environ.get("SPECSTREAM_SHARED", REPO.parent / "shared"))
                                          / "data" / "dialogsum"))
    loc.add_argument("--repeats", type=int, default=3)
    loc.add_argument("--ss-only", action="store_true", help="convert and bench the SS model only")
    loc.add_argument("--baselines", default="mlx-lm,lookup")
    loc.add_argument("--bench-extra", default="", help="more bench flags, e.g. '--tune --tune-data DEV'")
    loc.add_argument("--print-only", action="store_true", help="print the commands, run nothing")
    loc.add_argument("--in-process-cli", action="store_true", help="run specstream from this checkout (not installed)")
    a = ap.parse_args(argv)
    if a.command == "run":
        if a.dry_run:
            a.tiny, a.device, a.fresh = True, "cpu", True
            a.out = a.out if a.out and "--out" in argv else os.path.join(a.work, "out")
        if not a.out:
            ap.error("run: --out (or $OUT) is required")
        if a.dtype is None:
            a.dtype = "bfloat16" if a.device == "cuda" else "float32"
        if a.tiny:
            a.threads = min(a.threads, 1)
            a.max_steps = a.max_steps or 2
            if "--save-every" not in argv:
                a.save_every = 0
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_cli"]:  # internal: the specstream CLI of this checkout
        return specstream_cli(argv[1:])
    if argv[:1] == ["_pretrain"]:  # internal: pretrain_base.py on a device
        p = argparse.ArgumentParser()
        p.add_argument("--device", default="cpu")
        p.add_argument("--dtype", default="float32")
        rest = argv[1:]
        split = rest.index("--") if "--" in rest else len(rest)
        opts = p.parse_args(rest[:split])
        return pretrain(opts.device, opts.dtype, rest[split + 1:])
    a = parse_args(argv)
    if a.command == "local":
        return cmd_local(a)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout's TERM: clean up below
    try:
        return cmd_run(a)
    finally:
        Step.kill_all()


if __name__ == "__main__":
    sys.exit(main())
