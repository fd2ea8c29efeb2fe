"""Bad input to the data CLIs: one clear line, exit status 2, nothing written, nothing old touched.

Every case runs the command line in a scratch workspace that already holds a good tokenizer model and a
good dataset — the SUBPROCESS cases (at least 20, one or more of every kind of mistake) as the real
``python -m minimegatron.data.preprocess`` / ``python -m minimegatron.data.tokenizer`` subprocess, the
rest (variants of those) in-process through main(), as if in a fresh process (tests/in_process.py:
default warning filters, stdout/stderr captured at the file-descriptor level; a subprocess costs
seconds of torch import) — and checks. The subprocess cases run two at a time, each in a workspace of
its own, ahead of their tests (``subprocess_runs``), which then check their results:

* the exit status (2: bad input) and that it finished within TIME_LIMIT seconds;
* stderr is exactly one non-empty line, ``<prog>: error: ...``, naming the problem (key words and the
  path) and the fix; no "Traceback" on stdout or stderr, nothing on stdout;
* the workspace is byte-for-byte what it was: no partial output file or new directory, and the dataset /
  model already at the output path survives unchanged.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from minimegatron.data.corpus import open_corpus
from minimegatron.data.preprocess import preprocess
from minimegatron.data.tokenizer import load_tokenizer
from minimegatron.data.tokenizer import main as tokenizer_main
from tests.in_process import call_main

ROOT = Path(__file__).resolve().parents[2]
PREPROCESS, TOKENIZER = "minimegatron.data.preprocess", "minimegatron.data.tokenizer"
TIME_LIMIT = 60.0  # seconds for one run: every case fails in its first checks, so this is generous
PARALLEL = max(1, min(2, os.cpu_count() or 1))  # SUBPROCESS cases running at once (CPU-bound imports)
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
needs_non_root = pytest.mark.skipif(IS_ROOT, reason="root reads and writes regardless of permissions")

GOOD_TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i * i}  # line {i}\n\n" for i in range(40))


def run_cli(module: str, argv: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k != "MINIMEGATRON_TRACEBACK"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=TIME_LIMIT + 30, stdin=subprocess.DEVNULL)
    return proc, time.monotonic() - start


def run_main(module: str, argv: list[str], cwd: Path, capfd,
             monkeypatch) -> tuple[subprocess.CompletedProcess, float]:
    """The same run in this process, as if it were a fresh one (tests/in_process.py: cwd, sys.argv,
    default warning filters, file-descriptor capture, nothing left running): main() must end in
    SystemExit, like the command would."""
    main = importlib.import_module(module).main
    result = call_main(main, argv, cwd=cwd, argv0=str(ROOT / (module.replace(".", "/") + ".py")),
                       monkeypatch=monkeypatch, capfd=capfd, delenv=["MINIMEGATRON_TRACEBACK"])
    return subprocess.CompletedProcess(argv, result.returncode, result.stdout, result.stderr), result.seconds


def snapshot(directory: Path) -> dict[str, str]:
    """Every entry under `directory` (hidden ones included): 'dir', or the sha256 of the file's bytes."""
    entries = {}
    for path in sorted(directory.rglob("*")):
        key = path.relative_to(directory).as_posix()
        if path.is_dir():
            entries[key] = "dir"
        else:
            try:
                entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                entries[key] = f"unreadable, {path.lstat().st_size} bytes"
    return entries


def error_line(proc: subprocess.CompletedProcess, module: str) -> str:
    """The one line of stderr, checked for the shape every error must have."""
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"stderr is not one line:\n{proc.stderr}"
    prog = f"python -m {module}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def seed_workspace(tmp_path_factory, llama_tokenizer_file) -> Path:
    """tok.model, good.txt, and out/old.bin + out/old.idx + out/old.model: a good run's results."""
    seed = tmp_path_factory.mktemp("cli_seed")
    shutil.copy(llama_tokenizer_file, seed / "tok.model")
    (seed / "good.txt").write_text(GOOD_TEXT)
    (seed / "out").mkdir()
    shutil.copy(llama_tokenizer_file, seed / "out" / "old.model")
    preprocess(open_corpus(seed / "good.txt"), load_tokenizer(seed / "tok.model"), seed / "out" / "old",
               progress=False)
    return seed


