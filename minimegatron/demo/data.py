"""The demo's data step: corpus -> sentencepiece tokenizer -> Megatron ``.bin``/``.idx``, cached.

    out/tokenizer.model        trained once on the corpus (llama flavour: <s> text </s> per document)
    out/data.bin, data.idx     every document tokenized (python -m minimegatron.data.preprocess)
    out/data.json              what they were built from: corpus files (path, size, mtime), vocab size,
                               flavour, seed — a second run with the same inputs reuses them

The cache is a manifest comparison, nothing cleverer: change the corpus, the vocabulary size or the
flavour and both files are rebuilt; delete ``out/`` to force it.

The baseline printed next to the losses is the *unigram entropy* of the training split,
``H = -Σ_v p(v) ln p(v)`` with ``p`` the token frequencies: the loss of the best model that ignores
context (it always predicts the frequencies). A model below it has learned something from the
context. On the valid split the matching baseline is the cross-entropy of the valid tokens under the
training frequencies (add-one smoothed, so unseen tokens cost ``ln`` of a finite number).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST_VERSION = 1


@dataclass
class PreparedData:
    """One tokenizer and the dataset it produced (``prefix`` is what TrainConfig(data=...) takes)."""

    tokenizer_file: Path
    prefix: Path
    flavour: str
    vocab_size: int
    num_documents: int
    num_tokens: int
    reused: bool
    seconds: float
    unigram_entropy: float = float("nan")        # nats/token, training split
    valid_unigram_loss: float = float("nan")     # valid tokens under the training frequencies

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def without(corpus, fragments: tuple[str, ...]):
    """The corpus minus the files whose path contains one of ``fragments`` (e.g. "encodings/")."""
    from minimegatron.data.corpus import Corpus

    if not fragments:
        return corpus
    keep = [f for f in corpus.files if not any(x in f.as_posix() for x in fragments)]
    if not keep:
        raise ValueError(f"--exclude {','.join(fragments)!r} leaves no file of {corpus.name}; exclude less")
    if len(keep) == len(corpus.files):
        return corpus
    return Corpus(keep, fmt=corpus.fmt, json_key=corpus.json_key, documents=corpus.documents,
                  name=f"{corpus.name} without {', '.join(fragments)}")


def corpus_fingerprint(files) -> str:
    """sha256 of every file's path, size and modification time: cheap, and changes when a file does."""
    h = hashlib.sha256()
    for path in files:
        st = Path(path).stat()
        h.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def prepare_data(out: Path, name: str, corpus, vocab_size: int, flavour: str, seed: int,
                 split: str, max_chars: int = 2_000_000, progress: bool = True) -> PreparedData:
    """Train (or reuse) ``out/<name>.model`` and tokenize the corpus into ``out/<data name>.bin/.idx``.

    ``name`` is "tokenizer" (-> data.bin) or "tokenizer_gpt" (-> data_gpt.bin, ``--gpt-tokenizer``).
    """
    from minimegatron.data.indexed_dataset import IndexedDataset
    from minimegatron.data.preprocess import preprocess
    from minimegatron.data.tokenizer import SentencePieceTokenizer, train_tokenizer

    start = time.perf_counter()
    suffix = name[len("tokenizer"):]
    model_file, prefix = out / f"{name}.model", out / f"data{suffix}"
    manifest_file = out / f"data{suffix}.json"
    manifest = {"version": MANIFEST_VERSION, "corpus": corpus.name, "files": len(corpus.files),
                "fingerprint": corpus_fingerprint(corpus.files), "vocab_size": vocab_size,
                "flavour": flavour, "seed": seed, "max_chars": max_chars}
    built = [model_file, Path(f"{prefix}.bin"), Path(f"{prefix}.idx"), manifest_file]
    reused = all(p.is_file() for p in built) and _read_json(manifest_file) == manifest
    if reused:
        tokenizer = SentencePieceTokenizer(model_file)
        dataset = IndexedDataset(prefix)
    else:
        out.mkdir(parents=True, exist_ok=True)
        manifest_file.unlink(missing_ok=True)  # written last: a crash in between is never "cached"
        documents = list(corpus)
        tokenizer = train_tokenizer(documents, vocab_size, model_file, flavour, seed, max_chars)
        dataset = preprocess(documents, tokenizer, prefix, progress=progress)
        manifest_file.write_text(json.dumps(manifest, indent=2) + "\n")
    prepared = PreparedData(model_file, prefix, tokenizer.flavour, tokenizer.vocab_size,
                            dataset.num_documents, int(dataset.sequence_lengths.sum()), reused,
                            time.perf_counter() - start)
    prepared.unigram_entropy, prepared.valid_unigram_loss = unigram_baselines(
        dataset, split, tokenizer.vocab_size)
    return prepared


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def unigram_baselines(dataset, split: str, vocab_size: int) -> tuple[float, float]:
    """(entropy of the train split's token frequencies, valid cross-entropy under them), nats/token."""
    from minimegatron.data.samples import split_documents

    (t0, t1), (v0, v1), _ = split_documents(dataset.num_documents, split)
    docs = dataset.document_indices

    def counts(d0: int, d1: int) -> np.ndarray:
        seqs = range(int(docs[d0]), int(docs[d1]))
        if not seqs:
            return np.zeros(vocab_size)
        tokens = np.concatenate([np.asarray(dataset[i]) for i in seqs])
        return np.bincount(tokens.astype(np.int64), minlength=vocab_size).astype(np.float64)

    train = counts(t0, t1)
    p = train[train > 0] / train.sum()
    entropy = float(-(p * np.log(p)).sum())
    valid = counts(v0, v1)
    if valid.sum() == 0:
        return entropy, float("nan")
    smoothed = (train + 1.0) / (train.sum() + vocab_size)  # add-one: every token has p > 0
    return entropy, float(-(valid * np.log(smoothed)).sum() / valid.sum())
