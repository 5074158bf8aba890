"""Scorers rank visual tokens for the prune stage: `name -> fn(step, layout) -> (B, T) scores`, higher is kept.
A new one is a file here and a line below."""

from llava.model.visual_exit.scorers.fastv import fastv_scores
from llava.model.visual_exit.scorers.pdrop import pdrop_scores
from llava.model.visual_exit.scorers.random import random_scores

SCORERS = {
    "fastv": fastv_scores,
    "pdrop": pdrop_scores,
    "random": random_scores,
}
