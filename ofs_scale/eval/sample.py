"""Sampling from a run's checkpoint (`ofs-scale sample`, whose options live in sample_cli.py).

The checkpoint, written under any TP / PP / DP layout, is loaded into one process the way
`ofs-scale quant` and `export` load it (DCP reshards); the prompt is encoded with the run's own
sentencepiece model (`data.tokenizer`, or the one its prepared data names). Temperature 0 is
greedy (argmax); otherwise the next token is drawn from the softmax of logits / temperature,
restricted to the `top_k` most likely when top_k > 0. Padding entries of the vocabulary are
never drawn. Each token reruns the whole context (at most data.seq_len tokens, no KV cache).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ofs_scale.config import ConfigError
from ofs_scale.engine.base import autocast_context
from ofs_scale.export.__main__ import tokenizer_model
from ofs_scale.model.gpt import GPT
from ofs_scale.quant.evaluate import LoadedRun, load_run, resolve


@torch.no_grad()
def next_token_logits(model: GPT, ids: list[int], context: int, vocab: int) -> torch.Tensor:
    """Logits of the token after `ids` (the last `context` of them), over the real vocabulary
    (the model's padding entries cut off), fp32 on the CPU."""
    dev = next(model.parameters()).device
    tokens_BT = torch.tensor([ids[-context:]], dtype=torch.long, device=dev)
    return model(tokens_BT)[0, -1, :vocab].float().cpu()


def pick(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> int:
    """The next token: argmax at temperature 0, else a draw from softmax(logits / T) over the
    `top_k` largest logits (all when top_k is 0)."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen))


def generate(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    context: int,
    vocab: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    eos_id: int | None = None,
) -> list[int]:
    """The tokens that follow `prompt_ids` (at most `max_new_tokens`, ending at `eos_id`)."""
    gen = torch.Generator().manual_seed(seed)
    ids, new = list(prompt_ids), []
    model.eval()
    for _ in range(max_new_tokens):
        token = pick(next_token_logits(model, ids, context, vocab), temperature, top_k, gen)
        ids.append(token)
        new.append(token)
        if token == eos_id:
            break
    return new


def load_tokenizer(run: LoadedRun):
    """The run's sentencepiece processor, or ConfigError saying where it was looked for."""
    import sentencepiece as spm

    path = tokenizer_model(run)
    if path is None or not Path(path).is_file():
        raise ConfigError(
            f"no sentencepiece model for {run.paths.checkpoint or run.paths.run_dir} (looked "
            f"for {path}); pass data.tokenizer=<path to tokenizer.model>"
        )
    return spm.SentencePieceProcessor(model_file=str(path))


def sample_run(args: argparse.Namespace) -> list[str]:
    """Load the checkpoint `args.path` into one process and return `args.num_samples`
    continuations of `args.prompt` (seeds seed, seed+1, ...)."""
    run = load_run(resolve(args.path, args.config), args.overrides, tp=1, device=args.device)
    sp = load_tokenizer(run)
    eos = None if args.ignore_eos or sp.eos_id() < 0 else sp.eos_id()
    # an empty prompt starts at a document boundary: training saw documents follow one
    prompt = sp.encode(args.prompt) or ([sp.eos_id()] if sp.eos_id() >= 0 else [])
    if not prompt:
        raise ConfigError("this tokenizer has no end-of-document token: pass a --prompt")
    model, cfg = run.engine.model, run.cfg
    texts = []
    with autocast_context(cfg.train.dtype, run.mesh.device):
        for i in range(args.num_samples):
            new = generate(
                model,
                prompt,
                args.max_new_tokens,
                cfg.data.seq_len,
                sp.get_piece_size(),
                args.temperature,
                args.top_k,
                args.seed + i,
                eos,
            )
            texts.append(sp.decode([t for t in new if t != eos]))
    print(f"checkpoint {run.checkpoint} (step {run.step})", file=sys.stderr)
    return texts
