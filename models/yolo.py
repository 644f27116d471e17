"""Decode YOLOv4-tiny's two raw heads into boxes, with non-maximum suppression. NumPy only.

A head of grid G has shape (1, G, G, 3 * (5 + classes)); per cell and anchor the channels are
(tx, ty, tw, th, objectness, class logits...). As darknet's ``[yolo]`` layer with ``scale_x_y=1.05``::

    cx = (sigmoid(tx) * 1.05 - 0.025 + col) / G * input_size      (same for cy with ty, row)
    w  = exp(tw) * anchor_w,  h = exp(th) * anchor_h                (anchors in input pixels)
    score(class) = sigmoid(objectness) * sigmoid(class logit)

Boxes are rows ``(x1, y1, x2, y2, score, class)`` in input pixels, float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# yolov4-tiny.cfg: anchors for a 416x416 input; the 13x13 head uses 3,4,5, the 26x26 head 1,2,3.
ANCHORS = np.array([[10, 14], [23, 27], [37, 58], [81, 82], [135, 169], [344, 319]], np.float32)
ANCHOR_MASKS: dict[int, tuple[int, int, int]] = {13: (3, 4, 5), 26: (1, 2, 3)}
SCALE_XY = 1.05
INPUT_SIZE = 416


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


def decode_boxes(
    heads: Sequence[np.ndarray],
    *,
    input_size: int = INPUT_SIZE,
    anchors: np.ndarray = ANCHORS,
    anchor_masks: dict[int, tuple[int, ...]] | None = None,
    scale_xy: float = SCALE_XY,
    score_threshold: float = 0.25,
) -> np.ndarray:
    """Every (box, class) whose score reaches ``score_threshold``, as an (K, 6) float32 array.

    ``heads`` may come in any order (a TFLite model's outputs need not follow the Keras order):
    each is matched to its anchors by its grid size through ``anchor_masks`` (default: a grid of
    ``input_size / 32`` uses anchors 3-5, one of ``input_size / 16`` anchors 1-3).
    """
    if anchor_masks is None:
        anchor_masks = {input_size // 32: ANCHOR_MASKS[13], input_size // 16: ANCHOR_MASKS[26]}
    found = []
    for head in heads:
        head = np.asarray(head, np.float32)
        if head.ndim == 4:
            if head.shape[0] != 1:
                raise ValueError(f"decode_boxes takes batch size 1, got a head of shape {head.shape}")
            head = head[0]
        grid_h, grid_w, channels = head.shape
        if grid_h not in anchor_masks:
            raise ValueError(f"no anchors for a {grid_h}x{grid_w} head (known grids: {sorted(anchor_masks)})")
        mask = anchor_masks[grid_h]
        per_anchor = channels // len(mask)
        if per_anchor * len(mask) != channels or per_anchor < 6:
            raise ValueError(f"a head with {channels} channels does not hold {len(mask)} anchors")
        head = head.reshape(grid_h, grid_w, len(mask), per_anchor)
        rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
        offset = (scale_xy - 1.0) / 2.0
        cx = (_sigmoid(head[..., 0]) * scale_xy - offset + cols[..., None]) / grid_w * input_size
        cy = (_sigmoid(head[..., 1]) * scale_xy - offset + rows[..., None]) / grid_h * input_size
        size = anchors[list(mask)]
        w = np.exp(np.minimum(head[..., 2], 20.0)) * size[:, 0]
        h = np.exp(np.minimum(head[..., 3], 20.0)) * size[:, 1]
        scores = _sigmoid(head[..., 4:5]) * _sigmoid(head[..., 5:])
        cell, klass = np.nonzero(scores.reshape(-1, per_anchor - 5) >= score_threshold)
        if cell.size == 0:
            continue
        cx, cy, w, h = (v.reshape(-1)[cell] for v in (cx, cy, w, h))
        score = scores.reshape(-1, per_anchor - 5)[cell, klass]
        found.append(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, score, klass], axis=1))
    if not found:
        return np.zeros((0, 6), np.float32)
    return np.concatenate(found).astype(np.float32)


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one (x1, y1, x2, y2, ...) row with each row of ``boxes``."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def non_max_suppression(
    boxes: np.ndarray, *, iou_threshold: float = 0.45, max_boxes: int = 100
) -> np.ndarray:
    """Greedy per-class NMS: keep the best-scoring box, drop same-class boxes overlapping it more
    than ``iou_threshold``, repeat. Returns the kept rows by decreasing score."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 6)
    order = np.argsort(-boxes[:, 4], kind="stable")
    remaining = boxes[order]
    kept = []
    while len(remaining) and len(kept) < max_boxes:
        best = remaining[0]
        kept.append(best)
        rest = remaining[1:]
        suppress = (rest[:, 5] == best[5]) & (iou(best, rest) > iou_threshold)
        remaining = rest[~suppress]
    return np.stack(kept) if kept else np.zeros((0, 6), np.float32)


def detect(
    heads: Sequence[np.ndarray],
    *,
    score_threshold: float = 0.25,
    iou_threshold: float = 0.45,
    max_boxes: int = 100,
    input_size: int = INPUT_SIZE,
) -> np.ndarray:
    """``decode_boxes`` then ``non_max_suppression``: the detections of one image, (K, 6) float32."""
    boxes = decode_boxes(heads, input_size=input_size, score_threshold=score_threshold)
    return non_max_suppression(boxes, iou_threshold=iou_threshold, max_boxes=max_boxes)
