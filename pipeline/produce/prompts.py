"""Prompt files for the rollout producer: JSONL, one prompt per line, tokenized with the student's tokenizer.

A line is one of:
- ``{"prompt": str}``: a plain-text prompt; the student generates the completion.
- ``{"prompt": str, "completion": str}``: a dataset completion, used with probability 1 - lmbda.
- ``{"messages": [{"role", "content"}, ...]}``: a chat, rendered with the student's chat template and
  ``add_generation_prompt``. When the last message is the assistant's, it is the dataset completion
  and the prompt is the chat before it; a ``"completion"`` field may also give it.
Any form may add ``"teacher": str``, the name of the teacher that must score it (`gkd workers --teacher
NAME=URL`); lines without it get the producer's `--teacher` (or the run's default teacher).
Blank lines are skipped. Plain prompts get the tokenizer's special tokens (e.g. BOS); a chat template
brings its own. Dataset completions end with the tokenizer's EOS token (added when missing), as a
generation that stopped would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import SettingsError
from pipeline.queue.schema import DEFAULT_TEACHER, TEACHER_NAME

FORMS = '{"prompt": str}, {"prompt": str, "completion": str} or {"messages": [{"role", "content"}, ...]}'


class PromptFileError(SettingsError):
    """A prompt file line is not one of the accepted forms (the message names the file and line)."""


@dataclass(frozen=True)
class PromptItem:
    """One usable prompt."""

    index: int
    """0-based position among the file's prompts."""
    line: int
    """1-based line number in the file."""
    prompt_ids: list[int]
    completion_ids: list[int] | None
    """The dataset completion's ids (ending with EOS), or None when only the student can complete it."""
    teacher: str | None = None
    """The line's `teacher` (None: the producer's default)."""


def _error(path: str, line: int, msg: str) -> PromptFileError:
    return PromptFileError(f"{path}: line {line}: {msg}")


def _messages(obj: Any, path: str, line: int) -> list[dict[str, str]]:
    msgs = obj.get("messages")
    ok = (
        isinstance(msgs, list)
        and msgs
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs
        )
    )
    if not ok:
        raise _error(
            path,
            line,
            f'expected "messages" as a non-empty list of {{"role": str, "content": str}}, '
            f"got {json.dumps(msgs)[:120]}",
        )
    return list(msgs)


def parse_line(obj: Any, tokenizer: Any, path: str, line: int) -> tuple[list[int], list[int] | None]:
    """(prompt ids, dataset completion ids or None) of one decoded JSONL line. Raises PromptFileError."""
    if not isinstance(obj, dict) or not ("prompt" in obj or "messages" in obj):
        got = f"keys {sorted(obj)}" if isinstance(obj, dict) else type(obj).__name__
        raise _error(path, line, f"expected {FORMS}, got {got}")
    completion = obj.get("completion")
    if "messages" in obj:
        msgs = _messages(obj, path, line)
        if msgs[-1]["role"] == "assistant" and completion is None:
            completion = msgs.pop()["content"]
        if not msgs:
            raise _error(path, line, "expected at least one message before the assistant's completion")
        if not getattr(tokenizer, "chat_template", None):
            raise _error(
                path, line, "a messages prompt needs the student tokenizer's chat template; it has none"
            )
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        prompt_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise _error(
                path, line, f'expected "prompt" as a non-empty string, got {json.dumps(prompt)[:80]}'
            )
        prompt_ids = list(tokenizer(prompt)["input_ids"])
    if not prompt_ids:
        raise _error(path, line, "expected a prompt of at least one token, got none after tokenizing")
    if completion is None:
        return prompt_ids, None
    if not isinstance(completion, str) or not completion:
        raise _error(
            path, line, f'expected "completion" as a non-empty string, got {json.dumps(completion)[:80]}'
        )
    ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return prompt_ids, ids


def _teacher(obj: dict[str, Any], path: str, line: int) -> str | None:
    name = obj.get("teacher")
    if name is None:
        return None
    if not isinstance(name, str) or not TEACHER_NAME.match(name):
        got = json.dumps(name)[:80]
        raise _error(path, line, f'expected "teacher" as a name of 1-64 characters [A-Za-z0-9_-], got {got}')
    return name


def check_teacher_names(
    items: list[PromptItem], default: str | None, run_teachers: str | None, path: str
) -> None:
    """Refuse prompts whose teacher (the line's, else `default`, else the run's default teacher) is not one
    of `run_teachers` (the run config's comma-separated names; None: no worker has recorded them yet, so
    nothing is checked). Raises PromptFileError naming the teachers, the lines and the run's teachers."""
    if run_teachers is None:
        return
    known = set(run_teachers.split(","))
    bad: dict[str, list[int]] = {}
    for item in items:
        name = item.teacher or default or DEFAULT_TEACHER
        if name not in known:
            bad.setdefault(name, []).append(item.line)
    if bad:
        parts = "; ".join(
            f"{name!r} on lines {', '.join(map(str, lines[:10]))}{', ...' if len(lines) > 10 else ''}"
            for name, lines in sorted(bad.items())
        )
        raise PromptFileError(
            f"{path}: expected each prompt's teacher to be one of the run's teachers ({run_teachers}), got "
            f'{parts}; fix the "teacher" keys or --teacher (lines without one get --teacher, else '
            f"{DEFAULT_TEACHER!r})"
        )


def load_prompts(path: str | Path, tokenizer: Any) -> list[PromptItem]:
    """Every prompt of a JSONL file, tokenized. Raises PromptFileError naming the first bad line."""
    p = str(path)
    items: list[PromptItem] = []
    try:
        text = Path(p).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptFileError(f"prompts file {p}: expected a readable UTF-8 JSONL file, got {exc}") from None
    for line_no, raw in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 is valid in JSON
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _error(p, line_no, f"expected one JSON object ({FORMS}), got invalid JSON: {exc}") from None
        prompt_ids, completion_ids = parse_line(obj, tokenizer, p, line_no)
        items.append(PromptItem(len(items), line_no, prompt_ids, completion_ids, _teacher(obj, p, line_no)))
    if not items:
        raise PromptFileError(f"prompts file {p}: expected at least one prompt line, got none")
    return items
