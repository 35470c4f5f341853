"""Token packing for the pruned runtime: move between a padded batch [b, s, d] and a packed
matrix [T, d] of the surviving tokens (no padding), which is what the linear layers consume.

Layout of a packed matrix: the tokens of sequence 0 (in their original order), then those of
sequence 1, ...; ``lengths[i]`` (int64 [b]) tokens belong to sequence i, sum(lengths) = T.

Every function has a ``*_reference`` twin written as a Python loop over sequences; the fast
versions are vectorised (boolean masking / index_put) and work on CPU and CUDA. Shapes that
depend on the data (T, max_len) need one host sync on CUDA (``.item()`` / boolean indexing).
"""

from __future__ import annotations

import torch
from torch import Tensor

# ----------------------------------------------------------------------------- pack


def pack_tokens(x_padded: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """x_padded [b, s, d], keep bool [b, s] -> (x_packed [T, d], lengths int64 [b]).

    T = keep.sum(); row-major order (sequence by sequence, positions ascending) preserved.
    """
    _check_keep(x_padded, keep)
    keep = keep.to(torch.bool)
    lengths = keep.sum(dim=1, dtype=torch.int64)  # [b]
    return x_padded[keep], lengths  # boolean mask indexing is row-major: [T, d]


def pack_tokens_reference(x_padded: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    _check_keep(x_padded, keep)
    rows, lengths = [], []
    for i in range(x_padded.shape[0]):
        k = keep[i].to(torch.bool)
        rows.append(x_padded[i][k])  # [n_i, d]
        lengths.append(int(k.sum()))
    x_packed = torch.cat(rows, 0) if rows else x_padded.new_zeros(0, x_padded.shape[-1])
    return x_packed, torch.tensor(lengths, dtype=torch.int64, device=x_padded.device)


# ----------------------------------------------------------------------------- unpack


def unpack_tokens(x_packed: Tensor, lengths: Tensor, max_len: int | None = None) -> tuple[Tensor, Tensor]:
    """x_packed [T, d], lengths int64 [b] -> (x_padded [b, max_len, d], pad_mask bool [b, max_len]).

    Sequence i occupies positions 0..lengths[i]-1 of row i; everything else is zero.
    ``pad_mask`` is True at PADDING positions (False where a real token sits), i.e. the mask to
    use with ``masked_fill(pad_mask, -inf)``; ``~pad_mask`` is the valid-token mask.
    max_len defaults to max(lengths) (0 for an empty batch) and must be >= max(lengths).
    """
    lengths = lengths.to(device=x_packed.device, dtype=torch.int64)
    _check_lengths(x_packed, lengths)
    b, d = lengths.shape[0], x_packed.shape[-1]
    longest = int(lengths.max()) if b > 0 else 0
    if max_len is None:
        max_len = longest
    elif max_len < longest:
        raise ValueError(f"max_len={max_len} < longest sequence {longest}")
    pos = torch.arange(max_len, device=x_packed.device)  # [max_len]
    valid = pos[None, :] < lengths[:, None]  # [b, max_len]
    x_padded = x_packed.new_zeros(b, max_len, d)
    x_padded[valid] = x_packed  # row-major order of `valid` == packed order
    return x_padded, ~valid


def unpack_tokens_reference(x_packed: Tensor, lengths: Tensor, max_len: int | None = None) -> tuple[Tensor, Tensor]:
    lengths_l = [int(n) for n in lengths]
    _check_lengths(x_packed, lengths)
    b, d = len(lengths_l), x_packed.shape[-1]
    longest = max(lengths_l, default=0)
    if max_len is None:
        max_len = longest
    elif max_len < longest:
        raise ValueError(f"max_len={max_len} < longest sequence {longest}")
    x_padded = x_packed.new_zeros(b, max_len, d)
    pad_mask = torch.ones(b, max_len, dtype=torch.bool, device=x_packed.device)
    start = 0
    for i, n in enumerate(lengths_l):
        x_padded[i, :n] = x_packed[start : start + n]
        pad_mask[i, :n] = False
        start += n
    return x_padded, pad_mask


# ----------------------------------------------------------------------------- gather


def gather_kept(x_packed: Tensor, lengths: Tensor, keep_packed: Tensor) -> tuple[Tensor, Tensor]:
    """Drop pruned tokens from a packed matrix.

    x_packed [T, d], lengths int64 [b], keep_packed bool [T] -> (x_packed' [T', d], lengths' [b])
    with T' = keep_packed.sum() and lengths'[i] = kept tokens of sequence i (order preserved).
    """
    lengths = lengths.to(device=x_packed.device, dtype=torch.int64)
    _check_lengths(x_packed, lengths)
    keep_packed = keep_packed.to(torch.bool)
    if keep_packed.shape != (x_packed.shape[0],):
        raise ValueError(f"keep_packed must be bool [T={x_packed.shape[0]}], got {tuple(keep_packed.shape)}")
    b = lengths.shape[0]
    seq_id = torch.repeat_interleave(torch.arange(b, device=x_packed.device), lengths)  # [T]
    new_lengths = torch.zeros(b, dtype=torch.int64, device=x_packed.device)
    new_lengths.index_add_(0, seq_id, keep_packed.to(torch.int64))
    return x_packed[keep_packed], new_lengths


def gather_kept_reference(x_packed: Tensor, lengths: Tensor, keep_packed: Tensor) -> tuple[Tensor, Tensor]:
    _check_lengths(x_packed, lengths)
    rows, new_lengths, start = [], [], 0
    for n in (int(v) for v in lengths):
        k = keep_packed[start : start + n].to(torch.bool)
        rows.append(x_packed[start : start + n][k])
        new_lengths.append(int(k.sum()))
        start += n
    out = torch.cat(rows, 0) if rows else x_packed.new_zeros(0, x_packed.shape[-1])
    return out, torch.tensor(new_lengths, dtype=torch.int64, device=x_packed.device)


# ----------------------------------------------------------------------------- checks


def _check_keep(x_padded: Tensor, keep: Tensor) -> None:
    if x_padded.dim() != 3 or keep.shape != x_padded.shape[:2]:
        raise ValueError(f"expected x_padded [b, s, d] and keep [b, s], got {tuple(x_padded.shape)} and {tuple(keep.shape)}")


def _check_lengths(x_packed: Tensor, lengths: Tensor) -> None:
    if x_packed.dim() != 2 or lengths.dim() != 1:
        raise ValueError(f"expected x_packed [T, d] and lengths [b], got {tuple(x_packed.shape)} and {tuple(lengths.shape)}")
    total = int(lengths.sum()) if lengths.numel() else 0
    if total != x_packed.shape[0]:
        raise ValueError(f"sum(lengths)={total} != T={x_packed.shape[0]}")
