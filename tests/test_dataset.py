"""Scored datasets on disk (pipeline.dataset): the Parquet format, the manifest, crash leftovers, epochs,
the content-hash index and cache, loading with Hugging Face `datasets`, and the missing-extra error."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from pipeline.dataset import manifest as mf
from pipeline.dataset.format import ParquetOptions, content_hash
from pipeline.dataset.index import ScoredCache, ScoredIndex
from pipeline.dataset.reader import DatasetReader
from pipeline.dataset.writer import DatasetWriter
from pipeline.errors import DatasetError
from pipeline.wire.codec import Rollout, ScoredSample, encode_scored

ROOT = Path(__file__).resolve().parents[1]


def make_samples(
    n: int, *, k: int = 8, dtype: str = "float16", teacher: str = "tch", seed: int = 0, prefix: str = "s"
) -> list[ScoredSample]:
    """`n` samples of 4..40 tokens, with meta values msgpack allows (a bin included)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = int(rng.integers(4, 40))
        p = int(rng.integers(1, t))
        ro = Rollout(
            id=f"{prefix}{i:04d}",
            input_ids=rng.integers(0, 50_000, t).astype(np.int32),
            prompt_len=p,
            policy_version=i % 7,
            source="student" if i % 2 else "dataset",
            created_ms=1_700_000_000_000 + i,
            meta={"prompt_index": i, "raw": b"\x00\xff", "tags": ["a", 1.5, None]},
        )
        lp = -np.sort(rng.random((t - p, k)) * 12, axis=1).astype(np.dtype(dtype))
        lp[:, -1] = -np.inf if i % 5 == 0 else lp[:, -1]  # -inf survives the round trip
        ids = rng.integers(0, 50_000, (t - p, k)).astype(np.int32)
        out.append(ScoredSample(ro, ids, lp, teacher, k, scored_ms=1_700_000_000_500 + i))
    return out


def write(folder: Path, samples: Sequence[ScoredSample], shard: int = 40, **kw: object) -> mf.Manifest:
    s0 = samples[0]
    dtype = "float16" if s0.topk_logprobs.dtype == np.float16 else "float32"
    opts = ParquetOptions(row_group_samples=16)
    with DatasetWriter(folder, teacher=s0.teacher, k=s0.k, logprob_dtype=dtype, options=opts, **kw) as w:  # type: ignore[arg-type]
        for i in range(0, len(samples), shard):
            for s in samples[i : i + shard]:
                w.add(s)
            w.commit([f"{i}-0"], "exp")
        return w.manifest


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_is_bit_exact_in_order_with_counts_and_checksums(tmp_path: Path, dtype: str) -> None:
    samples = make_samples(100, dtype=dtype)
    m = write(tmp_path, samples)
    assert [s.samples for s in m.shards] == [40, 40, 20]
    assert m.samples == 100 and m.tokens == sum(s.rollout.num_tokens for s in samples)
    assert m.scored_tokens == sum(s.topk_ids.shape[0] for s in samples)
    assert m.bytes == sum((tmp_path / s.file).stat().st_size for s in m.shards)
    assert all(mf.sha256_file(tmp_path / s.file) == s.sha256 for s in m.shards)
    assert m.export.unacked == ["80-0"] and m.export.consumer == "exp"
    got = [s for _, s in DatasetReader(tmp_path).epoch(shuffle=False, seed=0, epoch=0)]
    assert [encode_scored(s) for s in got] == [encode_scored(s) for s in samples]
    assert got[3].rollout.meta == {"prompt_index": 3, "raw": b"\x00\xff", "tags": ["a", 1.5, None]}


def test_shuffled_epochs_are_permutations_reproducible_and_resumable(tmp_path: Path) -> None:
    samples = make_samples(100)
    write(tmp_path, samples)
    rd = DatasetReader(tmp_path)
    e1 = [s.rollout.id for _, s in rd.epoch(shuffle=True, seed=3, epoch=1)]
    e2 = [s.rollout.id for _, s in rd.epoch(shuffle=True, seed=3, epoch=2)]
    assert sorted(e1) == sorted(s.rollout.id for s in samples) and e1 != e2
    assert e1 != [s.rollout.id for s in samples]
    again = [s.rollout.id for _, s in DatasetReader(tmp_path).epoch(shuffle=True, seed=3, epoch=1, start=37)]
    assert again == e1[37:]
    # An epoch plan over the first 2 shards ignores shards committed later.
    first_two = [s.rollout.id for _, s in rd.epoch(shuffle=True, seed=3, epoch=1, n_shards=2)]
    assert sorted(first_two) == sorted(s.rollout.id for s in samples[:80])


