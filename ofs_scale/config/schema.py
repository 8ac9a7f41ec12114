"""One dataclass tree for every setting of a run: YAML files plus `section.key=value` overrides.

Every field has a default and a docstring underneath it. `load_config` validates types and enum
values and names the closest valid key when a key is unknown.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and the fix."""


@dataclass
class RunConfig:
    name: str = "smoke"
    """Run name: used in logs, wandb and the launcher."""
    out_dir: str = "runs/smoke"
    """Directory for metrics.jsonl, checkpoints, plots and wandb files."""
    seed: int = 0
    """Seed for weights and data order."""


@dataclass
class DataConfig:
    corpus: str = "stdlib"
    """`stdlib` (the running interpreter's standard-library .py files), a directory, a glob, a
    .txt file or a .jsonl file (field `text`)."""
    vocab_size: int = 8192
    """Size of the sentencepiece BPE vocabulary (byte fallback on)."""
    seq_len: int = 256
    """Tokens per training sequence."""
    val_fraction: float = 0.02
    """Fraction of the corpus files held out for validation (chosen by file, deterministically)."""
    max_files: int = 0
    """Use only the first N corpus files in sorted order (0: all)."""
    cache_dir: str = "~/.cache/ofs_scale"
    """Where tokenizers and token shards are cached by content hash."""
    shard_tokens: int = 1 << 26
    """Tokens per memmap shard file."""


Block = Literal["pre", "post", "op"]
Norm = Literal["layernorm", "rmsnorm", "srms", "none", "batchless", "psbn"]
Activation = Literal["gelu", "relu", "swiglu"]


@dataclass
class ModelConfig:
    d_model: int = 128
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads (must divide d_model, and be divisible by parallel.tp)."""
    ffn_mult: float = 4.0
    """MLP hidden width as a multiple of d_model."""
    block: Block = "pre"
    """Block type: `pre` (Pre-Norm), `post` (Post-Norm) or `op` (Outlier Protected)."""
    norm: Norm = "layernorm"
    """Normalisation layer used by the blocks (and the final norm)."""
    activation: Activation | None = None
    """MLP activation; default `gelu`, or `relu` for the OP block."""
    qk_norm: bool | None = None
    """RMSNorm (with gain) on queries and keys per head; default on for `op`, off otherwise."""
    beta: float | Literal["auto"] = 0.2
    """Residual branch weight of the OP block; `auto` means 1/sqrt(n_layers)."""
    beta_trainable: bool = False
    """Learn beta (one scalar per branch and block, no weight decay)."""
    embed_norm: bool | None = None
    """LayerNorm on the embedding output; default on for `op`, off otherwise."""
    final_norm: bool = True
    """Norm before the unembedding (the study found removing it lowers kurtosis)."""
    tie_embeddings: bool = False
    """Share the input embedding with the output projection."""
    position: Literal["rope", "learned"] = "rope"
    """Positional encoding: rotary (`rope`) or a learned table (`learned`)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    bias: bool = False
    """Biases in linear layers."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init."""
    scale_out_init: bool = True
    """Scale the init of attention and MLP output projections by 1/sqrt(2*n_layers)."""
    bln_weight: float = 1.0
    """Weight of the batchless-norm auxiliary loss."""
    bln_data_init: bool = False
    """Batchless norm: set mu/sigma from the first training micro batch (off keeps 1 x 8 and
    8 x 1 micro batching bit-for-bit comparable from step 0)."""
    psbn_alpha: float = 0.1
    """Post-shift added after the affine transform of psBN."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size (megatron-core Column/RowParallelLinear)."""
    pp: int = 1
    """Pipeline-parallel size (torch.distributed.pipelining)."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank (interleaved schedule)."""
    schedule: Literal["1f1b", "interleaved", "gpipe"] = "1f1b"
    """Pipeline schedule."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend; `auto` is nccl with CUDA, gloo otherwise."""


