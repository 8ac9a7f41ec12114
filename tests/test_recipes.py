"""Reproduction recipes (configs/repro/, docs/reproduce.md): every recipe validates and dry-runs,
every sweep expands into valid points, every header's planner numbers still hold, and a CPU-sized
miniature of the ~130M CodeParrot sweep runs end to end through the launcher, the int8 hook and
the report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from ofs_scale.config import load_config
from ofs_scale.launch.sweep import load_sweep
from tests.helpers import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
REPRO = ROOT / "configs/repro"

# single-run recipes: (file, parameter range the study's size name implies)
RECIPES = {
    "codeparrot130m.yaml": (1.2e8, 1.8e8),
    "opt125m.yaml": (1.1e8, 1.4e8),
    "paper1b2_pre.yaml": (1.1e9, 1.4e9),
    "paper1b2_op.yaml": (1.1e9, 1.4e9),
    "paper7b_pre.yaml": (6.5e9, 7.0e9),
    "paper7b_op.yaml": (6.5e9, 7.0e9),
}
# sweeps built on them: (file, number of points)
SWEEPS = {
    "codeparrot130m_block_x_optim.yaml": 6,
    "codeparrot130m_lr.yaml": 6,
    "codeparrot130m_eps.yaml": 6,
    "codeparrot130m_norms.yaml": 6,
    "opt125m_quant.yaml": 4,
}
HEADER_FIELDS = ("Reproduces:", "Should reach:", "Dataset:", "Plan:", "GPU-hours", "Run")
QUANT_HOOK = "ofs_scale.quant.hook:post_run"


def _header(path: Path) -> str:
    """The leading comment block of a YAML file."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# "))
    return "\n".join(lines)


@pytest.fixture(scope="module")
def tiny_prepared(tiny_corpus, tmp_path_factory) -> list[str]:
    """Overrides that point a recipe at a tiny dataset made by `ofs-scale prepare`: the dry run
    opens the prepared datasets a recipe names and checks them against its vocabulary."""
    from ofs_scale.data.prepare.cli import main as prepare_main

    out = tmp_path_factory.mktemp("prepared") / "tiny"
    args = [str(tiny_corpus), "--out", str(out), "--vocab-size", "512", "--quiet"]
    assert prepare_main(args) == 0
    return [f"data.datasets=[{{path: {out}}}]", "data.vocab_size=512"]


@pytest.fixture(scope="module", autouse=True)
def single_process():
    """The planner and dry runs size models on the meta device inside a one-process group;
    tear it down after this module."""
    yield
    from ofs_scale.parallel.mesh import destroy_mesh

    destroy_mesh()


def test_every_recipe_is_listed_and_documented():
    recipes = {p.name for p in REPRO.glob("*.yaml")} - {"cpu_base.yaml", "cpu_grid.yaml"}
    assert recipes == set(RECIPES) | set(SWEEPS)
    doc = (ROOT / "docs/reproduce.md").read_text()
    for name in sorted(recipes):
        header = _header(REPRO / name)
        missing = [f for f in HEADER_FIELDS if f not in header]
        assert not missing, f"{name}: header lacks {missing}"
        assert "2405.19279" in header, name
        assert f"configs/repro/{name}" in doc, f"docs/reproduce.md does not list {name}"
    assert "docs/reproduce.md" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_dry_runs(name, tiny_prepared, capsys):
    from ofs_scale.model.shapes import param_count
    from ofs_scale.trainer.main import main

    path = REPRO / name
    # without the prepared dataset the dry run says what to prepare
    assert main(["--config", str(path), "--dry-run"]) == 2
    assert "ofs-scale prepare" in capsys.readouterr().out
    # with a tiny prepared dataset in its place, the recipe validates and sizes
    assert main(["--config", str(path), "--dry-run", *tiny_prepared]) == 0
    out = capsys.readouterr().out
    assert "parameters (total)" in out and "tokens" in out
    cfg = load_config(path)
    low, high = RECIPES[name]
    assert low < param_count(cfg, cfg.data.vocab_size) < high


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_names_the_dataset_its_header_prepares(name):
    """`data.datasets` is the directory the header's `ofs-scale prepare` command writes, with
    the recipe's vocabulary size."""
    cfg = load_config(REPRO / name)
    assert len(cfg.data.datasets) == 1 and cfg.data.datasets[0].path.startswith("data/prepared/")
    command = re.search(r"ofs-scale prepare (.*?--out \S+)", _header(REPRO / name), re.S)
    assert command, f"{name}: no ofs-scale prepare command in the header"
    text = command.group(1)
    assert f"--vocab-size {cfg.data.vocab_size} " in text.replace("\n", " ")
    assert text.endswith(f"--out {cfg.data.datasets[0].path}")


