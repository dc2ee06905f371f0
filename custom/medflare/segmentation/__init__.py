"""Federated segmentation pieces, free of FLARE: networks, local training, metrics, data.

- :mod:`.networks`: MONAI UNets exposing encoder features (FedDA), with domain and calibration heads.
- :mod:`.training`: the local training loop (epochs, optimiser, learning-rate schedule, FedProx term).
- :mod:`.metrics`: Dice evaluation with MONAI's DiceMetric.
- :mod:`.augment`: intensity augmentation.
- :mod:`.synthetic`, :mod:`.anatomy`: the built-in multi-site benchmarks (blobs; brain-like anatomy).
- :mod:`.data`: a site's train, validation and test datasets.
"""
