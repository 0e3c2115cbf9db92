"""Training: how many layers to freeze. The layers above a cut (or a small head) are trained on activations cached in
a store, with seeded augmented views, instead of re-running the frozen layers every epoch."""

from ._depth import DepthRow, depth, depth_of_stores, format_depth_table, write_depth_report
from ._feeds import CachedActivations, LiveActivations
from ._finetune import RECIPES, Activations, FinetuneConfig, HeadModel, TopModel, TrainResult, build_model, train
from ._run import FinetuneResult, backbone_of, finetune
from ._saved import DeployedFinetune, FinetunedModule, is_finetuned, load_finetuned, save_finetuned

__all__ = [
    "RECIPES",
    "Activations",
    "CachedActivations",
    "DepthRow",
    "DeployedFinetune",
    "FinetunedModule",
    "FinetuneConfig",
    "FinetuneResult",
    "HeadModel",
    "LiveActivations",
    "TopModel",
    "TrainResult",
    "backbone_of",
    "build_model",
    "depth",
    "depth_of_stores",
    "format_depth_table",
    "is_finetuned",
    "load_finetuned",
    "save_finetuned",
    "finetune",
    "train",
    "write_depth_report",
]
