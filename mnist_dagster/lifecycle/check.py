"""Before a model reaches the endpoint: does the serving path answer what the model answers?

The gate (`production_digit_classifier`) runs `check_serving_path` BEFORE the deployment record flips,
so a model that fails it never serves and production stays as it was; `digit_predictions` then checks
that a running endpoint picked the new version up (`resources.serving.check_live_server`). No Dagster, no HTTP.
The question is faithfulness, not accuracy: each test image goes, as a PNG the way clients send it,
through the upload recipe behind `POST /predict` (`scoring.preprocess.prepare_upload`), and the answer must be the model's own answer on the
same pixels (same digit, probabilities within a tolerance). That alone is blind to the recipe: 28x28
dark-background images pass through it untouched. So the same test digits are also rendered as uploads
(`scoring.uploads.varied_styles`: 28-400 px, both polarities, the digit off the canvas's centre, PNG and JPEG)
and scored in one batch: their accuracy must be within `UPLOAD_ACCURACY_GAP` (0.5 point) of the model's on
the pixels of the same digits - a paired comparison, so the sample's difficulty cancels out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from mnist_dagster.scoring import bundle as bundles
from mnist_dagster.scoring.preprocess import MNIST_SIDE, encode_png, prepare_upload
from mnist_dagster.scoring.uploads import as_uploads, through_upload_recipe, varied_styles


class ServingCheckError(RuntimeError):
    """The serving path does not answer what the model answers; `uploads` holds the upload comparison's numbers
    when that is what failed (the gate shows them in its metadata)."""

    def __init__(self, message: str, uploads: UploadCheck | None = None) -> None:
        super().__init__(message)
        self.uploads = uploads


#: The server rounds probabilities to 6 decimals; anything larger than this is a different computation.
PROBABILITY_TOLERANCE = 1e-4
UPLOAD_ACCURACY_GAP = 0.005  # uploads may read at most half a point worse than the same digits' pixels
#: ... beyond chance: McNemar's exact one-sided test on the same digits as uploads and as pixels must also find
#: the uploads worse at this level. One image is 0.1 point of 1,000, so a gap of a few images is noise a gate
#: must not refuse on; a broken recipe (no centring, the wrong polarity) costs tens of points and p ~ 1e-30.
UPLOAD_ALPHA = 0.01
UPLOAD_ALPHA_WHY = (
    "0.01, not the usual 0.05, because a refusal stops a deployment: one digit is 0.1 point of 1,000, so a "
    "gap of a few digits is noise the gate must not refuse a good model on, while a broken upload recipe (no "
    "centring, the wrong polarity) costs tens of points at p ~ 1e-30"
)
UPLOAD_TEST = (
    "McNemar's exact test, one-sided (alternative: the digits read worse as uploads than as pixels): the exact "
    "binomial tail on the digits only one of the two paths got right"
)
UPLOAD_CHECK_IMAGES = 1000  # ~2 s of rendering and decoding; one batched model call
UPLOAD_SEED = 4  # fixed: every gate sends the same uploads
#: Rendering presumes MNIST-format digits: a 20 px box centred in 28 px, leaving the outer 2-px frame dark.
#: 11% of the real MNIST test digits touch that frame; images filling it (generated test patterns) are
#: not digits the recipe can crop and re-centre, so the upload comparison is skipped for them, saying so.
FRAME_INK_SHARE = 0.5


@dataclass(frozen=True)
class PathCheck:
    """What the serving path answered on the check images, against the model's own answers."""

    digits: np.ndarray  # the serving path's digit per image
    disagreements: int  # images where that digit is not the model's own
    max_probability_gap: float  # largest |served - model| probability over all images and classes
    accuracy: float | None  # the serving path's accuracy on these images' labels (reported, not compared)
    latencies: list[float]  # seconds per request through the server's code
    uploads: UploadCheck | None = None  # the same digits as uploads (with labels only)

    @property
    def images(self) -> int:
        return len(self.digits)


