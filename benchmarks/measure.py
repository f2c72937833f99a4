"""What every phase of the benchmark uses: the model (random weights), a synthetic input, timing
(median of timed runs after a warm-up), the model's profiler labels and the peak RSS.

Imports torch, Detectron2 and the package only inside the functions, so that importing this
module (and ``python -m benchmarks.run --help``) costs nothing.
"""

import resource
import statistics
import time
from collections import defaultdict
from typing import Optional


def build_cfg(config_file: str, **overrides):
    """The config of ``config_file`` on the CPU, random weights, with ``overrides`` (key: value)."""
    from dessam_d2.config import load_config

    # random weights: no checkpoint can be downloaded here
    opts = ["MODEL.DEVICE", "cpu", "MODEL.SAM.CHECKPOINT", ""]
    for k, v in overrides.items():
        opts += [k, v]
    cfg = load_config(config_file, opts)
    cfg.freeze()
    return cfg


def build_model(cfg, seed=0):
    """Detectron2's ``build_model`` with DES-SAM's parts registered, seeded: random weights."""
    import torch
    from detectron2.modeling import build_model as d2_build

    import dessam_d2.modeling  # noqa: F401  (importing it registers the DESSAM meta-architecture)

    torch.manual_seed(seed)
    return d2_build(cfg)


def synthetic_input(num_nuclei: int, size: int = 1024, seed: int = 0, with_gt: bool = True):
    """A pale image with dark elliptical nuclei on a jittered grid, as the mapper hands it over."""
    from dessam_d2.data.synthetic.cytology import synthetic_model_input

    out = synthetic_model_input(
        (size, size),
        num_nuclei=num_nuclei,
        seed=seed,
        background=(200.0, 30.0),
        colour=(90.0, 50.0, 130.0),
        file_name=f"benchmark_{seed}.png",
        with_gt=with_gt,
    )
    out["sam_transform"] = f"longest{size}"
    return out


def random_boxes(n: int, size: int = 1024, seed: int = 0):
    """n random XYXY boxes (n x 4 tensor) of 15-75 px in a size x size image."""
    import torch

    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * (size - 100)
    return torch.cat([xy, xy + 15 + 60 * torch.rand(n, 2, generator=g)], dim=1)


def labelled(fn, timing: Optional[dict] = None):
    """Run fn under torch.profiler: (fn's result, {label: seconds} of the "dessam/..."
    record_function labels the model code places, summed over their calls). ``timing["s"]``:
    fn's wall time, without the profiler's post-processing (seconds for thousands of events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        out = fn()
        if timing is not None:
            timing["s"] = time.perf_counter() - t
    parts = defaultdict(float)
    results = getattr(prof.profiler, "kineto_results", None)
    if results is not None:
        # The raw events: key_averages() builds a Python object per event first, minutes for
        # the ~10^5 operator events of 500 nuclei on a busy CPU.
        for evt in results.events():
            name = evt.name()
            if name.startswith("dessam/"):
                parts[name[len("dessam/") :]] += evt.duration_ns() / 1e9
    else:
        for evt in prof.key_averages():
            if evt.key.startswith("dessam/"):
                parts[evt.key[len("dessam/") :]] += evt.cpu_time_total / 1e6
    return out, dict(parts)


def measure(fn, repeats: int, warm_up: bool = True):
    """Warm-up run, then ``repeats`` timed runs: (median seconds, per-run extra dicts)."""
    if warm_up:
        fn()
    times, extras = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        extra = fn()
        times.append(time.perf_counter() - t)
        extras.append(extra if isinstance(extra, dict) else {})
    return statistics.median(times), extras


def median_of(extras, key):
    vals = [e[key] for e in extras if key in e]
    return statistics.median(vals) if vals else None


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KB on Linux


def native_bf16() -> bool:
    from dessam_d2.modeling.precision import cpu_has_native_bf16

    return cpu_has_native_bf16()


def bf16_wanted(bf16: str) -> bool:
    """Whether to measure the whole model in bfloat16: ``bf16`` "always", "never" or "auto"
    (where the CPU computes bfloat16 natively)."""
    import torch

    from dessam_d2.modeling.precision import resolve_inference_dtype

    if bf16 == "auto":
        return resolve_inference_dtype("auto", "cpu") == torch.bfloat16
    return bf16 == "always"
