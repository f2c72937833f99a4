"""docs/METHOD.md's "Paper / release / ours" table says what the paper configs set: every
`KEY VALUE` it names holds in configs/dessam_clusterseg.yaml and configs/dessam_patchseg.yaml
(or, followed by "(ClusterSeg)" / "(PatchSeg)", in that one)."""

import re

import pytest
import yaml

from dessam_d2.config import load_config

METHOD = "docs/METHOD.md"
CONFIGS = {
    "ClusterSeg": "configs/dessam_clusterseg.yaml",
    "PatchSeg": "configs/dessam_patchseg.yaml",
}
# `MODEL.DESSAM.DISTILL_REDUCTION sum`, optionally followed by " (ClusterSeg)" or " (PatchSeg)".
MENTION = re.compile(r"`([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)+) ([^`]+)`(?: \((ClusterSeg|PatchSeg)\))?")
# What issue #21 made the paper configs follow the release in: the table must keep saying it.
REQUIRED = {
    "MODEL.DESSAM.DISTILL_REDUCTION",
    "MODEL.DESSAM.DISTILL_BCE_WEIGHT",
    "MODEL.DESSAM.DISTILL_DICE_WEIGHT",
    "MODEL.DESSAM.STUDENT_PROMPTS",
    "MODEL.DESSAM.INFERENCE_DTYPE",
    "MODEL.ROI_BOX_HEAD.NORM",
    "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE",
    "MODEL.RPN.CONV_DIMS",
    "SOLVER.BASE_LR",
    "SOLVER.IMS_PER_BATCH",
    "DATALOADER.FILTER_EMPTY_ANNOTATIONS",
}


def table_mentions(text):
    """(key, value, config name or None) of each `KEY VALUE` in the table's rows."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [m.groups() for row in rows for m in MENTION.finditer(row)]


def config_value(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def same(documented, actual):
    if isinstance(actual, (list, tuple)):
        return isinstance(documented, (list, tuple)) and [*documented] == [*actual]
    if isinstance(actual, bool) or isinstance(documented, bool):
        return documented is actual
    if isinstance(actual, (int, float)):
        return isinstance(documented, (int, float)) and float(documented) == float(actual)
    return str(documented) == str(actual)


def test_table_parser_reads_keys_values_and_config_names():
    text = (
        "| a | b | `MODEL.X.Y sum`, `SOLVER.Z [30, 36]` (ClusterSeg), `not a key` "
        '`MODEL.N ""` |\n`MODEL.OUTSIDE 1` out of the table'
    )
    assert table_mentions(text) == [
        ("MODEL.X.Y", "sum", None),
        ("SOLVER.Z", "[30, 36]", "ClusterSeg"),
        ("MODEL.N", '""', None),
    ]
    assert same(yaml.safe_load('""'), "") and same(yaml.safe_load("False"), False)
    assert not same(yaml.safe_load("1"), True) and not same(yaml.safe_load("0.5"), 0.05)
    assert same(yaml.safe_load("[30, 36]"), (30, 36))


@pytest.fixture(scope="module")
def mentions():
    return table_mentions(open(METHOD, encoding="utf-8").read())


def test_the_table_names_every_release_setting_of_the_paper_configs(mentions):
    assert REQUIRED <= {key for key, _, _ in mentions}


def test_every_config_value_the_table_names_is_the_paper_configs(mentions):
    configs = {name: load_config(path) for name, path in CONFIGS.items()}
    wrong = []
    for key, value, only in mentions:
        documented = yaml.safe_load(value)
        for name, cfg in configs.items():
            if only in (None, name) and not same(documented, config_value(cfg, key)):
                wrong.append(f"{key} {value} ({name}: {config_value(cfg, key)!r})")
    assert wrong == []