@dataclass(frozen=True)
class UploadCheck:
    """Accuracy of the first `images` check digits as uploads and as pixels, both by the same model."""

    images: int
    upload_accuracy: float
    pixel_accuracy: float
    p_value: float  # McNemar's exact one-sided p that the uploads read worse than the pixels
    uploads_only_right: int = 0  # digits read right as uploads and wrong as pixels
    pixels_only_right: int = 0  # ... and the other way round: the discordant pairs the test weighs

    @property
    def gap(self) -> float:
        return self.pixel_accuracy - self.upload_accuracy

    @property
    def refused(self) -> bool:
        """The check's rule: a gap over `UPLOAD_ACCURACY_GAP` that is also significant at `UPLOAD_ALPHA`."""
        return self.gap > UPLOAD_ACCURACY_GAP and self.p_value <= UPLOAD_ALPHA


def compare_uploads(
    predictor: bundles.Predictor, images: np.ndarray, labels: np.ndarray, count: int = UPLOAD_CHECK_IMAGES
) -> UploadCheck:
    """The first `count` digits rendered as uploads (`varied_styles`) through the recipe, and as pixels,
    scored by the same model; the comparison, whatever it finds (the benchmark reads it too)."""
    # Lazy: scipy.stats costs ~1.6 s, and the gate's asset module imports this one when the code location loads.
    from mnist_dagster.ml.compare import mcnemar_exact

    digits, truth = images[:count], np.asarray(labels[:count])
    uploads = through_upload_recipe(as_uploads(digits, varied_styles(len(digits), UPLOAD_SEED)))
    as_uploaded = predictor.predict_proba(uploads.reshape(-1, 1, MNIST_SIDE, MNIST_SIDE)).argmax(axis=1)
    pixels = digits.reshape(-1, 1, MNIST_SIDE, MNIST_SIDE).astype(np.float32) / 255
    as_pixels = predictor.predict_proba(pixels).argmax(axis=1)
    paired = mcnemar_exact(truth, as_uploaded, as_pixels)  # "candidate": the upload path; "production": pixels
    return UploadCheck(
        len(digits), paired.candidate_accuracy, paired.production_accuracy, paired.p_value,
        paired.candidate_only, paired.production_only,
    )  # fmt: skip


def check_uploads(
    predictor: bundles.Predictor, images: np.ndarray, labels: np.ndarray, count: int = UPLOAD_CHECK_IMAGES
) -> UploadCheck:
    """`compare_uploads`; raises `ServingCheckError` (carrying the numbers) when the uploads read more than
    `UPLOAD_ACCURACY_GAP` worse and McNemar's one-sided test finds that beyond chance at `UPLOAD_ALPHA`."""
    result = compare_uploads(predictor, images, labels, count)
    if result.refused:
        raise ServingCheckError(
            f"uploads read worse than pixels: {result.upload_accuracy:.2%} of {result.images} test digits "
            f"rendered as uploads (28-400 px, both polarities, off-centre, PNG and JPEG) against "
            f"{result.pixel_accuracy:.2%} of the same digits as 28x28 pixels, a gap of {result.gap:.2%} > "
            f"{UPLOAD_ACCURACY_GAP:.1%}, and McNemar's exact one-sided test finds it beyond chance (p = "
            f"{result.p_value:.3g} <= {UPLOAD_ALPHA}; pixels alone right on {result.pixels_only_right} digits, "
            f"uploads alone on {result.uploads_only_right}); the upload recipe does not give the model the digits "
            "it was trained on",
            uploads=result,
        )
    return result


