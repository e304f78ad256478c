"""What champion vs challenger costs the endpoint, measured on a real `mnist-dagster serve` (a
benchmark: its numbers are in the README).

    python benchmarks/serving_ab_benchmark.py [--rounds 20] [--requests 150] [--per-client 40]

One server, production "1" and challenger "2" stored; the deployment record is switched between the modes
in many short rounds (the server polls every 0.2 s here), so a drift in the machine's other load falls on
every mode alike and nothing differs between the modes but the routing:

- routing overhead: sequential `/predict` (PNG) p50/p99 under `replace`, `ab_test` at 0.1 without a key,
  and `ab_test` with an `X-Client-Key`;
- shadow: 8 concurrent clients under `replace` and `shadow`: p99 of production's answers, requests/s,
  and the shadow scorer's scored/dropped counts;
- the challenger's share of 10,000 keyless `ab_test` requests over HTTP, and of 10,000 distinct keys;
- `Router.choose` timed in process: the routing's whole cost on the request path, which HTTP latencies
  on a shared machine are too noisy to resolve.

The model is the production architecture trained one epoch on 10k real MNIST images (as in the inference
benchmark), served as production and, under another version, as the challenger (same cost).
The HTTP client is the inference benchmark's lean keep-alive client.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
import timeit
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from inference_benchmark import (  # noqa: E402 - the benchmark folder is not a package
    KeepAliveClient,
    concurrent_rate,
    free_port,
    http_request,
    launch,
    percentile_ms,
    read_real_mnist,
    sequential_latencies,
    stop,
    train_default_cnn,
    wait_until_up,
)

from mnist_dagster.lifecycle import deploy  # noqa: E402
from mnist_dagster.lifecycle.assignment import client_share  # noqa: E402
from mnist_dagster.lifecycle.record import Routing, Strategy, change_record  # noqa: E402
from mnist_dagster.lifecycle.routing import Router  # noqa: E402
from mnist_dagster.lifecycle.watcher import Deployment, LoadedModel  # noqa: E402
from mnist_dagster.scoring.bundle import make_bundle, store_bundle  # noqa: E402
from mnist_dagster.scoring.preprocess import encode_png  # noqa: E402
from mnist_dagster.storage import LocalStore  # noqa: E402

REPLACE = {"strategy": "replace"}
AB_TEST = {"strategy": "ab_test", "challenger_traffic": 0.1}
SHADOW = {"strategy": "shadow"}


@functools.cache
def real_mnist() -> dict:
    return read_real_mnist(REPO_ROOT.parent / "shared" / "data" / "mnist")


def start_server(folder: Path) -> tuple[object, int, LocalStore]:
    """Production "1" and challenger "2" (the same ONNX) published, the prediction log on; (process, port, store)."""
    store = LocalStore(folder / "store")
    model, _ = train_default_cnn(real_mnist(), 10_000)
    deploy.make_production(store, make_bundle("1", model.onnx), "serving A/B benchmark")
    store_bundle(store, make_bundle("2", model.onnx))
    port = free_port()
    command = [sys.executable, "-m", "mnist_dagster.serving.cli", "serve", "--port", str(port),
               "--store", str(store.root), "--log-flush-seconds", "1", "--poll-seconds", "0.2"]  # fmt: skip
    process = launch(command, folder / "server.log")
    wait_until_up(port, "/health", process, folder / "server.log")
    return process, port, store


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
        return json.loads(response.read())


def set_routing(store: LocalStore, port: int, routing: dict) -> None:
    """Change the deployment record as the Dagster side does, and wait until the server has it."""
    if routing["strategy"] == "replace":
        deploy.end_trial(store)
    else:
        wanted = Routing(Strategy(routing["strategy"]), routing.get("challenger_traffic", 0.0))
        change_record(store, lambda record: record.with_challenger("2", wanted))
    deadline = time.monotonic() + 10
    while health(port)["routing"]["strategy"] != routing["strategy"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not take up {routing}")
        time.sleep(0.05)


def with_client_key(request: bytes, key: str) -> bytes:
    head, _, body = request.partition(b"\r\n\r\n")
    return head + f"\r\nX-Client-Key: {key}".encode() + b"\r\n\r\n" + body


def png_requests(port: int, count: int = 200) -> list[bytes]:
    images = real_mnist()["test_images"][:count]
    return [http_request(port, "/predict", "image/png", encode_png(image)) for image in images]


def in_turns(store: LocalStore, port: int, modes: dict[str, tuple[dict, Callable]], rounds: int) -> dict:
    """Each mode's routing in force in turn, `rounds` times, its measurement run each time: {name: [results]}."""
    results: dict[str, list] = {name: [] for name in modes}
    for _ in range(rounds):
        for name, (routing, measurement) in modes.items():
            set_routing(store, port, routing)
            results[name].append(measurement())
    return results


