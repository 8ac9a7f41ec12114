"""The model of a config on this rank: `build_model`, the one call the engines make."""

from __future__ import annotations

from ofs_scale.config import Config, switch_on
from ofs_scale.config.checks import sequence_parallel_on
from ofs_scale.model.batchless import configure_aux_scaling
from ofs_scale.model.gpt import GPT
from ofs_scale.model.layers import ParallelLayers
from ofs_scale.parallel.mesh import Mesh
from ofs_scale.parallel.tp import padded_vocab_size


def build_model(cfg: Config, mesh: Mesh, vocab_size: int, **chunk) -> GPT:
    """The model (or a pipeline chunk, via `layer_ids`/`first`/`last`) on this rank's device."""
    cuda = mesh.device.type == "cuda"
    layers = ParallelLayers(
        mesh.tp_group,
        dp_group=mesh.dp_group,
        sequence_parallel=sequence_parallel_on(cfg, cuda),
        cuda=cuda,
    )
    vocab = padded_vocab_size(vocab_size, mesh.tp)
    model = GPT(cfg.model, vocab, cfg.data.seq_len, layers, seed=cfg.run.seed, **chunk)
    model.recompute = cfg.train.activation_checkpointing
    # Batchless aux gradients follow the task loss's micro-batch scaling: the local engine
    # divides each micro-batch loss by their number, the pipeline schedule divides gradients
    # afterwards (see model/batchless.py).
    micro = cfg.train.global_batch // (cfg.train.micro_batch * mesh.dp)
    configure_aux_scaling(model, micro if mesh.pp == 1 else 1)
    model = model.to(mesh.device)
    if switch_on(cfg.train.compile, cuda):
        model.compile_blocks()
    return model
