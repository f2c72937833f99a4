"""Using a trained model: prediction on images and whole slides, their output files, and SAM masks
for box annotations (``annotate``)."""
