"""Distillation objectives: a plain dict from the config's `objective` name to its class."""

from .vanilla import VanillaKD

OBJECTIVES = {"vanilla": VanillaKD}
