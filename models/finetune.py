"""Sequential fine-tuning of the whole ViT: the lower bound every continual method should beat."""
from .base import BackboneHeadMethod


class Finetune(BackboneHeadMethod):
    checkpoint_prefixes = ("backbone.", "head.")

    def backbone_trains(self, t: int) -> bool:
        return True
