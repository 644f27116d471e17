"""A test-side encoder of TFLite's sparse tensor format (the inverse of converters.tflite_sparsity)."""

import numpy as np
from ai_edge_litert import schema_py_generated as schema_fb

_VECTORS = {
    "int32": (schema_fb.SparseIndexVector.Int32Vector, schema_fb.Int32VectorT),
    "uint16": (schema_fb.SparseIndexVector.Uint16Vector, schema_fb.Uint16VectorT),
    "uint8": (schema_fb.SparseIndexVector.Uint8Vector, schema_fb.Uint8VectorT),
}


def encode(dense: np.ndarray, order: list[int], block_map: list[int], block_size: list[int],
           formats: list[str], index_type: str = "int32"):
    """(stored values, SparsityParametersT) of ``dense``; formats[l] is "dense" or "csr" for level l."""
    rank = dense.ndim
    # The expanded array: original dims (in blocks) first, then the inside of each block.
    blocked = list(dense.shape)
    for j, d in enumerate(block_map):
        blocked[d] //= block_size[j]
    expanded = np.zeros(blocked + list(block_size), dense.dtype)
    for index in np.ndindex(*expanded.shape):
        original = list(index[:rank])
        for j, d in enumerate(block_map):
            original[d] = original[d] * block_size[j] + index[rank + j]
        expanded[index] = dense[tuple(original)]
    levels = expanded.transpose(order)

    segments: list[list[int]] = [[0] for _ in formats]
    indices: list[list[int]] = [[] for _ in formats]
    values: list = []

    def visit(sub: np.ndarray, level: int) -> None:
        if level == len(formats):
            values.append(sub)
            return
        for i in range(sub.shape[0]):
            if formats[level] == "dense":
                visit(sub[i], level + 1)
            elif np.any(sub[i] != 0):
                indices[level].append(i)
                visit(sub[i], level + 1)
        if formats[level] == "csr":
            segments[level].append(len(indices[level]))

    visit(levels, 0)
    vector_type, vector_class = _VECTORS[index_type]
    metadata = []
    for level, fmt in enumerate(formats):
        meta = schema_fb.DimensionMetadataT()
        meta.denseSize = levels.shape[level]
        if fmt == "csr":
            meta.format = schema_fb.DimensionType.SPARSE_CSR
            meta.arraySegmentsType = meta.arrayIndicesType = vector_type
            meta.arraySegments = vector_class()
            meta.arraySegments.values = segments[level]
            meta.arrayIndices = vector_class()
            meta.arrayIndices.values = indices[level]
        metadata.append(meta)
    sparsity = schema_fb.SparsityParametersT()
    sparsity.traversalOrder, sparsity.blockMap, sparsity.dimMetadata = list(order), list(block_map), metadata
    return np.array(values, dense.dtype), sparsity
