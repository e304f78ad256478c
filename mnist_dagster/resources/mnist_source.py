"""Where MNIST comes from: `MNIST_MIRRORS`, else the public mirrors torchvision uses."""

import dagster as dg

from mnist_dagster import ml


class MnistSource(dg.ConfigurableResource):
    """Comma-separated base URLs or local directories that hold the four `.gz` files; empty = public mirrors."""

    mirrors: str = ""
    # Expected md5 per file; None = torchvision's list for the canonical MNIST files. Set it only to
    # serve another MNIST-format dataset (the tests' generated one, say).
    md5s: dict[str, str] | None = None

    def sources(self) -> list[str]:
        return ml.data.parse_sources(self.mirrors)

    def checksums(self) -> dict[str, str]:
        return dict(self.md5s or ml.data.MNIST_FILES)
