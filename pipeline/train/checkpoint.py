"""Trainer checkpoints: written atomically, loadable by `from_pretrained`, listing the samples they include.

Layout under ``<output_dir>/checkpoints/``::

    step-00000120/            one checkpoint (a complete `save_pretrained` folder)
        model.safetensors     student weights (plus config.json, generation_config.json, tokenizer files)
        optimizer.pt          optimizer state_dict
        scheduler.pt          LR scheduler state_dict
        rng.pt                RNG states, one per rank
        trainer_state.json    step, policy version, world size and the ready-stream entries included
    latest                    the name of the newest complete checkpoint

A checkpoint is written into ``<name>.tmp-<pid>`` and renamed into place, then `latest` is replaced
(write + rename), so a crash at any moment leaves either the previous or the new checkpoint, never a
torn one. `entries` lists, per consumer name, the ready-stream entries whose samples are in this
checkpoint's update and were not acknowledged before it was written: after a crash between writing it
and acknowledging them, `--resume` acknowledges exactly these (they must not be trained again).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trainer_state.json"
LATEST = "latest"
CHECKPOINTS = "checkpoints"


@dataclass
class TrainState:
    """What a checkpoint records besides tensors."""

    step: int
    """Optimizer steps taken."""
    policy_version: int
    """The policy version published for these weights."""
    world_size: int = 1
    entries: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    """Consumer name -> [(ready-stream entry id, payload bytes)] included in this update, not yet acked."""
    created_ms: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoints_dir(output_dir: str | os.PathLike[str]) -> Path:
    return Path(output_dir) / CHECKPOINTS


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint under `output_dir` (None when there is none)."""
    root = checkpoints_dir(output_dir)
    try:
        name = (root / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    path = root / name
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(
            f"checkpoint pointer {root / LATEST}: expected it to name a complete checkpoint, got {name!r} "
            f"without {STATE_FILE}"
        )
    return path


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (torch CPU, CUDA when present, python `random`)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    output_dir: str | os.PathLike[str],
    *,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    rng_states: list[dict[str, Any]],
    tokenizer: Any = None,
    keep: int = 3,
) -> Path:
    """Write a checkpoint for `state.step` atomically, point `latest` at it, keep the newest `keep`.

    `model` is the unwrapped Hugging Face model (not the DDP wrapper). Returns the checkpoint's
    absolute path (what the policy publishes: producers may run in other working directories).
    An existing checkpoint of the same step is replaced.
    """
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(state.step)
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_states, tmp / "rng.pt")
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():
        old = root / f"{final.name}.old-{os.getpid()}"
        os.rename(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.rename(tmp, final)
    _fsync_dir(root)
    _write_text_atomic(root / LATEST, final.name)
    _prune(root, keep, final)
    return final.resolve()


def _prune(root: Path, keep: int, current: Path) -> None:
    """Delete all but the newest `keep` checkpoints (never `current`) and stale temporary folders."""
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name.removeprefix("step-").isdigit())
    for old in done[: max(0, len(done) - max(keep, 1))]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob("step-*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_state(path: str | os.PathLike[str]) -> TrainState:
    """The TrainState of a checkpoint folder."""
    raw = json.loads((Path(path) / STATE_FILE).read_text())
    raw["entries"] = {c: [(str(sid), int(n)) for sid, n in es] for c, es in raw.get("entries", {}).items()}
    return TrainState(**raw)


def load_training_state(
    path: str | os.PathLike[str],
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int = 0,
    map_location: str | torch.device = "cpu",
) -> TrainState:
    """Load optimizer, scheduler and this rank's RNG state from a checkpoint; return its TrainState.

    The weights are loaded by `from_pretrained(path)` (the folder is a complete model folder).
    RNG states of ranks that did not exist when it was written are left as seeded.
    """
    p = Path(path)
    optimizer.load_state_dict(torch.load(p / "optimizer.pt", map_location=map_location, weights_only=True))
    scheduler.load_state_dict(torch.load(p / "scheduler.pt", weights_only=True))
    rngs = torch.load(p / "rng.pt", weights_only=True)
    if rank < len(rngs):
        restore_rng(rngs[rank])
    return read_state(p)
