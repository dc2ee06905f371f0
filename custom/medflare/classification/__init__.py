"""Federated image classification under image-quality shift (FedISM and the fairness baselines).

Modules (imported on demand, so that :mod:`medflare.networks` can register the classifiers cheaply; the server
workflow that adds the fairness report is FLARE glue, :mod:`medflare.flare.fairness_workflow`):

- :mod:`.synthetic`: deterministic multi-site benchmark with a quality shift, and the paper-like N-client setting.
- :mod:`.loaders`: real-data site loaders (image lists, ISIC-2019-style CSV, RSNA-ICH-style DICOM folders).
- :mod:`.data`: per-site data resolution (site config or built-in benchmark).
- :mod:`.models`: the small CNN with a global max-pool head and MONAI DenseNet/ResNet options.
- :mod:`.training`: local training (Adam or GSAM with logit-adjusted CE) and evaluation (accuracy, BACC, AUC).
"""
