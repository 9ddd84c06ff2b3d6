"""One learner per stage of `cairl train`, behind the thin Ray actor of trainer/learner.py.

A new stage is a new module here with a `StageLearner` subclass (trainer/learners/base.py), plus its
line in `STAGE_LEARNERS` below; the actor needs no change. An entry may instead be a function of the
learner context choosing the class (the RL stage: PPO, or GRPO / RLOO by `ppo.algorithm`).
"""

from collections.abc import Callable

from trainer.learners.base import StageCallError, StageLearner
from trainer.learners.dpo import DPOLearner
from trainer.learners.grpo import GroupLearner
from trainer.learners.label import LabelLearner
from trainer.learners.ppo import PPOLearner
from trainer.learners.rm import RMLearner
from trainer.learners.sft import SFTLearner


def rl_learner(ctx) -> StageLearner:
    """The `ppo` stage's learner: PPO with a value model, or GRPO / RLOO without one."""
    return (GroupLearner if ctx.config.ppo.grouped else PPOLearner)(ctx)


STAGE_LEARNERS: dict[str, Callable[..., StageLearner]] = {
    "sl": SFTLearner,
    "label": LabelLearner,
    "dpo": DPOLearner,
    "rm": RMLearner,
    "ppo": rl_learner,
}

__all__ = ["STAGE_LEARNERS", "StageCallError", "StageLearner"]
