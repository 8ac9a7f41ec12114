"""The `ofs-scale` command: every subcommand answers --help with its own parser, the top-level
help lists them all without importing torch, the console script is installed, and the old
`python -m ofs_scale.<x>` forms still run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ofs_scale.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = [
    *("train", "launch", "quant", "report", "cmd", "plan", "plot", "ckpt", "prepare"),
    *("export", "eval", "inspect", "sample"),
]
MODULE_FORMS = ["train", "launch", "quant", "report", "cmd"]  # python -m ofs_scale.<x>

# One interpreter for all the --help calls (each sub-main that imports torch costs a second or
# more): first the top-level help, checked not to import torch or megatron-core, then every
# `ofs-scale SUB --help` and every `python -m ofs_scale.<x> --help`.
HELP_SCRIPT = textwrap.dedent(
    """
    import contextlib, io, json, runpy, sys

    from ofs_scale.cli import build_parser, main

    def run(fn):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                code = fn()
            except SystemExit as e:
                code = e.code
        return {"code": code, "out": out.getvalue()}

    def heavy():
        return sorted({m.split(".")[0] for m in sys.modules} & {"torch", "megatron"})

    build_parser()
    result = {"top": run(lambda: main(["--help"])), "heavy": heavy(), "sub": {}, "module": {}}
    for sub in json.loads(sys.argv[1]):
        result["sub"][sub] = run(lambda: main([sub, "--help"]))
    for name in json.loads(sys.argv[2]):
        sys.argv = [name, "--help"]
        module = f"ofs_scale.{name}"
        result["module"][name] = run(lambda: runpy.run_module(module, run_name="__main__"))
    print(json.dumps(result))
    """
)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def helps() -> dict:
    done = _run(
        [sys.executable, "-c", HELP_SCRIPT, json.dumps(SUBCOMMANDS), json.dumps(MODULE_FORMS)]
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_top_level_help_lists_every_subcommand_without_torch(helps):
    assert sorted(COMMANDS) == sorted(SUBCOMMANDS)
    assert helps["top"]["code"] == 0
    for sub in SUBCOMMANDS:
        assert f"    {sub} " in helps["top"]["out"], sub
    assert helps["heavy"] == [], "building the parser or --help imported " + str(helps["heavy"])


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_subcommand_help_is_its_own(helps, sub):
    got = helps["sub"][sub]
    assert got["code"] == 0, got
    assert got["out"].startswith(f"usage: ofs-scale {sub} "), got["out"][:200]


@pytest.mark.parametrize("name", MODULE_FORMS)
def test_python_m_forms_still_run(helps, name):
    got = helps["module"][name]
    assert got["code"] == 0, got
    assert got["out"].startswith(f"usage: ofs-scale {name} ")


def test_python_m_ofs_scale_imports_no_torch():
    done = _run([sys.executable, "-X", "importtime", "-m", "ofs_scale", "--help"])
    assert done.returncode == 0, done.stderr
    assert all(f"    {sub} " in done.stdout for sub in SUBCOMMANDS)
    imported = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines()}
    assert not imported & {"torch", "megatron"}


def test_console_script_installed_and_plans():
    script = Path(sys.executable).parent / "ofs-scale"
    assert script.is_file(), f"{script} missing: pip install -e . registers it"
    done = _run([str(script), "--help"])
    assert done.returncode == 0 and "plan" in done.stdout, done.stderr
    done = _run([str(script), "plan", "configs/op7b.yaml", "--gpus", "64", "--gpu-mem", "80"])
    assert done.returncode == 0, done.stdout + done.stderr
    for text in ("optimizer state", "FLOPs per token", "fits", "tp=2 pp=1 dp=32"):
        assert text in done.stdout, text


def test_arguments_reach_the_subcommand_and_typos_are_named(tmp_path, capsys):
    # argv after the subcommand is passed as typed: plot's own error for a run without metrics
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "p")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
    for argv in (["trian"], []):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert "invalid choice: 'trian'" in capsys.readouterr().err


LIGHT_SCRIPT = textwrap.dedent(
    """
    import contextlib, io, json, sys

    from ofs_scale.cli import main

    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            code = main(sys.argv[1:])
        except SystemExit as e:
            code = e.code
    heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "megatron", "submitit"})
    print(json.dumps({"code": code, "heavy": heavy, "out": out.getvalue()}))
    """
)


def _light(argv: list[str]) -> dict:
    done = _run([sys.executable, "-c", LIGHT_SCRIPT, *argv])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_subcommand_help_imports_no_torch(sub):
    got = _light([sub, "--help"])
    assert got["code"] == 0 and got["out"].startswith(f"usage: ofs-scale {sub} "), got
    assert got["heavy"] == [], f"ofs-scale {sub} --help imported {got['heavy']}"


def test_launch_status_and_tail_import_no_torch(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"step": 1, "stage": "main", "loss": 5.25, "lr": 1e-3, "grad_norm": 0.5, "mfu": 0.25},
        {"step": 1, "val_loss": 5.5, "val_ppl": 244.7},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    got = _light(["launch", "status", str(run)])
    assert got["code"] == 0 and got["heavy"] == [], got
    # piped (not a terminal): one tab-separated line per row, the path in full
    header, row = got["out"].splitlines()[:2]
    assert header.split("\t")[:2] == ["run", "job"]
    assert row.split("\t")[0] == str(run) and "5.2500" in row
    got = _light(["launch", "tail", str(run), "-n", "5"])
    assert got["code"] == 0 and got["heavy"] == [], got
    lines = got["out"].splitlines()
    assert lines[0] == "step 1 [main] loss 5.2500 grad_norm 0.5 lr 1.00e-03 MFU 25.0%"
    assert lines[1] == "step 1 val_loss 5.5000 val_ppl 244.7"
    got = _light(["launch", "tail", str(run), "--json"])
    assert json.loads(got["out"].splitlines()[0]) == records[0]
