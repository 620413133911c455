"""TrainConfig: every key of `depthjax train`, with its help text, defaults and parsing.

Keys come from (in increasing priority) the defaults, a YAML file, and `key=value`
arguments. Nested keys use dots: `mesh.data=2`, `model.n_layers=8` (any ModelConfig
field, applied on top of the preset named by `model`). Values are parsed as YAML
scalars and checked against the field's type; unknown keys are rejected with a
suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any

import yaml

from ..core.config import ModelConfig
from ..errors import DepthjaxError


class TrainConfigError(DepthjaxError):
    """A training key or value that is not understood."""


def _key(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata={"help": help, **kw}
        )
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = _key(-1, "data-parallel mesh axis size (-1: all devices left over)")
    fsdp: int = _key(1, "fully-sharded data-parallel axis: params/optimizer state sharded")
    tensor: int = _key(1, "tensor-parallel axis: heads, MLP width and vocabulary sharded")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # model
    model: str = _key("llama-tiny", "preset name (see `depthjax presets`)")
    model_overrides: dict = _key(
        {},
        "ModelConfig fields set as model.FIELD=VALUE, e.g. "
        "model.n_layers=8 model.dtype=bfloat16 model.remat=dots",
        cli="model.FIELD",
    )
    init_from: str | None = _key(
        None,
        "start from a checkpoint directory, native (dj.save) or "
        "Hugging Face, with its config, program and params, "
        "instead of a random init (continued pretraining)",
    )
    trainable: str = _key(
        ".*",
        "regex on parameter paths ('blocks/attn/q/kernel'); only "
        "matching leaves are trained, the rest stay frozen",
    )
    # schedule and optimizer
    steps: int = _key(200, "optimizer steps in total")
    batch_size: int = _key(16, "sequences per optimizer step (global, all processes)")
    seq_len: int = _key(256, "tokens per sequence (packed documents)")
    grad_accum: int = _key(1, "micro-batches per step; batch_size must be divisible by it")
    seed: int = _key(0, "seed for init and data order")
    seeds: int = _key(
        1,
        "train seeds seed..seed+seeds-1 in one compiled program (vmap over a leading seed "
        "axis of the state and batch); each equals its own run with that seed; final models "
        "in DIR/models/seed-S when > 1",
    )
    lr: float = _key(3e-4, "peak learning rate")
    warmup_steps: int = _key(20, "linear warmup steps, then cosine decay to lr*min_lr_ratio")
    min_lr_ratio: float = _key(0.1, "final learning rate as a fraction of lr")
    weight_decay: float = _key(0.1, "AdamW decoupled weight decay (not on norms and biases)")
    b1: float = _key(0.9, "AdamW beta1")
    b2: float = _key(0.95, "AdamW beta2")
    eps: float = _key(1e-8, "AdamW epsilon")
    clip_norm: float = _key(1.0, "clip gradients to this global norm (0: off)")
    nan_policy: str = _key(
        "stop",
        "non-finite loss or gradient: 'stop' the run (last good "
        "checkpoint kept) or 'skip' the update",
        choices=("stop", "skip"),
    )
    # early exit (LayerSkip; see depthjax.train.layerskip)
    layer_dropout: float = _key(
        0.0,
        "layer dropout: drop rate p_max of the last step; step l "
        "drops per sequence with p_max * D(l) * S(t)",
    )
    layer_dropout_depth: str = _key(
        "exp",
        "D(l) over depth: 'exp' (2^(l/(L-1)) - 1), 'linear' (l/(L-1)) or 'uniform' (1)",
        choices=("exp", "linear", "uniform"),
    )
    layer_dropout_schedule: str = _key(
        "constant",
        "S(t) over training steps: 'constant' (1), 'linear' (0 -> 1) or 'exp' (2^(t/(T-1)) - 1)",
        choices=("constant", "linear", "exp"),
    )
    exit_steps: list = _key(
        [],
        "early-exit losses: decode residual[k] (after step k-1) with "
        "the shared final norm and head, for each k (e.g. 2,4) or 'all'",
    )
    exit_weights: list = _key(
        [],
        "weight of each exit's loss, the final output's being 1 "
        "(one value: every exit; default 1); the objective is "
        "normalized by their sum",
    )
    exit_curriculum: str = _key(
        "none",
        "which exits are on at step t: 'none' (all), "
        "'rotational' (exit i when i % exit_rotation == t % "
        "exit_rotation) or 'gradual' (deepest first)",
        choices=("none", "rotational", "gradual"),
    )
    exit_rotation: int = _key(2, "rotational curriculum period")
    exit_curriculum_steps: int = _key(
        0, "gradual curriculum: steps until every exit is on (0: steps)"
    )
    # parallelism
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig, metadata={"help": ""})
    distributed: str = _key(
        "auto",
        "call jax.distributed.initialize(): 'auto' (when a "
        "multi-process launch is detected), 'on' or 'off'",
        choices=("auto", "on", "off"),
    )
    heartbeat_timeout: int = _key(
        100,
        "seconds without a heartbeat after which jax.distributed "
        "declares a process dead and the others exit",
    )
    # data
    data: str = _key(
        "stdlib",
        "'stdlib' (embedded Python sources), 'files' (data_files) or 'tfds' (tfds_name)",
        choices=("stdlib", "files", "tfds"),
    )
    data_files: list = _key([], "text/JSONL files, globs or directories for data=files")
    text_key: str = _key("text", "field holding the text in JSONL lines / TFDS records")
    tfds_name: str | None = _key(None, "TFDS dataset name for data=tfds (e.g. 'imdb_reviews')")
    tfds_data_dir: str | None = _key(None, "TFDS data_dir (default: TFDS's own)")
    train_split: str = _key("train", "TFDS split to train on")
    valid_split: str = _key("validation", "TFDS split for evaluation")
    tokenizer: str = _key("byte", "'byte' or a path to a tokenizer.json")
    shuffle_window: int = _key(
        1024,
        "chunks mixed by the window shuffle before packing (in total over the data shards); "
        "0 or 1: no shuffling, documents in file order",
    )
    data_shards: int = _key(
        0,
        "independent data streams side by side in every batch (0: "
        "gcd(batch_size, 64)); the batch of step k depends on it, not on "
        "the number of processes, which must split the batch along "
        "shard boundaries",
    )
    # evaluation, checkpoints, logging
    eval_every: int = _key(0, "evaluate validation loss every N steps (0: off)")
    eval_batches: int = _key(4, "validation batches per evaluation")
    checkpoint_every: int = _key(50, "save a checkpoint every N steps (and at the end)")
    keep_checkpoints: int = _key(3, "keep the last N checkpoints")
    async_checkpoint: bool = _key(True, "write checkpoints in the background")
    log_every: int = _key(1, "append to metrics.jsonl every N steps")
    tensorboard: bool = _key(True, "write TensorBoard event files to DIR/tensorboard")
    peak_tflops: float | None = _key(
        None,
        "peak TFLOP/s per device for MFU where the device "
        "is not in the built-in table (CPU: mfu is null)",
    )

    def __post_init__(self):
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise TrainConfigError(
                    f"{f.name}={getattr(self, f.name)!r} is not one of {choices}"
                )
        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "grad_accum",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
            "eval_batches",
            "seeds",
        ):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise TrainConfigError(
                f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}"
            )
        for name in ("warmup_steps", "eval_every", "seed", "shuffle_window", "data_shards"):
            if getattr(self, name) < 0:
                raise TrainConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.data_shards and self.batch_size % self.data_shards:
            raise TrainConfigError(
                f"batch_size={self.batch_size} is not divisible by data_shards={self.data_shards}"
            )
        if self.heartbeat_timeout < 1:
            raise TrainConfigError(
                f"heartbeat_timeout must be >= 1 second, got {self.heartbeat_timeout}"
            )
        for name, low, high, closed in (
            ("lr", 0, None, True),
            ("min_lr_ratio", 0, 1, True),
            ("weight_decay", 0, None, True),
            ("b1", 0, 1, False),
            ("b2", 0, 1, False),
            ("eps", 0, None, True),
            ("clip_norm", 0, None, True),
        ):
            value = getattr(self, name)
            ok = (
                math.isfinite(value)
                and value >= low
                and (high is None or (value <= high if closed else value < high))
            )
            if not ok:
                interval = (
                    f"[{low}, {high}{']' if closed else ')'}" if high is not None else f">= {low}"
                )
                raise TrainConfigError(
                    f"{name}={value!r} must be a finite number "
                    + (f"in {interval}" if high is not None else interval)
                )
        if self.peak_tflops is not None and not (
            math.isfinite(self.peak_tflops) and self.peak_tflops > 0
        ):
            raise TrainConfigError(f"peak_tflops={self.peak_tflops!r} must be a positive number")
        self._normalize_exits()
        if not 0.0 <= self.layer_dropout <= 1.0:
            raise TrainConfigError(f"layer_dropout must be in [0, 1], got {self.layer_dropout}")
        if (
            len(self.exit_weights) > 1
            and self.exit_steps != ["all"]
            and len(self.exit_weights) != len(self.exit_steps)
        ):
            raise TrainConfigError(
                f"exit_weights has {len(self.exit_weights)} entries for "
                f"exit_steps {self.exit_steps}"
            )
        if self.exit_rotation < 1 or self.exit_curriculum_steps < 0:
            raise TrainConfigError("exit_rotation must be >= 1 and exit_curriculum_steps >= 0")
        if self.seeds > 1 and self.layer_dropout:
            raise TrainConfigError(
                f"seeds={self.seeds} with layer_dropout={self.layer_dropout}: the dropout "
                "masks are drawn from the run's seed, not per seed, so the seeds would "
                "share them; train each seed in its own run (seeds=1, seed=S)"
            )

    def check_model(self, cfg: ModelConfig) -> None:
        """Raise TrainConfigError when the keys do not fit the model they train."""
        if cfg.param_dtype != "float32":
            raise TrainConfigError(
                f"model.param_dtype={cfg.param_dtype}: training keeps float32 master weights "
                "(bfloat16 would round most updates away); set model.dtype=bfloat16 for "
                "bfloat16 compute, and hold the trained model in bfloat16 afterwards "
                "(dj.load(DIR, param_dtype='bfloat16'), `depthjax convert --param-dtype "
                "bfloat16`)"
            )
        if self.seq_len > cfg.max_seq_len:
            raise TrainConfigError(
                f"seq_len={self.seq_len} exceeds the model's max_seq_len="
                f"{cfg.max_seq_len} (set model.max_seq_len to train longer "
                "contexts)"
            )

    def _normalize_exits(self) -> None:
        """exit_steps as ints (or ['all']) and exit_weights as floats, whatever the source."""
        steps, weights = list(self.exit_steps), list(self.exit_weights)
        if steps != ["all"]:
            try:
                steps = [int(k) for k in steps]
            except (TypeError, ValueError):
                raise TrainConfigError(
                    f"exit_steps must be integers or 'all', got {steps}"
                ) from None
        try:
            weights = [float(w) for w in weights]
        except (TypeError, ValueError):
            raise TrainConfigError(f"exit_weights must be numbers, got {weights}") from None
        object.__setattr__(self, "exit_steps", steps)
        object.__setattr__(self, "exit_weights", weights)

    def model_config(self) -> ModelConfig:
        from .. import configs

        return configs.get(self.model, **self.model_overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _field_type(cls, name):
    return typing.get_type_hints(cls)[name]


def _coerce(name: str, value: Any, tp) -> Any:
    """Check (and gently convert) a parsed YAML value to the annotated type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if args and type(None) in args:  # X | None
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
        origin = typing.get_origin(tp)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "3e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if tp is list and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if tp is list and isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    ok = isinstance(value, origin or tp) and not (tp is int and isinstance(value, bool))
    if not ok:
        raise TrainConfigError(f"{name}={value!r}: expected {getattr(tp, '__name__', tp)}")
    return value


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _set(tree: dict, key: str, value: Any, cls=TrainConfig, prefix: str = "") -> None:
    if not isinstance(key, str):  # YAML `1: 2` or `true: x`: keys are names
        raise TrainConfigError(
            f"key {prefix}{key!r} ({type(key).__name__}) is not a name; config keys are "
            "names such as 'lr' or 'mesh.data'"
        )
    head, _, rest = key.partition(".")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if head == "model" and rest:  # model.FIELD -> model_overrides
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        if rest not in model_fields:
            raise TrainConfigError(f"unknown key 'model.{rest}'{_suggest(rest, model_fields)}")
        tree.setdefault("model_overrides", {})[rest] = value
        return
    if head not in fields or head == "model_overrides":
        raise TrainConfigError(
            f"unknown key {prefix + key!r}"
            f"{_suggest(head, (n for n in fields if n != 'model_overrides'))}"
        )
    tp = _field_type(cls, head)
    if dataclasses.is_dataclass(tp):
        if rest:
            _set(tree.setdefault(head, {}), rest, value, tp, prefix + head + ".")
        elif isinstance(value, dict):
            for k, v in value.items():
                _set(tree.setdefault(head, {}), k, v, tp, prefix + head + ".")
        else:
            raise TrainConfigError(f"{prefix + head} is a group; set {prefix + head}.KEY=VALUE")
        return
    if rest:
        raise TrainConfigError(f"{prefix + head} has no sub-keys (got {prefix + key!r})")
    if head == "model" and isinstance(value, dict):  # YAML: model: {preset:..., n_layers: ...}
        raise TrainConfigError("model must be a preset name; set fields as model.FIELD=VALUE")
    tree[head] = _coerce(prefix + head, value, tp)