@pytest.fixture
def workspace(tmp_path, seed_workspace) -> Path:
    w = tmp_path / "w"
    shutil.copytree(seed_workspace, w)
    return w


# ------------------------------------------------------------------------------------------- the cases
def write(name: str, data: str | bytes) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        path = w / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return setup


def mkdir(name: str) -> Callable[[Path], None]:
    return lambda w: (w / name).mkdir(parents=True)


def chmod(name: str, mode: int, data: str | None = None) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        path = w / name
        if data is not None:
            path.write_text(data)
        else:
            path.mkdir(exist_ok=True)
        path.chmod(mode)
    return setup


@dataclass
class Case:
    id: str
    module: str
    argv: list[str]
    patterns: list[str]              # regexes the error line must match: the problem + path, and the fix
    setup: Callable[[Path], None] | None = None
    marks: list = field(default_factory=list)


P, T = PREPROCESS, TOKENIZER
TOK = ["--tokenizer", "tok.model"]
OLD = ["--output-prefix", "out/old"]  # the existing dataset: it must survive every failed run
NEW = ["--output-prefix", "new/sub/x"]  # a prefix whose directories do not exist: none may be created

CASES = [
    # ---- preprocess: the input
    Case("pp-empty-input", P, ["--input", "empty.txt", *TOK, *OLD],
         [r"empty\.txt is empty", r"point at files with text"], write("empty.txt", "")),
    Case("pp-blank-input", P, ["--input", "blank.txt", *TOK, *OLD],
         [r"blank\.txt contains no text", r"point at files with text"], write("blank.txt", "\n  \n\t\n")),
    Case("pp-jsonl-no-text-key", P, ["--input", "docs.jsonl", *TOK, *OLD],
         [r"docs\.jsonl:3 has no key 'text' \(found \['body'\]\)", r"--json-key"],
         write("docs.jsonl", '{"text": "one"}\n{"text": "two"}\n{"body": "three"}\n')),
    Case("pp-jsonl-invalid-json", P, ["--input", "bad.jsonl", *TOK, *OLD],
         [r"bad\.jsonl:2 is not valid JSON", r"one JSON object per line"],
         write("bad.jsonl", '{"text": "fine"}\n{"text": oops}\n')),
    Case("pp-json-array-not-lines", P, ["--input", "array.json", *TOK, *OLD],
         [r"array\.json:1 is not valid JSON", r"one JSON document, not JSON lines.*one object per line"],
         write("array.json", '[{"text": "a"},\n {"text": "b"}]\n')),
    Case("pp-jsonl-unpaired-surrogate", P, ["--input", "sur.jsonl", *TOK, *OLD],
         [r"sur\.jsonl:2: 'text' holds an unpaired surrogate", r"fix or drop that record"],
         write("sur.jsonl", '{"text": "ok"}\n{"text": "\\ud800 broken"}\n')),
    Case("pp-missing-input", P, ["--input", "missing.txt", *TOK, *NEW],
         [r"corpus file missing\.txt does not exist", r"check the path"]),
    Case("pp-input-path-with-spaces", P, ["--input", "my notes/day 1.txt", *TOK, *NEW],
         [r"corpus file my notes/day 1\.txt does not exist", r"check the path"], mkdir("my notes")),
    Case("pp-input-is-directory", P, ["--input", "out", *TOK, *NEW],
         [r"out is a directory", r"pass a glob such as 'out/\*\*/\*\.txt'"]),
    Case("pp-glob-matches-nothing", P, ["--input", "texts/*.md", *TOK, *NEW],
         [r"no file matches the glob 'texts/\*\.md'", r"check the pattern"]),
    Case("pp-input-is-a-device", P, ["--input", os.devnull, *TOK, *NEW],
         [rf"{re.escape(os.devnull)} is not a regular file", r"pass a regular file"]),
    Case("pp-input-from-stdin", P, ["--input", "-", *TOK, *NEW],
         [r"stdin \('-'\) is not supported", r"save the text to a file"]),
    Case("pp-binary-input", P, ["--input", "blob.dat", *TOK, *OLD],
         [r"blob\.dat looks binary.*NUL bytes", r"point --input at UTF-8 text"],
         write("blob.dat", bytes(range(256)) * 4)),
    Case("pp-utf16-input", P, ["--input", "win.txt", *TOK, *OLD],
         [r"win\.txt is UTF-16 text", r"convert it \(iconv"],
         write("win.txt", "hi there\n".encode("utf-16"))),
    Case("pp-unreadable-input", P, ["--input", "locked.txt", *TOK, *NEW],
         [r"cannot read corpus file locked\.txt \(Permission denied\)", r"chmod u\+r"],
         chmod("locked.txt", 0o000, "secret text\n"), [needs_non_root]),
    # ---- preprocess: the tokenizer model
    Case("pp-missing-tokenizer", P, ["--input", "good.txt", "--tokenizer", "nope.model", *NEW],
         [r"tokenizer model nope\.model does not exist",
          r"train one with python -m minimegatron\.data\.tokenizer --output nope\.model"]),
    Case("pp-garbage-tokenizer", P, ["--input", "good.txt", "--tokenizer", "garbage.model", *OLD],
         [r"garbage\.model is not a sentencepiece model", r"pass the \.model file"],
         write("garbage.model", "this is not a protobuf\n")),
    Case("pp-tokenizer-is-the-text", P, ["--input", "good.txt", "--tokenizer", "good.txt", *OLD],
         [r"good\.txt is not a sentencepiece model", r"pass the \.model file"]),
    Case("pp-empty-tokenizer", P, ["--input", "good.txt", "--tokenizer", "zero.model", *OLD],
         [r"zero\.model is not a sentencepiece model: it is empty", r"pass the \.model file"],
         write("zero.model", "")),
    Case("pp-tokenizer-is-directory", P, ["--input", "good.txt", "--tokenizer", "out", *NEW],
         [r"tokenizer model out is a directory", r"pass the \.model file in it"]),
    # ---- preprocess: the output prefix
    Case("pp-prefix-under-a-file", P, ["--input", "good.txt", *TOK, "--output-prefix", "good.txt/ds"],
         [r"--output-prefix good\.txt/ds: good\.txt is a file, not a directory",
          r"choose a path in a directory"]),
    Case("pp-prefix-is-a-directory", P, ["--input", "good.txt", *TOK, "--output-prefix", "out"],
         [r"--output-prefix out is a directory", r"e\.g\. --output-prefix out/corpus"]),
    Case("pp-prefix-ends-in-bin", P, ["--input", "good.txt", *TOK, "--output-prefix", "out/old.bin"],
         [r"out/old\.bin ends in \.bin", r"pass --output-prefix out/old$"]),
    Case("pp-prefix-empty", P, ["--input", "good.txt", *TOK, "--output-prefix", ""],
         [r"--output-prefix is empty", r"pass a path prefix such as"]),
    Case("pp-output-overwrites-input", P, ["--input", "out/*", *TOK, *OLD],
         [r"--output-prefix out/old would overwrite the corpus file out/old\.(bin|idx|model)",
          r"choose another prefix"]),
    Case("pp-output-dir-read-only", P, ["--input", "good.txt", *TOK, "--output-prefix", "ro/ds"],
         [r"--output-prefix ro/ds: the directory ro is not writable", r"choose a directory you can write"],
         chmod("ro", 0o555), [needs_non_root]),
    # ---- preprocess: the command line
    Case("pp-unknown-documents-value", P, ["--input", "good.txt", *TOK, *OLD, "--documents", "sentence"],
         [r"argument --documents: invalid choice: 'sentence'",
          r"see python -m minimegatron\.data\.preprocess --help"]),
    Case("pp-unknown-option", P, ["--input", "good.txt", *TOK, *OLD, "--workers", "4"],
         [r"unrecognized arguments: --workers 4", r"--help"]),
    Case("pp-missing-output-prefix", P, ["--input", "good.txt", *TOK],
         [r"the following arguments are required: --output-prefix", r"--help"]),
    # ---- tokenizer
    Case("tok-vocab-larger-than-corpus", T, ["--input", "good.txt", "--output", "out/old.model",
                                             "--vocab-size", "5000"],
         [r"vocab_size 5000 is larger than this corpus supports \(at most (\d+) pieces",
          r"lower --vocab-size to \d+ or less, or train on more text"]),
    Case("tok-vocab-larger-than-max-chars", T, ["--input", "good.txt", "--output", "out/old.model",
                                                "--vocab-size", "2000", "--max-chars", "300"],
         [r"vocab_size 2000 is larger than this corpus supports", r"raise --max-chars"]),
    Case("tok-vocab-zero", T, ["--input", "good.txt", "--output", "new/t.model", "--vocab-size", "0"],
         [r"vocab_size 0 is too small", r"raise --vocab-size to at least 261"]),
    Case("tok-vocab-negative", T, ["--input", "good.txt", "--output", "new/t.model", "--vocab-size", "-8"],
         [r"vocab_size -8 is too small", r"raise --vocab-size"]),
    Case("tok-vocab-not-a-number", T,
         ["--input", "good.txt", "--output", "new/t.model", "--vocab-size", "4k"],
         [r"argument --vocab-size: invalid int value: '4k'", r"--help"]),
    Case("tok-unknown-flavour", T, ["--input", "good.txt", "--output", "new/t.model", "--flavour", "bert"],
         [r"argument --flavour: invalid choice: 'bert'",
          r"see python -m minimegatron\.data\.tokenizer --help"]),
    Case("tok-negative-seed", T, ["--input", "good.txt", "--output", "new/t.model", "--seed", "-1"],
         [r"seed -1 is out of range", r"--seed between 0 and 4294967295"]),
    Case("tok-max-chars-zero", T, ["--input", "good.txt", "--output", "new/t.model", "--max-chars", "0"],
         [r"max_chars 0 leaves no text", r"--max-chars of at least 1"]),
    Case("tok-output-is-the-input", T, ["--input", "good.txt", "--output", "good.txt", "--vocab-size", "300"],
         [r"--output good\.txt is also a corpus file", r"choose another --output"]),
    Case("tok-output-is-a-directory", T, ["--input", "good.txt", "--output", "out", "--vocab-size", "300"],
         [r"--output out is a directory", r"e\.g\. --output out/tokenizer\.model"]),
    Case("tok-output-under-a-file", T, ["--input", "good.txt", "--output", "good.txt/t.model"],
         [r"--output good\.txt/t\.model: good\.txt is a file, not a directory",
          r"choose a path in a directory"]),
    Case("tok-output-dir-read-only", T,
         ["--input", "good.txt", "--output", "ro/t.model", "--vocab-size", "300"],
         [r"the directory ro is not writable", r"choose a directory you can write"],
         chmod("ro", 0o555), [needs_non_root]),
    Case("tok-empty-input", T, ["--input", "empty.txt", "--output", "out/old.model"],
         [r"empty\.txt is empty", r"point at files with text"], write("empty.txt", "")),
    Case("tok-lines-too-long", T, ["--input", "long.txt", "--output", "out/old.model", "--vocab-size", "300"],
         [r"every one of the 2 lines is longer than 4192 bytes", r"break the text into shorter lines"],
         write("long.txt", ("x" * 5000 + "\n") * 2)),
    Case("tok-jsonl-bad-line", T,
         ["--input", "bad.jsonl", "--output", "out/old.model", "--vocab-size", "300"],
         [r"bad\.jsonl:2 is not valid JSON", r"one JSON object per line"],
         write("bad.jsonl", '{"text": "fine"}\n{"text": oops}\n')),
    Case("tok-missing-output", T, ["--input", "good.txt"],
         [r"the following arguments are required: --output", r"--help"]),
    Case("tok-vocab-huge", T, ["--input", "good.txt", "--output", "new/t.model", "--vocab-size", "9" * 12],
         [r"vocab_size 9{12} is too large", r"lower --vocab-size"]),
    Case("tok-max-chars-negative", T, ["--input", "good.txt", "--output", "new/t.model", "--max-chars", "-5"],
         [r"max_chars -5 leaves no text", r"--max-chars of at least 1"]),
    Case("tok-output-empty", T, ["--input", "good.txt", "--output", ""],
         [r"--output is empty", r"e\.g\. --output tokenizer\.model"]),
    Case("tok-json-key-missing", T,
         ["--input", "docs.jsonl", "--json-key", "body", "--output", "out/old.model", "--vocab-size", "300"],
         [r"docs\.jsonl:1 has no key 'body' \(found \['text'\]\)", r"--json-key"],
         write("docs.jsonl", '{"text": "one"}\n')),
    Case("pp-input-empty-string", P, ["--input", "", *TOK, *NEW],
         [r"the corpus path is empty", r"pass --input a text file"]),
]


