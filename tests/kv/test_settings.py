"""Settings: flags beat environment beat env file beat defaults; bad values name themselves."""

from __future__ import annotations

from pathlib import Path

import pytest

from mapmg_data_engineer_takehome.settings import Settings, SettingsError, load_settings

from .e2e_support import REPO


def test_defaults_without_flags_or_environment() -> None:
    settings = load_settings([], environ={})
    assert (settings.host, settings.port) == ("localhost", 8000)
    assert settings.store == "sqlite"
    assert settings.durability == "normal"
    assert settings.data_path == Path("data/kv.sqlite3")
    assert settings.input_db is None
    assert settings.max_body_bytes == 1024 * 1024
    assert settings.access_log is False


def test_environment_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KV_PORT", "9001")
    monkeypatch.setenv("KV_STORE", "memory")
    assert load_settings([]).port == 9001
    flagged = load_settings(["--port", "9002", "--access-log"])
    assert (flagged.port, flagged.store, flagged.access_log) == (9002, "memory", True)


def test_plain_port_is_honoured_but_kv_port_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "7000")
    assert load_settings([]).port == 7000
    monkeypatch.setenv("KV_PORT", "7001")
    assert load_settings([]).port == 7001


def test_env_file_is_read_below_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_file = tmp_path / "kv.env"
    env_file.write_text("KV_PORT=6000\nKV_DURABILITY=full\nUNRELATED=1\n")
    monkeypatch.setenv("KV_DURABILITY", "normal")
    settings = load_settings(["--env-file", str(env_file)])
    assert (settings.port, settings.durability) == (6000, "normal")
    monkeypatch.setenv("KV_ENV_FILE", str(env_file))
    assert load_settings([]).port == 6000


def test_env_file_with_a_misspelt_setting_is_an_error(tmp_path: Path) -> None:
    env_file = tmp_path / "kv.env"
    env_file.write_text("KV_PROT=6000\n")
    with pytest.raises(SettingsError, match="KV_PROT"):
        load_settings(["--env-file", str(env_file)])


def test_missing_env_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(["--env-file", str(tmp_path / "nope.env")])


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("KV_PORT", "http"),
        ("KV_PORT", "70000"),
        ("KV_STORE", "redis"),
        ("KV_DURABILITY", "sometimes"),
        ("KV_MAX_BODY_BYTES", "-1"),
        ("KV_LOG_LEVEL", "loud"),
        ("KV_ACCESS_LOG", "perhaps"),
    ],
)
def test_invalid_environment_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):
        load_settings([])


def test_invalid_flag_value_names_the_flag() -> None:
    with pytest.raises(SettingsError, match="--durability"):
        load_settings(["--durability", "sometimes"])


def test_every_setting_has_a_flag_and_a_description() -> None:
    from mapmg_data_engineer_takehome.settings import build_parser

    help_text = build_parser().format_help()
    for name, field in Settings.model_fields.items():
        assert "--" + name.replace("_", "-") in help_text
        assert f"KV_{name.upper()}" in help_text
        assert field.description


def test_example_env_file_documents_every_setting_with_its_default() -> None:
    example = REPO / "config" / "kv.env"
    documented = {}
    for line in example.read_text().splitlines():
        line = line.lstrip("# ").strip()
        if line.startswith("KV_") and "=" in line:
            name, value = line.split("=", 1)
            documented[name] = value
    defaults = Settings.model_construct()
    for name in Settings.model_fields:
        variable = f"KV_{name.upper()}"
        assert variable in documented, variable
        default = getattr(defaults, name)
        if default is not None:
            assert documented[variable] == str(default).lower() or documented[variable] == str(
                default
            ), variable


def test_example_env_file_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    example = REPO / "config" / "kv.env"
    assert load_settings(["--env-file", str(example)]) == Settings()
