"""Tokenize a corpus into Megatron's `.bin` / `.idx` pair (Megatron's tools/preprocess_data.py, one process).

    python -m minimegatron.data.preprocess --input stdlib --tokenizer stdlib.model \\
        --output-prefix data/stdlib            # -> data/stdlib.bin, data/stdlib.idx

Every document becomes one sequence: encode(text) (with <s> first for the llama flavour) and, unless
--no-append-eod, the end-of-document id last, so the sample index can pack documents back to back and
the model still sees where each one ends. The token dtype is the smallest that holds the vocabulary
(uint16 below 65500). Output is all-or-nothing: tokens go to temporary files that are renamed into
place only after the last document, so an error or Ctrl-C leaves no half-written dataset behind.
"""

from __future__ import annotations

import argparse
import os
from typing import Iterable, Sequence

import numpy as np

from minimegatron.data.corpus import DEFAULT_CORPUS, DOCUMENT_UNITS, open_corpus
from minimegatron.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, best_dtype
from minimegatron.data.tokenizer import SentencePieceTokenizer


def preprocess(documents: Iterable[str], tokenizer: SentencePieceTokenizer, output_prefix: str | os.PathLike,
               append_eod: bool = True, progress: bool = True, dtype=None) -> IndexedDataset:
    """Encode every document, write output_prefix.bin/.idx atomically, and return the opened dataset."""
    from tqdm import tqdm

    dtype = np.dtype(dtype or best_dtype(tokenizer.vocab_size))
    with IndexedDatasetBuilder(output_prefix, dtype) as builder:
        bar = tqdm(documents, desc=f"tokenizing -> {output_prefix}", unit=" docs", disable=not progress)
        for text in bar:
            builder.add_document(tokenizer.encode(text, eos=append_eod))
        bar.close()
    return IndexedDataset(output_prefix)


def main(argv: Sequence[str] | None = None) -> IndexedDataset:
    parser = argparse.ArgumentParser(description="Tokenize text into a Megatron .bin/.idx dataset.")
    parser.add_argument("--input", default=DEFAULT_CORPUS,
                        help=f"a text file, a quoted glob, a .jsonl file, or {DEFAULT_CORPUS!r} (the default "
                             f"corpus: Python's own standard library, no download)")
    parser.add_argument("--tokenizer", required=True, help="a sentencepiece .model file")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--json-key", default="text", help="key holding the text in a .jsonl input")
    parser.add_argument("--documents", choices=DOCUMENT_UNITS, default="file",
                        help="text files: a document per file, blank-line-separated paragraph, or line")
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                        help="end every document with the end-of-document token (default: on)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    tokenizer = SentencePieceTokenizer(args.tokenizer)
    corpus = open_corpus(args.input, json_key=args.json_key, documents=args.documents)
    dataset = preprocess(corpus, tokenizer, args.output_prefix, args.append_eod, not args.no_progress)
    print(f"wrote {dataset}")
    if corpus.stats.replaced:
        print(f"note: {len(corpus.stats.replaced)} file(s) were not valid UTF-8; "
              f"{sum(corpus.stats.replaced.values())} byte sequence(s) became U+FFFD")
    return dataset


if __name__ == "__main__":
    main()
