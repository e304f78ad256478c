"""Data-parallel training with PyTorch's own launcher: torchrun starts N workers, each runs `ml.train.fit`.

One module, two commands (`python -m mnist_dagster.ml.distributed launch|worker ...`):

- `launch`: torchrun itself (`torch.distributed.run.main`, what the `torchrun` script calls) with
  `--standalone --nproc_per_node=N`. One addition: when a worker fails, torchrun's own failure record
  (rank, pid, exit code or signal, the worker's Python error and traceback) is also written as JSON, so
  the caller can fail with the worker's error instead of "exit code 1". torchrun stops the other workers.
- `worker`: what torchrun starts N times. Join the process group (gloo on CPU, nccl on CUDA, one GPU per
  local rank), load the split, `fit` (which trains DDP when a process group is up), and on rank 0 write
  the checkpoint and report each epoch and the result.

Rank 0 reports through Dagster Pipes when a Dagster step started the launch (`dagster_pipes`: the
protocol-only package, no Dagster inside), and prints otherwise (the benchmark). No Dagster import in
this module. The caller's side is here too: `save_split` writes what the workers read, `collect` turns
rank 0's checkpoint and messages back into a `TrainedModel`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.run import main as torchrun

from mnist_dagster.ml.config import TrainingConfig
from mnist_dagster.ml.data import NormalisedSplit
from mnist_dagster.ml.model import load_checkpoint, parameter_count
from mnist_dagster.ml.train import EpochStats, TrainedModel, fit

WORKER_MODULE = "mnist_dagster.ml.distributed"
#: Custom messages the worker sends over Pipes: {"kind": EPOCH, **EpochStats} and {"kind": RESULT, ...}.
EPOCH, RESULT = "epoch", "result"


def backend_for(device: str) -> str:
    """gloo on CPU, nccl on CUDA: the backends PyTorch recommends for each."""
    return "nccl" if device.startswith("cuda") else "gloo"


def check_processes(processes: int, device: str, gpus: int | None = None) -> None:
    """On CUDA each worker owns one GPU: more workers than GPUs is an error here, not a hang later."""
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    if device.startswith("cuda"):
        if gpus is None:
            gpus = torch.cuda.device_count()
        if processes > gpus:
            raise ValueError(f"processes={processes} but this node has {gpus} GPU(s): one worker per GPU")


def launch_command(
    processes: int, split: Path | str, config: dict[str, Any], checkpoint: Path | str, device: str,
    mixed_precision: bool, failures: Path | str, log_dir: Path | str, python: str = sys.executable,
    standalone: bool = True,
) -> list[str]:
    """The command line: `python` running torchrun (`launch`), which runs `worker` N times on this node.

    `standalone=False` is for a multi-node job (a Kubeflow PyTorchJob): torchrun then takes the node count,
    this node's rank and the rendezvous address from the PET_* variables the operator sets.
    """
    return [
        python, "-m", WORKER_MODULE, "launch", "--failures", str(failures), "--",
        *(["--standalone"] if standalone else []), f"--nproc_per_node={processes}", f"--log-dir={log_dir}",
        "--module", WORKER_MODULE, "worker",
        "--split", str(split), "--config", json.dumps(config), "--checkpoint", str(checkpoint),
        "--device", device, "--mixed-precision", "1" if mixed_precision else "0",
    ]  # fmt: skip


def launch(torchrun_args: Sequence[str], failures: Path) -> None:
    """torchrun with `torchrun_args`; on a worker's failure, its record goes to `failures` and it raises."""
    try:
        torchrun(list(torchrun_args))
    except ChildFailedError as error:
        failures.write_text(json.dumps(describe_failure(error), indent=1))
        raise


def describe_failure(error: Any) -> dict[str, Any]:
    """torchrun's `ChildFailedError` as plain data, the root cause first.

    torchrun orders failures by time, but a worker killed from outside (SIGKILL, the OOM killer, a segfault)
    leaves no error file, so it is timed when torchrun notices, after its peers' "connection closed" errors
    that it caused. Such a rank comes first; SIGTERM is torchrun stopping the survivors, not a cause.
    """
    first_rank, _ = error.get_first_failure()
    described = {rank: _failure(rank, failure) for rank, failure in error.failures.items()}
    killed = sorted(rank for rank, item in described.items() if item["signal"] not in (None, "SIGTERM") and not item["traceback"])
    ranks = list(dict.fromkeys([*killed, first_rank, *sorted(described)]))
    return {"report": error.format_msg(), "failures": [described[rank] for rank in ranks]}


def _failure(rank: int, failure: Any) -> dict[str, Any]:
    message = failure.message
    traceback = ""
    if isinstance(message, dict):  # a Python error recorded by the worker's @record
        traceback = message.get("extraInfo", {}).get("py_callstack", "")
        message = message.get("message", "")
    signal = failure.signal_name() if failure.exitcode < 0 else None
    return {"rank": rank, "pid": failure.pid, "exitcode": failure.exitcode, "signal": signal, "message": str(message),
            "traceback": traceback}  # fmt: skip


