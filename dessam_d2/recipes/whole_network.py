"""The demo's "box-supervised, whole network trained" row: the paradigm of the paper's Fig. 1b
(BoxInst, BoxSnake, ...) on DES-SAM's own model, to test its generalisation claim at toy scale.

The same DESSAM model, data, schedule and seed, with four changes and nothing else:

* SAM's image encoder trains (MODEL.SAM.FREEZE_ENCODER False; so no embedding cache), and so do
  its prompt encoder and mask decoder (MODEL.SAM.FREEZE_DECODER False);
* no teacher: L_distill is off (MODEL.DESSAM.LOSS_DISTILL_WEIGHT 0), the head runs no teacher;
* the mask loss is what a box-supervised model has without one: L_edge (the same local pairwise
  and level-set terms) plus BoxInst's box-projection term (MODEL.DESSAM.LOSS_PROJECTION_WEIGHT
  1), which keeps each mask inside, and touching, its ground-truth box;
* SAM's parts train at a tenth of the learning rate (SOLVER.SAM_LR_FACTOR 0.1), as pretrained
  backbones are fine-tuned: at the full rate (0.02, SGD) the pretrained SAM collapsed within
  100 steps (the projection term rose from 0.26 to 1.5 of its maximum 2, PQ 0 on both sets).
  The factor was picked by the training losses (0.1 and 0.01 both train, 0.1 ends lower), not
  by the held-out sets.

The paper's Table 2 has such methods fall on a shifted domain while the frozen SAM holds; the
demo measures the same drop on its shifted-stain set.
"""

import os

from detectron2.config import CfgNode

__all__ = ["WHOLE_NETWORK_OPTS", "whole_network_config"]

WHOLE_NETWORK_OPTS = [
    "MODEL.SAM.FREEZE_ENCODER", False,
    "MODEL.SAM.FREEZE_DECODER", False,
    "MODEL.DESSAM.LOSS_DISTILL_WEIGHT", 0.0,
    "MODEL.DESSAM.LOSS_PROJECTION_WEIGHT", 1.0,
    "MODEL.DESSAM.EMBEDDING_CACHE_DIR", "",
    "SOLVER.SAM_LR_FACTOR", 0.1,
]  # fmt: skip


def whole_network_config(cfg: CfgNode) -> CfgNode:
    """``cfg`` with the whole network trained on box losses only, outputs under
    OUTPUT_DIR/whole_network."""
    out = cfg.clone()
    out.defrost()
    out.merge_from_list(
        WHOLE_NETWORK_OPTS + ["OUTPUT_DIR", os.path.join(cfg.OUTPUT_DIR, "whole_network")]
    )
    out.freeze()
    return out
