#!/usr/bin/env python3
"""Fail unless every test of the named test files ran and passed, according to pytest's JUnit XML.

    python3 scripts/require_passed.py JUNIT_XML mnist_dagster_tests/test_ui_e2e.py [...]

CI uses it for the tests that prove the README's promise: they skip (saying why) on a machine without
Chromium or the real MNIST files, which is right on a laptop and wrong in CI, where both are installed.
Standard library only.
"""

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def outcomes(junit_xml: Path, test_file: str) -> dict[str, str]:
    """Test name -> passed | skipped: reason | failed | error, for the tests of `test_file`."""
    classname = test_file.removesuffix(".py").replace("/", ".")
    results = {}
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        if case.get("classname") != classname:
            continue
        outcome = "passed"
        for kind in ("skipped", "failure", "error"):
            element = case.find(kind)
            if element is not None:
                outcome = f"{kind}: {element.get('message', '')}".strip()
        results[case.get("name")] = outcome
    return results


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    junit_xml, problems = Path(argv[1]), []
    for test_file in argv[2:]:
        results = outcomes(junit_xml, test_file)
        if not results:
            problems.append(f"{test_file}: no test ran")
        problems += [f"{test_file}::{name}: {outcome}" for name, outcome in results.items() if outcome != "passed"]
        print(f"require_passed: {test_file}: {len(results)} test(s) collected")
    for problem in problems:
        print(f"require_passed: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
