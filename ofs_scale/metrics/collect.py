"""Forward hooks on the model's taps and the exact reductions of their statistics over the mesh.

Per metric step the measured token set is `measured_rows`: `metrics.sequences` sequences at fixed
positions of the global batch, whatever the DP / TP / PP / micro-batch layout. Each site's hook
turns the measured rows of every micro batch that passes through its chunk into small partial
sums (per-neuron sums of squares, per-token max/median ratios, cosine and entropy sums) and adds
them up; nothing large is kept. `Collector.reduce` then:

1. sums the partials over the data-parallel group (all DP ranks' tokens count) and takes the max
   of |x| (one all-reduce each);
2. turns per-neuron sums into moments and sums those over the tensor-parallel group for sites
   whose neurons (MLP hidden) or heads (attention) are split there; residual-stream sites are
   replicated over TP and only tp_rank 0 contributes them;
3. sums over the pipeline group, where every stage contributes only the sites it holds (zeros
   elsewhere), so every rank, global rank 0 included, ends with every layer's values.

Under sequence parallelism each TP rank holds only its part of the residual stream's sequence.
Every statistic of a residual site is a sum over tokens (per-neuron sums of squares, per-token
max/median ratios, per-sequence sums of unit vectors for the cosine) or a max, so the hook adds
up the TP ranks' partials at once (one small all-reduce per micro batch) and the site is then
replicated over TP as without it: the values equal the single-process ones exactly. MLP and
attention sites see the whole sequence (they sit after a column layer's gather) and need nothing.

The per-token median of a TP-split MLP site is found exactly by bisection on the float bit
patterns with an all-reduce of counts per step (31 small all-reduces), never approximated.

Shapes: N tokens, F neurons on this rank, B sequences, T tokens per sequence, D width.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ofs_scale.metrics import stats
from ofs_scale.model.recompute import recomputing
from ofs_scale.parallel.mesh import Mesh

RESID, MLP, ATTN = "resid", "mlp", "attn"
FIELDS = (
    "sum_s2",
    "sum_s4",
    "sum_cs2",
    "sum_cs4",
    "width",
    "mmr_sum",
    "mmr_n",
    "cmmr_sum",
    "cmmr_n",
    "cos_sum",
    "cos_n",
    "ent_sum",
    "ent_n",
    "present",
)
# Fields every TP rank adds for a site whose neurons / heads are split over TP.
SPLIT_FIELDS = {
    RESID: set(),
    MLP: {"sum_s2", "sum_s4", "sum_cs2", "sum_cs4", "width"},
    ATTN: {"ent_sum", "ent_n"},
}
SITE_NAME = re.compile(r"^(embed|final|(block|mlp|attn)_(\d+))$")
# Scalar partials of each site kind (besides the per-neuron vectors `sq`, `csq` of width sites).
WIDTH_SCALARS = ("n", "mmr_sum", "mmr_n", "cmmr_sum", "cmmr_n", "max_abs")
KIND_SCALARS = {
    RESID: (*WIDTH_SCALARS, "cos_sum", "cos_n"),
    MLP: WIDTH_SCALARS,
    ATTN: ("ent_sum", "ent_n"),
}


@dataclass(frozen=True)
class Site:
    """A measured point: `embed`, `block_03`, `final` (residual stream), `mlp_03`, `attn_03`."""

    name: str
    kind: str


def all_sites(n_layers: int) -> list[Site]:
    """Every site of an `n_layers` model, residual stream first, in depth order."""
    sites = [Site("embed", RESID)]
    sites += [Site(f"block_{i:02d}", RESID) for i in range(n_layers)]
    sites.append(Site("final", RESID))
    sites += [Site(f"mlp_{i:02d}", MLP) for i in range(n_layers)]
    sites += [Site(f"attn_{i:02d}", ATTN) for i in range(n_layers)]
    return sites


def select_sites(names: list[str], n_layers: int) -> list[Site]:
    """The sites named in `metrics.sites` (`all`, `resid`, `mlp`, `attn` or site names)."""
    sites = all_sites(n_layers)
    by_name = {s.name: s for s in sites}
    chosen: set[str] = set()
    for raw in names:
        name = str(raw)
        if name == "all":
            chosen.update(by_name)
        elif name in (RESID, MLP, ATTN):
            chosen.update(s.name for s in sites if s.kind == name)
        else:
            m = SITE_NAME.match(name)
            if m and m.group(3) is not None:
                name = f"{m.group(2)}_{int(m.group(3)):02d}"
            if name not in by_name:
                raise ValueError(
                    f"metrics.sites: unknown site {raw!r}; use all, resid, mlp, attn, embed, "
                    f"final, or block_NN / mlp_NN / attn_NN with NN < model.n_layers={n_layers}"
                )
            chosen.add(name)
    return [s for s in sites if s.name in chosen]


def chunk_taps(chunk: nn.Module) -> list[tuple[str, nn.Module]]:
    """(site name, module whose forward output is the site's activation) of one GPT chunk."""
    taps: list[tuple[str, nn.Module]] = []
    if chunk.embed is not None:
        taps.append(("embed", chunk.embed_tap))
    for key, block in chunk.layers.items():
        i = int(key)
        taps.append((f"block_{i:02d}", block))
        taps.append((f"mlp_{i:02d}", block.mlp.hidden))
        taps.append((f"attn_{i:02d}", block.attn.qk_tap))
    if chunk.head is not None:
        taps.append(("final", chunk.final_tap))
    return taps


def distributed_kth(a_NF: torch.Tensor, k: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Per row, the exact k-th smallest (0-based) of the non-negative values whose columns are
    spread over the ranks of `group`. Non-negative float32 values order like their int32 bit
    patterns, so a bisection on the bit pattern with a global count per step finds the value."""
    bits_NF = a_NF.float().contiguous().view(torch.int32)
    lo_N = torch.zeros(a_NF.shape[0], dtype=torch.int64, device=a_NF.device)
    hi_N = torch.full_like(lo_N, 2**31 - 1)
    for _ in range(31):  # the interval [0, 2^31) halves each step
        mid_N = (lo_N + hi_N) // 2
        count_N = (bits_NF <= mid_N[:, None]).sum(-1)
        dist.all_reduce(count_N, group=group)
        enough_N = count_N > k
        hi_N = torch.where(enough_N, mid_N, hi_N)
        lo_N = torch.where(enough_N, lo_N, mid_N + 1)
    return lo_N.to(torch.int32).view(torch.float32)


class Collector:
    """Hooks for one metric step; `attach`, run the step, `reduce`, `detach`.

    `rows[m]` are the rows (sequences) of the m-th micro batch to measure (`measured_rows`);
    None measures every row of every forward pass.
    """

    def __init__(
        self, sites: list[Site], mesh: Mesh, rows: list[torch.Tensor] | None = None
    ) -> None:
        self.sites = sites
        self.mesh = mesh
        self.rows = rows
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.hooked: list[Site] = []
        self.calls: dict[str, int] = {}
        self._last_resid: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
        self.partials: dict[str, dict[str, torch.Tensor]] = {}

    # -- hooks -----------------------------------------------------------------------------

    def attach(self, chunks: list[nn.Module]) -> None:
        """Register a forward hook on every selected site held by `chunks`."""
        wanted = {s.name: s for s in self.sites}
        for chunk in chunks:
            # residual-stream sites hold this TP rank's part of the sequence (sequence parallel)
            split = bool(getattr(getattr(chunk, "factory", None), "sequence_parallel", False))
            for name, module in chunk_taps(chunk):
                if name in wanted:
                    self.hooked.append(wanted[name])
                    hook = self._hook(wanted[name], split)
                    self.handles.append(module.register_forward_hook(hook))
        order = {s.name: i for i, s in enumerate(self.sites)}
        self.hooked.sort(key=lambda s: order[s.name])

    def detach(self) -> None:
        """Remove every hook (safe to call twice)."""
        for h in self.handles:
            h.remove()
        self.handles = []
        self._last_resid = None

    def _hook(self, site: Site, seq_split: bool = False):
        def hook(module: nn.Module, inputs, output) -> None:
            x = output[0] if isinstance(output, tuple) else output
            if x.device.type == "meta" or recomputing():  # shape inference, or a recompute
                return
            call = self.calls.get(site.name, 0)
            self.calls[site.name] = call + 1
            rows = None
            if self.rows is not None:
                if call >= len(self.rows) or self.rows[call].numel() == 0:
                    return
                rows = self.rows[call].to(x.device)
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                if site.kind == ATTN:
                    q, k = (t if rows is None else t[rows] for t in output[:2])
                    part = self._partial_attn(q, k)
                elif site.kind == MLP:
                    part = self._partial_mlp(output if rows is None else output[rows])
                elif self._last_resid is not None and self._last_resid[0] is output:
                    # `final` sees the very tensor the last block returned: measured already
                    part = dict(self._last_resid[1])
                else:
                    x_BTD = output if rows is None else output[rows]
                    part = self._partial_resid(x_BTD, seq_split)
                    self._last_resid = (output, part)
            self._add(site.name, part)

        return hook

    def _add(self, name: str, part: dict[str, torch.Tensor]) -> None:
        """Accumulate one micro batch's partials (sums add up, `max_abs` takes the max)."""
        total = self.partials.get(name)
        if total is None:
            self.partials[name] = dict(part)
            return
        for key, value in part.items():
            op = torch.maximum if key == "max_abs" else torch.add
            total[key] = op(total[key], value)

    def _partial_resid(self, x_BTD: torch.Tensor, seq_split: bool) -> dict[str, torch.Tensor]:
        """Partials of a residual site; with `seq_split` x_BTD is this TP rank's part of each
        sequence and the partials are summed over TP here, so every TP rank has the whole."""
        if self.mesh.tp_rank != 0 and not seq_split:  # replicated: tp_rank 0 measures it
            return {}
        B, T, D = x_BTD.shape
        x_NF = x_BTD.detach().reshape(B * T, D).float()
        mean_N = torch.sum(x_NF, dim=-1, dtype=torch.float64) / D
        a_2NF = torch.cat([x_NF.abs(), (x_NF - mean_N[:, None].float()).abs()])
        max_2N, median_2N = a_2NF.amax(dim=-1), stats.lower_median(a_2NF)
        part = self._width_partials(x_NF, mean_N, max_2N, median_2N)
        total_BD, diag_B = stats.cosine_terms(x_BTD.detach())
        if seq_split and self.mesh.tp > 1:
            group = self.mesh.tp_group
            sums = [v for k, v in part.items() if k != "max_abs"] + [total_BD, diag_B]
            flat = torch.cat([t.reshape(-1) for t in sums])
            dist.all_reduce(flat, group=group)
            for t, piece in zip(sums, flat.split([t.numel() for t in sums]), strict=True):
                t.copy_(piece.view_as(t))
            dist.all_reduce(part["max_abs"], op=dist.ReduceOp.MAX, group=group)
            T *= self.mesh.tp
        cos_B = stats.cosine_from_terms(total_BD, diag_B, T)
        part.update(cos_sum=cos_B.sum(), cos_n=self._scalar(B, x_NF))
        return part

    def _partial_mlp(self, h_BTF: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.mesh
        x_NF = h_BTF.detach().reshape(-1, h_BTF.shape[-1]).float()
        width = x_NF.shape[-1] * m.tp
        sum_N = torch.sum(x_NF, dim=-1, dtype=torch.float64)
        if m.tp > 1:
            dist.all_reduce(sum_N, group=m.tp_group)
        mean_N = sum_N / width
        # raw |x| and width-centred |x - mean| stacked: one selection (or bisection) for both
        a_2NF = torch.cat([x_NF.abs(), (x_NF - mean_N[:, None].float()).abs()])
        max_2N = a_2NF.amax(dim=-1)
        if m.tp == 1:
            median_2N = stats.lower_median(a_2NF)
        else:
            dist.all_reduce(max_2N, op=dist.ReduceOp.MAX, group=m.tp_group)
            median_2N = distributed_kth(a_2NF, stats.lower_median_rank(width), m.tp_group)
        return self._width_partials(x_NF, mean_N, max_2N, median_2N)

    def _partial_attn(self, q_BHTK: torch.Tensor, k_BHTK: torch.Tensor) -> dict[str, torch.Tensor]:
        ent_sum, ent_n = stats.attention_entropy(q_BHTK.detach(), k_BHTK.detach())
        return {"ent_sum": ent_sum, "ent_n": ent_n}

    def _width_partials(
        self,
        x_NF: torch.Tensor,
        mean_N: torch.Tensor,
        max_2N: torch.Tensor,
        median_2N: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Partials of a width site; `max_2N`, `median_2N` hold the raw |x| rows, then the
        width-centred ones."""
        N = x_NF.shape[0]
        sq_F, csq_F = stats.neuron_sums(x_NF, mean_N)
        mmr_sum, mmr_n = stats.mmr_terms(max_2N[:N], median_2N[:N])
        cmmr_sum, cmmr_n = stats.mmr_terms(max_2N[N:], median_2N[N:])
        return {
            "sq": sq_F,
            "csq": csq_F,
            "n": self._scalar(N, x_NF),
            "mmr_sum": mmr_sum,
            "mmr_n": mmr_n,
            "cmmr_sum": cmmr_sum,
            "cmmr_n": cmmr_n,
            "max_abs": max_2N[:N].max().double(),
        }

    @staticmethod
    def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(float(value), dtype=torch.float64, device=like.device)

    # -- reductions ------------------------------------------------------------------------

    def reduce(self, num_micro: int = 1) -> dict[str, float]:
        """Reduce the partials of this rank's `num_micro` micro batches over DP, TP and PP;
        every rank returns the same dict."""
        m = self.mesh
        for site in self.hooked:
            calls = self.calls.get(site.name, 0)
            if self.rows is not None and calls != num_micro:
                raise RuntimeError(
                    f"site {site.name} saw {calls} forward passes for {num_micro} micro batches; "
                    "metrics expect exactly one per micro batch"
                )
        partials = self._reduce_dp()
        sums_SF = torch.zeros(len(self.sites), len(FIELDS), dtype=torch.float64, device=m.device)
        max_S = torch.zeros(len(self.sites), dtype=torch.float64, device=m.device)
        row = {s.name: i for i, s in enumerate(self.sites)}
        col = {f: j for j, f in enumerate(FIELDS)}
        for site, part in zip(self.hooked, partials, strict=True):
            for field, value in self._site_fields(part).items():
                if m.tp_rank == 0 or field in SPLIT_FIELDS[site.kind]:
                    sums_SF[row[site.name], col[field]] = value
            if "max_abs" in part:
                max_S[row[site.name]] = part["max_abs"]
        for size, group in ((m.tp, m.tp_group), (m.pp, m.pp_group)):
            if size > 1:
                dist.all_reduce(sums_SF, group=group)
                dist.all_reduce(max_S, op=dist.ReduceOp.MAX, group=group)
        return self._finish(sums_SF.cpu(), max_S.cpu())

    def _zeros(self, site: Site, width: int) -> dict[str, torch.Tensor]:
        """Partials of a site that measured no row on this rank (the sums' neutral elements)."""
        dev = self.mesh.device
        out = {k: torch.zeros((), dtype=torch.float64, device=dev) for k in KIND_SCALARS[site.kind]}
        if site.kind != ATTN:
            out["sq"] = torch.zeros(width, dtype=torch.float64, device=dev)
            out["csq"] = torch.zeros(width, dtype=torch.float64, device=dev)
        return out

    def _reduce_dp(self) -> list[dict[str, torch.Tensor]]:
        """Each hooked site's partials summed (max for `max_abs`) over the DP group. A DP rank
        may hold none of the measured sequences: it contributes zeros of the same layout."""
        m = self.mesh
        partials = [self.partials.get(s.name, {}) for s in self.hooked]
        if m.dp == 1:
            return partials
        # width per site (1 for attention, 0 where nothing is measured, e.g. resid at tp_rank>0)
        size_S = torch.tensor(
            [p["sq"].numel() if "sq" in p else int(bool(p)) for p in partials],
            dtype=torch.int64,
            device=m.device,
        )
        dist.all_reduce(size_S, op=dist.ReduceOp.MAX, group=m.dp_group)
        partials = [
            self._zeros(site, int(size)) if size and not part else part
            for site, part, size in zip(self.hooked, partials, size_S.tolist(), strict=True)
        ]
        keys = [(i, k) for i, p in enumerate(partials) for k in sorted(p) if k != "max_abs"]
        if keys:
            flat = torch.cat([partials[i][k].reshape(-1) for i, k in keys])
            dist.all_reduce(flat, group=m.dp_group)
            for (i, k), piece in zip(keys, flat.split([partials[i][k].numel() for i, k in keys])):
                partials[i][k] = piece.view_as(partials[i][k])
        maxes = [i for i, p in enumerate(partials) if "max_abs" in p]
        if maxes:
            flat = torch.stack([partials[i]["max_abs"] for i in maxes])
            dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=m.dp_group)
            for i, v in zip(maxes, flat, strict=True):
                partials[i]["max_abs"] = v
        return partials

    @staticmethod
    def _site_fields(part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | float]:
        """The FIELDS of one site from its DP-reduced partials (present fields only)."""
        scalars = ("mmr_sum", "mmr_n", "cmmr_sum", "cmmr_n", "cos_sum", "cos_n", "ent_sum", "ent_n")
        out: dict[str, torch.Tensor | float] = {k: part[k] for k in scalars if k in part}
        if "sq" in part:
            out["sum_s2"], out["sum_s4"] = stats.neuron_moments(part["sq"], part["n"])
            out["sum_cs2"], out["sum_cs4"] = stats.neuron_moments(part["csq"], part["n"])
            out["width"] = float(part["sq"].numel())
        if part:
            out["present"] = 1.0
        return out

    def _finish(self, sums_SF: torch.Tensor, max_S: torch.Tensor) -> dict[str, float]:
        record: dict[str, float] = {}
        kurt: list[float] = []
        for i, site in enumerate(self.sites):
            fields = dict(zip(FIELDS, sums_SF[i].tolist(), strict=True))
            if fields["present"] < 1:
                raise RuntimeError(f"no rank measured site {site.name}; is it in the model?")
            for key, value in stats.finish_site(fields, float(max_S[i]), site.kind).items():
                record[f"{key}/{site.name}"] = value
            if site.kind == RESID:
                kurt.append(record[f"of/kurtosis/{site.name}"])
        if kurt:
            record["of/kurtosis_max"] = max(kurt)
            record["of/kurtosis_mean"] = sum(kurt) / len(kurt)
        return record
