"""Early-exit policies behind one interface, used by replay and by the live server.

A policy sees a batch's ramp outputs over every candidate site and says which ramps are active
(their cost is paid) and where each input is released (`plan`); adaptive ones learn from what the
batch showed (`observe`). See `make_policy` for the named ones.
"""

from .base import Plan, Policy, ThresholdPolicy, AdaptivePolicy, OraclePolicy
from .catalog import ADAPTIVE, POLICIES, SERVABLE, PolicyInputs, check_servable, make_policy, serving_policy

__all__ = ["Plan", "Policy", "ThresholdPolicy", "AdaptivePolicy", "OraclePolicy", "POLICIES", "PolicyInputs",
           "make_policy", "serving_policy", "check_servable", "SERVABLE", "ADAPTIVE"]
