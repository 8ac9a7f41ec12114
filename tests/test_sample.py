"""`ofs-scale sample` on a PP=2 run's checkpoint, loaded into one process: greedy sampling is the
argmax loop written out here, top-k 1 is greedy, a seed repeats its draws, the CLI prints the
prompt and its continuation, and bad options stop with a message."""

from __future__ import annotations

import pytest
import torch

from ofs_scale.testing.distributed import run_distributed
from tests.helpers import tiny_overrides

pytestmark = pytest.mark.usefixtures("single_thread")


def _train(rank, overrides):
    from ofs_scale.config import load_config
    from ofs_scale.trainer.checkpointing import CheckpointCallback
    from ofs_scale.trainer.loop import Trainer

    Trainer(load_config(None, overrides), callbacks=[CheckpointCallback()]).fit()


def _sample(rank, run_dir, prompt):
    import argparse

    from ofs_scale.eval.sample import generate, load_tokenizer, sample_run
    from ofs_scale.eval.sample_cli import main
    from ofs_scale.parallel.mesh import destroy_mesh
    from ofs_scale.quant.evaluate import load_run, resolve

    run = load_run(resolve(run_dir))
    sp = load_tokenizer(run)
    model, vocab, context = run.engine.model.eval(), sp.get_piece_size(), run.cfg.data.seq_len
    ids = sp.encode(prompt)
    # the greedy continuation, one argmax at a time over the real vocabulary
    want = []
    with torch.no_grad():
        for _ in range(12):
            logits = model(torch.tensor([(ids + want)[-context:]]))[0, -1]
            want.append(int(logits[:vocab].argmax()))
    out = {"want": want}
    out["greedy"] = generate(model, ids, 12, context, vocab, temperature=0.0)
    out["top1"] = generate(model, ids, 12, context, vocab, temperature=1.0, top_k=1, seed=3)
    draws = [generate(model, ids, 12, context, vocab, 1.5, 0, seed) for seed in (5, 5, 6)]
    out["draws"] = draws
    out["in_vocab"] = all(0 <= t < vocab for d in draws for t in d)
    out["decoded"] = sp.decode(want)
    destroy_mesh()
    args = argparse.Namespace(
        path=str(run_dir), config=None, overrides=[], device="cpu", prompt=prompt,
        max_new_tokens=12, temperature=0.0, top_k=0, seed=0, num_samples=2, ignore_eos=True,
    )  # fmt: skip
    out["texts"] = sample_run(args)
    destroy_mesh()
    out["rc"] = main([str(run_dir), "--prompt", prompt, "--max-new-tokens", "4", "--device", "cpu"])
    out["bad_rc"] = main([str(run_dir), "--temperature", "-1"])
    return out


def test_greedy_sampling_is_the_argmax_loop(tiny_corpus, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides(tiny_corpus, cache_dir, run_dir), "parallel.pp=2"]
    overrides.append("train.stages=[{name: main, steps: 6, lr_schedule: constant}]")
    run_distributed(_train, 2, overrides)
    prompt = "def main(x):\n    return"
    (got,) = run_distributed(_sample, 1, run_dir, prompt)
    assert got["greedy"] == got["want"] and got["top1"] == got["want"]
    assert got["draws"][0] == got["draws"][1] != got["draws"][2]
    assert got["in_vocab"]
    # with --ignore-eos, temperature 0: every sample is the greedy one
    assert got["texts"] == [got["decoded"], got["decoded"]]
    assert got["rc"] == 0 and got["bad_rc"] == 2
