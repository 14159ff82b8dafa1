"""Settings: environment names, defaults, YAML file, validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from node.settings import ENV_NAMES, Settings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for k in list(os.environ):
        if k.startswith("RADNODE_"):
            monkeypatch.delenv(k)


def test_defaults_match_the_documented_table():
    s = Settings()
    assert s.data_dir == Path("./radnode-data")
    assert s.db_url == f"sqlite:///{s.data_path / 'radnode.db'}"
    assert s.broker_url is None
    assert (s.ae_title, s.dicom_port, s.http_port, s.stable_seconds) == ("RADNODE", 11112, 8080, 30.0)
    assert s.allowed_aes == []
    assert s.models_path == s.data_path / "models"


def test_environment_names(monkeypatch, tmp_path):
    env = {
        "RADNODE_DATA_DIR": str(tmp_path),
        "RADNODE_DATABASE_URL": "postgresql://u@h/db",
        "RADNODE_BROKER_URL": "redis://127.0.0.1:6379/0",
        "RADNODE_AE_TITLE": "AINODE",
        "RADNODE_DICOM_PORT": "104",
        "RADNODE_HTTP_PORT": "9000",
        "RADNODE_STABLE_SECONDS": "1.5",
        "RADNODE_ALLOWED_AES": "CT1, PACS ,MR2",
        "RADNODE_MODELS_DIR": str(tmp_path / "weights"),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = Settings()
    assert s.data_path == tmp_path and s.db_url == "postgresql://u@h/db" and s.broker_url.startswith("redis")
    assert (s.ae_title, s.dicom_port, s.http_port, s.stable_seconds) == ("AINODE", 104, 9000, 1.5)
    assert s.allowed_aes == ["CT1", "PACS", "MR2"]
    assert s.models_path == tmp_path / "weights"
    assert set(env) <= set(ENV_NAMES.values())


def test_yaml_file_and_env_precedence(monkeypatch, tmp_path):
    cfg = tmp_path / "radnode.yaml"
    cfg.write_text("ae_title: FROMYAML\ndicom_port: 11999\nallowed_aes: [A, B]\n")
    monkeypatch.setenv("RADNODE_DICOM_PORT", "12000")
    s = load_settings(cfg)
    assert (s.ae_title, s.dicom_port, s.allowed_aes) == ("FROMYAML", 12000, ["A", "B"])


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RADNODE_AE_TITLE": "THIS_AE_TITLE_IS_TOO_LONG"}, "not a valid AE title"),
        ({"RADNODE_AE_TITLE": "BAD\\AE"}, "not a valid AE title"),
        ({"RADNODE_ALLOWED_AES": "OK,WAY_TOO_LONG_AE_TITLE_X"}, "not a valid AE title"),
        ({"RADNODE_DICOM_PORT": "70000"}, "less than or equal"),
        ({"RADNODE_STABLE_SECONDS": "0"}, "greater than 0"),
        ({"RADNODE_TLS_CERT": "/x.pem"}, "tls_cert and tls_key"),
        ({"RADNODE_TLS_CA": "/ca.pem"}, "tls_ca needs"),
        ({"RADNODE_DICOM_PORT": "0"}, "TLS must be configured"),
    ],
)
def test_invalid_values_are_refused(monkeypatch, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_unknown_key_in_yaml_is_refused(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("ae_tittle: TYPO\n")
    with pytest.raises(ValidationError, match="ae_tittle"):
        load_settings(cfg)


def test_yaml_must_be_a_mapping(tmp_path):
    cfg = tmp_path / "list.yaml"
    cfg.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_settings(cfg)


def test_the_example_settings_file_is_valid(monkeypatch):
    example = Path(__file__).resolve().parent.parent / "deploy" / "radnode.example.yaml"
    monkeypatch.setenv("RADNODE_CONFIG", str(example))  # restored after the test
    s = load_settings(example)
    assert s.rules_file == Path("/etc/radnode/rules.yaml") and s.embedded_worker is True
    assert s.broker.startswith("sqla+sqlite:///")
    assert [d.name for d in s.destinations] == ["pacs"] and s.destination("pacs").port == 104


@pytest.mark.parametrize(
    "values,message",
    [
        ({"job_heartbeat_seconds": 10, "job_lost_seconds": 15}, "at least twice"),
        ({"device": "tpu"}, "device must be"),
        ({"job_max_attempts": 0}, "greater than or equal to 1"),
    ],
)
def test_execution_settings_are_validated(values, message):
    with pytest.raises(ValidationError, match=message):
        Settings(**values)


PACS = {"name": "pacs", "kind": "dicom", "ae_title": "PACS", "host": "pacs.local", "port": 104}


def test_destinations_from_environment_json(monkeypatch):
    import json

    web = {"name": "web", "kind": "dicomweb", "url": "https://pacs/dicom-web", "token": "s3cret"}
    monkeypatch.setenv("RADNODE_DESTINATIONS", json.dumps([PACS, web, {"name": "back", "kind": "return-to-sender"}]))
    monkeypatch.setenv("RADNODE_PEERS", json.dumps([{"ae_title": "CT1", "host": "10.0.0.5", "port": 104}]))
    s = Settings()
    assert [d.kind for d in s.destinations] == ["dicom", "dicomweb", "return-to-sender"]
    assert s.destination("web").token.get_secret_value() == "s3cret" and "s3cret" not in repr(s)
    assert s.peer("CT1 ").host == "10.0.0.5" and s.peer("CT2") is None and s.peer(None) is None
    with pytest.raises(KeyError):
        s.destination("nowhere")


def test_destinations_in_yaml(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("destinations:\n  - {name: pacs, kind: orthanc, url: 'http://orthanc:8042', username: u,"
                   " password: p}\n")
    s = load_settings(cfg)
    assert s.destination("pacs").password.get_secret_value() == "p"


@pytest.mark.parametrize(
    "values,message",
    [
        ({"destinations": [PACS, PACS]}, "destination names must be unique: pacs"),
        ({"destinations": [PACS | {"name": "Bad Name"}]}, "bad destination name"),
        ({"destinations": [PACS | {"kind": "ftp"}]}, "does not match any of the expected tags"),
        ({"destinations": [PACS | {"ae_title": "WAY_TOO_LONG_AE_TITLE"}]}, "not a valid AE title"),
        ({"destinations": [PACS | {"colour": "red"}]}, "Extra inputs are not permitted"),
        ({"destinations": [{"name": "web", "kind": "dicomweb"}]}, "url"),
        ({"peers": [{"ae_title": "A", "host": "h", "port": 1}] * 2}, "each AE title may be listed once"),
        ({"delivery_max_attempts": 0}, "greater than or equal to 1"),
        ({"output_retention_days": -1}, "greater than or equal to 0"),
        ({"watch_orthanc": {"url": "http://o:8042", "interval_seconds": 0}}, "greater than 0"),
    ],
)
def test_dispatch_settings_are_validated(values, message):
    with pytest.raises(ValidationError, match=message):
        Settings(**values)
