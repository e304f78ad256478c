"""Where MNIST comes from: `MNIST_MIRRORS`, else the public mirrors torchvision uses."""

import dagster as dg


class MnistSource(dg.ConfigurableResource):
    """Comma-separated base URLs or local directories that hold the four `.gz` files; empty = public mirrors."""

    mirrors: str = ""

    def sources(self) -> list[str]:
        from mnist_dagster.ml.data import parse_sources

        return parse_sources(self.mirrors)
