"""The device mesh and the one table that says how every array is laid out on it.

Mesh axes are always ("data", "fsdp"). Batches are split over both. Parameters and optimizer state are sharded
FSDP / ZeRO-3 style along their "embed" dimension over the *param axis*: "fsdp" when it has more than one device,
else "data". So `--mesh 8` (= data:8) shards params over all 8 devices, and `--mesh data:2,fsdp:4` shards them over
fsdp:4 and replicates them over data:2. Code elsewhere names *logical* axes ("batch", "embed", ...) and asks this
module for PartitionSpecs; nothing else knows the mesh axes.

Several processes (one per host) start through `init_distributed()`; each then feeds its own rows of the global batch
(`local_batch_slice`, `global_batch`).
"""
from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from nanojax.common import UserError

MESH_AXES = ("data", "fsdp")
MESH_FORMS = '"1", "8" (= data:8), "data:8", "data:2,fsdp:4", "fsdp:8"'

# The param axis is mesh-dependent, so the table names it by this placeholder (resolved by `param_axis`).
PARAM = "<param axis>"

# Logical axis -> mesh axes. The only place that knows mesh axes. A mesh axis claimed by an earlier dimension of the
# same array is skipped: activations (batch, seq, embed) give both axes to batch, so their embed stays whole.
RULES: dict[str, tuple[str, ...] | str | None] = {
    "batch": ("data", "fsdp"),  # token batches, activations, KV cache rows
    "replica_batch": ("data",),  # batch over the axis params are replicated on (the embedding lookup's layout)
    "seq": None,
    "embed": PARAM,  # the FSDP / ZeRO-3 dimension of every weight and its optimizer state
    "vocab": None,
    "heads": None,
    "kv_heads": None,
    "head_dim": None,
    "mlp": None,
    "layers": None,  # stacked layers stay whole: scan walks them one by one
    "stack": PARAM,  # Muon's view of the stacked layer axis: whole matrices per device, layers spread over devices
}


# ----------------------------------------------------------------------------------------------------------------------
# --mesh specs

def parse_mesh(spec: str, num_devices: int | None = None) -> dict[str, int]:
    """'8' -> {'data': 8, 'fsdp': 1}; 'data:2,fsdp:4' -> {'data': 2, 'fsdp': 4}. Checks the device count if given."""
    text = str(spec).strip()

    def bad(why: str) -> UserError:
        count = f" on {num_devices} devices" if num_devices is not None else ""
        return UserError(f"--mesh {spec!r}{count}: {why}; allowed forms: {MESH_FORMS}")

    sizes = {axis: 1 for axis in MESH_AXES}
    if text.isdigit():
        sizes["data"] = int(text)
    else:
        seen = set()
        for part in text.split(","):
            name, sep, size = part.strip().partition(":")
            name, size = name.strip(), size.strip()
            if not sep or not size.isdigit():
                raise bad(f"malformed part {part.strip()!r} (expected AXIS:SIZE)")
            if name not in MESH_AXES:
                raise bad(f"unknown axis {name!r} (axes are {', '.join(MESH_AXES)})")
            if name in seen:
                raise bad(f"axis {name!r} given twice")
            seen.add(name)
            sizes[name] = int(size)
    if any(n < 1 for n in sizes.values()):
        raise bad("every axis size must be at least 1")
    needed = math.prod(sizes.values())
    if num_devices is not None and needed not in (1, num_devices):  # "1" always works: the first device
        raise bad(f"it needs {needed} devices, but there are {num_devices} (use all of them, or 1)")
    return sizes


