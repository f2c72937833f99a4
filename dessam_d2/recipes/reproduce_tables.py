"""The paper's Tables 1-2 from the runs of :mod:`dessam_d2.recipes.reproduce` (Markdown and CSV).

Every run's ``results.json`` holds per test set the means over images of the metrics as we score
them (masks as predicted, the higher score owns a pixel) and under the authors' release's
protocol (``"release"``: holes and islands under 70 px removed, later masks overwrite earlier
ones, pieces relabelled; ``dessam_d2/evaluation/release_protocol.py``). With ``--bf16`` a run
also has ``results_bfloat16.json``, the same model evaluated with bfloat16 inference. The tables
show Dice / AJI / PQ of each, mean ± standard deviation over the seeds, next to the paper's.
Dice is the pixel Dice of the foregrounds (HoVer-Net's Dice1, the release's ``F1``); the object
Dice (``objDice``) is in the results files and the per-image CSVs.
"""

import csv
import io
import json
import math
import os
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ..utils.io import atomic_open

__all__ = ["SPLITS", "SETTINGS", "Split", "build_tables", "run_dir", "write_tables"]

METRICS = ("Dice", "AJI", "PQ")
RESULTS_FILE = "results.json"
BF16_RESULTS_FILE = "results_bfloat16.json"
TARGETB60 = "cnseg_domainseg_targetb60_test"
TARGETB = "cnseg_domainseg_targetb_test"
TABLE_FILES = ("tables.md", "table1.csv", "table2.csv")


@dataclass(frozen=True)
class Split:
    """One column group of the paper's tables."""

    label: str
    table: int
    datasets: Tuple[str, ...]  # registered names that count as this split
    paper: Tuple[float, float, float]  # DES-SAM's Dice / AJI / PQ in the paper (%)


SPLITS = (
    Split("PatchSeg", 1, ("cnseg_patchseg_test",), (83.37, 69.99, 69.85)),
    Split("ClusterSeg", 1, ("cnseg_clusterseg_test",), (83.58, 70.02, 70.16)),
    Split("TargetA", 2, ("cnseg_domainseg_targeta_test",), (76.15, 59.07, 60.45)),
    Split("TargetB", 2, (TARGETB60, TARGETB), (76.58, 59.23, 63.63)),  # the subset if tested
    Split("2014ISBI", 2, ("isbi2014_test",), (83.98, 71.37, 80.81)),
)
TABLE_TITLES = {
    1: "Table 1: trained and tested on the same CNSeg subset",
    2: "Table 2: generalisation of the ClusterSeg-trained model",
}

# setting -> config file (relative to the repository)
SETTINGS = {
    "patchseg": "configs/dessam_patchseg.yaml",
    "clusterseg": "configs/dessam_clusterseg.yaml",
}

# (row label, results file, protocol: None = as predicted, "release")
VARIANTS = (
    ("DES-SAM (this code)", RESULTS_FILE, None),
    ("DES-SAM (this code), release protocol", RESULTS_FILE, "release"),
    ("DES-SAM (this code), bfloat16 inference", BF16_RESULTS_FILE, None),
    ("DES-SAM (this code), bfloat16, release protocol", BF16_RESULTS_FILE, "release"),
)


def run_dir(output: str, setting: str, seed: int) -> str:
    return os.path.join(output, setting, f"seed{seed}")


def _load_results(output: str, seeds: Sequence[int], file: str) -> List[Dict]:
    found = []
    for setting in SETTINGS:
        for seed in seeds:
            path = os.path.join(run_dir(output, setting, seed), file)
            if os.path.isfile(path):
                with open(path) as f:
                    found.append({**json.load(f), "setting": setting, "seed": seed})
    return found


def _entry(run: Dict, name: str, protocol: Optional[str]) -> Optional[Dict]:
    entry = run["test_sets"].get(name)
    if entry is None or protocol is None:
        return entry
    return entry.get(protocol)  # runs scored before the release protocol existed lack it


def _split_values(results: List[Dict], split: Split, protocol: Optional[str]):
    """Per metric the value of each run (seed order) on this split; and what was tested."""
    values: Dict[str, List[float]] = {m: [] for m in METRICS}
    seeds, used = [], {}
    for run in results:
        for name in split.datasets:
            entry = _entry(run, name, protocol)
            if entry is None:
                continue
            for m in METRICS:
                values[m].append(float(entry[m]))
            seeds.append(run["seed"])
            main = run["test_sets"][name]
            used.setdefault(name, set()).update(
                {(main["images"], main["score_thresh"], run["setting"])}
            )
            break
    return values, {"seeds": seeds, "used": used}


