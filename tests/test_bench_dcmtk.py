"""The bench finds DCMTK in the config's bench.dcmtk_dir or on PATH, never pynetdicom's namesakes."""

from __future__ import annotations

from pathlib import Path

import pytest

from osteo_node.bench.dcmtk import TOOLS, Dcmtk, find_tool
from osteo_node.config import parse_settings
from osteo_node.errors import ConfigError


def _tool(folder: Path, name: str, shebang: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"{shebang}\nexit 0\n")
    path.chmod(0o755)
    return path


def test_path_lookup_skips_python_scripts_of_the_same_name(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    venv, system = tmp_path / "venv-bin", tmp_path / "usr-bin"
    for name in TOOLS:
        _tool(venv, name, "#!/opt/venv/bin/python3")  # what pip installs for pynetdicom's apps
        _tool(system, name, "#!/bin/sh")
    monkeypatch.setenv("PATH", f"{venv}:{system}")
    assert find_tool("storescu") == str(system / "storescu")
    assert Dcmtk.find() == Dcmtk(*(str(system / name) for name in TOOLS))


def test_the_configured_folder_is_used_and_a_wrong_one_named(tmp_path: Path) -> None:
    folder = tmp_path / "dcmtk"
    for name in TOOLS:
        _tool(folder, name, "#!/bin/sh")
    settings = parse_settings({"bench": {"dcmtk_dir": "dcmtk"}}, tmp_path)
    assert settings.bench.dcmtk_dir == folder
    assert Dcmtk.find(settings.bench.dcmtk_dir).echoscu == str(folder / "echoscu")
    (folder / "echoscu").unlink()
    with pytest.raises(ConfigError, match=rf"DCMTK echoscu not found in bench.dcmtk_dir \({folder}\)"):
        Dcmtk.find(folder)
