"""The methods' math, free of FLARE: what a site or the server computes, as functions and trainers.

- :mod:`.aggregation`: update checks and the weighted average (FedAvg, FedProx weights).
- :mod:`.fairness`: the fairness rules' weights (FedISM, Agnostic-FL, q-FedAvg, FairFed, FedCE, FedGA).
- :mod:`.robust`: robust aggregation rules (clipping, trimmed mean, median).
- :mod:`.relay`: the visiting order of FedDA's cyclic relay.
- :mod:`.sam`: SAM/GSAM and the sharpness a site reports.
- :mod:`.alignment`: FedDA's adversarial feature alignment (discriminator, losses, trainers).
- :mod:`.feature_stats`: per-class feature statistics and alignment to other sites' statistics.
- :mod:`.personalization`: site-private parts, Ditto's proximal personal model, FedLC/FedDP heads.

Every module is plain Python/PyTorch, unit-tested without FLARE; :mod:`medflare.flare` wraps them.
"""
