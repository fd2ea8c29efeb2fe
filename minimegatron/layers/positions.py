"""Where a token is: learned absolute positions (GPT), rotary embeddings (LLaMA) and ALiBi.

**Learned absolute** (GPT-2): a table ``P`` of ``max_seq_len × h`` rows, added to the token embedding
before the first layer: ``x_t = E[token_t] + P[t]``. It is replicated on every TP rank (small) and a
position ``>= max_seq_len`` has no row. Checking the ids reads them on the host (a device sync), so
it is :func:`validate_position_ids`, run where positions enter (``LanguageModel`` checks its
sequence length against ``max_seq_len`` with no sync), or on every forward of a table built with
``check_positions=True`` (for debugging).

**Rotary** (RoPE, Su et al. 2021; LLaMA): no parameters. Inside attention, each query/key head vector
is rotated by an angle proportional to its position ``m``, pairing dimension ``i`` with ``i + d/2``::

    θ_i = rope_theta^(-2i/d),  i = 0 … d/2-1          (d = head_dim)
    q'  = q · cos(mθ) + rotate_half(q) · sin(mθ),     rotate_half([x1 | x2]) = [-x2 | x1]

so that ``q'_m · k'_n`` depends only on ``m - n``: the dot product sees relative positions. This is
Hugging Face LLaMA's "rotate_half" convention (pairs ``(i, i + d/2)``), not the original Meta code's
interleaved pairs ``(2i, 2i+1)``; Hugging Face checkpoints were already permuted into this layout,
so their ``q_proj``/``k_proj`` weights load here with **no permutation**. Heads are independent, so
RoPE runs on each TP rank's own heads with no communication.

**RoPE scaling** (``config.rope_scaling``, :class:`~minimegatron.rope_scaling.RopeScaling`) stretches
the frequencies so that positions beyond the pre-training context ``L`` rotate no further than the
model has seen; :func:`rope_inv_freq` maps ``θ_i -> θ'_i`` (factor ``κ``)::

    linear:  θ'_i = θ_i / κ                          (every angle κ times slower: position interpolation)
    llama3:  λ_i = 2π/θ_i  (wavelength),  λ_lo = L / low_freq_factor,  λ_hi = L / high_freq_factor
             θ'_i = θ_i                                  if λ_i < λ_hi  (high frequencies: kept)
             θ'_i = θ_i / κ                              if λ_i > λ_lo  (low frequencies: interpolated)
             θ'_i = (1 - γ_i)·θ_i/κ + γ_i·θ_i,   γ_i = (L/λ_i - low_freq_factor)
                                                          / (high_freq_factor - low_freq_factor)  between

Only the frequencies change (the attention logits are not rescaled), so nothing else in the model
knows about it, and the KV cache stays valid: a key's angle depends on its position only.

**ALiBi** (Press et al. 2022, "Train Short, Test Long"): no parameters and no rotation; each head adds a
linear penalty to its attention scores, ``score(i, j) -= m_h · (i - j)`` for a query at ``i`` and key
at ``j ≤ i``. The head slopes form a geometric sequence: for ``n`` heads (``n`` a power of two)
``m_h = 2^(-8h/n)``, ``h = 1 … n``; otherwise take the ``2^⌊log2 n⌋`` slopes and fill up with every
other slope of the ``2·2^⌊log2 n⌋`` sequence. Under TP each rank takes the slopes of its own heads.
"""
from __future__ import annotations

import math

import torch
from torch import nn

# The rotation itself lives beside Gaudi's fused version of it: q·cos(mθ) + rotate_half(q)·sin(mθ).
from minimegatron.kernels import plain_rotary as apply_rotary
from minimegatron.kernels import rotate_half
from minimegatron.rope_scaling import RopeScaling

