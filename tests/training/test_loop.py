"""The training loop's files (training/log.py): a resumed run rewrites its log atomically."""
import builtins
import json

import pytest

pytest.importorskip("deepspeed")  # loop.py builds DeepSpeed engines
from minimegatron.training.args import TrainConfig  # noqa: E402
from minimegatron.training.log import History, LogWriter  # noqa: E402


class _Killed(BaseException):
    """Stands in for SIGKILL / a power cut: nothing after it runs."""


def test_resuming_rewrites_the_log_atomically(tmp_path, monkeypatch):
    """Killed while the kept records are being written back: the old log must still be whole."""
    cfg = TrainConfig(out_dir=str(tmp_path), progress=False)
    log = tmp_path / "train_log.jsonl"
    records = [json.dumps({"step": s, "loss": 5.0 - s}) + "\n" for s in range(6)]
    log.write_text("".join(records))
    real_open = builtins.open

    class DyingFile:  # any write to the log file's own path dies
        def __init__(self, fh):
            self.fh = fh

        def __getattr__(self, name):
            if name in ("write", "writelines"):
                raise _Killed
            return getattr(self.fh, name)

    def dying_open(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        return DyingFile(fh) if str(path) == str(log) and mode != "r" else fh

    monkeypatch.setattr(builtins, "open", dying_open)
    try:
        LogWriter(cfg, History(config={"model": "llama"}), resume_at=4)
    except _Killed:
        pass
    monkeypatch.setattr(builtins, "open", real_open)
    assert log.read_text() in ("".join(records), "".join(records[:4]))  # old or new, never lost

    writer = LogWriter(cfg, History(config={"model": "llama"}), resume_at=4)  # resume for real
    writer.write(step=4, loss=0.5)
    writer.log.close()
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [0, 1, 2, 3, 4]
    assert json.loads((tmp_path / "config.json").read_text())["train"] == {"model": "llama"}
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
