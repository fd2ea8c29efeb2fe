"""Data: corpus -> sentencepiece tokenizer -> Megatron .bin/.idx -> fixed-length GPT samples.

    corpus.py           documents from the Python stdlib (default, no download) or your text / JSON lines
    tokenizer.py        sentencepiece BPE with byte fallback (llama and gpt flavours): train, save, load
    tokenizer_training.py  what sentencepiece's trainer is given (options, sentences), its errors explained
    indexed_format.py   Megatron's on-disk .bin/.idx format, bit for bit: header, dtype codes, file names
    indexed_builder.py  writes a .bin/.idx pair, atomically
    indexed_dataset.py  reads one through numpy.memmap (and re-exports the two above)
    preprocess.py       CLI: corpus + tokenizer -> PREFIX.bin / PREFIX.idx
    samples.py          doc / sample / shuffle indices, train/valid/test split, GPTDataset

The names below are imported on first use, so `import minimegatron.data` stays cheap and
`python -m minimegatron.data.tokenizer` runs its module exactly once.
"""

import importlib

_EXPORTS = {
    "Corpus": "corpus", "CorpusDecodeWarning": "corpus", "default_corpus": "corpus", "open_corpus": "corpus",
    "IndexedDataset": "indexed_dataset", "IndexedDatasetBuilder": "indexed_dataset",
    "best_dtype": "indexed_dataset",
    "GPTDataset": "samples", "build_datasets": "samples", "build_sample_index": "samples",
    "parse_split": "samples",
    "SentencePieceTokenizer": "tokenizer", "load_tokenizer": "tokenizer", "train_tokenizer": "tokenizer",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"minimegatron.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'minimegatron.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
