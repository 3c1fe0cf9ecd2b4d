"""The options of ``specstream train`` (both back-ends), their checks, the resume
fingerprint, the learning-rate schedule and the run's ``speculative_streaming`` block."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

from mlx_specstream.config import PruningConfig, SpecStreamConfig, StreamLoRAConfig
from mlx_specstream.datasets import FORMATS

from .metrics import PRUNE_LOSS_WEIGHT

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cuda", "mps", "cpu")
MODES = ("shared", "lossless")

# Arguments that change the result: a resumed run must use the same values.
FINGERPRINT_KEYS = (
    "model", "data", "data_format", "max_examples", "eval_data", "eval_examples", "mode", "streams",
    "msa_layers", "lora_rank", "lora_alpha", "lora_targets", "stream_init", "stream_init_rank",
    "pruning_rank", "pruning_threshold", "prune_loss_weight", "stream_loss_weight", "epochs", "max_steps",
    "lr", "warmup_steps", "weight_decay", "batch_size", "max_length", "seed", "grad_clip", "dtype",
    "grad_accumulation_steps", "batch_tokens",
)


@dataclasses.dataclass
class RunOptions:
    """Every option of ``specstream train`` (same names, same defaults) that both back-ends take."""

    model_kind: ClassVar[str] = "a model directory"

    model: str
    data: str
    output: str
    mode: str = "shared"
    streams: int = 4
    msa_layers: Optional[int] = None  # None: half the layers
    lora_rank: int = 8  # shared: LoRA rank (0 = full fine-tuning); lossless: stream-only LoRA rank
    lora_alpha: Optional[float] = None  # None: 2 * rank
    lora_targets: Optional[tuple[str, ...]] = None  # None: the family's attention projections
    stream_init: str = "identity"
    stream_init_rank: Optional[int] = None
    pruning_rank: int = 8  # 0: no pruning adapter
    pruning_threshold: float = 0.0
    prune_loss_weight: float = PRUNE_LOSS_WEIGHT
    stream_loss_weight: float = 0.1
    epochs: int = 1
    max_steps: Optional[int] = None
    lr: float = 5e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 8
    grad_accumulation_steps: int = 1  # micro-batches of batch_size per optimizer step
    batch_tokens: int = 0  # > 0: micro-batches of similar-length examples up to this many padded tokens
    max_length: int = 512
    data_format: str = "auto"
    max_examples: Optional[int] = None
    eval_data: Optional[str] = None
    eval_examples: int = 0  # hold out this many training examples when eval_data is None, else subsample it
    eval_every: int = 0  # steps; 0: at the end of each epoch
    eval_batches: Optional[int] = None
    save_every: int = 0  # steps; 0: at the end of each epoch
    keep_checkpoints: int = 2
    checkpoint_dir: Optional[str] = None
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    num_threads: Optional[int] = None
    device: str = "auto"  # auto (CUDA, then MPS, then CPU), cuda, mps or cpu
    dtype: str = "float32"  # frozen weights' dtype; trainables stay float32
    grad_checkpoint: bool = False  # recompute layers in backward (less memory, same gradients)
    progress: bool = True
    log_every: int = 10

    def validate(self) -> None:
        if not Path(self.model).is_dir():
            raise FileNotFoundError(f"Model directory not found: {self.model}. Pass {self.model_kind}.")
        for name in ("data", "eval_data"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise FileNotFoundError(f"Data file not found: {value} (--{name.replace('_', '-')}).")
        if self.data_format not in FORMATS:
            raise ValueError(f"--format must be one of {FORMATS}, got {self.data_format!r}.")
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {MODES}, got {self.mode!r}.")
        for name in self._at_least_one():
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        if self.streams < 0:
            raise ValueError(f"--streams must be >= 0, got {self.streams}.")
        if self.lora_rank < 0 or self.pruning_rank < 0:
            raise ValueError("--lora-rank and --pruning-rank must be >= 0.")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}.")
        if self.batch_tokens < 0:
            raise ValueError(f"--batch-tokens must be >= 0, got {self.batch_tokens}.")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")

    def _at_least_one(self) -> tuple[str, ...]:
        return ("batch_size", "max_length", "epochs", "grad_accumulation_steps")

    @classmethod
    def from_fingerprint(cls, recorded: dict[str, Any], output: str):
        """The options a checkpoint's fingerprint records, writing to ``output``."""
        args = cls(output=str(output), **{k: recorded[k] for k in FINGERPRINT_KEYS if k in recorded})
        if args.lora_targets:
            args.lora_targets = tuple(args.lora_targets)
        return args

    def fingerprint(self, **extra: Any) -> dict[str, Any]:
        """The values a resumed run must share with the checkpoint (plus ``extra``)."""
        d = dataclasses.asdict(self)
        fp = {k: d[k] for k in FINGERPRINT_KEYS}
        fp["lora_targets"] = list(fp["lora_targets"]) if fp["lora_targets"] else None
        return dict(fp, **extra)

    def fingerprint_diff(self, current: dict[str, Any], saved: dict[str, Any]) -> list[str]:
        """Keys whose values differ; a key a checkpoint predates counts as its default value."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return sorted(k for k in set(current) | set(saved) if current.get(k) != saved.get(k, defaults.get(k)))

    def check_resume(self, current: dict[str, Any], saved: dict[str, Any], checkpoint: Path) -> None:
        diff = self.fingerprint_diff(current, saved)
        if diff:
            raise ValueError(f"--resume: {diff} differ from the checkpoint in {checkpoint}; "
                             "resume with the original arguments.")

    def spec(self, num_layers: int, default_targets: Union[Sequence[str], Callable[[int], Sequence[str]]]
             ) -> SpecStreamConfig:
        """The run's ``speculative_streaming`` block for a model of ``num_layers`` layers (see
        :func:`build_spec`)."""
        return build_spec(
            num_layers=num_layers, default_targets=default_targets, mode=self.mode, streams=self.streams,
            msa_layers=self.msa_layers, stream_init=self.stream_init, stream_init_rank=self.stream_init_rank,
            pruning_rank=self.pruning_rank, pruning_threshold=self.pruning_threshold, lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha, lora_targets=self.lora_targets, stream_loss_weight=self.stream_loss_weight)


def build_spec(*, num_layers: int, mode: str, streams: int, msa_layers: Optional[int],
               default_targets: Union[Sequence[str], Callable[[int], Sequence[str]]] = (),
               stream_init: str = "identity", stream_init_rank: Optional[int] = None, pruning_rank: int = 8,
               pruning_threshold: float = 0.0, lora_rank: int = 8, lora_alpha: Optional[float] = None,
               lora_targets: Optional[Sequence[str]] = None, stream_loss_weight: float = 0.1) -> SpecStreamConfig:
    """The ``speculative_streaming`` block of a training run (validated against the model).

    ``msa_layers`` None means half the layers (the paper's setting for E2E and DialogSum).
    Lossless mode's stream-only LoRA targets ``lora_targets``, else ``default_targets``: the
    names themselves, or a function of the first MSA layer's index that finds them.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be 'shared' or 'lossless', got {mode!r}.")
    if streams == 0 and mode == "lossless":
        raise ValueError("lossless mode trains only the streams; it needs --streams >= 1.")
    if msa_layers is None:
        msa_layers = max(1, num_layers // 2)
    if msa_layers > num_layers:
        raise ValueError(f"--msa-layers {msa_layers} exceeds the model's {num_layers} layers; use 1..{num_layers}.")
    stream_lora = None
    if mode == "lossless" and lora_rank > 0:
        targets = lora_targets or (default_targets(num_layers - msa_layers) if callable(default_targets)
                                   else default_targets)
        stream_lora = StreamLoRAConfig(rank=lora_rank, alpha=float(lora_alpha or 2 * lora_rank),
                                       target_modules=tuple(targets))
    weights = None if stream_loss_weight == 0.1 else [1.0] + [float(stream_loss_weight)] * streams
    spec = SpecStreamConfig(
        num_streams=streams, num_msa_layers=msa_layers if streams else 0, stream_init=stream_init,
        stream_init_rank=stream_init_rank, mode=mode,
        pruning=PruningConfig(rank=pruning_rank, threshold=pruning_threshold) if streams and pruning_rank else None,
        stream_lora=stream_lora, loss_weights=weights)
    spec.validate(num_layers=num_layers)
    return spec


def lr_factor(step: float, warmup: int, total: int) -> float:
    """The learning rate's multiplier at optimizer step ``step`` (0 at the first update):
    linear warmup over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))