def test_hugging_face_datasets_loads_the_shards_with_fixed_size_lists(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    samples = make_samples(50, k=8)
    write(tmp_path, samples, shard=20)
    ds = datasets.load_dataset(
        "parquet", data_files=str(tmp_path / "*.parquet"), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert len(ds) == 50
    assert str(ds.features["topk_logprobs"]) == "List(List(Value('float16'), length=8))"
    assert str(ds.features["topk_ids"]) == "List(List(Value('int32'), length=8))"
    rows = {r["id"]: r for r in ds}
    for s in samples:
        row = rows[s.rollout.id]
        assert row["input_ids"] == s.rollout.input_ids.tolist()
        assert row["prompt_len"] == s.rollout.prompt_len and row["k"] == 8 and row["teacher"] == "tch"
        np.testing.assert_array_equal(np.array(row["topk_ids"], dtype=np.int32), s.topk_ids)
        np.testing.assert_array_equal(np.array(row["topk_logprobs"], dtype=np.float16), s.topk_logprobs)
        assert json.loads(row["meta"])["prompt_index"] == s.rollout.meta["prompt_index"]


def test_a_writer_killed_mid_shard_leaves_nothing_a_reader_sees_and_the_next_writer_cleans_up(
    tmp_path: Path,
) -> None:
    samples = make_samples(60)
    write(tmp_path, samples[:40])
    # A real process killed (SIGKILL) with a shard half written: two row groups in part-00001.parquet.tmp.
    child = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from tests.test_dataset import make_samples
from pipeline.dataset.format import ParquetOptions
from pipeline.dataset.writer import DatasetWriter
w = DatasetWriter({str(tmp_path)!r}, teacher="tch", k=8, logprob_dtype="float16",
                  options=ParquetOptions(row_group_samples=8))
w.open()
for s in make_samples(60)[40:]:
    w.add(s)
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    assert (tmp_path / "part-00001.parquet.tmp").exists()
    # A crash between the shard's rename and the manifest: a complete file the manifest does not list.
    (tmp_path / "part-00002.parquet").write_bytes((tmp_path / "part-00000.parquet").read_bytes())
    assert DatasetReader(tmp_path).manifest.samples == 40
    assert [s.rollout.id for _, s in DatasetReader(tmp_path).epoch(shuffle=False, seed=0, epoch=0)] == [
        s.rollout.id for s in samples[:40]
    ]
    with DatasetWriter(tmp_path, teacher="tch", k=8, logprob_dtype="float16") as w:
        assert sorted(p.name for p in tmp_path.glob("part-*")) == ["part-00000.parquet"]
        for s in samples[40:]:
            w.add(s)
        w.commit([])
    got = [s.rollout.id for _, s in DatasetReader(tmp_path).epoch(shuffle=False, seed=0, epoch=0)]
    assert got == [s.rollout.id for s in samples]


def test_a_folder_of_another_teacher_k_or_dtype_is_refused_with_the_reason(tmp_path: Path) -> None:
    write(tmp_path, make_samples(10))
    for kw, reason in (
        ({"teacher": "other", "k": 8, "logprob_dtype": "float16"},
         "teacher: dataset has 'tch', expected 'other'"),
        ({"teacher": "tch", "k": 20, "logprob_dtype": "float16"}, "k: dataset has 8, expected 20"),
        ({"teacher": "tch", "k": 8, "logprob_dtype": "float32"}, "logprob dtype: dataset has 'float16'"),
    ):  # fmt: skip
        with pytest.raises(DatasetError, match=reason):
            DatasetWriter(tmp_path, **kw).open()  # type: ignore[arg-type]


def test_two_writers_cannot_share_a_folder(tmp_path: Path) -> None:
    second = DatasetWriter(tmp_path, teacher="t", k=4, logprob_dtype="float16")
    with (
        DatasetWriter(tmp_path, teacher="t", k=4, logprob_dtype="float16"),
        pytest.raises(DatasetError, match="another process is writing"),
    ):
        second.open()


def test_a_damaged_shard_fails_its_checksum_and_a_missing_manifest_is_named(tmp_path: Path) -> None:
    write(tmp_path / "d", make_samples(30))
    shard = tmp_path / "d" / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"sha256 .* differs from the manifest"):
        list(DatasetReader(tmp_path / "d").epoch(shuffle=False, seed=0, epoch=0))
    with pytest.raises(DatasetError, match="expected a scored dataset"):
        DatasetReader(tmp_path)


def test_index_finds_exact_sequences_and_the_cache_answers_from_their_prompt_len(tmp_path: Path) -> None:
    samples = make_samples(80)
    write(tmp_path, samples)
    index = ScoredIndex(tmp_path)
    assert len(index) == 80
    assert all(s.rollout.input_ids in index for s in samples)
    changed = samples[5].rollout.input_ids.copy()
    changed[-1] += 1
    assert changed not in index
    assert content_hash(samples[5].rollout.input_ids, "tch", 8) != content_hash(
        samples[5].rollout.input_ids, "tch", 20
    )
    cache = ScoredCache(index)
    src = next(s for s in samples if s.rollout.num_tokens - s.rollout.prompt_len >= 3)
    ro = Rollout(id="new-id", input_ids=src.rollout.input_ids.copy(), prompt_len=src.rollout.prompt_len + 1)
    hit = cache.score(ro)
    assert hit is not None and hit.rollout.id == "new-id" and hit.teacher == "tch" and hit.k == 8
    np.testing.assert_array_equal(hit.topk_ids, src.topk_ids[1:])
    np.testing.assert_array_equal(hit.topk_logprobs, src.topk_logprobs[1:])
    earlier = Rollout(id="x", input_ids=src.rollout.input_ids.copy(), prompt_len=src.rollout.prompt_len - 1)
    if earlier.prompt_len >= 1:  # the dataset did not score that first loss token
        assert cache.score(earlier) is None
    assert cache.score(Rollout(id="y", input_ids=changed, prompt_len=1)) is None


def test_without_pyarrow_the_commands_name_the_extra_to_install(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['pyarrow'] = None; sys.modules['pyarrow.parquet'] = None\n"
        "from workers.cli import main\n"
        f"sys.exit(main(['{{}}', '--out' if '{{}}' == 'export' else '--from', {str(tmp_path)!r}]))"
    )
    for command in ("export", "replay"):
        proc = subprocess.run(
            [sys.executable, "-c", code.format(command, command)], cwd=ROOT, capture_output=True, text=True
        )
        assert proc.returncode == 2, proc.stderr
        assert "pip install 'gkd-pipeline[datasets]'" in proc.stderr
