"""Students at benchmark sizes, built offline: random weights in a real architecture, no model hub.

`gkd bench trainer` and `gkd bench serve` need a student of a realistic size (the GPU check uses about
0.5B parameters with a 151,936-token vocabulary, the shape of Qwen2.5-0.5B) where no weights can be
downloaded. Training speed and serving throughput depend on the shapes, not on the values, so random
initialization measures what a real checkpoint would. The tokenizer is the tiny models' byte-level BPE
(320 tokens): ids past it decode to "" (the reference server handles that), and the benches send
token ids, never text.

    python -m pipeline.local.bench_models --preset 0.5b --out .gkd/models/bench-0.5b --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Preset:
    """The shape of a Qwen2-family decoder (what `transformers.Qwen2Config` takes)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    save_dtype: str
    """Dtype of the saved weights ("bfloat16" halves what is written and read; loaders upcast)."""


PRESETS: dict[str, Preset] = {
    # Qwen2.5-0.5B's shape: 494M parameters, 136M of them in the (tied) embedding.
    "0.5b": Preset(151_936, 896, 4864, 24, 14, 2, 4096, True, "bfloat16"),
    # The CPU dry run of the GPU check: the same family, a vocabulary wider than the tokenizer.
    "tiny": Preset(2048, 64, 128, 2, 4, 2, 512, True, "float32"),
}


def _config(p: Preset, tok) -> object:  # type: ignore[no-untyped-def]
    from transformers import Qwen2Config

    fields = {k: v for k, v in asdict(p).items() if k != "save_dtype"}
    return Qwen2Config(
        **fields,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def build(preset: str, out: str | os.PathLike[str], device: str = "cpu", seed: int = 0) -> Path:
    """Build (once) the `preset` student in folder `out`; returns it. A folder built earlier from the same
    preset is reused. Raises KeyError for an unknown preset."""
    p = PRESETS[preset]
    out = Path(out)
    marker = out / "gkd_bench_model.json"
    if marker.exists() and json.loads(marker.read_text()).get("preset") == asdict(p):
        return out
    import torch
    from transformers import Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    from pipeline.local.tiny_models import _build_tokenizer

    hf_logging.disable_progress_bar()

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = _build_tokenizer(tmp, vocab_size=320)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Initialized on the target device: 0.5B parameters take seconds on a GPU, much longer on a CPU.
        with torch.device(device):
            model = Qwen2ForCausalLM(_config(p, tok))  # type: ignore[arg-type]
    model.to(getattr(torch, p.save_dtype)).save_pretrained(tmp)
    n_params = sum(t.numel() for t in model.parameters())
    (tmp / marker.name).write_text(json.dumps({"preset": asdict(p), "parameters": n_params}))
    del model
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.local.bench_models", description=__doc__)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="0.5b")
    ap.add_argument("--out", required=True, help="folder to write (reused if built from the same preset)")
    ap.add_argument("--device", default="cpu", help="where to initialize the weights (cpu, cuda)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    path = build(a.preset, a.out, a.device)
    info = json.loads((path / "gkd_bench_model.json").read_text())
    row = {"path": str(path), "preset": a.preset, "parameters": info["parameters"]}
    print(json.dumps({**row, "seconds": round(time.perf_counter() - t0, 2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
