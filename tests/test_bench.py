"""`osteo-node bench`: the measurement functions on a tiny bundle with a handful of images."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from osteo_node.bench import Counts, ScratchDatabases, format_table, run_bench, summary, worker_counts
from osteo_node.cli import main
from osteo_node.config import Settings, parse_settings

from conftest import require_tool

TINY_COUNTS = Counts(dx_receive=6, cr_receive=2, pipeline=2, throughput=2, end_to_end=2, memory_cr=2,
                     floor_repeats=2)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tinymodels import export_tiny_bundle

    return str(export_tiny_bundle(tmp_path_factory.mktemp("bench-bundle"), "tiny-bench"))


def numbers(value: Any, path: str = "") -> Iterator[tuple[str, float]]:
    """Every number in a JSON-like value, with its dotted path."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from numbers(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from numbers(item, f"{path}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, float(value)


def test_summary_median_and_p95() -> None:
    assert summary([3.0, 1.0, 2.0]) == {"median": 2.0, "p95": 3.0}
    assert summary(list(map(float, range(1, 101))))["p95"] == 95.0


def test_unknown_section_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--sections", "receive,gpu"]) == 2
    assert "gpu" in capsys.readouterr().err
    assert main(["bench", "--sections", "workers", "--workers", "0"]) == 2
    assert "--workers must be >= 1, got 0" in capsys.readouterr().err


def test_floor_copies_and_fsyncs_each_image_over_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from osteo_node.bench import receive

    synced: list[int] = []
    real_fsync = receive.os.fsync
    monkeypatch.setattr(receive.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    files = []
    for i in range(5):
        files.append(tmp_path / f"image-{i}.dcm")
        files[-1].write_bytes(bytes([i]) * (100_000 + i))
    assert receive.floor_rate(files, 2, tmp_path / "floor") > 0
    written = sorted(path.read_bytes() for path in (tmp_path / "floor").iterdir())
    assert written == sorted(path.read_bytes() for path in files) and len(synced) == 5


@pytest.mark.integration
def test_storescu_associations_go_to_several_ports_in_turn(tmp_path: Path) -> None:
    from osteo_node.bench.dcmtk import Dcmtk
    from osteo_node.synthetic import synthetic_dx

    files = [synthetic_dx(tmp_path / f"dx-{i}.dcm", sex="F", size=32, seed=i) for i in range(6)]
    dcmtk = Dcmtk.find()
    with dcmtk.storescp_running(tmp_path / "a") as a, dcmtk.storescp_running(tmp_path / "b") as b:
        assert dcmtk.send([a, b], files, associations=3, called="STORESCP") > 0
    # associations 0 and 2 (files 0, 3 and 2, 5) to the first port, association 1 to the second
    assert len(list((tmp_path / "a").iterdir())) == 4 and len(list((tmp_path / "b").iterdir())) == 2


@pytest.mark.integration
def test_pynetdicom_alone_runs_in_as_many_processes_as_the_node(tmp_path: Path) -> None:
    """`library_rate` spreads the associations over `dicom.processes` pynetdicom processes (one
    port each), at most one per association."""
    from osteo_node.bench import receive
    from osteo_node.bench.dcmtk import Dcmtk
    from osteo_node.synthetic import synthetic_dx

    files = [synthetic_dx(tmp_path / f"dx-{i}.dcm", sex="F", size=32, seed=i) for i in range(4)]
    sent_to: list[list[int]] = []

    class Recording(Dcmtk):
        def send(self, port: int | Sequence[int], *args: Any, **kwargs: Any) -> float:
            sent_to.append(list(port) if not isinstance(port, int) else [port])
            return super().send(port, *args, **kwargs)

    dcmtk = Recording(*dataclasses.astuple(Dcmtk.find()))
    settings = parse_settings({"dicom": {"processes": 2}}, tmp_path)
    assert receive.library_rate(settings, dcmtk, files, 4, tmp_path / "four") > 0
    assert receive.library_rate(settings, dcmtk, files, 1, tmp_path / "one") > 0
    assert [len(set(ports)) for ports in sent_to] == [2, 1]


def test_worker_counts_double_up_to_the_most() -> None:
    assert worker_counts(1) == [1]
    assert worker_counts(5) == [1, 2, 4, 5]
    assert worker_counts(8) == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="--workers must be >= 1, got 0"):
        worker_counts(0)


