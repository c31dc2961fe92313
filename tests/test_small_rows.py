"""The LM head's 2-3 rows computed as 4 (llm/small_rows.py): same outputs, same parameters."""

from __future__ import annotations

import torch
from torch import nn

from lambdasplit.llm.segments import load_tail
from lambdasplit.llm.small_rows import PaddedLinear, pad_small_rows


def test_padded_linear_equals_linear_for_every_row_count_and_shape():
    torch.manual_seed(0)
    plain = nn.Linear(48, 300)
    padded = pad_small_rows(nn.Sequential(nn.Linear(48, 300)))[0]
    padded.load_state_dict(plain.state_dict())
    assert type(padded) is PaddedLinear
    for shape in [(1, 48), (2, 48), (3, 48), (4, 48), (6, 48), (1, 2, 48), (1, 3, 48), (3, 1, 48), (48,)]:
        x = torch.randn(*shape)
        out = padded(x)
        assert out.shape == plain(x).shape
        torch.testing.assert_close(out, plain(x), atol=1e-5, rtol=1e-5)


def test_only_plain_linears_are_swapped_and_parameters_kept():
    class Custom(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 4), Custom(4, 4), nn.Embedding(5, 4))
    weight = model[0].weight
    pad_small_rows(model)
    assert type(model[0]) is PaddedLinear and model[0].weight is weight
    assert type(model[1]) is Custom and type(model[2]) is nn.Embedding


def test_the_tail_lm_head_is_padded(tiny_model_dir):
    tail = load_tail(str(tiny_model_dir("llama")), 3)
    assert isinstance(tail.lm_head, PaddedLinear)
