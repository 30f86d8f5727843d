"""Prints dp-accounting's epsilon (and optimal order) for each [q, z, steps, delta] row of the
JSON list on stdin: the reference for tests/privacy_accountant.rs."""
import json
import logging
import sys

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant as rdp

# Orders whose series does not converge are dropped with a warning per order; the result says it.
logging.getLogger("absl").setLevel(logging.ERROR)

rows = []
for q, z, steps, delta in json.load(sys.stdin):
    accountant = rdp.RdpAccountant()
    accountant.compose(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), int(steps)
    )
    epsilon, order = accountant.get_epsilon_and_optimal_order(delta)
    rows.append([float(epsilon), float(order)])
json.dump(rows, sys.stdout)
