"""The AI-feedback stage trains nothing: its learner only publishes the policy that samples the pairs
(SL's, or the initial model), on the devices already when SL ran in this process."""

from __future__ import annotations

from trainer.learners.base import StageLearner


class LabelLearner(StageLearner):
    stage = "label"
