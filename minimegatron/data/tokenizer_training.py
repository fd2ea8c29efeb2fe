"""Driving sentencepiece's BPE trainer: the options of each flavour, the text it reads, its errors explained.

:func:`~minimegatron.data.tokenizer.train_tokenizer` checks its options here
(:func:`check_training_options`), then :func:`train_model` runs ``spm.SentencePieceTrainer`` in
memory — no input file, no output file — and returns the serialized model::

    trainer_options(flavour, vocab_size)    the trainer's flags: BPE with byte fallback, the flavour's
                                            special-token ids, identity normalization, no sampling
    training_sentences(documents, max)      what it reads: the non-blank lines, in corpus order, until
                                            max characters (deterministic: no shuffling, a fixed seed)
    train_model(...) -> bytes               the model; sentencepiece's errors ("Vocabulary size too
                                            high", "sentences_.empty()") become ValueErrors naming the
                                            flag and the value that works

Lines longer than MAX_SENTENCE_BYTES are skipped by sentencepiece; the error says so when that is why
a corpus came out too small. A corpus's own error (an undecodable file) is re-raised as it is, not
wrapped in sentencepiece's.
"""

from __future__ import annotations

import io
import operator
import re
from typing import Iterable, Iterator

import sentencepiece as spm

__all__ = ["FLAVOURS", "MAX_SENTENCE_BYTES", "check_training_options", "trainer_options",
           "training_sentences", "train_model"]

FLAVOURS = ("llama", "gpt")
MAX_SENTENCE_BYTES = 4192  # sentencepiece skips longer lines (trainer flag max_sentence_length)
_SPECIALS = {
    # flavour: (unk, bos, eos, pad) ids and the eos piece
    "llama": dict(unk_id=0, bos_id=1, eos_id=2, pad_id=3, eos_piece="</s>"),
    "gpt": dict(unk_id=0, bos_id=-1, eos_id=1, pad_id=2, eos_piece="<|endoftext|>"),
}


def training_sentences(documents: Iterable[str], max_chars: int, stats: dict | None = None) -> Iterator[str]:
    """What the trainer sees: the non-blank lines of the documents, in order, until max_chars.

    `stats`, if given, receives lines (yielded), chars, long_lines (over MAX_SENTENCE_BYTES: sentencepiece
    skips them) and truncated (max_chars stopped the corpus early); a document that is not text raises."""
    total = 0
    stats = {} if stats is None else stats
    stats.update(lines=0, chars=0, long_lines=0, truncated=False)
    for number, document in enumerate(documents):
        if not isinstance(document, str):
            raise TypeError(f"document {number} is a {type(document).__name__}, not a str; the tokenizer "
                            f"trains on text (decode bytes first)")
        for line in document.splitlines():
            if not line.strip():
                continue
            if total >= max_chars:
                stats["truncated"] = True
                return
            try:
                size = len(line.encode("utf-8"))
            except UnicodeEncodeError as err:
                raise ValueError(f"document {number} holds an unpaired surrogate ({line[err.start]!r}) that "
                                 f"is not text; fix or drop that document") from None
            total += len(line)
            stats["lines"] += 1
            stats["chars"] = total
            stats["long_lines"] += size > MAX_SENTENCE_BYTES
            yield line


def check_training_options(vocab_size: int, flavour: str = "llama", seed: int = 1234,
                           max_chars: int = 2_000_000, num_threads: int = 2) -> None:
    """ValueError, naming the flag and a value that works, for options no corpus could train with."""
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}; pass --flavour llama or gpt")
    for name, value in (("vocab_size", vocab_size), ("seed", seed), ("max_chars", max_chars),
                        ("num_threads", num_threads)):
        try:
            if isinstance(value, bool):
                raise TypeError
            operator.index(value)  # int, numpy integers; not 4000.0 or "4000"
        except TypeError:
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
    specials = sum(_SPECIALS[flavour][k] >= 0 for k in ("unk_id", "bos_id", "eos_id", "pad_id"))
    least = 256 + specials + 1
    if vocab_size < least:
        raise ValueError(f"vocab_size {vocab_size} is too small: the 256 byte-fallback pieces and the "
                         f"{specials} special tokens of the {flavour} flavour alone need {least - 1}, plus "
                         f"one piece per distinct character; raise --vocab-size to at least {least} (a few "
                         f"thousand is typical)")
    if vocab_size > 2**31 - 1:
        raise ValueError(f"vocab_size {vocab_size} is too large (sentencepiece stores it as int32); lower "
                         f"--vocab-size (LLaMA uses 32000)")
    if not 0 <= seed <= 2**32 - 1:
        raise ValueError(f"seed {seed} is out of range; pass --seed between 0 and {2**32 - 1}")
    if max_chars < 1:
        raise ValueError(f"max_chars {max_chars} leaves no text to train on; pass --max-chars of at least 1 "
                         f"(default 2000000)")
    if not 1 <= num_threads <= 1024:
        raise ValueError(f"num_threads must be between 1 and 1024, got {num_threads}")


