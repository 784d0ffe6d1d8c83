"""care-publish's `preview` cells: a small windowed RGB PNG of each slice, the label tinted, nothing but pixels."""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

from care_dataset.publish.preview import CLASS_COLOURS, PREVIEW_MAX_SIDE, TINT, preview_png


def decoded(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return np.asarray(image)


def png_chunks(png: bytes) -> list[bytes]:
    """The chunk types of a PNG file, in order."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(png):
        length, kind = struct.unpack(">I4s", png[at:at + 8])
        chunks.append(kind)
        at += 12 + length
    return chunks


def test_soft_tissue_window_and_class_tints_at_full_size():
    image = np.array([[-1000, -160, 40], [240, 3000, 40]], dtype=np.int16)
    label = np.array([[0, 0, 1], [0, 0, 2]], dtype=np.uint8)
    pixels = decoded(preview_png(image, label))
    assert pixels.shape == (2, 3, 3)
    np.testing.assert_array_equal(pixels[0, :2], [[0, 0, 0], [0, 0, 0]])  # air and the window's lower edge: black
    np.testing.assert_array_equal(pixels[1, :2], [[255, 255, 255], [255, 255, 255]])  # window top and above: white
    grey = 127.5  # 40 HU, the window's centre
    for (row, col), value in (((0, 2), 1), ((1, 2), 2)):
        want = np.rint((1 - TINT) * grey + TINT * np.asarray(CLASS_COLOURS[value - 1]))
        np.testing.assert_array_equal(pixels[row, col], want)


def test_large_slices_shrink_by_a_whole_factor_and_keep_small_structures():
    image = np.full((300, 200), 40, dtype=np.int16)
    label = np.zeros((300, 200), dtype=np.uint8)
    label[150, 199] = 2  # one tumor pixel in the padded last column of blocks
    pixels = decoded(preview_png(image, label))
    assert pixels.shape == (100, 67, 3) and max(pixels.shape[:2]) <= PREVIEW_MAX_SIDE
    tinted = np.argwhere((pixels != pixels[..., :1]).any(axis=2))
    assert tinted.tolist() == [[50, 66]]  # block maximum: the pixel's block shows the tumor
    assert len(np.unique(pixels[..., 1])) == 2  # the rest one grey


def test_png_holds_only_pixels_and_is_the_same_every_time():
    rng = np.random.default_rng(0)
    image = rng.normal(40, 80, (512, 512)).astype(np.int16)
    label = (rng.random((512, 512)) > 0.95).astype(np.uint8)
    png = preview_png(image, label)
    assert png == preview_png(image.copy(), label.copy())
    chunks = png_chunks(png)  # no text, time or other metadata chunk
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND" and set(chunks) == {b"IHDR", b"IDAT", b"IEND"}
    assert decoded(png).shape == (128, 128, 3)
