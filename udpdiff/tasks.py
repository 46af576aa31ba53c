"""Dense-prediction tasks and how a model is told which one to produce.

The paper (Appendix C) fixes the ids: segmentation 0, depth 1. New tasks are appended, never
renumbered, because the id indexes a learned embedding table saved in checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence

TASK_IDS: dict[str, int] = {"segmentation": 0, "depth": 1}


def task_id(task: str) -> int:
    try:
        return TASK_IDS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known tasks: {sorted(TASK_IDS)}") from None


def task_prompt(task: str, caption: str) -> str:
    """The Tab 5 ablation's conditioning: the task is named in the prompt instead of embedded."""
    task_id(task)
    return f"{task} map. {caption}"


def validate_tasks(tasks: Sequence[str], ratio: Sequence[float]) -> None:
    """``tasks`` empty is the RGB-only baseline (the paper's fine-tuned "CogVideoX" rows)."""
    for t in tasks:
        task_id(t)
    if len(tasks) != len(ratio):
        raise ValueError(f"task_ratio has {len(ratio)} entries for {len(tasks)} tasks {list(tasks)}")
    if not tasks:
        return
    if any(r < 0 for r in ratio) or abs(sum(ratio) - 1.0) > 1e-6:
        raise ValueError(f"task_ratio must be non-negative and sum to 1, got {list(ratio)}")