def _build(cls, tree: dict):
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in tree:
            tp = _field_type(cls, f.name)
            value = tree[f.name]
            kwargs[f.name] = _build(tp, value) if dataclasses.is_dataclass(tp) else value
    return cls(**kwargs)


def parse(overrides=(), yaml_file=None, base: dict | None = None) -> TrainConfig:
    """TrainConfig from an optional base dict, a YAML file, then 'key=value' strings."""
    tree: dict = {}
    for key, value in (base or {}).items():
        _set(tree, key, value)
    if yaml_file:
        try:
            with open(yaml_file, encoding="utf-8") as f:
                loaded = yaml.safe_load(f) or {}
        except UnicodeDecodeError:
            raise TrainConfigError(
                f"{yaml_file} is not a text file (--config takes YAML)"
            ) from None
        except yaml.YAMLError as e:
            raise TrainConfigError(
                f"{yaml_file} is not valid YAML: {' '.join(str(e).split())}"
            ) from None
        if not isinstance(loaded, dict):
            raise TrainConfigError(f"{yaml_file}: expected a mapping of keys to values")
        for key, value in loaded.items():
            if key == "model" and isinstance(value, dict):
                for k, v in value.items():
                    _set(tree, f"model.{k}", v)
            else:
                _set(tree, key, value)
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise TrainConfigError(f"expected key=value, got {item!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise TrainConfigError(
                f"{item!r}: the value is not valid YAML ({' '.join(str(e).split())})"
            ) from None
        _set(tree, key.strip(), value)
    return _build(TrainConfig, tree)


def help_text() -> str:
    """Every key with its default and help, for `depthjax train --help`."""
    lines = []

    def walk(cls, prefix=""):
        for f in dataclasses.fields(cls):
            tp = _field_type(cls, f.name)
            if dataclasses.is_dataclass(tp):
                walk(tp, prefix + f.name + ".")
                continue
            name = f.metadata.get("cli", prefix + f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {name:<18} {f.metadata['help']} (default: {default!r})")

    walk(TrainConfig)
    return "\n".join(lines)
