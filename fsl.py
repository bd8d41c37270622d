"""The reference's entry point of the few-shot LoRA flow, kept so its command lines run unchanged:

    python -m torch.distributed.launch --nproc_per_node=8 --use_env fsl.py imr_few_shot_lora --train_vanilla ...

It is `main.py` under another name; `main.py imr_few_shot_lora ...` is the same run.
"""
import sys

from main import main

if __name__ == "__main__":
    sys.exit(main())
