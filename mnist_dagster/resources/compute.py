"""Where training and evaluation run: `MNIST_DEVICE` = auto (CUDA when present), cpu or cuda.

The CUDA path (pinned-memory transfer of the whole dataset once) lives in `mnist_dagster.ml.train`;
`mixed_precision` is bf16 autocast wherever the device has bf16 in hardware (CUDA, or a CPU with AVX512-BF16
or AMX: `ml.train.native_bf16`), float32 elsewhere.
"""

import dagster as dg

from mnist_dagster import ml

DEVICES = ("auto", "cpu", "cuda")
# Dagster+ Hybrid on Kubernetes (k8s executor): the training step's pod gets one GPU. Ignored elsewhere.
GPU_TRAINING_POD = {
    "container_config": {
        "resources": {"requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"memory": "16Gi", "nvidia.com/gpu": 1}}
    },
    "pod_spec_config": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
}


#: NCCL passes data between a node's GPUs through /dev/shm, which a container gets only 64 MiB of by default.
SHARED_MEMORY = {"name": "dshm", "empty_dir": {"medium": "Memory", "size_limit": "8Gi"}}


def ddp_training_pod(gpus: int) -> dict:
    """`dagster-k8s/config` for a training step that runs DDP on `gpus` GPUs of one node (`processes: gpus`):
    `GPU_TRAINING_POD` with that many GPUs, proportionally more CPU and memory, and a RAM-backed /dev/shm.

    Put it in the k8s executor's run config, `per_step_k8s_config: {digit_classifier: ...}`: dagster-k8s merges
    it over the op's own tag, and the step's torchrun (`--standalone`) starts one worker per GPU in the pod.
    """
    if gpus < 1:
        raise ValueError(f"gpus must be at least 1, got {gpus}")
    return {
        "container_config": {
            "resources": {
                "requests": {"cpu": str(4 * gpus), "memory": f"{8 * gpus}Gi"},
                "limits": {"memory": f"{16 * gpus}Gi", "nvidia.com/gpu": gpus},
            },
            "volume_mounts": [{"name": SHARED_MEMORY["name"], "mount_path": "/dev/shm"}],
        },
        "pod_spec_config": {**GPU_TRAINING_POD["pod_spec_config"], "volumes": [SHARED_MEMORY]},
    }


def pytorch_job_manifest(
    name: str, image: str, nodes: int, gpus_per_node: int, command: list[str], shared_volume_claim: str
) -> dict:
    """A Kubeflow PyTorchJob (training-operator `kubeflow.org/v1`) running `command` (the torchrun launch of
    `ml.distributed.launch_command(..., standalone=False)`) on `nodes` pods of `gpus_per_node` GPUs each.

    For more GPUs than one node has. The operator starts a Master and `nodes - 1` Workers and sets the PET_*
    variables torchrun reads (node count, node rank, rendezvous address). The split and the checkpoint live
    on `shared_volume_claim`, mounted at /shared in every pod: global rank 0 writes the checkpoint there.
    """
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"nodes and gpus_per_node must be at least 1, got {nodes} and {gpus_per_node}")
    pod = ddp_training_pod(gpus_per_node)
    container = {
        "name": "pytorch",  # the operator finds the training container by this name
        "image": image,
        "command": command,
        "resources": pod["container_config"]["resources"],
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "shared", "mountPath": "/shared"}],
    }
    template = {
        "spec": {
            "containers": [container],
            "tolerations": GPU_TRAINING_POD["pod_spec_config"]["tolerations"],
            "volumes": [
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHARED_MEMORY["empty_dir"]["size_limit"]}},
                {"name": "shared", "persistentVolumeClaim": {"claimName": shared_volume_claim}},
            ],
        }
    }
    replicas = {"Master": {"replicas": 1, "restartPolicy": "Never", "template": template}}
    if nodes > 1:
        replicas["Worker"] = {"replicas": nodes - 1, "restartPolicy": "Never", "template": template}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name},
        "spec": {"nprocPerNode": str(gpus_per_node), "runPolicy": {"backoffLimit": 0}, "pytorchReplicaSpecs": replicas},
    }


def check_device(device: str) -> str:
    """`device` if it is one `MNIST_DEVICE` may name; an error naming the variable otherwise."""
    if device not in DEVICES:
        raise ValueError(f"MNIST_DEVICE={device!r} is not one of {', '.join(DEVICES)}")
    return device


class ComputeResource(dg.ConfigurableResource):
    device: str = "auto"
    mixed_precision: bool = True  # bf16 autocast where the device has bf16 in hardware (ml.train.native_bf16)

    def resolve_device(self) -> str:
        """`cpu` or `cuda`; `cuda` without a GPU is an error rather than a silent, slow CPU run."""
        return ml.train.resolve_device(check_device(self.device))
