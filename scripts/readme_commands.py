#!/usr/bin/env python3
"""Print a command block of the README, so CI runs exactly what the README tells a person to run.

    python3 scripts/readme_commands.py install [README.md]   # the block after <!-- ci:install -->
    python3 scripts/readme_commands.py test [README.md]      # the block after <!-- ci:test -->

A block is the first fenced ```bash block after its marker line (blank lines may sit between). A
missing marker, a missing or unterminated fence, or an empty block is an error (exit 2), so a README
edit can never make CI run nothing. Standard library only: it runs before any virtualenv exists.
"""

import re
import sys
from pathlib import Path

MARKERS = {"install": "<!-- ci:install -->", "test": "<!-- ci:test -->"}
FENCE_OPEN = re.compile(r"^```(bash|sh|shell)\s*$")


class ReadmeError(ValueError):
    pass


def command_block(readme: str, name: str) -> str:
    """The commands in the fenced block right after `name`'s marker."""
    marker = MARKERS[name]
    lines = readme.splitlines()
    starts = [index for index, line in enumerate(lines) if line.strip() == marker]
    if len(starts) != 1:
        raise ReadmeError(f"expected exactly one line '{marker}' in the README, found {len(starts)}")
    index = starts[0] + 1
    while index < len(lines) and not lines[index].strip():
        index += 1
    if index == len(lines) or not FENCE_OPEN.match(lines[index].strip()):
        found = lines[index].strip() if index < len(lines) else "the end of the file"
        raise ReadmeError(f"'{marker}' must be followed by a ```bash block; found {found!r}")
    body = []
    for line in lines[index + 1 :]:
        if line.strip() == "```":
            break
        body.append(line)
    else:
        raise ReadmeError(f"the ```bash block after '{marker}' is never closed")
    if not any(line.strip() and not line.strip().startswith("#") for line in body):
        raise ReadmeError(f"the ```bash block after '{marker}' has no commands")
    return "\n".join(body) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or argv[1] not in MARKERS:
        print(__doc__, file=sys.stderr)
        return 2
    path = Path(argv[2] if len(argv) == 3 else Path(__file__).resolve().parents[1] / "README.md")
    try:
        sys.stdout.write(command_block(path.read_text(encoding="utf-8"), argv[1]))
    except (OSError, ReadmeError) as error:
        print(f"readme_commands: {path}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
