"""Join converted (and palettized) ML programs that pass tensors by name into one program.

The UNet is converted a piece at a time (`workbench.coreml.unet_split`); each piece is an ML program whose inputs
are package inputs or tensors an earlier piece outputs, by name. `stitch_programs` copies every piece's operations,
in order, into one function whose inputs are the package inputs, wiring each piece input to the variable of that
name, and returns the program with the outputs asked for. Constants (palettized weights included) are copied as
they are: the LUTs and indices are not touched, so the stitched package's weights equal the pieces' bit for bit
(`verify_package` checks the saved package against the simulation). The float32 casts at a piece's borders
(host-side inputs and outputs are float32) meet as float16 -> float32 -> float16 pairs, which
`coremltools`' `cast_optimization` pass folds away; the float32 boundary outputs a chunk declares stay.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np


def _unique(name: str, used: set[str]) -> str:
    """`name`, or `name_1`, `name_2`... if taken; recorded as used."""
    candidate, n = name, 0
    while candidate in used:
        n += 1
        candidate = f"{name}_{n}"
    used.add(candidate)
    return candidate


def _copy_op(op, varmap: dict, used: set[str]):
    """Re-create `op` in the current builder context with its inputs mapped through `varmap`; map its outputs."""
    from coremltools.converters.mil import Builder as mb

    name = _unique(op.name, used)
    if op.op_type == "const":
        made = mb.const(val=op.outputs[0].val, name=name)
    else:
        kwargs = {
            key: tuple(varmap[v] for v in value) if isinstance(value, (list, tuple)) else varmap[value]
            for key, value in op.inputs.items()
        }
        made = getattr(mb, op.op_type)(**kwargs, name=name)
    made = made if isinstance(made, (list, tuple)) else (made,)
    for old, new in zip(op.outputs, made, strict=True):
        if new.name != old.name and old.name not in used:  # keep the original variable names where free
            used.discard(new.name)
            new.name = old.name
            used.add(old.name)
        varmap[old] = new


def stitch_programs(
    programs: Iterable,
    inputs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    outputs: Sequence[str],
    opset_version,
):
    """One program running `programs` in order, fed by name.

    Args:
        programs: MIL programs (`coremltools.converters.mil.Program`), each with a `main` function whose inputs are
            keys of `inputs` or outputs of an earlier program; consumed in order (an iterator may load each lazily).
        inputs: the stitched program's inputs: name -> (shape, numpy dtype).
        outputs: names (program outputs or inputs) the stitched program returns, in order.
        opset_version: a `coremltools.target`, the pieces' deployment target.

    Returns:
        `coremltools.converters.mil.Program` with a `main` function.

    Raises:
        KeyError: a piece reads a name nothing before it provides, or an output nobody writes.
    """
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, Program, types

    placeholders = {
        name: mb.placeholder(shape=shape, dtype=types.numpy_type_to_builtin_type(dtype), name=name)
        for name, (shape, dtype) in inputs.items()
    }
    program = Program()
    with Function(placeholders, opset_version=opset_version) as function:
        env: dict[str, object] = dict(function.inputs)
        used = set(env)
        for piece in programs:
            main = piece.functions["main"]
            varmap = {var: env[name] for name, var in main.inputs.items()}
            for op in main.operations:
                _copy_op(op, varmap, used)
            env.update({var.name: varmap[var] for var in main.outputs})
        function.set_outputs([env[name] for name in outputs])
        program.add_function("main", function)
    return program


def program_to_model(program, deployment_target):
    """Serialize a stitched program as an `MLModel` (weights in a temporary folder), folding border casts.

    Only `cast_optimization` and dead-code elimination run: the pieces were optimised when each was converted, and
    their (palettized) constants must stay as they are.
    """
    import coremltools as ct

    pipeline = ct.PassPipeline(
        pass_names=[
            "common::cast_optimization",
            "common::remove_redundant_ops",
            "common::dead_code_elimination",
        ],
        pipeline_name="stitch",
    )
    return ct.convert(
        program,
        convert_to="mlprogram",
        minimum_deployment_target=deployment_target,
        pass_pipeline=pipeline,
        skip_model_load=True,
    )
