"""`ofs-scale eval`: lm-evaluation-harness on a trained run through its export, with task YAML
files and data written here (nothing downloaded); its accuracy equals the one our own model
gives by scoring the same choices, and its rolling perplexity our own summed log-likelihood."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from ofs_scale.testing.distributed import run_distributed
from tests.helpers import tiny_overrides

pytest.importorskip("lm_eval")

pytestmark = pytest.mark.usefixtures("single_thread")

QUESTIONS = [
    ("def f(x):\n    return", [" x", " import", " class"], 0),
    ("import os\nimport", [" sys", " def", " 12"], 0),
    ("for i in", [" range(3):", " return", " else"], 0),
    ("class Foo(object):\n    def", [" __init__(self):", " return", " import"], 0),
    ("x = [1, 2,", [" 3]", " def", " class"], 0),
    ("if x is None:\n   ", [" return", " import", " class"], 0),
]
TEXTS = ["def add(a, b):\n    return a + b\n", "import sys\nprint(sys.argv)\n"]


def write_tasks(root) -> None:
    """A multiple-choice task and a rolling-perplexity task over local JSON lines."""
    root.mkdir(parents=True, exist_ok=True)
    mc = [{"question": q, "choices": c, "label": y} for q, c, y in QUESTIONS]
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    (root / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    common = "dataset_path: json\ntest_split: test\n"
    (root / "ofs_mc.yaml").write_text(
        f"task: ofs_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{label}}'\ndoc_to_choice: '{{choices}}'\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n"
    )
    (root / "ofs_text.yaml").write_text(
        f"task: ofs_text\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'text.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )


def _train_and_eval(rank, overrides, run_dir, task_dir):
    import sentencepiece as spm

    from ofs_scale.config import load_config
    from ofs_scale.eval.__main__ import main as eval_main
    from ofs_scale.export.__main__ import export_run, tokenizer_model
    from ofs_scale.quant.evaluate import load_run, resolve
    from ofs_scale.trainer.checkpointing import CheckpointCallback
    from ofs_scale.trainer.loop import Trainer

    Trainer(load_config(None, overrides), callbacks=[CheckpointCallback()]).fit()
    argv = [str(run_dir), "--tasks", "ofs_mc,ofs_text", "--include-path", str(task_dir)]
    rc = eval_main([*argv, "--batch-size", "2"])
    # our own answers: sum of log p(choice tokens | question) with the trained model
    run = load_run(resolve(run_dir))
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model(run)))
    model = run.engine.model.eval()

    def logprob(ctx: list[int], cont: list[int]) -> float:
        whole = ctx + cont
        ids = torch.tensor([whole])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[:, :-1]).float(), dim=-1)[0]
        return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))

    def choice_logprob(question: str, choice: str) -> float:
        ctx = sp.encode(question)
        return logprob(ctx, sp.encode(question + choice)[len(ctx) :])

    correct = [
        max(range(len(c)), key=lambda j: choice_logprob(q, c[j])) == y for q, c, y in QUESTIONS
    ]
    # rolling: the first token is predicted after the end-of-document token
    nll = [-logprob([sp.eos_id()], sp.encode(t)) for t in TEXTS]
    export_run(run_dir, task_dir / "hf")  # the plain export, for the HF-directory form
    rc_hf = eval_main([str(task_dir / "hf"), "--tasks", "ofs_mc", "--include-path", str(task_dir)])
    return {"rc": rc, "rc_hf": rc_hf, "acc": sum(correct) / len(correct), "nll": nll}


def test_eval_on_a_run_matches_our_model(tiny_corpus, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # nothing may be downloaded
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides(tiny_corpus, cache_dir, run_dir), "data.seq_len=32"]
    overrides.append("train.stages=[{name: main, steps: 20, lr_schedule: constant}]")
    write_tasks(tmp_path / "tasks")
    (got,) = run_distributed(_train_and_eval, 1, overrides, run_dir, tmp_path / "tasks")
    assert got["rc"] == 0 and got["rc_hf"] == 0
    (written,) = (run_dir / "lm_eval").glob("*.json")
    result = json.loads(written.read_text())
    assert result["ofs_scale"]["step"] == 20
    assert result["results"]["ofs_mc"]["acc,none"] == pytest.approx(got["acc"])
    # word perplexity = exp(total nll / total words)
    words = sum(len(re.split(r"\s+", t)) for t in TEXTS)  # lm-eval's word count
    want = math.exp(sum(got["nll"]) / words)
    assert result["results"]["ofs_text"]["word_perplexity,none"] == pytest.approx(want, rel=1e-4)
    assert (tmp_path / "tasks" / "hf" / "lm_eval").is_dir()
