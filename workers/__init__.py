"""The processes users start: teacher worker pool, trainer, rollout producer, teacher server, status, CLI."""
