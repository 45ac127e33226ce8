"""Training: one preference trainer for every objective (``trainer``), its config (``config``), the computation of
one batch (``step``), run folders and checkpoints (``checkpoint``), optimizer groups and transformers' schedules
(``optim``), TRL's logit metrics (``metrics``), and supervised fine-tuning of reference models (``sft``)."""
from .config import TrainConfig
from .sft import SFTConfig, sft
from .trainer import NonFiniteLossError, TrainCallback, TrainResult, evaluate_pairs, train

__all__ = ["TrainConfig", "TrainResult", "TrainCallback", "NonFiniteLossError", "train", "evaluate_pairs",
           "SFTConfig", "sft"]
