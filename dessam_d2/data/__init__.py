"""Nuclei data: the model input, the mapper, image reading, the data sets by name, samplers,
converters of public and user formats, synthetic data.

Importing the package is light (no torch, no Detectron2): import the module you need.
``dessam_d2.data.datasets`` registers the built-in data sets by name when it is imported (nothing
is read from disk until a data set is loaded); whatever builds data loaders imports it.

    transforms.py    sam_model_input: an image (and its boxes) -> the model's input, the one way
    mapper.py        DESSAMDatasetMapper: a data-set dict -> the model's input (training, eval)
    image_io.py      read_image_rgb: any image file -> H x W x 3 uint8 RGB
    datasets.py      the built-in data sets, COCO files by name, subsets by an image list
    samplers.py      the resumable training sampler, seeded per-item augmentation
    polygons.py      polygon area, self-intersection, clipping (for the converters)
    converters/      CNSeg, ISBI 2014, QuPath GeoJSON, the user's COCO files (--dataset)
    synthetic/       synthetic cytology (the demo's data), shapes (tiny SAM), slides
"""
