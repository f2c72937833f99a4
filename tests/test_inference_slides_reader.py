"""Reading slides: OpenSlide's levels and resolution, the grid for a level, a resolution or a
region, one-line errors for what cannot be read."""

import openslide
import pytest

from dessam_d2.data.synthetic.slide import write_synthetic_slide
from dessam_d2.errors import SlideError
from dessam_d2.inference.slides.reader import open_slide, parse_roi, slide_grid


def test_openslide_reads_every_level_and_the_resolution(slide):
    s = openslide.OpenSlide(slide)
    assert s.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
    assert s.level_dimensions == ((1024, 768), (512, 384), (256, 192))
    assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)


def test_mpp_level_and_roi_choose_the_pixels(slide, tmp_path):
    s = open_slide(slide)
    grid = slide_grid(s, slide, mpp=0.5)
    assert (grid.level, grid.scale, grid.size) == (1, 2.0, (512, 384))
    grid = slide_grid(s, slide, level=2, roi=parse_roi("256,128,512,10000"))
    assert (grid.origin, grid.size, grid.scale) == ((256, 128), (128, 160), 4.0)
    with pytest.raises(SlideError, match="levels 0..2"):
        slide_grid(s, slide, level=3)
    with pytest.raises(SlideError, match="x,y,w,h"):
        parse_roi("1,2,3")

    bare = str(tmp_path / "bare.tif")
    write_synthetic_slide(bare, (256, 256), mpp=None, levels=1)
    with pytest.raises(SlideError, match="does not say its resolution.*--slide-mpp"):
        slide_grid(open_slide(bare), bare, mpp=0.5)
    assert slide_grid(open_slide(bare), bare, mpp=0.5, slide_mpp=0.25).scale == 2.0


def test_a_broken_slide_is_a_one_line_error(tmp_path):
    (tmp_path / "broken.svs").write_bytes(b"not a slide")
    with pytest.raises(SlideError, match=r"broken.svs cannot be opened by OpenSlide .*\)\?$"):
        open_slide(str(tmp_path / "broken.svs"))
    with pytest.raises(FileNotFoundError, match="missing.ndpi does not exist"):
        open_slide(str(tmp_path / "missing.ndpi"))
