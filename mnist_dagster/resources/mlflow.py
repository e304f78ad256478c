"""A Pythonic MLflow resource (dagster-mlflow offers none): tracking, artifacts and the model registry.

Every run it starts ends FINISHED or FAILED, whichever way the step ends, because the run lives in a
`with` block inside the step rather than in a hook. `mlflow` is imported on first use, not at load.

Dev uses a SQLite store with artifacts beside it. Prod points `tracking_uri` at a tracking server
(`MLFLOW_TRACKING_URI`) and leaves `artifact_location` unset, so the server decides where artifacts
go: with `mlflow server --artifacts-destination s3://...` (proxied artifacts, the default) workers
upload through the server and need no artifact-store credentials of their own.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import dagster as dg

PRODUCTION_ALIAS = "production"
MLFLOW_UI_DEFAULT = "http://localhost:5000"  # where `mlflow ui` listens by default


class MlflowSettingsError(RuntimeError):
    """MLflow cannot be used as configured; the message names the variable to fix."""


def redact_uri(uri: str) -> str:
    """`uri` without a user or password, for messages and links (tracking URIs may carry credentials)."""
    parts = urlsplit(uri)
    if not parts.username and not parts.password:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class MlflowTracking(dg.ConfigurableResource):
    tracking_uri: str
    experiment_name: str = "mnist-digit-classifier"
    registered_model_name: str = "mnist-digit-classifier"
    artifact_location: str | None = None  # where a new experiment keeps artifacts; None = the server's default
    ui_url: str = ""  # where people open runs (`MLFLOW_UI_URL`); "" = the tracking server, or `mlflow ui` locally

    def _client(self):
        import mlflow

        if not self.tracking_uri.strip():
            raise MlflowSettingsError("MLFLOW_TRACKING_URI is empty: set it to the MLflow tracking server's URL")
        mlflow.set_tracking_uri(self.tracking_uri)
        return mlflow, mlflow.MlflowClient(self.tracking_uri)

    def experiment_id(self) -> str:
        """The experiment's id, created on first use; the first call of a step, so it also checks the server."""
        from mlflow.exceptions import MlflowException

        mlflow, client = self._client()
        try:
            experiment = client.get_experiment_by_name(self.experiment_name)
            if experiment is not None:
                return experiment.experiment_id
            return client.create_experiment(self.experiment_name, artifact_location=self.artifact_location)
        except (MlflowException, OSError) as error:  # requests' connection errors are OSErrors
            raise MlflowSettingsError(
                f"MLflow at {redact_uri(self.tracking_uri)} (MLFLOW_TRACKING_URI) failed: {error}"
            ) from error

    def browser_url(self) -> str:
        """Base URL for links to runs; never shows credentials from the tracking URI."""
        if self.ui_url:
            return redact_uri(self.ui_url).rstrip("/")
        if urlsplit(self.tracking_uri).scheme in {"http", "https"}:
            return redact_uri(self.tracking_uri).rstrip("/")
        return MLFLOW_UI_DEFAULT

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
        return f"{self.browser_url()}/#/experiments/{experiment_id}/runs/{run_id}"

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
