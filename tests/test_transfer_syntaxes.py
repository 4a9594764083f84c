"""Compressed transfer syntaxes: DCMTK encodes, storescu sends, the node stores and decodes."""

from __future__ import annotations

import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pynetdicom import AE
from test_receive import Node, start

from osteo_node import pixels

from conftest import require_tool
from dicom_tools import DX_FOR_PRESENTATION, storescu, synthetic_dx

pytestmark = pytest.mark.integration

#: (name, DCMTK encoder + options, storescu proposal, transfer syntax UID, lossless)
CASES = [
    ("jpeg-lossless-sv1", ["dcmcjpeg", "+e1"], "-xs", "1.2.840.10008.1.2.4.70", True),
    # storescu has no proposal for process 14 (4.57): sent with pynetdicom (`None` below)
    ("jpeg-lossless", ["dcmcjpeg", "+el"], None, "1.2.840.10008.1.2.4.57", True),
    ("jpeg-extended", ["dcmcjpeg", "+ee"], "-xx", "1.2.840.10008.1.2.4.51", False),
    ("jpeg-ls-lossless", ["dcmcjpls", "+el"], "-xt", "1.2.840.10008.1.2.4.80", True),
    ("rle", ["dcmcrle"], "-xr", "1.2.840.10008.1.2.5", True),
    ("deflate", ["dcmconv", "+td"], "-xd", "1.2.840.10008.1.2.1.99", True),
]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    folder = tmp_path_factory.mktemp("node")
    yield from start(f"sqlite:///{folder / 'node.sqlite3'}", folder)


@pytest.mark.parametrize(("name", "encoder", "proposal", "syntax", "lossless"), CASES,
                         ids=[c[0] for c in CASES])
def test_compressed_image_is_received_and_decoded(node: Node, tmp_path: Path, name: str,
                                                  encoder: list[str], proposal: str | None, syntax: str,
                                                  lossless: bool) -> None:
    original = synthetic_dx(tmp_path / "original.dcm", sex="F", age=66, size=256,
                            seed=zlib.crc32(name.encode()) % 10_000)
    encoded = tmp_path / f"{name}.dcm"
    subprocess.run([require_tool(encoder[0]), *encoder[1:], str(original), str(encoded)], check=True,
                   capture_output=True, timeout=60)
    assert dcmread(encoded, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    if proposal is None:
        assert _send_in_own_syntax(node.port, encoded, syntax) == 0x0000
    else:
        assert storescu(node.port, encoded, extra=(proposal,)) == ["Success"]
    uid = str(dcmread(encoded, stop_before_pixels=True).SOPInstanceUID)  # lossy: DCMTK gives a new UID
    stored = dcmread(node.store.absolute(node.instances()[uid].path))
    assert stored.file_meta.TransferSyntaxUID == syntax
    decoded, reference = pixels.decode(stored), pixels.decode(dcmread(original))
    if lossless:
        np.testing.assert_array_equal(decoded, reference)
    else:
        assert np.abs(decoded - reference).mean() < 0.01


def _send_in_own_syntax(port: int, path: Path, syntax: str) -> int | None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(DX_FOR_PRESENTATION, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="OSTEO_NODE")
    assert assoc.is_established
    try:
        return getattr(assoc.send_c_store(path), "Status", None)
    finally:
        assoc.release()
