"""`ofs-scale inspect`: OF metrics of tiny random GPT-2 / OPT / Llama models built here from
transformers configs (nothing downloaded), checked against hooks written out in this file and
the single-process reference definitions."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch

from ofs_scale.metrics import stats

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB, WIDTH, LAYERS, HEADS, SEQ = 320, 48, 3, 4, 32


def build(kind: str, path) -> torch.nn.Module:
    """A tiny random model of `kind`, saved with a byte-level BPE tokenizer trained here."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, LlamaConfig, OPTConfig, PreTrainedTokenizerFast

    configs = {
        "gpt2": lambda: GPT2Config(
            vocab_size=VOCAB, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, n_positions=64
        ),
        "opt": lambda: OPTConfig(
            vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, ffn_dim=4 * WIDTH,
            num_attention_heads=HEADS, max_position_embeddings=64, word_embed_proj_dim=WIDTH,
        ),
        "llama": lambda: LlamaConfig(
            vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS,
            intermediate_size=128, num_attention_heads=HEADS, max_position_embeddings=64,
        ),
    }  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        configs[kind](), attn_implementation="eager"
    )
    with torch.no_grad():  # an outlier channel in the residual stream: kurtosis far above 1
        model.get_input_embeddings().weight[:, 5] += 2.0
    model.save_pretrained(path)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(path)
    return model.eval()


with open(textwrap.__file__) as f:
    TEXT = f.read()


def reference_hooks(kind: str, model) -> dict[str, tuple]:
    """(site, module, pre?) written out per architecture."""
    if kind == "gpt2":
        base, layers = model.transformer, model.transformer.h
        final, down = base.ln_f, [b.mlp.c_proj for b in layers]
    elif kind == "opt":
        base = model.model.decoder
        layers, final, down = base.layers, base.final_layer_norm, [b.fc2 for b in base.layers]
    else:
        base, layers = model.model, model.model.layers
        final, down = base.norm, [b.mlp.down_proj for b in layers]
    hooks = {"embed": (layers[0], True), "final": (final, True)}
    for i in range(LAYERS):
        hooks[f"block_{i:02d}"] = (layers[i], False)
        hooks[f"mlp_{i:02d}"] = (down[i], True)
    return hooks


def reference(kind: str, model, tokens) -> dict[str, float]:
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def keep(site: str, x) -> None:
        seen[site] = x[0] if isinstance(x, tuple) else x

    for site, (module, pre) in reference_hooks(kind, model).items():
        if pre:

            def pre_hook(m, args, kwargs, site=site) -> None:
                keep(site, args[0] if args else kwargs["hidden_states"])

            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(lambda m, a, o, s=site: keep(s, o)))
    with torch.no_grad():
        out = model(tokens, output_attentions=True)
    for h in handles:
        h.remove()
    want = {}
    for site, x in seen.items():
        x_ND = x.reshape(-1, x.shape[-1]).double()
        want[f"of/kurtosis/{site}"] = stats.kurtosis(x_ND)
        want[f"of/mmr/{site}"] = stats.mmr(x_ND)
        want[f"of/max_abs/{site}"] = float(x_ND.abs().max())
        if not site.startswith("mlp"):
            u = x.double() / x.double().norm(dim=-1, keepdim=True)
            c_BTT = u @ u.transpose(1, 2)
            T = x.shape[1]
            off = (c_BTT.sum(dim=(1, 2)) - c_BTT.diagonal(dim1=1, dim2=2).sum(-1)) / (T * (T - 1))
            want[f"sigprop/cos/{site}"] = float(off.mean())
    for i, p in enumerate(out.attentions):
        p = p.double()
        ent = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
        want[f"attn/entropy/attn_{i:02d}"] = float(ent.mean())
    return want


@pytest.mark.parametrize("kind", ["gpt2", "opt", "llama"])
def test_inspect_matches_hooks_written_out(kind, tmp_path):
    from ofs_scale.eval.inspect_cli import main
    from ofs_scale.eval.inspect_hf import measure, text_windows

    model = build(kind, tmp_path / kind)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / kind)
    tokens = text_windows(tokenizer, TEXT, SEQ, 4)
    got, sites = measure(model, tokens, batch_size=2)  # two forward passes, summed
    want = reference(kind, model, tokens)
    assert len(sites) == 2 + LAYERS * 3  # embed, final; block, mlp and attn per layer
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-9, nan_ok=True), key
    assert max(got[f"of/kurtosis/block_{i:02d}"] for i in range(LAYERS)) > 2.0
    # the command: files, plots and the table
    (tmp_path / "text.txt").write_text(TEXT)
    argv = [str(tmp_path / kind), str(tmp_path / "text.txt"), "--seq-len", "32"]
    assert main([*argv, "--max-windows", "4", "--out", str(tmp_path / "out")]) == 0
    info = json.loads((tmp_path / "out" / "inspect.json").read_text())
    assert info["windows"] == [4, 32]
    assert math.isclose(info["record"]["of/kurtosis/block_00"], got["of/kurtosis/block_00"])
    assert (tmp_path / "out" / "profile.png").is_file()
    assert (tmp_path / "out" / "kurtosis.png").is_file()
