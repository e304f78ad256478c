"""Small PNG figures for the Dagster UI and MLflow: training curves, confusion matrix, digit grids.

Each function returns PNG bytes, kept well under 100 KB so they embed in metadata.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # no display: render straight to PNG
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

DPI = 80


def _png(figure) -> bytes:
    """Render, then quantise to a 64-colour palette: a third of the size, no visible loss for plots."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    buffer.seek(0)
    small = io.BytesIO()
    Image.open(buffer).convert("RGB").quantize(colors=64).save(small, format="PNG", optimize=True)
    return small.getvalue()


def training_curve_png(train_loss: Sequence[float], val_accuracy: Sequence[float]) -> bytes:
    epochs = range(1, len(train_loss) + 1)
    figure, loss_axis = plt.subplots(figsize=(5, 3))
    loss_axis.plot(epochs, train_loss, "o-", color="tab:blue", label="train loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("train loss", color="tab:blue")
    accuracy_axis = loss_axis.twinx()
    accuracy_axis.plot(epochs, [100 * a for a in val_accuracy], "s-", color="tab:green", label="val accuracy")
    accuracy_axis.set_ylabel("validation accuracy (%)", color="tab:green")
    loss_axis.set_xticks(list(epochs))
    loss_axis.set_title("Training curve")
    return _png(figure)


def confusion_matrix_png(confusion: torch.Tensor) -> bytes:
    figure, axis = plt.subplots(figsize=(5, 4.5))
    image = axis.imshow(confusion.log1p().numpy(), cmap="Blues")
    threshold = confusion.log1p().max().item() / 2
    for true in range(confusion.shape[0]):
        for predicted in range(confusion.shape[1]):
            count = int(confusion[true, predicted])
            colour = "white" if confusion[true, predicted].log1p() > threshold else "black"
            axis.text(predicted, true, str(count), ha="center", va="center", fontsize=7, color=colour)
    axis.set_xticks(range(10))
    axis.set_yticks(range(10))
    axis.set_xlabel("predicted digit")
    axis.set_ylabel("true digit")
    axis.set_title("Confusion matrix (test set)")
    figure.colorbar(image, ax=axis, fraction=0.046, label="log(1 + count)")
    return _png(figure)


def digit_grid_png(
    images: torch.Tensor | np.ndarray, captions: Sequence[str], columns: int = 8, scale: int = 2
) -> bytes:
    """Up to a few dozen 28x28 images (any scale; a tensor or a numpy array) with a caption under each, dark
    ink on white.

    Drawn with numpy and PIL, not matplotlib: a grid of 32 axes took about a second to lay out, a pasted
    mosaic takes milliseconds. Each image is stretched to its own min-max, as `imshow` did.
    """
    images = torch.as_tensor(images)
    count = len(images)
    rows = max(1, (count + columns - 1) // columns)
    side, caption_height = 28 * scale, 12
    cell_w, cell_h = side + 6, side + caption_height + 4
    canvas = Image.new("L", (columns * cell_w, rows * cell_h), 255)
    draw = ImageDraw.Draw(canvas)
    pixels = images.reshape(count, 28, 28).float() if count else torch.empty(0, 28, 28)
    low = pixels.amin(dim=(1, 2), keepdim=True) if count else pixels
    high = pixels.amax(dim=(1, 2), keepdim=True) if count else pixels
    ink = (255 - 255 * (pixels - low) / (high - low).clamp(min=1e-12)).round().to(torch.uint8).numpy()
    for index in range(count):
        left, top = (index % columns) * cell_w + 3, (index // columns) * cell_h + 2
        digit = Image.fromarray(np.ascontiguousarray(ink[index])).resize((side, side), Image.Resampling.NEAREST)
        canvas.paste(digit, (left, top))
        width = draw.textlength(captions[index])
        draw.text((left + (side - width) / 2, top + side + 1), captions[index], fill=0)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def accuracy_vs_time_png(names: Sequence[str], seconds: Sequence[float], accuracy: Sequence[float]) -> bytes:
    """The sweep's scatter: each candidate's validation accuracy against its training time."""
    figure, axis = plt.subplots(figsize=(5, 3.2))
    axis.scatter(seconds, [100 * a for a in accuracy], color="tab:blue")
    for name, x, y in zip(names, seconds, accuracy, strict=True):
        axis.annotate(name, (x, 100 * y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    axis.set_xlabel("training time (s)")
    axis.set_ylabel("validation accuracy (%)")
    axis.grid(alpha=0.3)
    return _png(figure)


def reliability_diagram_png(bins: Sequence[dict], ece: float, before: Sequence[dict] | None = None,
                            ece_before: float | None = None) -> bytes:
    """Accuracy against confidence per confidence bin (rows of `evaluate.calibration_bins`), with the
    diagonal a perfectly calibrated model lies on and each bin's share of images as bars below. With
    `before` (the bins at temperature 1), the uncalibrated curve is drawn too, so the fix is visible."""
    figure, (axis, counts) = plt.subplots(2, 1, figsize=(5, 4.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = [row for row in bins if row["images"]]
    axis.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    if before is not None:
        earlier = [row for row in before if row["images"]]
        axis.plot([row["confidence"] for row in earlier], [row["accuracy"] for row in earlier], "s:", color="tab:orange",
                  label=f"uncalibrated (ECE {100 * (ece_before or 0.0):.2f}%)")  # fmt: skip
    axis.plot([row["confidence"] for row in filled], [row["accuracy"] for row in filled], "o-", color="tab:blue",
              label="model" if before is None else "calibrated")  # fmt: skip
    axis.set_ylabel("accuracy in bin")
    axis.set_title(f"Reliability diagram (test set): ECE = {100 * ece:.2f}%")
    axis.legend(loc="upper left", fontsize=8)
    axis.grid(alpha=0.3)
    width = bins[0]["upper"] - bins[0]["lower"] if bins else 0.1
    total = max(1, sum(row["images"] for row in bins))
    counts.bar([row["lower"] + width / 2 for row in bins], [row["images"] / total for row in bins], width=width * 0.9)
    counts.set_yscale("log")
    counts.set_xlabel("confidence (max softmax probability)")
    counts.set_ylabel("share")
    return _png(figure)


def drift_histograms_png(
    histograms: dict[str, tuple[Sequence[float], Sequence[float]]], moved: Sequence[str] = ()
) -> bytes:
    """prediction_drift's figure: per statistic, the reference shares (grey) against the current window's
    (blue; red where that statistic passed a threshold). Feature bins are the reference's deciles, so a
    reference bar near 0.1 in every bin is the expected picture."""
    names = list(histograms)
    columns = 4
    rows = max(1, (len(names) + columns - 1) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 2.6, rows * 2.0), squeeze=False)
    for axis in axes.flat[len(names) :]:
        axis.axis("off")
    for axis, name in zip(axes.flat, names):
        reference, current = histograms[name]
        positions = range(len(reference))
        axis.bar([p - 0.2 for p in positions], reference, width=0.4, color="0.6", label="reference")
        axis.bar([p + 0.2 for p in positions], current, width=0.4, color="tab:red" if name in moved else "tab:blue",
                 label="current")  # fmt: skip
        axis.set_title(name + (" (moved)" if name in moved else ""), fontsize=8)
        axis.tick_params(labelsize=6)
        axis.set_xlabel("digit" if name == "predicted_class" else "confidence bin (0.05)" if name == "confidence"
                        else "training decile bin", fontsize=6)  # fmt: skip
    axes.flat[0].legend(fontsize=6)
    figure.tight_layout()
    return _png(figure)