@pytest.mark.integration
@pytest.mark.slow
def test_bench_reports_every_figure(tiny_bundle: str) -> None:
    for tool in ("storescu", "storescp", "echoscu"):
        require_tool(tool)
    report = run_bench(Settings(), bundle=tiny_bundle, counts=TINY_COUNTS)
    report = json.loads(json.dumps(report))  # JSON-serialisable as printed by --json

    assert report["receive"]["ratio_vs_storescp"] > 0
    assert {(c["images"], c["associations"]) for c in report["receive"]["cases"]} == {
        ("dx512", 1), ("dx512", 4), ("cr", 1), ("cr", 4)}
    for case in report["receive"]["cases"]:  # pynetdicom alone, answering without storing
        assert case["library_images_per_s"] > 0 and case["processes"] == 1
        assert case["ratio_to_library"] == case["node_images_per_s"] / case["library_images_per_s"]
    assert set(report["pipeline"]["stages"]) >= {"decode", "preprocess", "model", "sr", "sc", "send"}
    pipeline = report["pipeline"]  # figures only: which of two timings is larger is the machine's say
    assert pipeline["ratio_to_floor"] == pipeline["stages"]["screen_total"]["median"] / pipeline["floor_s"]
    assert report["pipeline"]["end_to_end_p95_s"] > 0
    assert report["pipeline"]["end_to_end"]["n"] == TINY_COUNTS.end_to_end
    assert report["throughput"]["images_per_s"] > 0 and report["throughput"]["batch_size"] == 1
    assert report["memory"]["worker_peak_rss_mb"] > report["memory"]["receiver_peak_rss_mb"] > 0
    assert report["memory"]["worker_bundle_loads"] == 1  # no per-image model reloads
    assert report["model"]["name"] == "tiny-bench" and report["model"]["input_size"] == 56
    assert report["machine"]["cores"] >= 1
    for path, value in numbers({k: report[k] for k in ("receive", "pipeline", "throughput", "memory")}):
        assert math.isfinite(value) and value > 0, f"{path} = {value}"
    assert "ratio_vs_storescp" in format_table(report) and "floor img/s" in format_table(report)


@pytest.mark.integration
@pytest.mark.slow
def test_throughput_is_measured_at_the_configured_batch_size(tiny_bundle: str) -> None:
    for tool in ("storescu", "storescp"):
        require_tool(tool)
    settings = parse_settings({"worker": {"batch_size": 2}}, Path.cwd())
    report = run_bench(settings, bundle=tiny_bundle, counts=TINY_COUNTS, sections=("node",))
    throughput = report["throughput"]
    assert throughput["batch_size"] == 2 and throughput["n"] == 8  # four full batches drained
    assert throughput["images_per_s"] > 0 and report["pipeline"]["end_to_end"]["n"] == TINY_COUNTS.end_to_end
    assert throughput["gpu_fraction_of_floor"] is None and throughput["floor_images_per_s"] is None  # CPU
    assert "(batch 2, prefetch 2)" in format_table(report)


@pytest.mark.integration
@pytest.mark.slow
def test_workers_section_runs_each_number_of_worker_processes(tiny_bundle: str) -> None:
    for tool in ("storescu", "storescp", "echoscu"):
        require_tool(tool)
    report = run_bench(Settings(), bundle=tiny_bundle, counts=TINY_COUNTS, sections=("workers",), workers=2)
    workers = json.loads(json.dumps(report))["workers"]
    cases = workers["cases"]
    assert [c["processes"] for c in cases] == [1, 2] and [c["n"] for c in cases] == [2, 4]
    assert all(c["images_per_s"] > 0 and c["seconds"] > 0 for c in cases)
    assert workers["scaling"] == pytest.approx(cases[1]["images_per_s"] / cases[0]["images_per_s"])
    assert "receive" not in report and "memory" not in report  # only the section asked for
    assert "workers (osteo-node work processes, full queue): 1 -> " in format_table(report)


@pytest.mark.integration
@pytest.mark.slow
def test_bench_on_postgresql_runs_in_scratch_databases_it_drops(
    tiny_bundle: str, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy import create_engine, text

    for tool in ("storescu", "storescp"):
        require_tool(tool)
    used: list[str] = []
    url = ScratchDatabases.url
    monkeypatch.setattr(ScratchDatabases, "url", lambda self, folder: used.append(url(self, folder)) or used[-1])
    settings = parse_settings({"database": {"url": postgres_url}}, Path.cwd())
    report = run_bench(settings, bundle=tiny_bundle, counts=TINY_COUNTS, sections=("node",))
    assert report["machine"]["database"] == "postgresql" and report["throughput"]["images_per_s"] > 0
    assert "database postgresql" in format_table(report)
    assert len(used) == 1 and used[0].startswith("postgresql") and "/osteo_bench_" in used[0]
    engine = create_engine(postgres_url)
    try:
        with engine.connect() as connection:
            left = connection.execute(text("SELECT count(*) FROM pg_database WHERE datname = :n"),
                                      {"n": used[0].rsplit("/", 1)[1]}).scalar()
    finally:
        engine.dispose()
    assert left == 0  # dropped when the bench ended
