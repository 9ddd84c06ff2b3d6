"""Pre-flight planning: compile a run's programs for hardware you may not have, and say whether it fits.

targets (what to compile for), abstract (states without weights), programs (what the run executes),
estimate (FLOPs and time), planner (compile and measure), advice (what to change), report (table, JSON).
"""
