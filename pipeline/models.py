"""Model and tokenizer sources (a local folder or a Hugging Face id), checked before anything loads them.

transformers' own errors for a mistyped path ("Repo id must be in the form 'repo_name' or
'namespace/repo_name'", a download attempt in offline mode) say neither what was expected nor how to fix
it, and come after seconds of imports; `check_source` says both, at once.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from pipeline.errors import SettingsError


def _offline() -> bool:
    flags = (os.environ.get(v, "").lower() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f in ("1", "true", "yes", "on") for f in flags)


def _looks_like_repo_id(name: str) -> bool:
    """Whether `name` could be a Hugging Face id ("name" or "org/name"), not a filesystem path."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        return False
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _cached(name: str, filename: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return True
    return isinstance(try_to_load_from_cache(name, filename), str)


def _close_matches(path: Path) -> str:
    parent = path.parent if str(path.parent) else Path(".")
    try:
        names = [p.name for p in parent.iterdir() if p.is_dir()]
    except OSError:
        return ""
    near = difflib.get_close_matches(path.name, names, n=1)
    return f"; did you mean {str(parent / near[0])!r}?" if near else ""


def check_source(name: str, setting: str, *, tokenizer_only: bool = False) -> None:
    """Raise SettingsError naming the fix unless `name` can be loaded: a model folder (with config.json;
    for a tokenizer, any folder), or a Hugging Face id (in the local cache when offline).

    `setting` is the flag as users spell it (``--student``).
    """
    if not name:
        raise SettingsError(f"{setting}: expected a model folder or a Hugging Face id, got none")
    path = Path(name).expanduser()
    if path.is_dir():
        if not tokenizer_only and not (path / "config.json").is_file():
            raise SettingsError(
                f"{setting}: expected a model folder with config.json (as save_pretrained writes it), got "
                f"{name!r} without one"
            )
        return
    if path.exists():
        raise SettingsError(f"{setting}: expected a model folder or a Hugging Face id, got the file {name!r}")
    if not _looks_like_repo_id(name):
        raise SettingsError(
            f"{setting}: expected a model folder or a Hugging Face id, got {name!r}: no such folder"
            f"{_close_matches(path)}"
        )
    wanted = "tokenizer_config.json" if tokenizer_only else "config.json"
    if _offline() and not _cached(name, wanted):
        raise SettingsError(
            f"{setting}: expected a model folder, or a Hugging Face id in the local cache (HF_HUB_OFFLINE is "
            f"set: nothing is downloaded), got {name!r}: no such folder{_close_matches(path)}, and no cached "
            f"model of that id; fix the path, or download the model first (hf download {name})"
        )
