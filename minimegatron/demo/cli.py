"""``python -m minimegatron.demo``: the options, the checks, and the five steps in order.

Every check runs before any work: sizes and layout through the trainer's own
:func:`~minimegatron.training.validate` (heads divisible by tp, a layer per pipeline stage, whole
micro-batches per replica, ...), so a bad option costs no tokenizer training and starts no rank.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

from minimegatron.errors import ArgumentParser, cli_errors
from minimegatron.training.args import check_split, validate
from minimegatron.models import MODELS
from minimegatron.training.config import TrainConfig
from minimegatron.training.preflight import check_writable

PROG = "python -m minimegatron.demo"

# Sizes that visibly learn within about a minute per model on 2 CPU cores (see the README's demo section).
DEFAULTS = dict(hidden_size=128, num_layers=2, num_attention_heads=4, seq_len=128, vocab_size=2000,
                steps=100, micro_batch_size=8, global_batch_size=32, lr=3e-3, eval_iters=4,
                corpus_bytes=5_000_000, max_new_tokens=40)
# --quick: a smoke test of every step (tests run it); the models learn little
QUICK = dict(hidden_size=32, num_layers=2, num_attention_heads=4, seq_len=32, vocab_size=600,
             steps=6, micro_batch_size=2, global_batch_size=8, lr=6e-3, eval_iters=1,
             corpus_bytes=600_000, max_new_tokens=12)


@dataclass
class DemoConfig:
    """Everything the demo does; ``None`` sizes are filled from DEFAULTS (or QUICK with ``quick``)."""

    models: tuple[str, ...] = MODELS
    hidden_size: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    seq_len: int | None = None
    vocab_size: int | None = None
    steps: int | None = None
    micro_batch_size: int | None = None
    global_batch_size: int | None = None
    lr: float | None = None
    eval_iters: int | None = None
    corpus_bytes: int | None = None
    max_new_tokens: int | None = None
    tp: int = 2
    pp: int = 2
    dp: int = 1
    input: str = "stdlib"
    exclude: tuple[str, ...] = ("encodings/",)  # the stdlib's codec tables: 18% of its bytes, mostly hex
    out: str = "demo_out"
    gpt_tokenizer: bool = False
    split: str = "95,5,0"
    seed: int = 1234
    prompts: tuple[str, ...] = ("def ", "import ", "class ")
    top_p: float = 0.9
    temperature: float = 0.8
    quick: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        preset = QUICK if self.quick else DEFAULTS
        for name, value in preset.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.models = tuple(self.models)

    def train_config(self, model: str, data: str = "random", vocab_size: int | None = None) -> TrainConfig:
        """The TrainConfig of one model (the same sizes, data, steps and layout for every model)."""
        out = Path(self.out) / model
        return TrainConfig(
            model=model, tp=self.tp, pp=self.pp, dp=self.dp, hidden_size=self.hidden_size,
            num_layers=self.num_layers, num_attention_heads=self.num_attention_heads,
            vocab_size=vocab_size or self.vocab_size, seq_len=self.seq_len, steps=self.steps,
            micro_batch_size=self.micro_batch_size, global_batch_size=self.global_batch_size,
            lr=self.lr, min_lr=self.lr / 10, warmup_steps=max(1, self.steps // 20),
            eval_interval=max(1, self.steps // 5), eval_iters=self.eval_iters, data=data,
            split=self.split, seed=self.seed, out_dir=str(out), save=str(out / "checkpoint"),
            progress=self.progress)


def check(cfg: DemoConfig) -> None:
    """Raise ValueError naming the problem and the fix, before anything runs."""
    if not cfg.models or any(m not in MODELS for m in cfg.models) or len(set(cfg.models)) != len(cfg.models):
        raise ValueError(f"--models {','.join(cfg.models)!r}: give distinct names out of {MODELS}, "
                         "e.g. --models gpt,llama")
    if cfg.vocab_size < 300:
        raise ValueError(f"--vocab-size {cfg.vocab_size} is too small: the 256 byte-fallback pieces, the "
                         "special tokens and the corpus's alphabet need more; use 300 or more")
    if cfg.corpus_bytes < 10_000 or cfg.max_new_tokens < 1:
        raise ValueError("--corpus-bytes must be >= 10000 and --max-new-tokens >= 1")
    if not (0 < cfg.top_p <= 1 and 0 < cfg.temperature < math.inf):  # also False for nan
        raise ValueError(f"--top-p {cfg.top_p} must be in (0, 1] and --temperature {cfg.temperature} a "
                         "finite number > 0; e.g. --top-p 0.9 --temperature 0.8")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory (it is created if missing)")
    check_writable("--out", cfg.out)  # a read-only --out fails now, not after the data step
    if check_split(cfg.split)[1] == 0:
        raise ValueError(f"--split {cfg.split!r} leaves no valid documents; give valid a share, e.g. 95,5,0")
    for model in cfg.models:
        validate(cfg.train_config(model))  # layout and sizes: the trainer's own checks
    open_demo_corpus(cfg)  # a missing file or an --exclude that leaves nothing fails here


def open_demo_corpus(cfg: DemoConfig):
    """The corpus the demo reads: --input (default the stdlib), minus the --exclude'd files."""
    from minimegatron.data.corpus import open_corpus
    from minimegatron.demo.data import without

    return without(open_corpus(cfg.input, max_bytes=cfg.corpus_bytes), cfg.exclude)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Train a tiny GPT and a tiny LLaMA on simulated CPU ranks (TP 2 x PP 2) on Python's "
                    "own standard library, compare them, plot the losses and sample text. Offline.")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, out of gpt,llama")
    sizes = ("hidden_size", "num_layers", "num_attention_heads", "seq_len", "vocab_size", "steps",
             "micro_batch_size", "global_batch_size", "eval_iters", "corpus_bytes", "max_new_tokens")
    for name in sizes:
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None,
                       help=f"default {DEFAULTS[name]} ({QUICK[name]} with --quick)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default {DEFAULTS['lr']:g}; {QUICK['lr']:g} with --quick)")
    for name in ("tp", "pp", "dp"):
        p.add_argument("--" + name, type=int, default=getattr(DemoConfig, name),
                       help=f"{name} size (default {getattr(DemoConfig, name)}); ranks = tp·pp·dp")
    p.add_argument("--input", default=DemoConfig.input, help="corpus: 'stdlib' (default, no download), a "
                   "text file, a quoted glob or a .jsonl file")
    p.add_argument("--exclude", default=",".join(DemoConfig.exclude),
                   help="comma-separated path fragments: corpus files containing one are left out (default: "
                        "encodings/, the stdlib's codec tables, whose hex tables a tiny model would mostly "
                        "learn to recite); '' keeps every file")
    p.add_argument("--out", default=DemoConfig.out, help="output directory (default demo_out/)")
    p.add_argument("--gpt-tokenizer", action="store_true", help="train GPT on a gpt-flavour tokenizer "
                   "of its own (its losses are then not comparable with LLaMA's)")
    p.add_argument("--split", default=DemoConfig.split, help="train,valid,test document shares")
    p.add_argument("--seed", type=int, default=DemoConfig.seed)
    p.add_argument("--prompts", default="|".join(DemoConfig.prompts), help="'|'-separated prompts")
    p.add_argument("--top-p", type=float, default=DemoConfig.top_p)
    p.add_argument("--temperature", type=float, default=DemoConfig.temperature)
    p.add_argument("--quick", action="store_true", help="a tiny run of every step (seconds; for tests)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def parse_args(argv: Sequence[str] | None = None) -> DemoConfig:
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    ns["models"] = tuple(m.strip() for m in ns["models"].split(",") if m.strip())
    ns["prompts"] = tuple(ns["prompts"].split("|"))
    ns["exclude"] = tuple(x.strip() for x in ns["exclude"].split(",") if x.strip())
    cfg = DemoConfig(**{k: v for k, v in ns.items() if k in {f.name for f in fields(DemoConfig)}})
    try:
        check(cfg)
    except (ValueError, OSError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")  # like argparse's own errors, before any work
    return cfg


def _error(message: Any) -> None:
    """Exit like argparse's own errors (status 2, "python -m minimegatron.demo: error: ...")."""
    parser = build_parser()
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def _say(text: str) -> None:
    print(text, flush=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the demo; returns what it writes to summary.json. Any failure (a bad option, a rank that
    raised, Ctrl-C) exits with one line on stderr, ``python -m minimegatron.demo: error: ...``."""
    with cli_errors(PROG):
        return _main(argv)


def _main(argv: Sequence[str] | None) -> dict[str, Any]:
    cfg = parse_args(argv)
    os.environ.setdefault("MINIMEGATRON_DEVICE", "cpu")  # simulated ranks: gloo on this CPU, even
    os.environ.setdefault("DS_ACCELERATOR", "cpu")       # on a machine that has a GPU
    from minimegatron.checkpoint import load_model
    from minimegatron.data.tokenizer import SentencePieceTokenizer
    from minimegatron.demo import report
    from minimegatron.demo.data import prepare_data
    from minimegatron.demo.samples import format_samples, generate_samples
    from minimegatron.training import train

    out, start = Path(cfg.out), time.perf_counter()
    world = cfg.tp * cfg.pp * cfg.dp
    _say(f"minimegatron demo -> {out}/   ({', '.join(report.NAMES[m] for m in cfg.models)} on {world} "
         f"simulated ranks: TP={cfg.tp} x PP={cfg.pp} x DP={cfg.dp})")

    _say(f"\n[1/5] data: corpus -> tokenizer -> {out}/data.bin/.idx")
    try:  # a corpus or vocabulary the tokenizer cannot use: the reason, as argparse says it, no traceback
        corpus = open_demo_corpus(cfg)
        shared = prepare_data(out, "tokenizer", corpus, cfg.vocab_size, "llama", cfg.seed, cfg.split,
                              progress=cfg.progress)
        data = {m: shared for m in cfg.models}
        if cfg.gpt_tokenizer and "gpt" in cfg.models:
            data["gpt"] = prepare_data(out, "tokenizer_gpt", corpus, cfg.vocab_size, "gpt", cfg.seed,
                                       cfg.split, progress=cfg.progress)
    except (ValueError, OSError) as err:
        _error(err)
    from minimegatron.data.samples import split_documents

    (v0, v1) = split_documents(shared.num_documents, cfg.split)[1]
    if v1 == v0:  # every model evaluates on it: stop before any training, not inside a rank
        _error(f"the valid split has no documents ({shared.num_documents} documents in all, --split "
               f"{cfg.split}); use more text or change --split")
    for prepared in {id(d): d for d in data.values()}.values():
        _say(f"  {'reused (inputs unchanged)' if prepared.reused else 'built'} {prepared.tokenizer_file.name} "
             f"({prepared.flavour} flavour, {prepared.vocab_size} pieces) and {prepared.prefix.name}.bin/.idx: "
             f"{prepared.num_documents} documents of {corpus.name}, {prepared.num_tokens:,} tokens "
             f"[{prepared.seconds:.1f} s]")
    same = len({str(d.tokenizer_file) for d in data.values()}) == 1
    _say("  one tokenizer for every model: same tokens, same data, so the losses are comparable" if same
         else "  --gpt-tokenizer: GPT reads other tokens, so its loss (nats per ITS token) is not "
              "comparable with LLaMA's")
    timings = {"data": time.perf_counter() - start}
    _say(f"  unigram entropy of the training split: {shared.unigram_entropy:.3f} nats/token (the best "
         f"loss without context; valid: {shared.valid_unigram_loss:.3f})")

    histories, walls, configs = {}, {}, {}
    for i, model in enumerate(cfg.models):
        tc = configs[model] = cfg.train_config(model, str(data[model].prefix), data[model].vocab_size)
        _say(f"\n[2/5] training {report.NAMES[model]} ({i + 1}/{len(cfg.models)}): {tc.steps} steps x "
             f"{tc.global_batch_size} sequences x {tc.seq_len} tokens, TP={tc.tp} PP={tc.pp} DP={tc.dp}, "
             f"eval every {tc.eval_interval} steps")
        shutil.rmtree(tc.save, ignore_errors=True)  # this run's checkpoint only, no stale iter_* beside it
        t0 = time.perf_counter()
        histories[model] = train(tc)
        walls[model] = timings[f"train {model}"] = time.perf_counter() - t0
        _say(f"  {histories[model].summary()}  [{walls[model]:.1f} s]  -> {tc.out_dir}/")

    _say("\n[3/5] GPT-2 -> LLaMA: the porting points (each one ModelConfig field)")
    diffs = report.differences(cfg.train_config("gpt").to_model_config(),
                               cfg.train_config("llama").to_model_config())
    _say(report.format_differences(diffs))
    trained = {m: load_model(configs[m].save) for m in cfg.models}  # plain TP=1 models, full weights
    results = {m: report.model_result(m, histories[m], configs[m].to_model_config(),
                                      trained[m].num_parameters(), walls[m], data[m]) for m in cfg.models}
    _say(f"\n  side by side: same sizes (h={cfg.hidden_size}, L={cfg.num_layers}, heads="
         f"{cfg.num_attention_heads}, seq={cfg.seq_len}, vocab={shared.vocab_size}), "
         f"{'same data' if same else 'the same text in two tokenizations'}, same steps")
    _say(report.comparison_table(results))

    png = out / "loss_curves.png"
    title = (f"{' vs '.join(report.NAMES[m] for m in cfg.models)}: TP={cfg.tp} x PP={cfg.pp} x DP={cfg.dp}, "
             f"h={cfg.hidden_size}, L={cfg.num_layers}, {cfg.steps} steps\n{corpus.name}, "
             f"{'one tokenizer' if same else 'two tokenizers'} ({shared.vocab_size} pieces)")
    report.plot_losses(results, title).savefig(png, dpi=130)
    _say(f"\n[4/5] loss curves (train and valid, every model) -> {png}")

    t0 = time.perf_counter()
    _say("\n[5/5] samples from the trained weights, loaded as plain TP=1 models (checkpoint -> load_model)")
    samples = []
    for model in cfg.models:
        tokenizer = SentencePieceTokenizer(data[model].tokenizer_file)
        samples += generate_samples(report.NAMES[model], trained[model], tokenizer, list(cfg.prompts),
                                    cfg.max_new_tokens, cfg.top_p, cfg.temperature, cfg.seed)
    text = format_samples(samples)
    (out / "samples.txt").write_text(text + "\n")
    _say(text)

    timings["samples"] = time.perf_counter() - t0
    total = timings["total"] = time.perf_counter() - start
    summary = {"config": asdict(cfg), "data": {m: d.to_dict() for m, d in data.items()},
               "same_tokenizer": same, "models": results,
               "differences": [dict(change=a, gpt=b, llama=c) for a, b, c in diffs],
               "samples": [asdict(s) for s in samples], "timings_s": timings}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _say(f"\ndone in {total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items() if k != "total")
         + f"). {out}/ holds tokenizer.model, data.bin/.idx, "
         f"{', '.join(m + '/' for m in cfg.models)} (log, checkpoint), loss_curves.png, samples.txt, "
         "summary.json")
    return summary
