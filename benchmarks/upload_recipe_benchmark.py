"""Upload recipe benchmark: does `prepare_upload` give back the MNIST digit that was uploaded, and does the
model read uploads as well as pixels?

    python benchmarks/upload_recipe_benchmark.py [--mnist DIR] [--epochs 3] [--model /tmp/m.onnx] [--digits 1000]
        [--draw-up lanczos|bilinear] [--validation]

Runs everything twice: with the recipe as it was (the centre of mass aimed at pixel 13.5, the middle of the
field) and as it is (`preprocess.MASS_CENTRE`, 14.0: where MNIST puts it).

1. Geometry, on `--digits` real test digits (indices 2000 on: not the serving check's): each digit rendered as
   an upload (`scoring.uploads.render_upload`: 28 px black on white; 280 px in either polarity; the drift
   reference's typical uploads; the serving check's varied ones; `--draw-up`: how the renderer draws a digit
   up, Lanczos as it does now or bilinear as it did) and passed through `prepare_upload`, against the original
   28x28: mean absolute pixel difference (0-1 scale), the centre of mass's offset (rows, columns,
   and its mean length, in pixels), the ink's longest side and total. "Geometry known" undoes the rendering
   exactly (the canvas region the digit was drawn in, resized back to 28 px with Lanczos): what is lost to the
   renderer itself (the drawing-up, JPEG), which no recipe can get back.
2. Accuracy, on one cnn-fast (`TrainingConfig` defaults, `--epochs`, trained through `ml.train.fit` as in
   `drift_benchmark.py`, or read from `--model`): the serving check's comparison (`lifecycle.check.compare_uploads`:
   1,000 digits as uploads vs the same digits' pixels, McNemar's exact one-sided p) on the check digits
   (test 0-999) and on the next 1,000 (test 1000-1999), with `--validation` also on the 5,999 validation
   digits the model was not trained on (six times the digits: differences of a few digits are noise on 1,000),
   with the geometry-known uploads beside them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from drift_benchmark import load_mnist, trained_model  # the sibling benchmark's loaders

from mnist_dagster.lifecycle import check
from mnist_dagster.ml.compare import mcnemar_exact
from mnist_dagster.scoring import preprocess, uploads
from mnist_dagster.scoring.uploads import UploadStyle, render_upload, typical_styles, varied_styles

RECIPES = {"before (centre 13.5)": 13.5, "after (centre 14.0)": preprocess.MASS_CENTRE}
GEOMETRY_FIRST = 2000  # geometry is measured on test digits from here: not the accuracy blocks' 0-1999


def styles_for(count: int) -> dict[str, list[UploadStyle]]:
    return {
        "28 px, black on white": [UploadStyle(28, True)] * count,
        "280 px, white on black": [UploadStyle(280, False)] * count,
        "280 px, black on white": [UploadStyle(280, True)] * count,
        "typical (drift reference)": typical_styles(count, 1),
        "varied (serving check)": varied_styles(count, check.UPLOAD_SEED),
    }


def centre_of_mass(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) -> (N, 2): row and column of each image's centre of mass, in 0-based pixel indices."""
    index = np.arange(images.shape[1], dtype=np.float64)
    total = images.sum(axis=(1, 2))
    return np.stack([images.sum(axis=2) @ index / total, images.sum(axis=1) @ index / total], axis=1)


