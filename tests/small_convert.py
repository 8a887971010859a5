"""A small torch net (input `x` of shape 1x8x8x8) converted to a float16 Core ML program, for the exactness tests."""

import warnings

import coremltools as ct
import torch


def convert_small(net, target):
    """`net` traced on zeros and converted to an ML program (float16 compute) for deployment `target`."""
    x = torch.zeros(1, 8, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ct.convert(
            torch.jit.trace(net, x),
            inputs=[ct.TensorType(name="x", shape=x.shape)],
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16,
            minimum_deployment_target=target,
        )
