"""The shared attention primitive: masks, per-head masks, token sizes
(proportional attention) in self- and cross-attention, the merging metric,
and the public key/value projection."""
from __future__ import annotations

import math

import pytest
import torch

from slimvl.nn import Attention, Block, CrossBlock, attention_mask


def _attn(dim=16, heads=4, context_dim=None, seed=0):
    torch.manual_seed(seed)
    return Attention(dim, heads, context_dim=context_dim).eval()


def _reference(attn: Attention, x, context, allowed=None, log_size=None):
    """softmax(q k^T / sqrt(d) + log size) v by hand, per head; ``allowed`` [B, H, N, S] bool."""
    q, (k, v) = attn.project_q(x), attn.project_kv(context)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if log_size is not None:
        logits = logits + log_size[:, None, None, :]
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    out = logits.softmax(-1) @ v
    return attn.proj(out.transpose(1, 2).flatten(2))


def test_key_padding_matches_the_reference():
    attn = _attn()
    x, ctx = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    pad = torch.tensor([[True] * 5, [True, True, True, False, False]])
    got = attn(x, ctx, key_padding_mask=pad)
    torch.testing.assert_close(got, _reference(attn, x, ctx, pad[:, None, None, :].expand(2, 4, 3, 5)))


def test_per_head_mask_restricts_what_each_head_sees():
    attn = _attn()
    x, ctx = torch.randn(1, 3, 16), torch.randn(1, 6, 16)
    views = torch.zeros(1, 4, 1, 6, dtype=torch.bool)  # head h sees keys of its own view only
    views[0, 0, 0, :3] = views[0, 1, 0, 3:] = views[0, 2, 0, ::2] = views[0, 3, 0, :] = True
    got = attn(x, ctx, mask=views)
    torch.testing.assert_close(got, _reference(attn, x, ctx, views.expand(1, 4, 3, 6)))


def test_additive_and_boolean_masks_combine():
    pad = torch.tensor([[True, False, True]])
    extra = torch.tensor([[0.0, 0.0, -1.0]])
    m = attention_mask(pad, extra, size=torch.tensor([[2.0, 1.0, 1.0]]))
    assert m.dtype == torch.float32 and m.shape == (1, 1, 1, 3)
    assert m[0, 0, 0, 1] == float("-inf")
    torch.testing.assert_close(m[0, 0, 0, [0, 2]], torch.tensor([math.log(2.0), -1.0]))
    assert attention_mask(pad).dtype == torch.bool and attention_mask() is None


@pytest.mark.parametrize("cross", [False, True])
def test_a_merged_token_weighs_as_much_as_the_tokens_it_replaced(cross):
    """Proportional attention: a key of size 2 acts as that key twice, in
    self- and in cross-attention."""
    attn = _attn()
    ctx = torch.randn(1, 3, 16)
    doubled = torch.cat([ctx[:, :1], ctx], 1)  # key 0 twice
    x = torch.randn(1, 2, 16) if cross else ctx
    sizes = torch.tensor([[2.0, 1.0, 1.0]])
    merged = attn(x, ctx, size=sizes) if cross else attn(ctx, size=sizes)
    expanded = attn(x, doubled) if cross else attn(ctx, doubled)
    torch.testing.assert_close(merged, expanded)


def test_metric_is_the_keys_averaged_over_heads():
    attn = _attn()
    x = torch.randn(2, 5, 16)
    out, metric = attn(x, return_metric=True)
    assert metric.shape == (2, 5, 4)
    torch.testing.assert_close(metric, attn.project_kv(x)[0].mean(1))
    torch.testing.assert_close(out, attn(x))


def test_bad_mask_shape_names_the_expected_one():
    attn = _attn()
    x, ctx = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    for bad in (torch.ones(2, 3, 3, 5, dtype=torch.bool), torch.ones(5, dtype=torch.bool),
                torch.ones(1, 1, 3, 5, dtype=torch.long)):  # an int 0/1 mask would be added as a bias
        with pytest.raises(ValueError, match=r"broadcastable to \[B, H, N, S\] = \[2, 4, 3, 5\]"):
            attn(x, ctx, mask=bad)


