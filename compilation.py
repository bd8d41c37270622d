"""--compile: torch.compile of what runs at every step, the method's training forward and its evaluation forward.

- Training: the method's `forward` (loss and logits) is compiled in place (`nn.Module.compile`) before DDP wraps it,
  the order PyTorch recommends for DDP; AOTAutograd compiles the backward at the first backward. The optimizer step,
  gradient clipping and loss scaling stay as they are.
- Evaluation: `predict` and `predict_task` of a test batch. Their feature caches (`ContinualMethod.cached`) stay
  Python: traced, a lookup keyed by the test batch would guard on the key and recompile for every batch. Dynamo
  skips the lookup's own frame and compiles what it runs on a miss (the ViT passes) as frames of their own.
- Batch sizes: a function is compiled first for the batch size of its first call; the first call with another size
  (a shorter last batch) recompiles it once with the batch dimension dynamic (dynamo's automatic dynamic shapes),
  and every size after that reuses that graph.
- Results are the uncompiled ones up to floating-point rounding (fused kernels order their sums differently).
- A compilation that fails (inductor finds no C++ compiler, dynamo meets something it cannot trace) leaves the
  method uncompiled for the rest of the run, with one warning naming the function and why.
"""
from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch._dynamo.exc import TorchDynamoException

from utils import log, synchronize, warn

# the torch.compile backend; tests take "aot_eager" (the same graph capture and autograd, without generated code)
BACKEND: Any = "inductor"
# device types where `--compile auto` compiles: those where it has been measured faster, none yet
MEASURED_FASTER: frozenset[str] = frozenset()
# the call timed against the first: the first compiles, and the second may recompile a frame that specialised on the
# first batch's index in the test set (dynamo makes it dynamic then)
LATER_CALL = 3
# graphs that specialise on the task index recompile once per task (HiDe-Prompt's prompt momentum slices the slots
# before task t, its task-identity mask reads the tasks seen): dynamo's default limit of 8 would leave the later tasks
# of a 10-task run uncompiled
RECOMPILE_LIMIT = 64


def enabled(setting: str, device: torch.device) -> bool:
    """Whether `--compile {auto,on,off}` compiles on `device`."""
    return setting == "on" or (setting == "auto" and device.type in MEASURED_FASTER)


def _reason(err: BaseException) -> str:
    # a backend's failure reads "backend='inductor' raised:" then the backend's own error on the next line
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {' '.join(lines[:2])[:240]}"


class MethodCompilation:
    """What is compiled of one method for the whole run; once any of it fails to compile, all of it runs uncompiled
    (the next function would fail the same way, after as long a trace)."""

    def __init__(self) -> None:
        self.failed = False
        self.forward_compiled = False
        self.calls: dict[str, CompiledCall] = {}


class CompiledCall:
    """One compiled function of a run (the training step of a phase, the evaluation forward): its first call and a
    later one are timed and logged once."""

    def __init__(self, what: str, device: torch.device, compilation: MethodCompilation):
        self.what, self.device, self.compilation = what, device, compilation
        self.fn: Callable[..., Any] | None = None  # the callable that runs compiled code
        self.calls = 0
        self.first_seconds = 0.0

    def __call__(self, *args: Any) -> Any:
        if not self.compilation.failed:
            try:
                return self.fn(*args)
            except TorchDynamoException as err:  # a failed compilation; what of the call ran only filled caches
                self.compilation.failed = True
                warn(f"--compile: the {self.what} does not compile ({_reason(err)}); the run continues uncompiled")
        with torch.compiler.set_stance("force_eager"):
            return self.fn(*args)

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Around one call as the caller counts it (the training step: forward, backward and optimizer step, as the
        backward compiles at the first backward)."""
        self.calls += 1
        if self.calls not in (1, LATER_CALL):
            yield
            return
        synchronize(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        seconds = time.perf_counter() - start
        if self.calls == 1:
            self.first_seconds = seconds
        elif not self.compilation.failed:
            log(f"--compile: {self.what}: first call {self.first_seconds:.2f} s (compiling), call {LATER_CALL} "
                f"{seconds:.3f} s")


# weak: a method that goes takes what was compiled of it along
_compilations: weakref.WeakKeyDictionary[torch.nn.Module, MethodCompilation] = weakref.WeakKeyDictionary()


def _compilation_of(method: torch.nn.Module) -> MethodCompilation:
    """The method's compilation state; the first time, what both compiled functions need: the feature caches kept
    out of tracing, and a recompilation per task allowed."""
    if method not in _compilations:
        method.cached = torch.compiler.disable(method.cached, recursive=False)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        _compilations[method] = MethodCompilation()
    return _compilations[method]


def _call_of(method: torch.nn.Module, what: str, device: torch.device) -> CompiledCall:
    compilation = _compilation_of(method)
    return compilation.calls.setdefault(what, CompiledCall(what, device, compilation))


def compile_forward(method: torch.nn.Module) -> None:
    """Compile the method's training forward in place, once (before DDP wraps it)."""
    compilation = _compilation_of(method)
    if not compilation.forward_compiled:
        method.compile(backend=BACKEND)
        compilation.forward_compiled = True


def training_forward(method: torch.nn.Module, model: Callable[..., Any], what: str,
                     device: torch.device) -> CompiledCall:
    """`model` (the method compiled by `compile_forward`, or DDP around it) as the run's compiled `what`."""
    call = _call_of(method, what, device)
    call.fn = model  # DDP is wrapped anew for every task; what was compiled and measured stays
    return call


def evaluation_forward(method: torch.nn.Module, forward: Callable[..., Any], device: torch.device) -> CompiledCall:
    """`forward(method, images, batch_key)` compiled (once per method)."""
    call = _call_of(method, "evaluation forward", device)
    if call.fn is None:
        call.fn = torch.compile(forward, backend=BACKEND)
    return call


def timed(fn: Callable[..., Any]) -> AbstractContextManager[None]:
    """`fn.timed()` for a compiled function, else nothing."""
    return fn.timed() if isinstance(fn, CompiledCall) else nullcontext()
