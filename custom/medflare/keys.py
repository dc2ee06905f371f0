"""The names medflare's sites and server agree on: meta keys of the messages and the statistics a site reports.

Sites and server both import them from here, so a client never imports server code for a string. What each key
carries, who writes and who reads it:

* :data:`SITE_REPORT_KEY`: a site's documented scalars, sent with its weights (executors -> controller,
  aggregators, persistor); the statistics the fairness rules read are the names below.
* :data:`AGGREGATION_WEIGHTS_KEY` and :data:`AGGREGATOR_STATE_KEY`: every site's weight in the last aggregation
  and a fairness rule's state, kept in the global model's meta by the aggregators; the server only.
* :data:`SITE_WEIGHT_KEY`: the receiving site's own weight of the last aggregation (the only part of the above a
  site sees, see :mod:`medflare.flare.site_view`; FedCE's minus model uses it).
* :data:`PEER_SITE_KEY`: whose encoder the ring relay sends a site (FedDA-cyclic).
* :data:`FEATURE_STATS_KEY`: a site's per-class encoder feature statistics (FedDA statistics mode; executor ->
  controller), and :data:`PEER_FEATURE_STATS_KEY`: the other sites' statistics of the previous round
  (controller -> executor).
"""

from __future__ import annotations

MEDFLARE_PREFIX = "medflare_"
"""Prefix of every medflare meta key (:mod:`medflare.flare.site_view` filters on it)."""

SITE_REPORT_KEY = "medflare_report"
"""Meta key of the documented scalars a site sends with its weights."""
AGGREGATION_WEIGHTS_KEY = "medflare_aggregation_weights"
"""Meta key of every site's weight in the last aggregation (server side only)."""
AGGREGATOR_STATE_KEY = "medflare_aggregator_state"
"""Meta key of a fairness rule's state across rounds (server side only)."""
SITE_WEIGHT_KEY = "medflare_site_weight"
"""Meta key of the receiving site's own aggregation weight in the previous round (absent if it had none)."""
PEER_SITE_KEY = "medflare_peer_site"
"""Meta key of the site whose encoder the ring relay sends along (FedDA-cyclic)."""

FEATURE_STATS_KEY = "medflare_feature_stats"
"""Result meta key: ``{"mean": [[...]], "var": [[...]], "count": [...]}``, per-class means and variances of the
bottleneck features of the received global model on the site's training images (see
:mod:`medflare.algorithms.feature_stats`)."""
PEER_FEATURE_STATS_KEY = "medflare_peer_feature_stats"
"""Task meta key: ``{site name: statistics}`` of every other site, as they reported them in the previous round."""

# statistics of the site report that the fairness rules read
LOSS_GLOBAL = "loss_global"              # mean plain CE of the received global model w^t on the site's training set
BACC_GLOBAL_TRAIN = "bacc_global_train"  # balanced accuracy of w^t on the site's training set (FairFed)
SHARPNESS = "sharpness"                  # S_i = L_i(w^t + eps_i) - L_i(w^t) (FedISM)
LOSS_PREV_LOCAL = "loss_prev_local"      # CE of the site's previous local model w_i^t on its training set (FedGA)
PREV_LOCAL_ROUND = "prev_local_round"    # the round that previous local model was trained in
FEDCE_MINUS_SCORE = "fedce_minus_score"  # balanced accuracy of the minus model (FedCE data-space score)
