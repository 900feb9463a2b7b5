"""Pythia shard naming, streaming unshard with sha256 verification."""

import hashlib
import os

import pytest

from pythia_jax.data.shards import (ShardError, parse_shard_name, read_hash_list, shard,
                                    shard_paths, unshard)


def test_real_hash_list_and_pythia_naming(shared_data):
    table = read_hash_list(shared_data / "pythia_misc" / "shard_hashes.txt")
    assert len(table) == 84  # 83 shards + the .idx
    assert table["pile_0.87_deduped_text_document.idx"].startswith("a659c5a5")
    first = "pile_0.87_deduped_text_document-00000-of-00082.bin"
    assert table[first] == "44fb8e4898a07bacb71aba969afc4ffbe382813c09420122d57451cebe1d56a2"
    base, index, n = parse_shard_name("/d/" + first)
    assert (base, index, n) == ("/d/pile_0.87_deduped_text_document", 0, 83)
    names = [os.path.basename(p) for p in shard_paths(base, n)]
    assert set(names) == set(table) - {"pile_0.87_deduped_text_document.idx"}
    assert names[-1] == "pile_0.87_deduped_text_document-00082-of-00082.bin"
    with pytest.raises(ShardError, match="not a shard name"):
        parse_shard_name("document.bin")


@pytest.fixture
def sharded(tmp_path):
    data = os.urandom(10_000)
    (tmp_path / "document.bin").write_bytes(data)
    paths = shard(str(tmp_path / "document.bin"), shard_size=3000)
    (tmp_path / "document.bin").unlink()
    return tmp_path, data, paths


def test_shard_unshard_round_trip_with_hashes(sharded):
    tmp, data, paths = sharded
    assert [os.path.basename(p) for p in paths] == [
        f"document-{i:05d}-of-00003.bin" for i in range(4)]
    assert [os.path.getsize(p) for p in paths] == [3000, 3000, 3000, 1000]
    lines = [f"{os.path.basename(p)} {hashlib.sha256(open(p, 'rb').read()).hexdigest()}"
             for p in paths]
    (tmp / "hashes.txt").write_text("\n".join(lines) + "\n")
    out = unshard(paths[0], hashes=str(tmp / "hashes.txt"),
                  expected_sha256=hashlib.sha256(data).hexdigest(), chunk=1024)
    assert out == str(tmp / "document.bin")
    assert (tmp / "document.bin").read_bytes() == data
    with pytest.raises(ShardError, match="already exists"):
        unshard(paths[0])
    # sha256sum's "hash  name" order is accepted too; explicit output and shard count
    (tmp / "sums.txt").write_text("\n".join(f"{ln.split()[1]}  {ln.split()[0]}" for ln in lines))
    out2 = unshard(paths[0], num_shards=4, output=str(tmp / "merged.bin"),
                   hashes=str(tmp / "sums.txt"))
    assert open(out2, "rb").read() == data


def test_hash_mismatch_leaves_no_output(sharded):
    tmp, data, paths = sharded
    good = {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths}
    bad = dict(good)
    name2 = os.path.basename(paths[2])
    bad[name2] = "0" * 64
    before = sorted(os.listdir(tmp))
    with pytest.raises(ShardError, match=rf"{name2}: sha256 mismatch: expected 0{{64}}, found "
                                         rf"{good[name2]}"):
        unshard(paths[0], hashes=bad)
    with pytest.raises(ShardError, match=r"document\.bin: sha256 of the merged file: expected "
                                         r"f{64}"):
        unshard(paths[0], hashes=good, expected_sha256="f" * 64)
    del bad[name2]
    with pytest.raises(ShardError, match=rf"{name2}: no sha256 for this shard"):
        unshard(paths[0], hashes=bad)
    (tmp / "document.idx").write_bytes(b"idx")
    with pytest.raises(ShardError, match=r"document\.idx: sha256 mismatch: expected 1{64}"):
        unshard(paths[0], hashes={**good, "document.idx": "1" * 64})
    (tmp / "document.idx").unlink()
    assert sorted(os.listdir(tmp)) == before


def test_missing_or_inconsistent_shards(sharded):
    tmp, data, paths = sharded
    with pytest.raises(ShardError, match="the name says 4 shards .*--num_shards says 5"):
        unshard(paths[0], num_shards=5)
    with pytest.raises(ShardError, match="expected the first shard"):
        unshard(paths[1])
    os.remove(paths[3])
    with pytest.raises(ShardError, match=r"1 of 4 shards missing, e\.g\. .*-00003-of-00003\.bin"):
        unshard(paths[0])
    assert not os.path.exists(tmp / "document.bin")
