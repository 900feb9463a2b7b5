"""TPU compile gate: our kernel's forward and backward compile for TPU v4, v5e, v5p and v6e with
libtpu, deviceless (no TPU), at Pythia shapes (batch 8 x heads x 2048 x head_dim, bf16), inside
`jax.shard_map(..., check_vma=False)` over a mesh of the topology's devices, within VMEM.

This gate FAILS (never skips) when libtpu is missing: install `pythia-jax[tpu]`.
"""

import pytest

from pythia_jax.attention.tpu_compile import (PYTHIA_SHAPES, TOPOLOGIES, VMEM_BUDGET_BYTES,
                                              compile_report, libtpu_error)

B, T = 8, 2048
KERNELS = ("pythia_flash_fwd", "pythia_flash_dq", "pythia_flash_dkv")


@pytest.fixture(scope="module", autouse=True)
def _need_libtpu():
    err = libtpu_error()
    if err:
        pytest.fail(err)


def _check(chip, H, rotary, mesh_shape=(1, 1, 1), batch=B, heads=None):
    heads = heads or PYTHIA_SHAPES[H][1]
    rep = compile_report(chip, "pallas", batch, heads, T, H, rotary=rotary, backward=True,
                         mesh_shape=mesh_shape)
    assert rep.ok, f"{chip} H={H} rotary={rotary}: compile failed: {rep.error}"
    names = sorted(rep.vmem_bytes)
    # Forward + both backward kernels are in the program, each a Mosaic custom call.
    for kname in KERNELS:
        assert any(n.startswith(kname) for n in names), (kname, names)
    for name, used in rep.vmem_bytes.items():
        assert 0 < used <= VMEM_BUDGET_BYTES, (chip, H, rotary, name, used)
    return rep


@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "fused_rotary"])
@pytest.mark.parametrize("H", sorted(PYTHIA_SHAPES))
def test_v5e_forward_and_backward_compile(H, rotary):
    _check("v5e", H, rotary)


@pytest.mark.slow
@pytest.mark.parametrize("chip", ["v4", "v5p", "v6e"])
def test_other_chips_forward_and_backward_compile(chip):
    for H in sorted(PYTHIA_SHAPES):
        for rotary in (False, True):
            _check(chip, H, rotary)


def test_sharded_compile_on_a_2x2_v5e_slice():
    """Batch over data, heads over tensor: each device's kernel sees its local shard."""
    rep = compile_report("v5e:2x2", "pallas", 8, 16, T, 64, rotary=True, backward=True,
                         mesh_shape=(2, 1, 2), keep_hlo=True)
    assert rep.ok, rep.error
    assert "bf16[4,8,2048,64]" in rep.hlo  # local [B/2, N/2, T, H] operands of the kernels
    assert set(TOPOLOGIES) == {"v4", "v5e", "v5p", "v6e"}


def test_oversized_blocks_are_caught_by_the_compiler():
    """The gate can fail: a 4096-row q block at head_dim 256 overflows v5e's 16 MiB scoped VMEM."""
    from pythia_jax.attention.pallas_tpu import BlockSizes
    rep = compile_report("v5e", "pallas", 1, 1, 4096, 256, backward=False,
                         block_sizes=BlockSizes(block_q=4096, block_kv=512, block_kv_compute=512))
    assert not rep.ok and "ScopedVmemOom" in rep.error, rep.error


@pytest.mark.parametrize("H", [64, 80, 128])
def test_packed_qkv_forward_and_backward_compile_on_v5e(H):
    """The packed path (q, k, v read in place from one [B, T, 3*N*H] array; two heads per
    128-lane block at head_dim 64, eight per 640-lane block at 80, each sliced out of it,
    per-head lane slices for the fused rotary; the QKV bias
    added in the kernels) lowers to Mosaic, within VMEM, over a 2-device batch mesh; the
    kernels take the flat array itself."""
    heads = PYTHIA_SHAPES[H][1]
    rep = compile_report("v5e:2x2", "pallas", B, heads, T, H, rotary=True, backward=True,
                         mesh_shape=(2, 1, 1), keep_hlo=True, packed=True)
    assert rep.ok, rep.error
    for kname in KERNELS + ("pythia_flash_di",):  # di = rowsum(o * do): a kernel here
        assert any(n.startswith(kname) for n in rep.vmem_bytes), (kname, rep.vmem_bytes)
    for name, used in rep.vmem_bytes.items():
        assert 0 < used <= VMEM_BUDGET_BYTES, (H, name, used)
    assert f"bf16[{B // 2},{T},{3 * heads * H}]" in rep.hlo  # the local packed operand
    # the gradient is written in place: the dQ kernel aliases the dK/dV kernel's [B, T, 3D]
    # output (no concatenation of dq, dk, dv)
    dq_calls = [line for line in rep.hlo.splitlines()
                if "tpu_custom_call" in line and "pythia_flash_dq" in line]
    assert dq_calls and all("output_to_operand_aliasing" in line for line in dq_calls), dq_calls
    # the QKV bias gradient comes out of the kernels as f32 column sums per block ([B, blocks,
    # 1, D] from dQ, [B, blocks, 2, D] from dK/dV, 512-row blocks; 256-row kv blocks in the
    # dK/dV kernel at head_dim 80, whose 640-lane blocks take the narrower defaults), not from
    # a reduction of the [B, T, 3D] gradient
    D = heads * H
    kv_rows = 256 if H == 80 else 512
    for kname, rows, block in (("pythia_flash_dq", 1, 512), ("pythia_flash_dkv", 2, kv_rows)):
        calls = [line for line in rep.hlo.splitlines()
                 if "tpu_custom_call" in line and f"%{kname}" in line.split("=")[0]]
        assert calls and all(f"f32[{B // 2},{T // block},{rows},{D}]"
                             in line.split("custom-call")[0] for line in calls), (kname, calls)
