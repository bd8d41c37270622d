"""Frozen weights kept in the compute dtype: a bf16 run stores its frozen backbone's matrices in bf16 once, instead of
autocast casting them again at every use, with bit-identical results; fp32 runs keep every weight as it was."""
import copy

import pytest
import torch

from models.hide import HiDeMethod
from test_host_sync import TRAINING_METHODS, _method


def _bf16_step(method, images, targets, task: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    method.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = method(images, targets, task)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in method.named_parameters() if p.grad is not None}
    method.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("name", [n for n in TRAINING_METHODS if n not in ("finetune", "joint", "fix")])
def test_bf16_steps_are_bit_identical_with_frozen_weights_stored_in_bf16(name):
    method, scenario = _method(name)
    stored = copy.deepcopy(method)
    frozen = {id(m): m for m in stored.frozen_modules()}.values()  # a query model may be the backbone itself
    frozen_bytes = sum(p.numel() * 4 for m in frozen for layer in m.modules()
                       if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d)
                       for p in layer.parameters(recurse=False))
    assert frozen_bytes > 0
    assert stored.store_frozen_weights(torch.bfloat16) == frozen_bytes // 2  # half the memory
    images = torch.randn(4, 3, 32, 32)
    targets = torch.tensor(scenario.task_classes[0]).repeat(4)[:4]
    for phase in method.phases:
        for model in (method, stored):
            model.set_phase(phase)
            model.begin_task(0)
        expected, stored_result = _bf16_step(method, images, targets, 0), _bf16_step(stored, images, targets, 0)
        assert torch.equal(expected[0], stored_result[0]), f"{name} {phase}: loss"
        assert expected[1].keys() == stored_result[1].keys() and expected[1]
        for key, grad in expected[1].items():
            assert torch.equal(grad, stored_result[1][key]), f"{name} {phase}: gradient of {key}"
            assert grad.dtype == torch.float32  # what trains keeps fp32, and so do its gradients


def test_only_frozen_matrices_change_dtype_and_fp32_runs_change_nothing():
    method, _ = _method("hideprompt")
    assert isinstance(method, HiDeMethod)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    method.to_run_device(torch.device("cpu"), "none")
    assert all(torch.equal(before[k], v) and before[k].dtype == v.dtype for k, v in method.state_dict().items())
    method.to_run_device(torch.device("cpu"), "bf16")
    vit = method.original_vit
    assert vit.blocks[0].attn.qkv.weight.dtype == torch.bfloat16 and vit.patch_embed.proj.weight.dtype == torch.bfloat16
    assert vit.blocks[0].norm1.weight.dtype == torch.float32 and vit.pos_embed.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in method.tii.parameters())  # stage 1's trained mapping and head
    assert method.head.weight.dtype == torch.float32
    assert method.trained_tensors() and all(t.dtype in (torch.float32, torch.float64, torch.bool, torch.long)
                                            for t in method.trained_tensors().values())


def test_methods_that_train_their_backbone_keep_it_in_fp32():
    for name in ("finetune", "joint", "fix"):
        method, _ = _method(name)
        assert method.store_frozen_weights(torch.bfloat16) == 0, name
