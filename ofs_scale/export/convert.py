"""Turn an ofs_scale model into a Hugging Face transformers model directory.

A configuration that Llama expresses exactly (Pre-Norm, RMSNorm with gain, SwiGLU, rotate-half
RoPE, no bias, no QK-norm, no embedding norm, a final norm) is written as a stock
`LlamaForCausalLM`; every other one as `OFSForCausalLM`, whose modelling file
(`modelling_ofs.py`, torch + transformers only) travels in the directory and loads with
`trust_remote_code=True`. The vocabulary stays padded (to a multiple of 128): the logits have
the model's shape, the tokenizer knows the real pieces. The sentencepiece tokenizer is written
as a `tokenizer.json` whose normaliser reproduces sentencepiece exactly (`write_tokenizer`).

transformers is imported inside the functions: only `ofs-scale export|eval|inspect` need it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ofs_scale.model.gpt import GPT, resolved

# State entries that carry no weights in the export (megatron-core's extra state, the
# batchless data-init flag, psBN's batch counter).
_SKIP = ("._extra_state", ".initialized", ".num_batches_tracked")


def llama_compatible(model: GPT) -> bool:
    """Whether a stock Llama computes exactly this model."""
    c, r = model.cfg, resolved(model.cfg)
    return (
        c.block == "pre"
        and c.norm == "rmsnorm"
        and r["activation"] == "swiglu"
        and c.position == "rope"
        and not r["qk_norm"]
        and not r["embed_norm"]
        and c.final_norm
        and not c.bias
    )


def weights(model: GPT) -> dict[str, torch.Tensor]:
    """The model's full (single-process) weights by ofs_scale name, fp32, on the CPU."""
    if model.factory.tp != 1 or model.embed is None or model.head is None:
        raise ValueError("export needs the whole model in one process (tp=1, pp=1)")
    return {
        k: v.detach().float().cpu().clone()
        for k, v in model.state_dict().items()
        if v is not None and not k.endswith(_SKIP)
    }


def _llama_weights(model: GPT) -> dict[str, torch.Tensor]:
    """ofs_scale names -> Llama names; the fused qkv, laid out (head, q/k/v, head_dim), is split."""
    c = model.cfg
    H, K = c.n_heads, c.d_model // c.n_heads
    out: dict[str, torch.Tensor] = {}
    for name, t in weights(model).items():
        parts = name.split(".")
        if name == "embed.tok.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "final_norm.weight":
            out["model.norm.weight"] = t
        elif name == "head.weight":
            out["lm_head.weight"] = t
        elif parts[0] == "layers":
            pre = f"model.layers.{parts[1]}."
            sub = ".".join(parts[2:])
            if sub == "attn.qkv.weight":
                qkv_HSKD = t.view(H, 3, K, c.d_model)
                for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                    out[pre + f"self_attn.{proj}.weight"] = qkv_HSKD[:, i].reshape(H * K, -1)
            else:
                mapped = {
                    "attn.proj.weight": "self_attn.o_proj.weight",
                    "mlp.up.weight": "mlp.up_proj.weight",
                    "mlp.gate.weight": "mlp.gate_proj.weight",
                    "mlp.down.weight": "mlp.down_proj.weight",
                    "norm1.weight": "input_layernorm.weight",
                    "norm2.weight": "post_attention_layernorm.weight",
                }[sub]
                out[pre + mapped] = t
        else:
            raise KeyError(f"no Llama name for {name}")
    return {k: v.contiguous() for k, v in out.items()}