def longest_side(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) -> (N,): the longest side of each image's bounding box of ink (pixels above 10% of the
    brightest, the recipe's `INK_LEVEL`: MNIST's own are 20 px either way, and resampling leaves faint rings)."""
    ink = images > preprocess.INK_LEVEL * images.max(axis=(1, 2), keepdims=True)
    rows, cols = ink.any(axis=2), ink.any(axis=1)
    side = images.shape[1]
    height = side - rows.argmax(axis=1) - rows[:, ::-1].argmax(axis=1)
    width = side - cols.argmax(axis=1) - cols[:, ::-1].argmax(axis=1)
    return np.maximum(height, width)


def through_recipe(files: list[bytes]) -> np.ndarray:
    return np.stack([preprocess.prepare_upload(data) for data in files])


def geometry_known(files: list[bytes], styles: list[UploadStyle]) -> np.ndarray:
    """Each upload's rendering undone exactly: the canvas region the digit was drawn in (as `render_upload`
    places it), inverted back if light, resized to 28 px with Lanczos; float32 (N, 28, 28) in [0, 1]."""
    out = []
    for data, style in zip(files, styles, strict=True):
        canvas = preprocess.decode_image(data)
        inner = max(8, round(style.side * style.digit_share))
        room = style.side - inner
        top, left = round(room * style.position[0]), round(room * style.position[1])
        region = canvas[top : top + inner, left : left + inner]
        region = 255 - region if style.light_background else region
        resized = Image.fromarray(region.astype(np.float32)).resize((28, 28), Image.Resampling.LANCZOS)
        out.append(np.clip(np.asarray(resized, np.float32), 0, 255) / 255)
    return np.stack(out)


def geometry_row(name: str, original: np.ndarray, returned: np.ndarray) -> str:
    offset = centre_of_mass(returned) - centre_of_mass(original)
    return (
        f"| {name} | {np.abs(returned - original).mean():.4f} | {offset[:, 0].mean():+.2f} | {offset[:, 1].mean():+.2f} "
        f"| {np.hypot(offset[:, 0], offset[:, 1]).mean():.2f} | {longest_side(returned).mean():.2f} "
        f"| {returned.sum() / original.sum():.3f} |"
    )


def measure_geometry(digits: np.ndarray) -> None:
    original = digits.astype(np.float32) / 255
    print(f"\n## Geometry: {len(digits)} test digits ({GEOMETRY_FIRST}-{GEOMETRY_FIRST + len(digits) - 1}), "
          f"the original's mean longest side {longest_side(original).mean():.2f} px\n")  # fmt: skip
    print(
        "| upload | mean abs pixel difference | centre offset, rows | columns | mean length (px) | longest side | ink ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for style_name, styles in styles_for(len(digits)).items():
        files = [render_upload(digit, style) for digit, style in zip(digits, styles, strict=True)]
        for recipe, centre in RECIPES.items():
            preprocess.MASS_CENTRE = centre
            print(geometry_row(f"{style_name}, {recipe}", original, through_recipe(files)))
        print(geometry_row(f"{style_name}, geometry known", original, geometry_known(files, styles)))
    preprocess.MASS_CENTRE = RECIPES["after (centre 14.0)"]


def measure_accuracy(model, blocks: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Per block of (uint8 digits, labels): the check's comparison with each recipe, and the geometry known."""
    print("\n## Accuracy: uploads (the serving check's varied styles) vs the same digits' pixels\n")
    print("| digits | recipe | pixels | uploads | gap (points) | pixels alone right | uploads alone right "
          "| one-sided McNemar p | the check |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (digits, truth) in blocks.items():
        for recipe, centre in RECIPES.items():
            preprocess.MASS_CENTRE = centre
            result = check.compare_uploads(model, digits, truth, count=len(digits))
            verdict = "refuses" if result.refused else "passes"
            print(f"| {name} | {recipe} | {result.pixel_accuracy:.2%} | {result.upload_accuracy:.2%} "
                  f"| {100 * result.gap:+.2f} | {result.pixels_only_right} | {result.uploads_only_right} "
                  f"| {result.p_value:.3g} | {verdict} |")  # fmt: skip
        styles = varied_styles(len(digits), check.UPLOAD_SEED)
        known = geometry_known([render_upload(d, s) for d, s in zip(digits, styles, strict=True)], styles)
        pixels = model.predict_proba(digits.reshape(-1, 1, 28, 28).astype(np.float32) / 255).argmax(axis=1)
        paired = mcnemar_exact(truth, model.predict_proba(known.reshape(-1, 1, 28, 28)).argmax(axis=1), pixels)
        gap = paired.production_accuracy - paired.candidate_accuracy
        print(f"| {name} | geometry known | {paired.production_accuracy:.2%} | {paired.candidate_accuracy:.2%} "
              f"| {100 * gap:+.2f} | {paired.production_only} | {paired.candidate_only} | {paired.p_value:.3g} | - |")  # fmt: skip
    preprocess.MASS_CENTRE = RECIPES["after (centre 14.0)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mnist", type=Path, default=Path("/work/shared/data/mnist"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--model", type=Path, default=Path(tempfile.gettempdir()) / "upload-benchmark-cnn-fast.onnx")
    parser.add_argument("--digits", type=int, default=1000, help="test digits for the geometry measurement")
    parser.add_argument(
        "--draw-up",
        choices=["lanczos", "bilinear"],
        default="lanczos",
        help="how uploads are drawn up (uploads.DRAW_UP)",
    )
    parser.add_argument("--validation", action="store_true", help="also the whole validation split (6k digits)")
    args = parser.parse_args()
    uploads.DRAW_UP = Image.Resampling[args.draw_up.upper()]
    print(f"uploads drawn up with {args.draw_up}")

    import torch

    torch.set_num_threads(1)
    raw = load_mnist(args.mnist)
    test, test_labels = raw["test_images"], raw["test_labels"].astype(np.int64)
    measure_geometry(test[GEOMETRY_FIRST : GEOMETRY_FIRST + args.digits])
    model, validation, validation_labels = trained_model(raw, args.epochs, args.model)
    size = check.UPLOAD_CHECK_IMAGES
    blocks = {
        f"test 0-{size - 1} (the check's)": (test[:size], test_labels[:size]),
        f"test {size}-{2 * size - 1}": (test[size : 2 * size], test_labels[size : 2 * size]),
    }
    if args.validation:
        blocks[f"validation ({len(validation_labels):,})"] = (validation, validation_labels)
    measure_accuracy(model, blocks)


if __name__ == "__main__":
    main()
