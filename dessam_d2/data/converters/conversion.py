"""What the converters share: per-subset reports with skip reasons, the nucleus category."""

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List

from tabulate import tabulate

__all__ = ["SubsetReport", "ConversionReport", "nucleus_categories"]


def nucleus_categories() -> List[Dict]:
    """The ``categories`` of every COCO file written here: one class, "nucleus", id 1."""
    return [{"id": 1, "name": "nucleus", "supercategory": "nucleus"}]


@dataclass
class SubsetReport:
    """What a converter did with one subset: kept images and nuclei, skips counted by reason
    (whole images, and single nuclei of kept images), and notes (changes that kept the item,
    e.g. a polygon clipped to the image)."""

    name: str
    images: int = 0
    nuclei: int = 0
    skipped_images: Counter = field(default_factory=Counter)
    skipped_nuclei: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)


@dataclass
class ConversionReport:
    """What a converter did: one ``SubsetReport`` per subset, and the COCO files it wrote."""

    subsets: List[SubsetReport] = field(default_factory=list)
    json_files: List[str] = field(default_factory=list)

    @property
    def images(self) -> int:
        """Images converted, all subsets together."""
        return sum(s.images for s in self.subsets)

    @property
    def skipped_images(self) -> int:
        """Images skipped (with a reason in the table); nuclei dropped by a documented rule (e.g.
        zero area) are counted apart and do not count here."""
        return sum(sum(s.skipped_images.values()) for s in self.subsets)

    def summary(self) -> str:
        """The table, then the files written."""
        return self.table() + "\n" + "\n".join(["written:"] + self.json_files)

    def table(self) -> str:
        """A summary row per subset (and a total), then one row per (subset, skip reason)."""
        notes = sorted({r for s in self.subsets for r, n in s.notes.items() if n})

        def row(name: str, subsets: List[SubsetReport]) -> List:
            counts = [s.images for s in subsets], [s.nuclei for s in subsets]
            skips = [sum(s.skipped_images.values()) for s in subsets]
            skips_n = [sum(s.skipped_nuclei.values()) for s in subsets]
            cells = [sum(c) for c in (*counts, skips, skips_n)]
            return [name] + cells + [sum(s.notes[r] for s in subsets) for r in notes]

        rows = [row(s.name, [s]) for s in self.subsets] + [row("total", self.subsets)]
        headers = ["subset", "images", "nuclei", "images skipped", "nuclei skipped"] + notes
        text = tabulate(rows, headers=headers, tablefmt="pipe")
        reasons = [
            [s.name, kind, reason, n]
            for s in self.subsets
            for kind, counter in (("image", s.skipped_images), ("nucleus", s.skipped_nuclei))
            for reason, n in sorted(counter.items())
            if n
        ]
        if reasons:
            headers = ["subset", "skipped", "reason", "count"]
            text += "\n\n" + tabulate(reasons, headers=headers, tablefmt="pipe")
        return text