@pytest.mark.parametrize("name", sorted(SWEEPS))
def test_sweep_points_validate_and_dry_run(name, tiny_prepared, capsys):
    from ofs_scale.trainer.main import dry_run

    sweep = load_sweep(REPRO / name)
    tiny = {p.name: p.cfg for p in load_sweep(REPRO / name, extra_overrides=tiny_prepared).points}
    assert len(sweep.points) == SWEEPS[name]
    spec = yaml.safe_load((REPRO / name).read_text())
    base = load_config(ROOT / spec["config"])
    for point in sweep.points:
        cfg = point.cfg
        for key, value in point.params.items():
            section, field = key.split(".")
            assert getattr(getattr(cfg, section), field) == value, (point.name, key)
        # only the grid keys (and the run identity) differ from the base recipe
        assert cfg.total_steps == base.total_steps
        assert cfg.train.global_batch == base.train.global_batch
        assert cfg.data.seq_len == base.data.seq_len
        assert cfg.run.out_dir.startswith(str(sweep.out_dir))
        dry_run(tiny[point.name])
        assert "parameters (total)" in capsys.readouterr().out
    hooks = sweep.points[0].cfg.launch.post_run
    # the quantisation table and the headline block x optimizer grid evaluate every point
    if name in ("opt125m_quant.yaml", "codeparrot130m_block_x_optim.yaml"):
        assert hooks == [QUANT_HOOK]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_header_plan_fits_and_its_gpu_hours_hold(name, capsys):
    """The `ofs-scale plan ... --gpus N --gpu-mem M` line of each header still fits, and the
    GPU-hours the header states are the planner's steps x step time x GPUs (within 10%)."""
    from ofs_scale.analysis import plan_cli
    from ofs_scale.analysis.plan import plan

    path = REPRO / name
    header = _header(path)
    m = re.search(r"ofs-scale plan (\S+) --gpus (\d+) --gpu-mem (\d+)", header)
    assert m and m.group(1) == f"configs/repro/{name}", name
    gpus, mem = int(m.group(2)), m.group(3)
    assert plan_cli.main([str(path), "--gpus", str(gpus), "--gpu-mem", mem]) == plan_cli.FITS
    capsys.readouterr()
    cfg = load_config(path)
    p = plan(cfg, gpus)
    want = cfg.total_steps * p.step_time_s * gpus / 3600
    stated = float(re.search(r"([\d][\d,.]*) GPU-hours", header).group(1).replace(",", ""))
    assert abs(stated - want) <= max(0.1 * want, 0.05), (name, stated, want)


