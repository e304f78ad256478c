"""Inference benchmark: the nightly batch and the HTTP endpoint against their peers, on this machine, in one run.

    python benchmarks/inference_benchmark.py [--mnist DIR] [--store LOCATION] [--train-images N]

The model: the production bundle in `--store` (`models/production`), or else the default CNN
(`TrainingConfig()`: channels 16/32, hidden 128) trained for one epoch on `--train-images` real
MNIST images right here. Test images are the real 10k MNIST test set.

- Batch: `score_inbox`, the function `batch_digit_predictions` runs, end to end on a local store
  (read a 10k-image `.npz` from the inbox, hash it, preprocess, score with ONNX Runtime, write the
  Parquet table and the ledger), best of `--repeats`. Peer: PyTorch eager on the same weights
  (inference only, no I/O: flatters it). Also a 1,000-file PNG inbox, for the per-file cost.
- Endpoint: `mnist-dagster serve` and `mlflow models serve --env-manager local` on the same ONNX
  model, both on 127.0.0.1, driven by the same lean keep-alive HTTP/1.1 client (raw sockets, in
  threads of this process): single-image requests one at a time (p50/p99 latency), then 8 concurrent
  clients (requests per second), in `--rounds` rounds where the servers take turns so that a change
  in the machine's other load falls on both. Ours is sent a PNG (what clients send) and, like for
  like with MLflow's JSON tensor, JSON pixels.
Every loop is bounded; both servers listen on loopback only and are stopped at the end.
"""

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from mnist_dagster.lifecycle import deploy  # noqa: E402
from mnist_dagster.scoring.batch import score_inbox  # noqa: E402
from mnist_dagster.scoring.bundle import Bundle, Predictor, make_bundle  # noqa: E402
from mnist_dagster.scoring.preprocess import encode_png  # noqa: E402
from mnist_dagster.storage import LocalStore, open_store  # noqa: E402

TARGETS = {"batch_images_per_second": 20_000, "p50_ms": 3.0, "p99_ms": 10.0, "concurrent_rps": 500, "vs_mlflow": 3.0}


# ---------------------------------------------------------------- the model
def read_real_mnist(folder: Path) -> dict:
    from mnist_dagster.ml import data

    with tempfile.TemporaryDirectory() as cache:
        data.fetch_mnist([str(folder)], Path(cache))  # verifies the md5s
        return {name: tensor.numpy() for name, tensor in data.read_mnist(Path(cache)).items()}


def train_default_cnn(mnist: dict, train_images: int) -> tuple[Bundle, dict]:
    """One epoch of the production architecture on real data: a real model in well under a minute."""
    import torch

    from mnist_dagster.ml import data, model
    from mnist_dagster.ml.config import TrainingConfig
    from mnist_dagster.ml.train import fit

    raw = {name: torch.from_numpy(array) for name, array in mnist.items()}
    raw["train_images"], raw["train_labels"] = raw["train_images"][:train_images], raw["train_labels"][:train_images]
    split = data.normalise_and_split(raw, val_fraction=0.1, seed=0)
    trained = fit(split, TrainingConfig(epochs=1))
    print(f"trained the default CNN for 1 epoch on {len(split.train_labels)} images in {trained.seconds:.1f} s")
    return make_bundle("benchmark", model.export_onnx(trained.checkpoint)), trained.checkpoint


def accuracy(bundle: Bundle, images: np.ndarray, labels: np.ndarray) -> float:
    probabilities = Predictor(bundle).predict_proba(images[:, None].astype(np.float32) / 255)
    return float((probabilities.argmax(1) == labels).mean())


# ---------------------------------------------------------------- batch
def npz_bytes(images: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=images)
    return buffer.getvalue()


