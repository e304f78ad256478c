"""The gate's decision in words: why a candidate is refused or let through, and the comparison it judged.

The gate (`production_digit_classifier`) refuses a candidate whose test accuracy is not above the threshold,
or that McNemar's exact test, one-sided at `alpha`, finds significantly worse than production on the same
test images (`ml.compare`). Dagster-free, so the rule can be read and tested on its own.
"""

from __future__ import annotations

from mnist_dagster.ml.compare import MCNEMAR_ONE_SIDED, mcnemar_worse_p_value


def refusal(
    accuracy: float, comparison: dict | None, production: str | None, threshold: float, alpha: float
) -> str | None:
    """Why the gate refuses the candidate, in words a person reads; None when it passes."""
    if not accuracy > threshold:
        return f"test accuracy {accuracy:.4f} is not above the threshold {threshold}"
    compared = comparison["production_version"] if comparison else None
    if compared != production:
        return (
            f"production is version {production}, but the candidate was compared with {compared or 'no model'}; "
            "materialize model_evaluation again to compare with the current production model"
        )
    if comparison is None:
        return None
    p_value = worse_p_value(comparison)
    if p_value <= alpha:
        return (
            f"significantly worse than production version {production} on the same test images "
            f"({100 * comparison['candidate_test_accuracy']:.2f}% against {100 * comparison['production_test_accuracy']:.2f}%): "
            f"production alone was right on {comparison['production_right_candidate_wrong']} images, the candidate alone "
            f"on {comparison['candidate_right_production_wrong']}; McNemar's exact test p = {p_value:.3g} "
            f"(one-sided: is the candidate worse?) <= alpha {alpha}"
        )
    return None


def worse_p_value(comparison: dict) -> float:
    """The one-sided p-value, recomputed from the counts: an evaluation stored before the gate became
    one-sided carries a two-sided `mcnemar_p_value`, which would test at alpha / 2."""
    counts = comparison["candidate_right_production_wrong"], comparison["production_right_candidate_wrong"]
    return mcnemar_worse_p_value(*counts)


def passed(accuracy: float, comparison: dict | None, threshold: float, alpha: float) -> str:
    """Why the gate let the candidate through, in words a person reads."""
    if comparison is None:
        return f"test accuracy {accuracy:.4f} above the threshold {threshold}; no production model to compare with"
    return (
        f"test accuracy {accuracy:.4f} above the threshold {threshold}, and not significantly worse than "
        f"production version {comparison['production_version']} (McNemar's exact test, one-sided, p = "
        f"{worse_p_value(comparison):.3g} > alpha {alpha}: the candidate alone right on "
        f"{comparison['candidate_right_production_wrong']} images, production alone on "
        f"{comparison['production_right_candidate_wrong']})"
    )


def comparison_metadata(comparison: dict | None) -> dict:
    """The comparison as the gate judged it: the counts, and the one-sided p-value and its test by name."""
    if comparison is None:
        return {"production_test_accuracy": "no production model yet"}
    keys = ("production_test_accuracy", "candidate_right_production_wrong", "production_right_candidate_wrong")
    return {
        "compared_with": comparison["production_version"], **{key: comparison[key] for key in keys},
        "mcnemar_p_value": worse_p_value(comparison), "gate_test": MCNEMAR_ONE_SIDED,
    }  # fmt: skip
