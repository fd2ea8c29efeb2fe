"""Tokenizer: deterministic training, lossless encode/decode, flavours, and vocab-size errors."""

import pytest

from minimegatron.data.tokenizer import load_tokenizer, train_tokenizer

SAMPLES = [
    "def f(x):\n    return x + 12345\n",
    "\tindented\twith tabs and  two  spaces ",
    " leading space, trailing newline\n\n",
    "naïve café — ✓ 你好 🙂",  # characters the stdlib hardly has: byte fallback must carry them
    "",
]


def test_training_is_deterministic(tmp_path, small_corpus_docs):
    a = train_tokenizer(small_corpus_docs, 600, tmp_path / "a.model", max_chars=200_000)
    b = train_tokenizer(small_corpus_docs, 600, tmp_path / "b.model", max_chars=200_000)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert [a.encode(s) for s in SAMPLES] == [b.encode(s) for s in SAMPLES]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("text", SAMPLES)
def test_encode_decode_round_trip(llama_tokenizer_file, text):
    tok = load_tokenizer(llama_tokenizer_file)
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id == 1
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, eos=True)) == text


def test_llama_flavour_ids_byte_fallback_and_split_digits(llama_tokenizer_file):
    tok = load_tokenizer(llama_tokenizer_file)
    assert tok.flavour == "llama" and tok.vocab_size == 800
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.eod) == (0, 1, 2, 3, 2)
    assert tok.encode("x", bos=False, eos=True)[-1] == 2
    assert tok.unk_id not in tok.encode("🙂 你好")  # spelled as <0x..> byte pieces instead
    assert any(tok.id_to_piece(i).startswith("<0x") for i in tok.encode("🙂"))
    digits = [p for p in tok.pieces("year 20240") if p.strip("▁")]
    assert digits[-5:] == ["2", "0", "2", "4", "0"]


def test_gpt_flavour_has_no_bos_and_ends_documents_with_eod(tmp_path, small_corpus_docs):
    tok = train_tokenizer(small_corpus_docs, 600, tmp_path / "gpt.model", flavour="gpt", max_chars=200_000)
    assert tok.flavour == "gpt" and load_tokenizer(tmp_path / "gpt.model").flavour == "gpt"
    assert tok.bos_id is None and tok.eod == tok.eos_id == 1 and tok.id_to_piece(1) == "<|endoftext|>"
    ids = tok.encode("import os", eos=True)
    assert ids[-1] == tok.eod and tok.eod not in ids[:-1]
    assert not tok.pieces("import os")[0].startswith("▁")  # no dummy "▁" prefix, like GPT-2
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text
    with pytest.raises(ValueError, match="no BOS"):
        tok.encode("x", bos=True)


def test_vocab_too_large_is_a_clear_error_and_writes_nothing(tmp_path):
    docs = ["hello world, hello tokens", "a tiny corpus"]
    with pytest.raises(ValueError, match=r"vocab_size 5000 is larger than this corpus supports .*"
                                         r"lower --vocab-size to \d+"):
        train_tokenizer(docs, 5000, tmp_path / "big.model")
    assert list(tmp_path.iterdir()) == []


def test_vocab_too_small_is_a_clear_error(tmp_path, small_corpus_docs):
    with pytest.raises(ValueError, match=r"vocab_size 100 is too small.*raise --vocab-size"):
        train_tokenizer(small_corpus_docs, 100, max_chars=50_000)


def test_corpus_error_is_not_swallowed_and_missing_model(tmp_path):
    (tmp_path / "blank.txt").write_text("\n \n")
    from minimegatron.data.corpus import open_corpus

    with pytest.raises(ValueError, match="contains no text"):
        train_tokenizer(open_corpus(tmp_path / "blank.txt"), 300)
    with pytest.raises(FileNotFoundError, match=r"missing\.model does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="flavour"):
        train_tokenizer(["abc"], 300, flavour="bert")


def test_not_a_model_is_a_value_error_naming_the_file(tmp_path):
    from minimegatron.data.tokenizer import SentencePieceTokenizer

    (tmp_path / "text.model").write_text("just some text\n")
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(ValueError, match=r"text\.model is not a sentencepiece model: .*ModelProto; pass the "):
        load_tokenizer(tmp_path / "text.model")
    with pytest.raises(ValueError, match=r"empty\.model is not a sentencepiece model: it is empty"):
        load_tokenizer(tmp_path / "empty.model")
    with pytest.raises(ValueError, match=r"this bytes object is not a sentencepiece model"):
        SentencePieceTokenizer(b"\x00garbage")
    with pytest.raises(IsADirectoryError, match=r"is a directory, not a file; pass the \.model file in it"):
        load_tokenizer(tmp_path)


def test_failed_training_keeps_the_old_model_and_makes_no_directory(tmp_path, llama_tokenizer_file):
    old = tmp_path / "tok.model"
    old.write_bytes(llama_tokenizer_file.read_bytes())
    with pytest.raises(ValueError, match="larger than this corpus supports"):
        train_tokenizer(["tiny corpus"], 5000, old)
    with pytest.raises(ValueError, match="larger than this corpus supports"):
        train_tokenizer(["tiny corpus"], 5000, tmp_path / "new" / "dir" / "tok.model")
    assert old.read_bytes() == llama_tokenizer_file.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["tok.model"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(vocab_size=0), r"vocab_size 0 is too small.*at least 261"),
    (dict(vocab_size=300, flavour="gpt", seed=-1), r"seed -1 is out of range"),
    (dict(vocab_size=300, max_chars=0), r"max_chars 0 leaves no text"),
    (dict(vocab_size=300.0), r"vocab_size must be an integer, got 300\.0"),
    (dict(vocab_size=300, num_threads=0), r"num_threads must be between 1 and 1024"),
])
def test_options_are_checked_before_training(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train_tokenizer(["abc"], **kwargs)
