"""Attention as prepared CUDA launches: a one-launch decode kernel for few query tokens; for
prompts over a 16-bit cache, a flash-style kernel on tensor cores (flash_attention.cu); else a
grouped-query online softmax over key batches in f32, key splits merged by a second launch (or
by the last block to finish, ``CupyBackend.attn_merge``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from backends.base import BackendError
from backends.cuda_launch import (
    CTYPE,
    CudaDevice,
    Job,
    dtype_of_array,
    need_contiguous,
    opt_in_smem,
    prepare_launch,
    ptr,
    resident_blocks,
)
from graph.dtypes import f32
from graph.ir import Node
from graph.ops import AttentionParams, Op

LOG2E = 1.4426950408889634  # the flash kernel's softmax is exp2: scale * log2 e folded into Q
ATTN_WARPS = 4
ATTN_DMAX = 256
ATTN_GB = 4  # query heads per block (kernels.cu GB)
ATTN_KEYS = 32  # keys a block takes per pass: ATTN_WARPS x KB


def _attn_rows(n: int, h: int, hk: int) -> int:
    """Blocks along the first grid axis: one per query token, kv head and group of query heads."""
    return n * hk * -(-(h // hk) // ATTN_GB)


def _attn_splits(rows: int, m: int, sm_count: int) -> int:
    """Key splits so that few query rows (decode) still fill the GPU: about 8 blocks per SM."""
    want = max(1, -(-8 * sm_count // max(rows, 1)))
    return max(1, min(want, -(-m // ATTN_KEYS), 1024))  # kernels.cu MAX_SPLITS


DECODE_MAX_TOKENS = 8  # query tokens up to which attention uses the one-launch decode kernel
DECODE_TILE = 64  # kernels.cu DT_KEYS
DECODE_THREADS = 256  # kernels.cu DT_THREADS


def _decode_splits(rows: int, m: int, slots: int) -> tuple[int, int]:
    """(splits, keys per split) for the decode kernel: as many blocks as fit on the GPU at
    once (``slots``; a second wave would double a short kernel's time), at most 32 splits (the
    merge walks them), each a whole number of 64-key tiles."""
    tiles = -(-m // DECODE_TILE)
    splits = max(1, min(slots // max(rows, 1), tiles, 32))
    chunk = -(-tiles // splits) * DECODE_TILE
    return -(-m // chunk) if m else 1, chunk


def decode_variant(h: int, hk: int, d: int, dv: int) -> tuple[int, int]:
    """``k_attn_decode``'s query heads per block (QG) and head-dim bound (DM): the kernel's
    arrays are sized by them, so a 128-dim head that shares its kv head with no other (a
    Llama's) takes the small instance."""
    return min(h // hk, ATTN_GB), 128 if max(d, dv) <= 128 else ATTN_DMAX


def _decode_ok(q: Any, k: Any, v: Any) -> bool:
    n, _, d = q.shape
    dv = v.shape[2]
    dense = all(a.data.ptr % 16 == 0 for a in (k, v))
    return n <= DECODE_MAX_TOKENS and d % 8 == 0 and dv % 8 == 0 and dense


def decode_attention(
    be: CudaDevice, node: Node, out: Any, srcs: Sequence[Any], scratch: Any, merge: str
) -> tuple[Callable[[], None], int] | None:
    """``k_attn_decode`` for few query tokens, and its number of key splits; None if the
    shapes do not suit it. ``merge``: the splits' partials (in ``scratch``, one record of
    ``(max, sum, acc[Dv])`` per query head and split) merged by the last block to finish
    ("last_block") or by a second launch ("kernel")."""
    p: AttentionParams = node.params  # type: ignore[assignment]
    q, k, v, qpos, kpos = srcs
    if not _decode_ok(q, k, v):
        return None
    n, h, d = q.shape
    m, hk, _ = k.shape
    dv = v.shape[2]
    rows = _attn_rows(n, h, hk)
    types = ", ".join(CTYPE[dtype_of_array(a).name] for a in (q, k, v))
    qg, dm = decode_variant(h, hk, d, dv)
    f = be.fn(f"k_attn_decode<{types}, {qg}, {dm}>")
    splits, chunk = _decode_splits(rows, m, resident_blocks(be, f, DECODE_THREADS))
    tickets = be.counters(rows)
    part = ptr(scratch) if splits > 1 else np.uint64(0)
    dargs = (
        *(ptr(a) for a in (q, k, v, qpos, kpos, out)),
        part,
        ptr(tickets),
        *(np.int32(x) for x in (h, hk, m, d, dv)),
        np.float32(p.scale),
        np.int32(p.window),
        np.int32(chunk),
        np.int32(merge == "last_block"),
        np.int32(p.prefix_rows),
    )
    main = prepare_launch(be, f, (rows, splits), (DECODE_THREADS,), dargs)
    if splits == 1 or merge != "kernel":
        return main, splits
    return _then(main, _combine(be, n * h, splits, dv, part, out)), splits


FLASH_HEAD_DIMS = (64, 128, 256)  # flash_attention.cu's DH instances
FLASH_ROWS = 64  # query tokens per block (FA_BQ)
FLASH_WARPS = 4


def _flash_keys(d: int) -> int:
    """Keys per tile (BK): 64, or 32 at head dim 256, which keeps the block's shared memory
    (64 + 2 BK rows of d + 8 16-bit values) at 66 KiB and its accumulators in registers."""
    return 32 if d > 128 else 64


def flash_smem(d: int) -> int:
    return (FLASH_ROWS + 2 * _flash_keys(d)) * (d + 8) * 2


def flash_attention(be: CudaDevice, node: Node, out: Any, srcs: Sequence[Any]) -> Any:
    """``k_flash_attn`` for a prompt over a 16-bit cache (K and V of one type, f16 or bf16,
    one head dim in ``FLASH_HEAD_DIMS``, compute capability 8.0 or later); None otherwise."""
    p: AttentionParams = node.params  # type: ignore[assignment]
    q, k, v, qpos, kpos = srcs
    n, h, d = q.shape
    m, hk, _ = k.shape
    kv = dtype_of_array(k)
    if (
        getattr(be, "prompt_attention", "flash") != "flash"
        or getattr(be, "compute_capability", 0) < 80
    ):
        return None
    if kv.name not in ("f16", "bf16") or dtype_of_array(v) != kv or dtype_of_array(out) != f32:
        return None
    if d not in FLASH_HEAD_DIMS or v.shape[2] != d or any(a.data.ptr % 16 for a in (k, v, out)):
        return None
    smem = flash_smem(d)
    f = be.fn(
        f"k_flash_attn<{CTYPE[dtype_of_array(q).name]}, {CTYPE[kv.name]}, {d}, {_flash_keys(d)}>"
    )
    opt_in_smem(f, smem)
    args = (
        *(ptr(a) for a in (q, k, v, qpos, kpos, out)),
        *(np.int32(x) for x in (n, h, hk, m)),
        np.float32(p.scale * LOG2E),
        np.int32(p.window),
        np.int32(p.prefix_rows),
    )
    return prepare_launch(be, f, (-(-n // FLASH_ROWS), h), (32 * FLASH_WARPS,), args, smem)


def _c_attention(job: Job) -> Callable[[], None]:
    be, node, out, srcs, scratch, fixed = job
    need_contiguous(node, srcs, range(5))
    p: AttentionParams = node.params  # type: ignore[assignment]
    q, k, v, qpos, kpos = srcs
    n, h, d = q.shape
    m, hk, _ = k.shape
    dv = v.shape[2]
    if max(d, dv) > ATTN_DMAX:
        raise BackendError(
            f"ATTENTION {node.label}: head dim {max(d, dv)} > {ATTN_DMAX} is not supported"
        )
    if n * h == 0:
        return lambda: None
    rows = _attn_rows(n, h, hk)
    types = ", ".join(CTYPE[dtype_of_array(a).name] for a in (q, k, v))
    decode = decode_attention(be, node, out, srcs, scratch, be.attn_merge)
    if decode is not None:
        return decode[0]
    flash = flash_attention(be, node, out, srcs)
    if flash is not None:
        return flash
    splits = _attn_splits(rows, m, be.sm_count)
    chunk = -(-m // splits) if m else 1
    f = be.fn(f"k_attention<{types}>")
    part = ptr(scratch) if splits > 1 else np.uint64(0)
    args = (
        ptr(q),
        ptr(k),
        ptr(v),
        ptr(qpos),
        ptr(kpos),
        ptr(out),
        part,
        np.int32(h),
        np.int32(hk),
        np.int32(m),
        np.int32(d),
        np.int32(dv),
        np.float32(p.scale),
        np.int32(p.window),
        np.int32(chunk),
        np.int32(p.prefix_rows),
    )
    main = prepare_launch(be, f, (rows, splits), (32 * ATTN_WARPS,), args)
    if splits == 1:
        return main
    return _then(main, _combine(be, n * h, splits, dv, part, out))


def _combine(be: CudaDevice, heads: int, splits: int, dv: int, part: Any, out: Any) -> Any:
    """The launch that merges the key splits' partials of every query head."""
    args = (part, ptr(out), np.int32(splits), np.int32(dv))
    return prepare_launch(be, be.fn("k_attn_combine"), (heads,), (128,), args)


def _then(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    def both() -> None:
        first()
        second()

    return both


def scratch_bytes(node: Node, srcs: Sequence[Node], sm_count: int) -> int:
    """The key splits' partials, when an attention splits its keys (on ``sm_count`` SMs)."""
    if node.op is not Op.ATTENTION:
        return 0
    n, h, dv = node.shape
    rows, m = _attn_rows(n, h, srcs[1].shape[1]), srcs[1].shape[0]
    most = (2048 // DECODE_THREADS) * sm_count  # the decode kernel's resident blocks, at most
    splits = max(_attn_splits(rows, m, sm_count), _decode_splits(rows, m, most)[0])
    return n * h * splits * (dv + 2) * 4 if splits > 1 else 0


COMPILERS = {Op.ATTENTION: _c_attention}
