"""Pipeline parallelism with torch.distributed.pipelining (runs on CPU/gloo and GPU/nccl alike).

The layer list is cut into `pp * virtual_stages` contiguous, balanced chunks; pipeline rank r holds
chunks r, r + pp, r + 2*pp, ... The first chunk embeds tokens, the last one applies the final norm,
the head and the (vocab-parallel) loss. Megatron-core's own pipeline schedules allocate on CUDA
unconditionally, so the schedules come from torch: GPipe, 1F1B and interleaved 1F1B.

Training uses the schedule; evaluation is a plain forward-only relay (no autograd state), so its
number of micro batches need not match training's. The step around the schedule (DP average,
clipping, update) is `NativeEngine`'s.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from ofs_scale.config import Config
from ofs_scale.engine.base import Batch, ChunkView, autocast_context
from ofs_scale.engine.native import NativeEngine
from ofs_scale.model.build import build_model
from ofs_scale.model.gpt import GPT
from ofs_scale.parallel.mesh import Mesh
from ofs_scale.parallel.stages import layer_chunks, rank_chunks


def bubble_fraction(schedule: str, pp: int, n_micro: int, virtual_stages: int = 1) -> float:
    """Idle fraction of an ideal pipeline step: (p-1)/(v*m + p-1) (v=1 for GPipe and 1F1B)."""
    v = virtual_stages if schedule == "interleaved" else 1
    return (pp - 1) / (v * n_micro + pp - 1)


def _hidden_shape(chunk: GPT, batch: int, length: int) -> tuple[int, int, int]:
    """Shape of the hidden states that cross stages for `batch` sequences of `length` tokens:
    this TP rank's part of the sequence under sequence parallelism."""
    part = chunk.factory.local_positions(length)
    return (batch, part.stop - part.start, chunk.cfg.d_model)


class StageModule(nn.Module):
    """A chunk as a pipeline stage: hidden states cross stages in fp32, the dtype `_stage_io`
    declares, and enter the chunk in its weights' dtype (bf16 under master weights, as the
    residual stream is in one process: norms take no mixed dtypes outside autocast)."""

    def __init__(self, chunk: GPT) -> None:
        super().__init__()
        self.chunk = chunk
        self.dtype = next(chunk.parameters()).dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.chunk(x if self.chunk.first else x.to(self.dtype))
        return out if self.chunk.last else out.float()


