"""One learner per stage of `cairl train`, behind the thin Ray actor of trainer/learner.py.

A new stage is a new module here with a `StageLearner` subclass (trainer/learners/base.py), plus its
line in `STAGE_LEARNERS` below; the actor needs no change.
"""

from trainer.learners.base import StageCallError, StageLearner
from trainer.learners.dpo import DPOLearner
from trainer.learners.label import LabelLearner
from trainer.learners.ppo import PPOLearner
from trainer.learners.rm import RMLearner
from trainer.learners.sft import SFTLearner

STAGE_LEARNERS: dict[str, type[StageLearner]] = {
    "sl": SFTLearner,
    "label": LabelLearner,
    "dpo": DPOLearner,
    "rm": RMLearner,
    "ppo": PPOLearner,
}

__all__ = ["STAGE_LEARNERS", "StageCallError", "StageLearner"]
