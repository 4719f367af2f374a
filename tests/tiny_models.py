"""The tiny BERT that the whole-model parity tests share: a transformers config, random
weights with no parameter at its initial value, a padded batch, and the gradient comparison.

transformers is imported lazily by :func:`hf_config` (the suite skips its users without it).
"""

from __future__ import annotations

import torch

from parity import assert_close

MAX_REL = 1e-5
VOCAB, HIDDEN, LAYERS, HEADS, INTER, MAX_POS = 120, 48, 2, 4, 96, 40
SEQ = 16
LENGTHS = (1, 7, SEQ)  # a one-token row, a short row, a full row


def hf_config(attn: str, **overrides):
    values = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, intermediate_size=INTER,
                  max_position_embeddings=MAX_POS, attn_implementation=attn)
    values.update(overrides)
    import transformers

    return transformers.BertConfig(**values)


# Every LayerNorm's weight is drawn around 1: BERT's and the SBO head's (named as in the
# release, mlp_layer_norm.layer_norm1/2).
_LAYER_NORM_WEIGHTS = ("LayerNorm.weight", "layer_norm1.weight", "layer_norm2.weight")


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2
                        + (1.0 if name.endswith(_LAYER_NORM_WEIGHTS) else 0.0))
    return model.eval()


def make_batch(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    batch = len(LENGTHS)
    input_ids = torch.randint(1, VOCAB, (batch, SEQ), generator=generator)
    attention_mask = torch.zeros(batch, SEQ, dtype=torch.long)
    for row, length in enumerate(LENGTHS):
        attention_mask[row, :length] = 1
    token_type_ids = torch.randint(0, 2, (batch, SEQ), generator=generator)
    # Position ids that are not simply arange: a per-row offset, as for a window into text.
    offsets = torch.randint(0, MAX_POS - SEQ, (batch, 1), generator=generator)
    position_ids = torch.arange(SEQ).unsqueeze(0) + offsets
    return input_ids, attention_mask, token_type_ids, position_ids


def valid_rows(t: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return t[attention_mask.bool()]


# Some gradients are exactly zero in exact arithmetic: softmax ignores a constant added to
# a whole row, so the attention key bias gets none, and in the QA model the last LayerNorm
# bias gets none (the loss is a softmax over positions fed by one shared linear). Both
# sides then hold rounding noise (~1e-8), which a relative comparison cannot judge. A
# gradient whose reference is below NUMERICALLY_ZERO of the model's largest gradient must
# therefore be below MAX_REL of that largest gradient on our side; every other gradient is
# compared at MAX_REL of its own scale.
NUMERICALLY_ZERO = 1e-4


def compare_param_grads(ours: torch.nn.Module, theirs: torch.nn.Module,
                        skip_prefix: str = "\0") -> int:
    their_grads = {n: p.grad for n, p in theirs.named_parameters()}
    largest = max(g.abs().max().item() for g in their_grads.values() if g is not None)
    checked = 0
    for name, param in ours.named_parameters():
        if name.startswith(skip_prefix):
            continue
        expected = their_grads[name]
        assert param.grad is not None, f"no gradient reached {name}"
        if expected.abs().max().item() < NUMERICALLY_ZERO * largest:
            got = param.grad.abs().max().item()
            assert got <= MAX_REL * largest, (
                f"grad {name} is ~0 in the reference ({expected.abs().max().item():.2e}) but "
                f"{got:.2e} here (bound {MAX_REL * largest:.2e})")
        else:
            assert_close(param.grad, expected, max_rel=MAX_REL, name=f"grad {name}")
        checked += 1
    return checked