def make_mesh(spec: str | int = "1", devices=None) -> Mesh:
    """A ("data", "fsdp") mesh with Auto axes (GSPMD propagates shardings; see stack-notes on Explicit axes) over all
    devices, or over the first one for spec "1"."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(str(spec), len(devices))
    if math.prod(sizes.values()) == 1:
        devices = devices[:1]
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def param_axis(mesh: Mesh) -> str:
    """The mesh axis that shards params and optimizer state: "fsdp" if it has >1 device, else "data"."""
    return "fsdp" if mesh.shape["fsdp"] > 1 else "data"


# ----------------------------------------------------------------------------------------------------------------------
# Logical axes -> PartitionSpecs and shardings

def _mesh_axes_for(name: str | None, mesh: Mesh) -> tuple[str, ...]:
    if name is None:
        return ()
    if name not in RULES:
        raise ValueError(f"unknown logical axis {name!r}; known: {', '.join(RULES)} (add it to nanojax.mesh.RULES)")
    rule = RULES[name]
    if rule is None:
        return ()
    axes = (param_axis(mesh),) if rule == PARAM else rule
    return tuple(a for a in axes if mesh.shape[a] > 1)  # size-1 axes shard nothing; leave them out of specs


def axis_size(name: str, mesh: Mesh) -> int:
    """How many devices the logical axis `name` is split over on this mesh (1 = replicated)."""
    return math.prod(mesh.shape[a] for a in _mesh_axes_for(name, mesh))


def logical_to_mesh(logical_axes: tuple, mesh: Mesh, shape: tuple | None = None) -> P:
    """PartitionSpec for an array whose dims have these logical names. With `shape`, a dim not divisible by its
    mesh axes stays replicated (always correct, just less memory-efficient)."""
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(f"logical axes {logical_axes} do not match shape {tuple(shape)}")
    claimed: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        axes = tuple(a for a in _mesh_axes_for(name, mesh) if a not in claimed)
        claimed.update(axes)  # even if this dim cannot use them: a batch of 1 does not move onto its embed dim
        if axes and shape is not None and shape[dim] % math.prod(mesh.shape[a] for a in axes):
            axes = ()
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:  # P('data', None) == P('data'); shorter specs read better in logs and tests
        spec.pop()
    return P(*spec)


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def shardings(axes_tree, mesh: Mesh, shapes_tree=None):
    """NamedShardings for a tree of logical-axes tuples (e.g. gpt.param_axes(cfg)). `shapes_tree` (same structure;
    arrays, ShapeDtypeStructs or shape tuples) enables the divisibility check."""
    if shapes_tree is None:
        return jax.tree.map(lambda axes: NamedSharding(mesh, logical_to_mesh(axes, mesh)), axes_tree, is_leaf=_is_axes)

    def one(axes, shaped):
        shape = shaped if isinstance(shaped, tuple) else shaped.shape
        return NamedSharding(mesh, logical_to_mesh(axes, mesh, shape))

    return jax.tree.map(one, axes_tree, shapes_tree, is_leaf=_is_axes)


def batch_sharding(mesh: Mesh, shape: tuple | None = None) -> NamedSharding:
    """Sharding for token batches (B, T): rows over the data axes."""
    ndim = 2 if shape is None else len(shape)
    return NamedSharding(mesh, logical_to_mesh(("batch",) + (None,) * (ndim - 1), mesh, shape))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def constrain_fn(mesh: Mesh | None):
    """f(x, logical_axes) -> x constrained to the rules' sharding; for activations inside jitted code.
    A no-op without a mesh or on one device."""
    if mesh is None or mesh.size == 1:
        return lambda x, logical_axes: x

    def constrain(x, logical_axes):
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_mesh(logical_axes, mesh, x.shape)))

    return constrain


# ----------------------------------------------------------------------------------------------------------------------
# Several processes (one per host)

_distributed_started = False


def init_distributed() -> bool:
    """Join a multi-process run, once, before any other jax call. Configured by NANOJAX_COORDINATOR (host:port),
    NANOJAX_NUM_PROCESSES and NANOJAX_PROCESS_ID, or by SLURM (jax detects it). Returns True if multi-process."""
    global _distributed_started
    if _distributed_started or jax.distributed.is_initialized():
        return True
    env = os.environ
    ours = [k for k in ("NANOJAX_COORDINATOR", "NANOJAX_NUM_PROCESSES", "NANOJAX_PROCESS_ID") if env.get(k)]
    if ours:
        if len(ours) != 3:
            raise UserError(f"multi-process start needs NANOJAX_COORDINATOR (host:port), NANOJAX_NUM_PROCESSES and "
                            f"NANOJAX_PROCESS_ID together; only {', '.join(ours)} set")
        try:
            num, pid = int(env["NANOJAX_NUM_PROCESSES"]), int(env["NANOJAX_PROCESS_ID"])
        except ValueError:
            raise UserError(f"NANOJAX_NUM_PROCESSES={env['NANOJAX_NUM_PROCESSES']!r} and NANOJAX_PROCESS_ID="
                            f"{env['NANOJAX_PROCESS_ID']!r} must be integers") from None
        if not 0 <= pid < num:
            raise UserError(f"NANOJAX_PROCESS_ID={pid} must be in [0, NANOJAX_NUM_PROCESSES={num})")
        if num == 1:
            return False
        jax.distributed.initialize(coordinator_address=env["NANOJAX_COORDINATOR"], num_processes=num, process_id=pid)
    elif env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()  # SLURM cluster detection fills in coordinator, count and id
    else:
        return False
    _distributed_started = True
    return True


def local_batch_slice(mesh: Mesh, global_shape: tuple) -> slice:
    """The rows of a global batch this process must load (its devices' shards, which are contiguous)."""
    index_map = batch_sharding(mesh, global_shape).addressable_devices_indices_map(tuple(global_shape))
    rows = sorted({(idx[0].start or 0, global_shape[0] if idx[0].stop is None else idx[0].stop)
                   for idx in index_map.values()})
    start, stop = rows[0][0], rows[0][1]
    for lo, hi in rows[1:]:
        if lo > stop:
            raise ValueError(f"this process's rows are not contiguous: {rows}")
        stop = max(stop, hi)
    return slice(start, stop)


def global_batch(mesh: Mesh, local_array_np: np.ndarray, global_shape: tuple) -> jax.Array:
    """One global jax.Array from each process's rows (`local_batch_slice`) of the batch."""
    global_shape = tuple(global_shape)
    sharding = batch_sharding(mesh, global_shape)
    return jax.make_array_from_process_local_data(sharding, np.asarray(local_array_np), global_shape)
