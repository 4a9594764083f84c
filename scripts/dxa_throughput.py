"""Measure how fast DXA results come in: HL7 ORU^R01 messages/s through the listener (python-hl7's
MLLPClient, one connection, each message waiting for its ACK as interface engines do) and CSV
rows/s through `osteo-node dxa import`, on a scratch database of the configured kind.

    python scripts/dxa_throughput.py [--n 500] [--repeats 3] [--database-url URL]

A PostgreSQL URL names a server and a user with CREATEDB: a scratch database is created there and
dropped afterwards (osteo_node.bench.ScratchDatabases). Prints one line per run and the median.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hl7.client import MLLPClient  # type: ignore[import-untyped]
from sqlalchemy.orm import Session

from osteo_node import migrate
from osteo_node.bench import ScratchDatabases
from osteo_node.config import Hl7Settings
from osteo_node.db import Instance, make_engine
from osteo_node.dxa import ScreenedFacts
from osteo_node.dxa_import import import_file


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def seed(engine, n: int, image_day: dt.date) -> None:  # type: ignore[no-untyped-def]
    """`n` screened women, P0..Pn-1 (issuer BENCH), each with one image on `image_day`."""
    with Session(engine) as session, session.begin():
        for i in range(n):
            instance = Instance(sop_instance_uid=f"2.25.9{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                                path=f"incoming/{i}.dcm", size_bytes=1, calling_ae="BENCH",
                                eligible=True, reason="eligible")
            session.add(instance)
            session.flush()
            session.add(ScreenedFacts(f"P{i}", "BENCH", image_day, 70.0, "ACME", "DX", "PA")
                        .row(instance.id))


def message(i: int, day: dt.date, run: int) -> str:
    stamp = day.strftime("%Y%m%d")
    return "\r".join([
        f"MSH|^~\\&|DXA|RADIOLOGY|OSTEO|SITE|{stamp}1200||ORU^R01|R{run}M{i}|P|2.5",
        f"PID|1||P{i}^^^BENCH^MR||Doe^Jane||19500101|F",
        f"OBR|1||A{i}|38269-7^DXA Bone density^LN|||{stamp}0930",
        f"OBX|1|NM|38267-1^DXA Lumbar spine [T-score]^LN||{-1 - (i % 30) / 10:.1f}||||||F",
        f"OBX|2|NM|38263-0^DXA Femur [T-score]^LN||{-0.5 - (i % 25) / 10:.1f}||||||F",
    ]) + "\r"


def run_once(url: str, folder: Path, n: int, run: int) -> tuple[float, float]:
    from osteo_node.hl7_listener import Listener

    engine = make_engine(url)
    migrate.upgrade(engine)
    today = dt.date.today()
    seed(engine, n, today - dt.timedelta(days=30))
    listener = Listener(engine, Hl7Settings(port=_free_port()), 365).start()
    try:
        hl7_day = today - dt.timedelta(days=10)
        with MLLPClient("127.0.0.1", listener.port) as client:
            start = time.perf_counter()
            for i in range(n):
                ack = client.send_message(message(i, hl7_day, run))
                if b"MSA|AA|" not in ack:
                    raise RuntimeError(f"message {i}: {ack!r}")
            hl7_rate = n / (time.perf_counter() - start)
    finally:
        listener.shutdown()
    csv_day = (today - dt.timedelta(days=5)).isoformat()
    path = folder / f"run{run}.csv"
    path.write_text("patient_id,issuer_of_patient_id,dxa_date,lumbar_spine_t\n"
                    + "".join(f"P{i},BENCH,{csv_day},-{1 + (i % 20) / 10:.1f}\n" for i in range(n)))
    start = time.perf_counter()
    report = import_file(engine, path, 365)
    csv_rate = n / (time.perf_counter() - start)
    if report.imported != n:
        raise RuntimeError(f"CSV: {report}")
    engine.dispose()
    return hl7_rate, csv_rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="messages and CSV rows per run (default 500)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--database-url", default="sqlite:///unused",
                        help="PostgreSQL server URL for scratch databases (default: SQLite files)")
    args = parser.parse_args()
    hl7_rates, csv_rates = [], []
    with ScratchDatabases(args.database_url) as scratch, tempfile.TemporaryDirectory() as tmp:
        for run in range(args.repeats):
            folder = Path(tmp) / f"run{run}"
            folder.mkdir()
            hl7_rate, csv_rate = run_once(scratch.url(folder), folder, args.n, run)
            hl7_rates.append(hl7_rate)
            csv_rates.append(csv_rate)
            print(f"run {run + 1}: HL7 {hl7_rate:7.1f} messages/s   CSV {csv_rate:7.1f} rows/s "
                  f"({scratch.backend}, n={args.n})", flush=True)
    print(f"median: HL7 {statistics.median(hl7_rates):.1f} messages/s (range {min(hl7_rates):.1f}-"
          f"{max(hl7_rates):.1f}); CSV {statistics.median(csv_rates):.1f} rows/s (range "
          f"{min(csv_rates):.1f}-{max(csv_rates):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
