"""Cross-field checks of a loaded config (what a single field's type cannot express), and the
data-parallel size a world size gives."""

from __future__ import annotations

from ofs_scale.config.schema import Config, ConfigError, switch_on
from ofs_scale.optim.registry import OPTIMIZER_SPECS


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
    for i, ds in enumerate(cfg.data.datasets):
        need(bool(ds.path), f"data.datasets.{i}.path is empty; name a prepared dataset directory")
        need(ds.weight > 0, f"data.datasets.{i}.weight={ds.weight} must be positive")
    need(p.timeout_min > 0, f"parallel.timeout_min={p.timeout_min} must be positive")
    need(cfg.data.vocab_size <= 1 << 31, "data.vocab_size too large")
    need(
        cfg.data.vocab_size >= 320,
        "data.vocab_size must be at least 320 (256 byte pieces + merges)",
    )
    need(cfg.optim.lr > 0, "optim.lr must be positive")
    need(all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas must be in [0, 1)")
    need(0 <= cfg.optim.muon_momentum < 1, "optim.muon_momentum must be in [0, 1)")
    need(cfg.optim.ns_steps >= 1, f"optim.ns_steps={cfg.optim.ns_steps} must be >= 1")
    need(cfg.optim.muon_update_rms > 0, "optim.muon_update_rms must be positive")
    need(
        cfg.metrics.alarm_kurtosis >= 0 and cfg.metrics.alarm_mmr >= 0,
        "metrics.alarm_kurtosis and metrics.alarm_mmr must be >= 0 (0: off)",
    )
    need(
        cfg.metrics.every > 0 or not (cfg.metrics.alarm_kurtosis or cfg.metrics.alarm_mmr),
        "metrics.alarm_kurtosis / alarm_mmr need metrics.every > 0 (the alarm reads the metrics)",
    )
    need(cfg.checkpoint.keep >= 1, "checkpoint.keep must be >= 1")
    _check_counts(cfg, need)
    need(m.bln_weight >= 0, f"model.bln_weight={m.bln_weight} must be >= 0")
    need(
        m.bln_init_min_sigma >= 0,
        f"model.bln_init_min_sigma={m.bln_init_min_sigma} must be >= 0 (0: no floor)",
    )
    need(cfg.metrics.sequences >= 0, f"metrics.sequences={cfg.metrics.sequences} must be >= 0")
    need(
        cfg.optim.soap_mode in ("published", "ofs"),
        f"optim.soap_mode={cfg.optim.soap_mode!r}: use published or ofs",
    )
    need(
        cfg.optim.shampoo_mode in ("ofs", "meta"),
        f"optim.shampoo_mode={cfg.optim.shampoo_mode!r}: use ofs or meta",
    )
    need(cfg.optim.shampoo_epsilon > 0, "optim.shampoo_epsilon must be positive")
    need(
        cfg.optim.vocab_precondition in ("one_sided", "full"),
        f"optim.vocab_precondition={cfg.optim.vocab_precondition!r}: use one_sided or full",
    )
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
        t.master_weights is not True or t.dtype == "bf16",
        "train.master_weights=true keeps fp32 masters of bf16 weights and needs train.dtype=bf16; "
        "set train.dtype=bf16 or train.master_weights=auto",
    )
    need(p.bucket_mb > 0, f"parallel.bucket_mb={p.bucket_mb} must be positive")
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
        allowed = [n for n, spec in OPTIMIZER_SPECS.items() if spec.deepspeed]
        others = " and ".join(s.title for s in OPTIMIZER_SPECS.values() if not s.deepspeed)
        need(
            cfg.optim.name in allowed,
            f"train.engine=deepspeed supports only optim.name={'|'.join(allowed)} "
            f"(got {cfg.optim.name!r}): DeepSpeed's flat partitions cut matrices apart; use "
            f"train.engine=native for {others}",
        )
    blockers = sequence_parallel_blockers(cfg)
    need(
        p.sequence_parallel is not True or p.tp == 1 or not blockers,
        f"parallel.sequence_parallel=true, but {'; '.join(blockers)}; fix that, or set "
        "parallel.sequence_parallel=auto (off where it cannot run) or false",
    )
    chunks = p.pp * p.virtual_stages
    need(
        m.n_layers >= chunks,
        f"model.n_layers={m.n_layers} is fewer than pipeline chunks pp*virtual_stages={chunks}",
    )


