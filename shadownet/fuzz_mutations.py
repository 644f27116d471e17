"""The mutations of ``shadownet.fuzz``: byte level (bit flips, overwrites, truncations, splices, insertions,
deletions), structure aware (flatbuffer lengths, offsets, scalars and index vectors found by
``flatbuffer_structure``; a container's header fields) and JSON (``mutate_json``). Each takes the
``numpy`` generator that makes a case reproducible from its seed and index."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_U32 = (0, 1, 0x7F, 0xFF, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


# --------------------------------------------------------------------------------------------- mutations

@dataclass
class Structure:
    """Positions in a flatbuffer, found by reading it: ``lengths`` of vectors and strings, ``offsets``
    (uoffsets to tables, vectors, strings), ``scalars`` (position, byte width) of table fields and
    ``elements`` (position, byte width) of scalar vectors (shapes, tensor indices, ...)."""

    lengths: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    scalars: list[tuple[int, int]] = field(default_factory=list)
    elements: list[tuple[int, int]] = field(default_factory=list)


def flatbuffer_structure(data: bytes) -> Structure:
    """Read a ``.tflite`` with the schema's object API through an instrumented ``flatbuffers`` table and
    record where its lengths, offsets and scalars are (big constant buffers' bytes are skipped)."""
    from ai_edge_litert.tools import flatbuffer_utils
    from flatbuffers import encode, table
    from flatbuffers import number_types as N

    found = Structure()
    original = {k: getattr(table.Table, k) for k in ("String", "VectorLen", "Indirect", "Get",
                                                     "GetVectorAsNumpy", "Union")}

    def string(self: Any, off: int) -> bytes:
        found.offsets.append(off)
        found.lengths.append(off + encode.Get(N.UOffsetTFlags.packer_type, self.Bytes, off))
        return original["String"](self, off)

    def vector_len(self: Any, off: int) -> int:
        at = off + self.Pos
        found.offsets.append(at)
        found.lengths.append(at + encode.Get(N.UOffsetTFlags.packer_type, self.Bytes, at))
        return original["VectorLen"](self, off)

    def indirect(self: Any, off: int) -> int:
        found.offsets.append(off)
        return original["Indirect"](self, off)

    def get(self: Any, flags: Any, off: int) -> Any:  # table fields, vtable entries, vtable offsets
        found.scalars.append((off, flags.bytewidth))
        return original["Get"](self, flags, off)

    def as_numpy(self: Any, flags: Any, off: int) -> Any:
        result = original["GetVectorAsNumpy"](self, flags, off)
        if flags.bytewidth > 1 and len(result) <= 64:  # index and shape vectors, not weights
            start = self.Vector(off)
            found.elements.extend((start + i * flags.bytewidth, flags.bytewidth) for i in range(len(result)))
        return result

    def union(self: Any, t2: Any, off: int) -> None:
        found.offsets.append(off + self.Pos)
        original["Union"](self, t2, off)

    replaced = {"String": string, "VectorLen": vector_len, "Indirect": indirect, "Get": get,
                "GetVectorAsNumpy": as_numpy, "Union": union}
    try:
        for k, v in replaced.items():
            setattr(table.Table, k, v)
        flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
    finally:
        for k, v in original.items():
            setattr(table.Table, k, v)
    found.lengths = sorted(set(found.lengths))
    found.offsets = sorted(set(found.offsets))
    found.scalars = sorted(set(found.scalars))
    found.elements = sorted(set(found.elements))
    return found


def _put(data: bytearray, at: int, width: int, value: int) -> None:
    if 0 <= at and at + width <= len(data):
        data[at:at + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")


def _extreme(rng: np.random.Generator, width: int, old: int) -> int:
    choices = [0, 1, -1, old + 1, old - 1, old * 2 + 1, (1 << (8 * width - 1)) - 1, 1 << (8 * width - 1),
               int(rng.integers(0, 1 << min(8 * width, 62)))]
    return int(choices[int(rng.integers(len(choices)))])


def mutate_bytes(data: bytes, rng: np.random.Generator, others: list[bytes] = (),
                 structure: Structure | None = None, header: list[tuple[int, int]] = ()) -> tuple[bytes, str]:
    """One random mutation of ``data``; returns the bytes and a description. ``others``: files to splice
    with; ``structure``: flatbuffer positions; ``header``: (position, width) of a container's fields."""
    kinds = ["bitflip", "overwrite", "truncate", "splice", "insert", "delete"]
    if structure is not None:
        kinds += ["length", "length", "offset", "scalar", "element", "element"]
    if header:
        kinds += ["header", "header"]
    kind = kinds[int(rng.integers(len(kinds)))]
    out = bytearray(data)
    n = len(out)

    def pos(limit: int = n) -> int:
        # Half the time near the start, where headers and tables are.
        if rng.random() < 0.5:
            return int(rng.integers(0, max(1, min(limit, 256))))
        return int(rng.integers(0, max(1, limit)))

    if kind == "bitflip":
        flips = [(pos(), int(rng.integers(8))) for _ in range(int(rng.integers(1, 9)))]
        for p, bit in flips:
            if p < n:
                out[p] ^= 1 << bit
        return bytes(out), f"bitflip {flips}"
    if kind == "overwrite":
        p, k = pos(), int(rng.integers(1, 17))
        fill = [bytes(k), b"\xff" * k, bytes(rng.integers(0, 256, k, dtype=np.uint8))][int(rng.integers(3))]
        out[p:p + k] = fill[:max(0, min(k, n - p))]
        return bytes(out), f"overwrite {k} bytes at {p} with {fill[:8].hex()}"
    if kind == "truncate":
        cut = int(rng.choice([pos(), n - int(rng.integers(1, min(n, 64) + 1)), int(rng.integers(0, 9))]))
        return bytes(out[:max(0, cut)]), f"truncate to {max(0, cut)} of {n} bytes"
    if kind == "splice" and others:
        other = others[int(rng.integers(len(others)))]
        i, j = pos(), int(rng.integers(0, max(1, len(other))))
        return bytes(out[:i]) + other[j:], f"splice [:{i}] + other[{j}:]"
    if kind == "insert" or kind == "splice":
        p, k = pos(), int(rng.integers(1, 65))
        return bytes(out[:p]) + bytes(rng.integers(0, 256, k, dtype=np.uint8)) + bytes(out[p:]), \
            f"insert {k} bytes at {p}"
    if kind == "delete":
        p, k = pos(), int(rng.integers(1, 65))
        return bytes(out[:p]) + bytes(out[p + k:]), f"delete {k} bytes at {p}"
    if kind == "header":
        at, width = header[int(rng.integers(len(header)))]
        old = int.from_bytes(out[at:at + width], "little") if at + width <= n else 0
        value = _extreme(rng, width, old)
        _put(out, at, width, value)
        return bytes(out), f"header field at {at} ({width} bytes) {old} -> {value}"
    assert structure is not None
    if kind == "length" and structure.lengths:
        at = structure.lengths[int(rng.integers(len(structure.lengths)))]
        old = int.from_bytes(out[at:at + 4], "little")
        value = int(rng.choice([old + 1, old * 2 + 1, old + 1000, *_U32[5:]]))
        _put(out, at, 4, value)
        return bytes(out), f"vector length at {at}: {old} -> {value}"
    if kind == "offset" and structure.offsets:
        at = structure.offsets[int(rng.integers(len(structure.offsets)))]
        old = int.from_bytes(out[at:at + 4], "little")
        value = int(rng.choice([0, 4, old + 4, old - 4, n - at, n, *_U32[7:]]))
        _put(out, at, 4, value)
        return bytes(out), f"offset at {at}: {old} -> {value}"
    if kind == "scalar" and structure.scalars:
        at, width = structure.scalars[int(rng.integers(len(structure.scalars)))]
        old = int.from_bytes(out[at:at + width], "little")
        value = _extreme(rng, width, old)
        _put(out, at, width, value)
        return bytes(out), f"scalar at {at} ({width} bytes): {old} -> {value}"
    if kind == "element" and structure.elements:
        at, width = structure.elements[int(rng.integers(len(structure.elements)))]
        old = int.from_bytes(out[at:at + width], "little", signed=True)
        value = _extreme(rng, width, old)
        _put(out, at, width, value)
        return bytes(out), f"vector element at {at} ({width} bytes): {old} -> {value}"
    return mutate_bytes(data, rng, others, None, header)  # the structure had nothing of that kind


_CONFUSED = [None, True, False, 0, -1, 1, 1.5, -0.0, 2 ** 31, 2 ** 63, 10 ** 30, -(2 ** 63), "", "x",
             "float64", "../x", [], [0], [-1, 2 ** 40], {}, {"a": 1}, float("nan"), float("inf")]


def _paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def mutate_json(doc: Any, rng: np.random.Generator) -> tuple[Any, str]:
    """One random structural mutation of a JSON document: type confusion, a deleted or unknown key, a
    numeric tweak, a list element dropped, duplicated or swapped, a string changed."""
    doc = copy.deepcopy(doc)
    paths = [p for p in _paths(doc) if p]
    path = paths[int(rng.integers(len(paths)))]
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    old = parent[key]
    where = "/".join(map(str, path))
    choice = int(rng.integers(8))
    if choice == 0 or (choice == 1 and not isinstance(old, int | float)):
        new = _CONFUSED[int(rng.integers(len(_CONFUSED)))]
        parent[key] = new
        return doc, f"{where}: {old!r:.40} -> {new!r}"
    if choice == 1:
        new = old + int(rng.choice([1, -1, 4, 64, -64, 4096])) if not isinstance(old, bool) else not old
        if isinstance(old, int) and not isinstance(old, bool) and rng.random() < 0.3:
            new = old * 2
        parent[key] = new
        return doc, f"{where}: {old!r} -> {new!r}"
    if choice == 2:
        if isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)
        return doc, f"{where}: deleted"
    if choice == 3 and isinstance(parent, dict):
        parent[f"unknown_{int(rng.integers(100))}"] = _CONFUSED[int(rng.integers(len(_CONFUSED)))]
        return doc, f"{'/'.join(map(str, path[:-1]))}: unknown key added"
    if choice == 4 and isinstance(old, list) and old:
        i = int(rng.integers(len(old)))
        old.insert(i, copy.deepcopy(old[i]))
        return doc, f"{where}[{i}]: duplicated"
    if choice == 5 and isinstance(old, list) and len(old) > 1:
        i, j = (int(v) for v in rng.choice(len(old), 2, replace=False))
        old[i], old[j] = old[j], old[i]
        return doc, f"{where}: items {i} and {j} swapped"
    if choice == 6 and isinstance(old, str):
        new = old[:-1] + chr(ord(old[-1]) ^ 1) if old else "x"
        parent[key] = new
        return doc, f"{where}: {old!r:.40} -> {new!r:.40}"
    new = _CONFUSED[int(rng.integers(len(_CONFUSED)))]
    parent[key] = new
    return doc, f"{where}: {old!r:.40} -> {new!r}"
