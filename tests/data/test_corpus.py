"""Corpus: the embedded stdlib default, user files / globs / JSON lines, and every bad-input path."""

import json
import sysconfig
from pathlib import Path

import pytest

from minimegatron.data.corpus import Corpus, CorpusDecodeWarning, default_corpus, open_corpus, stdlib_files


def test_default_corpus_is_stdlib_source_deterministic_and_sized():
    files = stdlib_files(max_bytes=1_000_000)
    assert files == stdlib_files(max_bytes=1_000_000)
    root = Path(sysconfig.get_paths()["stdlib"])
    relative = [f.relative_to(root).as_posix() for f in files]
    assert relative == sorted(relative)
    assert all(r.endswith(".py") and "site-packages" not in r and "/test/" not in f"/{r}" for r in relative)
    sizes = [f.stat().st_size for f in files]
    assert 1_000_000 <= sum(sizes) < 1_000_000 + max(sizes)
    corpus = default_corpus(max_bytes=1_000_000)
    documents = list(corpus)
    assert len(documents) == len(files) == corpus.stats.documents  # one file, one document
    assert documents[0] == files[0].read_text(encoding="utf-8")
    assert open_corpus().name == open_corpus("stdlib").name == "python-stdlib"


def test_text_file_glob_and_document_units(tmp_path):
    (tmp_path / "b.txt").write_text("first para\nstill first\n\n\nsecond para\n")
    (tmp_path / "a.txt").write_text("alpha\n")
    assert list(open_corpus(tmp_path / "b.txt")) == ["first para\nstill first\n\n\nsecond para\n"]
    assert list(open_corpus(tmp_path / "b.txt", documents="paragraph")) == [
        "first para\nstill first", "second para"]
    assert list(open_corpus(str(tmp_path / "b.txt"), documents="line")) == [
        "first para", "still first", "second para"]
    assert list(open_corpus(str(tmp_path / "*.txt"))) == [
        "alpha\n", "first para\nstill first\n\n\nsecond para\n"]  # sorted: a.txt first


def test_jsonl_with_default_and_custom_key(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"text": "one", "body": "uno"},
                                                      {"text": "two", "body": "dos"}]) + "\n\n")
    assert list(open_corpus(path)) == ["one", "two"]
    assert list(open_corpus(path, json_key="body")) == ["uno", "dos"]
    with pytest.raises(ValueError, match=r"data\.jsonl:1 has no key 'content' .*--json-key"):
        list(open_corpus(path, json_key="content"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 is not valid JSON"):
        list(open_corpus(bad))


def test_missing_path_glob_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.txt does not exist.*'stdlib'"):
        open_corpus(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match=r"no file matches the glob .*\*\.md"):
        open_corpus(str(tmp_path / "*.md"))
    with pytest.raises(IsADirectoryError, match=r"is a directory; pass a glob"):
        open_corpus(tmp_path)


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.txt is empty .*point at files with text"):
        open_corpus(tmp_path / "empty.txt")
    (tmp_path / "blank.txt").write_text("  \n\n\t\n")
    corpus = open_corpus(tmp_path / "blank.txt")
    with pytest.raises(ValueError, match=r"blank\.txt contains no text"):
        list(corpus)
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match=r"contains no text.*key 'text'"):
        list(open_corpus(tmp_path / "blank.jsonl"))
    with pytest.raises(ValueError, match="has no files"):
        Corpus([])


def test_non_utf8_bytes_are_replaced_and_reported(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café \ufffd ok".encode("utf-8") + b" na\xefve \xff\xfe end")
    corpus = open_corpus(path)
    message = r"latin1\.txt is not valid UTF-8: 3 undecodable .*errors='replace'"
    with pytest.warns(CorpusDecodeWarning, match=message):
        (text,) = list(corpus)
    assert text.startswith("café \ufffd ok na\ufffdve ") and text.endswith(" end")
    assert corpus.stats.replaced == {str(path): 3}  # \xef \xff \xfe; the U+FFFD in the file is not counted
