"""The policy producers load: a checkpoint's weights as a Hugging Face folder, written in the background.

`gkd rollouts` loads the published policy's `checkpoint` path with `from_pretrained`, so every
checkpoint gets a complete model folder (config, safetensors weights, generation config, tokenizer).
Gathering the full weights is a collective: each parameter is gathered in turn and copied to rank 0's
host memory (``full_state_dict`` + ``cpu_offload``), so the device never holds a second full copy.
Writing them is not: a thread on rank 0 writes the folder while training goes on, and the trainer
publishes the policy once it is complete. The step loop waits for the gather only (and, when the next
checkpoint comes before the previous export is written, for that write: one export at a time keeps a
single full copy in host memory).

The folder is written into a temporary subfolder and moved into the checkpoint with config.json last:
a checkpoint folder with config.json holds a complete export (`export_complete`).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.train.distributed import Dist

log = logging.getLogger("gkd.train")

MARKER = "config.json"


def export_complete(path: str | os.PathLike[str]) -> bool:
    """Whether checkpoint folder `path` holds a complete exported policy."""
    return (Path(path) / MARKER).exists()


def gather_full_state(lm: Any) -> dict[str, torch.Tensor]:
    """Collective: the full weights in rank 0's host memory (other ranks get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: t for name, t in full.items() if isinstance(t, torch.Tensor)}


def model_shell(lm: Any) -> Any:
    """`lm`'s class and config without tensors (meta device), to save from another thread.

    `save_pretrained` with an explicit state dict still reads the model (dtype, tied weights, key
    conversions); reading the training model while the main thread runs FSDP forwards would race with
    its parameter swaps.
    """
    with torch.device("meta"):
        shell = type(lm)(copy.deepcopy(lm.config))
    shell.generation_config = copy.deepcopy(lm.generation_config)
    return shell


def write_export(shell: Any, tokenizer: Any, state: dict[str, torch.Tensor], path: Path) -> None:
    """Write `state` as a `from_pretrained` folder into `path` (config.json last). Raises OSError."""
    tmp = path / f".export.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shell.save_pretrained(tmp, state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    names = sorted(os.listdir(tmp), key=lambda n: n == MARKER)
    for name in names:
        with open(tmp / name, "rb") as fh:
            os.fsync(fh.fileno())
    for name in names:
        os.replace(tmp / name, path / name)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.rmdir()


class PolicyExporter:
    """Exports checkpoints' weights one at a time; `finished()` hands completed ones to publish."""

    def __init__(self, lm: Any, tokenizer: Any, dist: Dist) -> None:
        self.d = dist
        self.tokenizer = tokenizer
        self.shell = model_shell(lm) if dist.is_main else None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._done: list[tuple[int, str]] = []
        self.last_gather_s = 0.0
        """Seconds the step loop spent on the latest export (the gather)."""
        self.last_write_s = 0.0
        """Seconds the latest completed write took (in the background)."""

    def start(self, lm: Any, path: Path, version: int) -> None:
        """Collective: gather `lm`'s weights, then (rank 0) write them into checkpoint `path` in a thread.

        Waits first for the previous export's write, if any.
        """
        self.wait()
        t0 = time.perf_counter()
        state = gather_full_state(lm)
        self.last_gather_s = time.perf_counter() - t0
        if not self.d.is_main:
            return
        self._thread = threading.Thread(
            target=self._write, args=(state, path, version), name="gkd-export", daemon=False
        )
        self._thread.start()

    def _write(self, state: dict[str, torch.Tensor], path: Path, version: int) -> None:
        t0 = time.perf_counter()
        try:
            write_export(self.shell, self.tokenizer, state, path)
        except OSError as exc:
            log.error("exporting the policy of %s failed (%r); the next checkpoint exports again", path, exc)
            return
        self.last_write_s = time.perf_counter() - t0
        log.info("policy %d exported to %s (%.1f s in the background)", version, path, self.last_write_s)
        with self._lock:
            self._done.append((version, str(path)))

    def finished(self) -> list[tuple[int, str]]:
        """(version, path) of exports completed since the last call, oldest first (rank 0 only)."""
        with self._lock:
            done, self._done = self._done, []
        return done

    def wait(self) -> None:
        """Until the running export (if any) is written."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
