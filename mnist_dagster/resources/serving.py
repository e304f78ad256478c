"""Where the real-time endpoint runs, if anywhere: `MNIST_SERVING_URL`, for `digit_predictions` to check."""

import dagster as dg


class ServingEndpoint(dg.ConfigurableResource):
    """A running `mnist-dagster serve` that must pick up each published model (checked over HTTP).

    Empty means no server to check: the model is published to the store, and servers pick it up.
    """

    url: str = ""

    @property
    def configured(self) -> bool:
        return bool(self.url.strip())
