"""The paper's Tables 1-2 from one call (``tools/reproduce_paper.py`` parses, calls, prints).

1. Converts what is missing under the data root (``$DETECTRON2_DATASETS``, default ``datasets``):
   CNSeg with :func:`~dessam_d2.data.converters.cnseg.convert_cnseg`, ISBI 2014 with
   :func:`~dessam_d2.data.converters.isbi2014.convert_isbi2014`.
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
   deviation over the seeds, next to the paper's numbers, each as we score it and under the
   authors' release's protocol (:mod:`dessam_d2.recipes.reproduce_tables`).

Inference runs in float32 (``MODEL.DESSAM.INFERENCE_DTYPE float32``, as the release does), also
on a GPU where ``auto`` would pick bfloat16. ``--bf16`` evaluates every finished run a second
time with bfloat16 inference (into ``<run>/bfloat16``, results in ``results_bfloat16.json``) and
the tables show those rows next to float32's.

Resuming: a run whose ``results.json`` exists is done and not run again; any other run is started
with ``--resume``, so an interrupted run continues from its last checkpoint, and a run whose
training finished but whose results were removed is only evaluated again. ``results.json`` holds
the means of the per-image metrics that ``tools/train_net.py``'s final evaluation wrote to
``inference/<test set>/nuclei_metrics_<test set>.csv``.

:func:`reproduce_paper` takes a :class:`ReproduceOptions` and reports progress through a callback
(``progress(message)``; the tool prints it); it returns the tables (:class:`ReproduceResult`).
"""

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from ..errors import InputNotFoundError, RunFailedError
from ..utils.io import atomic_open
from .reproduce_tables import (
    BF16_RESULTS_FILE,
    METRICS,
    RESULTS_FILE,
    SETTINGS,
    SPLITS,
    TABLE_FILES,
    TARGETB,
    TARGETB60,
    build_tables,
    run_dir,
    write_tables,
)

# The data, config and metric modules load Detectron2 and torch: they are imported where used.

__all__ = [
    "SETTINGS",
    "SPLITS",
    "ReproduceOptions",
    "ReproduceResult",
    "build_tables",
    "reproduce_paper",
    "train_command",
]

logger = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_NET = os.path.join(REPO_ROOT, "tools", "train_net.py")
BF16_DIR = "bfloat16"  # a run's bfloat16 evaluation (--bf16), inside its folder
SCORED = METRICS + ("AJI+", "objDice")  # what results.json keeps per test set and protocol

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


Progress = Callable[[str], None]


def _silent(message: str) -> None:
    pass


@dataclass(frozen=True)
class ReproduceOptions:
    """What one reproduction runs (``tools/reproduce_paper.py``'s options, named alike)."""

    sam_checkpoint: str  # the official SAM ViT-B file sam_vit_b_01ec64.pth
    cnseg: str  # CNSeg root (PatchSeg, ClusterSeg, DomainSeg)
    isbi: str  # folder of the ISBI 2014 .mat files
    output: str = "output/reproduce"  # runs and tables
    datasets: Optional[str] = None  # data root of the converted sets (None: the default root)
    seeds: Tuple[int, ...] = (1, 2, 3)  # one run per seed
    targetb_list: Optional[str] = None  # image names of the release's 60-image TargetB test
    bf16: bool = False  # also evaluate every run with bfloat16 inference
    isbi_images_var: Tuple[str, ...] = ()  # see convert_isbi2014
    isbi_nuclei_var: Tuple[str, ...] = ()
    # launch options handed to every tools/train_net.py run (e.g. ("--num-gpus", "4")); this
    # machine's rank: machine 0 collects the results and writes the tables
    launch_flags: Tuple[str, ...] = ()
    machine_rank: int = 0
    opts: Tuple[str, ...] = field(default=())  # config overrides for every run, KEY VALUE ...


