"""A newcomer's first commands, run as they would run them: the ``helpline`` script, in an empty folder.

Every error a user can cause ends in one line on stderr that says how to fix it, exit code 2, and
no traceback (``--debug`` shows it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HELPLINE = str(Path(sys.executable).parent / "helpline")


def run(folder: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HELPLINE_")}
    environ |= {"COLUMNS": "80", **env}
    return subprocess.run(
        [HELPLINE, *args], cwd=folder, env=environ, capture_output=True, text=True, timeout=60, check=False
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The error's line, after checking it is the only thing on stderr, with exit code 2."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_no_sites_file_says_to_run_init(tmp_path: Path) -> None:
    for command in ("migrate", "serve"):
        line = one_line_error(run(tmp_path, command))
        assert "no sites file at 'sites.toml'" in line and "helpline init" in line and "HELPLINE_SITES" in line
    assert list(tmp_path.iterdir()) == []  # nothing created on the way (no helpline.db)


def test_init_writes_a_sites_file_that_the_next_commands_use(tmp_path: Path) -> None:
    made = run(tmp_path, "init")
    assert made.returncode == 0, made.stderr
    assert "helpline migrate" in made.stdout and "helpline serve" in made.stdout
    assert (tmp_path / "sites.toml").read_text().startswith("# helpline's sites")
    migrated = run(tmp_path, "migrate")
    assert migrated.returncode == 0 and "schema is up to date" in migrated.stdout, migrated.stderr
    user = run(tmp_path, "createuser", "--role", "counselor", "--username", "amina", "--password", "long-enough-1")
    assert user.returncode == 0 and "site ke" in user.stdout, user.stderr
    # Again: the file is not overwritten, and the user exists.
    assert "exists already" in one_line_error(run(tmp_path, "init")) and "--force" in one_line_error(
        run(tmp_path, "init")
    )
    again = run(tmp_path, "createuser", "--role", "counselor", "--username", "amina", "--password", "long-enough-1")
    assert one_line_error(again) == "error: user 'amina' exists already"


def test_an_unknown_site_is_named(tmp_path: Path) -> None:
    assert run(tmp_path, "init").returncode == 0
    result = run(
        tmp_path, "createuser", "--role", "counselor", "--username", "x", "--password", "long-enough-1", "--site", "zz"
    )
    assert one_line_error(result) == "error: unknown site 'zz'"


def test_a_sites_file_with_bad_toml_gives_its_line(tmp_path: Path) -> None:
    (tmp_path / "sites.toml").write_text('[[site]]\nslug = "ke"\nname = "Kenya\n')
    line = one_line_error(run(tmp_path, "migrate"))
    assert line.startswith("error: sites.toml: not valid TOML:") and "line 3" in line


def test_a_site_with_a_wrong_key_names_the_site_and_the_key(tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text(
        '[[site]]\nslug = "ke"\nname = "Kenya"\n[site.rapidpro]\nbase_url = "http://x"\nflow = "f"\ntokn = "t"\n'
    )
    line = one_line_error(run(tmp_path, "migrate", "--sites", "s.toml"))
    assert line == "error: s.toml: site 'ke' (#1): rapidpro.tokn: Extra inputs are not permitted"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", "HELPLINE_DATABASE_URL is not a database URL"),
        ("sqlite:///x.db", "needs the async driver: 'sqlite+aiosqlite:///x.db'"),
        ("postgresql://u:secret@127.0.0.1/db", "needs the async driver: 'postgresql+asyncpg://u:***@127.0.0.1/db'"),
        ("mysql://x/y", "runs on SQLite or PostgreSQL, not 'mysql'"),
        ("sqlite+aiosqlite:///no/such/folder/x.db", "cannot open the SQLite database"),
        # Nothing listens on port 1 of loopback: refused at once.
        (
            "postgresql+asyncpg://postgres:pw@127.0.0.1:1/test",
            "cannot use the database 'postgresql+asyncpg://postgres:***@127.0.0.1:1/test'",
        ),
    ],
)
def test_a_database_that_cannot_be_used_is_one_line(tmp_path: Path, url: str, expected: str) -> None:
    assert run(tmp_path, "init").returncode == 0
    line = one_line_error(run(tmp_path, "migrate", HELPLINE_DATABASE_URL=url))
    assert expected in line
    assert "secret" not in line and ":pw@" not in line  # the password is never printed


def test_a_bad_setting_names_its_variable(tmp_path: Path) -> None:
    line = one_line_error(run(tmp_path, "migrate", HELPLINE_TOKEN_TTL_S="a day"))
    assert line.startswith("error: HELPLINE_TOKEN_TTL_S: ") and "'a day'" in line


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = run(tmp_path, "--debug", "migrate")
    assert result.returncode != 0 and "Traceback" in result.stderr and "SitesFileError" in result.stderr
