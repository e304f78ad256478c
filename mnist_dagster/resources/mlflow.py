"""A Pythonic MLflow resource (dagster-mlflow offers none): tracking, artifacts and the model registry.

Every run it starts ends FINISHED or FAILED, whichever way the step ends, because the run lives in a
`with` block inside the step rather than in a hook. `mlflow` is imported on first use, not at load.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg

PRODUCTION_ALIAS = "production"


class MlflowTracking(dg.ConfigurableResource):
    tracking_uri: str
    experiment_name: str = "mnist-digit-classifier"
    registered_model_name: str = "mnist-digit-classifier"
    artifact_location: str | None = None  # where a new experiment keeps artifacts; None = the server's default
    ui_url: str = "http://localhost:5000"  # where `mlflow ui` (or the tracking server) shows runs, for links

    def _client(self):
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        return mlflow, mlflow.MlflowClient(self.tracking_uri)

    def experiment_id(self) -> str:
        mlflow, client = self._client()
        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        return client.create_experiment(self.experiment_name, artifact_location=self.artifact_location)

    @contextmanager
    def start_run(self, run_id: str | None = None, **kwargs: Any) -> Iterator[Any]:
        """A new run (or `run_id` resumed) as the active MLflow run; FAILED if the block raises."""
        mlflow, _ = self._client()
        experiment_id = None if run_id else self.experiment_id()
        with mlflow.start_run(run_id=run_id, experiment_id=experiment_id, **kwargs) as run:
            yield run

    def run_url(self, run_id: str) -> str:
        _, client = self._client()
        experiment_id = client.get_run(run_id).info.experiment_id
        return f"{self.ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"

    def register_version(self, model_uri: str, run_id: str) -> str:
        """A new version of the registered model; it serves nothing until it gets the alias."""
        mlflow, _ = self._client()
        return str(mlflow.register_model(model_uri, self.registered_model_name, tags={"run_id": run_id}).version)

    def set_production_alias(self, version: str) -> None:
        _, client = self._client()
        client.set_registered_model_alias(self.registered_model_name, PRODUCTION_ALIAS, version)

    def production_version(self) -> str | None:
        from mlflow.exceptions import MlflowException

        _, client = self._client()
        try:
            return str(client.get_model_version_by_alias(self.registered_model_name, PRODUCTION_ALIAS).version)
        except MlflowException:
            return None
