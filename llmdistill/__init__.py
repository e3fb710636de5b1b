"""llmdistill: knowledge distillation of Hugging Face causal language models."""

from .config import DistillConfig
from .trainer import DistillTrainer, distill

__version__ = "0.1.0"
__all__ = ["DistillConfig", "DistillTrainer", "distill", "__version__"]
