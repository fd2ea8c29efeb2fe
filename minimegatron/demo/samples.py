"""Text from the trained weights: the checkpoint loaded as a plain single-device model (TP = 1).

Training ran on TP = 2 × PP = 2 ranks; the checkpoint holds FULL tensors (the TP shards gathered, the
pipeline stages merged, vocab padding removed), so ``load_model(dir)`` rebuilds an ordinary
GPTModel / LLaMAModel in this process, no ranks, no DeepSpeed. Each prompt is continued twice:

    greedy   the most likely token every step (deterministic; small models loop quickly)
    top-p    sample from the smallest set of tokens holding ``top_p`` of the probability, after
             dividing the logits by ``temperature`` (seeded: the same text every run)

Prompts are encoded as a document start: ``<s>`` first (llama flavour) or the end-of-document token
(gpt flavour, which has no BOS), exactly what the model saw before every file in training. Trailing
spaces of a prompt are dropped before encoding (sentencepiece glues a space to the word after it, so
"def " would end on a lone space piece the model hardly ever saw) and the model writes them itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sample:
    model: str
    mode: str          # "greedy" or "top-p 0.9, T 0.8"
    prompt: str
    text: str          # prompt + continuation, decoded
    new_tokens: int


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The ids a prompt starts a document with (see the module docstring)."""
    ids = tokenizer.encode(prompt.rstrip(" "), bos=False)
    first = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eod
    return [first] + ids


def generate_samples(model_name: str, model: torch.nn.Module, tokenizer, prompts: list[str],
                     max_new_tokens: int, top_p: float, temperature: float, seed: int) -> list[Sample]:
    """Greedy and top-p continuations of every prompt by ``model`` (a plain TP=1 model)."""
    from minimegatron.generate import generate

    budget = model.config.max_seq_len
    samples = []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt_ids(tokenizer, prompt)])  # (1, s)
        new = max(1, min(max_new_tokens, budget - ids.size(1)))  # learned positions stop at max_seq_len
        modes = [("greedy", dict(do_sample=False)),
                 (f"top-p {top_p:g}, T {temperature:g}", dict(do_sample=True, top_p=top_p,
                                                            temperature=temperature, seed=seed + i))]
        for mode, kwargs in modes:
            out = generate(model, ids, new, eos_token_id=tokenizer.eos_id, **kwargs)  # (1, s + n)
            samples.append(Sample(model_name, mode, prompt, tokenizer.decode(out[0].tolist()),
                                  out.size(1) - ids.size(1)))
    return samples


def format_samples(samples: list[Sample]) -> str:
    """All samples as text: a header line per sample, then the text, indented."""
    blocks = []
    for s in samples:
        body = "\n".join("    " + line for line in s.text.splitlines() or [""])
        blocks.append(f"--- {s.model} · {s.mode} · prompt {s.prompt!r} ({s.new_tokens} new tokens)\n{body}")
    return "\n".join(blocks)