def batch_throughput(bundle: Bundle, images: np.ndarray, repeats: int) -> list[float]:
    """Images per second of `score_inbox` over a fresh 10k-image inbox, one value per repeat."""
    predictor = Predictor(bundle)  # as batch_digit_predictions runs it
    payload = npz_bytes(images)
    rates = []
    for repeat in range(repeats):
        with tempfile.TemporaryDirectory() as folder:
            store = LocalStore(folder)
            store.write_bytes("inbox/batch.npz", payload)
            result = score_inbox(store, predictor, f"bench-{repeat}")
            assert len(result.predictions) == len(images), "every image must be scored"
            rates.append(result.images_per_second)
    return rates


def png_inbox_throughput(bundle: Bundle, images: np.ndarray) -> float:
    predictor = Predictor(bundle)
    with tempfile.TemporaryDirectory() as folder:
        store = LocalStore(folder)
        for index, image in enumerate(images):
            store.write_bytes(f"inbox/png/{index:05d}.png", encode_png(image))
        return score_inbox(store, predictor, "bench-png").images_per_second


def torch_eager_throughput(checkpoint: dict, images: np.ndarray, repeats: int) -> list[float]:
    """The same weights in PyTorch eager, inference only (chunks of 512), as the peer for the batch."""
    import torch

    from mnist_dagster.ml.model import ServingModel, load_checkpoint

    net, norm = load_checkpoint(checkpoint)
    serving = ServingModel(net, norm["mean"], norm["std"]).eval()
    pixels = torch.from_numpy(images[:, None].astype(np.float32) / 255)
    rates = []
    with torch.inference_mode():
        serving(pixels[:512])
        for _ in range(repeats):
            started = time.perf_counter()
            for start in range(0, len(pixels), 512):
                serving(pixels[start : start + 512])
            rates.append(len(pixels) / (time.perf_counter() - started))
    return rates


# ---------------------------------------------------------------- HTTP
class KeepAliveClient:
    """HTTP/1.1 over one persistent socket, the least client work per request (both servers alike)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def send(self, request: bytes) -> tuple[int, bytes]:
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buffer:
            self._receive()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        headers = head.decode("latin-1").lower()
        if "transfer-encoding: chunked" in headers:
            raise RuntimeError("chunked responses are not handled by this client")
        length = int(headers.split("content-length:", 1)[1].split("\r\n", 1)[0])
        while len(rest) < length:
            self.buffer = rest
            self._receive()
            rest = self.buffer
        self.buffer = rest[length:]
        return int(head[9:12]), rest[:length]

    def _receive(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


def http_request(port: int, path: str, content_type: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def sequential_latencies(port: int, requests: list[bytes], count: int, warmup: int = 200) -> list[float]:
    client = KeepAliveClient(port)
    try:
        for index in range(warmup):
            client.send(requests[index % len(requests)])
        latencies = []
        for index in range(count):
            started = time.perf_counter()
            status, _ = client.send(requests[index % len(requests)])
            latencies.append(time.perf_counter() - started)
            assert status == 200, status
        return latencies
    finally:
        client.close()


def concurrent_rate(port: int, requests: list[bytes], clients: int, per_client: int) -> tuple[float, list[float]]:
    """`clients` threads, each on its own connection, `per_client` requests each: requests per second."""
    connections = [KeepAliveClient(port) for _ in range(clients)]
    for connection in connections:
        connection.send(requests[0])
    start = threading.Barrier(clients + 1)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            start.wait()
            for step in range(per_client):
                began = time.perf_counter()
                status, _ = connections[index].send(requests[(index * per_client + step) % len(requests)])
                latencies[index].append(time.perf_counter() - began)
                assert status == 200, status
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    for connection in connections:
        connection.close()
    if errors:
        raise errors[0]
    return clients * per_client / elapsed, [value for values in latencies for value in values]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(port: int, path: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"server on port {port} did not answer {path} within {timeout} s")


def start_ours(bundle: Bundle, folder: Path) -> tuple[subprocess.Popen, int]:
    store = LocalStore(folder / "store")
    deploy.make_production(store, bundle, "inference benchmark")
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mnist_dagster.serving.cli",
        "serve",
        "--port",
        str(port),
        "--store",
        str(store.root),
    ]
    process = launch(command, folder / "ours.log")
    wait_until_up(port, "/health", process, folder / "ours.log")
    return process, port


def start_mlflow(bundle: Bundle, folder: Path) -> tuple[subprocess.Popen, int]:
    """The same ONNX logged with `mlflow.onnx.log_model` (as digit_classifier does) into a temporary store."""
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    tracking = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking)
    # Artifacts beside the temporary store, not in ./mlruns (the default for a SQLite store).
    experiment = mlflow.create_experiment("inference-benchmark", artifact_location=(folder / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.onnx.log_model(
            onnx.load_from_string(bundle.onnx),
            name="model",
            signature=infer_signature(np.zeros((1, 1, 28, 28), np.float32), np.full((1, 10), 0.1, np.float32)),
            pip_requirements=["onnxruntime", "onnx", "numpy"],
        )
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        info.model_uri,
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    # it execs `uvicorn` by name: the virtual environment's bin folder must be on PATH
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    process = launch(command, folder / "mlflow.log", env)
    wait_until_up(port, "/ping", process, folder / "mlflow.log")
    return process, port


def launch(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A server in a session of its own (so `stop` ends the workers it spawns too), its output in `log`."""
    with open(log, "wb") as output:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    """Stop a server started in its own session, with whatever workers it spawned."""
    try:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000


