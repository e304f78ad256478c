"""Where training and evaluation run: `MNIST_DEVICE` = auto (CUDA when present), cpu or cuda.

The CUDA path (pinned-memory transfer of the whole dataset once, bf16 autocast) lives in
`mnist_dagster.ml.train`; the CPU path always trains in float32, whatever `mixed_precision` says.
"""

import dagster as dg

DEVICES = ("auto", "cpu", "cuda")
# Dagster+ Hybrid on Kubernetes (k8s executor): the training step's pod gets one GPU. Ignored elsewhere.
GPU_TRAINING_POD = {
    "container_config": {
        "resources": {"requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"memory": "16Gi", "nvidia.com/gpu": 1}}
    },
    "pod_spec_config": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
}


def check_device(device: str) -> str:
    """`device` if it is one `MNIST_DEVICE` may name; an error naming the variable otherwise."""
    if device not in DEVICES:
        raise ValueError(f"MNIST_DEVICE={device!r} is not one of {', '.join(DEVICES)}")
    return device


class ComputeResource(dg.ConfigurableResource):
    device: str = "auto"
    mixed_precision: bool = True  # bf16 autocast on CUDA; the CPU path always runs float32

    def resolve_device(self) -> str:
        """`cpu` or `cuda`; `cuda` without a GPU is an error rather than a silent, slow CPU run."""
        from mnist_dagster.ml.train import resolve_device

        return resolve_device(check_device(self.device))