def _mean_std(values: List[float]) -> Tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _notes(split: Split, info: Dict, seeds: Sequence[int]) -> str:
    tested = "; ".join(
        f"{name}, {images} image{'s' * (images != 1)}, box score threshold {thresh:g}, "
        f"trained on {setting}"
        for name, entries in info["used"].items()
        for images, thresh, setting in sorted(entries)
    )
    n = len(info["seeds"])
    return (
        f"{split.label}: {n} of {len(seeds)} runs"
        + (f" (seeds {', '.join(map(str, info['seeds']))})" if n else "")
        + (f"; {tested}" if tested else "")
        + (
            "; the paper used a 60-image subset of TargetB that its release does not "
            "list (see README.md)"
            if split.label == "TargetB" and TARGETB in info["used"]
            else ""
        )
    )


def build_tables(results: Dict[str, List[Dict]], seeds: Sequence[int]) -> Dict[int, Dict]:
    """``results``: {results file: the runs' contents}. Returns {table: {"header", "rows",
    "csv_rows", "notes"}}; a variant no run has (bfloat16 without ``--bf16``) gets no rows."""
    tables = {}
    for number, title in TABLE_TITLES.items():
        splits = [s for s in SPLITS if s.table == number]
        header = ["Method"] + [f"{s.label} {m}" for s in splits for m in METRICS]
        paper = ["DES-SAM (paper)"] + [f"{v:.2f}" for s in splits for v in s.paper]
        rows, csv_rows, notes = [paper], [paper], []
        for label, file, protocol in VARIANTS:
            runs = results.get(file, [])
            if file != RESULTS_FILE and not runs:
                continue
            ours, means, stds = [label], [f"{label} mean"], [f"{label} std"]
            per_seed = {seed: [f"{label} seed {seed}"] for seed in seeds}
            for split in splits:
                values, info = _split_values(runs, split, protocol)
                for m in METRICS:
                    mean, std = _mean_std(values[m])
                    ours.append("–" if math.isnan(mean) else f"{mean:.2f} ± {std:.2f}")
                    means.append("" if math.isnan(mean) else f"{mean:.2f}")
                    stds.append("" if math.isnan(std) else f"{std:.2f}")
                    by_seed = dict(zip(info["seeds"], values[m]))
                    for seed in seeds:
                        per_seed[seed].append(f"{by_seed[seed]:.2f}" if seed in by_seed else "")
                if file == RESULTS_FILE and protocol is None:
                    notes.append(_notes(split, info, seeds))
            rows.append(ours)
            csv_rows += [means, stds] + [per_seed[s] for s in seeds]
        tables[number] = {
            "title": title,
            "header": header,
            "rows": rows,
            "csv_rows": csv_rows,
            "notes": notes,
        }
    return tables


def _markdown(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def write_tables(output: str, seeds: Sequence[int]) -> str:
    """Write tables.md, table1.csv and table2.csv into ``output``; returns the Markdown."""
    results = {f: _load_results(output, seeds, f) for f in (RESULTS_FILE, BF16_RESULTS_FILE)}
    tables = build_tables(results, seeds)
    parts = [
        "# DES-SAM: the paper's Tables 1-2, reproduced",
        "",
        "Dice / AJI / PQ (%), averaged over the images of each test set; this code: mean ± "
        f"standard deviation over the runs (seeds {', '.join(map(str, seeds))}; n − 1 in the "
        "denominator, 0 for one run). Written by tools/reproduce_paper.py.",
        "",
        "Dice is the pixel Dice of the foregrounds (HoVer-Net's Dice1, the release's F1); the "
        "object Dice (objDice) is in each run's results.json and per-image CSVs. Inference in "
        'float32 unless the row says bfloat16. "this code": masks as predicted, the higher '
        'score owns a pixel where they overlap. "release protocol": scored as the authors\' '
        "release scores: holes and islands under 70 px removed from each mask, later (lower "
        "scored) masks overwrite earlier ones, connected pieces relabelled as nuclei (GT too).",
    ]
    for number, table in tables.items():
        parts += ["", f"## {table['title']}", "", _markdown(table["header"], table["rows"]), ""]
        parts += [f"- {note}" for note in table["notes"]]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(table["header"])
        writer.writerows(table["csv_rows"])
        with atomic_open(os.path.join(output, f"table{number}.csv")) as f:
            f.write(buffer.getvalue().encode())
    text = "\n".join(parts) + "\n"
    with atomic_open(os.path.join(output, "tables.md")) as f:
        f.write(text.encode())
    return text
