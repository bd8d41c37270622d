"""Linear probe: the backbone stays frozen, only the classifier head trains."""
from .base import BackboneHeadMethod


class Linear(BackboneHeadMethod):
    backbone_frozen_for_run = True
    def backbone_trains(self, t: int) -> bool:
        return False