def _miniature(tmp_path: Path, corpus: Path, cache: Path) -> tuple[Path, dict]:
    """The ~130M block x optimizer sweep at CPU size: the real base recipe, the real common
    overrides (the int8 hook) and the real grid keys with the first two values of each, on
    tiny shapes, the recipe's stages with 1 and 2 steps, on CPU."""
    real = REPRO / "codeparrot130m_block_x_optim.yaml"
    spec = yaml.safe_load(real.read_text())
    base = load_config(ROOT / spec["config"])
    stages = [
        {
            "name": s.name,
            "steps": i + 1,
            "lr_schedule": s.lr_schedule,
            "min_lr_ratio": s.min_lr_ratio,
        }
        for i, s in enumerate(base.train.stages)
    ]
    size = [
        o
        for o in tiny_overrides(corpus, cache, tmp_path / "unused")
        if not o.startswith(("run.", "train.stages", "metrics.every"))
    ]
    overrides = [
        *spec["overrides"],
        "data.datasets=[]",  # the tiny corpus instead of the prepared CodeParrot
        *size,
        f"train.stages={json.dumps(stages)}",
        "train.dtype=fp32",
        "train.device=cpu",
        "metrics.every=1",
        "checkpoint.every=0",
        "logging.every=1",
        "launch.gpus_per_node=0",
        "launch.tasks_per_node=1",
        "launch.cpus_per_task=1",
        "launch.time_min=20",
    ]
    grid = {key: values[:2] for key, values in spec["grid"].items()}
    mini = {
        "name": "mini_codeparrot130m",
        "config": str(ROOT / spec["config"]),
        "out_dir": str(tmp_path / "sweep"),
        "overrides": overrides,
        "grid": grid,
    }
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(mini, sort_keys=False))
    return path, grid


def test_miniature_130m_sweep_runs_through_launcher_quant_hook_and_report(
    tiny_corpus, cache_dir, tmp_path, monkeypatch, capsys
):
    from ofs_scale.analysis.report import main as report_main
    from ofs_scale.launch.__main__ import main as launch_main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("OFS_QUANT_ARGS", "--calib-batches 2 --eval-batches 1 --device cpu")
    path, grid = _miniature(tmp_path, tiny_corpus, cache_dir)
    mini = load_sweep(path)
    real_points = load_sweep(REPRO / "codeparrot130m_block_x_optim.yaml").points
    real = {tuple(p.params.items()): p.cfg for p in real_points}
    # same structure: every miniature point is the real point of the same grid values, shrunk
    for p in mini.points:
        r = real[tuple(p.params.items())]
        for section, keys in {
            "model": ("block", "norm", "activation", "position", "bias", "tie_embeddings"),
            "optim": ("name", "lr", "betas", "eps", "weight_decay", "precondition_frequency"),
        }.items():
            for key in keys:
                got, want = getattr(p.cfg, section), getattr(r, section)
                assert getattr(got, key) == getattr(want, key), (p.name, section, key)
        assert [(s.name, s.lr_schedule) for s in p.cfg.train.stages] == [
            (s.name, s.lr_schedule) for s in r.train.stages
        ]
        assert p.cfg.launch.post_run == r.launch.post_run == [QUANT_HOOK]

    assert launch_main(["submit", "--sweep", str(path), "--local", "--wait"]) == 0
    sweep_dir = tmp_path / "sweep"
    index = json.loads((sweep_dir / "sweep.json").read_text())
    n_points = len(grid["model.block"]) * len(grid["optim.name"])
    assert len(index["points"]) == n_points == 4
    for point in index["points"]:
        run_dir = Path(point["out_dir"])
        quant = json.loads((run_dir / "quant_stage_decay.json").read_text())
        assert quant["step"] == 3 and {"fp", "W8A8"} <= set(quant["results"])
        assert (run_dir / "checkpoints/stage_decay/ofs_meta.json").is_file()
    capsys.readouterr()
    assert report_main([str(sweep_dir)]) == 0
    rows = json.loads((sweep_dir / "report.json").read_text())
    assert [r["steps"] for r in rows] == [3] * n_points
    for r in rows:
        assert r["w8a8_ppl"] > 0 and r["w8a8_increase_pct"] is not None
        assert r["kurtosis_max"] >= 1.0 and r["final_loss"] > 0
    assert (sweep_dir / "kurtosis.png").is_file()
