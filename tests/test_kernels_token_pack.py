"""ltp_compress.kernels.token_pack: PackedLayout (what the pruned runtime runs) == loop references."""

from __future__ import annotations

import pytest
import torch

from ltp_compress.kernels.token_pack import PackedLayout, pack_reference, unpack_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths", [[1], [5], [3, 3, 3], [7, 1, 4], [2, 9, 9, 1, 6], [128, 17]])
def test_packed_layout_matches_reference(device, lengths):
    lengths = torch.tensor(lengths, dtype=torch.int64, device=device)
    b, max_len, f = len(lengths), int(lengths.max()), 5
    layout = PackedLayout.from_lengths(lengths)
    assert layout.max_len == max_len
    assert layout.full == (b == 1 or int(lengths.min()) == max_len)
    x = torch.randn(b, max_len, f, device=device)
    packed = layout.pack(x)
    assert torch.equal(packed, pack_reference(x, lengths))
    assert packed.shape == (int(lengths.sum()), f)
    unpacked = layout.unpack(packed)
    assert torch.equal(unpacked, unpack_reference(packed, lengths, max_len))
    valid = layout.valid_mask()
    assert torch.equal(valid.sum(1), lengths)
    assert torch.all(unpacked[~valid] == 0)
    assert torch.equal(unpacked[valid], x[valid])  # round trip of the real positions
    # first_rows points at each sequence's first token in the packed matrix
    assert torch.equal(packed[layout.first_rows()], x[:, 0])