def trainer_options(flavour: str, vocab_size: int, num_threads: int = 2) -> dict:
    """Sentencepiece trainer flags for a flavour ("llama": the settings LLaMA's tokenizer.model records)."""
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}; pass --flavour llama or gpt")
    specials = dict(_SPECIALS[flavour])
    return dict(
        model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
        split_digits=flavour == "llama", add_dummy_prefix=flavour == "llama",
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=0.99995,
        max_sentence_length=MAX_SENTENCE_BYTES,
        input_sentence_size=0, shuffle_input_sentence=False,  # we already chose and ordered the input
        num_threads=num_threads, minloglevel=2, **specials,
    )


def train_model(corpus: Iterable[str], vocab_size: int, options: dict, seed: int, max_chars: int) -> bytes:
    """The serialized model sentencepiece trains on `corpus`; its errors explained (see _explain)."""
    spm.set_random_generator_seed(seed)
    corpus_errors: list[BaseException] = []
    stats: dict = {}

    def sentences() -> Iterator[str]:  # keep the corpus's own error (sentencepiece would wrap it)
        try:
            yield from training_sentences(corpus, max_chars, stats)
        except Exception as err:
            corpus_errors.append(err)
            raise

    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences(), model_writer=writer, **options)
    except RuntimeError as err:
        if corpus_errors:
            raise corpus_errors[0] from None
        raise _explain(err, vocab_size, stats, max_chars) from None
    if corpus_errors:  # sentencepiece may stop reading early and still succeed; never hide an error
        raise corpus_errors[0]
    return writer.getvalue()


def _explain(err: RuntimeError, vocab_size: int, stats: dict | None = None,
             max_chars: int | None = None) -> Exception:
    text = str(err)
    stats = stats or {}
    more = "train on more text"
    if stats.get("truncated"):
        more += f" (raise --max-chars: only the first {stats.get('chars', max_chars)} characters were used)"
    long_lines = stats.get("long_lines", 0)
    skipped = (f"; note that {long_lines} of {stats.get('lines', 0)} lines are longer than "
               f"{MAX_SENTENCE_BYTES} bytes and were skipped (break the text into shorter lines)"
               if long_lines else "")
    high = re.search(r"Vocabulary size too high.*<= (\d+)", text)
    if high:
        return ValueError(f"vocab_size {vocab_size} is larger than this corpus supports (at most "
                          f"{high.group(1)} pieces exist); lower --vocab-size to {high.group(1)} or less, "
                          f"or {more}{skipped}")
    low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", text)
    if low:
        return ValueError(f"vocab_size {vocab_size} is too small: the alphabet, the 256 byte-fallback "
                          f"pieces and the special tokens alone need {low.group(2)}; raise --vocab-size "
                          f"to at least {low.group(2)}")
    if "sentences_.empty()" in text:
        if long_lines and long_lines == stats.get("lines"):
            return ValueError(f"the tokenizer trainer got no usable text: every one of the {long_lines} "
                              f"lines is longer than {MAX_SENTENCE_BYTES} bytes, and sentencepiece skips "
                              f"such lines; break the text into shorter lines")
        return ValueError("the tokenizer trainer got no text (every line was blank); check the corpus")
    return RuntimeError(f"sentencepiece training failed: {text}")