@dataclass(frozen=True)
class ReproduceResult:
    """The Markdown tables and the files written (machine 0; empty on the other machines)."""

    tables: str
    files: Tuple[str, ...]


# ---------------------------------------------------------------- data


def _json_path(root: str, name: str) -> str:
    from ..data.datasets import BUILTIN_DATASETS

    return os.path.join(root, BUILTIN_DATASETS[name][0])


def _missing(root: str, names: Sequence[str]) -> List[str]:
    return [n for n in names if not os.path.isfile(_json_path(root, n))]


def check_inputs(args: ReproduceOptions) -> None:
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


def prepare_data(args: ReproduceOptions, root: str, progress: Progress = _silent) -> None:
    """Convert CNSeg / ISBI 2014 under ``root`` unless their annotation files are there."""
    from ..data.converters.cnseg import convert_cnseg
    from ..data.converters.isbi2014 import convert_isbi2014
    from ..data.datasets import SUBSET_DATASETS, subset_coco

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
                images_vars=list(args.isbi_images_var),
                nuclei_vars=list(args.isbi_nuclei_var),
            ),
        ),
    )
    for what, names, source, convert in jobs:
        if not _missing(root, names):
            progress(f"{what}: converted already ({os.path.dirname(_json_path(root, names[0]))})")
            continue
        progress(f"{what}: converting {source} into {root}")
        report = convert()
        progress(report.table())
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
        progress(f"TargetB: the {len(images)} images listed in {target}")


