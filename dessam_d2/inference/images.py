"""Predicting a list of images, by one process or by each of several (``torch.distributed``)."""

import logging
import os
import time
from typing import Sequence

from tqdm import tqdm

from ..data.image_io import read_image_rgb
from ..errors import ImageReadError
from .outputs import (
    EMPTY,
    NUCLEI,
    RunSummary,
    output_paths,
    write_coco_results,
    write_outputs,
    wrote_no_nucleus,
)
from .peers import watching
from .predictor import Predictor

logger = logging.getLogger(__name__)


def predict_images(
    predictor: Predictor,
    image_paths: Sequence[str],
    output_dir: str,
    overwrite: bool = False,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> RunSummary:
    """Predict ``image_paths`` one by one (``outputs``: the files of each), then write the COCO
    results of all; finished images are skipped unless ``overwrite``, an image that cannot be
    read is counted as failed and the rest go on.

    Called in every process of a ``torch.distributed`` job (Detectron2's ``launch``) with its
    ``rank`` of ``world_size``: process r predicts every world-size-th image from the r-th, then
    process 0 writes the COCO results of all (the files one process writes); every process
    returns the summary of all. ``output_dir`` must then be one folder for all (shared between
    machines). A process that fails stops the others, with its error (``peers``)."""
    os.makedirs(output_dir, exist_ok=True)
    summary = RunSummary("images", counts={NUCLEI: 0, EMPTY: 0})
    start = time.perf_counter()
    mine = list(image_paths)[rank::world_size]
    with watching(rank, world_size) as watch:  # a process that fails stops the others
        for path in tqdm(mine, desc="predict", unit="image", disable=not progress):
            if watch:
                watch.check()
            paths = output_paths(output_dir, path)
            if os.path.exists(paths["csv"]) and not overwrite:
                summary.skipped += 1
                # read back: the killed run that finished it never printed its summary
                summary.add(EMPTY, int(wrote_no_nucleus(paths)))
                continue
            try:
                image = read_image_rgb(path)
            except ImageReadError as e:
                summary.failed[path] = str(e)
                logger.warning(str(e))
                continue
            found = write_outputs(image, predictor(image), paths)
            summary.add(NUCLEI, found)
            summary.add(EMPTY, int(found == 0))
            summary.done += 1
    summary.seconds = time.perf_counter() - start
    if world_size > 1:
        from detectron2.utils import comm

        # also a barrier: every image is finished after it
        summary = RunSummary.of_all(comm.all_gather(summary), order=image_paths)
    if rank == 0:
        write_coco_results(image_paths, output_dir)
    return summary