@dataclass
class StageConfig:
    name: str = "main"
    """Stage name; its checkpoint is `stage_<name>` and is kept forever."""
    steps: int = 100
    """Optimizer steps in this stage."""
    lr_schedule: Literal["constant", "warmup", "cosine", "linear"] = "cosine"
    """`warmup` ramps 0 -> lr; `constant` holds lr; `cosine`/`linear` decay lr to
    min_lr_ratio*lr."""
    warmup_steps: int = 0
    """Linear warmup at the start of this stage (before the schedule)."""
    min_lr_ratio: float = 0.1
    """Final learning rate of a decaying schedule, as a fraction of optim.lr."""


@dataclass
class TrainConfig:
    global_batch: int = 16
    """Sequences per optimizer step, over all data-parallel ranks."""
    micro_batch: int = 8
    """Sequences per forward/backward on one rank (gradient accumulation fills the rest)."""
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    """Phases of the run, trained in order."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0: off)."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Compute dtype: bf16 uses autocast; weights and optimizer state stay fp32."""
    activation_checkpointing: bool = False
    """Keep only each block's input and recompute the block in the backward pass: activation
    memory of about one block instead of all (tools/plan.py shows both), ~1/3 more compute."""
    eval_every: int = 50
    """Evaluate on the validation split every N steps (0: only at stage ends)."""
    eval_batches: int = 4
    """Micro batches per rank in one evaluation."""
    max_bad_steps: int = 5
    """Stop (with a checkpoint) after this many non-finite losses in a row."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; `auto` picks CUDA when available."""
    engine: Literal["native", "deepspeed"] = "native"
    """`native` (our data parallelism and sharded optimizers) or `deepspeed` (DeepSpeed ZeRO with
    AdamW, pp=1 only; see docs/engines.md)."""
    zero_stage: Literal[1, 2] = 1
    """DeepSpeed ZeRO stage with train.engine=deepspeed: 1 shards optimizer state, 2 also
    gradients."""


OptimName = Literal["adamw", "soap", "shampoo"]

# Defaults of the fields that depend on optim.name. A value set in YAML or an override always wins
# (also one equal to another optimizer's default); null, or not setting it, takes these.
# the SOAP paper's settings (Vyas et al., 2024); Shampoo shares them
_SOAP_DEFAULTS = {"lr": 3e-3, "betas": (0.95, 0.95), "eps": 1e-8, "weight_decay": 0.01}
OPTIM_DEFAULTS: dict[str, dict[str, Any]] = {
    "adamw": {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1},
    "soap": _SOAP_DEFAULTS,
    "shampoo": _SOAP_DEFAULTS,
}


@dataclass
class OptimConfig:
    name: OptimName = "adamw"
    """Optimizer."""
    lr: float | None = None
    """Peak learning rate (default: per optimizer, see OPTIM_DEFAULTS and docs/optimizers.md;
    adamw 1e-3, soap/shampoo 3e-3)."""
    betas: tuple[float, float] | None = None
    """Adam betas (beta1, beta2) (default: per optimizer; adamw (0.9, 0.95), soap/shampoo
    (0.95, 0.95))."""
    eps: float | None = None
    """Adam epsilon (default: per optimizer; 1e-8 for all)."""
    weight_decay: float | None = None
    """Decoupled weight decay on matrices, not on gains, biases or beta (default: per optimizer;
    adamw 0.1, soap/shampoo 0.01)."""
    precondition_frequency: int = 10
    """SOAP/Shampoo: steps between preconditioner updates."""
    max_precond_dim: int = 10000
    """SOAP/Shampoo: a side larger than this gets no factor (SOAP) or is blocked (Shampoo)."""
    shampoo_beta: float | None = None
    """SOAP/Shampoo: EMA factor of L and R (default: beta2)."""
    start_preconditioning_step: int = 10
    """Shampoo: plain grafted Adam until this step."""
    shard: bool | None = None
    """Shard optimizer state over data-parallel ranks (default: on when DP > 1)."""

    def __post_init__(self) -> None:
        # Fields left unset (None) take the chosen optimizer's default, so consumers always see
        # numbers. An unknown name is left for load_config's type check to report.
        name = self.name if isinstance(self.name, str) else "adamw"
        defaults = OPTIM_DEFAULTS.get(name, OPTIM_DEFAULTS["adamw"])
        for key, value in defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, value)


