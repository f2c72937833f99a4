"""The paper's Tables 1-2 from one command (the logic behind ``tools/reproduce_paper.py``).

1. Converts what is missing under the data root (``$DETECTRON2_DATASETS``, default ``datasets``):
   CNSeg with :func:`~dessam_d2.data.cnseg.convert_cnseg`, ISBI 2014 with
   :func:`~dessam_d2.data.isbi2014.convert_isbi2014`.
2. Trains and evaluates the paper's runs, one per seed, each in its own folder
   ``<output>/<setting>/seed<k>`` and as a subprocess of ``tools/train_net.py`` (so
   ``--num-gpus`` / ``--num-machines`` reach Detectron2's ``launch``):

   * ``patchseg``: ``configs/dessam_patchseg.yaml``, tested on PatchSeg test (Table 1);
   * ``clusterseg``: ``configs/dessam_clusterseg.yaml``, tested on ClusterSeg test (Table 1) and
     TargetA, TargetB, ISBI 2014 (Table 2), each with its box score threshold
     (``DATASETS.TEST_SCORE_THRESH``). With an image list at
     ``<data root>/cnseg/domainseg/targetb60.txt`` TargetB is the 60-image subset
     ``cnseg_domainseg_targetb60_test`` (the release's test; it does not say which 60).

3. Writes ``tables.md`` and ``table1.csv`` / ``table2.csv``: Dice / AJI / PQ as mean ± standard
   deviation over the seeds, next to the paper's numbers.

Resuming: a run whose ``results.json`` exists is done and not run again; any other run is started
with ``--resume``, so an interrupted run continues from its last checkpoint, and a run whose
training finished but whose results were removed is only evaluated again. ``results.json`` holds
the means of the per-image metrics that ``tools/train_net.py``'s final evaluation wrote to
``inference/<test set>/nuclei_metrics_<test set>.csv``.
"""

import argparse
import csv
import io
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

from .errors import InputNotFoundError, RunFailedError
from .utils.io import atomic_open

# The data, config and metric modules load Detectron2 and torch: they are imported where used,
# so that --help and argument errors answer at once.

__all__ = ["SETTINGS", "SPLITS", "RunFailedError", "main", "parse_args", "build_tables"]

logger = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO_ROOT, "tools", "train_net.py")
METRICS = ("Dice", "AJI", "PQ")
RESULTS_FILE = "results.json"
TARGETB60 = "cnseg_domainseg_targetb60_test"
TARGETB = "cnseg_domainseg_targetb_test"


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

# what the runs read, relative to the data root (BUILTIN_DATASETS), and who converts it
CNSEG_SETS = (
    "cnseg_patchseg_train",
    "cnseg_patchseg_test",
    "cnseg_clusterseg_train",
    "cnseg_clusterseg_test",
    "cnseg_domainseg_targeta_test",
    "cnseg_domainseg_targetb_test",
)
ISBI_SETS = ("isbi2014_test",)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="reproduce_paper.py",
        description="Convert CNSeg and ISBI 2014, train PatchSeg and ClusterSeg for each seed, "
        "evaluate, and write the paper's Tables 1-2 (Markdown and CSV). Re-running the same "
        "command resumes where it stopped.",
    )
    parser.add_argument(
        "--sam-checkpoint", required=True, help="official SAM ViT-B file sam_vit_b_01ec64.pth"
    )
    parser.add_argument("--cnseg", required=True, help="CNSeg root (PatchSeg, ClusterSeg, ...)")
    parser.add_argument("--isbi", required=True, help="folder of the ISBI 2014 .mat files")
    parser.add_argument("--output", default="output/reproduce", help="runs and tables go here")
    parser.add_argument(
        "--datasets",
        default=None,
        help="data root the converted sets go to (default: $DETECTRON2_DATASETS or datasets)",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[1, 2, 3], help="one run per seed (paper: 3)"
    )
    parser.add_argument(
        "--targetb-list",
        default=None,
        help="file of the image names of the release's 60-image TargetB test, one a line "
        "(copied to <data root>/cnseg/domainseg/targetb60.txt)",
    )
    parser.add_argument("--isbi-images-var", action="append", default=[], help="see convert_isbi")
    parser.add_argument("--isbi-nuclei-var", action="append", default=[], help="see convert_isbi")
    parser.add_argument("--num-gpus", type=int, default=None, help="per machine (train_net.py)")
    parser.add_argument("--num-machines", type=int, default=None)
    parser.add_argument("--machine-rank", type=int, default=None)
    parser.add_argument("--dist-url", default=None)
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides for every run, KEY VALUE pairs (e.g. MODEL.DEVICE cuda)",
    )
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {' '.join(map(str, args.seeds))}: a seed is repeated")
    return args


