"""Configuration: the example works as-is; bad values are refused with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from osteo_node.config import load_settings, parse_settings
from osteo_node.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_is_valid_and_resolves_paths() -> None:
    settings = load_settings(ROOT / "config.example.toml")
    assert settings.dicom.ae_title == "OSTEO_NODE" and settings.dicom.port == 11112
    assert settings.model.bundle == "reference"
    (pacs,) = settings.destinations
    assert (pacs.ae_title, pacs.host, pacs.port) == ("ORTHANC", "127.0.0.1", 4242)
    assert settings.node.data_dir == ROOT / "var"
    assert settings.database_url == f"sqlite:///{ROOT / 'var' / 'osteo-node.sqlite3'}"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"model": {"device": "tpu"}}, "model.device: Input should be 'cpu', 'cuda' or 'auto' (got 'tpu')"),
        ({"dicom": {"port": 70000}}, "dicom.port"),
        ({"dicom": {"ae_title": "A" * 17}}, "dicom.ae_title"),
        ({"dicom": {"allowed_calling_aes": ["OK", "BAD\\AE"]}}, "dicom.allowed_calling_aes.1"),
        ({"dicom": {"prot": 1}}, "dicom.prot: unknown key"),
        ({"worker": {"retry_base_s": 100, "retry_max_s": 10}}, "retry_max_s (10.0) must be >= retry_base_s"),
        ({"eligibility": {"views": ["LL"]}}, "eligibility.views.0: Input should be 'PA' or 'AP'"),
        ({"destinations": [{"name": "a", "ae_title": "X", "host": "h", "port": 1}] * 2}, "repeated: ['a']"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(raw: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(raw, Path("/tmp"))
    assert expected in str(info.value)


WEB = {"name": "vna", "kind": "dicomweb", "url": "https://vna.example.org/dicom-web"}


@pytest.mark.parametrize(
    ("destination", "expected"),
    [
        ({**WEB, "kind": "dicom"}, "destinations.0.kind: Input should be 'dimse' or 'dicomweb'"),
        ({"name": "vna", "kind": "dicomweb"}, "kind 'dicomweb' needs url"),
        ({"name": "pacs", "ae_title": "X", "host": "h"}, "kind 'dimse' needs port"),
        ({**WEB, "ae_title": "X"}, "ae_title apply to kind 'dimse' only"),
        ({"name": "pacs", "ae_title": "X", "host": "h", "port": 1, "url": "https://a/b"},
         "url apply to kind 'dicomweb' only"),
        ({**WEB, "url": "ftp://vna/dicom-web"}, "url must be an http:// or https:// URL"),
        ({**WEB, "auth": {"user": "u"}}, "auth.user and auth.password must be given together"),
        ({**WEB, "auth": {}}, "auth needs token (bearer) or user and password (basic)"),
        ({**WEB, "timeout_s": 0}, "destinations.0.timeout_s: Input should be greater than 0"),
        ({**WEB, "send": ["kos"]}, "'kos' references the SR and SC, so send them too"),
        ({**WEB, "send": ["pdf"]}, "destinations.0.send.0: Input should be 'sr', 'sc' or 'kos'"),
    ],
)
def test_bad_destinations_name_the_key_and_what_is_allowed(destination: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({"destinations": [destination]}, Path("/tmp"))
    assert expected in str(info.value)


@pytest.mark.parametrize(
    "destination",
    [
        {**WEB, "auth": {"token": "tok-SECRET-1", "user": "u"}},
        {**WEB, "url": "http://vna.example.org/dicom-web", "auth": {"user": "u", "password": "pw-SECRET-1"}},
        {**WEB, "url": "https://u:pw-SECRET-1@vna.example.org/dicom-web"},
        {**WEB, "auth": {"token": ["tok-SECRET-1"]}},
    ],
)
def test_destination_errors_never_show_secrets(destination: dict) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({"destinations": [destination]}, Path("/tmp"))
    assert "destinations.0" in str(info.value)
    assert "SECRET" not in str(info.value), str(info.value)


def test_dicomweb_destination_secrets_stay_out_of_the_log(tmp_path: Path) -> None:
    settings = parse_settings({"destinations": [{**WEB, "auth": {"user": "u", "password": "pw-SECRET-1"}},
                                                {**WEB, "name": "b", "auth": {"token": "tok-SECRET-1"}}]},
                              tmp_path)
    vna, other = settings.destinations
    assert vna.auth is not None and vna.auth.password is not None
    assert vna.auth.password.get_secret_value() == "pw-SECRET-1"
    assert "SECRET" not in str(settings.redacted()) and "SECRET" not in repr(settings)
    assert vna.address == "DICOMweb https://vna.example.org/dicom-web" and vna.verify_tls
    # plain http is accepted on loopback (a local test PACS), and without credentials
    parse_settings({"destinations": [{**WEB, "url": "http://127.0.0.1:8042/dicom-web",
                                      "auth": {"token": "t"}}]}, tmp_path)
    parse_settings({"destinations": [{**WEB, "url": "http://vna.example.org/dicom-web"}]}, tmp_path)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[dicom\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad)


def test_redacted_hides_database_password(tmp_path: Path) -> None:
    settings = parse_settings({"database": {"url": "postgresql://osteo:s3cret@db/osteo"}}, tmp_path)
    assert "s3cret" not in str(settings.redacted())


def test_example_documents_every_section_and_key() -> None:
    """Every settings section and key appears in config.example.toml."""
    import tomllib

    from osteo_node.config import Settings

    text = (ROOT / "config.example.toml").read_text()
    for section, field in Settings.model_fields.items():
        header = f"[[{section}]]" if section == "destinations" else f"[{section}]"
        assert header in text, header
        model = field.annotation.__args__[0] if section == "destinations" else field.annotation
        for key in model.model_fields:
            documented = (f"\n{key} =", f"\n# {key} =", f"[{section}.{key}]")  # a key, or a sub-table
            assert any(form in text for form in documented), f"{section}.{key}"
    tomllib.loads(text)