@dataclass
class CmdConfig:
    every: int = 0
    """Record sampled weight trajectories every N steps (0: off)."""
    num_weights: int = 1000
    """Sampled weights per record (spread over parameters in proportion to their size)."""
    min_per_layer: int = 2
    """At least this many sampled weights from every parameter tensor."""
    online: bool = True
    """Online CMD: fit every weight to the modes and report `val_loss_cmd` at each eval."""
    warmup: int = 10
    """Online CMD: records before modes and references are frozen."""
    modes: int = 10
    """Online CMD: number of modes M."""


@dataclass
class MetricsConfig:
    every: int = 10
    """Compute outlier-feature metrics every N steps (0: off)."""
    sites: list[str] = field(default_factory=lambda: ["all"])
    """Sites to measure: `all`, the groups `resid`, `mlp`, `attn`, or names such as `embed`,
    `block_03`, `mlp_03`, `attn_03`, `final`."""
    cmd: CmdConfig = field(default_factory=CmdConfig)
    """Correlation mode decomposition trajectory sampling."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Write a checkpoint every N steps (0: only at stage ends)."""
    keep: int = 2
    """Periodic checkpoints to keep (stage checkpoints are always kept)."""
    dir: str = ""
    """Checkpoint directory (default: <run.out_dir>/checkpoints)."""


@dataclass
class LoggingConfig:
    wandb: Literal["offline", "online", "disabled"] = "offline"
    """wandb mode; offline writes under <run.out_dir>/wandb."""
    project: str = "ofs_scale"
    """wandb project."""
    every: int = 1
    """Write a metrics.jsonl record every N steps."""
    progress: bool = True
    """Show a progress bar on rank 0."""


@dataclass
class LaunchConfig:
    nodes: int = 1
    """SLURM nodes."""
    gpus_per_node: int = 0
    """GPUs (= tasks) per node; 0 runs CPU tasks."""
    tasks_per_node: int = 1
    """Processes per node when gpus_per_node is 0."""
    cpus_per_task: int = 2
    """CPU cores per task."""
    partition: str = ""
    """SLURM partition (empty: the cluster default)."""
    time_min: int = 60
    """Time limit in minutes."""
    account: str = ""
    """SLURM account."""
    qos: str = ""
    """SLURM quality of service."""
    mem_gb: int = 0
    """Memory per node in GB (0: the cluster default)."""
    constraint: str = ""
    """SLURM node constraint (e.g. `h100`; empty: none)."""
    signal_delay_s: int = 120
    """Seconds before the time limit at which SLURM sends the checkpoint-and-requeue signal
    (USR1 for slurm/*.sh, USR2 for submitit); must cover one step plus one checkpoint."""
    max_requeues: int = 20
    """Time-limit requeues a submitit job may do before it gives up."""
    post_run: list[str] = field(default_factory=list)
    """Hooks `module:function` called as `function(cfg, run_dir)` on rank 0 after a run (or
    sweep point) finishes training, e.g. post-training quantisation."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    """Run identity and output."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus, tokenizer and sequence length."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout; DP = world / (tp * pp)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batching, stages, precision, evaluation."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """Outlier-feature instruments."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """SLURM resources for the submitit launcher."""

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.train.stages)


# ---------------------------------------------------------------------------------------------
# Coercion and validation


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        keys.append(name)
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, name + "."))
    return keys


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` converted to type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}{hint}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # `X | None`: X's own message ("should be a number", "did you mean")
            return _coerce(value, options[0], key)
        for a in options:
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r} should be {_describe(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} should be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}={value!r} should be a list")
        return [_coerce(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{key}={value!r} should be a list of {len(args)} values")
        return tuple(_coerce(v, a, f"{key}.{i}") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} should be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} should be an integer")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} should be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} should be a string")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _unknown_key(cls: type, key: str, prefix: str) -> ConfigError:
    full = prefix + key
    root_keys = _all_keys(Config) + [
        f"train.stages.N.{f.name}" for f in dataclasses.fields(StageConfig)
    ]
    # A right key in the wrong section (`model.lr`) first, then the closest spelling.
    close = [k for k in root_keys if k.rsplit(".", 1)[-1] == key][:1]
    close = close or difflib.get_close_matches(full, root_keys, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]}?)" if close else ""
    valid = ", ".join(f.name for f in dataclasses.fields(cls))
    return ConfigError(f"unknown config key {full!r}{hint}; valid keys here: {valid}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        if k not in names:
            raise _unknown_key(cls, k, prefix)
        kwargs[k] = _coerce(v, hints[k], prefix + k)
    return cls(**kwargs)


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [_to_plain(v) for v in obj]
    return obj


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain YAML/JSON-able data."""
    return _to_plain(cfg)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: no list element {part}")
            node = node[int(part)]
        else:
            if part not in node:
                node[part] = {}
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{key}: no list element {last}")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{key}: {'.'.join(parts[:-1])} is not a section")


