"""Training configuration: frozen keyword-only dataclasses, presets, typed ``key.sub=value`` overrides.

One dataclass per concern (:class:`OptimConfig`, :class:`LossConfig`, :class:`BalanceConfig`,
:class:`CheckpointConfig`) gathered in :class:`TrainConfig` with the model's :class:`~dsjax.configs.ModelConfig`
and the data's :class:`~dsjax.data.DataConfig`. Presets are functions (:func:`get`). :func:`apply_overrides` turns
``"optim.learning_rate=1e-3"`` strings into a new config, coercing by field type; unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Callable

from dsjax import configs as model_configs
from dsjax.configs import ConfigError, ModelConfig
from dsjax.data import DataConfig
from dsjax.sharding import MeshConfig

__all__ = ["OptimConfig", "LossConfig", "BalanceConfig", "CheckpointConfig", "TrainConfig", "get", "names",
           "apply_overrides", "split_overrides", "to_dict", "from_dict"]

SCHEDULES = ("cosine", "constant", "wsd", "linear")
DTYPES = ("float32", "bfloat16")


def _fail(field: str, value: Any, problem: str, fix: str) -> None:
    raise ConfigError(f"{field}={value!r}: {problem}. Fix: {fix}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with warmup and a decay schedule, global-norm clipping and a weight-decay mask.

    Schedules (after ``warmup_steps`` of linear warmup from 0): ``cosine`` to ``min_lr_ratio * lr`` at the last
    step; ``constant``; ``wsd`` (warmup-stable-decay: constant, then a linear decay to ``min_lr_ratio * lr`` over
    the last ``decay_fraction`` of the steps); ``linear`` decay to ``min_lr_ratio * lr``.
    """

    learning_rate: float = 3e-4
    schedule: str = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    clip_norm: float = 1.0
    moment_dtype: str = "float32"  # DeepSeek-V3 keeps AdamW moments in bfloat16

    def __post_init__(self):
        if not self.learning_rate > 0:
            _fail("optim.learning_rate", self.learning_rate, "must be positive", "e.g. 3e-4")
        if self.schedule not in SCHEDULES:
            _fail("optim.schedule", self.schedule, "is unknown", f"use one of {SCHEDULES}")
        if self.warmup_steps < 0:
            _fail("optim.warmup_steps", self.warmup_steps, "must be >= 0", "use 0 for no warmup")
        if not 0 <= self.min_lr_ratio <= 1:
            _fail("optim.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]", "e.g. 0.1")
        if not 0 < self.decay_fraction <= 1:
            _fail("optim.decay_fraction", self.decay_fraction, "must be in (0, 1]", "e.g. 0.2")
        if self.weight_decay < 0:
            _fail("optim.weight_decay", self.weight_decay, "must be >= 0", "use 0 to disable")
        if self.clip_norm < 0:
            _fail("optim.clip_norm", self.clip_norm, "must be >= 0", "use 0 to disable clipping")
        if self.moment_dtype not in DTYPES:
            _fail("optim.moment_dtype", self.moment_dtype, "is not supported", f"use one of {DTYPES}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Loss = CE + (mtp_lambda / D) * sum_k MTP_k + balance_alpha * sum_layers balance + z_loss * mean(lse^2)."""

    mtp_lambda: float = 0.3
    balance_alpha: float | None = None  # None: the model config's aux_loss_alpha
    z_loss: float = 0.0
    ce_chunk_tokens: int = 4096  # logits are computed this many tokens at a time (float32), never all at once

    def __post_init__(self):
        if self.mtp_lambda < 0:
            _fail("loss.mtp_lambda", self.mtp_lambda, "must be >= 0", "DeepSeek-V3 uses 0.3, then 0.1")
        if self.balance_alpha is not None and self.balance_alpha < 0:
            _fail("loss.balance_alpha", self.balance_alpha, "must be >= 0", "DeepSeek-V3 uses 1e-4")
        if self.z_loss < 0:
            _fail("loss.z_loss", self.z_loss, "must be >= 0", "e.g. 1e-4, or 0 to disable")
        if self.ce_chunk_tokens < 1:
            _fail("loss.ce_chunk_tokens", self.ce_chunk_tokens, "must be >= 1", "e.g. 4096")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BalanceConfig:
    """Auxiliary-loss-free balancing: ``b_i += gamma * sign(mean(c) - c_i)`` after every step (V3: gamma 1e-3).

    ``gamma_until_step``: gamma drops to 0 from this step on (V3 stops it for the last 500B tokens).
    ``center``: subtract the mean of the update so the biases keep a zero mean (torchtitan does this).
    """

    gamma: float = 1e-3
    gamma_until_step: int | None = None
    center: bool = True

    def __post_init__(self):
        if self.gamma < 0:
            _fail("balance.gamma", self.gamma, "must be >= 0", "use 0 to disable the bias update")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Orbax checkpoints under ``<workdir>/checkpoints``: every ``every`` steps, keep the last ``keep``."""

    every: int = 100
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        if self.every < 1:
            _fail("checkpoint.every", self.every, "must be >= 1", "e.g. 100")
        if self.keep < 1:
            _fail("checkpoint.keep", self.keep, "must be >= 1", "keep at least the latest checkpoint")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a run needs. ``micro_batches`` splits ``data.batch_size`` for gradient accumulation; ``mesh``
    lays the run out on several devices (:class:`~dsjax.sharding.MeshConfig`, e.g. ``--set mesh.data=-1``)."""

    model: ModelConfig
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    balance: BalanceConfig = dataclasses.field(default_factory=BalanceConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)  # all 1: one device, no sharding
    steps: int = 1000
    micro_batches: int = 1
    seed: int = 0
    log_every: int = 10
    max_consecutive_skips: int = 5
    peak_tflops: float | None = None  # per device; None: looked up from the device kind (MFU is blank if unknown)
    tensorboard: bool = True
    progress_bar: bool = True
    init_from: str | None = None  # a dsjax workdir or HF folder to start from (SFT); ignored when resuming

    def __post_init__(self):
        if self.steps < 1:
            _fail("steps", self.steps, "must be >= 1", "e.g. 1000")
        if self.micro_batches < 1 or self.data.batch_size % self.micro_batches:
            _fail("micro_batches", self.micro_batches, f"must divide data.batch_size={self.data.batch_size}",
                  "choose a divisor of the batch size")
        if self.log_every < 1:
            _fail("log_every", self.log_every, "must be >= 1", "e.g. 10")
        if self.max_consecutive_skips < 1:
            _fail("max_consecutive_skips", self.max_consecutive_skips, "must be >= 1", "e.g. 5")

    @property
    def balance_alpha(self) -> float:
        return self.model.aux_loss_alpha if self.loss.balance_alpha is None else self.loss.balance_alpha


# ---------------------------------------------------------------------------------------------- presets
def tiny(**overrides: Any) -> TrainConfig:
    """The embedded default: ``tiny`` on the default corpus (stdlib sources), CPU, a few hundred steps."""
    base = dict(
        model=model_configs.tiny(),
        data=DataConfig(source="default", seq_len=128, batch_size=8, seed=0),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=30, schedule="cosine", weight_decay=0.01),
        checkpoint=CheckpointConfig(every=100, keep=2),
        steps=300, log_every=10,
    )
    return TrainConfig(**{**base, **overrides})