# ---------------------------------------------------------------- data


def _json_path(root: str, name: str) -> str:
    from .data.datasets import BUILTIN_DATASETS

    return os.path.join(root, BUILTIN_DATASETS[name][0])


def _missing(root: str, names: Sequence[str]) -> List[str]:
    return [n for n in names if not os.path.isfile(_json_path(root, n))]


def check_inputs(args: argparse.Namespace) -> None:
    """The SAM checkpoint and both source folders exist (one-line errors otherwise)."""
    if not os.path.isfile(args.sam_checkpoint):
        raise InputNotFoundError(
            f"SAM checkpoint {args.sam_checkpoint} not found: download sam_vit_b_01ec64.pth "
            "and pass its path to --sam-checkpoint"
        )
    for flag, folder, what in (
        ("--cnseg", args.cnseg, "the CNSeg folder (with PatchSeg, ClusterSeg and DomainSeg)"),
        ("--isbi", args.isbi, "the folder of the ISBI 2014 .mat files"),
    ):
        if not os.path.isdir(folder):
            raise InputNotFoundError(f"{flag} {folder}: folder not found; pass {what}")
    if args.targetb_list and not os.path.isfile(args.targetb_list):
        raise InputNotFoundError(f"--targetb-list {args.targetb_list}: file not found")