# ---------------------------------------------------------------- report
def main() -> None:
    args = parse_args()
    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start (other work here skews all numbers)"
    )
    mnist = read_real_mnist(args.mnist)
    images, labels = mnist["test_images"], mnist["test_labels"]
    checkpoint = None
    if args.store:
        bundle = deploy.production_bundle(open_store(args.store))
        if bundle is None:
            sys.exit(f"no production model in the deployment record under {args.store}")
    else:
        bundle, checkpoint = train_default_cnn(mnist, args.train_images)
    print(
        f"model {bundle.version}: test accuracy {accuracy(bundle, images, labels):.4f} on {len(labels)} real test images"
    )

    rows = batch_rows(bundle, checkpoint, images, args.repeats)
    with tempfile.TemporaryDirectory() as folder:
        servers = []
        try:
            servers.append(start_ours(bundle, Path(folder)))
            servers.append(start_mlflow(bundle, Path(folder)))
            payloads = endpoint_payloads(servers[0][1], servers[1][1], images[:200])
            check_answers(payloads, labels)
            results = measure_endpoints(payloads, args)
        finally:
            for process, _ in servers:
                stop(process)
    rows += endpoint_rows(results, args.clients)

    print("\n| measurement | result | target / ratio |\n|---|---|---|")
    for row in rows:
        print(f"| {' | '.join(row)} |")
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--mnist", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "mnist", help="the 4 .gz files"
    )
    parser.add_argument("--store", help="a store holding a production bundle (default: train one here)")
    parser.add_argument("--train-images", type=int, default=20_000, help="real images for the 1-epoch training")
    parser.add_argument("--repeats", type=int, default=3, help="batch runs (the best is reported)")
    parser.add_argument("--rounds", type=int, default=3, help="endpoint rounds, the servers taking turns")
    parser.add_argument("--requests", type=int, default=1000, help="sequential requests per server, payload and round")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=150, help="requests per concurrent client and round")
    return parser.parse_args()


def batch_rows(bundle: Bundle, checkpoint: dict | None, images: np.ndarray, repeats: int) -> list[tuple[str, str, str]]:
    batch = batch_throughput(bundle, images, repeats)
    print(f"batch runs (images/s): {', '.join(f'{rate:,.0f}' for rate in batch)}")
    target = f">= {TARGETS['batch_images_per_second']:,}"
    rows = [("batch: 10k-image .npz, end to end (images/s)", f"{max(batch):,.0f}", target)]
    if checkpoint is not None:
        eager = max(torch_eager_throughput(checkpoint, images, repeats))
        rows.append(
            ("batch: PyTorch eager, inference only (images/s)", f"{eager:,.0f}", f"ours {max(batch) / eager:.1f}x")
        )
    png = png_inbox_throughput(bundle, images[:1000])
    rows.append(("batch: 1,000 PNG files, end to end (images/s)", f"{png:,.0f}", "per-file cost"))
    return rows


