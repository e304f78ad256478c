"""`MNIST_EXECUTOR=k8s`: dagster-k8s's `k8s_job_executor`, and the Kubernetes Job it makes for a training step.

The Job is built by dagster-k8s's own code, end to end: our code location (with `MNIST_EXECUTOR=k8s`), the
executor created from its run config by `k8s_job_executor` itself, and its step handler's `launch_step`,
which posts the Job through the official Kubernetes client. The only stand-in is the API server: a local
HTTP server that records the Job it is sent, so the test reads the Job exactly as a cluster would get it.
"""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import dagster as dg
import pytest
from dagster._config import process_config, resolve_to_config_type
from dagster._core.definitions.job_base import InMemoryJob
from dagster._core.definitions.reconstruct import ReconstructableRepository
from dagster._core.execution.api import create_execution_plan
from dagster._core.execution.context.system import PlanData, PlanOrchestrationContext
from dagster._core.execution.context_creation_job import create_context_free_log_manager
from dagster._core.executor.init import InitExecutorContext
from dagster._core.executor.step_delegating.step_handler.base import StepHandlerContext
from dagster._core.test_utils import create_run_for_test
from dagster._grpc.types import ExecuteStepArgs
from dagster_k8s import k8s_job_executor
from dagster_k8s.executor import _K8S_EXECUTOR_CONFIG_SCHEMA
from dagster_k8s.job import get_user_defined_k8s_config

from mnist_dagster.definitions import build_defs
from mnist_dagster.ml.distributed import launch_command
from mnist_dagster.resources import executor_for
from mnist_dagster.resources.compute import GPU_TRAINING_POD, ddp_training_pod, pytorch_job_manifest
from mnist_dagster_tests.support import REPO_ROOT

IMAGE = "registry.example.com/mnist-dagster:3f2a1c"
#: What a deployment puts in the run config's `execution.config` (or the Dagster+ agent's run launcher).
EXECUTOR_CONFIG = {
    "job_image": IMAGE,
    "job_namespace": "mnist",
    "env_vars": ["MNIST_DEVICE=cuda", "MLFLOW_TRACKING_URI"],  # a value, and one taken from the run worker
    "env_secrets": ["mnist-dagster-env"],
}


class _ApiServer(BaseHTTPRequestHandler):
    """The Kubernetes API server's `create Job`: records the body, answers 201 with it."""

    jobs: ClassVar[list[dict]] = []

    def do_POST(self) -> None:  # http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.jobs.append({"path": self.path, "job": json.loads(body)})
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def api_server(tmp_path):
    """A recording API server on 127.0.0.1 and a kubeconfig that points at it."""
    _ApiServer.jobs = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ApiServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: test\n"
        f"clusters: [{{name: test, cluster: {{server: 'http://127.0.0.1:{server.server_port}'}}}}]\n"
        "contexts: [{name: test, context: {cluster: test, user: test}}]\nusers: [{name: test, user: {}}]\n"
    )
    yield str(kubeconfig), _ApiServer.jobs
    server.shutdown()


@pytest.fixture
def k8s_instance(api_server):
    """An instance with dagster-k8s's run launcher, as the Helm chart configures it."""
    kubeconfig, _ = api_server
    launcher = {
        "module": "dagster_k8s", "class": "K8sRunLauncher",
        "config": {
            "service_account_name": "dagster", "instance_config_map": "dagster-instance",
            "postgres_password_secret": "dagster-postgresql-secret", "dagster_home": "/opt/dagster/dagster_home",
            "job_image": "launcher-default-image", "load_incluster_config": False, "kubeconfig_file": kubeconfig,
        },
    }  # fmt: skip
    with dg.instance_for_test(overrides={"run_launcher": launcher}) as instance:
        yield instance


