"""Applying a trained medflare model to new images (segmentation and classification) and finding the inputs.

- :mod:`.inputs`: which cases a path holds (files, folders, DICOM series, datalists, image lists).
- :mod:`.segmentation`: label maps on the images' own grids, with optional Dice at two resolutions.
- :mod:`.classification`: per-image class probabilities and the predicted class.

The preprocessing is always the site loader's own code, configured from the checkpoint's provenance record.
"""