def prepare_data(args: argparse.Namespace, root: str) -> None:
    """Convert CNSeg / ISBI 2014 under ``root`` unless their annotation files are there."""
    from .data.cnseg import convert_cnseg
    from .data.datasets import SUBSET_DATASETS, subset_coco
    from .data.isbi2014 import convert_isbi2014

    jobs = (
        (
            "CNSeg",
            CNSEG_SETS,
            args.cnseg,
            lambda: convert_cnseg(args.cnseg, os.path.join(root, "cnseg")),
        ),
        (
            "ISBI 2014",
            ISBI_SETS,
            args.isbi,
            lambda: convert_isbi2014(
                args.isbi,
                os.path.join(root, "isbi2014"),
                images_vars=args.isbi_images_var,
                nuclei_vars=args.isbi_nuclei_var,
            ),
        ),
    )
    for what, names, source, convert in jobs:
        if not _missing(root, names):
            print(f"{what}: converted already ({os.path.dirname(_json_path(root, names[0]))})")
            continue
        print(f"{what}: converting {source} into {root}")
        report = convert()
        print(report.table())
        still = _missing(root, names)
        if still:
            raise InputNotFoundError(
                f"{source}: converting {what} did not produce {', '.join(still)} "
                f"({_json_path(root, still[0])}); check the folder layout (datasets/README.md)"
            )
    target = os.path.join(root, SUBSET_DATASETS[TARGETB60][1])
    if args.targetb_list:
        if not os.path.isfile(target) or not _same_file_content(args.targetb_list, target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(args.targetb_list, target)
    if os.path.isfile(target):  # a bad name fails now, not after training
        images = subset_coco(TARGETB60, _json_path(root, TARGETB), target)["images"]
        print(f"TargetB: the {len(images)} images listed in {target}")


def _same_file_content(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


# ---------------------------------------------------------------- runs


def run_dir(output: str, setting: str, seed: int) -> str:
    return os.path.join(output, setting, f"seed{seed}")


def train_command(args: argparse.Namespace, setting: str, seed: int, root: str) -> List[str]:
    from .data.datasets import SUBSET_DATASETS

    cmd = [sys.executable, TRAIN_NET, "--config-file", os.path.join(REPO_ROOT, SETTINGS[setting])]
    cmd.append("--resume")  # continues an interrupted run; starts afresh when nothing is saved
    for flag, value in (
        ("--num-gpus", args.num_gpus),
        ("--num-machines", args.num_machines),
        ("--machine-rank", args.machine_rank),
        ("--dist-url", args.dist_url),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    cmd += ["SEED", str(seed), "OUTPUT_DIR", run_dir(args.output, setting, seed)]
    cmd += ["MODEL.SAM.CHECKPOINT", os.path.abspath(args.sam_checkpoint)]
    if setting == "clusterseg" and os.path.isfile(
        os.path.join(root, SUBSET_DATASETS[TARGETB60][1])
    ):
        cmd += ["DATASETS.TEST", repr(tuple(_clusterseg_tests(targetb=TARGETB60)))]
    return cmd + list(args.opts)


def _clusterseg_tests(targetb: str) -> List[str]:
    from .config import load_config

    # the config's order, which its DATASETS.TEST_SCORE_THRESH follows
    names = load_config(os.path.join(REPO_ROOT, SETTINGS["clusterseg"])).DATASETS.TEST
    return [targetb if n == TARGETB else n for n in names]


def collect_results(directory: str) -> Dict:
    """Mean Dice / AJI / AJI+ / DQ / SQ / PQ per test set of a finished run, from the per-image
    CSVs of its final evaluation, with the test sets and thresholds of its config.yaml."""
    from .evaluation.metrics import mean_metrics

    with open(os.path.join(directory, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    names = list(cfg["DATASETS"]["TEST"])
    thresholds = list(cfg["DATASETS"].get("TEST_SCORE_THRESH") or [])
    thresholds = thresholds or [cfg["MODEL"]["ROI_HEADS"]["SCORE_THRESH_TEST"]] * len(names)
    results = {}
    for name, threshold in zip(names, thresholds):
        path = os.path.join(directory, "inference", name, f"nuclei_metrics_{name}.csv")
        if not os.path.isfile(path):
            raise InputNotFoundError(
                f"{path} not found: the run in {directory} finished without scoring {name} "
                f"(see {directory}/log.txt)"
            )
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        per_image = [
            {k: float(v) for k, v in row.items() if k in METRICS + ("AJI+",)} for row in rows
        ]
        means = mean_metrics(per_image, names=METRICS + ("AJI+",))
        results[name] = {**means, "images": len(rows), "score_thresh": float(threshold)}
    return {"seed": cfg.get("SEED"), "test_sets": results}


def run_all(args: argparse.Namespace, root: str, main_machine: bool) -> None:
    env = dict(os.environ, DETECTRON2_DATASETS=os.path.abspath(root))
    for setting in SETTINGS:
        for seed in args.seeds:
            directory = run_dir(args.output, setting, seed)
            done = os.path.join(directory, RESULTS_FILE)
            if os.path.isfile(done):
                print(f"[{setting} seed {seed}] done ({done})")
                continue
            resuming = os.path.isfile(os.path.join(directory, "last_checkpoint"))
            state = "resuming from its last checkpoint" if resuming else "training"
            print(f"[{setting} seed {seed}] {state} in {directory}", flush=True)
            proc = subprocess.run(train_command(args, setting, seed, root), env=env)
            if proc.returncode != 0:
                raise RunFailedError(
                    f"run {setting} seed {seed} stopped with exit status {proc.returncode} (its "
                    f"log: {directory}/log.txt); fix the cause and run the same command again "
                    "to resume",
                    proc.returncode,
                )
            if main_machine:
                results = collect_results(directory)
                results.update(setting=setting, seed=seed)
                with atomic_open(done) as f:
                    f.write(json.dumps(results, indent=1).encode())
                write_tables(args.output, args.seeds)


# ---------------------------------------------------------------- tables


def _load_results(output: str, seeds: Sequence[int]) -> List[Dict]:
    found = []
    for setting in SETTINGS:
        for seed in seeds:
            path = os.path.join(run_dir(output, setting, seed), RESULTS_FILE)
            if os.path.isfile(path):
                with open(path) as f:
                    found.append(json.load(f))
    return found


def _split_values(results: List[Dict], split: Split) -> Tuple[Dict[str, List[float]], Dict]:
    """Per metric the value of each run (seed order) on this split; and what was tested."""
    values: Dict[str, List[float]] = {m: [] for m in METRICS}
    seeds, used = [], {}
    for run in results:
        for name in split.datasets:
            entry = run["test_sets"].get(name)
            if entry is None:
                continue
            for m in METRICS:
                values[m].append(float(entry[m]))
            seeds.append(run["seed"])
            used.setdefault(name, set()).update(
                {(entry["images"], entry["score_thresh"], run["setting"])}
            )
            break
    return values, {"seeds": seeds, "used": used}


def _mean_std(values: List[float]) -> Tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def build_tables(results: List[Dict], seeds: Sequence[int]) -> Dict[int, Dict]:
    """{table: {"header": [...], "rows": [[...]], "csv_rows": [[...]], "notes": [...]}}."""
    tables = {}
    for number, title in TABLE_TITLES.items():
        splits = [s for s in SPLITS if s.table == number]
        header = ["Method"] + [f"{s.label} {m}" for s in splits for m in METRICS]
        paper = ["DES-SAM (paper)"] + [f"{v:.2f}" for s in splits for v in s.paper]
        ours, means, stds = (
            ["DES-SAM (this code)"],
            ["DES-SAM (this code) mean"],
            ["DES-SAM (this code) std"],
        )
        per_seed = {seed: [f"DES-SAM (this code) seed {seed}"] for seed in seeds}
        notes = []
        for split in splits:
            values, info = _split_values(results, split)
            for m in METRICS:
                mean, std = _mean_std(values[m])
                ours.append("–" if math.isnan(mean) else f"{mean:.2f} ± {std:.2f}")
                means.append("" if math.isnan(mean) else f"{mean:.2f}")
                stds.append("" if math.isnan(std) else f"{std:.2f}")
                by_seed = dict(zip(info["seeds"], values[m]))
                for seed in seeds:
                    per_seed[seed].append(f"{by_seed[seed]:.2f}" if seed in by_seed else "")
            tested = "; ".join(
                f"{name}, {images} image{'s' * (images != 1)}, box score threshold {thresh:g}, "
                f"trained on {setting}"
                for name, entries in info["used"].items()
                for images, thresh, setting in sorted(entries)
            )
            n = len(info["seeds"])
            notes.append(
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
        tables[number] = {
            "title": title,
            "header": header,
            "rows": [paper, ours],
            "csv_rows": [paper, means, stds] + [per_seed[s] for s in seeds],
            "notes": notes,
        }
    return tables


def _markdown(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def write_tables(output: str, seeds: Sequence[int]) -> str:
    """Write tables.md, table1.csv and table2.csv into ``output``; returns the Markdown."""
    tables = build_tables(_load_results(output, seeds), seeds)
    parts = [
        "# DES-SAM: the paper's Tables 1-2, reproduced",
        "",
        "Dice / AJI / PQ (%), averaged over the images of each test set; this code: mean ± "
        f"standard deviation over the runs (seeds {', '.join(map(str, seeds))}; n − 1 in the "
        "denominator, 0 for one run). Written by tools/reproduce_paper.py.",
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


# ---------------------------------------------------------------- entry point


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Everything ``tools/reproduce_paper.py`` does; returns the Markdown tables (machine 0)."""
    from .data.datasets import default_dataset_root

    args = parse_args(argv)
    check_inputs(args)
    root = args.datasets or default_dataset_root()
    prepare_data(args, root)
    main_machine = not args.machine_rank  # None or 0
    if main_machine:
        write_tables(args.output, args.seeds)  # what is done already
    run_all(args, root, main_machine)
    if not main_machine:
        return ""
    text = write_tables(args.output, args.seeds)
    print("\n" + text)
    print(f"written: {', '.join(os.path.join(args.output, f) for f in TABLE_FILES)}")
    return text


TABLE_FILES = ("tables.md", "table1.csv", "table2.csv")
