"""Calibrated probabilities (`ml.calibrate`): the ECE against a maintained implementation, the temperature fit
against a known truth, the temperature in the checkpoint and in the ONNX graph, and its determinism.

Accuracy and ECE on real MNIST before and after calibration are in `benchmarks/model_zoo_benchmark.py`.
"""

from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from mnist_dagster.ml import architectures, calibrate, data, model, train
from mnist_dagster.ml.config import TrainingConfig
from mnist_dagster_tests.support import generated_split

TINY = TrainingConfig(channels=(4, 8), hidden=16, epochs=2, batch_size=64, max_lr=0.02)


@pytest.fixture(scope="module")
def split() -> data.NormalisedSplit:
    return generated_split(1200, seed=5, val_fraction=0.2, test_count=300)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sharpness", [0.5, 3.0, 10.0])
def test_ece_agrees_with_torchmetrics(seed, sharpness):
    """Random logits (flat to peaked) and random labels: our 15-bin ECE is torchmetrics' l1 calibration error."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(4000, 10, generator=generator) * sharpness
    labels = torch.where(
        torch.rand(4000, generator=generator) < 0.7,
        logits.argmax(1),
        torch.randint(0, 10, (4000,), generator=generator),
    )
    probabilities = logits.softmax(1)
    reference = MulticlassCalibrationError(num_classes=10, n_bins=15, norm="l1")(probabilities, labels).item()
    ours = calibrate.expected_calibration_error(probabilities, labels, bins=15)
    assert ours == pytest.approx(reference, abs=1e-5)
    assert ours > 0.01  # these random probabilities are miscalibrated: the comparison is not of zeros


def test_ece_is_zero_for_perfect_confidence_and_the_reliability_table_sums_to_the_images():
    labels = torch.arange(10).repeat(50)
    certain = torch.nn.functional.one_hot(labels, 10).double()
    assert calibrate.expected_calibration_error(certain, labels) == 0.0
    wrong = certain.roll(1, dims=1)  # sure and always wrong: the worst ECE there is
    assert calibrate.expected_calibration_error(wrong, labels) == pytest.approx(1.0)
    rows = calibrate.reliability_table(torch.rand(500, 10).softmax(1), labels)
    assert sum(row["count"] for row in rows) == 500 and all(row["low"] < row["high"] for row in rows)


@pytest.mark.parametrize("true_temperature", [0.5, 1.7, 3.0])
def test_temperature_fit_recovers_a_known_temperature(true_temperature):
    """Labels drawn from softmax(z / T): the maximum-likelihood T on z is T, within sampling error."""
    generator = torch.Generator().manual_seed(7)
    z = torch.randn(20_000, 10, generator=generator) * 4
    labels = torch.multinomial(calibrate.apply_temperature(z, true_temperature), 1, generator=generator).flatten()
    fitted = calibrate.fit_temperature(z, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    assert calibrate.fit_temperature(z, labels) == fitted  # deterministic


def test_fitting_the_temperature_lowers_ece_on_held_out_labels():
    """Logits three times too sharp: the fitted temperature, judged on other samples, removes most of the ECE."""
    generator = torch.Generator().manual_seed(11)
    z = torch.randn(20_000, 10, generator=generator) * 2
    labels = torch.multinomial(z.softmax(1), 1, generator=generator).flatten()
    sharp = 3 * z
    temperature = calibrate.fit_temperature(sharp[:10_000], labels[:10_000])
    before = calibrate.expected_calibration_error(sharp[10_000:].softmax(1), labels[10_000:])
    after = calibrate.expected_calibration_error(
        calibrate.apply_temperature(sharp[10_000:], temperature), labels[10_000:]
    )
    assert temperature == pytest.approx(3.0, rel=0.05)
    assert after < 0.02 and before > 0.1


def test_onnx_serves_softmax_of_logits_over_the_temperature():
    """The temperature is in the deployed graph: ONNX == softmax(network(x) / T), and not softmax(network(x))."""
    params = architectures.params_of("cnn", TINY)
    torch.manual_seed(0)
    network = architectures.build("cnn", params).eval()
    checkpoint = model.make_checkpoint(network, "cnn", params, mean=0.13, std=0.31, temperature=2.5)
    restored, norm = model.load_checkpoint(model.checkpoint_from_bytes(model.checkpoint_to_bytes(checkpoint)))
    assert restored.temperature == 2.5 and norm == {"mean": 0.13, "std": 0.31}
    pixels = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        logits = network((pixels - 0.13) / 0.31)
    expected = calibrate.apply_temperature(logits, 2.5).numpy()
    session = ort.InferenceSession(model.export_onnx(checkpoint), providers=["CPUExecutionProvider"])
    (served,) = session.run(None, {"pixels": pixels.numpy()})
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert not np.allclose(served, logits.softmax(1).numpy(), atol=1e-3)


def test_checkpoints_without_a_temperature_load_at_one():
    params = architectures.params_of("cnn", TINY)
    network = architectures.build("cnn", params).eval()
    checkpoint = model.make_checkpoint(network, "cnn", params, 0.1, 0.3)
    older = {key: value for key, value in checkpoint.items() if key != "temperature"}
    restored, _ = model.load_checkpoint(older)
    x = torch.rand(3, 1, 28, 28)
    assert restored.temperature == 1.0 and torch.equal(restored(x), network(x))


def test_fit_calibrates_every_model_with_the_same_temperature_for_the_same_seed(split):
    first, again, other = train.fit(split, TINY), train.fit(split, TINY), train.fit(split, replace(TINY, seed=1))
    assert first.temperature == again.temperature == first.checkpoint["temperature"] == first.model.temperature
    assert first.temperature != other.temperature
    assert first.temperature != 1.0  # it was fitted, not left at its default
    # The model fit returns is the calibrated one, and the fit minimised validation NLL over T.
    logits = train.predict_logits(first.model.network, split.val_images)
    nll = lambda t: torch.nn.functional.cross_entropy(logits / t, split.val_labels).item()
    assert nll(first.temperature) <= min(nll(first.temperature * 0.9), nll(first.temperature * 1.1), nll(1.0))
