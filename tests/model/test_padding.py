"""unpad / pad_rows: any 0/1 mask (right, left, gaps, empty rows) round-trips."""

import torch

from spanbert_fast.padding import pad_rows, unpad


def test_unpad_pad_round_trip_with_left_padding_gaps_and_empty_rows():
    mask = torch.tensor([[1, 1, 1, 0, 0],
                         [0, 0, 1, 1, 1],   # left padding
                         [1, 0, 1, 0, 1],   # gaps
                         [0, 0, 0, 0, 0]])  # an empty row
    x = torch.randn(4, 5, 3)
    where = unpad(mask)
    assert where.cu_seqlens.tolist() == [0, 3, 6, 9, 9]
    assert where.cu_seqlens.dtype == torch.int32
    assert where.max_seqlen == 5 and (where.batch, where.seq) == (4, 5)
    packed = x.reshape(20, 3).index_select(0, where.indices)
    assert torch.equal(packed, x[mask.bool()])  # row-major order, sequences contiguous
    padded = pad_rows(packed, where)
    assert torch.equal(padded[mask.bool()], x[mask.bool()])
    assert torch.count_nonzero(padded[~mask.bool()]) == 0


def test_pad_rows_is_differentiable():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    where = unpad(mask)
    rows = torch.randn(3, 2, requires_grad=True)
    upstream = torch.randn(2, 3, 2)
    pad_rows(rows, where).backward(upstream)
    assert torch.equal(rows.grad, upstream[mask.bool()])