def failure_summary(failures: dict[str, Any]) -> str:
    """One line a person reads first: which rank died, and how."""
    root = failures["failures"][0]
    how = f"killed by {root['signal']}" if root["signal"] else f"exit code {root['exitcode']}"
    return f"DDP worker rank {root['rank']} (pid {root['pid']}) failed, {how}: {root['message']}"


# ----- the caller's side: what the workers read, and what rank 0 leaves ------------------------------


def save_split(split: NormalisedSplit, path: Path) -> None:
    """The split as the workers load it (`worker --split`)."""
    torch.save(split.as_dict(), path)


def collect(messages: Sequence[Mapping[str, Any]], checkpoint: Path, device: str) -> TrainedModel:
    """The `TrainedModel` rank 0 saved at `checkpoint` and reported in `messages` (its EPOCH and RESULT
    messages), with the network loaded on `device`."""
    history = [EpochStats(**_without_kind(m)) for m in messages if m.get("kind") == EPOCH]
    result = next(m for m in messages if m.get("kind") == RESULT)
    state = torch.load(checkpoint, weights_only=True)
    model, _ = load_checkpoint(state, device)
    return TrainedModel(state, history, result["seconds"], parameter_count(model), model)


def _without_kind(message: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in message.items() if key != "kind"}


# ----- the worker ---------------------------------------------------------------------------------


def _parse_worker(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"{WORKER_MODULE} worker")
    parser.add_argument("--split", type=Path, required=True, help="torch.save'd NormalisedSplit.as_dict()")
    parser.add_argument("--config", required=True, help="TrainingConfig.as_params() as JSON")
    parser.add_argument("--checkpoint", type=Path, required=True, help="where rank 0 writes the checkpoint")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--mixed-precision", default="1", choices=("0", "1"))
    return parser.parse_args(argv)


@record  # torchrun's error file: the worker's exception and traceback reach `launch`'s failure record
def worker(argv: Sequence[str]) -> None:
    """One data-parallel rank: join the group, train through `fit`, rank 0 saves and reports."""
    args = _parse_worker(argv)
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend_for(args.device))
    try:
        if dist.get_rank() == 0:
            with _reporter() as report:
                _train(args, report)
        else:
            _train(args, None)
    finally:
        dist.destroy_process_group()


def _train(args: argparse.Namespace, report: Callable[[str, dict[str, Any]], None] | None) -> None:
    split = NormalisedSplit.from_dict(torch.load(args.split, weights_only=True))
    config = TrainingConfig.from_mapping(json.loads(args.config))

    def on_epoch(stats: EpochStats) -> None:
        if report:
            line = (f"epoch {stats.epoch}/{config.epochs}: train_loss={stats.train_loss:.4f} "
                    f"val_accuracy={stats.val_accuracy:.4f} ({stats.seconds:.1f}s)")  # fmt: skip
            report(line, {"kind": EPOCH, **asdict(stats)})

    trained = fit(split, config, args.device, args.mixed_precision == "1", on_epoch=on_epoch)
    if report:  # rank 0: its weights are every rank's (DDP keeps them in step); BN buffers are rank 0's
        temporary = args.checkpoint.with_suffix(".partial")
        torch.save(trained.checkpoint, temporary)
        temporary.replace(args.checkpoint)
        result = {"kind": RESULT, "seconds": trained.seconds, "parameters": trained.parameters,
                  "checkpoint": str(args.checkpoint), "world_size": int(os.environ["WORLD_SIZE"])}  # fmt: skip
        report(f"trained on {result['world_size']} processes in {trained.seconds:.1f}s", result)


class _reporter:
    """Rank 0's channel: Dagster Pipes when a Pipes session started us, else stdout (JSON lines)."""

    def __enter__(self) -> Callable[[str, dict[str, Any]], None]:
        self._pipes = open_dagster_pipes() if DAGSTER_PIPES_CONTEXT_ENV_VAR in os.environ else None
        if self._pipes is None:
            return lambda line, message: print(json.dumps({"line": line, **message}), flush=True)
        pipes = self._pipes.__enter__()

        def send(line: str, message: dict[str, Any]) -> None:
            pipes.log.info(line)
            pipes.report_custom_message(message)

        return send

    def __exit__(self, *exc_info: object) -> bool:
        if self._pipes is not None:
            self._pipes.__exit__(*exc_info)  # reports the exception, if any, to the Dagster step
        return False


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "worker":
        worker(rest)
    elif command == "launch" and len(rest) >= 3 and rest[0] == "--failures" and rest[2] == "--":
        launch(rest[3:], Path(rest[1]))
    else:
        sys.exit(f"usage: python -m {WORKER_MODULE} launch --failures FILE -- TORCHRUN_ARGS | worker ARGS")


if __name__ == "__main__":
    main()
