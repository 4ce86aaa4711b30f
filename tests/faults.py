"""Fault injection for tests: the failure paths of the library, made to happen on a CPU."""

import torch


def simulate_oom(module: torch.nn.Module, max_tokens: int):
    """Make `module` raise torch.OutOfMemoryError on any call whose input_ids hold more than `max_tokens`
    tokens (rows x padded length): the out-of-memory path, testable on a CPU. Returns the hook handle;
    call `.remove()` on it to stop."""

    def hook(_module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None and input_ids.numel() > max_tokens:
            raise torch.OutOfMemoryError(f"simulated: {input_ids.numel()} tokens > {max_tokens}")

    return module.register_forward_pre_hook(hook, with_kwargs=True)