def upload_check_metadata(uploads: UploadCheck | None) -> dict:
    """The upload comparison as a person reads it in the gate's metadata: both accuracies, the gap in points,
    the test, its level and why, and how many digits."""
    if uploads is None:
        return {"upload_check": "not run: the check images are not MNIST-format digits (ink in the outer frame)"}
    verdict = "refused" if uploads.refused else "passed"
    return {
        "upload_check": (
            f"{verdict}: {uploads.images} check digits read {uploads.pixel_accuracy:.2%} as 28x28 pixels and "
            f"{uploads.upload_accuracy:.2%} as uploads (28-400 px, both polarities, off-centre, PNG and JPEG, "
            f"through the upload recipe), a gap of {100 * uploads.gap:.2f} points; refused only when the gap is "
            f"over {100 * UPLOAD_ACCURACY_GAP:.1f} points AND the one-sided exact McNemar test gives "
            f"p <= {UPLOAD_ALPHA} (here p = {uploads.p_value:.3g})"
        ),
        "upload_check_images": uploads.images,
        "upload_check_pixel_accuracy": uploads.pixel_accuracy,
        "upload_check_upload_accuracy": uploads.upload_accuracy,
        "upload_check_gap_points": round(100 * uploads.gap, 2),
        "upload_check_max_gap_points": 100 * UPLOAD_ACCURACY_GAP,
        "upload_check_pixels_only_right": uploads.pixels_only_right,
        "upload_check_uploads_only_right": uploads.uploads_only_right,
        "upload_check_test": UPLOAD_TEST,
        "upload_check_p_value": uploads.p_value,
        "upload_check_alpha": UPLOAD_ALPHA,
        "upload_check_alpha_why": UPLOAD_ALPHA_WHY,
    }


def check_serving_path(
    predictor: bundles.Predictor,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    tolerance: float = PROBABILITY_TOLERANCE,
) -> PathCheck:
    """`images` (uint8 N x 28 x 28, MNIST format) through the server's request code, compared with the
    model on the same pixels; raises `ServingCheckError` on any difference beyond `tolerance`, or (with
    `labels`) when the same digits as uploads read worse than as pixels (`check_uploads`)."""
    model_answers = predictor.predict_proba(images.reshape(-1, 1, MNIST_SIDE, MNIST_SIDE).astype(np.float32) / 255)
    served, latencies = _through_the_server_code(predictor, [encode_png(image) for image in images])
    digits = served.argmax(axis=1)
    check = PathCheck(
        digits=digits,
        disagreements=int((digits != model_answers.argmax(axis=1)).sum()),
        max_probability_gap=float(np.abs(served - model_answers).max()) if len(images) else 0.0,
        accuracy=float(np.mean(digits == labels)) if labels is not None and len(images) else None,
        latencies=latencies,
    )
    if check.disagreements or check.max_probability_gap > tolerance:
        raise ServingCheckError(
            f"the serving path answers differently from the model on the same {check.images} test images: "
            f"{check.disagreements} different digits, largest probability gap {check.max_probability_gap:.3g} "
            f"(tolerance {tolerance:g}); the server's preprocessing does not give the model the pixels it was "
            "trained on"
        )
    if labels is None or not len(images) or not mnist_format_digits(images):
        return check
    return replace(check, uploads=check_uploads(predictor, images, labels))


def mnist_format_digits(images: np.ndarray) -> bool:
    """Whether fewer than `FRAME_INK_SHARE` of the uint8 images have ink (> 127) in their outer 2-px frame."""
    frame = np.ones((MNIST_SIDE, MNIST_SIDE), bool)
    frame[2:-2, 2:-2] = False
    return bool(np.mean((images.reshape(-1, MNIST_SIDE, MNIST_SIDE)[:, frame] > 127).any(axis=1)) < FRAME_INK_SHARE)


def _through_the_server_code(predictor: bundles.Predictor, pngs: list[bytes]) -> tuple[np.ndarray, list[float]]:
    """Each PNG through the upload recipe behind `POST /predict` and the predictor, timed one by one."""
    probabilities, latencies = [], []
    for png in pngs:
        started = time.perf_counter()
        pixels = prepare_upload(png).reshape(1, 1, MNIST_SIDE, MNIST_SIDE)
        probabilities.append(predictor.predict_proba(pixels)[0])
        latencies.append(time.perf_counter() - started)
    return np.array(probabilities, dtype=np.float64).reshape(len(pngs), -1), latencies


def percentile_ms(seconds: list[float], percentile: float) -> float:
    return round(float(np.percentile(seconds, percentile)) * 1000, 3) if seconds else 0.0
