"""``mtekvm stress``: generated concurrency campaigns (docs/concurrency.md, "mtekvm stress").

* :mod:`~mtekvm.stress.gen`: scenarios from a seed, aimed at collisions, as scenario files;
* :mod:`~mtekvm.stress.campaign`: a worker's campaign, deduplication and the two shrinkers;
* :mod:`~mtekvm.stress.trace`: recorded decisions as Chrome trace JSON and as text;
* :mod:`~mtekvm.stress.command`: the command, worker processes, files and JSON reports, ``merge``.
"""

from mtekvm.stress.campaign import Budget, CampaignConfig, Worker, parse_budget, parse_shard, shrink_scenario
from mtekvm.stress.gen import FAMILIES, GenConfig, Generated, generate, load, parse_ops, parse_weights, to_toml

__all__ = [
    "FAMILIES", "Budget", "CampaignConfig", "GenConfig", "Generated", "Worker", "generate", "load", "parse_budget",
    "parse_ops", "parse_shard", "parse_weights", "shrink_scenario", "to_toml",
]