def parse_override(text: str) -> tuple[str, Any]:
    """Split `section.key=value` and parse the value as YAML (ints, floats, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} should look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r} ({e})") from e
    return key, value


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Read a YAML config (optional), apply dotted overrides, validate, and return a Config.

    optim.lr, optim.betas, optim.eps and optim.weight_decay that neither the YAML nor an override
    sets (or that are set to null) take the defaults of the final optim.name (OPTIM_DEFAULTS); a
    value that is set always wins. The returned config, and so `dump_yaml`, holds the numbers."""
    loaded: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"config file {str(path)!r} does not exist; see configs/ for examples"
            )
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level should be a mapping of sections")
    parsed = [parse_override(item) for item in overrides]
    # First pass: which optimizer the YAML and overrides choose. Second pass: the same values on
    # top of that optimizer's defaults, so that an override of one element (`optim.betas.1=0.99`)
    # edits the right pair.
    name = _apply(to_dict(Config()), loaded, parsed, path)["optim"]["name"]
    if not isinstance(name, str) or name not in OPTIM_DEFAULTS:
        name = "adamw"  # _build reports a wrong name
    tree = _apply(to_dict(Config(optim=OptimConfig(name=name))), loaded, parsed, path)
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def _apply(
    tree: dict[str, Any],
    loaded: dict[str, Any],
    overrides: list[tuple[str, Any]],
    path: Path | None,
) -> dict[str, Any]:
    """`tree` (plain defaults) updated with the YAML sections `loaded`, then the overrides."""
    for section, values in loaded.items():
        if section not in tree:
            raise _unknown_key(Config, section, "")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section!r} should be a mapping")
        tree[section].update(copy.deepcopy(values))
    for key, value in overrides:
        section = key.split(".", 1)[0]
        if section not in tree:
            raise _unknown_key(Config, section, "")
        if "." not in key:
            raise ConfigError(f"override {key!r} should name section.key")
        _check_key_path(key)
        _set_dotted(tree, key, copy.deepcopy(value))
    return tree


def _check_key_path(key: str) -> None:
    cls: Any = Config
    prefix = ""
    for part in key.split("."):
        if part.isdigit():
            prefix += part + "."
            continue
        if not dataclasses.is_dataclass(cls):
            return
        hints = _hints(cls)
        if part not in hints:
            raise _unknown_key(cls, part, prefix)
        tp = hints[part]
        prefix += part + "."
        if typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        cls = tp


