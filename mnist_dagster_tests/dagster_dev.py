"""`dagster dev` the way the README runs it, under a test's control: started, watched, stopped.

The end-to-end UI test uses this. `dagster dev` starts from the repository root (so it loads the code
location as a person's does) with a temporary `DAGSTER_HOME` whose `dagster.yaml` is the repository's,
less its storage paths: the repository's run queue and pool limits apply, while run history, sensor
state and logs stay in the temporary home instead of a developer's `.dagster_home/`. It runs in its
own process group (webserver, daemon, code servers and run workers all join it), so stopping it is
Ctrl-C to the group, and "nothing left behind" can be checked: no process in the group, nothing
listening.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import yaml

from mnist_dagster_tests.support import REPO_ROOT, free_port

#: Variables of this project and of Dagster that a developer's shell may set; the test sets its own.
ISOLATED_PREFIXES = ("DAGSTER_", "MNIST_", "MLFLOW_", "SLACK_", "S3_", "AWS_")
TERMINAL_RUN_STATUSES = {"SUCCESS", "FAILURE", "CANCELED"}


class DagsterDevError(RuntimeError):
    """`dagster dev` did not start, or a run went wrong; the message says what and where the logs are."""


def dotenv_overrides(folder: Path = REPO_ROOT) -> list[str]:
    """Keys in `folder/.env` that `dagster dev` would apply over the test's isolated environment."""
    path = folder / ".env"
    if not path.is_file():
        return []
    keys = [line.split("=", 1)[0].removeprefix("export ").strip() for line in path.read_text().splitlines()]
    return [key for key in keys if key.startswith(ISOLATED_PREFIXES)]


def isolated_env(overrides: Mapping[str, str]) -> dict[str, str]:
    """The process environment without the project's and Dagster's variables, plus `overrides`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(ISOLATED_PREFIXES)}
    env["NO_PROXY"] = env["no_proxy"] = ",".join(filter(None, ["127.0.0.1,localhost", env.get("NO_PROXY")]))
    return {**env, **overrides}


#: Where the repository's dagster.yaml keeps state (relative to the working folder); the test's home keeps its own.
STATE_SETTINGS = (
    "storage",
    "run_storage",
    "event_log_storage",
    "schedule_storage",
    "local_artifact_storage",
    "compute_logs",
)


def write_instance_home(home: Path, repo_config: Path = REPO_ROOT / "dagster.yaml") -> Path:
    """A `DAGSTER_HOME` configured like the repository, with its state kept inside `home`."""
    settings = yaml.safe_load(repo_config.read_text()) if repo_config.is_file() else {}
    settings = {key: value for key, value in (settings or {}).items() if key not in STATE_SETTINGS}
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(settings))
    return home


@contextmanager
def loopback_dev_env(tmp_path: Path, mnist_dir: Path, **extra: str) -> Iterator[dict[str, str]]:
    """`dagster dev`'s environment for a test: a temporary home configured like the repository and a data
    folder in `tmp_path`, MNIST from `mnist_dir` served over HTTP on 127.0.0.1. Skips where the repository's
    `.env` would override what the test sets (dagster dev loads it over the process environment)."""
    import pytest

    from mnist_dagster_tests.support import serve_folder

    overridden = dotenv_overrides()
    if overridden:
        pytest.skip(f"the repository's .env sets {', '.join(overridden)}; dagster dev would apply them over the test's")
    with serve_folder(mnist_dir) as mirror:
        yield isolated_env(
            {
                "DAGSTER_HOME": str(write_instance_home(tmp_path / "dagster_home")),
                "DAGSTER_DEPLOYMENT": "dev",
                "DAGSTER_DISABLE_TELEMETRY": "1",
                "MNIST_MIRRORS": mirror,
                "MNIST_DATA_DIR": str(tmp_path / "data"),
                **extra,
            }
        )


# --- processes -------------------------------------------------------------------------------------


def group_pids(pgid: int) -> set[int]:
    """Live processes in process group `pgid` (from /proc; Linux)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.add(int(entry.name))
    return pids


