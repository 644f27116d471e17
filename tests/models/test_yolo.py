import numpy as np
import pytest

from models.yolo import ANCHORS, decode_boxes, detect, iou, non_max_suppression

CLASSES = 80
PER_ANCHOR = 5 + CLASSES


def empty_heads() -> dict[int, np.ndarray]:
    """Heads in which nothing is detected: objectness and class logits very negative."""
    heads = {}
    for grid in (13, 26):
        head = np.zeros((1, grid, grid, 3, PER_ANCHOR), np.float32)
        head[..., 4:] = -12.0
        heads[grid] = head
    return heads


def plant(heads, grid, row, col, anchor, klass, objectness=6.0, tw=0.0, th=0.0):
    cell = heads[grid][0, row, col, anchor]
    cell[0:4] = (0.0, 0.0, tw, th)
    cell[4] = objectness
    cell[5 + klass] = 6.0


def flat(heads):
    return [h.reshape(1, h.shape[1], h.shape[2], 3 * PER_ANCHOR) for h in heads.values()]


def test_a_planted_box_comes_back():
    heads = empty_heads()
    # Row 4, column 6 of the 13x13 grid, its second anchor (anchor 4 of yolov4-tiny: 135x169), class 17.
    plant(heads, 13, row=4, col=6, anchor=1, klass=17)
    boxes = detect(flat(heads))
    assert boxes.shape == (1, 6)
    cx, cy = (0.5 + 6) / 13 * 416, (0.5 + 4) / 13 * 416
    w, h = ANCHORS[4]
    np.testing.assert_allclose(boxes[0, :4], [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], rtol=1e-5)
    assert boxes[0, 4] == pytest.approx((1 / (1 + np.exp(-6.0))) ** 2, rel=1e-5)
    assert boxes[0, 5] == 17


def test_nms_drops_a_weaker_duplicate_but_keeps_other_classes_and_distant_boxes():
    heads = empty_heads()
    # The same object seen by both heads (26x26 cell (9, 13), anchor 3 = 81x82, with tw/th scaling it to
    # the 13x13 box below), a weaker duplicate that NMS must drop.
    plant(heads, 13, row=4, col=6, anchor=0, klass=2, objectness=8.0)         # anchor 3, 81x82
    plant(heads, 26, row=9, col=13, anchor=2, klass=2, objectness=3.0)        # anchor 3 again
    plant(heads, 26, row=9, col=13, anchor=1, klass=5, objectness=3.0)        # other class, same place
    plant(heads, 26, row=22, col=2, anchor=0, klass=2, objectness=3.0)        # same class, far away
    decoded = decode_boxes(flat(heads))
    assert len(decoded) == 4
    kept = detect(flat(heads))
    assert len(kept) == 3
    assert kept[0, 5] == 2 and kept[0, 4] == decoded[:, 4].max()
    assert sorted(kept[:, 5].tolist()) == [2, 2, 5]


def test_heads_are_matched_to_anchors_by_grid_not_order():
    heads = empty_heads()
    plant(heads, 26, row=3, col=20, anchor=0, klass=0)
    forward, backward = detect(flat(heads)), detect(flat(heads)[::-1])
    np.testing.assert_array_equal(forward, backward)
    w, h = ANCHORS[1]
    np.testing.assert_allclose(forward[0, 2] - forward[0, 0], w, rtol=1e-5)
    np.testing.assert_allclose(forward[0, 3] - forward[0, 1], h, rtol=1e-5)


def test_nothing_detected_gives_an_empty_array():
    boxes = detect(flat(empty_heads()))
    assert boxes.shape == (0, 6)
    assert boxes.dtype == np.float32


def test_iou_and_nms_on_plain_boxes():
    boxes = np.array(
        [[0, 0, 10, 10, 0.9, 1], [1, 1, 11, 11, 0.8, 1], [20, 20, 30, 30, 0.7, 1], [0, 0, 10, 10, 0.6, 3]],
        np.float32,
    )
    np.testing.assert_allclose(iou(boxes[0], boxes[:3]), [1.0, 81 / 119, 0.0], rtol=1e-6)
    kept = non_max_suppression(boxes)
    np.testing.assert_array_equal(kept[:, 4], np.array([0.9, 0.7, 0.6], np.float32))
    assert len(non_max_suppression(boxes, max_boxes=1)) == 1


def test_a_head_of_unknown_grid_is_refused():
    with pytest.raises(ValueError, match="no anchors"):
        decode_boxes([np.zeros((1, 7, 7, 255), np.float32)])
