"""The house rules of docs/architecture.md, enforced: each room of `mnist_dagster` imports only what it may.

Every module is parsed with `ast` (nothing is imported, so a rule holds whether or not a package is
installed), and every import counts, at the top of a module or inside a function. A room whose folder does
not exist yet is skipped, saying so; a top-level module that belongs to no room fails, so a new room comes
with its rule.
"""

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mnist_dagster_tests.support import REPO_ROOT

PACKAGE = "mnist_dagster"
PACKAGE_DIR = REPO_ROOT / PACKAGE

#: The process that serves HTTP, and the clients that speak it.
WEB_FRAMEWORKS = ("fastapi", "starlette", "uvicorn")
HTTP_CLIENTS = ("urllib.request", "http.client", "requests", "httpx")
#: Every Dagster package: `dagster` and the `dagster_*` integrations.
DAGSTER = "dagster*"
GROUND = ("digits", "layout", "storage")
PLAIN_ROOMS = ("ml", "scoring", "lifecycle", "serving")


@dataclass(frozen=True)
class Room:
    """A room of the house: what of the package it may import, and what from outside it must not."""

    name: str  # a folder or a module directly under mnist_dagster/
    may_import: tuple[str, ...]  # rooms (`ml`) or modules of a room (`ml.compare`) of the package
    banned: tuple[str, ...]  # outside packages or modules; `dagster*` is every Dagster package
    allowed: tuple[str, ...] = ()  # exceptions to `banned`, each with its reason in `why`
    why: str = ""
    owed: tuple[str, ...] = ()  # imports the plan forbids that the code still makes, until they move (see docs)


ROOMS = (
    Room("digits", (), (DAGSTER,), why="the image format: everything stands on it"),
    Room("layout", ("digits",), (DAGSTER,), why="the map of the store: names only"),
    Room(
        "storage",
        ("storage", "digits", "layout"),
        (DAGSTER, *WEB_FRAMEWORKS),
        why="where bytes live and how they get there durably (the Store, the journal, its shipper, JSON-lines logs), "
        "under every room; it knows no prediction or feedback field",
    ),
    Room(
        "ml",
        ("ml", "digits", "layout"),
        (DAGSTER, *WEB_FRAMEWORKS, "mlflow", "boto3", "botocore", "onnxruntime"),
        allowed=("dagster_pipes",),
        why="plain PyTorch; the DDP worker reports to its step through dagster_pipes, a single module without Dagster",
    ),
    Room(
        "scoring",
        ("scoring", *GROUND),
        (DAGSTER, *WEB_FRAMEWORKS, "torch", "torchvision", "mlflow"),
        why="bundle, preprocessing, predictor on ONNX Runtime, for the endpoint and the batch alike: no torch, no HTTP",
    ),
    Room(
        "lifecycle",
        (
            "lifecycle",
            "scoring",
            "ml.compare",
            "ml.drift",
            "ml.cbpe",
            "serving.prediction_log",
            "serving.feedback",
            *GROUND,
        ),
        (DAGSTER, *WEB_FRAMEWORKS, *HTTP_CLIENTS, "torch", "torchvision", "mlflow"),
        why="the deployment record, its decisions as functions of the store, and how a server follows it (watcher, "
        "routing, shadow): no Dagster, no HTTP, no registry; it reads the logs the endpoint writes through their own "
        "formats (serving's prediction_log, feedback)",
    ),
    Room(
        "serving",
        (
            "serving",
            "scoring",
            "lifecycle.record",
            "lifecycle.assignment",
            "lifecycle.watcher",
            "lifecycle.routing",
            "lifecycle.shadow",
            *GROUND,
        ),
        (DAGSTER, "torch", "torchvision", "mlflow"),
        why="the HTTP process only: routes, their models, the page and the write path; it follows the deployment "
        "record through lifecycle's watcher, router and shadow scorer, never Dagster or the training",
    ),
    Room(
        "resources",
        ("resources", *PLAIN_ROOMS, *GROUND),
        (),
        why="Dagster resources wrap the plain rooms; assets, jobs and sensors use them, not the other way round",
    ),
    Room("assets", ("assets", "resources", *PLAIN_ROOMS, *GROUND), (), why="thin steps over the plain rooms"),
    Room("jobs", ("jobs", "assets", "resources", *PLAIN_ROOMS, *GROUND), (), why="jobs and schedules over the assets"),
    Room(
        "sensors",
        ("sensors", "jobs", "assets", "resources", *PLAIN_ROOMS, *GROUND),
        (),
        why="sensors name jobs and assets; only the code location gathers them",
    ),
    Room(
        "definitions",
        ("definitions", "sensors", "jobs", "assets", "resources", *PLAIN_ROOMS, *GROUND),
        (),
        why="the code location: the one place that sees every room",
    ),
    Room("__init__", ("definitions",), (DAGSTER,), why="the package root hands `defs` over lazily, without Dagster"),
)
ROOMS_BY_NAME = {room.name: room for room in ROOMS}