def small(**overrides: Any) -> TrainConfig:
    """``small`` (1.24B total / 0.2B active) on one 80 GB GPU, bf16 compute, fp32 master weights."""
    base = dict(
        model=model_configs.small(),
        data=DataConfig(source="default", seq_len=2048, batch_size=8, seed=0),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=200, schedule="cosine"),
        checkpoint=CheckpointConfig(every=500, keep=3),
        steps=5000, log_every=20,
    )
    return TrainConfig(**{**base, **overrides})


def sft_tiny(**overrides: Any) -> TrainConfig:
    """SFT hyper-parameters for ``tiny``. Its data default is the synthetic arithmetic set so the preset runs as
    is; ``experiments.sft --data=...`` (or ``--set data.source=sft --set data.paths=...``) trains on
    prompt/completion JSONL with the loss on completions only."""
    base = dict(
        model=model_configs.tiny(),
        data=DataConfig(source="arithmetic", seq_len=128, batch_size=8),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=10, schedule="constant", weight_decay=0.0),
        steps=200, log_every=10,
    )
    return TrainConfig(**{**base, **overrides})


_PRESETS: dict[str, Callable[..., TrainConfig]] = {"tiny": tiny, "small": small, "sft-tiny": sft_tiny}


def names() -> tuple[str, ...]:
    return tuple(_PRESETS)


