"""Train, save, load and use a sentencepiece BPE tokenizer — the kind LLaMA ships, and a GPT flavour.

BPE (Sennrich et al. 2016) starts from single symbols and repeatedly merges the most frequent adjacent
pair into a new symbol until the vocabulary has `vocab_size` entries. Two ways to make it lossless:

* GPT-2 (Radford et al. 2019) runs BPE over *bytes*: the 256 byte values are the alphabet (mapped to
  printable stand-ins), text is first split by a regex into words/numbers/punctuation, and a leading
  space is glued to the following word. Any string encodes; nothing is ever unknown.
* sentencepiece (Kudo & Richardson 2018), as LLaMA uses it, runs BPE over *Unicode characters* on the
  raw text, spaces included (a space becomes "▁"). With `byte_fallback=True` the 256 byte pieces
  <0x00>..<0xFF> are added to the vocabulary and a character that has no piece of its own is spelled
  as its UTF-8 bytes — so again nothing is unknown, but common characters (é, ✓, 你) stay whole.
  `split_digits=True` makes every digit its own piece (LLaMA's choice: better arithmetic).

Flavours (both sentencepiece; the flavour is read back from the model file when loading):

    flavour   ids                                   encode() default   document separator
    llama     0 <unk>, 1 <s>, 2 </s>, 3 <pad>       <s> text           </s> (eos)
    gpt       0 <unk>, 1 <|endoftext|>, 2 <pad>     text (no BOS)      <|endoftext|> (eod, like GPT-2)

The gpt flavour also drops sentencepiece's dummy leading "▁" and keeps digits merged, like GPT-2.

Training is deterministic: sentences are fed in corpus order (no sampling, no shuffling), capped at
`max_chars` characters so the default corpus trains in seconds, the random seed is fixed, and the same
corpus + settings give byte-identical `.model` files.

    tok = train_tokenizer(open_corpus(), vocab_size=2000, output="stdlib.model")
    tok = load_tokenizer("stdlib.model"); ids = tok.encode("def f(x):"); tok.decode(ids)
"""

from __future__ import annotations

import argparse
import io
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

FLAVOURS = ("llama", "gpt")
_SPECIALS = {
    # flavour: (unk, bos, eos, pad) ids and the eos piece
    "llama": dict(unk_id=0, bos_id=1, eos_id=2, pad_id=3, eos_piece="</s>"),
    "gpt": dict(unk_id=0, bos_id=-1, eos_id=1, pad_id=2, eos_piece="<|endoftext|>"),
}


