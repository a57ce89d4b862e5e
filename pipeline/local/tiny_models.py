"""Tiny teacher and student models built offline from a fixed seed, for the demo, tests and benchmarks.

No model hub is needed: a byte-level BPE tokenizer is trained on an embedded, generated corpus, a small
Llama teacher is trained briefly on the same corpus (so its next-token distribution is peaked and worth
distilling), and a smaller, untrained Llama student shares the tokenizer. Both are saved with
`save_pretrained` under ``<cache>/<version>/{teacher,student}`` and reused by every later call.

`tiny_models(servable=True)` builds the same pair with attention heads of 32 dimensions (fewer, wider
heads) under ``<cache>/<version>-vllm/``: vLLM's CPU attention serves head sizes 32, 64, 80 and up only,
while the default pair (head size 16) is the smallest that trains and serves fast with transformers.
"""

from __future__ import annotations

import fcntl
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VERSION = "v1"
DEFAULT_CACHE = Path(os.environ.get("GKD_CACHE_DIR", ".gkd")) / "models"

_SUBJECTS = [
    "the cat",
    "a dog",
    "the teacher",
    "my student",
    "the model",
    "a small bird",
    "the robot",
    "our team",
    "the old man",
    "a young girl",
    "the server",
    "the queue",
]
_VERBS = ["sees", "likes", "builds", "reads", "follows", "answers", "trains", "finds", "helps", "moves"]
_OBJECTS = [
    "the ball",
    "a red box",
    "the long road",
    "a quiet river",
    "the blue sky",
    "a warm meal",
    "the last token",
    "a fast worker",
    "the big garden",
    "a new book",
    "the open door",
]
_TAILS = [
    "today.",
    "every morning.",
    "with great care.",
    "in the rain.",
    "before dinner.",
    "again.",
    "near the house.",
    "without a word.",
    "at night.",
    "for a while.",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class TinyModels:
    """Paths of the cached tiny models (each a `save_pretrained` folder with its tokenizer)."""

    teacher: Path
    student: Path


def corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """Deterministic templated sentences: structured enough that a tiny model learns them quickly."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
        lines.append(s[0].upper() + s[1:])
    return lines


def prompts(n: int = 64, seed: int = 1) -> list[str]:
    """Prompts (sentence beginnings) drawn from the same grammar, for rollouts in the demo and tests."""
    rng = random.Random(seed)
    return [f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)}" for _ in range(n)]


def _build_tokenizer(path: Path, vocab_size: int):  # type: ignore[no-untyped-def]
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>"]
    bpe.train_from_iterator(corpus(), vocab_size=vocab_size, min_frequency=2, special_tokens=specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return tok


def llama(
    vocab: int, hidden: int, layers: int, heads: int, seed: int, *, max_positions: int = 256, **token_ids: Any
) -> Any:
    """A small Llama causal LM (Hugging Face, untied head, MLP 2 x hidden) initialized right after
    ``torch.manual_seed(seed)``, so the same arguments give the same weights (tests, demo, benches).
    `token_ids`: bos_token_id, eos_token_id, pad_token_id for the config (LlamaConfig's defaults else)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        **token_ids,
    )
    return LlamaForCausalLM(cfg)


def _llama(vocab: int, hidden: int, layers: int, heads: int, tok, seed: int):  # type: ignore[no-untyped-def]
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    return llama(vocab, hidden, layers, heads, seed, **ids)


def _train_teacher(model, tok, steps: int, seed: int) -> None:  # type: ignore[no-untyped-def]
    import torch

    g = torch.Generator().manual_seed(seed)
    text = [tok.bos_token + s + tok.eos_token for s in corpus()]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in text]
    flat = torch.tensor([i for seq in ids for i in seq], dtype=torch.long)
    seq_len, batch = 48, 16
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, flat.numel() - seq_len - 1, (batch,), generator=g)
        x = torch.stack([flat[s : s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def tiny_models(
    cache_dir: str | os.PathLike[str] | None = None, *, teacher_steps: int = 300, servable: bool = False
) -> TinyModels:
    """Build (once) and return the tiny teacher and student. Safe to call from several processes.

    `servable`: head size 32 instead of 16 (teacher 2 heads, student 1), so vLLM's CPU backend serves them.
    """
    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    root = root / (f"{VERSION}-vllm" if servable else VERSION)
    teacher_heads, student_heads = (2, 1) if servable else (4, 2)
    out = TinyModels(teacher=root / "teacher", student=root / "student")
    if (out.student / "config.json").exists() and (out.teacher / "config.json").exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same models
        if (out.student / "config.json").exists() and (out.teacher / "config.json").exists():
            return out
        import torch

        with torch.random.fork_rng():
            tok = _build_tokenizer(root / "tokenizer", vocab_size=320)
            teacher = _llama(len(tok), hidden=64, layers=2, heads=teacher_heads, tok=tok, seed=0)
            _train_teacher(teacher, tok, steps=teacher_steps, seed=0)
            student = _llama(len(tok), hidden=32, layers=1, heads=student_heads, tok=tok, seed=1)
            for model, path in ((teacher, out.teacher), (student, out.student)):
                tmp = path.with_name(path.name + ".tmp")
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
                os.replace(tmp, path)
    return out


def write_prompts(path: str | os.PathLike[str], n: int = 200) -> None:
    """JSONL of prompt/completion pairs cut from the corpus (the student may regenerate the completions)."""
    import json

    rng = random.Random(7)
    with open(path, "w") as fh:
        for line in corpus(n, seed=11):
            words = line.split()
            cut = rng.randint(2, 4)
            prompt, completion = " ".join(words[:cut]), " " + " ".join(words[cut:])
            fh.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m pipeline.local.tiny_models",
        description="Build the tiny teacher and student offline (once; cached under .gkd/models).",
    )
    p.add_argument("--servable", action="store_true", help="head size 32, as vLLM's CPU backend needs")
    p.add_argument("--prompts", metavar="FILE", help="also write a JSONL prompt file for them here")
    a = p.parse_args(argv)
    models = tiny_models(servable=a.servable)
    print(f"teacher: {models.teacher}\nstudent: {models.student}")
    if a.prompts:
        write_prompts(a.prompts)
        print(f"prompts: {a.prompts}")


if __name__ == "__main__":
    main()