def challenger_share(port: int, requests: list[bytes], count: int = 10_000) -> float:
    """The share of `count` keyless HTTP requests the challenger answered at a routing share of 0.1."""
    client = KeepAliveClient(port)
    try:
        arms = [json.loads(client.send(requests[i % len(requests)])[1])["arm"] for i in range(count)]
    finally:
        client.close()
    return arms.count("challenger") / count


def choose_cost_us(count: int = 200_000) -> dict[str, float]:
    """Microseconds per `Router.choose` per routing (best of 5): all the routing adds to a request."""
    production = LoadedModel(SimpleNamespace(version="1"), "t")
    challenger = LoadedModel(SimpleNamespace(version="2"), "t")
    cases = {
        "replace": (Routing(), None),
        "ab_test": (Routing(Strategy.ab_test, 0.1), None),
        "ab_test + key": (Routing(Strategy.ab_test, 0.1), "client-123"),
        "shadow": (Routing(Strategy.shadow), None),
    }
    costs = {}
    for name, (routing, key) in cases.items():
        router = Router(SimpleNamespace(current=Deployment(production, challenger, routing, "trial")))
        timer = timeit.Timer(lambda r=router, k=key: r.choose(k))
        costs[name] = min(timer.repeat(number=count, repeat=5)) / count * 1e6
    return costs


def measure(folder: Path, args: argparse.Namespace) -> dict:
    process, port, store = start_server(folder)
    try:
        requests = png_requests(port)
        keyed = [with_client_key(request, f"client-{i}") for i, request in enumerate(requests)]

        def sequential(payloads: list[bytes]) -> Callable[[], list[float]]:
            return lambda: sequential_latencies(port, payloads, args.requests, warmup=20)

        def loaded() -> tuple[float, list[float]]:
            return concurrent_rate(port, requests, args.clients, args.per_client)

        modes = {"replace": (REPLACE, sequential(requests)), "ab_test": (AB_TEST, sequential(requests))}
        modes["ab_test + key"] = (AB_TEST, sequential(keyed))
        latencies = in_turns(store, port, modes, args.rounds)
        under_load = in_turns(store, port, {"replace": (REPLACE, loaded), "shadow": (SHADOW, loaded)}, args.rounds)
        shadow_counts = health(port)["shadow"]
        set_routing(store, port, AB_TEST)
        http_share = challenger_share(port, requests)
    finally:
        stop(process)
    return {
        "sequential": {name: [value for block in blocks for value in block] for name, blocks in latencies.items()},
        "loaded": {
            name: {"rates": [rate for rate, _ in runs], "latencies": [value for _, block in runs for value in block]}
            for name, runs in under_load.items()
        },
        "shadow_counts": shadow_counts,
        "http_share": http_share,
    }


def report(results: dict, clients: int) -> None:
    print("\n| measurement | result |\n|---|---|")
    sequential = results["sequential"]
    base = percentile_ms(sequential["replace"], 50)
    for name, latencies in sequential.items():
        p50, p99 = percentile_ms(latencies, 50), percentile_ms(latencies, 99)
        extra = "" if name == "replace" else f" ({(p50 - base) * 1000:+.0f} us p50 vs replace)"
        print(f"| /predict PNG sequential, routing {name}: p50 / p99 (ms) | {p50:.3f} / {p99:.3f}{extra} |")
    loaded = results["loaded"]
    base_p99 = percentile_ms(loaded["replace"]["latencies"], 99)
    for name, result in loaded.items():
        p99, rate = percentile_ms(result["latencies"], 99), float(np.median(result["rates"]))
        extra = "" if name == "replace" else f" ({(p99 / base_p99 - 1) * 100:+.0f}% p99 vs replace)"
        print(f"| {clients} concurrent clients, routing {name}: req/s; p99 (ms) | {rate:,.0f}; {p99:.2f}{extra} |")
    print(f"| shadow scorer's counts after the run | {results['shadow_counts']} |")
    print(f"| challenger share, 10,000 keyless HTTP requests at 0.1 | {results['http_share']:.4f} |")
    keyed_share = sum(client_share(f"user-{i}") < 0.1 for i in range(10_000)) / 10_000
    print(f"| challenger share, 10,000 distinct client keys at 0.1 | {keyed_share:.4f} |")
    costs = ", ".join(f"{name} {us:.2f}" for name, us in choose_cost_us().items())
    print(f"| Router.choose in process (us per request) | {costs} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=20, help="turns of each routing")
    parser.add_argument("--requests", type=int, default=150, help="sequential requests per routing and turn")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=40, help="requests per concurrent client and round")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    with tempfile.TemporaryDirectory() as folder:
        results = measure(Path(folder), args)
    report(results, args.clients)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
