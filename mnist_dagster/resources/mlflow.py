"""A Pythonic MLflow resource (dagster-mlflow offers none): tracking, artifacts and the model registry.

Every run it starts ends FINISHED or FAILED, whichever way the step ends, because the run lives in a
`with` block inside the step rather than in a hook. Assets talk to MLflow only through this resource, and
`mlflow` is imported in one place, `_client`, on first use: loading the code location never loads it.

Dev uses a SQLite store with artifacts beside it. Prod points `tracking_uri` at a tracking server
(`MLFLOW_TRACKING_URI`) and leaves `artifact_location` unset, so the server decides where artifacts
go: with `mlflow server --artifacts-destination s3://...` (proxied artifacts, the default) workers
upload through the server and need no artifact-store credentials of their own.
"""

import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import dagster as dg

from mnist_dagster.scoring.bundle import INPUT_CONTRACT, Predictor, describe_input, make_bundle

if TYPE_CHECKING:
    from mlflow import MlflowClient

PRODUCTION_ALIAS = "production"
CHALLENGER_ALIAS = "challenger"
STARTED_BY_TAG = "dagster_run_id"  # the Dagster run that started an MLflow run
REOPENED_BY_TAG = "dagster_reopened_by"  # the Dagster run that reopened it last (model_evaluation)
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

    def _client(self) -> "tuple[ModuleType, MlflowClient]":
        """The `mlflow` module, pointed at `tracking_uri`, and a client of it."""
        # MLflow (seconds to import) only when a step talks to it: kept off the code location's load
        import mlflow

        if not self.tracking_uri.strip():
            raise MlflowSettingsError("MLFLOW_TRACKING_URI is empty: set it to the MLflow tracking server's URL")
        mlflow.set_tracking_uri(self.tracking_uri)
        return mlflow, mlflow.MlflowClient(self.tracking_uri)

    def experiment_id(self) -> str:
        """The experiment's id, created on first use; the first call of a step, so it also checks the server."""
        mlflow, client = self._client()
        try:
            experiment = client.get_experiment_by_name(self.experiment_name)
            if experiment is not None:
                return experiment.experiment_id
            return client.create_experiment(self.experiment_name, artifact_location=self.artifact_location)
        except (mlflow.exceptions.MlflowException, OSError) as error:  # requests' connection errors are OSErrors
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

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Parameters of the active run."""
        mlflow, _ = self._client()
        mlflow.log_params(dict(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Metrics of the active run, at `step` (an epoch) when given."""
        mlflow, _ = self._client()
        mlflow.log_metrics(dict(metrics), step=step)

    def set_tag(self, key: str, value: str) -> None:
        """A tag of the active run."""
        mlflow, _ = self._client()
        mlflow.set_tag(key, value)

    def create_parent_run(self, run_name: str, tags: dict[str, str]) -> str:
        """A run that groups others (a sweep's candidates point at it with `mlflow.parentRunId`), left
        open until `finish_run`; tagged with the Dagster run, so a killed sweep's parent is closed too."""
        _, client = self._client()
        return client.create_run(self.experiment_id(), run_name=run_name, tags=tags).info.run_id

    def finish_run(self, run_id: str, metrics: dict[str, float] | None = None, table: dict | None = None) -> None:
        """Log a summary on `run_id` (metrics, a JSON table artifact) and mark it FINISHED."""
        _, client = self._client()
        for key, value in (metrics or {}).items():
            client.log_metric(run_id, key, value)
        if table is not None:
            client.log_dict(run_id, table, "leaderboard.json")
        client.set_terminated(run_id, status="FINISHED")

    def run_url(self, run_id: str) -> str:
        _, client = self._client()
        experiment_id = client.get_run(run_id).info.experiment_id
        return f"{self.browser_url()}/#/experiments/{experiment_id}/runs/{run_id}"

    def log_training_data(self, features: Any, targets: Any, source: str, digest: str) -> None:
        """The training data on the active run (`mlflow.log_input`): where it came from and its digest
        (the data version of `raw_mnist_data`), so a run names the very data it saw."""
        mlflow, _ = self._client()
        dataset = mlflow.data.from_numpy(features, targets=targets, source=source, name="mnist-train", digest=digest)
        mlflow.log_input(dataset, context="training")

    def log_png(self, png: bytes, name: str) -> None:
        """A PNG (training curve, confusion matrix) as an image artifact of the active run, as rendered."""
        mlflow, _ = self._client()
        self.log_files(mlflow.active_run().info.run_id, {name: png})

    def log_files(self, run_id: str, files: Mapping[str, bytes]) -> None:
        """Several artifacts of `run_id` in one upload: written to one folder, then one `log_artifacts`.

        Takes the run's id rather than the active run, so it may run in a background thread (MLflow's
        active run is per thread)."""
        _, client = self._client()
        with tempfile.TemporaryDirectory(prefix="mlflow-artifacts-") as folder:
            for name, payload in files.items():
                (Path(folder) / name).write_bytes(payload)
            client.log_artifacts(run_id, folder)

    def log_model(self, onnx: bytes, checkpoint: bytes, input_example: Any) -> str:
        """The deployable model on the active run: ONNX (pickle-free) with its input contract, signature
        and an input example of real pixels, plus the raw checkpoint; returns the model's URI."""
        model_uri = self.log_onnx_model(onnx, input_example)
        mlflow, _ = self._client()
        self.log_files(mlflow.active_run().info.run_id, {"checkpoint.pt": checkpoint})
        return model_uri

    def log_onnx_model(self, onnx: bytes, input_example: Any) -> str:
        """The ONNX model on the active run with its input contract, signature (from ONNX Runtime's own
        answer on `input_example`) and the example itself; returns the model's URI."""
        # ONNX's protobuf classes (a second to import) only when a model is logged: kept off the code location's load
        import onnx as onnx_lib

        mlflow, _ = self._client()
        output = Predictor(make_bundle("signature", onnx)).predict_proba(input_example)
        info = mlflow.onnx.log_model(
            onnx_lib.load_from_string(onnx),
            name="model",
            signature=mlflow.models.infer_signature(input_example, output),
            input_example=input_example,
            metadata={"input": INPUT_CONTRACT},
            pip_requirements=["onnxruntime", "onnx", "numpy"],
        )
        return info.model_uri

    def register_version(self, model_uri: str, run_id: str) -> str:
        """A new version of the registered model, described with its input contract; it serves nothing
        until it gets the alias."""
        mlflow, client = self._client()
        version = str(mlflow.register_model(model_uri, self.registered_model_name, tags={"run_id": run_id}).version)
        client.update_model_version(self.registered_model_name, version, description=describe_input())
        return version

    def set_alias(self, alias: str, version: str) -> None:
        """Point `alias` (`production`, `challenger`) at `version` of the registered model."""
        _, client = self._client()
        client.set_registered_model_alias(self.registered_model_name, alias, version)

    def close_orphaned_runs(self, dagster_run_id: str, dagster_status: str = "FAILURE") -> list[str]:
        """Marks KILLED this experiment's runs still RUNNING for a Dagster run that has ended; their ids.

        A step killed outright (OOM killer, kill -9) never leaves its `with start_run()` block, so its
        MLflow run would stay RUNNING forever. Only RUNNING runs are touched, so calling this twice, or
        for a run that left nothing behind, changes nothing. No experiment yet: nothing to close (this
        never creates one). An unreachable tracking server raises `MlflowSettingsError`.
        """
        # the id goes into a filter string: no quotes, no operators
        if not (dagster_run_id.isascii() and dagster_run_id.replace("-", "").isalnum()):
            raise ValueError(f"not a Dagster run id: {dagster_run_id!r}")
        mlflow, client = self._client()
        try:
            experiment = client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                return []
            orphans = [
                run
                for tag in (STARTED_BY_TAG, REOPENED_BY_TAG)  # MLflow filters have no OR: one search each
                for run in client.search_runs(
                    [experiment.experiment_id],
                    filter_string=f"tags.{tag} = '{dagster_run_id}' AND attributes.status = 'RUNNING'",
                    max_results=1000,  # one Dagster run starts a handful of MLflow runs at most
                )
            ]
            reason = f"dagster run {dagster_run_id} ended {dagster_status}"
            for run in orphans:
                client.set_tag(run.info.run_id, "mnist_dagster.closed_by", reason)
                client.set_terminated(run.info.run_id, status="KILLED")
        except (mlflow.exceptions.MlflowException, OSError) as error:  # requests' connection errors are OSErrors
            raise MlflowSettingsError(
                f"MLflow at {redact_uri(self.tracking_uri)} (MLFLOW_TRACKING_URI) failed: {self._redacted(error)}"
            ) from error
        return [run.info.run_id for run in orphans]

    def _redacted(self, error: BaseException) -> str:
        """`error`'s text without the tracking URI's credentials (MLflow's messages quote the request URL)."""
        uri = self.tracking_uri.rstrip("/")
        return str(error).replace(uri, redact_uri(uri)) if uri else str(error)

    def delete_alias(self, alias: str) -> None:
        """Remove `alias` (the `challenger` once its trial is over); no such alias is not an error."""
        _, client = self._client()
        client.delete_registered_model_alias(self.registered_model_name, alias)
