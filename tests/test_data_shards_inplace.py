"""Pythia's byte shards read in place (no `.bin`, no merge): a dataset split at odd byte offsets
(tokens and items cut in half) reads exactly like the merged file, locally and in a bucket (GCS
emulator); a missing or truncated shard and a wrong hash are errors naming the shard; the data
entry points (PythiaOrder / training, memorization, evaluation) all open it; training 2 steps on
the shards equals training on the merged file."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from gcs_utils import gcs, gcs_emulator  # noqa: F401  (fixtures)
from pythia_jax import evaluate, train
from pythia_jax.config import ModelConfig
from pythia_jax.data import (MMapIndexedDataset, PythiaOrder, ShardError, shard,
                             write_indexed_dataset)
from pythia_jax.data.shards import sha256_file
from pythia_jax.model import GPTNeoX
from pythia_jax.research import memorization
from test_train import VOCAB, tiny_config

B, T = 4, 63            # 4 rows of 64 tokens (128 bytes) per step
N_ROWS = 5 * B + 3      # 5 steps and 3 spare rows: 2944 bytes
SHARD = 777             # odd: cuts uint16 tokens and 128-byte items in half -> 4 shards


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(jax.device_get(x))
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture
def sets(tmp_path):
    """(merged prefix, sharded prefix: the .idx and 4 shards, no .bin)."""
    rng = np.random.RandomState(1)
    rows = rng.randint(0, VOCAB, (N_ROWS, T + 1)).astype(np.uint16)
    merged = str(tmp_path / "merged" / "document")
    os.makedirs(os.path.dirname(merged))
    write_indexed_dataset(merged, list(rows), dtype=np.uint16)
    sharded = str(tmp_path / "sharded" / "document")
    os.makedirs(os.path.dirname(sharded))
    for ext in (".bin", ".idx"):
        shutil.copy(merged + ext, sharded + ext)
    outs = shard(sharded + ".bin", shard_size=SHARD)
    os.remove(sharded + ".bin")
    assert [os.path.getsize(p) for p in outs] == [777, 777, 777, 613]
    return merged, sharded


def assert_same_dataset(a: MMapIndexedDataset, b: MMapIndexedDataset) -> None:
    assert len(a) == len(b) and a.dtype == b.dtype and a.num_docs == b.num_docs
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i], b[i])
    np.testing.assert_array_equal(a.get_range(0, len(a)), b.get_range(0, len(b)))
    np.testing.assert_array_equal(a.get(5, offset=3, length=50), b.get(5, offset=3, length=50))
    oa, ob = PythiaOrder(a, B, T), PythiaOrder(b, B, T)
    assert oa.num_steps == ob.num_steps == 5
    for step in range(5):
        np.testing.assert_array_equal(oa.batch(step), ob.batch(step))
        np.testing.assert_array_equal(oa.rows(step, 1, 3), ob.rows(step, 1, 3))


def test_local_shards_read_like_the_merged_file(sets):
    merged, sharded = sets
    ds = MMapIndexedDataset(sharded)
    assert ds.layout.sharded and len(ds.layout.bins) == 4
    assert ds.bin_path.endswith("document-{00000..00003}-of-00003.bin")
    # item 6 spans bytes [768, 896): it starts in shard 0 and ends in shard 1, and the byte at
    # 777 splits token 4 of it in half
    assert ds.pointers[6] < SHARD < ds.pointers[6] + 128 and (SHARD - ds.pointers[6]) % 2 == 1
    assert_same_dataset(MMapIndexedDataset(merged), ds)
    # the entry points: memorization and evaluation open it through the same reader
    rows = [0, 6, 7, 17, 22]
    np.testing.assert_array_equal(memorization.read_rows(sharded, rows),
                                  memorization.read_rows(merged, rows))
    model = GPTNeoX(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                vocab_size=VOCAB), rngs=nnx.Rngs(0))
    kw = dict(context_length=32, max_tokens=96, batch_size=4)  # bytes [0, 192): two shards
    got = evaluate.evaluate_token_stream(model, sharded, **kw)
    want = evaluate.evaluate_token_stream(model, merged, **kw)
    assert got.pop("data") == sharded and want.pop("data") == merged
    assert got == want and got["tokens"] == 96


def test_missing_or_truncated_shards_are_named(sets):
    _, sharded = sets
    folder = os.path.dirname(sharded)
    s1 = f"{sharded}-00001-of-00003.bin"
    s3 = f"{sharded}-00003-of-00003.bin"
    data = open(s1, "rb").read()
    with open(s1, "wb") as f:
        f.write(data[:-1])
    with pytest.raises(ShardError, match=r"document-00001-of-00003\.bin: shard of 776 bytes, "
                                         r"expected 777.*truncated"):
        MMapIndexedDataset(sharded)
    with open(s1, "wb") as f:
        f.write(data)
    last = open(s3, "rb").read()
    with open(s3, "wb") as f:
        f.write(last[:-2])
    with pytest.raises(ShardError, match=r"document-00003-of-00003\.bin: last shard of 611 "
                                         r"bytes, expected 613"):
        PythiaOrder(sharded, B, T)
    os.remove(s3)
    with pytest.raises(ShardError, match=r"document-00003-of-00003\.bin: shard missing"):
        MMapIndexedDataset(sharded)
    assert not MMapIndexedDataset.exists(sharded)
    with open(s3, "wb") as f:
        f.write(last)
    shutil.copy(s1, os.path.join(folder, "document-00000-of-00007.bin"))
    with pytest.raises(ShardError, match=r"several counts side by side \(-of-00003, -of-00007\)"):
        MMapIndexedDataset(sharded)


def test_hash_list_checks_every_shard(sets, tmp_path):
    _, sharded = sets
    shards = MMapIndexedDataset(sharded).layout.bins
    digests = {os.path.basename(p): sha256_file(p) for p in shards}
    good = tmp_path / "shard_hashes.txt"  # unshard's format: `<file> <sha256>` lines
    good.write_text("".join(f"{n} {d}\n" for n, d in digests.items()))
    MMapIndexedDataset(sharded, hashes=str(good))  # passes
    wrong = dict(digests, **{"document-00002-of-00003.bin": "0" * 64})
    bad = tmp_path / "bad_hashes.txt"  # `sha256sum` order is accepted too
    bad.write_text("".join(f"{d}  {n}\n" for n, d in wrong.items()))
    with pytest.raises(ShardError, match=r"document-00002-of-00003\.bin: sha256 mismatch: "
                                         r"expected 0{64}, found " + digests[
                                             "document-00002-of-00003.bin"]):
        MMapIndexedDataset(sharded, hashes=str(bad))
    with pytest.raises(ShardError, match=r"document-00003-of-00003\.bin: no sha256"):
        MMapIndexedDataset(sharded, hashes={k: v for k, v in digests.items() if "3-of" not in k})


def _upload(gcs, prefix: str, rel: str) -> str:
    url = gcs.url(rel)
    folder, base = os.path.split(prefix)
    for name in sorted(os.listdir(folder)):
        if name.startswith(base):
            gcs.fs.put_file(os.path.join(folder, name), f"{url.rsplit('/', 1)[0]}/{name}")
    return url


def test_bucket_shards_read_like_the_merged_file_and_train_the_same(gcs, sets, tmp_path):
    merged, sharded = sets
    url = _upload(gcs, sharded, "pile/document")
    ds = MMapIndexedDataset(url)
    assert ds.layout.remote and ds.layout.sharded
    assert_same_dataset(MMapIndexedDataset(merged), ds)
    # one ranged read per shard a step touches: step 1 (bytes [512, 1024)) crosses shard 0's end
    before = ds.token_bytes.requests
    PythiaOrder(ds, B, T).batch(1)
    assert ds.token_bytes.requests - before == 2
    digests = {os.path.basename(p): sha256_file(p) for p in MMapIndexedDataset(sharded).layout.bins}
    MMapIndexedDataset(url, hashes=digests)
    with pytest.raises(ShardError, match=r"gs://.*/pile/document-00001-of-00003\.bin: sha256"):
        MMapIndexedDataset(url, hashes=dict(digests, **{"document-00001-of-00003.bin": "1" * 64}))

    # training 2 steps on the shards in the bucket = training on the merged local file
    over = {"train.num_steps": 2, "train.batch_size": B, "train.seq_len": T,
            "train.log_every": 1, "checkpoint.extra_steps": (), "checkpoint.save_final": False}
    a = train.train(tiny_config(merged, **over), str(tmp_path / "run_merged"))
    b = train.train(tiny_config(url, **over), str(tmp_path / "run_shards"), setup=a["setup"])
    assert (a["end_step"], b["end_step"]) == (2, 2)
    pa, pb = _flat(a["state"].params), _flat(b["state"].params)
    assert pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)

    # a truncated shard in the bucket is named
    bad = gcs.url("bad/document")
    for p in MMapIndexedDataset(sharded).layout.bins + (sharded + ".idx",):
        data = open(p, "rb").read()
        gcs.fs.pipe_file(f"{bad.rsplit('/', 1)[0]}/{os.path.basename(p)}",
                         data[:-5] if p.endswith("00002-of-00003.bin") else data)
    with pytest.raises(train.TrainConfigError, match=r"config\.data\.path=.*bad/document-00002-"
                                                     r"of-00003\.bin: shard of 772 bytes"):
        train.open_data(tiny_config(bad, **over), str(tmp_path / "run_bad"))


def test_unshard_verify_only_checks_the_shards_in_place(sets, tmp_path):
    _, sharded = sets
    script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "unshard.py"
    first = f"{sharded}-00000-of-00003.bin"
    lines = {os.path.basename(p): sha256_file(p) for p in MMapIndexedDataset(sharded).layout.bins}
    before = sorted(os.listdir(os.path.dirname(sharded)))
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("".join(f"{n} {d}\n" for n, d in lines.items()))
    lines["document-00001-of-00003.bin"] = "f" * 64
    bad.write_text("".join(f"{n} {d}\n" for n, d in lines.items()))

    def run(hashes):
        return subprocess.run([sys.executable, str(script), f"--input={first}",
                               f"--hashes={hashes}", "--verify_only"],
                              capture_output=True, text=True, timeout=300)

    r = run(bad)
    assert r.returncode == 1 and "document-00001-of-00003.bin: sha256 mismatch" in r.stderr
    r = run(good)
    assert r.returncode == 0 and "4 shards" in r.stdout, r.stderr
    assert sorted(os.listdir(os.path.dirname(sharded))) == before  # nothing merged or written
