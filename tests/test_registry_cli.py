"""`domaintune registry ...` on SQLite and PostgreSQL: every command, exit codes (2 user error,
3 refused promotion, 4 verify mismatch), --json, and errors in a line without a traceback."""

from __future__ import annotations

import json

import pytest
import typer
from test_registry import make_run
from typer.testing import CliRunner

from domaintune.cli.registry import registry_app

pytest_plugins = ["postgres"]  # the database_url fixture: SQLite and PostgreSQL

app = typer.Typer()
app.add_typer(registry_app, name="registry")
runner = CliRunner()


@pytest.fixture
def cli(database_url, monkeypatch):
    """Invoke `domaintune registry ...` against the test database, as user `ana`."""
    monkeypatch.setenv("DOMAINTUNE_USER", "ana")

    def invoke(*args: str):
        return runner.invoke(app, ["registry", *args, "--registry-url", database_url])

    return invoke


def test_register_list_show_promote_rollback_diff_audit(cli, tmp_path):
    for tuned in (0.80, 0.84):
        result = cli("register", str(make_run(tmp_path, tuned=tuned)))
        assert result.exit_code == 0, result.output
    assert "registered support-intents:2 (candidate)" in result.output

    listed = json.loads(cli("list", "--json").output)
    assert [(v["ref"], v["stage"]) for v in listed] == [("support-intents:1", "candidate"), ("support-intents:2", "candidate")]
    assert "support-intents" in cli("list").output

    for ref in ("support-intents:1", "support-intents:2"):
        assert cli("promote", ref, "--to", "staging").exit_code == 0
        result = cli("promote", ref, "--to", "production", "--reason", "release")
        assert result.exit_code == 0, result.output
    assert "support-intents:2 → production (archived support-intents:1)" in result.output
    assert "no regression" in result.output

    shown = cli("show", "support-intents:production")
    assert shown.exit_code == 0 and "support-intents:2" in shown.output and "production" in shown.output
    assert "accuracy" in shown.output and "minilm-l6" in shown.output
    assert json.loads(cli("show", "support-intents:1", "--json").output)["stage"] == "archived"

    changes = json.loads(cli("diff", "support-intents:1", "support-intents:2", "--json").output)
    assert {"section": "metrics", "key": "tuned.accuracy", "a": 0.80, "b": 0.84} in changes
    assert cli("diff", "support-intents:1", "support-intents:2").exit_code == 0

    result = cli("rollback", "support-intents", "--reason", "complaints about refunds")
    assert result.exit_code == 0 and "support-intents:1 is production again" in result.output

    log = json.loads(cli("audit", "--json").output)
    assert [e["action"] for e in log["entries"]] == ["register"] * 2 + ["promote"] * 4 + ["rollback"]
    assert {e["actor"] for e in log["entries"]} == {"ana"}
    assert log["chain_ok"] and log["head_hash"] == log["entries"][-1]["hash"]
    table = cli("audit")
    assert "complaints" in table.output and log["head_hash"] in table.output

    assert cli("delete", "support-intents:2", "--reason", "superseded").exit_code == 0
    assert [v["version"] for v in json.loads(cli("list", "--json").output)] == [1]
    assert cli("verify").exit_code == 0


def test_a_refused_promotion_exits_3_and_force_needs_a_reason(cli, tmp_path):
    gates = [{"expr": "tuned.accuracy >= base.accuracy + 0.05", "passed": False}]
    cli("register", str(make_run(tmp_path, gates=gates)))
    refused = cli("promote", "support-intents:1", "--to", "staging")
    assert refused.exit_code == 3
    assert "gate `tuned.accuracy >= base.accuracy + 0.05` failed" in refused.output and "Traceback" not in refused.output
    no_reason = cli("promote", "support-intents:1", "--to", "staging", "--force")
    assert no_reason.exit_code == 2 and "justification" in no_reason.output
    forced = cli("promote", "support-intents:1", "--to", "staging", "--force", "--reason", "gate measured on stale data")
    assert forced.exit_code == 0 and "forced over" in forced.output
    entry = json.loads(cli("audit", "--json").output)["entries"][-1]
    assert entry["reason"] == "gate measured on stale data" and entry["details"]["forced_over"]


def test_verify_exits_4_and_names_the_changed_file(cli, tmp_path):
    run = make_run(tmp_path)
    cli("register", str(run))
    assert cli("verify", "support-intents").exit_code == 0
    weights = run / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[0] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = cli("verify", "support-intents:1")
    assert result.exit_code == 4
    assert "adapter/adapter_model.safetensors" in result.output and "chain intact" in result.output
    report = json.loads(cli("verify", "--json").output)
    assert report["ok"] is False and report["versions"][0]["problems"]


def test_user_errors_exit_2_in_one_line(cli, tmp_path):
    for args, message in [
        (("show", "nope"), "no model named 'nope'"),
        (("promote", "support-intents", "--to", "staging"), "name a version"),
        (("register", str(tmp_path / "missing")), "no such run directory"),
        (("show", "support-intents:newest"), "bad version 'newest'"),
        (("audit", "nope"), "no model named 'nope'"),
        (("list", "nope"), "no model named 'nope'"),
    ]:
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
    cli("register", str(make_run(tmp_path)))
    result = cli("promote", "support-intents:1", "--to", "live")
    assert result.exit_code == 2 and "unknown stage 'live'" in result.output


def test_a_bad_registry_url_is_a_user_error(tmp_path):
    result = runner.invoke(app, ["registry", "list", "--registry-url", "nonsense://"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_audit_and_show_say_when_a_promotion_was_forced_and_over_what(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # one table row per entry, so that the text can be matched
    gates = [{"expr": "tuned.per_label[billing] >= 0.9", "passed": False}]  # brackets: not rich markup
    cli("register", str(make_run(tmp_path, gates=gates)))
    refused = cli("promote", "support-intents:1", "--to", "staging")
    assert refused.exit_code == 3
    assert ("promote-refused candidate→staging: gate `tuned.per_label[billing] >= 0.9` failed"
            in cli("audit", "support-intents").output)
    cli("promote", "support-intents:1", "--to", "staging", "--force", "--reason", "board approved")
    forced = "promote candidate→staging FORCED over: gate `tuned.per_label[billing] >= 0.9` failed"
    audit = cli("audit")
    assert audit.exit_code == 0 and forced in audit.output and "board approved" in audit.output
    shown = cli("show", "support-intents:1")
    assert shown.exit_code == 0 and f"{forced} support-intents:1 — board approved" in shown.output
    assert cli("audit", "support-intents").exit_code == 0


def test_verify_names_rows_that_disagree_with_the_audit_log(cli, tmp_path, database_url):
    from sqlalchemy import text

    from domaintune.registry.store import Registry

    cli("register", str(make_run(tmp_path)))
    assert cli("verify").exit_code == 0
    with Registry(database_url) as registry, registry.db.engine.begin() as conn:
        conn.execute(text("UPDATE model_versions SET stage = 'staging'"))  # behind the registry's back
    result = cli("verify")
    assert result.exit_code == 4 and "chain intact" in result.output
    assert "stage staging in the database, but the audit log leaves it candidate (entry #1)" in " ".join(result.output.split())
