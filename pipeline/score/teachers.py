"""Teacher names of `gkd workers --teacher`: ``URL[,URL...]`` or ``NAME=URL[,URL...]``, repeatable.

    --teacher http://a:8000,http://b:8000                  one unnamed teacher ("default"), two replicas
    --teacher math=http://a:8000,http://b:8000 --teacher code=http://c:8000

Flags, ``GKD_TEACHER`` and TOML (``teacher = ["math=http://a:8000", "code=http://c:8000"]``) give the
same list; repeats and commas are flattened before this module sees them, so an item without ``NAME=``
belongs to the teacher named last before it (or to ``default`` when none was named yet). A default teacher
next to named ones is therefore written first, or as ``default=URL``. This module imports nothing heavy:
`gkd workers` parses its settings before the event loop starts.
"""

from __future__ import annotations

from pipeline.errors import SettingsError
from pipeline.queue.schema import DEFAULT_TEACHER, TEACHER_NAME


def parse_teachers(items: list[str]) -> dict[str, list[str]]:
    """Teacher name -> its endpoint URLs, in the order given. Raises SettingsError for an empty list,
    a bad name, a name given twice, or a name without URLs."""
    out: dict[str, list[str]] = {}
    current = DEFAULT_TEACHER
    for raw in items:
        item = raw.strip()
        name, sep, url = item.partition("=")
        if sep and "://" not in name:  # NAME=URL; a URL whose query holds "=" has "://" before it
            if not TEACHER_NAME.match(name):
                raise SettingsError(
                    f"--teacher {item!r}: expected a teacher name of 1-64 characters from [A-Za-z0-9_-] "
                    f"before '=', got {name!r}"
                )
            if name in out:
                raise SettingsError(f"--teacher: expected each teacher name once, got {name!r} twice")
            current = name
            out[current] = []
            item = url.strip()
            if not item:
                continue
        out.setdefault(current, []).append(item)
    empty = [name for name, urls in out.items() if not urls]
    if empty:
        raise SettingsError(f"--teacher: expected at least one URL per teacher, got none for {empty}")
    if not out:
        raise SettingsError("--teacher: expected at least one teacher URL (http://host:port), got none")
    return out


def teacher_names_field(names: list[str] | set[str] | tuple[str, ...]) -> str:
    """The run-config value of a set of teacher names: sorted, comma-separated."""
    return ",".join(sorted(names))
