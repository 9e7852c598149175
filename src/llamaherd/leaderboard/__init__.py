"""Leaderboard: a SQLite registry of models, their lineage and their results, as a terminal table and a web page."""

from llamaherd.leaderboard.cli import story_summary
from llamaherd.leaderboard.ingest import (
    RecordedLineage,
    RecordedResults,
    import_lineage,
    import_lineage_near,
    record_results,
)
from llamaherd.leaderboard.ranking import BoardRow, board_data, board_rows, model_detail
from llamaherd.leaderboard.reference import load_reference, read_reference
from llamaherd.leaderboard.registry import LeaderboardError, Registry, default_db_path
from llamaherd.leaderboard.web import export_html, make_server

__all__ = [
    "BoardRow", "LeaderboardError", "RecordedLineage", "RecordedResults", "Registry", "board_data", "board_rows",
    "default_db_path", "export_html", "import_lineage", "import_lineage_near", "load_reference", "make_server",
    "model_detail", "read_reference", "record_results", "story_summary",
]