def _llama(model: GPT, seq_len: int, eos_id: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.cfg
    config = LlamaConfig(
        vocab_size=model.vocab_size,
        hidden_size=c.d_model,
        intermediate_size=int(c.ffn_mult * c.d_model),
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_heads,
        head_dim=c.d_model // c.n_heads,
        max_position_embeddings=seq_len,
        # torch's RMSNorm with eps=None uses the dtype's epsilon
        rms_norm_eps=float(torch.finfo(torch.float32).eps),
        rope_parameters={"rope_type": "default", "rope_theta": float(c.rope_theta)},
        tie_word_embeddings=c.tie_embeddings,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=None,
    )
    hf = LlamaForCausalLM(config)
    state = _llama_weights(model)
    if c.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf.load_state_dict(state, strict=True)
    return hf


def _ofs(model: GPT, seq_len: int, eos_id: int) -> Any:
    from ofs_scale.export.modelling_ofs import OFSConfig, OFSForCausalLM
    from ofs_scale.model.blocks import resolve_beta

    c, r = model.cfg, resolved(model.cfg)
    config = OFSConfig(
        vocab_size=model.vocab_size,
        d_model=c.d_model,
        n_layers=c.n_layers,
        n_heads=c.n_heads,
        d_ff=int(c.ffn_mult * c.d_model),
        block=c.block,
        norm=c.norm,
        activation=r["activation"],
        qk_norm=r["qk_norm"],
        beta=resolve_beta(c.beta, c.n_layers),
        beta_trainable=c.beta_trainable,
        embed_norm=r["embed_norm"],
        final_norm=c.final_norm,
        tie_embeddings=c.tie_embeddings,
        position=c.position,
        rope_theta=float(c.rope_theta),
        max_position_embeddings=seq_len,
        bias=c.bias,
        psbn_alpha=c.psbn_alpha,
        eos_token_id=eos_id,
    )
    OFSConfig.register_for_auto_class()
    OFSForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    hf = OFSForCausalLM(config)
    hf.load_state_dict(weights(model), strict=True)
    return hf


def write_tokenizer(sp_model: Path, out_dir: Path) -> None:
    """The sentencepiece model as a tokenizer AutoTokenizer loads, encoding exactly as
    sentencepiece does: transformers' Llama conversion gives the BPE vocabulary, merges and byte
    fallback; its Metaspace pre-tokeniser, which skips the dummy prefix when the text already
    starts with a space, is replaced by sentencepiece's own rule (always prepend one)."""
    import sentencepiece as spm
    from tokenizers import normalizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    eos = sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None
    unk = sp.id_to_piece(sp.unk_id())
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(sp_model, Path(tmp) / "tokenizer.model")
        settings = {
            "tokenizer_class": "LlamaTokenizer",
            "legacy": True,
            "add_bos_token": False,
            "add_eos_token": False,
            "bos_token": None,
            "eos_token": eos,
            "unk_token": unk,
        }
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(settings))
        backend = AutoTokenizer.from_pretrained(tmp).backend_tokenizer
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    backend.pre_tokenizer = None
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos, unk_token=unk, clean_up_tokenization_spaces=False
    )
    tok.save_pretrained(out_dir)
    shutil.copy(sp_model, Path(out_dir) / "tokenizer.model")


def export_model(
    model: GPT, out_dir: str | Path, tokenizer: str | Path | None, seq_len: int, arch: str = "auto"
) -> str:
    """Write `model` (whole, one process) and its tokenizer into `out_dir`; returns the
    architecture written (`llama` or `ofs`). `arch="ofs"` forces the remote-code model."""
    if arch not in ("auto", "llama", "ofs"):
        raise ValueError(f"arch={arch!r}: use auto, llama or ofs")
    use_llama = arch == "llama" or (arch == "auto" and llama_compatible(model))
    if use_llama and not llama_compatible(model):
        raise ValueError(
            "this model is not a stock Llama (needs block=pre, norm=rmsnorm, activation=swiglu, "
            "position=rope, no qk_norm, embed_norm or bias, a final norm); use --arch auto"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eos_id = 1
    if tokenizer is not None:
        import sentencepiece as spm

        eos_id = spm.SentencePieceProcessor(model_file=str(tokenizer)).eos_id()
        write_tokenizer(Path(tokenizer), out)
    hf = (_llama if use_llama else _ofs)(model, seq_len, eos_id)
    hf.save_pretrained(out)
    return "llama" if use_llama else "ofs"