# The cases that also run as the real `python -m ...` in a process of its own: those where the OS has a
# say (missing, unreadable, read-only, directory, binary and UTF-16 files, spaces in paths, argv). Every
# other case runs the same main() in-process (tests/in_process.py): the same line, exit code and files.
SUBPROCESS = {
    "pp-missing-input", "pp-input-is-directory", "pp-unreadable-input", "pp-output-dir-read-only",
    "pp-binary-input", "pp-utf16-input", "pp-input-path-with-spaces", "pp-output-overwrites-input",
    "pp-prefix-under-a-file", "pp-unknown-option", "tok-output-under-a-file", "tok-lines-too-long",
}


def _unlock(workspace: Path) -> None:
    for path in workspace.rglob("*"):  # let pytest clean up what a case locked
        if path.is_dir():
            path.chmod(0o755)
        elif not path.is_symlink():
            path.chmod(0o644)


@pytest.fixture(scope="module")
def subprocess_runs(request, tmp_path_factory, seed_workspace):
    """The SUBPROCESS cases of this session, run ahead of their tests, PARALLEL at a time (each one the
    real command in a workspace of its own; two seconds of CPU each, mostly torch's import): case id ->
    (workspace, its snapshot before the run, the future of (CompletedProcess, seconds)). Each test checks
    its own; nothing runs in the background while the other tests do."""
    selected = {item.callspec.params["case"].id for item in request.session.items
                if getattr(item, "originalname", "") == "test_bad_input_is_one_line_and_writes_nothing"
                and item.path == request.path}
    cases = [c for c in CASES if c.id in SUBPROCESS and c.id in selected
             and not (IS_ROOT and needs_non_root in c.marks)]
    prepared = {}
    for case in cases:
        workspace = tmp_path_factory.mktemp(f"sub-{case.id}") / "w"
        shutil.copytree(seed_workspace, workspace)
        if case.setup:
            case.setup(workspace)
        prepared[case.id] = (workspace, snapshot(workspace))
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = {c.id: pool.submit(run_cli, c.module, c.argv, prepared[c.id][0]) for c in cases}
    yield {key: (*prepared[key], future) for key, future in futures.items()}
    for workspace, _ in prepared.values():
        _unlock(workspace)


