"""The whole encoder on the Triton backend (padding-free path), in the interpreter on CPU.

A 2-layer tiny SpanBertModel with backend="triton" against the torch backend and against
transformers, eval mode, fp32, padded batches: outputs and every parameter gradient.
GPU-only tests (marked ``gpu``): BERT-base/large shapes in bf16 against transformers, where
our error against an fp32 transformers reference must be at most 2x transformers' own bf16
error.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("spanbert_fast.kernels.attention")

import spanbert_fast as sf  # noqa: E402
from spanbert_fast import ops  # noqa: E402
from parity import assert_close, assert_within_2x_of_torch  # noqa: E402
from tiny_models import (compare_param_grads, hf_config, make_batch, randomize,  # noqa: E402
                         valid_rows)

MAX_REL = 1e-5


def _triton_ready() -> bool:
    ops.dispatch.probe_triton()
    missing = [op for op in ("attention", "layer_norm", "bias_gelu")
               if op not in ops.dispatch._KERNEL_MODULES]
    return not missing


pytestmark = pytest.mark.skipif(not _triton_ready(),
                                reason="the encoder's Triton kernels are not all importable")


def _models(attn: str = "sdpa"):
    hf = randomize(transformers.BertModel(hf_config(attn)), seed=21)
    ours = sf.SpanBertModel.from_transformers(hf, backend="triton").eval()
    torch_backend = sf.SpanBertModel.from_transformers(hf, backend="torch").eval()
    return hf, ours, torch_backend


def test_triton_encoder_matches_torch_backend_and_transformers():
    hf, ours, torch_backend = _models()
    input_ids, mask, types, positions = make_batch()
    kwargs = dict(attention_mask=mask, token_type_ids=types, position_ids=positions)
    got = ours(input_ids, output_hidden_states=True, **kwargs)
    via_torch = torch_backend(input_ids, output_hidden_states=True, **kwargs)
    expected = hf(input_ids, output_hidden_states=True, **kwargs)
    # Triton packs every batch, a full one too (valid None, every position real).
    assert ours._runs_packed(input_ids, None, 1.0), "backend='triton' must take the padding-free path"
    assert_close(got.last_hidden_state, via_torch.last_hidden_state, max_rel=MAX_REL,
                 name="triton vs torch backend")
    assert_close(valid_rows(got.last_hidden_state, mask),
                 valid_rows(expected.last_hidden_state, mask), max_rel=MAX_REL,
                 name="triton vs transformers")
    for i, (g, e) in enumerate(zip(got.hidden_states, expected.hidden_states)):
        assert_close(valid_rows(g, mask), valid_rows(e, mask), max_rel=MAX_REL,
                     name=f"hidden_states[{i}]")
    assert_close(got.pooler_output, expected.pooler_output, max_rel=MAX_REL, name="pooler")


def test_triton_encoder_parameter_gradients_match_transformers():
    hf, ours, _ = _models()
    input_ids, mask, types, positions = make_batch(seed=2)
    weights = torch.randn(hf.config.hidden_size, generator=torch.Generator().manual_seed(3))

    def scalar(out):
        return (valid_rows(out.last_hidden_state, mask) * weights).sum() + out.pooler_output.sum()

    scalar(hf(input_ids, attention_mask=mask, token_type_ids=types)).backward()
    scalar(ours(input_ids, attention_mask=mask, token_type_ids=types)).backward()
    assert compare_param_grads(ours, hf) == len(list(hf.parameters()))


def test_accelerate_on_triton_backend_with_a_padded_batch():
    """The padding mask must reach the kernel: a padded batch through accelerate()."""
    hf = randomize(transformers.BertForQuestionAnswering(hf_config("sdpa")), seed=22)
    plain = randomize(transformers.BertForQuestionAnswering(hf_config("sdpa")), seed=22)
    sf.accelerate(hf, backend="triton", padding="packed")
    input_ids, mask, types, _ = make_batch(seed=4)
    got = hf(input_ids, attention_mask=mask, token_type_ids=types)
    expected = plain(input_ids, attention_mask=mask, token_type_ids=types)
    assert_close(valid_rows(got.start_logits, mask), valid_rows(expected.start_logits, mask),
                 max_rel=MAX_REL, name="accelerated start_logits")


@pytest.mark.gpu
@pytest.mark.parametrize("size", ["base", "large"])
def test_gpu_bf16_encoder_against_transformers(size):
    config = sf.SpanBertConfig.base() if size == "base" else sf.SpanBertConfig.large()
    hf_conf = transformers.BertConfig(**{k: v for k, v in config.to_dict().items()
                                         if k not in ("add_pooling_layer", "sbo_max_targets",
                                                      "sbo_position_embedding_size")},
                                      attn_implementation="sdpa")
    hf32 = transformers.BertModel(hf_conf, add_pooling_layer=False).cuda().eval()
    hf16 = transformers.BertModel(hf_conf, add_pooling_layer=False).cuda().eval()
    hf16.load_state_dict(hf32.state_dict())
    hf16 = hf16.to(torch.bfloat16)
    ours = sf.SpanBertModel.from_transformers(hf32, backend="triton").cuda().eval().to(torch.bfloat16)
    generator = torch.Generator().manual_seed(5)
    lengths = torch.randint(64, 513, (8,), generator=generator)
    input_ids = torch.randint(1, config.vocab_size, (8, 512), generator=generator).cuda()
    mask = (torch.arange(512).unsqueeze(0) < lengths.unsqueeze(1)).long().cuda()
    with torch.no_grad():
        oracle = hf32(input_ids, attention_mask=mask).last_hidden_state
        theirs = hf16(input_ids, attention_mask=mask).last_hidden_state
        got = ours(input_ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    assert_within_2x_of_torch(got[keep], theirs[keep], oracle[keep], name=f"{size} bf16 encoder")
