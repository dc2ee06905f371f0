"""The FLARE glue: the components a job config names, thin wrappers around the pure code.

- :mod:`.executors`: site-side Executors (segmentation, FedDA alignment, Ditto, classification).
- :mod:`.aggregators`, :mod:`.fairness_aggregators`: server-side aggregation of the sites' updates.
- :mod:`.workflows`: ScatterAndGather controllers (metrics, FedDA relay and statistics), cross-site evaluation;
  :mod:`.fairness_workflow` adds the classification fairness report.
- :mod:`.persistors`: the global model on disk, with its provenance record.
- :mod:`.server_optimizer`: FedOpt-style server optimiser; :mod:`.resume`: continuing a stopped job.
- :mod:`.widgets`: the cross-site report; :mod:`.site_policy`: what a site admin allows;
  :mod:`.site_view`: what a site receives of the server's bookkeeping.
"""
