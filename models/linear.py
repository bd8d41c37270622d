"""Linear probe: the backbone stays frozen, only the classifier head trains."""
from .base import BackboneHeadMethod


class Linear(BackboneHeadMethod):
    def backbone_trains(self, t: int) -> bool:
        return False