def endpoint_payloads(ours: int, mlflow_port: int, images: np.ndarray) -> dict[str, tuple[int, list[bytes]]]:
    """Ready-made requests: each server in its own format, for the same real test images."""

    def ours_json(image: np.ndarray) -> bytes:
        return json.dumps({"pixels": image.tolist()}).encode()

    def mlflow_json(image: np.ndarray) -> bytes:
        return json.dumps({"inputs": (image[None, None] / 255).tolist()}).encode()

    return {
        "ours PNG": (ours, [http_request(ours, "/predict", "image/png", encode_png(image)) for image in images]),
        "ours JSON": (ours, [http_request(ours, "/predict", "application/json", ours_json(image)) for image in images]),
        "mlflow JSON": (
            mlflow_port,
            [http_request(mlflow_port, "/invocations", "application/json", mlflow_json(image)) for image in images],
        ),
    }


def measure_endpoints(payloads: dict, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Sequential latency and concurrent throughput, in `args.rounds` rounds where the servers take turns,
    so a change in the machine's other load falls on both; latencies pooled, throughput the median round."""
    latencies: dict[str, list[float]] = {name: [] for name in payloads}
    loaded: dict[str, list[float]] = {name: [] for name in payloads}
    rates: dict[str, list[float]] = {name: [] for name in payloads}
    for _ in range(args.rounds):
        for name, (port, requests) in payloads.items():
            latencies[name] += sequential_latencies(port, requests, args.requests)
            rate, under_load = concurrent_rate(port, requests, args.clients, args.per_client)
            rates[name].append(rate)
            loaded[name] += under_load
    return {
        name: {
            "p50": percentile_ms(latencies[name], 50),
            "p99": percentile_ms(latencies[name], 99),
            "rate": float(np.median(rates[name])),
            "loaded_p99": percentile_ms(loaded[name], 99),
        }
        for name in payloads
    }


def endpoint_rows(results: dict[str, dict[str, float]], clients: int) -> list[tuple[str, str, str]]:
    peer = results["mlflow JSON"]
    rows = []
    for name, result in results.items():
        ours = not name.startswith("mlflow")
        latency_ratio = (
            f"; {peer['p50'] / result['p50']:.1f}x / {peer['p99'] / result['p99']:.1f}x MLflow's" if ours else ""
        )
        rows.append(
            (
                f"endpoint {name}: sequential p50 / p99 (ms)",
                f"{result['p50']:.2f} / {result['p99']:.2f}",
                f"<= {TARGETS['p50_ms']} / {TARGETS['p99_ms']}{latency_ratio}",
            )
        )
        rate_ratio = f"; {result['rate'] / peer['rate']:.1f}x MLflow's" if ours else ""
        rows.append(
            (
                f"endpoint {name}: {clients} concurrent clients (req/s; p99 ms)",
                f"{result['rate']:,.0f}; {result['loaded_p99']:.1f}",
                f">= {TARGETS['concurrent_rps']}{rate_ratio}",
            )
        )
    return rows


def check_answers(payloads: dict, labels: np.ndarray) -> None:
    """Each server must get the first 20 test images (nearly) right before anything is timed."""
    for name, (port, requests) in payloads.items():
        client = KeepAliveClient(port)
        digits = []
        for request in requests[:20]:
            status, body = client.send(request)
            if status != 200:
                raise RuntimeError(f"{name}: HTTP {status}: {body[:300]!r}")
            answer = json.loads(body)
            digits.append(
                answer["digit"] if "digit" in answer else int(np.argmax(answer["predictions"]["probabilities"][0]))
            )
        client.close()
        correct = int((np.array(digits) == labels[:20]).sum())
        print(f"{name}: {correct}/20 of the first test images right")
        if correct < 15:
            raise RuntimeError(f"{name} answers wrongly: {digits}")


if __name__ == "__main__":
    main()
