"""What the converters share: per-subset reports with skip reasons, and the exit status."""

import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import List

from tabulate import tabulate

from ..cli import EXIT_USER_ERROR, exit_status
from ..utils.io import atomic_copy, atomic_write_json

__all__ = ["SubsetReport", "ConversionReport", "atomic_copy", "atomic_write_json"]


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
    subsets: List[SubsetReport] = field(default_factory=list)
    json_files: List[str] = field(default_factory=list)

    def print_summary(self, source: str) -> int:
        """Print the table and the files written; return the converter's exit status
        (``dessam_d2.cli.exit_status``): 0 every image converted, 1 some images skipped (nuclei
        dropped by a documented rule, e.g. zero area, are counted but do not count as skips),
        2 no image converted."""

        print(self.table())
        print("\n".join(["written:"] + self.json_files))
        done = sum(s.images for s in self.subsets)
        status = exit_status(done, sum(sum(s.skipped_images.values()) for s in self.subsets))
        if not done:
            print(
                f"error: no image of {source} could be converted (reasons in the table above): "
                "the data sets are empty",
                file=sys.stderr,
            )
            status = EXIT_USER_ERROR
        return status

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
