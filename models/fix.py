"""Fix: backbone and head train on the first task, then the backbone is frozen and only the head goes on learning."""
from .base import BackboneHeadMethod


class Fix(BackboneHeadMethod):
    checkpoint_prefixes = ("backbone.", "head.")

    def backbone_trains(self, t: int) -> bool:
        return t == 0
