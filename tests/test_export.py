"""Hugging Face export: every block type loads with AutoModelForCausalLM and gives our logits;
the tokenizer encodes as sentencepiece does; TP=2 and PP=2 checkpoints export through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from ofs_scale.testing.distributed import run_distributed
from tests.helpers import tiny_overrides

pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("single_thread")

# name -> overrides; `llama` ones must come out as a stock LlamaForCausalLM
CASES = {
    "llama": ["model.block=pre", "model.norm=rmsnorm", "model.activation=swiglu"],
    "llama_tied": [
        "model.block=pre",
        "model.norm=rmsnorm",
        "model.activation=swiglu",
        "model.tie_embeddings=true",
    ],
    "pre_layernorm_gelu": ["model.block=pre"],
    "post_relu_qknorm": ["model.block=post", "model.activation=relu", "model.qk_norm=true"],
    "op": ["model.block=op", "model.beta_trainable=true", "model.final_norm=false"],
    "op_auto_beta_swiglu": ["model.block=op", "model.beta=auto", "model.activation=swiglu"],
    "pre_psbn_learned_bias": [
        "model.block=pre",
        "model.norm=psbn",
        "model.position=learned",
        "model.bias=true",
    ],
    "post_batchless_embed_norm": [
        "model.block=post",
        "model.norm=batchless",
        "model.embed_norm=true",
    ],
    "pre_srms": ["model.block=pre", "model.norm=srms", "model.rope_theta=500.0"],
    "pre_no_norm": ["model.block=pre", "model.norm=none", "model.final_norm=false"],
}


def _compare(hf_dir, model, vocab: int, seq_len: int) -> float:
    """Max |logit difference| between our model and the export loaded by AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32)
    tokens = torch.randint(0, vocab, (3, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.eval()(tokens)
        got = hf.eval()(tokens).logits
    assert got.shape == want.shape
    return float((got - want).abs().max())


def _every_block(rank, overrides, out_root):
    from ofs_scale.config import load_config
    from ofs_scale.export.convert import export_model
    from ofs_scale.model.build import build_model
    from ofs_scale.parallel.mesh import init_mesh

    mesh, out = init_mesh(1, 1), {}
    for name, extra in CASES.items():
        cfg = load_config(None, [*overrides, *extra])
        model = build_model(cfg, mesh, 500)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # move every weight and statistic off its initial value
            for t in [*model.parameters(), *model.buffers()]:
                if t.is_floating_point():
                    t.add_(0.2 * torch.rand(t.shape, generator=g))
        arch = export_model(model, out_root / name, None, cfg.data.seq_len)
        cls = json.loads((out_root / name / "config.json").read_text())["architectures"]
        out[name] = (arch, cls, _compare(out_root / name, model, 500, cfg.data.seq_len))
    return out


def test_every_block_type_matches_its_export(tiny_corpus, cache_dir, tmp_path):
    overrides = tiny_overrides(tiny_corpus, cache_dir, tmp_path / "run")
    (results,) = run_distributed(_every_block, 1, overrides, tmp_path / "hf")
    for name, (arch, cls, diff) in results.items():
        want = "llama" if name.startswith("llama") else "ofs"
        assert arch == want, name
        assert cls == (["LlamaForCausalLM"] if want == "llama" else ["OFSForCausalLM"]), name
        assert diff <= 1e-4, (name, diff)
    # the remote-code export carries its modelling file and needs nothing from ofs_scale
    source = (tmp_path / "hf" / "op" / "modelling_ofs.py").read_text()
    assert "from ofs_scale" not in source and "import ofs_scale" not in source


def _train(rank, overrides):
    from ofs_scale.config import load_config
    from ofs_scale.trainer.checkpointing import CheckpointCallback
    from ofs_scale.trainer.loop import Trainer

    Trainer(load_config(None, overrides), callbacks=[CheckpointCallback()]).fit()


def _export_and_compare(rank, run_dir, hf_dir):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from ofs_scale.export.__main__ import main as export_main
    from ofs_scale.quant.evaluate import load_run, resolve

    rc = export_main([str(run_dir), str(hf_dir)])
    run = load_run(resolve(run_dir))
    diff = _compare(hf_dir, run.engine.model, 500, run.cfg.data.seq_len)
    info = json.loads((hf_dir / "ofs_export.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=info["tokenizer"])
    tok = AutoTokenizer.from_pretrained(hf_dir)
    texts = [
        "def f(x):\n    return x  +  1\n",
        "  two leading spaces",
        " one",
        "\u00fcn\u00efc\u00f6d\u00e9 \u65e5\u672c 123",
    ]
    same = all(tok(t)["input_ids"] == sp.encode(t) for t in texts)
    return {
        "rc": rc,
        "diff": diff,
        "arch": info["arch"],
        "tokenizer_same": same,
        "eos": tok.eos_token_id == sp.eos_id(),
        "decode": tok.decode(sp.encode(texts[0])),
    }


@pytest.mark.parametrize(
    ("layout", "extra"),
    [
        (["parallel.tp=2"], CASES["llama"]),
        (["parallel.pp=2"], ["model.block=op", "model.norm=psbn"]),
    ],
    ids=["tp2-llama", "pp2-op-psbn"],
)
def test_parallel_checkpoint_exports(tiny_corpus, cache_dir, tmp_path, layout, extra):
    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides(tiny_corpus, cache_dir, run_dir), *extra, *layout]
    overrides.append("train.stages=[{name: main, steps: 6, lr_schedule: constant}]")
    run_distributed(_train, 2, overrides)
    (got,) = run_distributed(_export_and_compare, 1, run_dir, tmp_path / "hf")
    assert got["rc"] == 0
    assert got["arch"] == ("llama" if "parallel.tp=2" in layout else "ofs")
    assert got["diff"] <= 1e-4
    assert got["tokenizer_same"] and got["eos"]
    assert got["decode"] == "def f(x):\n    return x  +  1\n"
