"""compat.py: the version range, its refusals, and each wrapped difference (run on both CI stacks)."""
from __future__ import annotations

import importlib.metadata
import re
import tomllib
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from minimegatron import compat
from minimegatron.launch import launch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text,expected", [
    ("2.7.1", (2, 7, 1)), ("2.7.1+cu126", (2, 7, 1)), ("2.6.0a0+git8d2ad0b", (2, 6, 0)),
    ("0.14.4+hpu.synapse.v1.22.0", (0, 14, 4)), ("0.19", (0, 19))])
def test_version_tuple_reads_habana_and_local_versions(text, expected):
    assert compat.version_tuple(text) == expected


def test_old_versions_are_refused_with_the_versions_and_the_fix():
    with pytest.raises(compat.VersionError, match=r"DeepSpeed 0\.13\.5 is older than the 0\.14\.4 .*"
                                                   r"pip install 'deepspeed>=0\.14\.4'"):
        compat.check_deepspeed("0.13.5")
    with pytest.raises(compat.VersionError, match=r"torch 2\.4\.1 is older than the 2\.6 .*torch>=2\.6"):
        compat.check_torch("2.4.1")
    compat.check_deepspeed("0.14.4+hpu.synapse.v1.22.0")  # Habana's fork of the oldest supported
    compat.check_torch("2.6.0a0+git")


def test_this_stack_is_inside_the_supported_range():
    compat.check_torch()
    compat.check_deepspeed()


def test_pyproject_lower_bounds_are_the_tested_minimum():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    bounds = {re.split(r"[<>=]", d)[0]: d for d in deps}
    assert bounds["torch"] == "torch>=" + ".".join(map(str, compat.MIN_TORCH))
    assert bounds["deepspeed"] == "deepspeed>=" + ".".join(map(str, compat.MIN_DEEPSPEED))
    makefile = (ROOT / "Makefile").read_text()
    gaudi_torch = re.search(r"^GAUDI_TORCH_VERSION\s*\?=\s*(\S+)", makefile, re.M).group(1)
    gaudi_ds = re.search(r"^GAUDI_DEEPSPEED_VERSION\s*\?=\s*(\S+)", makefile, re.M).group(1)
    assert compat.version_tuple(gaudi_ds) == compat.MIN_DEEPSPEED  # CI's second leg tests the minimum
    assert compat.version_tuple(gaudi_torch)[:2] == (2, 7)  # what Gaudi software 1.22/1.23 ships


@pytest.mark.parametrize("torch_version,legacy", [("2.6.0", True), ("2.7.1+cu126", True),
                                                  ("2.8.0", False), ("2.13.0+cpu", False)])
def test_tcp_store_takes_the_listen_fd_on_every_torch(monkeypatch, torch_version, legacy):
    """torch < 2.8: the libuv store refuses a listen fd, so the master asks for the legacy one."""
    calls = []
    monkeypatch.setattr(dist, "TCPStore", lambda *args, **kwargs: calls.append(kwargs) or "store")
    monkeypatch.setattr(torch, "__version__", torch_version)
    timeout = timedelta(seconds=1)
    assert compat.tcp_store("127.0.0.1", 1, 2, True, timeout, listen_fd=7) == "store"
    assert calls[0]["master_listen_fd"] == 7
    assert ("use_libuv" in calls[0] and calls[0]["use_libuv"] is False) == legacy
    assert compat.tcp_store("127.0.0.1", 1, 2, False, timeout, listen_fd=7) == "store"
    assert "master_listen_fd" not in calls[1] and "use_libuv" not in calls[1]  # clients: no fd


def _gather_and_scatter():
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.arange(4.0) + 10 * rank  # (4,)
    gathered = torch.empty(4 * world)
    compat.all_gather_single(gathered, x)
    shard = torch.empty(4 // world)
    compat.reduce_scatter_single(shard, x)
    return gathered, shard


def test_renamed_collectives_match_the_formula_on_real_ranks():
    results = launch(_gather_and_scatter, 2, timeout=60)
    expected_gather = torch.cat([torch.arange(4.0), torch.arange(4.0) + 10])
    total = torch.arange(4.0) * 2 + 10  # Σ over the two ranks
    for rank, (gathered, shard) in enumerate(results):
        assert torch.equal(gathered, expected_gather)
        assert torch.equal(shard, total[2 * rank:2 * rank + 2])


def test_tied_weight_attr_is_one_plain_name():
    """DeepSpeed < 0.16 getattr()s tied_weight_attr; a dotted path works only on newer releases."""
    from minimegatron.config import gpt_config
    from minimegatron.mpu.state import ParallelState
    from minimegatron.pipe import EmbeddingPipe

    emb = EmbeddingPipe(gpt_config(hidden_size=16, num_attention_heads=2, num_layers=1, vocab_size=32,
                                   max_seq_len=8), ParallelState())
    assert getattr(emb, "tied_weight") is emb.word_embeddings.weight
    assert "tied_weight" not in dict(emb.named_parameters())  # no second name in the state_dict


def test_preload_imports_only_modules_this_deepspeed_has():
    compat.preload_deepspeed()
    version = compat.version_tuple(importlib.metadata.version("deepspeed"))
    import sys

    assert "deepspeed.runtime.pipe.engine" in sys.modules
    if version < (0, 17):
        assert "deepspeed.runtime.zero.muon" not in sys.modules
