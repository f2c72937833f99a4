"""What the command-line tools share: the error policy, the exit codes, the allocator tuning.

Light on purpose (no torch, no Detectron2): a tool imports this, parses its arguments, and only
then imports the model code, so ``--help`` and usage errors answer at once.

Errors: a ``dessam_d2.errors.UserError`` (raised on purpose, its message names the file or
setting and the fix) prints ``error: <message>`` and exits with status 2; any other exception is
a bug and ends with its traceback.
"""

import logging
import sys
import warnings
from datetime import timedelta
from typing import Callable, List, Optional

from .errors import UserError
from .utils.console import one_line_message
from .utils.malloc import MALLOC_TUNING_SWITCH, tune_malloc

# fvcore (imported by Detectron2's layers) decorates functions with torch.jit.script at import,
# which torch deprecates with a FutureWarning on stderr in every tool; nothing here scripts.
warnings.filterwarnings(
    "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning
)
# Detectron2's anchor generator calls torch.meshgrid without `indexing` (its default, "ij", is
# what it means), and its ROI pooler asks torch.fx whether it is tracing, which torch answers
# with a deprecation line on stderr: notes for Detectron2's authors, not for our users.
warnings.filterwarnings(
    "ignore", message=r"torch\.meshgrid: in an upcoming release", category=UserWarning
)
logging.getLogger("torch.fx._symbolic_trace").addFilter(
    lambda record: "is_fx_tracing will return true" not in record.getMessage()
)

__all__ = [
    "EXIT_DONE",
    "EXIT_SOME_SKIPPED",
    "EXIT_USER_ERROR",
    "LAUNCH_DEFAULTS",
    "add_launch_arguments",
    "launch_cli",
    "launch_error",
    "launch_flags",
    "MALLOC_TUNING_SWITCH",
    "exit_status",
    "run_cli",
    "tune_malloc",
]


# Exit status of every tool (train_net, predict, boxes_to_masks, the converters):
EXIT_DONE = 0  # every input was processed (or was already done by an earlier run)
EXIT_SOME_SKIPPED = 1  # finished, but some inputs failed; the summary counts them with reasons
EXIT_USER_ERROR = 2  # nothing done: a one-line "error: ..." names the file and the fix


def exit_status(done: int, failed: int) -> int:
    """The tools' exit status from the number of inputs done (now or by an earlier run) and the
    number that failed: 0 all done, 1 some failed, 2 every input failed (nothing done)."""
    if not failed:
        return EXIT_DONE
    return EXIT_SOME_SKIPPED if done else EXIT_USER_ERROR


def report_conversion(report, source: str) -> int:
    """The converters' ending (tools/convert_*.py, import_qupath.py): print the report's table and
    return the exit status: 0 every image converted, 1 some images skipped (nuclei dropped by a
    documented rule, e.g. zero area, are counted but are no skips), 2 no image converted."""
    print(report.summary())
    if report.images:
        return exit_status(report.images, report.skipped_images)
    print(
        f"error: no image of {source} could be converted (reasons in the table above): "
        "the data sets are empty",
        file=sys.stderr,
    )
    return EXIT_USER_ERROR


def run_cli(main: Callable, *args):
    """Run ``main(*args)`` with the allocator tuned; a ``UserError`` prints ``error: <message>``
    and exits with status 2 (``EXIT_USER_ERROR``), anything else keeps its traceback."""
    tune_malloc()
    try:
        return main(*args)
    except UserError as e:
        logging.getLogger("dessam_d2").debug("user error", exc_info=True)
        print(f"error: {one_line_message(e)}", file=sys.stderr)
        sys.exit(e.exit_code)


# The prediction tools' --dtype: MODEL.DESSAM.INFERENCE_DTYPE for them (training and --eval-only
# keep the config's; the paper configs' is float32, as the authors ran it).
PRECISIONS = ("auto", "float32", "bfloat16", "int8")


