"""Where training and evaluation run: `MNIST_DEVICE` = auto (CUDA when present), cpu or cuda."""

import dagster as dg


class ComputeResource(dg.ConfigurableResource):
    device: str = "auto"
    mixed_precision: bool = True  # bf16 autocast on CUDA; the CPU path always runs float32

    def resolve_device(self) -> str:
        from mnist_dagster.ml.train import resolve_device

        return resolve_device(self.device)
