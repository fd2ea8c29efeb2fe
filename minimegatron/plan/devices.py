"""The accelerators the planner knows: peak dense bf16 FLOP/s, memory, link bandwidths — each cited.

Bandwidths are **per device, per direction** (what one device can push into the fabric while it
receives as much), in bytes/s: vendors quote NVLink "900 GB/s" *bidirectional*, i.e. 450 GB/s each
way, and Gaudi's RoCE ports in Gb/s per port. ``intra_node_bw`` is the scale-up fabric between the
``devices_per_node`` devices of one box, ``inter_node_bw`` a device's share of the scale-out NICs.

=========  ==========  =======  ==================  ==================  =====
device     bf16 dense  memory   intra-node / dir.   inter-node / dir.   /node
=========  ==========  =======  ==================  ==================  =====
H100 SXM   989 TFLOP/s  80 GB   450 GB/s (NVLink4)  50 GB/s (400G NIC)  8
H200 SXM   989 TFLOP/s 141 GB   450 GB/s (NVLink4)  50 GB/s (400G NIC)  8
Gaudi 2    432 TFLOP/s  96 GB   262.5 GB/s (21×100G) 37.5 GB/s (3×100G)  8
Gaudi 3   1835 TFLOP/s 128 GB   525 GB/s (21×200G)  75 GB/s (3×200G)    8
CPU       placeholder — measure yours and pass ``cpu_device(...)``
=========  ==========  =======  ==================  ==================  =====

Sources (the figure quoted, then where):

* H100 SXM — "BFLOAT16 Tensor Core 1,979 TFLOPS*", "*Shown with sparsity. Specifications 1/2 lower
  without sparsity" (dense: 989), "GPU Memory 80 GB", "NVLink: 900GB/s" (bidirectional): the H100
  datasheet table, https://www.nvidia.com/en-us/data-center/h100/ (dense matrix BF16 989.4 TFLOPS
  also in https://glennklockwood.com/garden/processors/h100). Scale-out: DGX H100/H200 "eight
  single-port NVIDIA ConnectX-7 VPI ... up to 400 Gb/s InfiniBand/Ethernet" — one 400 Gb/s NIC per
  GPU = 50 GB/s each way: https://docs.nvidia.com/dgx-basepod/reference-architecture-infrastructure-foundation-enterprise-ai/latest/core-components.html
* H200 SXM — the same GH100 compute (BF16 1,979 TFLOPS with sparsity), "GPU Memory 141GB",
  "NVLink 900GB/s": https://www.nvidia.com/en-us/data-center/h200/ ; networking as DGX H100 (above,
  "1,128 GB total GPU memory for H200").
* Gaudi 2 — "Peak Compute (BF16) 432 TFLOPs", "HBM Capacity 96 GB" (R. Kaplan, "Intel Gaudi 3 AI
  Accelerator: Architected for Gen AI Training and Inference", Hot Chips 2024, slide 2, generations
  table); links: "The theoretical peak of scale-up bandwidth from each Gaudi 2 is 21*100Gbps =
  21*12.5 GB/s = 262.5 GB/s unidirectional ... The scale-out bandwidth from each Gaudi 2 is 3*100Gbps
  = 37.5 GB/s in each direction": https://docs.habana.ai/en/latest/Management_and_Monitoring/Network_Configuration/index.html
* Gaudi 3 — "BF16 Matrix TFLOPs 1835", "HBM Capacity 128 GB" (Kaplan, Hot Chips 2024, slide 4);
  "scale-up bandwidth from each Gaudi is 21*200Gbps = 21*25 GB/s = 525 GB/s unidirectional ... The
  scale-out bandwidth from each Gaudi 3 is 3*200Gbps = 75 GB/s in each direction" (the Habana
  network-configuration page above).

The 21 scale-up ports of a Gaudi reach its 7 peers 3 ports each (all-to-all, no switch): a collective
over all 8 devices can use all 21; a group of 2 only the 3 ports to its peer. The planner charges
every intra-node collective the full ``intra_node_bw`` (the NVLink-switch view), which flatters
small Gaudi groups — see :func:`group_bandwidth` in ``cost.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Device", "DEVICES", "get_device", "cpu_device"]

GB = 1e9


@dataclass(frozen=True)
class Device:
    """One accelerator type and the box it sits in (bandwidths per device, per direction, bytes/s)."""

    name: str
    peak_flops: float        # dense bf16 matmul FLOP/s
    memory_bytes: float      # device memory (HBM)
    intra_node_bw: float     # scale-up fabric (NVLink / Gaudi's scale-up RoCE ports)
    inter_node_bw: float     # scale-out share of one device
    devices_per_node: int
    source: str = ""         # where the numbers come from

    def __post_init__(self) -> None:
        for field in ("peak_flops", "memory_bytes", "intra_node_bw", "inter_node_bw"):
            v = getattr(self, field)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ValueError(f"Device {self.name!r}: {field}={v!r} must be a number > 0")
        if not isinstance(self.devices_per_node, int) or self.devices_per_node < 1:
            raise ValueError(f"Device {self.name!r}: devices_per_node={self.devices_per_node!r} must be an "
                             "int >= 1")


DEVICES: dict[str, Device] = {
    "h100": Device("H100 SXM", 989e12, 80 * GB, 450 * GB, 50 * GB, 8,
                   "nvidia.com/en-us/data-center/h100 + dgx-h100"),
    "h200": Device("H200 SXM", 989e12, 141 * GB, 450 * GB, 50 * GB, 8, "nvidia.com/en-us/data-center/h200"),
    "gaudi2": Device("Gaudi 2", 432e12, 96 * GB, 262.5 * GB, 37.5 * GB, 8,
                     "Hot Chips 2024 (Kaplan) + docs.habana.ai network configuration"),
    "gaudi3": Device("Gaudi 3", 1835e12, 128 * GB, 525 * GB, 75 * GB, 8,
                     "Hot Chips 2024 (Kaplan) + docs.habana.ai network configuration"),
}


def cpu_device(peak_flops: float = 1e12, memory_bytes: float = 64 * GB, link_bw: float = 10 * GB,
               devices_per_node: int = 8) -> Device:
    """A CPU "device" (ranks as processes of one host). The defaults are **placeholders**, not
    measurements: time a matmul (``torch.mm`` of 4096², FLOPs = 2n³) and a gloo all-reduce on your
    machine and pass those numbers."""
    return Device("CPU (placeholder)", peak_flops, memory_bytes, link_bw, link_bw, devices_per_node,
                  "placeholder: pass your measured numbers")


def get_device(device: str | Device) -> Device:
    """A :class:`Device`, or its name in :data:`DEVICES` (``"h100"``, ``"gaudi2"``, …; ``"cpu"`` =
    :func:`cpu_device` placeholders)."""
    if isinstance(device, Device):
        return device
    key = str(device).lower().replace(" ", "").replace("-", "").replace("_", "").removesuffix("sxm")
    if key == "cpu":
        return cpu_device()
    if key not in DEVICES:
        raise ValueError(f"unknown device {device!r}: choose one of {sorted(DEVICES) + ['cpu']} or pass "
                         "a minimegatron.plan.Device(...) with your own numbers")
    return DEVICES[key]
