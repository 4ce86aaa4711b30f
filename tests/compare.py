"""Comparing pipeline outputs with the reference: same structure and strings, floats within a tolerance."""

import math

import torch


def assert_same_output(ours, ref, atol=1e-4, path="output"):
    """Recursively equal: dicts (same keys), lists/tuples (same length), strings and ints exactly, floats within atol."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(ours, torch.Tensor), f"{path}: expected a tensor, got {type(ours).__name__}"
        torch.testing.assert_close(ours.float(), ref.float(), atol=atol, rtol=0, msg=lambda m: f"{path}: {m}")
    elif isinstance(ref, dict):
        assert isinstance(ours, dict) and sorted(ours) == sorted(ref), f"{path}: keys {sorted(ours)} != {sorted(ref)}"
        for k in ref:
            assert_same_output(ours[k], ref[k], atol, f"{path}[{k!r}]")
    elif isinstance(ref, (list, tuple)):
        assert isinstance(ours, (list, tuple)), f"{path}: expected a list, got {type(ours).__name__}"
        assert len(ours) == len(ref), f"{path}: length {len(ours)} != {len(ref)}"
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_same_output(a, b, atol, f"{path}[{i}]")
    elif isinstance(ref, float):
        assert isinstance(ours, float), f"{path}: expected a float, got {type(ours).__name__}"
        assert math.isclose(ours, ref, abs_tol=atol), f"{path}: {ours} != {ref} (atol {atol})"
    else:
        assert ours == ref and type(ours) is type(ref), f"{path}: {ours!r} != {ref!r}"
