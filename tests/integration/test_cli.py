"""The real ``python -m trioproxy`` command, run as a subprocess from a foreign working directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from trioproxy.cli import main
from trioproxy.gateway_keys import has_valid_checksum

REPO = Path(__file__).resolve().parents[2]
SECRET = "sk-proj-CliSecretValue0123456789abcdEFGH"
TIMEOUT = 60


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)

    @property
    def error(self) -> dict[str, str]:
        payload: dict[str, dict[str, str]] = json.loads(self.stderr.strip().splitlines()[-1])
        return payload["error"]


class Cli:
    def __init__(self, tmp_path: Path, database_url: str | None = None) -> None:
        self.data_dir = tmp_path / "data"
        self.cwd = tmp_path / "elsewhere"
        self.cwd.mkdir()
        env = {name: value for name, value in os.environ.items() if not name.startswith("TRIOPROXY_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env["TRIOPROXY_DATA_DIR"] = str(self.data_dir)
        if database_url is not None:
            env["TRIOPROXY_DATABASE_URL"] = database_url
        self.env = env
        self.outputs: list[str] = []

    def __call__(self, *args: str, stdin: str | None = None) -> Run:
        proc = subprocess.run(
            [sys.executable, "-m", "trioproxy", *args],
            input=stdin,
            capture_output=True,
            text=True,
            cwd=self.cwd,
            env=self.env,
            timeout=TIMEOUT,
            check=False,
        )
        self.outputs += [proc.stdout, proc.stderr]
        return Run(proc.returncode, proc.stdout, proc.stderr)


def test_provision_from_scratch_on_embedded_sqlite(tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    # No `migrate`: provisioning commands migrate the embedded database themselves.
    run = cli("provider", "add", "oa", "--kind", "openai", "--base-url", "https://api.openai.com/v1",
              "--header", "OpenAI-Organization=org-123")  # fmt: skip
    assert run.code == 0, run.stderr
    assert run.json["name"] == "oa"
    assert run.json["headers"] == {"OpenAI-Organization": "org-123"}

    run = cli("provider-key", "add", "--provider", "oa", "--name", "k1", "--secret", "-", stdin=SECRET + "\n")
    assert run.code == 0, run.stderr
    assert run.json["secret_hint"] == "sk-…EFGH"
    run = cli(
        "provider-key", "add", "--provider", "oa", "--name", "k2", "--secret", "sk-second-key-000000000000"
    )
    assert run.code == 0, run.stderr

    run = cli("key", "create", "--name", "app", "--provider", "oa", "--provider-keys", "k2,k1",
              "--retry-count", "1", "--allowed-models", "gpt-4o,gpt-5",
              "--expires-at", "2030-01-01T00:00:00Z")  # fmt: skip
    assert run.code == 0, run.stderr
    created = run.json
    key = created["key"]
    assert has_valid_checksum(key)
    assert created["provider_keys"] == ["k2", "k1"]
    assert created["allowed_models"] == ["gpt-4o", "gpt-5"]
    assert created["expires_at"] == "2030-01-01T00:00:00+00:00"
    assert created["retry_count"] == 1

    listed = cli("key", "list")
    assert listed.code == 0
    assert listed.json[0]["prefix"] == created["prefix"]
    assert key not in listed.stdout

    providers = cli("provider", "list")
    assert [p["name"] for p in providers.json] == ["oa"]
    keys = cli("provider-key", "list", "--provider", "oa")
    assert [k["name"] for k in keys.json] == ["k1", "k2"]

    usage = cli("usage", "--last", "5")
    assert usage.code == 0
    assert usage.json == []

    # The provider secret never left the process, and the key was shown exactly once.
    assert all(SECRET not in output for output in cli.outputs)
    assert sum(key in output for output in cli.outputs) == 1
    database = (cli.data_dir / "trioproxy.db").read_bytes()
    assert SECRET.encode() not in database
    assert key.encode() not in database
    assert (cli.data_dir / "secret.key").stat().st_mode & 0o077 == 0
    assert not (cli.cwd / "data").exists()  # nothing landed in the working directory


def test_migrate_prints_json(tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    run = cli("migrate")
    assert run.code == 0, run.stderr
    assert run.json["migrated"] is True
    assert run.json["seeded_prices"] > 0
    again = cli("migrate")
    assert again.json["seeded_prices"] == 0


@pytest.mark.parametrize(
    ("args", "kind"),
    [
        (["provider", "add", "x", "--kind", "cohere", "--base-url", "https://x.example"], "validation"),
        (["provider", "add", "x", "--kind", "openai", "--base-url", "http://169.254.169.254"], "validation"),
        (["provider-key", "add", "--provider", "nope", "--name", "k", "--secret", "sk-abc"], "not_found"),
        (["provider", "add", "--kind", "openai"], "usage"),
        (["key", "create", "--name", "g", "--provider", "p", "--retry-count", "many"], "usage"),
        (["key", "create", "--name", "g", "--provider", "p", "--expires-at", "soon"], "validation"),
        (["usage", "--last", "-1"], "validation"),
        (["no-such-command"], "usage"),
    ],
)
def test_bad_input_exits_2_with_json_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    kind: str,
) -> None:
    # In-process (the subprocess tests above and below cover the process boundary): main() is what the console
    # script and `python -m trioproxy` call.
    monkeypatch.setenv("TRIOPROXY_DATA_DIR", str(tmp_path / "data"))
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    error = json.loads(err)["error"]
    assert error["type"] == kind
    assert error["message"]


def test_unreachable_database_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Port 1 on loopback: nothing listens there, so the connection is refused at once.
    monkeypatch.setenv("TRIOPROXY_DATABASE_URL", "postgresql+psycopg://nobody:hunter2@127.0.0.1:1/none")
    monkeypatch.setenv("TRIOPROXY_DATA_DIR", str(tmp_path / "data"))
    assert main(["migrate"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert json.loads(err)["error"]["type"] == "database"
    assert "hunter2" not in err


def test_conflicts_exit_2_and_never_echo_secrets(tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    assert cli("provider", "add", "oa", "--kind", "openai", "--base-url", "https://api.openai.com").code == 0
    assert (
        cli("provider", "add", "an", "--kind", "anthropic", "--base-url", "https://api.anthropic.com").code
        == 0
    )
    assert cli("provider-key", "add", "--provider", "an", "--name", "ant", "--secret", SECRET).code == 0
    dup = cli("provider-key", "add", "--provider", "an", "--name", "ant", "--secret", SECRET)
    assert dup.code == 2
    assert dup.error["type"] == "conflict"
    cross = cli("key", "create", "--name", "g", "--provider", "oa", "--provider-keys", "ant")
    assert cross.code == 2
    assert cross.error["type"] == "conflict"
    assert all(SECRET not in output for output in cli.outputs)


@pytest.mark.postgres
def test_postgres_requires_migrate_first(tmp_path: Path, postgres_url: str) -> None:
    cli = Cli(tmp_path, database_url=postgres_url)
    refused = cli("provider", "add", "oa", "--kind", "openai", "--base-url", "https://api.openai.com")
    assert refused.code == 1
    assert "trioproxy migrate" in refused.error["message"]
    assert cli("migrate").code == 0
    added = cli("provider", "add", "oa", "--kind", "openai", "--base-url", "https://api.openai.com")
    assert added.code == 0, added.stderr
    assert cli("provider", "list").json[0]["name"] == "oa"
