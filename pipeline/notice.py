"""`WaitNotice`: a waiting process says what it waits for, every ~30 s, instead of going silent.

A process with nothing to do (no data yet, a full stream downstream, Redis down) blocks; without a word
that looks exactly like a hang. The notice logs once the wait has lasted `every_s`, then every `every_s`
while it lasts, with how long it has lasted; a wait shorter than that says nothing.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

#: How often a waiting process says what it waits for (GKD_NOTICE_EVERY_S: shorter in tests).
NOTICE_EVERY_S = float(os.environ.get("GKD_NOTICE_EVERY_S") or 30.0)


class WaitNotice:
    """Logs `what` (a string, or a function that builds it) every `every_s` of one continued wait."""

    def __init__(
        self,
        log: logging.Logger,
        every_s: float | None = None,
        *,
        level: int = logging.INFO,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log, self.level, self.clock = log, level, clock
        self.every_s = NOTICE_EVERY_S if every_s is None else every_s
        self._since: float | None = None
        self._said: float | None = None

    @property
    def waited_s(self) -> float:
        """How long the current wait has lasted (0 when not waiting)."""
        return 0.0 if self._since is None else self.clock() - self._since

    def waiting(self, what: str | Callable[[], str]) -> None:
        """Still waiting (call as often as convenient): logs at most once per `every_s`."""
        now = self.clock()
        if self._since is None:
            self._since = now
            return
        if now - (self._said if self._said is not None else self._since) < self.every_s:
            return
        self._said = now
        text = what() if callable(what) else what
        self.log.log(self.level, "%s (waiting %.0f s)", text, now - self._since)

    def due(self) -> bool:
        """Whether the next `waiting()` call would speak (to build an expensive message only then)."""
        if self._since is None:
            return False
        return self.clock() - (self._said if self._said is not None else self._since) >= self.every_s

    def over(self) -> None:
        """The wait ended (work arrived): the next wait starts counting from zero."""
        self._since = self._said = None