def _step_job(
    instance, defs: dg.Definitions, job_name: str, step_key: str, kubeconfig: str, **more_config
) -> None:
    """What the run worker does for one step under `k8s_job_executor`: create the executor from its run
    config and call its step handler's `launch_step` (which posts the Job)."""
    executor_config = {**EXECUTOR_CONFIG, "load_incluster_config": False, "kubeconfig_file": kubeconfig, **more_config}
    job_def = defs.resolve_job_def(job_name)
    assert job_def.executor_def is k8s_job_executor
    processed = process_config(resolve_to_config_type(_K8S_EXECUTOR_CONFIG_SCHEMA), executor_config)
    assert processed.success, processed.errors
    executor = k8s_job_executor.executor_creation_fn(
        InitExecutorContext(job=InMemoryJob(job_def), executor_def=k8s_job_executor,
                            executor_config=processed.value, instance=instance)
    )  # fmt: skip
    origin = (
        ReconstructableRepository.for_module("mnist_dagster.definitions", "defs", working_directory=str(REPO_ROOT))
        .get_reconstructable_job(job_name)
        .get_python_origin()
    )
    run_config = {"execution": {"config": executor_config}}
    run = create_run_for_test(instance, job_name=job_name, job_code_origin=origin, run_config=run_config)
    plan = create_execution_plan(job_def, run_config=run_config)
    plan_context = PlanOrchestrationContext(
        plan_data=PlanData(job=InMemoryJob(job_def), dagster_run=run, instance=instance, execution_plan=plan),
        log_manager=create_context_free_log_manager(instance, run),
        executor=executor,
        output_capture=None,
    )
    context = StepHandlerContext(instance, plan_context, plan.steps, ExecuteStepArgs(origin, run.run_id, [step_key]))
    list(executor._step_handler.launch_step(context))  # the handler the executor runs steps with


