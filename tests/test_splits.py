"""Patient-level splits drawn when a manifest has no split column (training.data)."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import pytest

from training.data import read_manifest


def _manifest(path: Path, n_patients: int, with_split_column: bool, reverse: bool = False) -> Path:
    rows = []
    for p in range(n_patients):
        for image in range(1 + p % 3):  # 1 to 3 images per patient
            row = {"file": f"images/{p}_{image}.png", "patient_id": f"P{p:03d}",
                   "class": ["normal", "osteopenia", "osteoporosis"][p % 3], "age": str(40 + p % 50),
                   "view": "PA"}
            if with_split_column:
                row["split"] = ""
            rows.append(row)
    if reverse:
        rows.reverse()
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("with_split_column", [False, True])
def test_no_patient_in_two_splits_and_deterministic(tmp_path, with_split_column):
    manifest = _manifest(tmp_path / "m.csv", 90, with_split_column)
    rows = read_manifest(manifest, split_seed=7)
    splits_of = defaultdict(set)
    for r in rows:
        splits_of[r.patient_id].add(r.split)
    assert all(len(s) == 1 for s in splits_of.values())
    assert {r.split for r in rows} == {"train", "val", "test"}
    patients = {s: {p for p, v in splits_of.items() if v == {s}} for s in ("train", "val", "test")}
    assert len(patients["train"]) == 63 and 12 <= len(patients["val"]) <= 15 and 12 <= len(patients["test"]) <= 15
    for split in ("val", "test"):  # stratified: every class present
        assert {r.label for r in rows if r.split == split} == {0, 1, 2}
    assert rows[0].age == 40.0

    again = read_manifest(manifest, split_seed=7)
    assert [r.split for r in again] == [r.split for r in rows]
    shuffled = read_manifest(_manifest(tmp_path / "r.csv", 90, with_split_column, reverse=True), split_seed=7)
    assert {r.patient_id: r.split for r in shuffled} == {r.patient_id: r.split for r in rows}
    other = read_manifest(manifest, split_seed=8)
    assert {r.patient_id: r.split for r in other} != {r.patient_id: r.split for r in rows}


def test_partly_empty_split_column_is_refused(tmp_path):
    path = _manifest(tmp_path / "m.csv", 6, True)
    lines = path.read_text().splitlines()
    assert lines[1].endswith(",")  # empty split cell
    lines[1] += "train"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="split"):
        read_manifest(path)
