"""The config schema: one dataclass tree for every setting of a run.

Every field has a default and a docstring underneath it. The loader (loader.py) fills it from YAML
and `section.key=value` overrides and checks types and enum values against these annotations; the
cross-field checks live in checks.py. The names of block types, norms and optimizers, and each
optimizer's defaults, come from their registries (model/blocks.py, model/norms.py,
optim/registry.py), which import nothing from this package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ofs_scale.model.blocks import BLOCKS
from ofs_scale.model.norms import NORMS
from ofs_scale.optim.registry import OPTIM_DEFAULTS, OPTIMIZER_SPECS


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and the fix."""


Switch = bool | Literal["auto"]
"""A GPU fast path: true, false, or `auto` (decided by `switch_on` from the device)."""


def switch_on(value: Switch, cuda: bool, *, requires: bool = True) -> bool:
    """Whether a `Switch` setting is on: `auto` means on when training on CUDA and `requires`
    (a further condition, e.g. tp > 1) holds; true and false are taken as they are."""
    if value == "auto":
        return cuda and requires
    return bool(value)


@dataclass
class RunConfig:
    name: str = "smoke"
    """Run name: used in logs, wandb and the launcher."""
    out_dir: str = "runs/smoke"
    """Directory for metrics.jsonl, checkpoints, plots and wandb files."""
    seed: int = 0
    """Seed for weights and data order."""


@dataclass
class DatasetSpec:
    path: str = ""
    """Directory of a prepared dataset (`ofs-scale prepare ... --out DIR`: manifest.json and
    megatron-core .bin/.idx parts)."""
    weight: float = 1.0
    """Blend weight: the dataset's share of training samples is weight / sum of weights."""


@dataclass
class DataConfig:
    datasets: list[DatasetSpec] = field(default_factory=list)
    """Prepared datasets to train on, blended by weight, e.g. `[{path: /data/web, weight: 0.7},
    {path: /data/code, weight: 0.3}]`. Empty: prepare `data.corpus` into `data.cache_dir`."""
    corpus: str = "stdlib"
    """Used when `data.datasets` is empty: `stdlib` (the running interpreter's standard-library
    .py files), a directory, a glob, a .txt file or a .jsonl file (field `text`); prepared once
    into data.cache_dir."""
    vocab_size: int = 8192
    """Vocabulary of the model; must equal the datasets' (the tokenizer trained for data.corpus
    gets this size)."""
    tokenizer: str = ""
    """Optional sentencepiece .model the run expects: every dataset must have been made by it
    (same sha256). Empty: the datasets must agree with the first one."""
    seq_len: int = 256
    """Tokens per training sequence."""
    val_fraction: float = 0.02
    """Fraction of each dataset's windows, at the tail of its token stream, held out for
    validation."""
    max_files: int = 0
    """data.corpus only: use the first N corpus files in sorted order (0: all)."""
    cache_dir: str = "~/.cache/ofs_scale"
    """Where data.corpus is prepared, keyed by corpus spec, vocabulary, file sizes and mtimes."""


