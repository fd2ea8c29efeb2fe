"""Exercise 11's battery: plausible wrong reshards, each with the message its grader must give; the
grader names a wrong answer by comparing it with these same mistakes' results (``MODELS``)."""
from __future__ import annotations

import torch

from minimegatron.mpu.layers import shard_weight


def reshard(shards, dim, stride, new_tp, *, rebuild_stride=True, cut_stride=True, cat_dim=None, reverse=False):
    """A reshard with the usual mistakes as switches (the defaults are right)."""
    d = dim if cat_dim is None else cat_dim
    shards = shards[::-1] if reverse else shards
    if rebuild_stride:
        blocks = zip(*(s.chunk(stride, d) for s in shards))  # block i: every rank's piece i
        full = torch.cat([torch.cat(pieces, d) for pieces in blocks], d)
    else:
        full = torch.cat(shards, d)
    if cut_stride:
        return [shard_weight(full, dim, r, new_tp, stride) for r in range(new_tp)]
    return [t.contiguous() for t in full.chunk(new_tp, dim)]


def switched(**switches):
    def my_reshard(shards, dim, stride, new_tp):
        return reshard(shards, dim, stride, new_tp, **switches)
    return my_reshard


MODELS = [  # (switches, message)
    (dict(rebuild_stride=False, cut_stride=False), "the stride was ignored: with stride s a shard is s pieces "
     "(one per block of the fused weight), so rebuild block by block and cut every block for new_tp"),
    (dict(rebuild_stride=False), "the full weight was rebuilt by concatenating whole shards: with stride s each "
                                 "shard is s pieces — block i is the concatenation of every rank's piece i"),
    (dict(cut_stride=False), "the rebuilt weight was cut into new_tp contiguous slices: cut each of its stride "
                             "blocks into new_tp parts and give rank r part r of every block"),
    (dict(cat_dim=0), "the shards were concatenated along dim 0: a row-parallel weight is split along `dim`"),
    (dict(reverse=True), "the shards were taken in reverse rank order: rank r's piece is the r-th of each block"),
]
BATTERY = [(message.split(":")[0], switched(**switches), message.split(":")[0].replace("(", r"\(").replace(")", r"\)"))
           for switches, message in MODELS] + [
    ("one shard", lambda shards, dim, stride, new_tp: [torch.cat(shards, dim)], r"got 1 shards, expected a list of "
                                                                                r"new_tp = 2"),
]
