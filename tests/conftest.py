import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
sys.path.insert(0, str(ROOT))


@pytest.fixture
def spec_file(tmp_path):
    """Write spec text to a file and return its path."""

    def write(text: str, name: str = "t.net") -> str:
        p = tmp_path / name
        p.write_text(text)
        return str(p)

    return write


def pytest_runtest_setup(item):
    """CI's run has 90 minutes: .ci/run sets NETDSL_TEST_DEADLINE (a Unix
    time) for its slow variants, and a slow test that would start after it
    is reported skipped, with this reason, instead of overrunning the budget
    (the fast suite always runs whole)."""
    deadline = os.environ.get("NETDSL_TEST_DEADLINE")
    if deadline and item.get_closest_marker("slow") is not None and time.time() > float(deadline):
        pytest.skip("skipped: past the CI run's time budget for slow tests (NETDSL_TEST_DEADLINE)")