def test_the_training_step_becomes_a_gpu_job_built_by_dagster_k8s(api_server, k8s_instance, tmp_path, monkeypatch):
    kubeconfig, jobs = api_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.mnist.svc:5000")
    monkeypatch.setenv("S3_BUCKET", "mnist-bucket")  # prod's resources read it when the run's plan is made
    env = {"DAGSTER_DEPLOYMENT": "prod", "MNIST_EXECUTOR": "k8s", "MNIST_DATA_DIR": str(tmp_path)}
    _step_job(k8s_instance, build_defs(env=env), "training_job", "digit_classifier", kubeconfig)

    (posted,) = jobs
    assert posted["path"] == "/apis/batch/v1/namespaces/mnist/jobs"
    job = posted["job"]
    assert job["kind"] == "Job" and job["metadata"]["labels"]["dagster/op"] == "digit_classifier"
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == IMAGE  # from the executor config, not the launcher's default
    assert container["resources"]["limits"]["nvidia.com/gpu"] in (1, "1")  # from GPU_TRAINING_POD
    assert container["resources"]["limits"]["memory"] == "16Gi"
    assert container["resources"]["requests"] == {"cpu": "4", "memory": "8Gi"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    env_vars = {item["name"]: item.get("value") for item in container["env"]}
    assert env_vars["MNIST_DEVICE"] == "cuda"
    assert env_vars["MLFLOW_TRACKING_URI"] == "http://mlflow.mnist.svc:5000"
    assert env_vars["DAGSTER_RUN_STEP_KEY"] == "digit_classifier"
    assert {"secretRef": {"name": "mnist-dagster-env"}} in container["envFrom"]
    assert container["args"][:3] == ["dagster", "api", "execute_step"]  # the step runs in this pod


def test_ddp_on_four_gpus_of_one_node_is_a_per_step_override(api_server, k8s_instance, tmp_path, monkeypatch):
    """`processes: 4` on k8s: the executor's `per_step_k8s_config` gives the step's pod 4 GPUs and a RAM-backed
    /dev/shm for NCCL, merged by dagster-k8s over the op's one-GPU tag; torchrun runs inside that pod."""
    kubeconfig, jobs = api_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.mnist.svc:5000")
    monkeypatch.setenv("S3_BUCKET", "mnist-bucket")
    env = {"DAGSTER_DEPLOYMENT": "prod", "MNIST_EXECUTOR": "k8s", "MNIST_DATA_DIR": str(tmp_path)}
    per_step = {"digit_classifier": ddp_training_pod(4)}
    _step_job(k8s_instance, build_defs(env=env), "training_job", "digit_classifier", kubeconfig, per_step_k8s_config=per_step)
    pod = jobs[0]["job"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] in (4, "4")
    assert container["resources"]["requests"] == {"cpu": "16", "memory": "32Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in pod["volumes"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_a_multi_node_pytorch_job_runs_the_same_launch():
    """More GPUs than a node has: a Kubeflow PyTorchJob of 2 nodes x 8 GPUs. Its pod template is checked
    field by field against the Kubernetes client's own models; its command is our torchrun launch, without
    --standalone (the operator's PET_* variables give torchrun the nodes and the rendezvous)."""
    import kubernetes
    from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict

    command = launch_command(
        8, "/shared/split.pt", {"epochs": 3}, "/shared/checkpoint.pt", "cuda", True, "/shared/failures.json",
        "/tmp/torchrun-logs", python="python", standalone=False,
    )  # fmt: skip
    manifest = pytorch_job_manifest("mnist-ddp", IMAGE, nodes=2, gpus_per_node=8, command=command,
                                    shared_volume_claim="mnist-shared")  # fmt: skip
    assert manifest["apiVersion"] == "kubeflow.org/v1" and manifest["kind"] == "PyTorchJob"
    assert manifest["spec"]["nprocPerNode"] == "8"
    replicas = manifest["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 1
    template = replicas["Worker"]["template"]
    pod = k8s_model_from_dict(kubernetes.client.V1PodTemplateSpec, k8s_snake_case_dict(kubernetes.client.V1PodTemplateSpec, template))
    (container,) = pod.spec.containers
    assert container.name == "pytorch" and container.image == IMAGE
    assert str(container.resources.limits["nvidia.com/gpu"]) == "8"
    assert "--standalone" not in container.command and "--nproc_per_node=8" in container.command
    assert container.command[:4] == ["python", "-m", "mnist_dagster.ml.distributed", "launch"]
    assert {v.name: v.persistent_volume_claim.claim_name for v in pod.spec.volumes if v.persistent_volume_claim} == {
        "shared": "mnist-shared"
    }
    assert pod.spec.tolerations[0].key == "nvidia.com/gpu"
    with pytest.raises(ValueError, match="at least 1"):
        pytorch_job_manifest("x", IMAGE, nodes=0, gpus_per_node=8, command=command, shared_volume_claim="c")


def test_every_training_op_asks_for_the_gpu_pod():
    """The sweep's `train_candidate` and `digit_classifier` carry the same `dagster-k8s/config` tag, which
    dagster-k8s reads back as the GPU container and toleration: one GPU pod per candidate on k8s."""
    defs = build_defs("dev", {"MNIST_EXECUTOR": "k8s", "MNIST_DATA_DIR": "/tmp/unused"})
    for job_name, op_name in [("model_sweep_job", "train_candidate"), ("training_job", "digit_classifier")]:
        node = defs.resolve_job_def(job_name).graph.node_named(op_name)
        config = get_user_defined_k8s_config(node.definition.tags)
        assert config.container_config == GPU_TRAINING_POD["container_config"]
        assert config.pod_spec_config == GPU_TRAINING_POD["pod_spec_config"]


def test_executor_by_environment():
    assert executor_for("dev", {}) is dg.in_process_executor  # the dev default does not change
    assert executor_for("prod", {"MNIST_EXECUTOR": "default"}) is dg.multiprocess_executor
    assert executor_for("dev", {"MNIST_EXECUTOR": " k8s "}) is k8s_job_executor
    with pytest.raises(ValueError, match=r"MNIST_EXECUTOR='docker' is not one of default, k8s"):
        build_defs("dev", {"MNIST_EXECUTOR": "docker"})


@pytest.mark.slow  # 5 s or more on two cores (a pipeline, a server, a subprocess): left out of the edit loop
def test_dagster_definitions_validate_passes_with_the_k8s_executor(tmp_path):
    env = {**os.environ, "MNIST_EXECUTOR": "k8s", "DAGSTER_DEPLOYMENT": "prod", "MNIST_DATA_DIR": str(tmp_path)}
    env.pop("DAGSTER_HOME", None)
    command = [sys.executable, "-m", "dagster", "definitions", "validate", "-m", "mnist_dagster.definitions"]
    done = subprocess.run(command, check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    bad = subprocess.run(command, check=False, cwd=REPO_ROOT, env={**env, "MNIST_EXECUTOR": "kubernetes"},
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode != 0 and "MNIST_EXECUTOR='kubernetes'" in bad.stdout + bad.stderr