def socket_inodes(pids: set[int]) -> set[str]:
    """The inodes of the sockets the processes `pids` hold open."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue  # exited while we looked
    return inodes


def listening_endpoints(pids: set[int]) -> set[int | str]:
    """What the processes `pids` listen on: TCP ports (ints) and Unix socket paths (the code servers' gRPC)."""
    inodes = socket_inodes(pids)
    endpoints: set[int | str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            columns = line.split()
            if columns[3] == "0A" and columns[9] in inodes:  # 0A = LISTEN
                endpoints.add(int(columns[1].rsplit(":", 1)[1], 16))
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        columns = line.split()
        if len(columns) == 8 and int(columns[3], 16) & 0x10000 and columns[6] in inodes:  # __SO_ACCEPTCON
            endpoints.add(columns[7])
    return endpoints


def accepts_connections(endpoint: int | str) -> bool:
    """Whether something still answers on a TCP port of 127.0.0.1 or a Unix socket path."""
    tcp = isinstance(endpoint, int)
    with socket.socket(socket.AF_INET if tcp else socket.AF_UNIX) as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", endpoint) if tcp else endpoint) == 0


def default_interrupts() -> None:
    """Ctrl-C and SIGTERM as a terminal delivers them. A shell that starts a job in the background makes it
    ignore both, ignored signals are inherited, and `dagster dev` could then not be stopped gracefully."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@dataclass
class Shutdown:
    """What stopping `dagster dev` left behind; `clean` is the thing to assert."""

    graceful: bool  # everything exited after Ctrl-C, none had to be killed
    leftover_pids: set[int]
    still_listening: set[int | str]

    @property
    def clean(self) -> bool:
        return self.graceful and not self.leftover_pids and not self.still_listening

    def __str__(self) -> str:
        return (
            f"graceful={self.graceful} leftover_pids={sorted(self.leftover_pids)} "
            f"still_listening={sorted(self.still_listening, key=str)}"
        )


def wait_until_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not group_pids(pgid):
            return True
        time.sleep(0.5)
    return not group_pids(pgid)


# --- GraphQL ---------------------------------------------------------------------------------------

RUN_EVENTS = """
query RunEvents($runId: ID!) {
  logsForRun(runId: $runId, limit: 5000) {
    __typename
    ... on EventConnection {
      events {
        __typename
        ... on MessageEvent { timestamp level stepKey message }
        ... on ExecutionStepFailureEvent {
          error { message stack errorChain { error { message stack } } }
        }
      }
    }
    ... on PythonError { message }
  }
}
"""


class GraphQL:
    """The webserver's GraphQL API: the ground truth the UI itself reads."""

    def __init__(self, base_url: str):
        self.client = httpx.Client(base_url=base_url, timeout=30, trust_env=False)

    def query(self, query: str, **variables: object) -> dict:
        response = self.client.post("/graphql", json={"query": query, "variables": variables})
        response.raise_for_status()
        body = response.json()
        if body.get("errors"):
            raise DagsterDevError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def location_status(self) -> tuple[str, str | None]:
        """(load status, load error or None) of the code location."""
        data = self.query(
            "{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus"
            " locationOrLoadError { __typename ... on PythonError { message } } } } } }"
        )
        entries = data["workspaceOrError"].get("locationEntries") or []
        if not entries:
            return "NO_LOCATION", None
        entry = entries[0]
        error = entry["locationOrLoadError"]
        return entry["loadStatus"], error.get("message") if error and error["__typename"] == "PythonError" else None

    def runs(self) -> list[dict]:
        data = self.query("{ runsOrError(limit: 50) { ... on Runs { results { runId status startTime } } } }")
        return data["runsOrError"]["results"]

    def run_status(self, run_id: str) -> str:
        data = self.query("query($runId: ID!) { runOrError(runId: $runId) { ... on Run { status } } }", runId=run_id)
        return data["runOrError"]["status"]

    def latest_materialization_runs(self) -> dict[str, str | None]:
        """Asset key -> the run of its latest materialization (None if never materialized)."""
        data = self.query("{ assetNodes { assetKey { path } assetMaterializations(limit: 1) { runId } } }")
        return {
            "/".join(node["assetKey"]["path"]): (node["assetMaterializations"] or [{}])[0].get("runId")
            for node in data["assetNodes"]
        }

    def run_events(self, run_id: str) -> list[dict]:
        logs = self.query(RUN_EVENTS, runId=run_id)["logsForRun"]
        if logs["__typename"] != "EventConnection":
            raise DagsterDevError(f"logsForRun({run_id}): {logs.get('message')}")
        return logs["events"]


def error_chain(error: dict) -> list[dict]:
    """An error and the errors that caused it (a retried step's root cause is at the end)."""
    return [error, *(link["error"] for link in error.get("errorChain") or [])]


def first_error(events: list[dict]) -> str:
    """The first step failure of a run with its causes, else its first ERROR message (stacks: in the run log)."""
    for event in events:
        if event["__typename"] == "ExecutionStepFailureEvent" and event.get("error"):
            causes = [error["message"].strip() for error in error_chain(event["error"])]
            return f"step {event['stepKey']} failed: " + "\n  caused by ".join(causes)
    for event in events:
        if event.get("level") == "ERROR":
            return f"{event.get('stepKey') or 'run'}: {event['message']}"
    return "no error event in the run's log"


def format_events(events: list[dict]) -> str:
    """A run's event log as text, one event per line (timestamps are epoch milliseconds in the API)."""
    lines = []
    for event in events:
        when = datetime.fromtimestamp(int(event["timestamp"]) / 1000, timezone.utc).isoformat(timespec="milliseconds")
        step = event.get("stepKey") or "-"
        lines.append(f"{when} {event['level']:<7} {step} {event['__typename']}: {event['message']}")
        for error in error_chain(event["error"]) if event.get("error") else []:
            lines.append("".join(error["stack"]) + error["message"])
    return "\n".join(lines)


# --- dagster dev -----------------------------------------------------------------------------------


@dataclass
class DagsterDev:
    """A running `dagster dev`: its URL, API, log file and start-up timings (seconds from launch)."""

    process: subprocess.Popen
    url: str
    port: int
    log_path: Path
    api: GraphQL
    timings: dict[str, float] = field(default_factory=dict)

    def wait_for_run(self, run_id: str, timeout: float) -> str:
        """Poll until the run ends; its final status. Raises if `dagster dev` dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.raise_if_exited()
            status = self.api.run_status(run_id)
            if status in TERMINAL_RUN_STATUSES:
                return status
            time.sleep(2)
        raise DagsterDevError(f"run {run_id} still {self.api.run_status(run_id)} after {timeout:.0f}s")

    def raise_if_exited(self) -> None:
        if self.process.poll() is not None:
            raise DagsterDevError(f"dagster dev exited with code {self.process.returncode}; log: {self.log_path}")

    def stop(self, timeout: float = 60) -> Shutdown:
        """Ctrl-C to the whole process group, as a terminal sends it; kill whatever outlives `timeout`."""
        pgid = self.process.pid
        endpoints = listening_endpoints(group_pids(pgid)) | {self.port}
        with suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGINT)
        graceful = wait_until_gone(pgid, timeout)
        if not graceful:
            with suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            wait_until_gone(pgid, 10)
        with suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)  # reap it
        self.api.client.close()
        return Shutdown(
            graceful=graceful,
            leftover_pids=group_pids(pgid),
            still_listening={endpoint for endpoint in endpoints if accepts_connections(endpoint)},
        )


def launch_dagster_dev(env: Mapping[str, str], log_path: Path, port: int | None = None) -> DagsterDev:
    """`dagster dev -h 127.0.0.1 -p PORT` from the repository root, in its own process group.

    The `dagster` beside this Python (the environment the tests run in), else the one on PATH.
    """
    port = port or free_port()
    dagster = Path(sys.executable).parent / "dagster"
    command = [str(dagster) if dagster.exists() else "dagster", "dev", "-h", "127.0.0.1", "-p", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=default_interrupts,
        )
    url = f"http://127.0.0.1:{port}"
    return DagsterDev(process=process, url=url, port=port, log_path=log_path, api=GraphQL(url))


def wait_until_loaded(dev: DagsterDev, started: float, timeout: float) -> None:
    """Wait for the webserver to answer and the code location to load; records both times in `dev.timings`."""
    deadline = started + timeout
    while "webserver" not in dev.timings:
        dev.raise_if_exited()
        try:
            if dev.api.client.get("/server_info").status_code == 200:
                dev.timings["webserver"] = time.monotonic() - started
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise DagsterDevError(f"the webserver did not answer within {timeout:.0f}s; log: {dev.log_path}")
        time.sleep(0.25)
    while True:
        dev.raise_if_exited()
        status, error = dev.api.location_status()
        if status == "LOADED" and error:
            raise DagsterDevError(f"the code location failed to load:\n{error}")
        if status == "LOADED":
            dev.timings["code_location"] = time.monotonic() - started
            return
        if time.monotonic() > deadline:
            raise DagsterDevError(f"the code location is still {status} after {timeout:.0f}s; log: {dev.log_path}")
        time.sleep(0.25)


@contextmanager
def running_dagster_dev(env: Mapping[str, str], log_path: Path, timeout: float = 180) -> Iterator[DagsterDev]:
    """A started and loaded `dagster dev`; stopped on exit (the caller may stop it first to check the result)."""
    started = time.monotonic()
    dev = launch_dagster_dev(env, log_path)
    try:
        wait_until_loaded(dev, started, timeout)
        yield dev
    finally:
        if dev.process.poll() is None or group_pids(dev.process.pid):
            dev.stop()
