"""The preprocess CLI: corpus + tokenizer -> .bin/.idx, all or nothing."""

import json
import re

import numpy as np
import pytest

from minimegatron.data.corpus import open_corpus
from minimegatron.data.indexed_dataset import IndexedDataset
from minimegatron.data.preprocess import PROG, main, preprocess
from minimegatron.data.tokenizer import load_tokenizer

TEXTS = ["import os\nprint(os.getcwd())\n", "x = 1\n", "def f():\n    return 42\n"]


def test_text_documents_end_with_eod(tmp_path, llama_tokenizer_file):
    source = tmp_path / "code.txt"
    source.write_text("\n\n".join(TEXTS))
    out = tmp_path / "out" / "code"
    ds = main(["--input", str(source), "--tokenizer", str(llama_tokenizer_file), "--output-prefix", str(out),
               "--documents", "paragraph", "--no-progress"])
    tok = load_tokenizer(llama_tokenizer_file)
    assert ds.dtype == np.uint16 and len(ds) == ds.num_documents == 3
    for i, text in enumerate(TEXTS):
        expected = tok.encode(text.strip("\n"), eos=True)  # <s> ... </s>
        assert ds[i].tolist() == expected and expected[0] == tok.bos_id and expected[-1] == tok.eod
    reopened = IndexedDataset(out)
    assert reopened.num_tokens == ds.num_tokens
    assert sorted(p.name for p in out.parent.iterdir()) == ["code.bin", "code.idx"]


def test_jsonl_key_and_no_eod(tmp_path, llama_tokenizer_file):
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"content": t}) + "\n" for t in TEXTS))
    ds = main(["--input", str(source), "--tokenizer", str(llama_tokenizer_file), "--json-key", "content",
               "--output-prefix", str(tmp_path / "j"), "--no-append-eod", "--no-progress"])
    tok = load_tokenizer(llama_tokenizer_file)
    assert [ds[i].tolist() for i in range(3)] == [tok.encode(t) for t in TEXTS]


def test_default_corpus_input(tmp_path, llama_tokenizer_file, capsys):
    from minimegatron.data.corpus import default_corpus

    ds = main(["--tokenizer", str(llama_tokenizer_file), "--output-prefix", str(tmp_path / "std")])  # stdlib
    documents = list(default_corpus())
    assert len(ds) == len(documents) and ds.num_tokens > len(documents) * 100
    tok = load_tokenizer(llama_tokenizer_file)
    assert tok.decode(ds[0].tolist()) == documents[0]
    assert "wrote IndexedDataset" in capsys.readouterr().out


def test_bad_input_leaves_nothing_behind(tmp_path, llama_tokenizer_file, capsys):
    """In a notebook the library raises; main() prints the same message as one line and exits 2."""
    out = tmp_path / "out"
    out.mkdir()
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n")
    with pytest.raises(ValueError, match="contains no text"):
        preprocess(open_corpus(blank), load_tokenizer(llama_tokenizer_file), out / "x", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "wrong key"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 has no key 'text'"):
        preprocess(open_corpus(bad), load_tokenizer(llama_tokenizer_file), out / "x", progress=False)
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        open_corpus(tmp_path / "missing.txt")
    capsys.readouterr()
    for source, message in [(blank, "contains no text"), (bad, r"bad\.jsonl:2 has no key 'text'"),
                            (tmp_path / "missing.txt", r"missing\.txt does not exist")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["--input", str(source), "--tokenizer", str(llama_tokenizer_file),
                  "--output-prefix", str(out / "x"), "--no-progress"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.match(rf"{re.escape(PROG)}: error: .*{message}", err)
    assert list(out.iterdir()) == []


def test_non_utf8_input_is_reported(tmp_path, llama_tokenizer_file, capsys):
    source = tmp_path / "mixed.txt"
    source.write_bytes(b"caf\xe9 au lait\n")
    with pytest.warns(UserWarning, match=r"mixed\.txt is not valid UTF-8: 1 undecodable"):
        ds = main(["--input", str(source), "--tokenizer", str(llama_tokenizer_file),
                   "--output-prefix", str(tmp_path / "m"), "--no-progress"])
    assert "1 file(s) were not valid UTF-8" in capsys.readouterr().out
    assert load_tokenizer(llama_tokenizer_file).decode(ds[0].tolist()) == "caf\ufffd au lait\n"
