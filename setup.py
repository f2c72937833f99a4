from setuptools import find_packages, setup

setup(
    name="dessam-d2",
    version="0.1.0",
    description="DES-SAM (MICCAI 2024): box-supervised nucleus instance segmentation on a frozen "
    "Segment Anything Model, as a Detectron2 extension",
    packages=find_packages(include=["dessam_d2", "dessam_d2.*"]),
    package_data={"dessam_d2": ["napari.yaml"]},
    # the napari plugin (dessam_d2/plugin/): pip install -e .[napari]
    entry_points={"napari.manifest": ["dessam-d2 = dessam_d2:napari.yaml"]},
    extras_require={"napari": ["napari==0.9.*", "PyQt6"]},
    python_requires=">=3.10",
    # The full pinned stack (torch, a repacked detectron2, ...) is installed by
    # scripts/setup_env.sh; these are the direct imports.
    install_requires=[
        "numpy",
        "scipy",
        "scikit-image",
        "segment-anything",
        "pycocotools",
        "opencv-python-headless",
        "h5py",
        "tifffile",
        "tqdm",
    ],
)