class SentencePieceTokenizer:
    """A loaded sentencepiece model with Megatron-style accessors: vocab_size, bos_id, eos_id, eod, pad_id."""

    def __init__(self, model: str | os.PathLike | bytes) -> None:
        if isinstance(model, bytes):
            self.model_file = None
            self.sp = spm.SentencePieceProcessor(model_proto=model)
        else:
            self.model_file = Path(model)
            if not self.model_file.is_file():
                raise FileNotFoundError(f"tokenizer model {self.model_file} does not exist; train one with "
                                        f"python -m minimegatron.data.tokenizer --output {self.model_file}")
            self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        self.flavour = "gpt" if self.sp.bos_id() < 0 else "llama"

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id; None for the gpt flavour, which has none."""
        return None if self.sp.bos_id() < 0 else self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def eod(self) -> int:
        """End-of-document id, the separator preprocess appends (Megatron's name); = eos_id."""
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        """Token ids of `text`. bos=None means the flavour's default (llama: prepend <s>; gpt: nothing)."""
        ids = self.sp.encode(text)
        add_bos = self.bos_id is not None if bos is None else bos
        if add_bos:
            if self.bos_id is None:
                raise ValueError("the gpt flavour has no BOS token; call encode(text) without bos=True")
            ids = [self.bos_id] + ids
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; control tokens (<s>, </s>, <pad>) are dropped."""
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def pieces(self, text: str) -> list[str]:
        """The pieces `text` splits into (for looking, not for training)."""
        return self.sp.encode(text, out_type=str)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.flavour}, vocab_size={self.vocab_size}, file={self.model_file})"


def load_tokenizer(model_file: str | os.PathLike) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(model_file)


def training_sentences(documents: Iterable[str], max_chars: int) -> Iterator[str]:
    """What the trainer sees: the non-blank lines of the documents, in order, until max_chars."""
    total = 0
    for document in documents:
        for line in document.splitlines():
            if not line.strip():
                continue
            if total >= max_chars:
                return
            total += len(line)
            yield line


def trainer_options(flavour: str, vocab_size: int, num_threads: int = 2) -> dict:
    """Sentencepiece trainer flags for a flavour ("llama": the settings LLaMA's tokenizer.model records)."""
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
    specials = dict(_SPECIALS[flavour])
    return dict(
        model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
        split_digits=flavour == "llama", add_dummy_prefix=flavour == "llama",
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=0.99995, max_sentence_length=4192,
        input_sentence_size=0, shuffle_input_sentence=False,  # we already chose and ordered the input
        num_threads=num_threads, minloglevel=2, **specials,
    )


def train_tokenizer(corpus: Iterable[str], vocab_size: int, output: str | os.PathLike | None = None,
                    flavour: str = "llama", seed: int = 1234, max_chars: int = 2_000_000,
                    num_threads: int = 2) -> SentencePieceTokenizer:
    """Train a BPE model on `corpus` (an iterable of documents); write it to `output` if given.

    The file is written atomically (tmp + os.replace). A vocabulary larger than the corpus supports, or
    smaller than its alphabet plus the 256 byte pieces, raises ValueError with the size that would work.
    """
    options = trainer_options(flavour, vocab_size, num_threads)
    spm.set_random_generator_seed(seed)
    corpus_errors: list[BaseException] = []

    def sentences() -> Iterator[str]:  # keep the corpus's own error (sentencepiece would wrap it)
        try:
            yield from training_sentences(corpus, max_chars)
        except Exception as err:
            corpus_errors.append(err)
            raise

    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences(), model_writer=writer, **options)
    except RuntimeError as err:
        if corpus_errors:
            raise corpus_errors[0]
        raise _explain(err, vocab_size) from None
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_bytes(writer.getvalue())
        os.replace(tmp, output)
        return SentencePieceTokenizer(output)
    return SentencePieceTokenizer(writer.getvalue())


def _explain(err: RuntimeError, vocab_size: int) -> Exception:
    text = str(err)
    high = re.search(r"Vocabulary size too high.*<= (\d+)", text)
    if high:
        return ValueError(f"vocab_size {vocab_size} is larger than this corpus supports (at most "
                          f"{high.group(1)} pieces exist); lower --vocab-size to {high.group(1)} or less, "
                          f"or train on more text")
    low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", text)
    if low:
        return ValueError(f"vocab_size {vocab_size} is too small: the alphabet, the 256 byte-fallback "
                          f"pieces and the special tokens alone need {low.group(2)}; raise --vocab-size")
    if "sentences_.empty()" in text:
        return ValueError("the tokenizer trainer got no text (every line was blank); check the corpus")
    return RuntimeError(f"sentencepiece training failed: {text}")


def main(argv: Sequence[str] | None = None) -> None:
    from minimegatron.data.corpus import DEFAULT_CORPUS, open_corpus

    parser = argparse.ArgumentParser(description="Train a sentencepiece BPE tokenizer (no download).")
    parser.add_argument("--input", default=DEFAULT_CORPUS, help="text file, glob, .jsonl, or 'stdlib'")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--output", required=True, help="path of the .model file to write")
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--flavour", choices=FLAVOURS, default="llama")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--max-chars", type=int, default=2_000_000)
    args = parser.parse_args(argv)
    corpus = open_corpus(args.input, json_key=args.json_key)
    tok = train_tokenizer(corpus, args.vocab_size, args.output, args.flavour, args.seed, args.max_chars)
    print(f"wrote {args.output}: {tok}")


if __name__ == "__main__":
    main()
