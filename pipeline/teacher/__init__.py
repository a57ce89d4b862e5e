"""Teacher clients: one object per protocol (vllm.VLLM, sglang.SglangProtocol, binary.BINARY; their base
in protocol), shared by the client that parses with them and the servers and test doubles that render
with them; transport (http), balancing and breakers (endpoints), start-up checks (startup), validation of
returned rows (rows), the client (client) and its configuration and answers (config)."""

from __future__ import annotations

from pipeline.teacher.client import TeacherClient
from pipeline.teacher.config import TeacherConfig, TeacherScores
from pipeline.teacher.startup import TeacherIncompatible

__all__ = ["TeacherClient", "TeacherConfig", "TeacherIncompatible", "TeacherScores"]
