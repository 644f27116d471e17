"""A minimal normal-world driver for the ShadowNet TA, for the converter's and the TA's tests.

It is not the runtime (``shadownet.runtime`` is): it loads the artifacts into the TA, binds one shared
memory, and for each inference runs step 0, then per round the accelerator (LiteRT on ``untrusted.tflite``)
and the next step, counting TEE entries and recording what crosses the boundary. Beside it: ``litert``, the
reference; ``protect`` and ``runs_as_litert``, a conversion and its fidelity against that reference; and
``conv_graph``, a one-conv model built with the graph layer.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

import tee_sim
from converters import convert
from converters.fidelity import relative_error
from shadownet.exceptions import ShadowNetError
from shadownet.tee_errors import TEE_ERRORS
from tee_sim.ta_shadownet_commands import UUID, Command, encode_placement


def mapped(exc: tee_sim.TEEError) -> ShadowNetError:
    """The runtime's exception for a TA error (its own map, ``shadownet.tee_errors``)."""
    return TEE_ERRORS.get(exc.code, ShadowNetError)(str(exc))


class Driver:
    def __init__(self, context: tee_sim.Context, out_dir: str | Path, *, secrets: bytes | None = None,
                 untrusted: bytes | None = None, placement: tuple[int, dict[str, int]] | None = None) -> None:
        """``placement``: (size, {buffer: offset}) instead of the manifest's layout (BIND_SHARED_MEMORY's
        optional parameter)."""
        out = Path(out_dir)
        self.manifest = json.loads((out / "manifest.json").read_text())
        self.untrusted = untrusted if untrusted is not None else (out / "untrusted.tflite").read_bytes()
        self.secrets = secrets if secrets is not None else (out / "secrets.sealed").read_bytes()
        self.session = context.open_session(UUID)
        try:
            self.session.invoke_command(Command.LOAD_MODEL, [tee_sim.TempMemRef(self.secrets),
                                                              tee_sim.TempMemRef(self.untrusted)])
        except tee_sim.TEEError as exc:
            self.session.close()
            raise mapped(exc) from None
        size, offsets = placement or (self.manifest["shared_memory_size"], None)
        self.shm = context.register_shared_memory(size)
        try:
            bind = [tee_sim.MemRef(self.shm, 0, size, "inout")]
            if offsets:
                bind.append(tee_sim.TempMemRef(encode_placement(offsets)))
            self.session.invoke_command(Command.BIND_SHARED_MEMORY, bind)
        except tee_sim.TEEError as exc:
            self.close()
            raise mapped(exc) from None
        at = offsets or {b["name"]: b["offset"] for b in self.manifest["buffers"]}
        self.views = {b["name"]: self.shm.ndarray(b["dtype"], b["shape"], at[b["name"]])
                      for b in self.manifest["buffers"]}
        self.accelerator = Interpreter(model_content=self.untrusted, num_threads=1)
        self.runners = {r["signature"]: self.accelerator.get_signature_runner(r["signature"])
                        for r in self.manifest["rounds"]}
        self.seen: list[dict[str, np.ndarray]] = []  # per round: what the normal world saw

    def __call__(self, *inputs: np.ndarray, record: bool = False) -> list[np.ndarray]:
        for i, x in enumerate(inputs):
            self.views[f"input/{i}"][...] = x
        self.step(0)
        if record:
            self.seen = []
        for r, spec in enumerate(self.manifest["rounds"], start=1):
            feeds = {t["name"]: self.views[t["buffer"]].copy() for t in spec["inputs"]}
            results = self.runners[spec["signature"]](**feeds)
            for t in spec["outputs"]:
                self.views[t["buffer"]][...] = results[t["name"]]
            if record:
                self.seen.append({**feeds, **results})
            self.step(r)
        # (A bool or 8- / 16-bit output sits in shared memory as float32: converters/non_float.py.)
        return [self.views[f"output/{i}"].astype(t["dtype"]) for i, t in enumerate(self.manifest["outputs"])]

    def step(self, k: int) -> None:
        try:
            self.session.invoke_command(Command.RUN_STEP, [tee_sim.Value(a=k)])
        except tee_sim.TEEError as exc:
            raise mapped(exc) from None

    def memory(self) -> tuple[int, int]:
        out = tee_sim.Value(direction="out")
        self.session.invoke_command(Command.GET_STATS, [out])
        return out.a, out.b

    def close(self) -> None:
        self.session.close()
        self.shm.release()

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def litert(model: bytes, *inputs: np.ndarray, builtin: bool = False) -> list[np.ndarray]:
    """The reference: LiteRT on the original model (XNNPACK; ``builtin``: LiteRT's builtin kernels)."""
    resolver = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if builtin else OpResolverType.AUTO
    interpreter = Interpreter(model_content=model, experimental_op_resolver_type=resolver)
    interpreter.allocate_tensors()
    for d, x in zip(interpreter.get_input_details(), inputs, strict=True):
        interpreter.set_tensor(d["index"], x)
    interpreter.invoke()
    return [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]


# Worst relative error against LiteRT on the original: the default scheme's target, and the paper's
# scheme's (its N(0, 1) fakes cost precision by cancellation).
TOLERANCES = {"groupmix": 1e-4, "shadownet": 1e-3}
TOLERANCE = TOLERANCES["groupmix"]


def protect(model, out, device, seed=7, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(model, out, seed=seed, device=device, **kw)


def inputs_for(model: bytes, rng) -> list[np.ndarray]:
    return [rng.standard_normal(d["shape"]).astype(np.float32)
            for d in Interpreter(model_content=model).get_input_details()]


def runs_as_litert(device, out, model: bytes, rng, inferences: int,
                   tolerance: float) -> list[list[np.ndarray]]:
    """Run the protected ``out`` on ``inferences`` random inputs against LiteRT on ``model``: the same types
    and shapes, within ``tolerance`` (integers and bools exactly: ``relative_error``). Returns LiteRT's
    outputs, for the caller's own checks."""
    wants = []
    with Driver(device, out) as run:
        for _ in range(inferences):
            xs = inputs_for(model, rng)
            got, want = run(*xs), litert(model, *xs)
            assert [(g.dtype, g.shape) for g in got] == [(w.dtype, w.shape) for w in want]
            assert relative_error(got, want) <= tolerance
            wants.append(want)
    return wants


def conv_graph(weights=None, extend=None) -> bytes:
    """x [1, 6, 6, 3] -> 3x3 conv (4 filters, ``weights``) -> y, then ``extend(graph, x, y)`` if given."""
    from ai_edge_litert import schema_py_generated as fb

    from converters.graph import Graph, write_model

    g = Graph()
    x = g.add_tensor("x", (1, 6, 6, 3), np.float32)
    w = conv_weights((0, 0, 0, 0), None) if weights is None else weights
    b = g.add_tensor("b", (4,), np.float32, np.zeros(4, np.float32))
    y = g.add_tensor("y", (1, 6, 6, 4), np.float32)
    options = fb.Conv2DOptionsT()
    options.padding, options.strideH, options.strideW = fb.Padding.SAME, 1, 1
    g.add_op("CONV_2D", [x, g.add_tensor("w", w.shape, np.float32, w), b], [y], options)
    g.inputs, g.outputs = [x], [y]
    if extend:
        extend(g, x, y)
    return write_model(g)


def conv_weights(position, value):
    """The test conv's weights, with ``value`` at ``position`` (None: as drawn)."""
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    if value is not None:
        w[position] = value
    return w
