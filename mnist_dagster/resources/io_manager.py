"""The IO manager for tensors and checkpoints: `torch.save` on write, `weights_only=True` on read
(`ml.data.tensors_to_bytes` and `tensors_from_bytes`; torch loads with the first value stored or read).

Assets pass dicts of tensors and primitives, never arbitrary objects, so nothing is unpickled. The
bytes go through a `Store`, so dev (a folder) and prod (S3) hold the very same `.pt` objects under
`assets/<asset key>.pt`.
"""

import dagster as dg

from mnist_dagster import ml
from mnist_dagster.layout import asset_key_path, op_output_path
from mnist_dagster.resources.storage import StorageResource


class TensorIOManager(dg.ConfigurableIOManager):
    storage: StorageResource

    def handle_output(self, context: dg.OutputContext, obj: dict) -> None:
        key = _key(context)
        if not isinstance(obj, dict):
            raise TypeError(f"{key} would hold a {type(obj).__name__}; this IO manager stores dicts of tensors")
        data = ml.data.tensors_to_bytes(obj)
        store = self.storage.open()
        store.write_bytes(key, data)
        context.add_output_metadata({"stored_at": dg.MetadataValue.path(store.uri(key)), "stored_bytes": len(data)})

    def load_input(self, context: dg.InputContext) -> dict:
        store = self.storage.open()
        key = _key(context)
        try:
            data = store.read_bytes(key)
        except FileNotFoundError as error:
            what = context.asset_key.to_user_string() if context.has_asset_key else "the upstream step"
            raise dg.Failure(f"{what} has no stored value at {store.uri(key)}: materialize it first") from error
        return ml.data.tensors_from_bytes(data)


#: An op input that reads an asset's stored value names the asset here: `dg.In(metadata={READS_ASSET: [...]})`.
READS_ASSET = "reads_asset"


def _key(context: dg.OutputContext | dg.InputContext) -> str:
    """An asset's value lives at its asset key; an op's output (the sweep's steps) under its run and step."""
    if context.has_asset_key:
        return asset_key_path(context.asset_key.path)
    if isinstance(context, dg.OutputContext):
        return op_output_path(context.get_identifier())
    if context.upstream_output is not None:
        return op_output_path(context.upstream_output.get_identifier())
    asset_path = (context.definition_metadata or {}).get(READS_ASSET)
    if not asset_path:
        raise dg.Failure(f"input {context.name!r} has no upstream step and names no asset ({READS_ASSET} metadata)")
    return asset_key_path(asset_path)
