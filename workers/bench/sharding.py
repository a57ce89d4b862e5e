"""Part of `gkd bench trainer`: memory per rank and tokens/s of FSDP against DDP, 2 gloo ranks on CPU.

A ~100M-parameter Llama student (hidden 768, 12 layers, vocabulary 8192; random weights, built
offline) trains `--sharding-steps` optimizer steps under torchrun with 2 CPU ranks, once with
`--sharding ddp` and once with `--sharding fsdp`, both with `--activation-checkpointing` (at real
sizes one would use it, and it keeps activations from hiding the state that sharding divides), from a
private Redis whose `ready` stream holds enough synthetic samples. Each rank is the real `gkd train`
trainer; it records its process's peak resident memory (VmHWM) from just before the model is loaded to
the end of the last step (the final checkpoint and export are left out), and its resident memory at
that start (the interpreter, torch, transformers and the Redis client: the same in both modes). Memory
per rank is the peak above that start, the larger of the two ranks; tokens/s counts every rank's tokens
over the steps after the first. The ranks run with a fixed glibc mmap threshold (see `measure`) unless
`--sharding-default-malloc`. The final checkpoint is timed too: how long the step loop stops for it
(sharded state written, samples acknowledged, weights gathered for the export) and how long rank 0's
background thread then writes the exported policy.

Each rank runs as `python -m workers.bench.sharding RESULT_DIR SETTINGS_JSON` under torchrun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.local.redis_server import env_without_proxy, free_port

HIDDEN, LAYERS, HEADS, INTERMEDIATE, VOCAB = 768, 12, 12, 2048, 8192
ROOT = Path(__file__).resolve().parents[2]


def build_student(path: Path) -> int:
    """A random ~100M-parameter Llama saved at `path`; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def _status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status: expected a {field} line, found none")


def _reset_peak() -> None:
    """Make VmHWM start again from the current resident size (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def rank_main(result_dir: Path, settings_json: Path) -> None:
    """One rank: run the trainer and write RESULT_DIR/rank-<r>.json."""
    # Imported before the start reading: code is not training memory (transformers alone is ~110 MB).
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401

    from pipeline.sections import RunSettings
    from pipeline.train.trainer import Trainer, TrainSettings

    class MeasuredTrainer(Trainer):
        """The trainer, with the memory readings taken around model load and before the last checkpoint."""

        def _load_model(self) -> None:
            self.start_kb = _status_kb("VmRSS")
            _reset_peak()
            super()._load_model()

        def _checkpoint(self) -> None:
            self.peak_kb = _status_kb("VmHWM")
            t0 = time.perf_counter()
            super()._checkpoint()  # sharded state written, samples acknowledged, weights gathered
            self.checkpoint_s = time.perf_counter() - t0

    raw = json.loads(settings_json.read_text())
    s = TrainSettings(run=RunSettings(**raw.pop("run")), **raw)
    trainer = MeasuredTrainer(s)
    try:
        summary = trainer.run()
    except BaseException:
        trainer.close(clean=False)
        raise
    trainer.close()
    out = {
        "rank": trainer.dist.rank,
        "start_kb": trainer.start_kb,
        "peak_kb": trainer.peak_kb,
        "history": summary.history,
        "checkpoint_s": trainer.checkpoint_s,
        "export_gather_s": trainer.exports.last_gather_s,
        "export_write_s": trainer.exports.last_write_s,
    }
    (result_dir / f"rank-{trainer.dist.rank}.json").write_text(json.dumps(out))


def measure(redis_url: str, student: Path, sharding: str, name: str, steps: int, batch_tokens: int,
            k: int, workdir: Path, default_malloc: bool = False) -> dict[str, float]:  # fmt: skip
    """Train `steps` steps on 2 ranks with `sharding` (run `name`); memory per rank (MB) and tokens/s."""
    out = workdir / name
    out.mkdir()
    settings = {
        "run": {"name": f"bench-sharding-{name}", "redis_url": redis_url, "k": k},
        "student": str(student),
        "output_dir": str(out / "train"),
        "batch_tokens": batch_tokens,
        "max_steps": steps,
        "log_every": 1,
        "checkpoint_every": 10**9,
        "warmup_steps": 0,
        "lr": 1e-4,
        "device": "cpu",
        "num_threads": 1,
        "sharding": sharding,
        "activation_checkpointing": True,
        "log_level": "warning",
    }
    (out / "settings.json").write_text(json.dumps(settings))
    env = env_without_proxy()
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    if not default_malloc:
        # glibc raises its mmap threshold as large blocks are freed, and then keeps later ones in the
        # heap: FSDP frees a layer's gathered parameters after every use, and the resident size would
        # then show the heap's high-water mark, not the tensors alive (a GPU caching allocator reuses).
        env.update({"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()),
           "-m", "workers.bench.sharding", str(out), str(out / "settings.json")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"bench {sharding} ranks failed:\n{proc.stderr.decode()[-4000:]}")
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    history = ranks[0]["history"][1:]  # the first step includes one-time costs
    step_s = sum(h["step_s"] for h in history)
    return {
        "mem_mb": max(r["peak_kb"] - r["start_kb"] for r in ranks) / 1024,
        "peak_rss_mb": max(r["peak_kb"] for r in ranks) / 1024,
        "tokens_per_s": sum(h["tokens"] for h in history) / step_s,
        "checkpoint_ms": 1000 * max(r["checkpoint_s"] for r in ranks),
        "export_gather_ms": 1000 * max(r["export_gather_s"] for r in ranks),
        "export_write_ms": 1000 * ranks[0]["export_write_s"],
    }


def run_pair(
    redis_url: str,
    steps: int,
    batch_tokens: int,
    k: int,
    fill: Any,
    default_malloc: bool = False,
    repeats: int = 1,
) -> dict[str, Any]:
    """Both shardings on the same student and data; `fill(run, n_samples, vocab)` fills `ready`.

    With `repeats` > 1 the runs alternate (ddp, fsdp, ddp, ...) so that load from other processes on
    the machine falls on both alike; each mode reports its best tokens/s and times, and its largest
    memory.
    """
    with tempfile.TemporaryDirectory(prefix="gkd-bench-sharding-") as tmp:
        work = Path(tmp)
        params = build_student(work / "student")
        per_rank_step = max(1, batch_tokens // 128)
        runs: dict[str, list[dict[str, float]]] = {"ddp": [], "fsdp": []}
        for i in range(repeats):
            for sharding in runs:
                name = f"{sharding}-{i}"
                # Every step of both ranks, what the prefetchers read ahead, and a margin: never dry.
                fill(f"bench-sharding-{name}", 2 * per_rank_step * (steps + 6) + 32, VOCAB)
                runs[sharding].append(
                    measure(
                        redis_url,
                        work / "student",
                        sharding,
                        name,
                        steps,
                        batch_tokens,
                        k,
                        work,
                        default_malloc,
                    )
                )
    out: dict[str, Any] = {"params": params}
    for sharding, results in runs.items():
        # Load from elsewhere only slows a run down: the best speed and times, the largest memory.
        best = {key: (min if key.endswith("_ms") else max) for key in results[0]}
        out[sharding] = {key: pick(r[key] for r in results) for key, pick in best.items()}
    return out


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rank_main(Path(sys.argv[1]), Path(sys.argv[2]))
