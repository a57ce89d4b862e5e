"""Trainer checkpoints: sharded training state (any world size can resume), and the exported policy.

Layout under ``<output_dir>/checkpoints/``::

    step-00000120/            one checkpoint
        state/                model + optimizer state, torch.distributed.checkpoint (one file per rank
                              and .metadata): loads into any number of ranks, DDP or FSDP (it reshards)
        scheduler.pt          LR scheduler state_dict
        rng.pt                RNG states, one per rank
        trainer_state.json    step, policy version, world size and the ready-stream entries included
        config.json, model.safetensors, generation_config.json, tokenizer files
                              the exported policy (`pipeline.train.export`): a `from_pretrained` folder,
                              written after the training state, complete once config.json is there
    latest                    the name of the newest complete checkpoint

Every rank writes its shard of the state into ``<name>.tmp-<pid of rank 0>``; rank 0 adds the rest and
renames the folder into place, then replaces `latest` (write + rename), so a crash at any moment leaves
either the previous or the new checkpoint, never a torn one. The training state is the authority on
resume; the export is what producers load. `entries` lists, per consumer name, the ready-stream entries
whose samples are in this checkpoint's update but whose journal write was not confirmed when it was
written (Redis was down): `--resume` acknowledges exactly these (they must not be trained again). See
pipeline/train/ready.py.
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

from pipeline.errors import CheckpointFailed
from pipeline.queue.runstate import pid_alive
from pipeline.train.distributed import Dist

STATE_FILE = "trainer_state.json"
LATEST = "latest"
CHECKPOINTS = "checkpoints"
SHARDS = "state"


@dataclass
class TrainState:
    """What a checkpoint records besides tensors."""

    step: int
    """Optimizer steps taken."""
    policy_version: int
    """The policy version published for these weights."""
    world_size: int = 1
    entries: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    """Consumer name -> [(ready-stream entry id, payload bytes)] trained into this checkpoint whose journal
    write was not confirmed when it was written (usually none): a resume acknowledges them."""
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
    keep: int = 3,
    dist: Dist | None = None,
) -> Path:
    """Write a checkpoint for `state.step` atomically, point `latest` at it, keep the newest `keep`.

    Collective: every rank calls it (with the same `state`; rank 0's counts). `model` is the Hugging Face
    model (sharded or not, never the DDP wrapper). Returns the checkpoint's absolute path on every rank
    (what the policy publishes: producers may run in other working directories). An existing checkpoint
    of the same step is replaced. Raises CheckpointFailed on every rank when any rank failed.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    d = dist or Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    root = checkpoints_dir(output_dir)
    final = root / checkpoint_name(state.step)
    tmp: Path | None = None
    if d.is_main:
        tmp = root / f"{final.name}.tmp-{os.getpid()}"
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    tmp = d.broadcast(tmp)  # also: no rank writes before rank 0 has cleared the folder
    assert tmp is not None
    error = ""
    try:
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.save(sd, checkpoint_id=tmp / SHARDS)
    except Exception as exc:  # disk full, permissions, a failed peer: every rank learns below
        error = f"{type(exc).__name__}: {exc}"
    errors = d.all_gather(error)
    if not any(errors) and d.is_main:
        try:
            _finish(tmp, final, root, scheduler, state, rng_states, keep)
        except OSError as exc:
            errors[0] = f"{type(exc).__name__}: {exc}"
    errors = d.broadcast(errors)
    if any(errors):
        detail = "; ".join(f"rank {i}: {e}" for i, e in enumerate(errors) if e)
        raise CheckpointFailed(
            f"checkpoint of step {state.step} into {root}: expected it written, got {detail}"
        )
    return final.resolve()


def _finish(
    tmp: Path,
    final: Path,
    root: Path,
    scheduler: Any,
    state: TrainState,
    rng_states: list[dict[str, Any]],
    keep: int,
) -> None:
    """Rank 0, after every shard is written: the small files, fsync, rename into place, `latest`, prune."""
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_states, tmp / "rng.pt")
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp / SHARDS)
    _fsync_dir(tmp)
    if final.exists():
        old = root / f"{final.name}.old-{os.getpid()}"
        os.rename(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.rename(tmp, final)
    _fsync_dir(root)
    _write_text_atomic(root / LATEST, final.name)
    _prune(root, keep, final)


def _prune(root: Path, keep: int, current: Path) -> None:
    """Delete all but the newest `keep` checkpoints (never `current`) and stale temporary folders."""
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name.removeprefix("step-").isdigit())
    for old in done[: max(0, len(done) - max(keep, 1))]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob("step-*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def read_state(path: str | os.PathLike[str]) -> TrainState:
    """The TrainState of a checkpoint folder."""
    raw = json.loads((Path(path) / STATE_FILE).read_text())
    raw["entries"] = {c: [(str(sid), int(n)) for sid, n in es] for c, es in raw.get("entries", {}).items()}
    return TrainState(**raw)


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int = 0,
) -> TrainState:
    """Load model, optimizer, scheduler and this rank's RNG state from a checkpoint; return its TrainState.

    Collective: every rank calls it. `model` and `optimizer` may be laid out differently from the job
    that wrote the checkpoint (another world size, DDP or FSDP): the state is resharded on load. RNG
    states of ranks that did not exist when it was written are left as seeded. Raises FileNotFoundError
    for a folder without training state (a checkpoint from before sharded state: it cannot resume).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    p = Path(path)
    if not (p / SHARDS / ".metadata").exists():
        raise FileNotFoundError(
            f"checkpoint {p}: expected sharded training state in {p / SHARDS}, found none (written by an "
            f"earlier gkd-pipeline?); start from its weights with --student {p} and a new --output-dir"
        )
    model_sd = get_model_state_dict(model)
    optim_sd = get_optimizer_state_dict(model, optimizer)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=p / SHARDS)  # in place
    set_model_state_dict(model, model_sd)
    set_optimizer_state_dict(model, optimizer, optim_sd)
    scheduler.load_state_dict(torch.load(p / "scheduler.pt", weights_only=True))
    rngs = torch.load(p / "rng.pt", weights_only=True)
    if rank < len(rngs):
        restore_rng(rngs[rank])
    return read_state(p)
