"""Other formats -> COCO files of nuclei: CNSeg, ISBI 2014, QuPath GeoJSON exports, and the
user's own COCO files registered by name (``--dataset``). Each converter returns a
``conversion.ConversionReport``; the tools print it and choose the exit status."""
