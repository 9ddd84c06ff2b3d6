"""One module per stage of `cairl train`; each `run_<stage>(ctx)` is resumable (see trainer/pipeline.py)."""

from trainer.stages.dpo import run_dpo
from trainer.stages.label import run_label
from trainer.stages.ppo import run_ppo
from trainer.stages.rm import run_rm
from trainer.stages.sl import run_sl

__all__ = ["run_dpo", "run_label", "run_ppo", "run_rm", "run_sl"]