# Allowed values of model.block, model.norm and optim.name, in registry order (the order that
# "choose one of" messages list them in).
Block = Literal[tuple(BLOCKS)]
Norm = Literal[tuple(NORMS)]
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
    bln_init_min_sigma: float = 0.3
    """Batchless data init: sigma starts at no less than this (caps the norm's gain 1/sigma;
    Adam moves log sigma by only ~lr per step, so a sigma set to a small residual stream's
    scale cannot follow its growth and training diverges; docs/instruments.md). 0: no floor."""
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
    timeout_min: float = 60.0
    """Process-group timeout (gloo and nccl) in minutes: how long a collective waits, e.g. for
    rank 0 preparing data.corpus (60 as in Megatron-LM)."""
    overlap_grad_reduce: Switch = "auto"
    """Reduce DP gradients in buckets launched from gradient hooks while the backward pass runs
    (instead of one reduction after it). `auto`: on with CUDA."""
    grad_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype of the DP gradient reduction (the buffers gradients accumulate in stay fp32)."""
    bucket_mb: float = 25.0
    """Size of one DP gradient bucket in MB (of reduced bytes)."""
    sequence_parallel: Switch = "auto"
    """With tp > 1, split the residual stream, norms and element-wise work along the sequence
    between TP ranks (megatron-core's sequence_parallel). `auto`: on with CUDA and tp > 1."""


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
    """Compute dtype: bf16 uses autocast; weights and optimizer state stay fp32 unless
    train.master_weights is on."""
    master_weights: Switch = "auto"
    """With dtype bf16: bf16 model weights for compute, fp32 master weights owned (and sharded)
    by the optimizer, gradients accumulated in fp32 buffers; clipping and the update in fp32.
    `auto`: on with CUDA and dtype bf16."""
    compile: Switch = "auto"
    """Regional `torch.compile` of each transformer block. `auto`: on with CUDA."""
    activation_checkpointing: bool = False
    """Keep only each block's input and recompute the block in the backward pass: activation
    memory of about one block instead of all (ofs-scale plan shows both), ~1/3 more compute."""
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


OptimName = Literal[tuple(OPTIMIZER_SPECS)]
DEFAULT_OPTIM = "adamw"


@dataclass
class OptimConfig:
    name: OptimName = DEFAULT_OPTIM
    """Optimizer."""
    lr: float | None = None
    """Peak learning rate (default: per optimizer, see OPTIM_DEFAULTS and docs/optimizers.md;
    adamw and muon 1e-3, soap/shampoo 3e-3)."""
    betas: tuple[float, float] | None = None
    """Adam betas (beta1, beta2) (default: per optimizer; adamw and muon (0.9, 0.95),
    soap/shampoo (0.95, 0.95)); muon uses them for its AdamW tensors."""
    eps: float | None = None
    """Adam epsilon (default: per optimizer; 1e-8 for all)."""
    weight_decay: float | None = None
    """Decoupled weight decay on matrices, not on gains, biases or beta (default: per optimizer;
    adamw and muon 0.1, soap/shampoo 0.01)."""
    precondition_frequency: int = 10
    """SOAP/Shampoo: steps between preconditioner updates."""
    max_precond_dim: int = 10000
    """SOAP/Shampoo: a side larger than this gets no factor (SOAP) or is blocked (Shampoo)."""
    precond_precision: Literal["fp32", "tf32", "bf16"] = "fp32"
    """SOAP/Shampoo: precision of the matmuls of the basis / root refresh (eigh and QR stay
    fp32): `fp32`, `tf32` (emulated by rounding on CPU) or `bf16`. fp32 by default: reduced
    precision moves SOAP's next update by 36% (tf32) to 200% (bf16); docs/optimizers.md."""
    shampoo_beta: float | None = None
    """SOAP/Shampoo: EMA factor of L and R (default: beta2)."""
    start_preconditioning_step: int = 10
    """Shampoo: plain grafted Adam until this step."""
    shampoo_mode: str = "ofs"
    """Shampoo: `ofs` (relative factor regularisation, 1-D tensors by AdamW, roots every
    precondition_frequency steps counted from start_preconditioning_step) or `meta` (Meta's
    Distributed Shampoo: bias-corrected factors plus the absolute shampoo_epsilon, 1-D tensors
    preconditioned with exponent -1/2, roots on steps that are multiples of the frequency)."""
    shampoo_epsilon: float = 1e-12
    """Shampoo with shampoo_mode=meta: absolute epsilon added to the factors before the root."""
    vocab_precondition: str = "one_sided"
    """SOAP: `one_sided` leaves the vocabulary side of the token embedding and the output head
    unrotated (their d_model side is still preconditioned), `full` treats them like any matrix
    (the published behaviour, V x V factors). A factor far wider than the other matrices warns.
    See docs/optimizers.md."""
    soap_mode: str = "published"
    """SOAP: `published` follows the published SOAP code (eps added before bias correction,
    weight decay after the update, every parameter's first step skipped); `ofs` is this
    project's earlier variant (eps after bias correction, decay before, 1-D tensors from step 1).
    See docs/optimizers.md."""
    muon_momentum: float = 0.95
    """Muon: momentum mu of the gradient EMA B <- mu B + (1 - mu) G."""
    muon_nesterov: bool = True
    """Muon: orthogonalise the Nesterov direction (1 - mu) G + mu B instead of B."""
    ns_steps: int = 5
    """Muon: quintic Newton-Schulz iterations."""
    ns_coeffs: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
    """Muon: Newton-Schulz coefficients (a, b, c) of X <- a X + (b A + c A^2) X, A = X X^T."""
    muon_update_rms: float = 0.2
    """Muon: RMS of the update, by the factor rms * sqrt(max(rows, cols)) (Moonlight); 0.2
    matches AdamW's typical update RMS so AdamW's lr and weight decay transfer."""
    muon_adamw: list[str] = field(default_factory=lambda: ["embed", "head"])
    """Muon: module-name prefixes whose matrices take AdamW instead (default embeddings and
    unembedding); tensors with fewer than two dims always take AdamW."""
    shard: bool | None = None
    """Shard optimizer state over data-parallel ranks (default: on when DP > 1)."""

    def __post_init__(self) -> None:
        # Fields left unset (None) take the chosen optimizer's default (OPTIM_DEFAULTS, from the
        # optimizer registry), so consumers always see numbers. An unknown name is left for
        # load_config's type check to report.
        name = self.name if isinstance(self.name, str) else DEFAULT_OPTIM
        defaults = OPTIM_DEFAULTS.get(name, OPTIM_DEFAULTS[DEFAULT_OPTIM])
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
    sequences: int = 16
    """Sequences of the global batch that metric steps measure: this many, evenly spaced
    (positions i * global_batch // sequences), so values do not depend on the parallel layout
    or the micro-batch size; 0 or more than the global batch: every sequence."""
    sites: list[str] = field(default_factory=lambda: ["all"])
    """Sites to measure: `all`, the groups `resid`, `mlp`, `attn`, or names such as `embed`,
    `block_03`, `mlp_03`, `attn_03`, `final`."""
    cmd: CmdConfig = field(default_factory=CmdConfig)
    """Correlation mode decomposition trajectory sampling."""
    alarm_kurtosis: float = 0.0
    """OF alarm: warn (console, metrics.jsonl, wandb) the first time the max residual-stream
    kurtosis of a metric step exceeds this (0: off)."""
    alarm_mmr: float = 0.0
    """OF alarm: the same for the max residual-stream max-median ratio (0: off)."""
    alarm_checkpoint: bool = False
    """OF alarm: also write checkpoint `alarm_step_NNNNNN` (kept) when an alarm fires."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Write a checkpoint every N steps (0: only at stage ends)."""
    keep: int = 2
    """Periodic checkpoints to keep (stage checkpoints are always kept)."""
    dir: str = ""
    """Checkpoint directory (default: <run.out_dir>/checkpoints)."""
    resume_from: str = "last_healthy"
    """Which checkpoint a restarted run resumes: `last_healthy` (the newest whose weights were
    finite and not in a non-finite streak), `latest` (the newest usable), or a checkpoint
    directory (used once; the run's own later checkpoints take over). Either way the run goes
    on with the saved step, data order and RNG."""
    init_from: str = ""
    """A checkpoint directory (or a run directory: its newest checkpoint) to start this run
    from at step 0, for fine-tuning or branching a run at a step into a new run.out_dir: its
    weights, and its optimizer state with `init_optimizer`. Used only while the run has no
    checkpoint of its own (a restart resumes its own). Any layout loads into any other."""
    init_optimizer: bool = False
    """With `init_from`: load the optimizer state too (moments, step counts), not only weights."""
    verify: bool = True
    """Check every file's recorded crc32 before loading (about 5 GB/s per rank)."""
    async_save: Switch = "auto"
    """Write checkpoints in the background after staging them to CPU memory, so training
    stalls only for the staging copy; still atomic. `auto`: on with CUDA."""


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
    entity: str = ""
    """wandb entity (team or user) the run is logged under (empty: your default entity)."""
    group: str = ""
    """wandb group, e.g. a sweep's name, to see its runs together (empty: none)."""
    tags: list[str] = field(default_factory=list)
    """wandb tags."""
    wandb_name: str = ""
    """wandb run name (empty: `run.name`, plus `/<last part of run.out_dir>` when that differs,
    so runs sharing a YAML but not an out_dir get distinct names)."""
    peak_tflops: float | Literal["auto"] = "auto"
    """Peak TFLOP/s of one device that MFU is measured against (`mfu` = model FLOP/s per device
    / peak). `auto`: 989 (H100 SXM, bf16 dense) on CUDA, 1 on CPU (a nominal figure: set your
    CPU's for a meaningful CPU MFU)."""


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
    max_restarts: int = 0
    """torchrun --max-restarts: times the ranks of a node are restarted after one fails; they
    resume from the newest checkpoint. Above 0 the submitit launcher starts a single run as one
    torchrun per node instead of one task per rank (sweeps keep one task per rank; slurm/*.sh
    take it from MAX_RESTARTS)."""
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
        """Optimizer steps over all stages."""
        return sum(s.steps for s in self.train.stages)
