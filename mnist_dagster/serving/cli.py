"""`mnist-dagster serve`: the real-time endpoint as a process of its own (no Dagster imported).

    mnist-dagster serve [--host 127.0.0.1] [--port 8000] [--store LOCATION]

Serves the models the deployment record `deployment.json` names (production, and a challenger as its
routing says; see `serving/routing.py`), following every change of it without a restart; logs predictions under
`prediction_log/` and client feedback under `feedback/`. `GET /` is a page to draw a digit on.

LOCATION is a local folder or `s3://bucket/prefix` (boto3 reads AWS credentials, `AWS_REGION` and
`AWS_ENDPOINT_URL` itself); it defaults to the dev data folder, `MNIST_DATA_DIR` or `<repo>/data`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from mnist_dagster.storage import default_data_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnist-dagster", description="MNIST digit classifier tools")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the production model over HTTP (FastAPI on uvicorn)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument(
        "--store", default=None, help="local folder or s3://bucket/prefix (default: MNIST_DATA_DIR or <repo>/data)"
    )
    serve.add_argument(
        "--poll-seconds", type=float, default=1.0, help="how often to read the deployment record for a change"
    )
    serve.add_argument(
        "--log-flush-seconds", type=float, default=5.0, help="how often the prediction and feedback logs are written"
    )
    serve.add_argument(
        "--no-prediction-log", action="store_true", help="do not record served predictions (nor shadow-score)"
    )
    return parser


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from mnist_dagster.serving.app import create_app
    from mnist_dagster.serving.feedback import FeedbackLog
    from mnist_dagster.serving.prediction_log import PredictionLog
    from mnist_dagster.storage import open_store

    location = args.store or str(default_data_dir())  # the dev data folder, as the Dagster resources compute it
    store = open_store(location)
    prediction_log = None if args.no_prediction_log else PredictionLog(store, flush_seconds=args.log_flush_seconds)
    app = create_app(
        store,
        poll_seconds=args.poll_seconds,
        prediction_log=prediction_log,
        feedback_log=FeedbackLog(store, flush_seconds=args.log_flush_seconds),
    )
    logging.getLogger("mnist_dagster.serving").info("Serving the deployment recorded in %s", location)
    # uvloop and httptools are picked automatically where installed; no access log on the request path.
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="info")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        serve(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
