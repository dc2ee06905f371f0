"""Trained-model artefacts: what a run leaves for people to use, free of FLARE's runtime.

- :mod:`.provenance`: the record stamped into every checkpoint (job, sites, preprocessing, versions).
- :mod:`.trained_model`: reading a global, best, local or personal model with its record.
- :mod:`.bundle`: MONAI bundle export.
- :mod:`.inference`: applying a trained model to new images.
"""
