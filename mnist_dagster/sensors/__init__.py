"""Sensors, one module per concern, all running as soon as the code location loads.

- `data_arrival`: new labelled data in `landing/`, and the declarative automation that carries it on;
- `ml_sensors`: the alerting (Slack on run failure, gate refusal and rollback, A/B decision, drift, quarantined feedback);
- `feedback`: labelled feedback from the endpoint -> a batch in `landing/`;
- `orphaned_runs`: MLflow runs a killed step left RUNNING;
- `sweep`: a sweep's winner -> training_job.
"""

from mnist_dagster.sensors.data_arrival import automation_sensor, new_labelled_data_sensor
from mnist_dagster.sensors.feedback import feedback_to_landing_sensor
from mnist_dagster.sensors.ml_sensors import (
    slack_on_ab_test_decision,
    slack_on_feedback_quarantine,
    slack_on_model_not_deployed,
    slack_on_prediction_drift,
    slack_on_run_failure,
)
from mnist_dagster.sensors.orphaned_runs import close_orphaned_mlflow_runs
from mnist_dagster.sensors.sweep import sweep_winner_sensor

SENSORS = [
    new_labelled_data_sensor,
    automation_sensor,
    slack_on_run_failure,
    slack_on_model_not_deployed,
    slack_on_ab_test_decision,
    slack_on_prediction_drift,
    slack_on_feedback_quarantine,
    feedback_to_landing_sensor,
    close_orphaned_mlflow_runs,
    sweep_winner_sensor,
]
