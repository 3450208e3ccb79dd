"""VR-PGE: learned channel keep probabilities, their projection, and the score-gradient estimators.

Imports torch only. ``ChannelScores`` holds the probabilities and samples masks; ``project_scores`` keeps them
feasible; ``vrpge`` / ``vrpge_sym`` turn two losses and masks into the score gradient (docs/methods.md, section 1).
"""

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
from .scores import ChannelScores, ExpectedKept

__all__ = [
    "DEFAULT_EPS",
    "ESTIMATORS",
    "ChannelScores",
    "ExpectedKept",
    "check_alpha",
    "get_estimator",
    "log_prob_grad",
    "project_scores",
    "score_grad",
    "vrpge",
    "vrpge_sym",
]