def add_precision_argument(parser) -> None:
    """``--dtype``: the precision predictions compute in (default auto)."""
    parser.add_argument(
        "--dtype",
        choices=PRECISIONS,
        default="auto",
        help="inference precision: auto (default) = bfloat16 end to end where the CPU or GPU has "
        "it natively (AVX512-BF16, AMX, Arm BF16, CUDA), float32 elsewhere; float32 (the "
        "paper's); bfloat16; int8 (CPU only: SAM's encoder quantised, for CPUs without native "
        "bfloat16); a MODEL.DESSAM.INFERENCE_DTYPE override after it wins "
        "(dessam_d2.config.precision_opts)",
    )


# Detectron2's launch options and their defaults (one process on one machine)
LAUNCH_DEFAULTS = {"--num-gpus": 1, "--num-machines": 1, "--machine-rank": 0, "--dist-url": "auto"}


def add_launch_arguments(parser, gpus_help: str = "") -> None:
    """Detectron2's ``launch`` options, named as in its ``default_argument_parser`` (which
    imports torch: the tools parse before importing it)."""
    group = parser.add_argument_group(
        "several processes or machines (Detectron2's launch; without a GPU: CPU processes, gloo)"
    )
    group.add_argument(
        "--num-gpus",
        type=int,
        default=LAUNCH_DEFAULTS["--num-gpus"],
        help=gpus_help
        or "processes per machine: one per GPU, or CPU processes when there is no GPU "
        "(then set OMP_NUM_THREADS to cores / processes)",
    )
    group.add_argument(
        "--num-machines",
        type=int,
        default=LAUNCH_DEFAULTS["--num-machines"],
        help="total number of machines",
    )
    group.add_argument(
        "--machine-rank",
        type=int,
        default=LAUNCH_DEFAULTS["--machine-rank"],
        help="the rank of this machine (0 ... M-1)",
    )
    group.add_argument(
        "--dist-url",
        default=LAUNCH_DEFAULTS["--dist-url"],
        help="machine 0's tcp://host:port, the same on every machine (one machine: a free port)",
    )


def launch_flags(args) -> List[str]:
    """The launch options of ``args`` that differ from their defaults, as command-line flags for
    a child ``tools/train_net.py`` (e.g. ``["--num-gpus", "4"]``)."""
    flags = []
    for flag, default in LAUNCH_DEFAULTS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value != default:
            flags += [flag, str(value)]
    return flags


def launch_error(args) -> Optional[str]:
    """What is wrong with the launch options, if anything."""
    if args.num_gpus < 1 or args.num_machines < 1:
        return "--num-gpus and --num-machines are at least 1"
    if not 0 <= args.machine_rank < args.num_machines:
        return f"--machine-rank {args.machine_rank} is not one of 0 ... {args.num_machines - 1}"
    if args.num_machines > 1 and args.dist_url == "auto":
        return "--num-machines > 1 needs --dist-url tcp://<machine 0's address>:<free port>"
    return None


def launch_cli(main: Callable, args, timeout: Optional[timedelta] = None) -> int:
    """Run ``main(args)`` in ``args.num_gpus`` processes per machine on ``args.num_machines``
    machines through Detectron2's ``launch`` (one process in all: in this one), each with its
    allocator tuned and the error policy of ``run_cli``. Returns the exit status: a failed
    process's, or 0. ``timeout``: how long a process may wait at a barrier (Detectron2's
    default is 30 minutes)."""
    error = launch_error(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.num_gpus * args.num_machines == 1:
        status = run_cli(main, args)
        return status if isinstance(status, int) else EXIT_DONE
    from detectron2.engine.launch import DEFAULT_TIMEOUT, launch
    from torch.multiprocessing import ProcessExitedException

    try:
        launch(
            _rank_main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(main, args),
            timeout=timeout or DEFAULT_TIMEOUT,
        )
    except ProcessExitedException as e:
        if e.exit_code is not None and e.exit_code > 0:
            return e.exit_code  # the process printed its status or its one-line error
        print(f"error: {e}", file=sys.stderr)  # e.g. a process killed by a signal
        return 1
    return EXIT_DONE


def _rank_main(main: Callable, args) -> None:
    """One process of several: its exit status, once every process is done (a non-zero exit
    ends the others)."""
    from detectron2.utils import comm

    status = run_cli(main, args)
    comm.synchronize()
    sys.stdout.flush()
    if isinstance(status, int) and status:
        sys.exit(status)
