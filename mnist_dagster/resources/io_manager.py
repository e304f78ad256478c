"""The IO manager for tensors and checkpoints: `torch.save` on write, `weights_only=True` on read.

Assets pass dicts of tensors and primitives, never arbitrary objects, so nothing is unpickled.
"""

import io

import dagster as dg

from mnist_dagster.resources.storage import StorageResource


def asset_object_key(asset_key: dg.AssetKey) -> str:
    return "assets/" + "/".join(asset_key.path) + ".pt"


class TensorIOManager(dg.ConfigurableIOManager):
    storage: StorageResource

    def handle_output(self, context: dg.OutputContext, obj: dict) -> None:
        import torch

        buffer = io.BytesIO()
        torch.save(obj, buffer)
        key = asset_object_key(context.asset_key)
        store = self.storage.open()
        store.write_bytes(key, buffer.getvalue())
        context.add_output_metadata(
            {"stored_at": dg.MetadataValue.path(store.uri(key)), "stored_bytes": buffer.getbuffer().nbytes}
        )

    def load_input(self, context: dg.InputContext) -> dict:
        import torch

        data = self.storage.open().read_bytes(asset_object_key(context.asset_key))
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