def sequence_parallel_blockers(cfg: Config) -> list[str]:
    """Why sequence parallelism cannot run with this config at tp > 1 (empty when it can)."""
    p, out = cfg.parallel, []
    if cfg.data.seq_len % p.tp:
        out.append(f"data.seq_len={cfg.data.seq_len} is not a multiple of parallel.tp={p.tp}")
    if cfg.model.norm in ("batchless", "psbn"):
        out.append(
            f"model.norm={cfg.model.norm} takes statistics over the tokens it sees, which "
            "would be one TP rank's part of the sequence"
        )
    if cfg.train.engine == "deepspeed":
        out.append("train.engine=deepspeed reduces gradients itself; use train.engine=native")
    return out


def sequence_parallel_on(cfg: Config, cuda: bool) -> bool:
    """Whether the residual stream is split along the sequence over TP: never at tp=1 (so a
    run's config with `true` still loads at tp=1, e.g. for evaluation), else as set, and for
    `auto` on with CUDA where nothing in `sequence_parallel_blockers` stops it."""
    if cfg.parallel.tp == 1:
        return False
    blocked = bool(sequence_parallel_blockers(cfg))
    return switch_on(cfg.parallel.sequence_parallel, cuda, requires=not blocked)


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
    n_micro = t.global_batch // (t.micro_batch * dp)
    if p.pp > 1 and p.schedule != "gpipe" and n_micro < p.pp:
        raise ConfigError(
            f"parallel.pp={p.pp} with parallel.schedule={p.schedule} needs at least {p.pp} micro "
            f"batches per step, this layout gives {n_micro} (train.global_batch / "
            f"(train.micro_batch * dp={dp})); lower train.micro_batch or raise train.global_batch"
        )
    return dp


def _check_counts(cfg: Config, need) -> None:
    """Intervals and counts that 0 or a negative value would silently misread."""
    c, t = cfg.checkpoint, cfg.train
    need(cfg.model.ffn_mult > 0, f"model.ffn_mult={cfg.model.ffn_mult} must be positive")
    need(cfg.logging.every >= 1, f"logging.every={cfg.logging.every} must be >= 1 (1: every step)")
    peak = cfg.logging.peak_tflops
    need(
        peak == "auto" or peak > 0,
        f"logging.peak_tflops={peak} must be positive (one device's peak TFLOP/s) or auto",
    )
    need(c.every >= 0, f"checkpoint.every={c.every} must be >= 0 (0: only at stage ends)")
    need(t.eval_every >= 0, f"train.eval_every={t.eval_every} must be >= 0 (0: only at stage ends)")
    need(
        t.max_bad_steps >= 1,
        f"train.max_bad_steps={t.max_bad_steps} must be >= 1 (non-finite steps in a row that "
        "stop the run)",
    )
    need(
        c.resume_from.strip() != "",
        "checkpoint.resume_from is empty; use last_healthy, latest or a checkpoint directory",
    )
    need(
        not (c.init_from and c.resume_from not in ("last_healthy", "latest")),
        f"checkpoint.init_from={c.init_from} and checkpoint.resume_from={c.resume_from} both name "
        "a checkpoint; resume_from continues a run at its step, init_from starts a new one at "
        "step 0: set only one",
    )
    need(
        not (c.init_from and t.engine == "deepspeed"),
        "checkpoint.init_from needs train.engine=native (DeepSpeed keeps its own master "
        "weights); start the run with the native engine, or resume with checkpoint.resume_from",
    )
    need(
        c.init_from != "" or not c.init_optimizer,
        "checkpoint.init_optimizer=true needs checkpoint.init_from=<checkpoint directory>",
    )
