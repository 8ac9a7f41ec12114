"""CMD during training: trajectory sampling to the run dir, and online CMD with `val_loss_cmd`.

Every `metrics.cmd.every` steps (and at step 0) `CmdCallback` records K sampled weights. Each
rank samples from its own shards (a TP shard on every TP rank, replicated tensors on TP rank 0,
DP rank 0 only), the K values are summed into one vector over all ranks and rank 0 appends it to

    <run.out_dir>/cmd/samples.json     columns (parameter, TP rank, flat index in the TP shard)
    <run.out_dir>/cmd/trajectory.f32   one float32 row of K values per record
    <run.out_dir>/cmd/steps.i64        the step of each row

which `ofs-scale cmd RUN_DIR` analyses. On resume, rows after the resumed step are cut.
Columns name no global rank, so a run resumed under another DP size samples the same weights.

Online CMD (`metrics.cmd.online`): the first `metrics.cmd.warmup` records also keep every local
weight's trajectory (on the CPU; freed afterwards). Then the modes and references are frozen from
the sampled trajectories (identical on every rank), every local weight is assigned to a mode and
its a, b are fitted over the window; every later record updates a, b incrementally (2 numbers per
weight, plus the M reference values per record). Each record logs `cmd/rel_error`, the relative
error of the reconstruction of all current weights; each evaluation also evaluates the
reconstructed weights, `val_loss_cmd`, beside the raw ones (like an EMA comparison).

Checkpoints carry the online state (the warm-up window, or the modes, references and every
weight's a, b) as shard state, so a resumed run continues exactly. It restarts the warm-up
instead, with a message, when the layout changed (other sampled columns) or the state is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ofs_scale.metrics.cmd import IncrementalAffine, allocate_samples, assign_modes, cluster_modes
from ofs_scale.parallel.tp import is_tp_sharded
from ofs_scale.trainer.callbacks import Callback, TrainerView

SAMPLES, TRAJECTORY, STEPS = "samples.json", "trajectory.f32", "steps.i64"


class WeightSampler:
    """Which K weights are recorded, and their values gathered into one vector on every rank."""

    def __init__(self, trainer: TrainerView, num_weights: int, min_per_layer: int) -> None:
        m = trainer.mesh
        self.device = m.device
        owned = [
            (n, p)
            for n, p in trainer.named_params
            if m.dp_rank == 0 and (is_tp_sharded(p) or m.tp_rank == 0)
        ]
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, [(n, p.numel()) for n, p in owned])
        flat = [(r, n, k) for r, items in enumerate(everyone) for n, k in items]
        counts = allocate_samples([k for _, _, k in flat], num_weights, min_per_layer)
        me = dist.get_rank()
        self.offset = sum(c for (r, _, _), c in zip(flat, counts) if r < me)
        mine = [c for (r, _, _), c in zip(flat, counts) if r == me]
        seed = trainer.cfg.run.seed
        self.picks: list[tuple[torch.Tensor, torch.Tensor]] = []
        columns = []
        for (name, p), c in zip(owned, mine):
            rng = np.random.default_rng([seed, m.tp_rank, *name.encode()])
            idx = np.sort(rng.choice(p.numel(), size=c, replace=False))
            self.picks.append((p, torch.as_tensor(idx, device=p.device)))
            columns += [{"name": name, "tp": m.tp_rank, "index": int(i)} for i in idx]
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, columns)
        self.columns = [c for part in gathered for c in part]
        self.total = len(self.columns)

    def gather(self) -> torch.Tensor:
        """The K sampled values now (float64, identical on every rank)."""
        out = torch.zeros(self.total, dtype=torch.float64, device=self.device)
        pos = self.offset
        for p, idx in self.picks:
            out[pos : pos + idx.numel()] = p.detach().reshape(-1)[idx].double()
            pos += idx.numel()
        if dist.get_world_size() > 1:
            dist.all_reduce(out)
        return out


class TrajectoryFile:
    """Append-only rows of sampled weights (written by global rank 0)."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    def start(self, columns: list[dict], step: int) -> None:
        """Write the header, or keep an existing trajectory up to `step` (resume)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        header = self.dir / SAMPLES
        if header.exists() and json.loads(header.read_text())["columns"] == columns:
            steps = np.fromfile(self.dir / STEPS, dtype=np.int64)
            keep = int((steps <= step).sum())
            for name, width in [(STEPS, 8), (TRAJECTORY, 4 * len(columns))]:
                with open(self.dir / name, "r+b") as f:
                    f.truncate(keep * width)
            return
        header.write_text(json.dumps({"num_weights": len(columns), "columns": columns}))
        for name in (STEPS, TRAJECTORY):
            (self.dir / name).write_bytes(b"")

    def append(self, step: int, values: torch.Tensor) -> None:
        with open(self.dir / TRAJECTORY, "ab") as f:
            f.write(values.float().cpu().numpy().tobytes())
        with open(self.dir / STEPS, "ab") as f:
            f.write(np.array([step], dtype=np.int64).tobytes())


def load_trajectory(run_dir: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(steps_T, W_KT, parameter name per row) from a run directory."""
    d = Path(run_dir) / "cmd"
    if not (d / SAMPLES).exists():
        raise FileNotFoundError(
            f"{d / SAMPLES} not found: train with metrics.cmd.every=N (N > 0) to record weight "
            "trajectories"
        )
    columns = json.loads((d / SAMPLES).read_text())["columns"]
    steps = np.fromfile(d / STEPS, dtype=np.int64)
    flat = np.fromfile(d / TRAJECTORY, dtype=np.float32)
    rows = min(len(steps), flat.size // max(1, len(columns)))
    W_TK = flat[: rows * len(columns)].reshape(rows, len(columns))
    return steps[:rows], W_TK.T.astype(np.float64), [c["name"] for c in columns]


class CmdCallback(Callback):
    """Trajectory recording and online CMD (module docstring)."""

    def __init__(self) -> None:
        self.sampler: WeightSampler | None = None
        self.file: TrajectoryFile | None = None
        self.window: list[list[torch.Tensor]] = []
        self.sampled: list[torch.Tensor] = []
        self.refs: torch.Tensor | None = None
        self.fits: list[IncrementalAffine] = []
        self.restored: dict[str, Any] | None = None

    def shard_state(self, trainer: TrainerView) -> dict[str, Any] | None:
        if not trainer.cfg.metrics.cmd.online or self.sampler is None or trainer.mesh.dp_rank:
            return None  # DP rank 0 writes the state of its (pp, tp) shard
        state: dict[str, Any] = {"columns": json.dumps(self.sampler.columns)}
        if self.refs is None:
            state["sampled"] = [v.cpu() for v in self.sampled]
            state["window"] = [torch.stack(w) for w in zip(*self.window)] if self.window else []
        else:
            state["refs"] = self.refs.cpu()
            state["fits"] = [fit.state_dict() for fit in self.fits]
        return state

    def load_shard_state(self, trainer: TrainerView, state: dict[str, Any] | None) -> None:
        self.restored = state

    def on_train_start(self, trainer: TrainerView) -> None:
        c = trainer.cfg.metrics.cmd
        self.sampler = WeightSampler(trainer, c.num_weights, c.min_per_layer)
        if trainer.mesh.is_logging_rank:
            self.file = TrajectoryFile(trainer.out_dir / "cmd")
            self.file.start(self.sampler.columns, trainer.step)
        self.window, self.sampled, self.refs, self.fits = [], [], None, []
        if c.online and trainer.step > 0:
            self._restore(trainer)
        if trainer.step == 0:
            self._record(trainer, 0, {})

    def _restore(self, trainer: TrainerView) -> None:
        """Continue the online state of the resumed checkpoint, on every rank or on none."""
        st, self.restored = self.restored, None
        try:
            ok = json.loads(st["columns"]) == self.sampler.columns
        except (TypeError, KeyError, ValueError):  # no state, or not one this code wrote
            ok = False
        flag = torch.tensor([int(ok)], device=trainer.mesh.device)
        if dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if not flag.item():
            trainer.log(
                "[cmd] the checkpoint's online CMD state is missing or from another layout: "
                "the warm-up restarts"
            )
            return
        dev = trainer.mesh.device
        if "refs" in st:
            self.refs = st["refs"].to(dev)
            self.fits = [IncrementalAffine.from_state(f, dev) for f in st["fits"]]
        else:
            self.sampled = list(st["sampled"])
            self.window = [list(rows) for rows in zip(*st["window"])] if st["window"] else []

    def post_step(self, trainer: TrainerView, step: int, record: dict[str, Any]) -> None:
        if step % trainer.cfg.metrics.cmd.every == 0:
            self._record(trainer, step, record)

    def _record(self, trainer: TrainerView, step: int, record: dict[str, Any]) -> None:
        values = self.sampler.gather()
        if self.file is not None:
            self.file.append(step, values)
        c = trainer.cfg.metrics.cmd
        if not c.online:
            return
        if self.refs is None:
            self.sampled.append(values.cpu())
            # clone: on the CPU .float().cpu() would return views of the live parameters
            snap = [p.detach().float().cpu().reshape(-1).clone() for p in trainer.params]
            self.window.append(snap)
            if len(self.window) >= c.warmup:
                self._freeze(trainer, c.modes)
        else:
            r_M = values[self.refs]
            for p, fit in zip(trainer.params, self.fits):
                fit.update(p, r_M)
        if self.refs is not None:
            record["cmd/rel_error"] = self.reconstruction_error(trainer, values[self.refs])

    def _freeze(self, trainer: TrainerView, num_modes: int) -> None:
        """Modes and references from the sampled window; assignment and a, b for every weight."""
        W_KT = torch.stack(self.sampled, dim=1)
        _, refs = cluster_modes(W_KT.numpy(), num_modes)
        self.refs = torch.as_tensor(refs, device=trainer.mesh.device)
        R_MT = W_KT[torch.as_tensor(refs)]
        self.fits = []
        for i, p in enumerate(trainer.params):
            W_NT = torch.stack([snap[i] for snap in self.window], dim=1)
            labels = assign_modes(W_NT, R_MT).to(p.device)
            fit = IncrementalAffine(labels, R_MT[:, 0].to(p.device))
            for t in range(W_NT.shape[1]):
                fit.update(W_NT[:, t].to(p.device), R_MT[:, t].to(p.device))
            self.fits.append(fit)
        self.window, self.sampled = [], []

    def reconstruction_error(self, trainer: TrainerView, r_M: torch.Tensor) -> float:
        """||W - W_hat|| / ||W|| over every weight of the model (each counted once)."""
        m = trainer.mesh
        sums = torch.zeros(2, dtype=torch.float64, device=m.device)
        if m.dp_rank == 0:
            for p, fit in zip(trainer.params, self.fits):
                if is_tp_sharded(p) or m.tp_rank == 0:
                    w = p.detach().double().reshape(-1)
                    sums[0] += (w - fit.reconstruct(r_M)).pow(2).sum()
                    sums[1] += w.pow(2).sum()
        if dist.get_world_size() > 1:
            dist.all_reduce(sums)
        return float((sums[0] / sums[1]).sqrt()) if sums[1] > 0 else 0.0

    def on_eval(self, trainer: TrainerView, step: int, record: dict[str, Any]) -> None:
        if self.refs is None:
            return
        r_M = self.sampler.gather()[self.refs]
        saved = [p.detach().clone() for p in trainer.params]
        try:
            with torch.no_grad():
                for p, fit in zip(trainer.params, self.fits):
                    p.copy_(fit.reconstruct(r_M).view_as(p))
            record["val_loss_cmd"] = trainer.evaluate()["val_loss"]
        finally:
            with torch.no_grad():
                for p, s in zip(trainer.params, saved):
                    p.copy_(s)
