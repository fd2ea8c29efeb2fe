import pytest

from minimegatron.data.corpus import default_corpus
from minimegatron.data.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def small_corpus_docs():
    """About 0.5 MB of the default corpus (the Python stdlib), as a list of documents."""
    return list(default_corpus(max_bytes=500_000))


@pytest.fixture(scope="session")
def llama_tokenizer_file(tmp_path_factory, small_corpus_docs):
    path = tmp_path_factory.mktemp("tok") / "small_llama.model"
    train_tokenizer(small_corpus_docs, vocab_size=800, output=path, max_chars=300_000)
    return path
