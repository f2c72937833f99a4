"""The napari plugin (``pip install -e .[napari]``; manifest: ``dessam_d2/napari.yaml``).

- ``widget``: the dock widget (model, predict, boxes -> masks, export, train), the only module
  that imports napari or Qt;
- ``layers``: the one place that converts between napari layers' data and the project's types
  (XYXY boxes, RGB images, label images), no napari needed;
- ``io``: the reader (label PNG / OME-TIFF, QuPath GeoJSON, COCO files with their images) and
  the writer of a Shapes layer of boxes as COCO, as napari layer data (no napari import).

Every widget action calls one function of ``dessam_d2.inference.interactive``,
``dessam_d2.data.export`` or ``dessam_d2.recipes.retrain``; the tools call the same code.
"""

import sys

# Triton (which torch imports on the way to torchvision's ops) bundles its own LLVM; loaded into
# a process whose OpenGL is Mesa's software renderer (llvmpipe: Xvfb, remote desktops, VMs), it
# crashes the process. napari has created its OpenGL context by the time it imports a plugin,
# so the plugin runs torch without Triton: it predicts and trains on the CPU or with CUDA's
# eager kernels, and needs no torch.compile.
if "triton" not in sys.modules:
    sys.modules["triton"] = None
