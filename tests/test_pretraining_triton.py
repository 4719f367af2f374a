"""SpanBertForPreTraining on the Triton backend (interpreter on CPU) against the torch
backend: MLM + SBO losses and every parameter gradient."""

from __future__ import annotations

import pytest
import torch

import spanbert_fast as sf
from spanbert_fast import ops
from assertions import assert_close
from test_parity import compare_param_grads

MAX_REL = 1e-5


def _kernels_ready() -> bool:
    ops._probe_triton()
    return all(op in ops._KERNEL_MODULES for op in ops._TRITON_KERNEL_FILES)


pytestmark = pytest.mark.skipif(not _kernels_ready(), reason="not every Triton kernel imports")


def _batch(vocab: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab, (3, 24), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, 15:] = 0
    mask[2, 9:] = 0
    labels = torch.full_like(input_ids, -100)
    # Masked spans: row 0 positions 3..6, row 1 positions 10..12, row 2 position 4.
    spans = [(0, 3, 6), (1, 10, 12), (2, 4, 4)]
    sbo = []
    for row, start, end in spans:
        labels[row, start:end + 1] = input_ids[row, start:end + 1]
        for i in range(start, end + 1):
            sbo.append([row, start - 1, end + 1, i - start, int(input_ids[row, i])])
    return input_ids, mask, labels, torch.tensor(sbo)


@pytest.mark.parametrize("with_sbo", [True, False])
def test_pretraining_losses_and_gradients_match_torch_backend(with_sbo):
    config = sf.SpanBertConfig.tiny(vocab_size=300, hidden_size=48, num_attention_heads=3,
                                    intermediate_size=96, max_position_embeddings=32)
    torch.manual_seed(0)
    ours = sf.SpanBertForPreTraining(config, backend="triton").eval()
    reference = sf.SpanBertForPreTraining(config, backend="torch").eval()
    reference.load_state_dict(ours.state_dict())
    with torch.no_grad():  # non-trivial heads: biases and LN params away from 0/1
        for (_, a), (_, b) in zip(ours.named_parameters(), reference.named_parameters()):
            noise = torch.randn_like(a) * 0.05
            a.add_(noise)
            b.add_(noise)
    input_ids, mask, labels, sbo = _batch(config.vocab_size)
    kwargs = dict(attention_mask=mask, labels=labels, sbo_targets=sbo if with_sbo else None)
    got = ours(input_ids, **kwargs)
    expected = reference(input_ids, **kwargs)
    assert_close(got.mlm_loss, expected.mlm_loss, max_rel=MAX_REL, name="mlm_loss")
    if with_sbo:
        assert_close(got.sbo_loss, expected.sbo_loss, max_rel=MAX_REL, name="sbo_loss")
    else:
        assert got.sbo_loss is None
    assert_close(got.loss, expected.loss, max_rel=MAX_REL, name="loss")
    got.loss.backward()
    expected.loss.backward()
    skip = "\0" if with_sbo else "cls.pair_target_predictions."
    compare_param_grads(ours, reference, skip_prefix=skip)
