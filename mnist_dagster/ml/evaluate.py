"""Test-set evaluation: accuracy, confusion matrix, per-class precision, recall and F1."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mnist_dagster.ml.data import NUM_CLASSES
from mnist_dagster.ml.train import predict_logits


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    confusion: torch.Tensor  # (10, 10) int64: rows are true digits, columns predictions
    precision: list[float]
    recall: list[float]
    f1: list[float]
    predictions: torch.Tensor
    confidences: torch.Tensor

    def misclassified(self, labels: torch.Tensor) -> torch.Tensor:
        """Indices of wrong predictions, most confident mistakes first."""
        wrong = torch.nonzero(self.predictions != labels).flatten()
        return wrong[self.confidences[wrong].argsort(descending=True)]


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
    flat = labels * NUM_CLASSES + predictions
    return torch.bincount(flat, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)


def per_class_scores(confusion: torch.Tensor) -> tuple[list[float], list[float], list[float]]:
    correct = confusion.diag().double()
    precision = correct / confusion.sum(0).clamp(min=1)
    recall = correct / confusion.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return precision.tolist(), recall.tolist(), f1.tolist()


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: str = "cpu") -> Evaluation:
    probabilities = predict_logits(model, images, device).softmax(1)
    confidences, predictions = probabilities.max(1)
    confusion = confusion_matrix(labels, predictions)
    precision, recall, f1 = per_class_scores(confusion)
    return Evaluation(
        accuracy=(predictions == labels).double().mean().item(),
        confusion=confusion,
        precision=precision,
        recall=recall,
        f1=f1,
        predictions=predictions,
        confidences=confidences,
    )