@dataclass(frozen=True)
class Import:
    path: Path
    line: int
    module: str  # the imported module, absolute


def room_path(package_dir: Path, name: str) -> Path | None:
    """The folder or module of a room, or None while it does not exist."""
    for candidate in (package_dir / name, package_dir / f"{name}.py"):
        if candidate.exists():
            return candidate
    return None


def module_name(package_dir: Path, path: Path) -> str:
    parts = path.relative_to(package_dir.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(package_dir: Path, path: Path) -> Iterator[Import]:
    """Every module `path` imports, relative imports made absolute; `from a import b` yields `a.b` when b is a
    module of the package, else `a` (and, outside the package, both, so `from urllib import request` is caught)."""
    here = module_name(package_dir, path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (Import(path, node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                if module.split(".")[0] != PACKAGE:
                    yield Import(path, node.lineno, module)
                    yield Import(path, node.lineno, submodule)
                elif is_package_module(package_dir, submodule):
                    yield Import(path, node.lineno, submodule)
                else:
                    yield Import(path, node.lineno, module)


def is_package_module(package_dir: Path, module: str) -> bool:
    relative = Path(*module.split(".")[1:])
    return (package_dir / relative).is_dir() or (package_dir / relative).with_suffix(".py").is_file()


def matches(module: str, pattern: str) -> bool:
    """`pattern` names `module` or a package above it; `dagster*` names every Dagster package."""
    if pattern == DAGSTER:
        top = module.split(".")[0]
        return top == "dagster" or top.startswith("dagster_")
    return module == pattern or module.startswith(f"{pattern}.")


def room_imports(package_dir: Path, room: Room) -> list[Import]:
    where = room_path(package_dir, room.name)
    files = sorted(where.rglob("*.py")) if where.is_dir() else [where]
    return [item for path in files for item in imports_of(package_dir, path)]


def inside_package(module: str) -> str | None:
    """`mnist_dagster.ml.data` -> `ml.data`; the package itself -> `__init__`; None for a module outside it."""
    if module == PACKAGE or module.startswith(f"{PACKAGE}."):
        return module.removeprefix(PACKAGE).lstrip(".") or "__init__"
    return None


def violations(package_dir: Path, room: Room) -> list[str]:
    """Each import of `room` that its rule forbids, as `file:line imports module`."""
    found = []
    for imported in room_imports(package_dir, room):
        module = imported.module
        inside = inside_package(module)
        if inside is not None:
            if not any(matches(inside, allowed) for allowed in (*room.may_import, *room.owed)):
                found.append(f"{imported.path.relative_to(package_dir.parent)}:{imported.line} imports {module}")
        elif any(matches(module, banned) for banned in room.banned) and not any(
            matches(module, allowed) for allowed in room.allowed
        ):
            found.append(f"{imported.path.relative_to(package_dir.parent)}:{imported.line} imports {module}")
    return sorted(set(found))


def paid_debts(package_dir: Path, room: Room) -> list[str]:
    """The owed imports of `room` that none of its modules makes any more."""
    made = [inside_package(item.module) for item in room_imports(package_dir, room)]
    return [owed for owed in room.owed if not any(module and matches(module, owed) for module in made)]


def rooms_on_disk(package_dir: Path) -> list[str]:
    """The top-level modules and packages (namespace packages too) of the package, by room name."""
    names = {path.stem for path in package_dir.glob("*.py")}
    names |= {path.name for path in package_dir.iterdir() if path.is_dir() and any(path.rglob("*.py"))}
    return sorted(names)


@pytest.mark.parametrize("room", ROOMS, ids=lambda room: room.name)
def test_each_room_imports_only_what_it_may(room: Room):
    if room_path(PACKAGE_DIR, room.name) is None:
        pytest.skip(f"mnist_dagster/{room.name} does not exist yet")
    found = violations(PACKAGE_DIR, room)
    assert not found, (
        f"mnist_dagster/{room.name} ({room.why}) may import only {', '.join(room.may_import) or 'nothing'} of the "
        f"package and none of {', '.join(room.banned)}; docs/architecture.md has the plan:\n  " + "\n  ".join(found)
    )


@pytest.mark.parametrize("room", [room for room in ROOMS if room.owed], ids=lambda room: room.name)
def test_each_owed_import_is_still_made(room: Room):
    """An owed import that the code no longer makes is paid: the rule tightens, here and in the docs."""
    if room_path(PACKAGE_DIR, room.name) is None:
        pytest.skip(f"mnist_dagster/{room.name} does not exist yet")
    paid = paid_debts(PACKAGE_DIR, room)
    assert not paid, f"mnist_dagster/{room.name} no longer imports {paid}: remove them from `owed` and the docs' table"


def test_every_top_level_module_is_a_room_of_the_plan():
    unplanned = [name for name in rooms_on_disk(PACKAGE_DIR) if name not in ROOMS_BY_NAME]
    assert not unplanned, (
        f"{unplanned} under mnist_dagster/ belong to no room: give each a row in docs/architecture.md's import table "
        "and a Room in this test"
    )


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_the_checker_finds_each_kind_of_forbidden_import(tmp_path):
    """The rules can fail: a made-up package breaking each kind of rule is caught, line by line."""
    package = tmp_path / PACKAGE
    write(package / "__init__.py", "")
    write(package / "layout.py", "")
    write(package / "assets" / "__init__.py", "")
    write(package / "ml" / "__init__.py", "")
    write(package / "ml" / "train.py", "import torch\nfrom dagster_pipes import open_dagster_pipes\n")
    write(package / "ml" / "bad.py", "def f():\n    import dagster as dg\n\nfrom ..assets import x\n")
    write(package / "lifecycle" / "__init__.py", "")
    write(package / "lifecycle" / "record.py", "from urllib import request\nfrom mnist_dagster.ml import compare\n")
    write(package / "ml" / "compare.py", "")
    write(package / "serving" / "__init__.py", "")
    serving_app = "from mnist_dagster.lifecycle import record\nfrom mnist_dagster import assets"
    write(package / "serving" / "app.py", serving_app)

    assert violations(package, ROOMS_BY_NAME["ml"]) == [
        "mnist_dagster/ml/bad.py:2 imports dagster",
        "mnist_dagster/ml/bad.py:4 imports mnist_dagster.assets",
    ]
    assert violations(package, ROOMS_BY_NAME["lifecycle"]) == [
        "mnist_dagster/lifecycle/record.py:1 imports urllib.request",
    ]
    assert paid_debts(package, ROOMS_BY_NAME["lifecycle"]) == list(ROOMS_BY_NAME["lifecycle"].owed)
    assert violations(package, ROOMS_BY_NAME["serving"]) == [
        "mnist_dagster/serving/app.py:2 imports mnist_dagster.assets",
    ]