def _same_file_content(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


# ---------------------------------------------------------------- runs


def train_command(
    args: ReproduceOptions, setting: str, seed: int, root: str, bf16_eval: bool = False
) -> List[str]:
    """The ``tools/train_net.py`` command of one run: training (resumed), or with ``bf16_eval``
    the bfloat16 evaluation of its final model into ``<run>/bfloat16``."""
    from ..data.datasets import SUBSET_DATASETS

    cmd = [sys.executable, TRAIN_NET, "--config-file", os.path.join(REPO_ROOT, SETTINGS[setting])]
    # --resume continues an interrupted run; starts afresh when nothing is saved
    cmd.append("--eval-only" if bf16_eval else "--resume")
    cmd += list(args.launch_flags)
    directory = run_dir(args.output, setting, seed)
    cmd += [
        "SEED",
        str(seed),
        "OUTPUT_DIR",
        os.path.join(directory, BF16_DIR) if bf16_eval else directory,
    ]
    cmd += ["MODEL.SAM.CHECKPOINT", os.path.abspath(args.sam_checkpoint)]
    # float32 unless asked: "auto" would pick bfloat16 on a GPU; the user's overrides may change it
    cmd += ["MODEL.DESSAM.INFERENCE_DTYPE", "float32"]
    if setting == "clusterseg" and os.path.isfile(
        os.path.join(root, SUBSET_DATASETS[TARGETB60][1])
    ):
        cmd += ["DATASETS.TEST", repr(tuple(_clusterseg_tests(targetb=TARGETB60)))]
    cmd += list(args.opts)
    if bf16_eval:
        weights = os.path.join(directory, "model_final.pth")
        cmd += ["MODEL.WEIGHTS", weights, "MODEL.DESSAM.INFERENCE_DTYPE", "bfloat16"]
    return cmd


def _clusterseg_tests(targetb: str) -> List[str]:
    from ..config import load_config

    # the config's order, which its DATASETS.TEST_SCORE_THRESH follows
    names = load_config(os.path.join(REPO_ROOT, SETTINGS["clusterseg"])).DATASETS.TEST
    return [targetb if n == TARGETB else n for n in names]


def collect_results(directory: str) -> Dict:
    """Mean Dice / AJI / PQ / AJI+ / objDice per test set of a finished run, from the per-image
    CSVs of its final evaluation, with the test sets and thresholds of its config.yaml; under
    ``"release"`` the same under the release's protocol (the CSVs' ``release_*`` columns)."""
    from detectron2.config import CfgNode

    from ..config import score_thresholds_per_test_set
    from ..evaluation.metrics import mean_metrics

    with open(os.path.join(directory, "config.yaml")) as f:
        cfg = CfgNode(yaml.safe_load(f))
    names = list(cfg.DATASETS.TEST)
    thresholds = score_thresholds_per_test_set(cfg)
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
        means = mean_metrics([{k: float(row[k]) for k in SCORED} for row in rows], SCORED)
        results[name] = {**means, "images": len(rows), "score_thresh": float(threshold)}
        if rows and "release_Dice" in rows[0]:
            per_image = [{k: float(row["release_" + k]) for k in SCORED} for row in rows]
            results[name]["release"] = mean_metrics(per_image, SCORED)
    return {"seed": cfg.get("SEED"), "test_sets": results}


def run_all(args: ReproduceOptions, root: str, progress: Progress = _silent) -> None:
    """Train and evaluate every run that has no results yet (``--bf16``: then evaluate them with
    bfloat16 inference); machine 0 collects each run's results and rewrites the tables."""
    main_machine = args.machine_rank == 0
    env = dict(os.environ, DETECTRON2_DATASETS=os.path.abspath(root))
    for setting in SETTINGS:
        for seed in args.seeds:
            directory = run_dir(args.output, setting, seed)
            done = os.path.join(directory, RESULTS_FILE)
            if os.path.isfile(done):
                progress(f"[{setting} seed {seed}] done ({done})")
                continue
            resuming = os.path.isfile(os.path.join(directory, "last_checkpoint"))
            state = "resuming from its last checkpoint" if resuming else "training"
            progress(f"[{setting} seed {seed}] {state} in {directory}")
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
    if args.bf16:
        run_bf16(args, root, env, progress)


def run_bf16(args: ReproduceOptions, root: str, env: Dict, progress: Progress = _silent) -> None:
    """Evaluate every trained run again with bfloat16 inference (``--bf16``)."""
    main_machine = args.machine_rank == 0
    for setting in SETTINGS:
        for seed in args.seeds:
            directory = run_dir(args.output, setting, seed)
            done = os.path.join(directory, BF16_RESULTS_FILE)
            if os.path.isfile(done):
                progress(f"[{setting} seed {seed}] bfloat16 evaluation done ({done})")
                continue
            progress(f"[{setting} seed {seed}] evaluating with bfloat16 inference")
            cmd = train_command(args, setting, seed, root, bf16_eval=True)
            proc = subprocess.run(cmd, env=env)
            if proc.returncode != 0:
                raise RunFailedError(
                    f"the bfloat16 evaluation of {setting} seed {seed} stopped with exit status "
                    f"{proc.returncode} (its log: {directory}/{BF16_DIR}/log.txt)",
                    proc.returncode,
                )
            if main_machine:
                results = collect_results(os.path.join(directory, BF16_DIR))
                results.update(setting=setting, seed=seed, inference_dtype="bfloat16")
                with atomic_open(done) as f:
                    f.write(json.dumps(results, indent=1).encode())
                write_tables(args.output, args.seeds)


# ---------------------------------------------------------------- entry point


def reproduce_paper(args: ReproduceOptions, progress: Progress = _silent) -> ReproduceResult:
    """Convert, train, evaluate and tabulate (see the module doc); resumes where it stopped.
    ``progress`` receives one message per step (conversions, each run started or done)."""
    from ..data.datasets import default_dataset_root

    check_inputs(args)
    root = args.datasets or default_dataset_root()
    prepare_data(args, root, progress)
    if args.machine_rank == 0:
        write_tables(args.output, args.seeds)  # what is done already
    run_all(args, root, progress)
    if args.machine_rank != 0:
        return ReproduceResult("", ())
    text = write_tables(args.output, args.seeds)
    return ReproduceResult(text, tuple(os.path.join(args.output, f) for f in TABLE_FILES))
