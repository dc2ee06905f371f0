"""medflare: federated medical-image segmentation and fairness algorithms for NVIDIA FLARE.

The package is organised like NVFlare's ``app_common``: one concept per module.

- :mod:`medflare.data`: synthetic benchmarks, datalist loading, site data configuration.
- :mod:`medflare.networks`: segmentation networks with access to encoder features.
- :mod:`medflare.metrics`: Dice evaluation and fairness summaries (pure functions).
- :mod:`medflare.training`: local training loops (pure PyTorch, no FLARE).
- :mod:`medflare.aggregation`: aggregation arithmetic (pure functions).
- :mod:`medflare.executors`, :mod:`medflare.workflows`, :mod:`medflare.aggregators`,
  :mod:`medflare.persistors`, :mod:`medflare.widgets`: thin FLARE glue around the above.
"""

__version__ = "0.1.0"
