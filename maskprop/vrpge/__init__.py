"""VR-PGE: learned channel keep probabilities, their projection, and the score-gradient estimators.

Imports torch only. ``ChannelScores`` holds the probabilities and samples masks; ``project_scores`` keeps them
feasible; ``vrpge`` / ``vrpge_sym`` turn two losses and masks into the score gradient; ``budget_at`` is the budget of
a search with warm-up and anneal; ``score_statistics`` says how far the probabilities have settled (docs/methods.md,
section 1).
"""

from .budget import BUDGET_SCHEDULES, BudgetSchedule, budget_at
from .estimators import (
    DEFAULT_EPS,
    ESTIMATORS,
    check_alpha,
    get_estimator,
    log_prob_grad,
    score_grad,
    vrpge,
    vrpge_sym,
)
from .projection import project_scores
from .scores import ChannelScores, ExpectedKept, ScoreStatistics, score_statistics

__all__ = [
    "BUDGET_SCHEDULES",
    "DEFAULT_EPS",
    "ESTIMATORS",
    "BudgetSchedule",
    "ChannelScores",
    "ExpectedKept",
    "ScoreStatistics",
    "budget_at",
    "check_alpha",
    "get_estimator",
    "log_prob_grad",
    "project_scores",
    "score_grad",
    "score_statistics",
    "vrpge",
    "vrpge_sym",
]
