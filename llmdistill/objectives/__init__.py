"""Distillation objectives: a plain dict from the config's `objective` name to its class.

Each class is built as `Objective(config, student, teacher)` and called with the gathered hidden states of the
response positions, both LM heads, the gold labels and the CE/KD weights; it returns an `ObjectiveOutput`.
"""

from functools import partial

from .dskd import DualSpaceKD
from .output import ObjectiveOutput
from .vanilla import VanillaKD

OBJECTIVES = {"vanilla": VanillaKD, "dskd": DualSpaceKD, "dskd_v1": partial(DualSpaceKD, version="v1")}

__all__ = ["OBJECTIVES", "ObjectiveOutput"]
