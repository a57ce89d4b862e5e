"""Batching: loss-row alignment, the token budget, padding masks, and the logits gather."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pipeline.train.batching import BatchPacker, collate, gather_logits, pack, padded_cost
from pipeline.wire.codec import Rollout, ScoredSample, decode_scored, encode_scored


def sample(i: int, t: int, prompt_len: int, k: int = 3, fp16: bool = True) -> ScoredSample:
    """Token j of sample i is 1000 * i + j; teacher row r names token prompt_len + r in column 0."""
    ids_T = (1000 * i + np.arange(t)).astype(np.int32)
    rows = t - prompt_len
    ids_RK = np.zeros((rows, k), dtype=np.int32)
    ids_RK[:, 0] = ids_T[prompt_len:]
    ids_RK[:, 1:] = 1 + np.arange(rows)[:, None]  # marks the row index
    lp_RK = -np.tile(np.arange(k, dtype=np.float32), (rows, 1)) - 0.5
    r = Rollout(id=f"s{i}", input_ids=ids_T, prompt_len=prompt_len)
    return ScoredSample(r, ids_RK, lp_RK.astype(np.float16 if fp16 else np.float32), "t", k)


def test_teacher_row_r_pairs_with_logit_position_prompt_len_minus_1_plus_r() -> None:
    samples = [sample(1, 7, 3), sample(2, 4, 1), sample(3, 9, 8)]
    b = collate(samples, pad_id=0, pin=False)
    t_max = 9
    assert b.input_ids_BT.shape == (3, t_max)
    assert b.num_loss_tokens == 4 + 3 + 1 == b.teacher_ids_NK.shape[0]
    flat_ids = b.input_ids_BT.reshape(-1)
    row = 0
    for bi, s in enumerate(samples):
        p, t = s.rollout.prompt_len, s.rollout.num_tokens
        for r in range(t - p):
            pos = int(b.positions_N[row])
            assert pos == bi * t_max + p - 1 + r
            # The logit at `pos` predicts the token after it: the token the teacher row describes.
            assert int(flat_ids[pos + 1]) == int(b.teacher_ids_NK[row, 0]) == 1000 * s_index(s) + p + r
            assert int(b.teacher_ids_NK[row, 1]) == r + 1
            row += 1
    assert torch.equal(b.loss_mask_BT.reshape(-1).nonzero().squeeze(1), b.positions_N)


def s_index(s: ScoredSample) -> int:
    return int(s.rollout.id[1:])


def test_padding_masks_and_dtypes() -> None:
    samples = [sample(1, 5, 2), sample(2, 3, 1)]
    b = collate(samples, pad_id=7, pin=False)
    assert b.input_ids_BT.dtype == torch.int64 and b.attention_mask_BT.dtype == torch.int64
    assert b.teacher_ids_NK.dtype == torch.int32 and b.teacher_logprobs_NK.dtype == torch.float16
    assert b.attention_mask_BT.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert b.input_ids_BT[1, 3:].tolist() == [7, 7]
    # Loss positions: sample 0 at 1..3 (T=5, P=2), sample 1 at 0..1 (T=3, P=1); never on padding.
    assert b.loss_mask_BT.tolist() == [[False, True, True, True, False], [True, True, False, False, False]]
    assert not (b.loss_mask_BT & (b.attention_mask_BT == 0)).any()
    assert b.num_tokens == 8 and b.input_ids_BT.numel() == 10 and b.sample_ids == ["s1", "s2"]
    mixed = collate([sample(1, 5, 2), sample(2, 3, 1, fp16=False)], pin=False)
    assert mixed.teacher_logprobs_NK.dtype == torch.float32


def test_packer_respects_the_token_budget_in_order() -> None:
    lengths = [5, 9, 3, 12, 4, 4, 4, 30, 2]
    samples = [sample(i, t, 1) for i, t in enumerate(lengths)]
    batches = pack(samples, batch_tokens=24)
    assert [s for b in batches for s in b.sample_ids] == [f"s{i}" for i in range(len(lengths))]
    for b in batches:
        lens = [lengths[int(i[1:])] for i in b.sample_ids]
        assert padded_cost(lens) <= 24 or len(lens) == 1  # a sample over the budget goes alone
        assert b.input_ids_BT.numel() == padded_cost(lens)
    # Greedy: each batch was closed because the next sample did not fit.
    for b, nxt in itertools.pairwise(batches):
        lens = [lengths[int(i[1:])] for i in b.sample_ids] + [lengths[int(nxt.sample_ids[0][1:])]]
        assert padded_cost(lens) > 24
    assert any(b.sample_ids == ["s7"] for b in batches)


def test_packer_carries_refs_and_flushes_the_partial_batch() -> None:
    p = BatchPacker(100, pin=False)
    assert p.add(sample(0, 10, 2), ref="e0") == []
    assert p.add(sample(1, 10, 2), ref="e1") == []
    assert p.pending == 2
    last = p.flush()
    assert last is not None and last.refs == ["e0", "e1"]
    assert p.flush() is None


def test_collate_decoded_wire_samples_is_a_copy() -> None:
    wire = decode_scored(encode_scored(sample(4, 6, 2)))
    assert not wire.topk_ids.flags.writeable
    b = collate([wire], pin=False)
    b.teacher_ids_NK.add_(1)  # writable tensors, independent of the read-only message
    assert int(wire.topk_ids[0, 0]) == 4002


def test_collate_rejects_mixed_k_and_empty() -> None:
    with pytest.raises(ValueError, match="one teacher k"):
        collate([sample(0, 4, 1, k=3), sample(1, 4, 1, k=2)], pin=False)
    with pytest.raises(ValueError, match="at least one"):
        collate([], pin=False)


def test_gather_logits_from_full_or_masked_logits() -> None:
    b = collate([sample(1, 5, 2), sample(2, 3, 1)], pin=False)
    v = 11
    logits_BTV = torch.randn(2, 5, v)
    got = gather_logits(logits_BTV, b)
    want = torch.stack(
        [logits_BTV[0, 1], logits_BTV[0, 2], logits_BTV[0, 3], logits_BTV[1, 0], logits_BTV[1, 1]]
    )
    assert torch.equal(got, want)
    assert torch.equal(gather_logits(logits_BTV[b.loss_mask_BT], b), want)
    with pytest.raises(ValueError, match="expected"):
        gather_logits(torch.randn(3, v), b)