@pytest.mark.parametrize("case", [
    pytest.param(c, id=("subprocess-" if c.id in SUBPROCESS else "main-") + c.id, marks=c.marks)
    for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case: Case, request, capfd, monkeypatch):
    if case.id in SUBPROCESS:  # it ran already, in its own workspace (subprocess_runs)
        workspace, before, run = request.getfixturevalue("subprocess_runs")[case.id]
        _unlock(workspace)
        proc, seconds = run.result()
    else:
        workspace = request.getfixturevalue("workspace")
        if case.setup:
            case.setup(workspace)
        before = snapshot(workspace)
        try:
            proc, seconds = run_main(case.module, case.argv, workspace, capfd, monkeypatch)
        finally:
            _unlock(workspace)
    assert seconds < TIME_LIMIT, f"took {seconds:.1f} s"
    line = error_line(proc, case.module)
    assert proc.returncode == 2, (proc.returncode, line)
    assert proc.stdout == "", proc.stdout
    for pattern in case.patterns:
        assert re.search(pattern, line), f"{pattern!r} not in {line!r}"
    assert snapshot(workspace) == before, "the run left, changed or removed files"


def test_enough_cases():
    assert len({c.id for c in CASES}) == len(CASES) and SUBPROCESS <= {c.id for c in CASES}
    assert len(SUBPROCESS) >= 12


# --------------------------------------------------------------------- runs that work, said in one line
def test_non_utf8_input_is_one_warning_line_and_works(workspace: Path):
    (workspace / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")
    proc, _ = run_cli(PREPROCESS, ["--input", "latin1.txt", *TOK, "--output-prefix", "new/l"], workspace)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    warning = (rf"python -m {re.escape(PREPROCESS)}: warning: latin1\.txt is not valid UTF-8: 1 undecodable "
               rf".*re-encode the file as UTF-8")
    assert len(lines) == 1 and re.match(warning, lines[0]), lines
    assert "1 file(s) were not valid UTF-8" in proc.stdout
    assert sorted(p.name for p in (workspace / "new").iterdir()) == ["l.bin", "l.idx"]


def test_paths_with_spaces_work(workspace: Path, monkeypatch):
    (workspace / "my notes").mkdir()
    (workspace / "my notes" / "day 1.txt").write_text(GOOD_TEXT)
    proc, _ = run_cli(PREPROCESS, ["--input", "my notes/day 1.txt", *TOK, "--output-prefix", "my data/set 1"],
                      workspace)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (workspace / "my data").iterdir()) == ["set 1.bin", "set 1.idx"]
    monkeypatch.chdir(workspace)
    tokenizer_main(["--input", "my notes/day 1.txt", "--output", "my data/tok 1.model",
                    "--vocab-size", "300"])
    assert load_tokenizer(workspace / "my data" / "tok 1.model").vocab_size == 300


def test_ctrl_c_leaves_the_old_dataset(workspace: Path):
    """Interrupted while tokenizing: status 130, one line, no temporary file, the old dataset intact."""
    big = workspace / "big.txt"
    big.write_text(GOOD_TEXT * 400)  # ~1 MB of lines: seconds of work, one document per line
    before = snapshot(workspace)
    env = {k: v for k, v in os.environ.items() if k != "MINIMEGATRON_TRACEBACK"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen([sys.executable, "-m", PREPROCESS, "--input", "big.txt", *TOK, *OLD,
                             "--documents", "line", "--no-progress"], cwd=workspace, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIME_LIMIT
        while not list((workspace / "out").glob("*.tmp")) and proc.poll() is None:
            assert time.monotonic() < deadline, "preprocess never started writing"
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=TIME_LIMIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode == 0:
        pytest.skip("preprocess finished before the interrupt arrived")
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"python -m {PREPROCESS}: error: interrupted"), lines
    assert snapshot(workspace) == before


# ------------------------------------------- permission and disk errors, simulated (so root runs them too)
def _denied(target: Path):
    real_open = open

    def fake_open(path, *args, **kwargs):
        if Path(path).resolve() == target.resolve():
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    return fake_open


TOKENIZER_ARGV = ["--input", "good.txt", "--output", "out/old.model", "--vocab-size", "300"]


def _no_space(final, *args, **kwargs):
    raise OSError(28, "No space left on device", f"{final}.0000.tmp")


@pytest.mark.parametrize("what", ["unreadable-corpus", "unreadable-tokenizer", "read-only-dir-preprocess",
                                  "read-only-dir-tokenizer", "disk-full-preprocess", "disk-full-tokenizer"])
def test_permission_and_disk_errors(what: str, workspace: Path, capfd, monkeypatch):
    from minimegatron.data import _files, indexed_builder, tokenizer

    module, argv = PREPROCESS, ["--input", "good.txt", *TOK, *OLD]
    if what == "unreadable-corpus":
        monkeypatch.setattr(_files, "open", _denied(workspace / "good.txt"), raising=False)
        patterns = [r"cannot read corpus file good\.txt \(Permission denied\)",
                    r"make it readable \(chmod u\+r\)"]
    elif what == "unreadable-tokenizer":
        monkeypatch.setattr(_files, "open", _denied(workspace / "tok.model"), raising=False)
        patterns = [r"cannot read tokenizer model tok\.model \(Permission denied\)", r"make it readable"]
    elif what.startswith("read-only-dir"):
        real_access, locked = os.access, (workspace / "out").resolve()
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: (Path(p).resolve() != locked
                                                                and real_access(p, mode, **kw)))
        if what.endswith("tokenizer"):
            module, argv = TOKENIZER, TOKENIZER_ARGV
        patterns = [r"the directory out is not writable", r"choose a directory you can write"]
    else:
        monkeypatch.setattr(indexed_builder, "create_temporary", _no_space)
        monkeypatch.setattr(tokenizer, "create_temporary", _no_space)
        if what.endswith("tokenizer"):
            module, argv = TOKENIZER, TOKENIZER_ARGV
        patterns = [r"cannot write the (dataset out/old\.bin/\.idx|tokenizer model out/old\.model): "
                    r"No space left on device \(out/old\.(bin|model)\.0000\.tmp\)", r"free some disk space"]
    before = snapshot(workspace)
    proc, _ = run_main(module, argv, workspace, capfd, monkeypatch)
    line = error_line(proc, module)
    assert proc.returncode == 2 and proc.stdout == ""
    for pattern in patterns:
        assert re.search(pattern, line), f"{pattern!r} not in {line!r}"
    assert snapshot(workspace) == before
