"""Tests for ltp_compress.kernels.token_pack: fast (vectorised) versions == loop references."""

from __future__ import annotations

import pytest
import torch

from ltp_compress.kernels import (
    gather_kept,
    gather_kept_reference,
    pack_tokens,
    pack_tokens_reference,
    unpack_tokens,
    unpack_tokens_reference,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _keep(b, s, p, seed, device):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, s, generator=g) < p
    if b > 1:
        keep[1] = False  # a sequence with no kept token
    keep[0, 0] = True
    return keep.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,s,d,p", [(1, 1, 4, 1.0), (3, 7, 5, 0.5), (8, 128, 16, 0.3), (4, 33, 8, 1.0)])
def test_pack_matches_reference_and_roundtrip(device, b, s, d, p):
    x = torch.randn(b, s, d).to(device)
    keep = _keep(b, s, p, seed=b * s, device=device)
    xp, lengths = pack_tokens(x, keep)
    xr, lr = pack_tokens_reference(x, keep)
    assert xp.shape == (int(keep.sum()), d) and lengths.dtype == torch.int64
    assert torch.equal(xp, xr) and torch.equal(lengths, lr)
    # order: first row of sequence 0 is its first kept token
    assert torch.equal(xp[0], x[0, keep[0].nonzero()[0, 0]])

    xu, pad = unpack_tokens(xp, lengths)
    xur, padr = unpack_tokens_reference(xp, lengths)
    assert torch.equal(xu, xur) and torch.equal(pad, padr)
    assert pad.dtype == torch.bool and xu.shape == (b, int(lengths.max()), d)
    assert torch.equal((~pad).sum(1), lengths)  # pad_mask True = padding
    assert torch.all(xu[pad] == 0)
    # packing the unpacked batch with the valid mask gives back the packed matrix
    xp2, l2 = pack_tokens(xu, ~pad)
    assert torch.equal(xp2, xp) and torch.equal(l2, lengths)

    xu_long, pad_long = unpack_tokens(xp, lengths, max_len=s + 3)
    assert xu_long.shape == (b, s + 3, d) and torch.equal(xu_long[:, : xu.shape[1]], xu)
    assert torch.equal(unpack_tokens_reference(xp, lengths, max_len=s + 3)[1], pad_long)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,s,d", [(1, 5, 3), (4, 20, 6), (16, 64, 8)])
def test_gather_kept_matches_reference(device, b, s, d):
    x = torch.randn(b, s, d).to(device)
    keep1 = _keep(b, s, 0.7, seed=1, device=device)
    xp, lengths = pack_tokens(x, keep1)
    g = torch.Generator().manual_seed(2)
    keep_packed = (torch.rand(xp.shape[0], generator=g) < 0.5).to(device)
    out, new_len = gather_kept(xp, lengths, keep_packed)
    ref, ref_len = gather_kept_reference(xp, lengths, keep_packed)
    assert torch.equal(out, ref) and torch.equal(new_len, ref_len)
    # equals packing with the composed keep mask from the padded batch
    keep2 = keep1.clone()
    keep2[keep1] = keep_packed
    direct, direct_len = pack_tokens(x, keep2)
    assert torch.equal(out, direct) and torch.equal(new_len, direct_len)


def test_empty_and_errors():
    x = torch.randn(2, 3, 4)
    keep = torch.zeros(2, 3, dtype=torch.bool)
    xp, lengths = pack_tokens(x, keep)
    assert xp.shape == (0, 4) and lengths.tolist() == [0, 0]
    assert torch.equal(pack_tokens_reference(x, keep)[0], xp)
    xu, pad = unpack_tokens(xp, lengths)
    assert xu.shape == (2, 0, 4) and pad.shape == (2, 0)
    with pytest.raises(ValueError):
        unpack_tokens(torch.randn(5, 4), torch.tensor([2, 2]))  # sum(lengths) != T
    with pytest.raises(ValueError):
        unpack_tokens(torch.randn(4, 4), torch.tensor([3, 1]), max_len=2)
    with pytest.raises(ValueError):
        pack_tokens(x, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError):
        gather_kept(torch.randn(4, 4), torch.tensor([3, 1]), torch.ones(3, dtype=torch.bool))
