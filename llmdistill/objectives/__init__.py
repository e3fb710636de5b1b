"""Distillation objectives: a plain dict from the config's `objective` name to its class.

Each class is built as `Objective(config, student, teacher, bridge=VocabBridge)`. Same-vocabulary objectives are
called with the gathered hidden states of the response positions, both LM heads, the gold labels, the CE/KD weights
and `on_policy` (whether the responses were generated during training); cross-tokenizer ones (`cross_tokenizer =
True`) with a `CrossTokenizerBatch` and the weights. Both return an `ObjectiveOutput`.
"""

from functools import partial

from .cma import CrossModelAttentionKD
from .dskd import DualSpaceKD
from .dskd_eta import DualSpaceKDWithETA
from .mined import MinEditDistanceKD
from .opd import SampledTokenOPD
from .output import ObjectiveOutput
from .simple_ctkd import SharedVocabularyKD
from .uld import UniversalLogitKD
from .vanilla import VanillaKD

OBJECTIVES = {
    "vanilla": VanillaKD,
    "dskd": DualSpaceKD,
    "dskd_v1": partial(DualSpaceKD, version="v1"),
    "dskd_eta": DualSpaceKDWithETA,
    "uld": UniversalLogitKD,
    "mined": MinEditDistanceKD,
    "simple_ctkd": SharedVocabularyKD,
    "cma": CrossModelAttentionKD,
    "opd": SampledTokenOPD,
}
CROSS_TOKENIZER = {"dskd_eta", "cma", "uld", "mined", "simple_ctkd"}
NEEDS_MINED_PAIRS = {"mined"}

__all__ = ["CROSS_TOKENIZER", "NEEDS_MINED_PAIRS", "OBJECTIVES", "ObjectiveOutput"]
