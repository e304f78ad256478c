"""What clients send -> what the model was trained on: 28x28 pixels in [0, 1], white digit on black.

The one preprocessing path for the HTTP service, the nightly batch and the serving check. It follows
the recipe that made MNIST itself:

1. grayscale (transparent pixels are composited onto white first);
2. invert when the background is light (the median of the border pixels is above mid-grey), so a
   black-on-white drawing becomes a white-on-black digit; subtract the background level and stretch
   the ink to 0-255;
3. crop to the bounding box of the ink (pixels above 10% of the brightest);
4. scale the box so its longest side is 20 px, keeping the aspect ratio (Lanczos resampling);
5. place it in a 28x28 field so that its centre of mass falls on pixel (14, 14), 0-based row and column
   indices, where MNIST puts it (the test set's mean is 13.99, 14.01; the centre of the field, 13.5, is half
   a pixel up and left of it on both axes).

A 28x28 image with a dark background is already in MNIST format and is used as it is (so the test
set gives exactly the pixels the model was evaluated on). An image whose pixels are all equal has
no digit in it and is refused rather than guessed at.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from mnist_dagster.digits import IMAGE_SIDE as MNIST_SIDE
from mnist_dagster.digits import MASS_CENTRE

DIGIT_BOX = 20  # longest side of the digit after scaling, as in MNIST
MAX_IMAGE_SIDE = 2048  # larger images are refused before they are decoded (decompression bombs)
IMAGE_FORMATS = ("PNG", "JPEG")
INK_LEVEL = 0.1  # fraction of the brightest pixel that counts as ink for the bounding box
_SCALE = np.float32(1 / 255)


class InputError(ValueError):
    """Input the client can fix; `status` is the HTTP status that says what is wrong with it."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def decode_image(data: bytes) -> np.ndarray:
    """PNG or JPEG bytes -> grayscale float32 (H, W) with values 0-255."""

    if not data:
        raise InputError("empty image: send the bytes of a PNG or JPEG file", 400)
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as error:
        raise InputError(
            f"image is far too large ({error}); each side must be 1 to {MAX_IMAGE_SIDE} pixels", 422
        ) from error
    except Exception as error:  # Pillow raises many types for bytes it cannot identify
        raise InputError(f"not a readable PNG or JPEG image ({type(error).__name__})", 400) from error
    width, height = image.size
    if not (1 <= width <= MAX_IMAGE_SIDE and 1 <= height <= MAX_IMAGE_SIDE):
        raise InputError(f"image is {width}x{height} pixels; each side must be 1 to {MAX_IMAGE_SIDE}", 422)
    try:
        return _grayscale(image)
    except Exception as error:  # truncated or corrupt pixel data surfaces only on decode
        raise InputError(f"image data is corrupt or truncated ({type(error).__name__}: {error})", 400) from error


def _grayscale(image) -> np.ndarray:

    if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit PNG: scale 0-65535 to 0-255
        return np.asarray(image, dtype=np.float32) / np.float32(257.0)
    if "A" in image.mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return np.asarray(image if image.mode == "L" else image.convert("L"), dtype=np.float32)


def mnist_format(pixels: np.ndarray) -> np.ndarray:
    """Grayscale (H, W) values 0-255 -> float32 (28, 28) in [0, 1] by the MNIST recipe (module docstring)."""
    if pixels.max() == pixels.min():
        raise InputError("blank image: every pixel has the same value, so there is no digit to classify")
    light = bool(_middle(_border(pixels)) > 127)
    if pixels.shape == (MNIST_SIDE, MNIST_SIDE) and not light:
        return pixels.astype(np.float32) * _SCALE
    ink = (255 - pixels) if light else pixels
    ink = np.clip(ink - _middle(_border(ink)), 0, None)
    peak = float(ink.max())
    if peak <= 0:
        raise InputError("blank image: no pixel stands out from the background")
    ink *= 255 / peak
    return _centre_by_mass(_scale_to_box(_crop_to_ink(ink))) * _SCALE


def prepare_upload(data: bytes) -> np.ndarray:
    """An uploaded PNG or JPEG (any size, either polarity) -> float32 (28, 28) in [0, 1]: the one recipe for
    `POST /predict`, the batch inbox's image files and the serving-path check."""
    return mnist_format(decode_image(data))


def mnist_format_many(images: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) and {index: reason} for the images refused.

    The same rules as `mnist_format`, vectorised for the common case (dark background, used as is);
    only light-background images take the per-image recipe.
    """
    count = len(images)
    flat = images.reshape(count, -1)
    blank = flat.max(axis=1) == flat.min(axis=1)
    border = np.concatenate([images[:, 0, :], images[:, -1, :], images[:, 1:-1, 0], images[:, 1:-1, -1]], axis=1)
    light = np.sort(border, axis=1)[:, border.shape[1] // 2] > 127
    out = images.astype(np.float32).reshape(count, 1, MNIST_SIDE, MNIST_SIDE)
    out *= _SCALE
    rejected = {
        int(i): "blank image: every pixel has the same value, so there is no digit to classify"
        for i in np.flatnonzero(blank)
    }
    for index in np.flatnonzero(light & ~blank).tolist():
        try:
            out[index, 0] = mnist_format(images[index].astype(np.float32))
        except InputError as error:
            rejected[index] = str(error)
    return out, rejected


def _border(pixels: np.ndarray) -> np.ndarray:
    return np.concatenate([pixels[0, :], pixels[-1, :], pixels[1:-1, 0], pixels[1:-1, -1]])


def _middle(values: np.ndarray) -> float:
    """The upper median by `np.partition`: several times cheaper than `np.median`, which matters per request."""
    return float(np.sort(values)[len(values) // 2])


def _crop_to_ink(ink: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero((ink > INK_LEVEL * 255).any(axis=1))
    cols = np.flatnonzero((ink > INK_LEVEL * 255).any(axis=0))
    return ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _scale_to_box(ink: np.ndarray) -> np.ndarray:

    height, width = ink.shape
    scale = DIGIT_BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(ink.astype(np.float32)).resize(size, Image.Resampling.LANCZOS)
    return np.clip(np.asarray(resized, dtype=np.float32), 0, 255)  # Lanczos rings slightly below 0 / above 255


def _centre_by_mass(box: np.ndarray) -> np.ndarray:
    """`box` placed by whole pixels so that its centre of mass (in pixel indices) lands on `MASS_CENTRE`.

    Whole pixels, as MNIST was made: a 28x28 MNIST digit uploaded as it is comes back in place, where
    a sub-pixel shift would blur it. Measuring the mass at pixel centres (index + 0.5) and aiming at the
    field's middle (14.0 in those units, index 13.5) put every upload half a pixel up and left of MNIST's.
    """
    height, width = box.shape
    total = float(box.sum()) or 1.0
    centre_row = float(np.arange(height) @ box.sum(axis=1)) / total
    centre_col = float(np.arange(width) @ box.sum(axis=0)) / total
    top = int(np.clip(round(MASS_CENTRE - centre_row), 0, MNIST_SIDE - height))
    left = int(np.clip(round(MASS_CENTRE - centre_col), 0, MNIST_SIDE - width))
    field = np.zeros((MNIST_SIDE, MNIST_SIDE), np.float32)
    field[top : top + height, left : left + width] = box
    return field


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W) grayscale -> PNG bytes: how the serving check and the tests send real digits."""

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
