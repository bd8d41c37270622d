"""Joint training: one task holding every class, the whole ViT trained on all data at once (the upper bound)."""
from .base import BackboneHeadMethod


class Joint(BackboneHeadMethod):
    checkpoint_prefixes = ("backbone.", "head.")
    num_tasks_override = 1

    def backbone_trains(self, t: int) -> bool:
        return True
