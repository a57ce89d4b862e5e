"""Producing: prompt files, student generation, the rollout producer."""
