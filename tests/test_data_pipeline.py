"""Host input pipeline: process-local reads, global sharded batches, prefetch, resumption."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from pythia_jax.data.indexed import IndexedDatasetError, IndexedDatasetIndexError, \
    write_indexed_dataset
from pythia_jax.data.order import PythiaOrder
from pythia_jax.data.pipeline import BatchIterator, HostBatchIterator, make_global_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, L = 8, 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    rng = np.random.default_rng(1)
    items = rng.integers(0, 50277, size=(6 * B + 3, L + 1)).astype(np.uint16)
    write_indexed_dataset(d / "doc", items, vocab_size=50277)
    return PythiaOrder(d / "doc", batch_size=B, seq_len=L), items


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"))


def test_make_global_batch_single_device(data, mesh):
    order, items = data
    b = make_global_batch(order, 4, mesh)
    assert set(b) == {"inputs", "targets"}
    for k, sl in (("inputs", slice(0, L)), ("targets", slice(1, L + 1))):
        assert b[k].shape == (B, L) and b[k].dtype == np.int32
        np.testing.assert_array_equal(np.asarray(b[k]), items[4 * B:5 * B, sl].astype(np.int32))
    with pytest.raises(IndexedDatasetIndexError, match="step 6 is past the end"):
        make_global_batch(order, 6, mesh)


def test_batch_iterator_order_and_resume(data, mesh):
    order, items = data
    with BatchIterator(order, 0, mesh, prefetch=2) as it:
        seen = []
        for step, batch in it:
            np.testing.assert_array_equal(np.asarray(batch["targets"]),
                                          items[step * B:(step + 1) * B, 1:])
            seen.append(step)
            if step == 2:
                resume_at = it.next_step
                break
    assert seen == [0, 1, 2] and resume_at == 3
    with BatchIterator(order, resume_at, mesh, end_step=5) as it:
        rest = [(s, np.asarray(b["inputs"])) for s, b in it]
    assert [s for s, _ in rest] == [3, 4]
    for s, x in rest:
        np.testing.assert_array_equal(x, items[s * B:(s + 1) * B, :L])
    assert it.state() == {"step": 5}
    with pytest.raises(IndexError, match="start_step <= end_step <= 6"):
        BatchIterator(order, 7, mesh)


def test_batch_iterator_with_grain_read_threads(data, mesh):
    order, items = data
    with BatchIterator(order, 2, mesh, end_step=6, num_threads=2, prefetch=3) as it:
        got = {s: np.asarray(b["targets"]) for s, b in it}
    assert sorted(got) == [2, 3, 4, 5]
    for s, x in got.items():
        np.testing.assert_array_equal(x, items[s * B:(s + 1) * B, 1:])


def test_host_iterator_never_overwrites_arrays_still_held(data):
    order, items = data
    with HostBatchIterator(order, 0, prefetch=2) as it:
        held = list(it)  # every array stays referenced: none may be reused
    assert [s for s, _ in held] == list(range(6))
    for s, x in held:
        assert x.flags.owndata and x.flags.writeable  # a copy, not a view of the map
        np.testing.assert_array_equal(x, items[s * B:(s + 1) * B])
    views = []
    with HostBatchIterator(order, 1, blocks=[(2, 6)]) as it:
        for s, x in it:
            np.testing.assert_array_equal(x, items[s * B + 2:s * B + 6])
            views.append((s, x[:, :3]))  # a view keeps its base array alive and unreused
    for s, v in views:
        np.testing.assert_array_equal(v, items[s * B + 2:s * B + 6, :3])


def test_batch_iterator_surfaces_bad_items(tmp_path, mesh):
    items = [np.arange(L + 1)] * (3 * B)
    items[2 * B + 5] = np.arange(L)  # step 2, row 5 is short
    write_indexed_dataset(tmp_path / "bad", items, vocab_size=100)
    order = PythiaOrder(tmp_path / "bad", batch_size=B, seq_len=L)
    got = []
    with pytest.raises(IndexedDatasetError, match=r"bad\.bin: item 21 \(step 2, row 5\) has 6 "
                                                  r"tokens, expected seq_len \+ 1 = 7"):
        with BatchIterator(order, 0, mesh) as it:
            for step, _ in it:
                got.append(step)
    assert got == [0, 1]


_MULTI = textwrap.dedent("""
    import itertools, sys
    import numpy as np
    import jax
    from jax.sharding import AxisType, Mesh
    from pythia_jax.data.indexed import write_indexed_dataset
    from pythia_jax.data.order import PythiaOrder, process_rows
    from pythia_jax.data.pipeline import (BatchIterator, batch_sharding, local_row_blocks,
                                          make_global_batch, read_local_rows)

    assert jax.device_count() == 8, jax.devices()
    B, L = 16, 5
    rng = np.random.default_rng(0)
    items = rng.integers(0, 50277, size=(4 * B, L + 1)).astype(np.uint16)
    write_indexed_dataset(sys.argv[1], items, vocab_size=50277)
    order = PythiaOrder(sys.argv[1], batch_size=B, seq_len=L)

    meshes = {
        "explicit": jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor")),
        "auto": jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                              axis_types=(AxisType.Auto,) * 3),
        "data_only": jax.make_mesh((8,), ("data",)),
    }
    for name, mesh in meshes.items():
        b = make_global_batch(order, 2, mesh)
        sh = batch_sharding(mesh)
        for k, sl in (("inputs", slice(0, L)), ("targets", slice(1, L + 1))):
            x = b[k]
            assert x.shape == (B, L) and x.dtype == np.int32, (name, x.shape, x.dtype)
            assert x.sharding.spec == sh.spec, (name, x.sharding)
            np.testing.assert_array_equal(np.asarray(x), items[2 * B:3 * B, sl])
            for shard in x.addressable_shards:  # every device holds exactly its rows
                np.testing.assert_array_equal(np.asarray(shard.data),
                                              items[2 * B:3 * B, sl][shard.index])
        spec = str(sh.spec)
        print(name, spec)

    # Simulated hosts: devices split into P processes in mesh order; each process's rows
    # (computed from the sharding) are process_rows(...) and together partition the batch.
    mesh = meshes["explicit"]
    sh = batch_sharding(mesh)
    devs = list(mesh.devices.flat)
    for P in (1, 2, 4):
        for step in (0, 3):
            parts = []
            for p in range(P):
                blocks = local_row_blocks(sh, B, devs[p * 8 // P:(p + 1) * 8 // P])
                want = process_rows(step, p, P, B)
                assert blocks == [(want.start - step * B, want.stop - step * B)], (P, p, blocks)
                parts.append(read_local_rows(order, step, blocks))
            np.testing.assert_array_equal(np.concatenate(parts), order.batch(step))
    # A mesh whose device order interleaves the processes: process 0 (devices 0-3) holds
    # batch shards 0 and 2, process 1 shards 1 and 3; still an exact partition.
    perm = np.array(devs)[[0, 1, 4, 5, 2, 3, 6, 7]].reshape(2, 2, 2)
    odd = Mesh(perm, ("data", "fsdp", "tensor"))
    sh2 = batch_sharding(odd)
    blocks = [local_row_blocks(sh2, B, devs[p * 4:(p + 1) * 4]) for p in range(2)]
    assert blocks == [[(0, 4), (8, 12)], [(4, 8), (12, 16)]], blocks
    rows = [r for bl in blocks for a, c in bl for r in range(a, c)]
    assert sorted(rows) == list(range(B)) and len(rows) == B
    np.testing.assert_array_equal(read_local_rows(order, 1, blocks[1]),
                                  np.concatenate([order.rows(1, 4, 8), order.rows(1, 12, 16)]))
    # Processes that are replicas (tensor axis across processes) read the same rows.
    rep = Mesh(np.array(devs)[[0, 4, 1, 5, 2, 6, 3, 7]].reshape(2, 2, 2),
               ("data", "fsdp", "tensor"))
    assert [local_row_blocks(batch_sharding(rep), B, devs[p * 4:(p + 1) * 4])
            for p in range(2)] == [[(0, 16)], [(0, 16)]]
    b = make_global_batch(order, 1, odd)
    np.testing.assert_array_equal(np.asarray(b["inputs"]), items[B:2 * B, :L])

    # Resume on a different layout: same global batches from the same step.
    with BatchIterator(order, 1, meshes["explicit"]) as a, \\
            BatchIterator(order, 1, meshes["data_only"]) as c:
        for (sa, ba), (sc, bc) in zip(a, c):
            assert sa == sc
            np.testing.assert_array_equal(np.asarray(ba["inputs"]), np.asarray(bc["inputs"]))
            np.testing.assert_array_equal(np.asarray(ba["targets"]),
                                          items[sa * B:(sa + 1) * B, 1:])
    print("OK", sa)
""")


def test_eight_device_mesh_and_simulated_hosts(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    r = subprocess.run([sys.executable, "-c", _MULTI, str(tmp_path / "doc")], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "explicit P(('data', 'fsdp'), None)" in r.stdout
    assert "data_only P('data', None)" in r.stdout
    assert "OK 3" in r.stdout
