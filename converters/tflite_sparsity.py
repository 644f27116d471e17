"""Decoding TFLite's sparse tensor format (the schema's ``SparsityParameters``) into a dense array.

A sparse tensor of rank n with k block dimensions is stored as a tree of n + k levels. Level ``l`` walks
the expanded dimension ``traversal_order[l]`` (0..n-1 are the original dimensions, measured in blocks when
blocked; n + j is the inside of block dimension ``block_map[j]``). ``dim_metadata[l]`` says how: DENSE
(every coordinate 0..dense_size-1) or SPARSE_CSR (the children of node ``p`` of the previous level are
``array_indices[array_segments[p]:array_segments[p + 1]]``). The stored values are the leaves in
traversal order. This is LiteRT's ``FormatConverter::SparseToDense``, done level by level with numpy
instead of one recursive call per element.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema_fb

from shadownet.exceptions import ModelFormatError


def densify(values: np.ndarray, shape: tuple[int, ...], sparsity: Any) -> np.ndarray:
    """The dense array of ``shape`` that ``values`` (the stored non-zeros) and ``sparsity`` (a
    ``schema_fb.SparsityParametersT``) encode. Raises ``ModelFormatError`` if they are inconsistent."""
    rank = len(shape)
    order = [int(d) for d in _ints(sparsity.traversalOrder)]
    block_map = [int(d) for d in _ints(sparsity.blockMap)]
    levels = sparsity.dimMetadata or []
    if (len(order) != rank + len(block_map) or len(levels) != len(order)
            or sorted(order) != list(range(len(order))) or sorted(order[:rank]) != list(range(rank))
            or any(not 0 <= d < rank for d in block_map)):
        raise ModelFormatError(f"sparse tensor of shape {list(shape)}: inconsistent sparsity parameters "
                               f"(traversal order {order}, block map {block_map}, {len(levels)} levels)")
    block_size = [int(levels[order.index(rank + j)].denseSize) for j in range(len(block_map))]
    blocked = list(shape)
    for j, d in enumerate(block_map):
        if block_size[j] <= 0 or shape[d] % block_size[j]:
            raise ModelFormatError(f"sparse tensor of shape {list(shape)}: block size {block_size[j]} "
                                   f"does not divide dimension {d}")
        blocked[d] = shape[d] // block_size[j]
    level_size = [blocked[d] if d < rank else block_size[d - rank] for d in order]

    positions = np.zeros(1, dtype=np.int64)  # each node's index in its level's storage
    coords: list[np.ndarray] = []  # per level, each node's coordinate along that level's dimension
    for level, meta in enumerate(levels):
        size = level_size[level]
        if meta.format == schema_fb.DimensionType.DENSE:
            if int(meta.denseSize) != size:
                raise ModelFormatError(f"sparse tensor of shape {list(shape)}: level {level} is dense of "
                                       f"size {meta.denseSize}, expected {size}")
            coords = [np.repeat(c, size) for c in coords]
            coords.append(np.tile(np.arange(size, dtype=np.int64), positions.size))
            positions = (positions[:, None] * size + np.arange(size, dtype=np.int64)).reshape(-1)
        else:
            segments = _ints(getattr(meta.arraySegments, "values", None))
            indices = _ints(getattr(meta.arrayIndices, "values", None))
            if positions.size and positions.max() + 1 >= segments.size:
                raise ModelFormatError(f"sparse tensor of shape {list(shape)}: level {level} has "
                                       f"{segments.size} segment bounds for {positions.max() + 1} nodes")
            starts, ends = segments[positions], segments[positions + 1]
            counts = ends - starts
            if (counts < 0).any() or (ends > indices.size).any():
                raise ModelFormatError(f"sparse tensor of shape {list(shape)}: level {level} has "
                                       f"invalid segments")
            first = np.repeat(starts - (np.cumsum(counts) - counts), counts)
            positions = first + np.arange(int(counts.sum()), dtype=np.int64)
            coords = [np.repeat(c, counts) for c in coords]
            coords.append(indices[positions])
            if coords[-1].size and (coords[-1].min() < 0 or coords[-1].max() >= size):
                raise ModelFormatError(f"sparse tensor of shape {list(shape)}: level {level} has an index "
                                       f"outside 0..{size - 1}")
    if positions.size != values.size:
        raise ModelFormatError(f"sparse tensor of shape {list(shape)}: {values.size} stored values for "
                               f"{positions.size} positions")

    index = [np.zeros(positions.size, dtype=np.int64) for _ in range(rank)]
    for level, d in enumerate(order):
        if d < rank:
            index[d] = coords[level]
        else:
            j = d - rank
            index[block_map[j]] = index[block_map[j]] * block_size[j] + coords[level]
    dense = np.zeros(int(np.prod(shape, dtype=np.int64)), dtype=values.dtype)
    if rank:
        dense[np.ravel_multi_index(index, shape)] = values
    else:
        dense[:] = values
    return dense.reshape(shape)


def _ints(values: Any) -> np.ndarray:
    return np.asarray(values if values is not None else [], dtype=np.int64).reshape(-1)
