"""mnist-dagster: an MNIST digit-classification pipeline as a Dagster code location.

`mnist_dagster.defs` is the code location's `Definitions` (built in `mnist_dagster.definitions`). It is
built on first access, so that `mnist_dagster.ml`, `mnist_dagster.storage` and the serving CLI import
without loading Dagster. `__dir__` lists it, so Dagster's loader, which looks for `Definitions` among a
module's members (`inspect.getmembers`), finds it too: `dagster dev -m mnist_dagster` works.
"""

_LAZY = ("defs",)


def __getattr__(name: str):
    if name == "defs":
        # Dagster and every room (seconds to import) only when the code location is loaded: `ml`, `storage`
        # and the serving CLI import this package without them
        from mnist_dagster.definitions import defs

        return defs
    raise AttributeError(f"module 'mnist_dagster' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
