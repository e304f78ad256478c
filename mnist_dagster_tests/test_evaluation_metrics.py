"""The metrics beyond accuracy (`ml/evaluate.py`): calibration on logits with a known answer (before and
after the temperature, and against torchmetrics), robustness tables reproducible for a seed and read from
one batched pass, perturbations that do what their names say, confused pairs, the registry."""

import math

import pytest
import torch
from torch import nn

from mnist_dagster.ml import evaluate, robustness
from mnist_dagster.ml.config import TrainingConfig
from mnist_dagster.ml.train import fit, predict_logits
from mnist_dagster_tests.support import FAST_TRAINING, generated_split


class FixedProbabilities(nn.Module):
    """A 'model' for metrics that only read `Scored.probabilities`; never called."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the metric should not run the model")


def logits_with_confidence(confidence: float, digit: int) -> torch.Tensor:
    """Logits whose softmax puts `confidence` on `digit` and the rest evenly on the other nine."""
    probabilities = torch.full((10,), (1 - confidence) / 9, dtype=torch.float64)
    probabilities[digit] = confidence
    return probabilities.log()


def scored_from(logits: torch.Tensor, labels: torch.Tensor) -> evaluate.Scored:
    images = torch.zeros(len(labels), 1, 28, 28)
    return evaluate.Scored(FixedProbabilities(), images, labels, logits.softmax(1).float(), 0.13, 0.31)


def test_calibration_error_has_the_known_answer():
    # 50 answers at 0.9 confidence, all right (gap 0.1); 50 at 0.6, half right (gap 0.1): ECE = 0.1.
    # 20 answers at 0.95, 19 right: the 0.95 bin's gap is exactly 0; weighting makes it 100 / 120 * 0.1.
    logits, labels = [], []
    for i in range(50):
        logits.append(logits_with_confidence(0.9, 3)), labels.append(3)
    for i in range(50):
        logits.append(logits_with_confidence(0.6, 5)), labels.append(5 if i % 2 else 6)
    result = evaluate.calibration(scored_from(torch.stack(logits), torch.tensor(labels)))
    assert result.scalars["expected_calibration_error"] == pytest.approx(0.1, abs=1e-6)
    assert [row["images"] for row in result.table] == [50, 50]
    assert result.png.startswith(b"\x89PNG")

    for i in range(20):
        logits.append(logits_with_confidence(0.95, 1)), labels.append(1 if i else 2)
    result = evaluate.calibration(scored_from(torch.stack(logits), torch.tensor(labels)))
    assert result.scalars["expected_calibration_error"] == pytest.approx(100 / 120 * 0.1, abs=1e-6)


def test_a_calibrated_model_has_zero_calibration_error_and_an_overconfident_one_does_not():
    labels = torch.tensor([7] * 8 + [2] * 2)  # 80% right at 0.8 confidence: calibrated
    calibrated = torch.stack([logits_with_confidence(0.8, 7)] * 10)
    assert evaluate.calibration(scored_from(calibrated, labels)).scalars["expected_calibration_error"] == pytest.approx(0, abs=1e-6)
    overconfident = torch.stack([logits_with_confidence(0.99, 7)] * 10)
    ece = evaluate.calibration(scored_from(overconfident, labels)).scalars["expected_calibration_error"]
    assert ece == pytest.approx(0.19, abs=1e-6)


def test_confused_pairs_are_the_largest_mistakes_in_order():
    labels = torch.tensor([4] * 6 + [7] * 3 + [1] * 10)
    predicted = torch.tensor([9] * 5 + [4] + [1] * 3 + [1] * 10)  # 4->9 five times, 7->1 three times
    logits = torch.stack([logits_with_confidence(0.9, int(d)) for d in predicted])
    result = evaluate.confused_pairs(scored_from(logits, labels))
    assert [(row["true"], row["predicted"], row["count"]) for row in result.table] == [(4, 9, 5), (7, 1, 3)]
    assert result.scalars["top_confused_pairs_share_of_errors"] == pytest.approx(1.0)


def test_perturbations_do_what_their_names_say():
    pixels = torch.zeros(4, 1, 28, 28)
    pixels[:, 0, 10:18, 12:16] = 1.0  # a bar, off the vertical axis of symmetry
    perturbed = evaluate.perturbations(pixels, seed=0)
    assert set(perturbed) == {"gaussian_noise_sigma_0.3", "rotation_minus_15deg", "rotation_plus_15deg", "shift_3px"}
    for images in perturbed.values():
        assert images.shape == pixels.shape and 0 <= images.min() and images.max() <= 1
    # A whole-pixel shift moves the ink's centre by exactly 3 px along one axis.
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    def centre(image):
        return torch.stack([(image * rows).sum(), (image * cols).sum()]) / image.sum()
    for shifted in perturbed["shift_3px"]:
        moved = centre(shifted[0]) - centre(pixels[0, 0])
        assert sorted(moved.abs().tolist()) == pytest.approx([0.0, 3.0], abs=1e-4)
    # Rotation keeps the ink's amount (nearly) and changes the image; the two directions differ.
    for name in ("rotation_minus_15deg", "rotation_plus_15deg"):
        assert perturbed[name].sum().item() == pytest.approx(pixels.sum().item(), rel=0.05)
        assert not torch.allclose(perturbed[name], pixels, atol=0.1)
    assert not torch.allclose(perturbed["rotation_minus_15deg"], perturbed["rotation_plus_15deg"], atol=0.1)
    noise = perturbed["gaussian_noise_sigma_0.3"] - pixels
    assert 0.15 < noise[pixels == 0].clamp(min=0).std().item() < 0.3  # half-normal on the black background


@pytest.fixture(scope="module")
def trained_scored() -> evaluate.Scored:
    split = generated_split(600, seed=3, val_fraction=0.1)
    trained = fit(split, TrainingConfig.from_mapping(FAST_TRAINING), device="cpu")
    result = evaluate.evaluate(trained.model, split.test_images, split.test_labels)
    return evaluate.Scored(trained.model, split.test_images, split.test_labels, result.probabilities, split.mean, split.std)


def test_robustness_table_is_reproducible_for_a_seed(trained_scored):
    first = evaluate.robustness(trained_scored)
    again = evaluate.robustness(trained_scored)
    assert first.table == again.table and first.scalars == again.scalars
    clean = first.table[0]
    assert clean["condition"] == "clean" and clean["accuracy"] > 0.9
    for row in first.table[1:]:
        assert row["drop"] == pytest.approx(clean["accuracy"] - row["accuracy"], abs=1e-4)
        assert first.scalars[f"robust_accuracy_{row['condition']}"] == row["accuracy"]
    assert first.scalars["robustness_worst_accuracy"] == min(row["accuracy"] for row in first.table)
    # Another seed draws other noise and other shift directions.
    other = evaluate.perturbations(trained_scored.pixels(), seed=1)
    same = evaluate.perturbations(trained_scored.pixels(), seed=0)
    assert not torch.equal(other["gaussian_noise_sigma_0.3"], same["gaussian_noise_sigma_0.3"])
    assert not torch.equal(other["shift_3px"], same["shift_3px"])


def test_run_metrics_runs_the_defaults_and_refuses_an_unknown_name(trained_scored):
    results = evaluate.run_metrics(trained_scored)
    assert list(results) == ["calibration", "robustness", "confused_pairs"]
    assert all(result.summary for result in results.values())
    assert math.isfinite(results["calibration"].scalars["expected_calibration_error"])
    with pytest.raises(ValueError, match="unknown metric.*no_such_metric.*calibration"):
        evaluate.run_metrics(trained_scored, ["calibration", "no_such_metric"])


def test_a_metric_is_one_registered_function(trained_scored):
    @evaluate.metric(default=False)
    def mean_confidence(scored: evaluate.Scored) -> evaluate.MetricResult:
        return evaluate.MetricResult({"mean_confidence": scored.probabilities.max(1).values.mean().item()})

    try:
        assert "mean_confidence" not in evaluate.DEFAULT_METRICS  # opt-in: runs only when named
        (result,) = evaluate.run_metrics(trained_scored, ["mean_confidence"]).values()
        assert 0.1 <= result.scalars["mean_confidence"] <= 1.0
    finally:
        del evaluate.METRICS["mean_confidence"]


def bar_digits(count: int = 6) -> torch.Tensor:
    """Thick-ish bars in [0, 1] pixels, off the centre lines, so every perturbation has something to move."""
    pixels = torch.zeros(count, 1, 28, 28)
    pixels[:, 0, 8:20, 11:15] = 1.0
    return pixels


def ink_centre(image: torch.Tensor) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    return torch.stack([(image * rows).sum(), (image * cols).sum()]) / image.sum()


def test_the_robustness_perturbations_of_uploads_and_other_pens_do_what_their_names_say(monkeypatch):
    monkeypatch.delattr(robustness.augment, "PERTURBATIONS", raising=False)  # this module's own set
    pixels = bar_digits()
    perturbed = robustness.all_perturbations(pixels, seed=0)
    assert list(perturbed)[:4] == ["gaussian_noise_sigma_0.3", "rotation_minus_15deg", "rotation_plus_15deg", "shift_3px"]
    assert list(perturbed)[4:] == list(robustness.OWN_PERTURBATIONS)
    for name, images in perturbed.items():
        assert images.shape == pixels.shape and 0 <= images.min() and images.max() <= 1, name
        assert not torch.allclose(images, pixels, atol=0.05), f"{name} left the digits as they were"
    ink = pixels.sum().item()
    assert perturbed["stroke_dilate_3x3"].sum().item() > 1.4 * ink  # a 4-px bar becomes 6 px wide and 14 tall
    assert perturbed["stroke_erode_2x2"].sum().item() < 0.8 * ink
    assert perturbed["blur_sigma_1"].sum().item() == pytest.approx(ink, rel=0.01)  # spread, not removed
    assert perturbed["blur_sigma_1"].max().item() < 1.0
    assert perturbed["low_resolution_12px"].sum().item() == pytest.approx(ink, rel=0.1)
    for image in perturbed["off_centre_4px"]:  # 4 px along both axes, toward a corner
        assert (ink_centre(image[0]) - ink_centre(pixels[0, 0])).abs().tolist() == pytest.approx([4.0, 4.0], abs=1e-3)
    assert perturbed["rotation_within_15deg"].sum().item() == pytest.approx(ink, rel=0.1)
    # Elastic stretches some strokes and squeezes others: the ink moves, most of it stays.
    assert perturbed["elastic_alpha_34_sigma_4"].sum().item() == pytest.approx(ink, rel=0.25)
    # Seeded: the same seed draws the same images, another seed other ones.
    again, other = robustness.all_perturbations(pixels, seed=0), robustness.all_perturbations(pixels, seed=1)
    for name in ("off_centre_4px", "rotation_within_15deg", "elastic_alpha_34_sigma_4"):
        assert torch.equal(again[name], perturbed[name]) and not torch.equal(other[name], perturbed[name]), name


def test_training_registry_of_perturbations_is_used_when_ml_augment_has_one(monkeypatch):
    calls = []

    def thicker(images: torch.Tensor, generator: torch.Generator, background: float) -> torch.Tensor:
        calls.append((generator.initial_seed(), background))
        return (images + 0.5).clamp(0, 1)

    monkeypatch.setattr(robustness.augment, "PERTURBATIONS", {"thicker_pen": thicker}, raising=False)
    perturbed = robustness.all_perturbations(bar_digits(2), seed=7)
    assert list(perturbed)[4:] == ["thicker_pen"] and calls == [(7, 0.0)]


def test_one_batched_pass_gives_the_answers_of_scoring_each_condition_alone(trained_scored):
    model, images, labels = trained_scored.model, trained_scored.images, trained_scored.labels
    result, scored = evaluate.score_in_one_pass(model, images, labels, trained_scored.mean, trained_scored.std, seed=0)
    assert torch.equal(result.predictions, evaluate.evaluate(model, images, labels).predictions)
    alone = evaluate.all_perturbations(scored.pixels(), seed=0)
    assert list(scored.perturbed_predictions) == list(alone)
    for name, pixels in alone.items():
        expected = predict_logits(model, (pixels - scored.mean) / scored.std).argmax(1)
        assert torch.equal(scored.perturbed_predictions[name], expected), name
    # The robustness table reads those answers: the same table as a Scored that scores each itself.
    assert evaluate.robustness(scored).table == evaluate.robustness(trained_scored).table


def test_calibration_reports_the_error_before_and_after_the_temperature():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (2000,), generator=generator)
    logits = torch.randn(2000, 10, generator=generator) * 3
    logits[torch.arange(2000), labels] += 4.0  # right most of the time, and over-confident at temperature 1
    temperature = 2.5
    expected_before = evaluate.expected_calibration_error(evaluate.calibration_bins(*_confidence_and_correct(logits, labels)))
    expected_after = evaluate.expected_calibration_error(
        evaluate.calibration_bins(*_confidence_and_correct(logits / temperature, labels))
    )
    images = torch.zeros(len(labels), 1, 28, 28)
    probabilities = (logits / temperature).softmax(1)
    for kept_logits in (logits, None):  # from the logits, or recovered from the calibrated probabilities
        scored = evaluate.Scored(FixedProbabilities(), images, labels, probabilities, 0.13, 0.31,
                                 temperature=temperature, logits=kept_logits)  # fmt: skip
        result = evaluate.calibration(scored)
        assert result.scalars["expected_calibration_error"] == pytest.approx(expected_after, abs=1e-6)
        assert result.scalars["expected_calibration_error_uncalibrated"] == pytest.approx(expected_before, abs=1e-5)
        assert result.scalars["calibration_temperature"] == temperature
        assert result.png.startswith(b"\x89PNG") and "temperature 2.5" in result.summary
    assert expected_before != pytest.approx(expected_after, abs=1e-3)


def test_calibration_error_agrees_with_torchmetrics():
    """A maintained implementation (torchmetrics' multiclass L1 calibration error, 15 equal-width bins)
    as the reference for ours, on answers with every kind of bin: empty, sparse and full."""
    from torchmetrics.classification import MulticlassCalibrationError

    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 10, (5000,), generator=generator)
    logits = torch.randn(5000, 10, generator=generator) * 2
    logits[torch.arange(5000), labels] += 2.0
    probabilities = logits.softmax(1)
    ours = evaluate.calibration(scored_from(logits, labels)).scalars["expected_calibration_error"]
    theirs = MulticlassCalibrationError(num_classes=10, n_bins=15, norm="l1")(probabilities, labels).item()
    assert ours == pytest.approx(theirs, abs=1e-5)


def _confidence_and_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    confidence, predicted = logits.softmax(1).max(1)
    return confidence, predicted == labels


def test_the_pass_through_the_served_onnx_graph_agrees_with_the_model(trained_scored):
    """`model_evaluation` scores through ONNX Runtime (the graph as it serves); the PyTorch model it was
    exported from gives the same answers on the test set and every perturbation."""
    import onnxruntime

    from mnist_dagster.ml.model import export_onnx, make_checkpoint

    model = trained_scored.model  # the network wrapped with its calibration temperature (`load_checkpoint`)
    checkpoint = make_checkpoint(model.network, "cnn", {key: FAST_TRAINING[key] for key in ("channels", "hidden")} | {"dropout": 0.1},
                                 trained_scored.mean, trained_scored.std, model.temperature)  # fmt: skip
    session = onnxruntime.InferenceSession(export_onnx(checkpoint), providers=["CPUExecutionProvider"])
    args = (model, trained_scored.images, trained_scored.labels, trained_scored.mean, trained_scored.std)
    served_result, served = evaluate.score_in_one_pass(*args, served=lambda x: session.run(None, {"pixels": x})[0])
    torch_result, in_torch = evaluate.score_in_one_pass(*args)
    assert served.logits is None and in_torch.logits is not None
    assert torch.allclose(served_result.probabilities, torch_result.probabilities, atol=1e-4)
    assert list(served.perturbed_predictions) == list(in_torch.perturbed_predictions)
    for name, predictions in served.perturbed_predictions.items():
        assert (predictions != in_torch.perturbed_predictions[name]).sum() <= 1, name  # a near-tie may flip one
