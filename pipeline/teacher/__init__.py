"""Teacher clients: one module per protocol (vllm, sglang), transport (http), balancing and breakers
(endpoints), start-up checks (startup), validation of returned rows (rows), and the client (client)."""

from __future__ import annotations

from pipeline.teacher.client import TeacherClient, TeacherConfig, TeacherScores
from pipeline.teacher.startup import TeacherIncompatible

__all__ = ["TeacherClient", "TeacherConfig", "TeacherIncompatible", "TeacherScores"]
