"""Top-k generalized-JSD distillation losses (ARCHITECTURE.md, "The loss"), usable from any training loop.

- ``topk_gkd_loss(student_logits [N, V], teacher_ids [N, k], teacher_logprobs [N, k], ...)``: from logits.
- ``fused_topk_gkd_loss(hidden [N, H], weight [V, H], teacher_ids, teacher_logprobs, ...)``: the same
  loss from the last hidden states and the LM-head weight, never building [N, V] logits.
- modes ``tail``, ``renorm`` (top-k, any beta) and ``sampled`` (RS-KD draws with counts, beta = 0).
- ``full_vocab_gjsd(student_logits, teacher_logits, ...)``: the full-vocabulary reference.
- ``draw_teacher_samples(logprobs [N, V], n)``: RS-KD entries (distinct ids, counts, logprobs).

Shape legend (suffixes of tensor names):
    N   rows: loss positions (tokens), flattened over batch and time
    V   the student's vocabulary size
    H   the student's hidden size (the LM head's input)
    K   the teacher's entries of a row (``k`` in prose): top-k ids, or distinct sampled ids
    C   rows of one chunk (C <= N)
    B   vocabulary columns of one tile (B <= V)
"""

from __future__ import annotations

from pipeline.train.loss.common import CHUNK_BYTES, MODES, TAIL_MASS_FLOOR
from pipeline.train.loss.full import full_vocab_gjsd
from pipeline.train.loss.fused import fused_topk_gkd_loss
from pipeline.train.loss.logits import topk_gkd_loss
from pipeline.train.loss.sampled import draw_teacher_samples

__all__ = [
    "CHUNK_BYTES",
    "MODES",
    "TAIL_MASS_FLOOR",
    "draw_teacher_samples",
    "full_vocab_gjsd",
    "fused_topk_gkd_loss",
    "topk_gkd_loss",
]
