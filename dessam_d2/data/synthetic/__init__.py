"""Synthetic images with exact masks: cervical cytology (the demo's default data, ``cytology``),
shapes (tiny SAM's pretraining, ``shapes``) and whole-slide TIFFs (``slide``)."""