def get(name: str, **overrides: Any) -> TrainConfig:
    key = name.lower().replace("_", "-")
    if key not in _PRESETS:
        raise ConfigError(f"training preset {name!r} is unknown. Fix: use one of {list(_PRESETS)} or a .py file "
                          f"defining get_config()")
    return _PRESETS[key](**overrides)


# ---------------------------------------------------------------------------------------------- overrides
def _coerce(value: str, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value.lower() in ("none", "null") and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except (ValueError, ConfigError):
                continue
        raise ConfigError(f"--set {key}={value!r}: cannot be read as {tp}")
    if tp is bool:
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"--set {key}={value!r}: expected true/false")
    if tp is int:
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"--set {key}={value!r}: expected an integer") from None
    if tp is float:
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"--set {key}={value!r}: expected a number") from None
    if tp is str:
        return value
    if origin is tuple:
        items = json.loads(value) if value.startswith("[") else [v for v in value.split(",") if v]
        inner = args[0] if args else str
        return tuple(_coerce(str(v), inner, key) for v in items)
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"--set {key}=...: {key} is a group; set its fields ({key}.<field>=...)")
    raise ConfigError(f"--set {key}: fields of type {tp} cannot be set from the command line")


def _apply(obj: Any, tree: dict[str, Any], prefix: str) -> Any:
    """Replaces all fields named in ``tree`` at once (so paired changes validate together)."""
    hints = typing.get_type_hints(type(obj))
    names_ = [f.name for f in dataclasses.fields(obj)]
    changes = {}
    for head, sub in tree.items():
        full = f"{prefix}{head}"
        if head not in names_:
            raise ConfigError(f"--set {full}: unknown key {head!r} in {type(obj).__name__}. Fix: use one of {names_}")
        if isinstance(sub, dict):
            child = getattr(obj, head)
            if child is None or not dataclasses.is_dataclass(child):
                raise ConfigError(f"--set {full}.{next(iter(sub))}: {head!r} has no sub-fields")
            changes[head] = _apply(child, sub, full + ".")
        else:
            changes[head] = _coerce(sub, hints[head], full)
    return dataclasses.replace(obj, **changes)


def split_overrides(text: str, bare: tuple[str, ...] = ()) -> list[str]:
    """``"a.b=1,c=x,y,unpacked"`` -> ``["a.b=1", "c=x,y", "unpacked"]``: a comma-separated list of ``key=value``
    overrides (benchmark ``--variant`` flags) where a tuple value keeps its commas. An item without ``=`` continues
    the previous value unless it is one of the ``bare`` words (flags such as ``unpacked``)."""
    out: list[str] = []
    for item in (x for x in text.split(",") if x):
        if "=" not in item and item not in bare and out and "=" in out[-1]:
            out[-1] += "," + item
        else:
            out.append(item)
    return out


def apply_overrides(cfg: TrainConfig, overrides: list[str] | tuple[str, ...]) -> TrainConfig:
    """Applies ``"a.b=value"`` strings (typed by the dataclass fields; each group is validated once, with all its
    changes applied together)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. optim.learning_rate=1e-3")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = tree
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {p!r} was also set as a value")
            node = nxt
        if isinstance(node.get(parts[-1]), dict):
            raise ConfigError(f"--set {key}: {parts[-1]!r} is a group; set its fields")
        node[parts[-1]] = value.strip()
    return _apply(cfg, tree, "")


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(d: dict[str, Any]) -> TrainConfig:
    """Inverse of :func:`to_dict` (used to read ``workdir/config.json``)."""
    d = dict(d)
    model = ModelConfig.from_dict(d.pop("model"))
    data = DataConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("data").items()})
    parts = {"optim": OptimConfig, "loss": LossConfig, "balance": BalanceConfig, "checkpoint": CheckpointConfig,
             "mesh": MeshConfig}
    kwargs = {k: cls(**d.pop(k)) for k, cls in parts.items() if k in d}
    return TrainConfig(model=model, data=data, **kwargs, **d)