def test_per_head_mask_with_sizes_and_padding_matches_the_reference():
    attn = _attn()
    x, ctx = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    views = torch.rand(2, 4, 3, 5) > 0.3
    views[..., 0] = True  # every query keeps a key
    pad = torch.tensor([[True] * 5, [True, True, True, True, False]])
    size = torch.tensor([[1.0, 2.0, 1.0, 3.0, 1.0], [2.0, 1.0, 1.0, 1.0, 1.0]])
    got = attn(x, ctx, key_padding_mask=pad, size=size, mask=views)
    allowed = views & pad[:, None, None, :]
    torch.testing.assert_close(got, _reference(attn, x, ctx, allowed, size.log()))
    bias = torch.randn(1, 4, 1, 5)  # bool padding and a float bias together
    got = attn(x, ctx, key_padding_mask=pad, mask=bias)
    q, (k, v) = attn.project_q(x), attn.project_kv(ctx)
    logits = (q @ k.transpose(-1, -2) / math.sqrt(4) + bias).masked_fill(~pad[:, None, None, :], float("-inf"))
    torch.testing.assert_close(got, attn.proj((logits.softmax(-1) @ v).transpose(1, 2).flatten(2)))


def test_blocks_pass_masks_and_sizes_through():
    torch.manual_seed(0)
    block, cross = Block(16, 4).eval(), CrossBlock(16, 4).eval()
    x, ctx = torch.randn(1, 3, 16), torch.randn(1, 4, 16)
    hide_last = torch.tensor([[True, True, True, False]])
    assert torch.allclose(cross(x, ctx, mask=hide_last[:, None, None, :]), cross(x, ctx, key_padding_mask=hide_last))
    assert not torch.allclose(cross(x, ctx, size=torch.tensor([[3.0, 1, 1, 1]])), cross(x, ctx))
    assert torch.allclose(block(ctx, mask=hide_last[:, None, None, :]), block(ctx, key_padding_mask=hide_last))


def test_block_hook_sees_tokens_and_metric_between_attention_and_mlp():
    torch.manual_seed(0)
    block = Block(16, 4).eval()
    x = torch.randn(2, 5, 16)
    plain = block(x)
    seen = {}

    def keep_first_three(tokens, metric):
        seen["metric"] = metric
        return tokens[:, :3]  # what a merge that drops two tokens would hand on

    block.between = keep_first_three
    out = block(x)
    assert out.shape == (2, 3, 16) and seen["metric"].shape == (2, 5, 4)
    torch.testing.assert_close(seen["metric"], block.attn.project_kv(block.norm1(x))[0].mean(1))
    torch.testing.assert_close(out, plain[:, :3])  # the MLP acts per token: the kept ones are unchanged
    block.between = None
    assert torch.equal(block(x), plain)


def test_pair_inputs_take_the_query_modality_and_the_items_from_their_own_rows():
    from slimvl.nn.modalities import pair_inputs, rows_of, take

    inputs = {"video": torch.arange(3).float().view(3, 1), "audio": 10 + torch.arange(3).view(3, 1),
              "text": 100 + torch.arange(3).view(3, 1), "text_mask": torch.tensor([[True], [False], [True]])}
    pairs = pair_inputs(inputs, item_index=torch.tensor([0, 2, 2]), query_index=torch.tensor([1, 1, 0]))
    assert pairs["video"].flatten().tolist() == [0, 2, 2] and pairs["audio"].flatten().tolist() == [10, 12, 12]
    assert pairs["text"].flatten().tolist() == [101, 101, 100]
    assert pairs["text_mask"].flatten().tolist() == [False, False, True]  # the caption's mask travels with it
    assert rows_of(take(inputs, slice(1, None))) == 2
    with pytest.raises(ValueError, match="one batch size"):
        rows_of({"video": torch.zeros(2, 1), "text": torch.zeros(3, 1)})
