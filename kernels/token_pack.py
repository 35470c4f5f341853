"""Token packing for the pruned runtime: the surviving tokens of a batch as one packed matrix
[T, d] (no padding), which is what the linear layers consume, and the per-sequence padded layout
[b, max_len, d] that attention needs.

Packed order: the tokens of sequence 0 (in their original order), then those of sequence 1, ...;
`lengths[i]` tokens belong to sequence i, T = sum(lengths).

`PackedLayout` is what `modeling.pruned_encoder.forward_packed` runs; `pack_reference` /
`unpack_reference` are plain Python loops over sequences that the tests compare it with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PackedLayout:
    """Where each packed row lives in the per-layer padded attention layout."""

    lengths: Tensor  # [b] tokens per sequence (int64)
    flat_index: Tensor | None  # [T] row r of packed -> b_r * max_len + pos_r (None when full)
    max_len: int
    full: bool = False  # every sequence has max_len tokens: pack/unpack are reshapes (always at bs 1)

    @classmethod
    def from_lengths(cls, lengths: Tensor) -> "PackedLayout":
        max_len = int(lengths.max())
        b = lengths.shape[0]
        if b == 1 or int(lengths.min()) == max_len:
            return cls(lengths=lengths, flat_index=None, max_len=max_len, full=True)
        pos = torch.arange(max_len, device=lengths.device).expand(b, max_len)
        valid = pos < lengths[:, None]  # [b, max_len]
        flat_index = valid.reshape(-1).nonzero().squeeze(1)
        return cls(lengths=lengths, flat_index=flat_index, max_len=max_len, full=False)

    def valid_mask(self) -> Tensor:
        pos = torch.arange(self.max_len, device=self.lengths.device)
        return pos[None, :] < self.lengths[:, None]  # [b, max_len]

    def unpack(self, x: Tensor) -> Tensor:
        """[T, f] -> [b, max_len, f] (zeros at padding)."""
        b = self.lengths.shape[0]
        if self.full:
            return x.view(b, self.max_len, x.shape[-1])
        out = x.new_zeros(b * self.max_len, x.shape[-1])
        out.index_copy_(0, self.flat_index, x)
        return out.view(b, self.max_len, x.shape[-1])

    def pack(self, x: Tensor) -> Tensor:
        """[b, max_len, f] -> [T, f] (padding rows dropped)."""
        if self.full:
            return x.reshape(-1, x.shape[-1])
        return x.reshape(-1, x.shape[-1]).index_select(0, self.flat_index)

    def first_rows(self) -> Tensor:
        """Packed row index of each sequence's first token. [b]"""
        return torch.cumsum(self.lengths, 0) - self.lengths


# ----------------------------------------------------------------------------- references


def pack_reference(x_padded: Tensor, lengths: Tensor) -> Tensor:
    """[b, s, f] with sequence i's tokens at positions < lengths[i] -> [T, f], one sequence at a time."""
    return torch.cat([x_padded[i, : int(n)] for i, n in enumerate(lengths.tolist())], dim=0)


def unpack_reference(x_packed: Tensor, lengths: Tensor, max_len: int) -> Tensor:
    """[T, f] -> [b, max_len, f] with zeros at padding, one sequence at a time."""
    out = x_packed.new_zeros(len(lengths), max_len, x_packed.shape[-1])
    start = 0
    for i, n in enumerate(lengths.tolist()):
        out[i, :n] = x_packed[start:start + n]
        start += n
    return out
