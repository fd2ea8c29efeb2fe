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
corpus + settings give byte-identical `.model` files. The trainer's options, input and error messages
are :mod:`minimegatron.data.tokenizer_training`'s; this file is the tokenizer, its file and its CLI.

    tok = train_tokenizer(open_corpus(), vocab_size=2000, output="stdlib.model")
    tok = load_tokenizer("stdlib.model"); ids = tok.encode("def f(x):"); tok.decode(ids)

Errors are ValueError or an OSError subclass whose message names the problem and the fix (a file that is
not a sentencepiece model, a vocabulary the corpus cannot fill, an --output under a file, ...); the CLI
prints that message as one line, ``python -m minimegatron.data.tokenizer: error: ...``, exit status 2.
A failed training run writes nothing: the model goes to a temporary file that replaces --output only at
the end, so an older model there survives byte for byte.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from minimegatron.data._files import (check_output_file, check_readable_file, create_temporary, explained,
                                      make_parents, remove_dirs, same_files, write_error)
from minimegatron.data.tokenizer_training import (FLAVOURS, check_training_options, train_model,
                                                  trainer_options)

PROG = "python -m minimegatron.data.tokenizer"

_NOT_A_MODEL_FIX = (f"pass the .model file that {PROG} (or sentencepiece) wrote, not its .vocab, a .bin/.idx "
                    f"dataset or a Hugging Face tokenizer.json")


class SentencePieceTokenizer:
    """A loaded sentencepiece model with Megatron-style accessors: vocab_size, bos_id, eos_id, eod, pad_id."""

    def __init__(self, model: str | os.PathLike | bytes) -> None:
        if isinstance(model, (bytes, bytearray)):
            self.model_file = None
            self.sp = _load_model(bytes(model), "this bytes object")
        else:
            self.model_file = Path(model)
            check_readable_file(self.model_file, "tokenizer model",
                                f"train one with {PROG} --output {self.model_file}",
                                f"pass the .model file in it, e.g. {self.model_file / 'tokenizer.model'}")
            try:
                data = self.model_file.read_bytes()
            except OSError as err:
                raise explained(err, f"cannot read tokenizer model {self.model_file} "
                                     f"({err.strerror or err}); make it readable or pass another "
                                     f"--tokenizer") from None
            self.sp = _load_model(data, str(self.model_file))
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


def _load_model(data: bytes, name: str) -> spm.SentencePieceProcessor:
    """A SentencePieceProcessor of the serialized model `data`; ValueError "NAME is not a sentencepiece
    model: why; fix" for anything else (sentencepiece itself says "INTERNAL: could not parse ModelProto")."""
    if not data:
        raise ValueError(f"{name} is not a sentencepiece model: it is empty (0 bytes); {_NOT_A_MODEL_FIX}")
    try:
        sp = spm.SentencePieceProcessor(model_proto=data)
    except RuntimeError as err:
        text = str(err)
        if "ParseFromArray" in text or "parse" in text.lower():
            why = "its bytes do not parse as a sentencepiece ModelProto"
        else:  # "INTERNAL: src/x.cc(12) [check] message" -> "message"
            why = re.sub(r"^\w+: (?:\S+\.cc\(\d+\) )?(?:\[.*?\] )?", "", text).strip() or text
            why = f"sentencepiece cannot load it ({why})"
        raise ValueError(f"{name} is not a sentencepiece model: {why}; {_NOT_A_MODEL_FIX}") from None
    return sp


def load_tokenizer(model_file: str | os.PathLike) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(model_file)


def train_tokenizer(corpus: Iterable[str], vocab_size: int, output: str | os.PathLike | None = None,
                    flavour: str = "llama", seed: int = 1234, max_chars: int = 2_000_000,
                    num_threads: int = 2) -> SentencePieceTokenizer:
    """Train a BPE model on `corpus` (an iterable of documents); write it to `output` if given.

    The file is written atomically (a temporary file, then os.replace): a failure leaves no file behind and
    an older model at `output` untouched. Options are checked first (check_training_options), and `output`
    before any training (a directory, a path under a file, an unwritable directory, or one of the corpus's
    own files raise at once). A vocabulary larger than the corpus supports, or smaller than its alphabet
    plus the 256 byte pieces, raises ValueError with the size that would work.
    """
    check_training_options(vocab_size, flavour, seed, max_chars, num_threads)
    options = trainer_options(flavour, vocab_size, num_threads)
    created: list[Path] = []
    tmp: Path | None = None
    fd: int | None = None
    if output is not None:
        output = Path(output)
        check_model_output(output, getattr(corpus, "files", ()))
        try:
            created = make_parents(output)
            tmp, fd = create_temporary(output)  # before training: an unwritable place fails in a second
        except OSError as err:
            remove_dirs(created)
            raise write_error(err, f"the tokenizer model {output}", "an --output") from None
    try:
        model = train_model(corpus, vocab_size, options, seed, max_chars)
        if output is None:
            return SentencePieceTokenizer(model)
        try:
            with open(fd, "wb") as f:
                fd = None
                f.write(model)
            os.replace(tmp, output)
        except OSError as err:
            raise write_error(err, f"the tokenizer model {output}", "an --output") from None
        tmp = None
    finally:
        if fd is not None:
            os.close(fd)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
            remove_dirs(created)
    return SentencePieceTokenizer(output)


def check_model_output(output: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Raise (naming the fix) if `output` cannot be written as a model file, or is one of `inputs`."""
    if not os.fspath(output).strip():
        raise ValueError("--output is empty; name the model file to write, e.g. --output tokenizer.model")
    check_output_file(output, "--output", "tokenizer.model")
    clash = same_files([output], inputs)
    if clash:
        raise ValueError(f"--output {clash[0]} is also a corpus file ({clash[1]}): the model would overwrite "
                         f"the text it is trained on; choose another --output (or narrow the --input glob)")


def main(argv: Sequence[str] | None = None) -> SentencePieceTokenizer:
    """The CLI. Every error ends as one line, ``python -m minimegatron.data.tokenizer: error: ...``, and
    exit status 2 (bad input); options and --output are checked before the corpus is read."""
    from minimegatron.data.corpus import DEFAULT_CORPUS, open_corpus
    from minimegatron.errors import ArgumentParser, cli_errors, one_line_warnings

    with cli_errors(PROG), one_line_warnings(PROG):
        parser = ArgumentParser(prog=PROG, description="Train a sentencepiece BPE tokenizer (no download).")
        parser.add_argument("--input", default=DEFAULT_CORPUS, help="text file, glob, .jsonl, or 'stdlib'")
        parser.add_argument("--json-key", default="text")
        parser.add_argument("--output", required=True, help="path of the .model file to write")
        parser.add_argument("--vocab-size", type=int, default=4000)
        parser.add_argument("--flavour", choices=FLAVOURS, default="llama")
        parser.add_argument("--seed", type=int, default=1234)
        parser.add_argument("--max-chars", type=int, default=2_000_000)
        args = parser.parse_args(argv)
        check_training_options(args.vocab_size, args.flavour, args.seed, args.max_chars)
        check_model_output(args.output)  # before the corpus is read; train_tokenizer checks the rest
        corpus = open_corpus(args.input, json_key=args.json_key)
        tok = train_tokenizer(corpus, args.vocab_size, args.output, args.flavour, args.seed, args.max_chars)
        print(f"wrote {args.output}: {tok}")
        return tok


if __name__ == "__main__":
    main()
