import os
import sys
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
