from pathlib import Path

import pytest

from infra.postgres.migrations import MIGRATIONS_DIR, MigrationError, discover


def test_discovers_in_order(tmp_path: Path) -> None:
    (tmp_path / "0002_second.sql").write_text("SELECT 2;")
    (tmp_path / "0001_first.sql").write_text("SELECT 1;")
    found = discover(tmp_path)
    assert [(m.version, m.name) for m in found] == [(1, "first"), (2, "second")]
    assert found[0].checksum != found[1].checksum


def test_refuses_bad_names_and_duplicates(tmp_path: Path) -> None:
    (tmp_path / "1_bad.sql").write_text("")
    with pytest.raises(MigrationError, match="NNNN_"):
        discover(tmp_path)
    (tmp_path / "1_bad.sql").unlink()
    (tmp_path / "0001_a.sql").write_text("")
    (tmp_path / "0001_b.sql").write_text("")
    with pytest.raises(MigrationError, match="duplicate"):
        discover(tmp_path)


def test_shipped_migrations_are_well_formed() -> None:
    discover(MIGRATIONS_DIR)
