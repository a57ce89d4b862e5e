"""Vocabularies of a run: what the workers record about the teacher's tokenizer, what the trainer checks.

Token-level distillation needs one vocabulary: the teacher's top-k ids index the student's logits. The
workers record in the run config (fields in `pipeline.queue.schema.Config`) a fingerprint of how the
teacher tokenizes a few probe texts (its `/tokenize`), the size of its tokenizer when the server says
(the reference server's `/v1/models` card: `gkd_tokenizer_size`) and its context length. The trainer
refuses at start a student whose tokenizer gives another fingerprint or whose vocabulary is smaller than
the teacher's tokenizer, instead of dead-lettering every sample it reads. The producer refuses prompts
that do not fit the teacher's context.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.errors import TeacherIncompatible
from pipeline.queue.schema import Config

#: Texts whose tokenization must agree between student and teacher (spaces, digits, punctuation,
#: non-ASCII, newlines: where tokenizers commonly differ).
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "  Two leading spaces, 12345 digits, and a tab\there.",
    "Unicode: naïve café, 東京, emoji 🙂, math ∑x².",
    "line one\nline two\n\nend",
)

#: The `/v1/models` card field in which the reference server gives its tokenizer's size.
TOKENIZER_SIZE_FIELD = "gkd_tokenizer_size"


def fingerprint(ids_per_text: Sequence[Sequence[int]]) -> str:
    """A short hash of the ids of the probe texts (16 hex digits): equal for tokenizers that agree."""
    blob = json.dumps([[int(i) for i in ids] for ids in ids_per_text], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """The fingerprint of a Hugging Face tokenizer (without special tokens, as the teacher is asked)."""
    return fingerprint([tokenizer(t, add_special_tokens=False)["input_ids"] for t in PROBE_TEXTS])


def check_student(
    run_config: Mapping[str, str],
    *,
    student: str,
    vocab_size: int,
    fingerprint_: str | None,
    run: str,
) -> None:
    """Raise TeacherIncompatible unless the student covers the run's teacher vocabulary (`run_config`:
    the run's config hash). What is not recorded (no worker has started yet, or the teacher does not
    say) is not checked; `fingerprint_` None: the student has no tokenizer to compare."""
    teacher = run_config.get(Config.TEACHER_MODEL, "the teacher")
    size = run_config.get(Config.TEACHER_TOKENIZER_SIZE)
    fix = (
        "expected a student with the teacher's tokenizer (the same model family); use such a --student, or "
        "another --run for this pair"
    )
    if size is not None and size.isdigit() and vocab_size < int(size):
        raise TeacherIncompatible(
            f"student {student} has a vocabulary of {vocab_size} tokens, but run {run!r}'s teacher {teacher} "
            f"tokenizes into {size}: its top-k ids would fall outside the student's logits; {fix}"
        )
    theirs = run_config.get(Config.TEACHER_TOKENIZER)
    if theirs and fingerprint_ is not None and theirs != fingerprint_:
        raise TeacherIncompatible(
            f"student {student} tokenizes the probe texts differently from run {run!r}'s teacher {teacher} "
            f"(tokenizer fingerprint {fingerprint_}, the teacher's {theirs}): its ids would not mean the "
            f"student's tokens; {fix}"
        )
