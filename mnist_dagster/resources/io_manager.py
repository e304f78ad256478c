"""The IO manager for tensors and checkpoints: `torch.save` on write, `weights_only=True` on read.

Assets pass dicts of tensors and primitives, never arbitrary objects, so nothing is unpickled. The
bytes go through a `Store`, so dev (a folder) and prod (S3) hold the very same `.pt` objects under
`assets/<asset key>.pt`.
"""

import io

import dagster as dg

from mnist_dagster.layout import asset_key_path
from mnist_dagster.resources.storage import StorageResource


class TensorIOManager(dg.ConfigurableIOManager):
    storage: StorageResource

    def handle_output(self, context: dg.OutputContext, obj: dict) -> None:
        import torch

        if not isinstance(obj, dict):
            asset = context.asset_key.to_user_string()
            raise TypeError(f"{asset} returned {type(obj).__name__}; this IO manager stores dicts of tensors")
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        key = asset_key_path(context.asset_key.path)
        store = self.storage.open()
        store.write_bytes(key, buffer.getvalue())
        context.add_output_metadata(
            {"stored_at": dg.MetadataValue.path(store.uri(key)), "stored_bytes": buffer.getbuffer().nbytes}
        )

    def load_input(self, context: dg.InputContext) -> dict:
        import torch

        store = self.storage.open()
        key = asset_key_path(context.asset_key.path)
        try:
            data = store.read_bytes(key)
        except FileNotFoundError as error:
            raise dg.Failure(
                f"{context.asset_key.to_user_string()} has no stored value at {store.uri(key)}: materialize it first"
            ) from error
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
