import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.exists():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED


@pytest.fixture(autouse=True, scope="session")
def _isolated_leaderboard_db(tmp_path_factory):
    """Commands under test that record results (herd eval) never touch the user's own leaderboard."""
    os.environ["LLAMAHERD_DB"] = str(tmp_path_factory.mktemp("leaderboard") / "leaderboard.sqlite")