def validate(cfg: Config) -> None:
    """Cross-field checks that a single type cannot express."""
    m, t, p = cfg.model, cfg.train, cfg.parallel

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    for key, value in [
        ("model.d_model", m.d_model),
        ("model.n_layers", m.n_layers),
        ("model.n_heads", m.n_heads),
        ("data.seq_len", cfg.data.seq_len),
        ("data.vocab_size", cfg.data.vocab_size),
        ("train.global_batch", t.global_batch),
        ("train.micro_batch", t.micro_batch),
        ("parallel.tp", p.tp),
        ("parallel.pp", p.pp),
        ("parallel.virtual_stages", p.virtual_stages),
    ]:
        need(value > 0, f"{key}={value} must be positive")
    need(m.d_model % m.n_heads == 0, f"model.n_heads={m.n_heads} must divide model.d_model")
    need((m.d_model // m.n_heads) % 2 == 0 or m.position != "rope", "RoPE needs an even head_dim")
    need(
        m.n_heads % p.tp == 0,
        f"model.n_heads={m.n_heads} is not divisible by parallel.tp={p.tp}; "
        f"choose a tp that divides the head count",
    )
    need(m.beta == "auto" or m.beta > 0, "model.beta must be positive or 'auto'")
    need(len(t.stages) > 0, "train.stages needs at least one stage")
    names = [s.name for s in t.stages]
    need(len(set(names)) == len(names), f"train.stages names must be unique, got {names}")
    for i, s in enumerate(t.stages):
        need(s.steps > 0, f"train.stages.{i}.steps={s.steps} must be positive")
        need(s.warmup_steps >= 0, f"train.stages.{i}.warmup_steps must be >= 0")
        need(
            s.name.replace("_", "").replace("-", "").isalnum(),
            f"stage name {s.name!r}: use letters, digits, _ and -",
        )
    need(
        t.global_batch % t.micro_batch == 0,
        f"train.global_batch={t.global_batch} must be a multiple of "
        f"train.micro_batch={t.micro_batch}",
    )
    need(0.0 <= cfg.data.val_fraction < 1.0, "data.val_fraction must be in [0, 1)")
    need(cfg.data.vocab_size <= 1 << 31, "data.vocab_size too large")
    need(
        cfg.data.vocab_size >= 320,
        "data.vocab_size must be at least 320 (256 byte pieces + merges)",
    )
    need(cfg.optim.lr > 0, "optim.lr must be positive")
    need(all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas must be in [0, 1)")
    need(cfg.checkpoint.keep >= 1, "checkpoint.keep must be >= 1")
    need(m.bln_weight >= 0, f"model.bln_weight={m.bln_weight} must be >= 0")
    c = cfg.metrics.cmd
    need(c.every >= 0, f"metrics.cmd.every={c.every} must be >= 0 (0: off)")
    need(c.num_weights >= 2, f"metrics.cmd.num_weights={c.num_weights} must be at least 2")
    need(c.min_per_layer >= 0, f"metrics.cmd.min_per_layer={c.min_per_layer} must be >= 0")
    need(c.modes >= 1, f"metrics.cmd.modes={c.modes} must be >= 1")
    need(
        c.warmup >= 3 and c.warmup >= c.modes,
        f"metrics.cmd.warmup={c.warmup} must be >= 3 and >= metrics.cmd.modes={c.modes} "
        "(correlations need several records and at least one reference per mode)",
    )
    need(
        p.virtual_stages == 1 or p.schedule == "interleaved",
        "parallel.virtual_stages > 1 needs parallel.schedule=interleaved",
    )
    need(
        not (p.pp > 1 and m.tie_embeddings),
        "model.tie_embeddings is not supported with parallel.pp > 1 (embedding and head live on "
        "different stages); set model.tie_embeddings=false",
    )
    if t.engine == "deepspeed":
        need(
            p.pp == 1,
            f"train.engine=deepspeed does not support parallel.pp={p.pp}; set parallel.pp=1 "
            "or use train.engine=native for pipeline parallelism",
        )
        need(
            cfg.optim.name == "adamw",
            f"train.engine=deepspeed supports only optim.name=adamw (got {cfg.optim.name!r}): "
            "DeepSpeed's flat partitions cut matrices apart; use train.engine=native for "
            "SOAP and Shampoo",
        )
    chunks = p.pp * p.virtual_stages
    need(
        m.n_layers >= chunks,
        f"model.n_layers={m.n_layers} is fewer than pipeline chunks pp*virtual_stages={chunks}",
    )


def check_world(cfg: Config, world_size: int) -> int:
    """Return the data-parallel size for `world_size` processes, or raise a ConfigError."""
    p, t = cfg.parallel, cfg.train
    if world_size % (p.tp * p.pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp*parallel.pp={p.tp * p.pp}"
        )
    dp = world_size // (p.tp * p.pp)
    if t.global_batch % (t.micro_batch * dp):
        raise ConfigError(
            f"train.global_batch={t.global_batch} must be a multiple of "
            f"train.micro_batch*dp={t.micro_batch}*{dp}"
        )
    return dp


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