class PipelineEngine(NativeEngine):
    """This pipeline rank's chunks, trained with a torch.distributed.pipelining schedule."""

    def __init__(self, cfg: Config, mesh: Mesh, vocab_size: int) -> None:
        p = cfg.parallel
        self.num_chunks = p.pp * p.virtual_stages
        layer_sets = layer_chunks(cfg.model.n_layers, self.num_chunks)
        self.chunk_ids = rank_chunks(cfg.model.n_layers, p.pp, p.virtual_stages, mesh.pp_rank)
        self.chunks: list[GPT] = [
            build_model(
                cfg,
                mesh,
                vocab_size,
                layer_ids=layer_sets[c],
                first=c == 0,
                last=c == self.num_chunks - 1,
            )
            for c in self.chunk_ids
        ]
        super().__init__(cfg, mesh, self.chunks, ChunkView(self.chunks))
        self.stage_modules = [StageModule(chunk) for chunk in self.chunks]
        self.stages = [
            PipelineStage(
                module,
                c,
                self.num_chunks,
                mesh.device,
                *self._stage_io(cfg, chunk),
                group=mesh.pp_group,
            )
            for module, chunk, c in zip(self.stage_modules, self.chunks, self.chunk_ids)
        ]
        self.schedule_name = p.schedule
        self._schedules: dict[int, object] = {}
        self.has_loss = self.num_chunks - 1 in self.chunk_ids
        self._loss_chunk = (
            self.chunks[self.chunk_ids.index(self.num_chunks - 1)] if self.has_loss else None
        )

    @staticmethod
    def _stage_io(cfg: Config, chunk: GPT) -> tuple[torch.Tensor, torch.Tensor]:
        """Meta tensors describing one micro batch's stage input and output. Given statically,
        torch does not infer them by running a forward on uninitialised memory (which would
        pollute running statistics such as psBN's). Hidden states are this TP rank's part of
        the sequence under sequence parallelism."""
        mb, T = cfg.train.micro_batch, cfg.data.seq_len
        meta = torch.device("meta")
        hidden = _hidden_shape(chunk, mb, T)
        if chunk.first:
            inp = torch.empty((mb, T), dtype=torch.long, device=meta)
        else:
            inp = torch.empty(hidden, dtype=torch.float32, device=meta, requires_grad=True)
        if chunk.last:
            vocab_local = chunk.vocab_size // chunk.factory.tp
            dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32
            out = torch.empty((mb, T, vocab_local), dtype=dtype, device=meta, requires_grad=True)
        else:
            out = torch.empty(hidden, dtype=torch.float32, device=meta, requires_grad=True)
        return inp, out

    def _loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._loss_chunk.loss(logits, targets)

    def micro_divisor(self, num_micro: int) -> int:
        """With gradient buffers the schedule does not scale (`.grad` is moved to the buffers
        as it arrives): the buffers divide by the number of micro batches instead."""
        return num_micro

    def _schedule(self, n_micro: int):
        if n_micro not in self._schedules:
            # The schedule divides `.grad` by n_micro after the backwards; with gradient
            # buffers `.grad` is empty by then and `micro_divisor` does it.
            kw = {"loss_fn": self._loss_fn, "scale_grads": self.grads is None}
            if self.schedule_name == "interleaved":
                sched = ScheduleInterleaved1F1B(self.stages, n_micro, **kw)
            else:
                cls = ScheduleGPipe if self.schedule_name == "gpipe" else Schedule1F1B
                sched = cls(self.stages[0], n_micro, **kw)
            self._schedules[n_micro] = sched
        return self._schedules[n_micro]

    def _share_loss(self, total: torch.Tensor) -> torch.Tensor:
        """The loss lives on the last stage; give it to every pipeline rank."""
        if not self.has_loss:
            total.zero_()
        dist.all_reduce(total, group=self.mesh.pp_group)
        return total

    def forward_backward(self, batches: list[Batch]) -> torch.Tensor:
        """Run the schedule over `batches` as micro batches; gradients are those of the mean
        micro-batch loss (the schedule scales by 1/n_micro). Returns that mean on every rank."""
        dev = self.mesh.device
        x = torch.cat([b[0] for b in batches]).to(dev)
        y = torch.cat([b[1] for b in batches]).to(dev)
        losses: list[torch.Tensor] = []
        sched = self._schedule(len(batches))
        with autocast_context(self.dtype, dev):
            if self.mesh.is_first_stage:
                sched.step(x, target=y, losses=losses)
            else:
                sched.step(target=y, losses=losses)
        total = torch.zeros((), device=dev)
        if self.has_loss:
            total += torch.stack([loss.detach().float() for loss in losses]).mean()
        return self._share_loss(total)

    @torch.no_grad()
    def forward_loss(self, batches: list[Batch]) -> torch.Tensor:
        """Mean loss over `batches`: a forward-only relay of every micro batch through the
        chunks in order. Returns it on every rank of the pipeline."""
        dev, m = self.mesh.device, self.mesh
        total = torch.zeros((), device=dev)
        for x, y in batches:
            x, y = x.to(dev), y.to(dev)
            hidden = None
            for c in range(self.num_chunks):
                owner = c % m.pp
                if owner != m.pp_rank:
                    continue
                stage = self.stage_modules[self.chunk_ids.index(c)]
                chunk = stage.chunk
                if c == 0:
                    inp = x
                else:
                    shape = _hidden_shape(chunk, *x.shape)
                    inp = torch.empty(shape, device=dev, dtype=torch.float32)
                    dist.recv(inp, src=m.pp_global_rank((c - 1) % m.pp), group=m.pp_group)
                with autocast_context(self.dtype, dev):
                    hidden = stage(inp)
                if c < self.num_chunks - 1:
                    dist.send(
                        hidden.float().contiguous(),
                        dst=m.pp_global_rank((c + 1) % m.pp),
                        group=m.pp_group,
                    )
                else:
                    total += chunk.loss(hidden, y)
        total /= max(1, len(batches))
        return self._share_loss(total)
