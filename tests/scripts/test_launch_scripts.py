"""scripts/*.sh: valid bash, the documented TP·PP·DP splits, and only flags that train.py accepts."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ["gaudi_8x.sh", "cuda_multi_gpu.sh"]


def dry_run(script, *args, **env):
    out = subprocess.run(["bash", str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                         env={**os.environ, "DRY_RUN": "1", **env}, timeout=30)
    return out.returncode, out.stdout, out.stderr


@pytest.mark.parametrize("script", SCRIPTS + ["common.sh"])
def test_scripts_are_valid_bash(script):
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)]).returncode == 0


def test_gaudi_presets():
    rc, out, err = dry_run("gaudi_8x.sh")
    assert rc == 0, err
    assert "[hpu] tiny: TP=2 PP=2 DP=2 on 8 cards" in out
    assert "deepspeed --num_nodes 1 --num_gpus 8 --no_local_rank --module minimegatron.train" in out
    assert "--sequence-parallel" in out
    rc, out, err = dry_run("gaudi_8x.sh", "1b", "--steps", "3")
    assert rc == 0, err
    assert "TP=1 PP=1 DP=8" in out and "--hidden-size 2048" in out and "--ffn-hidden-size 5632" in out
    assert out.rstrip().endswith("--steps 3")  # extra flags come last and win


def test_cuda_split_follows_the_card_count_and_bad_splits_are_refused():
    rc, out, err = dry_run("cuda_multi_gpu.sh", NUM_CARDS="2")
    assert rc == 0 and "[cuda] tiny: TP=2 PP=1 DP=1 on 2 cards" in out, err
    rc, out, err = dry_run("cuda_multi_gpu.sh", "1b", NUM_CARDS="4", TP="2")
    assert rc == 0 and "TP=2 PP=1 DP=2" in out, err
    rc, out, err = dry_run("cuda_multi_gpu.sh", NUM_CARDS="6")
    assert rc == 2 and "not divisible by TP·PP = 2·2" in err
    rc, out, err = dry_run("gaudi_8x.sh", "huge")
    assert rc == 2 and "use tiny or 1b" in err


def test_scripts_pass_only_flags_train_accepts():
    help_text = subprocess.run([sys.executable, "-m", "minimegatron.train", "--help"], capture_output=True,
                               text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               timeout=120).stdout
    used = set()
    for script, args in [("gaudi_8x.sh", []), ("gaudi_8x.sh", ["1b"])]:
        _, out, _ = dry_run(script, *args, RECOMPUTE="selective")
        used |= set(re.findall(r"(--[a-z][a-z-]*)", out.split("minimegatron.train", 1)[1]))
    missing = sorted(flag for flag in used if flag not in help_text)
    assert not missing, f"train.py does not accept {missing}"
