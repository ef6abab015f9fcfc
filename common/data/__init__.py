"""Interaction logs, catalogue, sequences, splits and partitions."""

from common.data.loaders import Interactions, load_interactions, load_item_titles
from common.data.sequences import SequenceData, build_sequences
from common.data.synthetic import generate_synthetic

__all__ = [
    "Interactions",
    "SequenceData",
    "build_sequences",
    "generate_synthetic",
    "load_interactions",
    "load_item_titles",
]
