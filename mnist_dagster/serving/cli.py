"""`mnist-dagster serve`: the real-time endpoint as a process of its own (no Dagster imported).

    mnist-dagster serve [--host 127.0.0.1] [--port 8000] [--store LOCATION]

Serves the models the deployment record `deployment.json` names (production, and a challenger as its
routing says; see `lifecycle/routing.py`), following every change of it without a restart; journals
predictions and client feedback on local disk before answering and ships them to `prediction_log/` and
`feedback/` (see docs/write-path.md). `GET /` is a page to draw a digit on.

Environment: `MNIST_SERVING_SECRET` signs prediction ids (required when `DAGSTER_DEPLOYMENT=prod`; in dev
one is kept in the store), `MNIST_JOURNAL_DIR`, `MNIST_JOURNAL_FSYNC` (always | interval | off),
`MNIST_JOURNAL_MAX_BYTES`; the options below win over them.

LOCATION is a local folder or `s3://bucket/prefix` (boto3 reads AWS credentials, `AWS_REGION` and
`AWS_ENDPOINT_URL` itself); it defaults to the dev data folder, `MNIST_DATA_DIR` or `<repo>/data`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from mnist_dagster.serving.app import Logs, create_app
from mnist_dagster.serving.feedback import FeedbackLog
from mnist_dagster.serving.guards import FeedbackGuards, GuardSettings
from mnist_dagster.serving.ids import IdSigner, serving_secret
from mnist_dagster.serving.prediction_log import PredictionLog
from mnist_dagster.storage import default_data_dir, open_store
from mnist_dagster.storage.journal import FSYNC_MODES, Journal, JournalSettings
from mnist_dagster.storage.shipper import Shipper


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
        "--log-flush-seconds",
        type=float,
        default=5.0,
        help="the age at which a journal segment is sealed and shipped to the store (default 5)",
    )
    serve.add_argument(
        "--journal-dir", default=None, help="the journal folder (default: MNIST_JOURNAL_DIR or a temp folder)"
    )
    serve.add_argument(
        "--journal-fsync", choices=FSYNC_MODES, default=None, help="default: MNIST_JOURNAL_FSYNC or interval"
    )
    serve.add_argument(
        "--journal-max-bytes", type=int, default=None, help="disk the journal may hold before feedback gets 503 (2 GiB)"
    )
    serve.add_argument(
        "--feedback-ttl-days", type=float, default=30.0, help="feedback for older predictions gets 410 (default 30)"
    )
    serve.add_argument(
        "--no-prediction-log", action="store_true", help="do not record served predictions (nor shadow-score)"
    )
    serve.add_argument(
        "--feedback-rate-per-minute", type=float, default=None,
        help="POST /feedback per client and minute, on average "
        "(default MNIST_FEEDBACK_RATE_PER_MINUTE; 0 or unset: no limit)",
    )  # fmt: skip
    serve.add_argument(
        "--feedback-burst", type=int, default=None,
        help="posts a client may send at once (default MNIST_FEEDBACK_BURST, else a minute's worth)",
    )  # fmt: skip
    serve.add_argument(
        "--page-sends-feedback-token", action="store_true", default=None,
        help="give the draw-a-digit page MNIST_FEEDBACK_TOKEN, so its feedback buttons work (anyone who loads the "
        "page can read it; default MNIST_PAGE_SENDS_FEEDBACK_TOKEN, else off)",
    )  # fmt: skip
    return parser


def feedback_guards(args: argparse.Namespace) -> FeedbackGuards:
    """The guards of POST /feedback from the environment (the token only from there) and the flags given."""
    settings = GuardSettings.from_env(
        rate_per_minute=args.feedback_rate_per_minute,
        burst=args.feedback_burst,
        page_sends_token=args.page_sends_feedback_token,
    )
    logging.getLogger("mnist_dagster.serving").info(settings.describe())
    return FeedbackGuards(settings)


def serve(args: argparse.Namespace) -> None:
    location = args.store or str(default_data_dir())  # the dev data folder, as the Dagster resources compute it
    store = open_store(location)
    signer = IdSigner(serving_secret(store), ttl_days=args.feedback_ttl_days)  # prod without a secret stops here
    settings = JournalSettings.from_env(
        store.uri(""),
        directory=Path(args.journal_dir) if args.journal_dir else None,
        fsync=args.journal_fsync,
        max_bytes=args.journal_max_bytes,
        segment_seconds=args.log_flush_seconds,
    )
    journal = Journal(settings, store.uri(""))
    prediction_log = None if args.no_prediction_log else PredictionLog(store, journal=journal)
    shipper = Shipper(store, journal, poll_seconds=min(1.0, args.log_flush_seconds))
    logs = Logs(prediction_log, FeedbackLog(store, journal=journal), shipper)
    app = create_app(store, args.poll_seconds, logs, feedback_guards(args), signer)
    logging.getLogger("mnist_dagster.serving").info(
        "Serving the deployment recorded in %s; journal %s (fsync %s)", location, journal.folder, settings.fsync
    )
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
