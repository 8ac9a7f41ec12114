"""Starting a new run from a checkpoint of another run (`checkpoint.init_from`).

`checkpoint.resume_from` continues a run: weights, optimizer, step, data order and RNG come back
and training goes on at the saved step. `init_from` starts a new run at step 0 from a
checkpoint's weights (and, with `checkpoint.init_optimizer`, its optimizer state), for
fine-tuning or for branching a run at a step into a new run.out_dir; the counters, data order,
RNG and callback state are the new run's own. The Trainer applies it only while its run has no
checkpoint of its own, so a restarted run resumes its own checkpoints instead.

DCP reshards by name, so a checkpoint written under any (tp, pp, dp) layout initialises any
other; optimizer state whose shape depends on the TP size (SOAP, Shampoo factors) loads only at
the same TP size, which their fingerprint holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.distributed.checkpoint.api import CheckpointException

from ofs_scale.checkpoint.integrity import LATEST, CheckpointError, read_meta, root_cause
from ofs_scale.checkpoint.manager import CheckpointManager
from ofs_scale.checkpoint.state import weights_fingerprint
from ofs_scale.parallel.mesh import Mesh


def init_checkpoint_path(init_from: str | Path) -> Path:
    """The checkpoint directory `init_from` names: itself, or the newest checkpoint of a run
    directory (`<run>/checkpoints/latest`) or of a checkpoints directory."""
    path = Path(init_from)
    for root in (path / "checkpoints", path):
        if (root / LATEST).is_file():
            return root / (root / LATEST).read_text(encoding="utf-8").strip()
    return path


def init_state(state: dict[str, Any], with_optimizer: bool) -> dict[str, Any]:
    """The entries of a training state dict that an initialisation loads: the model's, and the
    optimizer's when `with_optimizer` (never the trainer's counters under "extra")."""
    prefixes = ("model/", "optim/") if with_optimizer else ("model/",)
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


def load_init(
    init_from: str | Path,
    state: dict[str, Any],
    mesh: Mesh,
    fingerprint: dict[str, Any],
    with_optimizer: bool,
    verify: bool = True,
) -> dict[str, Any]:
    """Load the weights (and optimizer state when `with_optimizer`) of checkpoint `init_from`
    into `state` in place, after checking that it was written for the same model (the
    fingerprint: all of it with the optimizer, its model and data keys without). Returns the
    checkpoint's ofs_meta.json. Collective; raises CheckpointError naming the problem and fix."""
    path = init_checkpoint_path(init_from)
    where = f"checkpoint.init_from={init_from}"
    if not with_optimizer:
        fingerprint = weights_fingerprint(fingerprint)
    manager = CheckpointManager(
        path.parent, mesh, fingerprint=fingerprint, verify=verify, move_later=False
    )
    wanted = init_state(state, with_optimizer)
    try:
        manager.load(path, wanted)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from e
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException
        hint = (
            "; if it holds no optimizer state for this model (a DeepSpeed checkpoint keeps it "
            "apart), set checkpoint.init_optimizer=false"
            if with_optimizer
            else ""
        )
        raise CheckpointError(f"{where}: load failed ({root_cause(e)}){hint}") from e
    return read_meta(path)
