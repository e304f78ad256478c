"""mnist-dagster: an MNIST digit-classification pipeline as a Dagster code location.

`mnist_dagster.defs` is the code location's `Definitions`. It is built on first access, so that
`mnist_dagster.ml`, `mnist_dagster.storage` and the serving CLI import without loading Dagster.
"""


def __getattr__(name: str):
    if name == "defs":
        from mnist_dagster.definitions import defs

        return defs
    raise AttributeError(f"module 'mnist_dagster' has no attribute {name!r}")