__all__ = ["LearnedPositionEmbedding", "RotaryEmbedding", "apply_rotary", "rotate_half", "alibi_slopes",
           "alibi_bias", "validate_position_ids", "rope_inv_freq"]


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """The d/2 frequencies θ_i = theta^(-2i/d), stretched by ``scaling`` (module docstring); fp32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    inv_freq = 1.0 / (theta ** exponents)  # (d/2,)
    if scaling is None:
        return inv_freq
    slow = inv_freq / scaling.factor  # θ_i / κ
    if scaling.rope_type == "linear":
        return slow
    lo, hi, ctx = scaling.low_freq_factor, scaling.high_freq_factor, scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq  # λ_i
    gamma = (ctx / wavelen - lo) / (hi - lo)  # γ_i: 0 at λ_lo, 1 at λ_hi
    blended = (1 - gamma) * inv_freq / scaling.factor + gamma * inv_freq  # HF's order of operations
    out = torch.where(wavelen > ctx / lo, slow, blended)  # long wavelengths: θ/κ
    return torch.where(wavelen < ctx / hi, inv_freq, out)  # short ones: θ unchanged


def validate_position_ids(position_ids: torch.Tensor, max_seq_len: int) -> None:
    """Raise a ValueError if a position lies outside [0, max_seq_len) (reads on the host: a sync)."""
    if position_ids.numel() == 0:
        return
    lo, hi = int(position_ids.min()), int(position_ids.max())
    if hi >= max_seq_len:
        raise ValueError(
            f"position {hi} is beyond the learned position table of "
            f"max_seq_len={max_seq_len} rows: shorten the sequence (prompt + generated "
            f"tokens) to at most {max_seq_len}, or build the model with a larger max_seq_len")
    if lo < 0:
        raise ValueError(f"negative position id {lo}")


class LearnedPositionEmbedding(nn.Embedding):
    """GPT-2's position table: ``position_ids (b, s) -> (b, s, h)``; replicated over TP.

    ``check_positions=True`` runs :func:`validate_position_ids` on every forward (a host sync).
    """

    def __init__(self, max_seq_len: int, hidden_size: int, init_std: float = 0.02,
                 check_positions: bool = False) -> None:
        table = torch.empty(max_seq_len, hidden_size).normal_(0.0, init_std)  # same on every rank
        super().__init__(max_seq_len, hidden_size, _weight=table)
        self.check_positions = check_positions

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        if self.check_positions:
            validate_position_ids(position_ids, self.num_embeddings)
        return super().forward(position_ids)  # (b, s, h)


class RotaryEmbedding(nn.Module):
    """``position_ids (b, s) -> (cos, sin)``, each ``(s, b, 1, d)`` to broadcast over ``(s, b, n, d)``.

    No parameters and no buffers: the frequencies are recomputed from ``theta`` (and ``scaling``) in
    fp32 on every call (d/2 numbers), so ``model.to(torch.bfloat16)`` cannot round them and
    state_dicts hold no RoPE entries. Works for any sequence length.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: RopeScaling | None = None) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings rotate pairs of dims: head_dim={head_dim} must be even")
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling

    def inv_freq(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The d/2 rotation frequencies θ'_i (:func:`rope_inv_freq`), fp32."""
        return rope_inv_freq(self.head_dim, self.theta, self.scaling, device)  # (d/2,)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq(position_ids.device)  # (d/2,)
        angles = position_ids.t().float()[..., None] * inv_freq  # (s, b, d/2): m·θ_i
        angles = torch.cat((angles, angles), dim=-1)[:, :, None, :]  # (s, b, 1, d): pairs (i, i+d/2)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta:g}, scaling={self.scaling}"


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ``num_heads`` ALiBi slopes of Press et al.: ``2^(-8/n), 2^(-16/n), …`` (n a power of 2)."""
    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(closest)
    slopes += power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)  # (n,)


def alibi_bias(slopes: torch.Tensor, q_len: int, k_len: int) -> torch.Tensor:
    """``-m_h · (i - j)`` for queries ``i`` = the last ``q_len`` of ``k_len`` positions: (n, q, k).

    With a KV cache the ``q_len`` new queries sit at positions ``k_len - q_len … k_len - 1``. Keys
    after a query (``j > i``) get a positive value here; the causal mask removes them.
    """
    q_pos = torch.arange(k_len - q_len, k_len, device=slopes.device)[:, None]  # (q, 1)
    k_pos = torch.arange(k_len, device=slopes.device)[None, :]  # (1, k)
    return -slopes[:, None, None] * (q_pos - k_pos).to(slopes.dtype)  # (n, q, k)
