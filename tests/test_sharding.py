"""FSDP2 and DDP on 2 gloo ranks (torchrun, CPU): the same data and seed give the same training, and a
sharded checkpoint resumes in another layout (world size, sharding) on the same trajectory.

The runs are `tests/sharded_steps.py`: five AdamW steps of the tiny student on fixed synthetic batches,
with uneven token counts across ranks, gradient accumulation, and a step in which one rank has no data.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from pipeline.errors import SettingsError
from pipeline.local.redis_server import env_without_proxy, free_port
from pipeline.local.tiny_models import tiny_models
from pipeline.train import checkpoint as ckpt
from pipeline.train.distributed import init_distributed
from pipeline.train.sharding import shard

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "tests" / "sharded_steps.py")


def run_steps(out: Path, *args: str, ranks: int = 2) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Run tests/sharded_steps.py on `ranks` gloo ranks (1: a plain process); its losses and final weights."""
    env = env_without_proxy()
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    launch = [sys.executable]
    if ranks > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
        launch += ["--master_port", str(free_port())]
    proc = subprocess.run(
        [*launch, SCRIPT, str(out), *args], cwd=ROOT, env=env, capture_output=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout.decode()[-3000:] + proc.stderr.decode()[-3000:]
    return json.loads((out / "steps.json").read_text()), load_file(str(out / "weights.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


Run = tuple[list[dict[str, Any]], dict[str, torch.Tensor]]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> Run:
    tiny_models()  # built once, before two ranks race for it
    return run_steps(tmp_path_factory.mktemp("ddp"), "--sharding", "ddp")


@pytest.fixture(scope="module")
def fsdp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-rank FSDP run that also checkpoints after step 3."""
    out = tmp_path_factory.mktemp("fsdp")
    tiny_models()
    run_steps(out, "--sharding", "fsdp", "--checkpoint-at", "3")
    return out


def test_fsdp_on_2_ranks_follows_ddp_over_5_steps(ddp: Run, fsdp_dir: Path) -> None:
    steps = json.loads((fsdp_dir / "steps.json").read_text())
    assert_same_run((steps, load_file(str(fsdp_dir / "weights.safetensors"))), ddp)
    start = load_file(str(tiny_models().student / "model.safetensors"))
    assert max_diff(start, ddp[1]) > 1e-2, "training must move the weights for this test to mean anything"


def test_fsdp_with_the_logits_loss_follows_ddp_with_the_fused_loss(ddp: Run, tmp_path: Path) -> None:
    """The fused loss (the default, run inside FSDP's root forward) and the logits loss train alike."""
    assert_same_run(run_steps(tmp_path, "--sharding", "fsdp", "--loss-impl", "logits"), ddp)


def test_fsdp_with_activation_checkpointing_and_cpu_offload_follows_ddp(ddp: Run, tmp_path: Path) -> None:
    assert_same_run(
        run_steps(tmp_path, "--sharding", "fsdp", "--activation-checkpointing", "--cpu-offload"), ddp
    )


def assert_same_run(run: Run, ref: Run, first_step: int = 0) -> None:
    """Same losses and gradient norms step by step, same weights at the end, within fp32 rounding."""
    steps, ref_steps = run[0], ref[0][first_step:]
    assert len(steps) == len(ref_steps) > 0
    for mine, theirs in zip(steps, ref_steps, strict=True):
        assert mine["rows"] == theirs["rows"]
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
    assert max_diff(run[1], ref[1]) < 2e-5


@pytest.mark.parametrize("resume_as", ["fsdp", "ddp"])
def test_a_2_rank_fsdp_checkpoint_resumes_on_1_rank_on_the_same_trajectory(
    ddp: Run, fsdp_dir: Path, tmp_path: Path, resume_as: str
) -> None:
    """Sharded model and AdamW state written by 2 FSDP ranks after step 3, resharded onto 1 rank: steps 4
    and 5 are those of the uninterrupted run (which also shows one rank with every micro-batch takes the
    same steps as two ranks)."""
    latest = ckpt.latest_checkpoint(fsdp_dir)
    assert latest is not None and ckpt.read_state(latest).world_size == 2
    shards = sorted(p.name for p in (latest / ckpt.SHARDS).iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"], shards
    run = run_steps(tmp_path, "--sharding", resume_as, "--resume", str(latest), ranks=1)
    assert_same_run(run, ddp, first_step=3)


def test_a_student_with_tied_embeddings_under_fsdp_follows_one_process(tmp_path: Path) -> None:
    """Tied input and output embeddings stay one parameter (in the root group) when only rank 0 reads
    the weights and the other ranks receive their shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tied")
    student = ("--student", str(tmp_path / "tied"))
    one = run_steps(tmp_path / "one", "--sharding", "ddp", *student, ranks=1)
    two = run_steps(tmp_path / "two", "--sharding", "fsdp", *student)
    assert "lm_head.weight" not in two[1] or torch.equal(
        two[1]["lm_head.weight"], two[1]["model.embed_tokens.weight"]
    )
    assert_same_run(two, one)


def test_ddp_refuses_cpu_offload() -> None:
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_models().student)
    with pytest.raises(SettingsError, match="cpu_offload: needs --sharding fsdp"):
        shard(lm, lm, init_distributed("cpu"), sharding="ddp", cpu_offload=True)
