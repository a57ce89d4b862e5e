"""Five optimizer steps of the tiny student on fixed data, under torchrun (or alone), for test_sharding.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/sharded_steps.py OUT --sharding fsdp [...]

Every run sees the same global batches: step i has four micro-batches of synthetic scored samples, and
rank r of a world of w trains micro-batches r, r + w, ... of them (so two ranks take two each with
different token counts, one rank all four). Step 3 has two micro-batches, both on rank 0: the other
ranks have no data and run a zero-loss pass. The
loss of a step is the mean over all its loss tokens whatever the world size, so every layout follows the
same trajectory up to floating-point rounding. Rank 0 writes OUT/steps.json (global loss and gradient
norm per step) and OUT/weights.safetensors (the full weights after the last step). `--checkpoint-at N`
writes a checkpoint into OUT after step N; `--resume CKPT` continues one (in any layout) to step 5.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.local.tiny_models import tiny_models  # noqa: E402
from pipeline.train import checkpoint as ckpt  # noqa: E402
from pipeline.train.batching import Batch, pack  # noqa: E402
from pipeline.train.distributed import init_distributed, shutdown  # noqa: E402
from pipeline.train.export import gather_full_state  # noqa: E402
from pipeline.train.step import LossConfig, train_step  # noqa: E402
from pipeline.train.student import build_student  # noqa: E402
from pipeline.train.trainer import TrainSettings  # noqa: E402
from pipeline.wire.codec import Rollout, ScoredSample  # noqa: E402

STEPS, MICRO, K, VOCAB = 5, 4, 8, 320


def micro_batches(step: int) -> list[Batch]:
    """The four micro-batches of `step`, with different lengths (uneven token counts across ranks)."""
    rng = np.random.default_rng(1000 + step)
    out = []
    for m in range(MICRO):
        samples = []
        for j in range(2 + m % 2):
            t = int(rng.integers(8, 20))
            p = int(rng.integers(2, 5))
            ids_T = rng.integers(0, VOCAB, size=t).astype(np.int32)
            ids_RK = np.stack([rng.permutation(VOCAB)[:K] for _ in range(t - p)]).astype(np.int32)
            probs_RK = np.sort(rng.dirichlet(np.ones(K) * 0.5, size=t - p) * 0.9, axis=1)[:, ::-1]
            ro = Rollout(id=f"s{step}-{m}-{j}", input_ids=ids_T, prompt_len=p)
            samples.append(ScoredSample(ro, ids_RK, np.log(probs_RK).astype(np.float32), "t", K))
        out += pack(samples, batch_tokens=10**6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--sharding", default="fsdp")
    ap.add_argument("--student", default="", help="model folder (default: the tiny student)")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--cpu-offload", action="store_true")
    ap.add_argument("--loss-impl", default="fused", choices=("fused", "logits"))
    ap.add_argument("--resume", type=Path, help="start from this checkpoint folder (its step)")
    ap.add_argument("--checkpoint-at", type=int, default=0, help="checkpoint into OUT after this step")
    a = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    d = init_distributed("cpu")
    torch.manual_seed(0)
    s = TrainSettings(
        student=a.student or str(tiny_models().student.resolve()),
        sharding=a.sharding,
        activation_checkpointing=a.activation_checkpointing,
        cpu_offload=a.cpu_offload,
        loss_impl=a.loss_impl,
        lr=1e-2,
        warmup_steps=1,
        max_steps=STEPS,
        weight_decay=0.01,
    )
    st = build_student(s, d)
    cfg = LossConfig(beta=0.5, temperature=1.0, mode="tail")
    history = []
    first = 0
    if a.resume is not None:
        first = ckpt.load_checkpoint(
            a.resume, model=st.lm, optimizer=st.optimizer, scheduler=st.scheduler, rank=d.rank
        ).step
    for step in range(first, STEPS):
        every = micro_batches(step)
        mine = every[d.rank :: d.world_size]
        if step == 3:  # half the data, all on rank 0: the other ranks run a zero-loss pass
            every = every[::2]
            mine = every if d.rank == 0 else []
        rows = float(sum(b.num_loss_tokens for b in every))
        passes = max(len(every[r :: d.world_size]) if step != 3 else len(every) for r in range(d.world_size))
        stats = train_step(
            st.module,
            mine,
            global_rows=rows,
            world_size=d.world_size,
            cfg=cfg,
            optimizer=st.optimizer,
            scheduler=st.scheduler,
            device=d.device,
            want_kl=False,
            passes=passes,
        )
        loss_sum, seen = d.all_sum([stats.loss_sum, stats.rows])
        history.append({"loss": loss_sum / seen, "rows": seen, "grad_norm": stats.grad_norm})
        if step + 1 == a.checkpoint_at:
            state = ckpt.TrainState(step=step + 1, policy_version=step + 1, world_size=d.world_size)
            rngs = d.all_gather(ckpt.capture_rng())
            kw = {"model": st.lm, "optimizer": st.optimizer, "scheduler": st.scheduler}
            ckpt.save_checkpoint(a.out, **kw, state=state, rng_states=rngs, dist=d)
    weights = gather_full_state(st.lm)
    if d.is_main:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "steps.json").write_text(json.dumps(history))
        save_file({k: v.clone() for k, v in weights.items()}, str(a.out / "weights.safetensors"))  # untied
    shutdown()


if __name__ == "__main__":
    main()
