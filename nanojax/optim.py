"""The optimizer: Muon for the hidden matrices, AdamW for the embedding and the lm_head, as one optax transformation.

nanochat's Oct-2025 recipe. Hidden matrices (everything under "blocks", stacked on a leading layer axis) get Nesterov
momentum, then each layer's matrix is orthogonalised by a few quintic Newton-Schulz (or Polar Express) iterations,
vmapped over the layer axis. On a mesh, the stacked update is resharded so that the *layer* axis is split over the
param mesh axis and every device orthogonalises whole matrices (never shards of one), then it goes back to the params'
FSDP sharding. wte and lm_head get AdamW with learning rates scaled by (model_dim / 768) ** -0.5.

The state is a plain dict of arrays, {"count", "mu", "nu"}: "count" is the step (it drives Muon's momentum warm-up,
so a resumed run continues exactly), "mu" mirrors the params (Muon momentum / Adam first moment), "nu" mirrors the
AdamW params. `opt_state_shardings` lays it out like the params. The learning-rate multiplier is an argument of
`update` (`tx.update(grads, state, params, lr_multiplier=m)`): the training loop computes it on the host from the step
(pretraining) or from the data consumed (mid-training), so one optimizer serves every stage's schedule.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from nanojax import mesh as meshlib

# Keller Jordan's quintic: fast, not exactly convergent; singular values land in roughly (0.7, 1.2).
QUINTIC_COEFFS = (3.4445, -4.7750, 2.0315)
# Polar Express (arXiv 2505.16932): per-iteration coefficients for 5 iterations (safety 2e-2, cushion 2), as nanochat.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
NS_METHODS = {"newton-schulz": (QUINTIC_COEFFS, 1.0), "polar-express": (POLAR_EXPRESS_COEFFS, 1.01)}

ADAM_B1, ADAM_B2, ADAM_EPS = 0.8, 0.95, 1e-10


# ----------------------------------------------------------------------------------------------------------------------
# Orthogonalisation

def newton_schulz(G, steps: int = 5, coeffs=QUINTIC_COEFFS, *, dtype=None, norm_safety: float = 1.0,
                  gram: bool | None = None):
    """Approximately orthogonalise a matrix: G = U S V^T -> ~U V^T (singular values pushed towards 1).

    `coeffs` is one (a, b, c) for every iteration, or a sequence of per-iteration triples (the last one repeats).
    Each iteration is X <- a X + (b A + c A^2) X with A = X X^T, on the smaller Gram side. `dtype` is the working
    precision (bf16 is fine: the iteration is self-correcting); the result has G's dtype.

    gram (None = when the working dtype is fp32 and the matrix is at least twice as wide as tall): the same iterations
    carried out on the m x m Gram matrix alone. P = a I + b A + c A^2 is a polynomial in A, so it commutes with A and
    the next Gram matrix is P A P = P^2 A; the result is (P_5 ... P_1) X. That is 4 m^3 per iteration plus 2 m^2 n
    once, instead of (2 m^2 n + m^3) per iteration: ~40% fewer FLOPs for the 4:1 MLP matrices (fp32 only: squaring
    the Gram matrix in bf16 would lose its small eigenvalues).
    """
    per_step = jnp.asarray(coeffs, jnp.float32).reshape(-1, 3)
    per_step = per_step[jnp.minimum(jnp.arange(steps), per_step.shape[0] - 1)]  # (steps, 3)
    wide = G.shape[-2] <= G.shape[-1]
    X = G if wide else G.T  # (m, n) with m <= n, so A = X X^T is m x m
    X = X.astype(jnp.float32)
    X = X / (jnp.linalg.norm(X) * norm_safety + 1e-7)  # spectral norm <= Frobenius norm <= 1
    X = X.astype(dtype or G.dtype)
    m, n = X.shape
    if gram is None:
        gram = X.dtype == jnp.float32 and n >= 2 * m

    if gram:
        A = X @ X.T
        eye = jnp.eye(m, dtype=X.dtype)
        Q = eye
        for i in range(steps):
            a, b, c = per_step[i].astype(X.dtype)
            P = a * eye + b * A + c * (A @ A)
            Q, A = P @ Q, P @ (P @ A)
        X = Q @ X
    else:
        for i in range(steps):  # unrolled: a few matmuls each, faster than a fori_loop on XLA:CPU
            a, b, c = per_step[i].astype(X.dtype)  # keep the whole iteration in the working dtype
            A = X @ X.T
            B = b * A + c * (A @ A)
            X = (a * X + B @ X).astype(X.dtype)
    return (X if wide else X.T).astype(G.dtype)


def orthogonalize_stacked(G_LMN, *, steps=5, ns="newton-schulz", dtype=None, mesh: Mesh | None = None,
                          logical_axes: tuple | None = None):
    """newton_schulz vmapped over the leading (layer) axis of an (L, m, n) stack.

    On a mesh of >1 device the stack is padded with zero matrices to a multiple of the devices on the "stack" axis
    and constrained so each device holds whole matrices of some layers; afterwards the result is sliced back and
    (if `logical_axes` of the param are given) constrained to the param's own sharding.
    """
    coeffs, safety = _ns_method(ns)
    ortho = jax.vmap(lambda g: newton_schulz(g, steps, coeffs, dtype=dtype, norm_safety=safety))
    if mesh is None or mesh.size == 1:
        return ortho(G_LMN)
    L = G_LMN.shape[0]
    pad = -L % meshlib.axis_size("stack", mesh)
    G = jnp.pad(G_LMN, ((0, pad), (0, 0), (0, 0)))  # zero matrices orthogonalise to zero: harmless
    by_layer = NamedSharding(mesh, meshlib.logical_to_mesh(("stack", None, None), mesh, G.shape))
    U = jax.lax.with_sharding_constraint(G, by_layer)
    U = jax.lax.with_sharding_constraint(ortho(U), by_layer)[:L]
    if logical_axes is not None:
        spec = meshlib.logical_to_mesh(tuple(logical_axes), mesh, U.shape)
        U = jax.lax.with_sharding_constraint(U, NamedSharding(mesh, spec))
    return U


def _ns_method(ns: str):
    if ns not in NS_METHODS:
        raise ValueError(f"ns={ns!r}; allowed: {', '.join(NS_METHODS)}")
    return NS_METHODS[ns]


# ----------------------------------------------------------------------------------------------------------------------
# Schedules

def schedule(num_iterations: int, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.2,
             final_lr_frac: float = 0.0):
    """step -> LR multiplier: linear warmup, constant, linear warmdown over the last `warmdown_ratio` of the steps
    to `final_lr_frac`. Shared by every parameter group; `float(schedule(...)(step))` for logging."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)

    def multiplier(step):
        step = jnp.asarray(step, jnp.float32)
        warm = (step + 1) / max(warmup, 1)
        left = (num_iterations - step) / max(warmdown, 1)  # 1 where warmdown starts, 0 at the end
        down = left + (1 - left) * final_lr_frac
        return jnp.where(step < warmup, warm, jnp.where(step <= num_iterations - warmdown, 1.0, down))

    return multiplier


def momentum_schedule(warmup_steps: int = 300, start: float = 0.85, end: float = 0.95):
    """step -> Muon momentum: linear from `start` to `end` over the first `warmup_steps`, then constant (`end` from
    the start when warmup_steps is 0). Traceable: it reads the step count from the optimizer state inside jit."""

    def momentum(step):
        if warmup_steps <= 0:
            return jnp.float32(end)
        frac = jnp.minimum(jnp.asarray(step, jnp.float32) / warmup_steps, 1.0)
        return (1 - frac) * start + frac * end

    return momentum


# ----------------------------------------------------------------------------------------------------------------------
# Parameter groups, by path in the plain nested-dict param tree

def param_group(path: tuple[str, ...], ndim: int) -> str:
    """'muon' for the stacked hidden matrices, 'embedding' for wte, 'unembedding' for lm_head."""
    if path[0] == "blocks" and ndim >= 2:
        return "muon"
    if path == ("wte",):
        return "embedding"
    if path == ("lm_head",):
        return "unembedding"
    raise ValueError(f"no optimizer group for parameter {'/'.join(path)} with {ndim} dims; groups: matrices under "
                     f"blocks/ (Muon), wte, lm_head (AdamW); add it to nanojax.optim.param_group")


def _flatten(tree) -> dict[tuple[str, ...], object]:
    """{('blocks', 'attn_q'): leaf, ...} from a nested dict (None leaves kept)."""
    flat = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, child in node.items():
                walk(child, prefix + (str(key),))
        else:
            flat[prefix] = node

    walk(tree, ())
    return flat


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


# ----------------------------------------------------------------------------------------------------------------------
# The transformation

def make_optimizer(params_or_abstract, *, model_dim: int, matrix_lr: float = 0.02, embedding_lr: float = 0.2,
                   unembedding_lr: float = 0.004, init_lr_frac: float = 1.0, grad_clip: float | None = 1.0,
                   ns: str = "newton-schulz", ns_steps: int = 5, muon_dtype=None, momentum_warmup_steps: int = 300,
                   weight_decay: float = 0.0, mesh: Mesh | None = None,
                   param_axes=None) -> optax.GradientTransformationExtraArgs:
    """Muon + AdamW over the whole param tree. `params_or_abstract`: the params or their ShapeDtypeStructs (only
    paths and shapes are read). `init_lr_frac` scales every group's LR (later stages start lower). `param_axes`:
    gpt.param_axes(cfg), so Muon's result is put back on the params' sharding; `mesh`: where Muon spreads whole
    matrices over devices (None or 1 device: no constraints)."""
    _ns_method(ns)  # fail early on a bad name
    shapes = {path: tuple(leaf.shape) for path, leaf in _flatten(params_or_abstract).items()}
    groups = {path: param_group(path, len(shape)) for path, shape in shapes.items()}
    adam_paths = [p for p, g in groups.items() if g != "muon"]
    axes = _flatten(param_axes) if param_axes is not None else {}
    if muon_dtype is None:
        muon_dtype = jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
    momentum_at = momentum_schedule(momentum_warmup_steps)
    dmodel_scale = (model_dim / 768) ** -0.5
    base_lr = {"muon": matrix_lr * init_lr_frac, "embedding": embedding_lr * dmodel_scale * init_lr_frac,
               "unembedding": unembedding_lr * dmodel_scale * init_lr_frac}

    def init(params):
        flat = _flatten(params)
        if set(flat) != set(groups):
            raise ValueError(f"params paths {sorted(flat)} differ from the ones the optimizer was made for "
                             f"{sorted(groups)}")
        zeros = lambda p: jnp.zeros(flat[p].shape, jnp.float32)  # noqa: E731
        return {"count": jnp.zeros([], jnp.int32),
                "mu": _unflatten({p: zeros(p) for p in flat}),
                "nu": _unflatten({p: zeros(p) for p in adam_paths})}

    def update(grads, state, params=None, lr_multiplier=1.0):
        count = state["count"]
        g_flat = {p: g.astype(jnp.float32) for p, g in _flatten(grads).items()}
        if grad_clip:
            norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in g_flat.values()))
            scale = jnp.where(norm < grad_clip, 1.0, grad_clip / norm)
            g_flat = {p: g * scale for p, g in g_flat.items()}
        mu, nu = _flatten(state["mu"]), _flatten(state["nu"])
        p_flat = _flatten(params) if params is not None else {}
        lrm = jnp.asarray(lr_multiplier, jnp.float32)
        beta = momentum_at(count)
        t = (count + 1).astype(jnp.float32)  # Adam's bias correction counts from 1
        new_mu, new_nu, out = {}, {}, {}
        for path, g in g_flat.items():
            lr = base_lr[groups[path]] * lrm
            if groups[path] == "muon":
                m = beta * mu[path] + (1 - beta) * g
                new_mu[path] = m
                nesterov = beta * m + (1 - beta) * g
                shape = nesterov.shape
                stack = nesterov.reshape((-1,) + shape[-2:])  # all leading axes are layers
                logical = axes.get(path) if len(shape) == 3 else None
                u = orthogonalize_stacked(stack, steps=ns_steps, ns=ns, dtype=muon_dtype, mesh=mesh,
                                          logical_axes=logical).reshape(shape)
                d_in, d_out = shape[-2], shape[-1]  # (in, out) layout: x @ W
                out[path] = -lr * max(1.0, d_out / d_in) ** 0.5 * u
            else:
                m = ADAM_B1 * mu[path] + (1 - ADAM_B1) * g
                v = ADAM_B2 * nu[path] + (1 - ADAM_B2) * jnp.square(g)
                new_mu[path], new_nu[path] = m, v
                m_hat = m / (1 - ADAM_B1 ** t)
                v_hat = v / (1 - ADAM_B2 ** t)
                u = m_hat / (jnp.sqrt(v_hat) + ADAM_EPS)
                if weight_decay:
                    if path not in p_flat:
                        raise ValueError("weight_decay > 0 needs params passed to update()")
                    u = u + weight_decay * p_flat[path].astype(jnp.float32)
                out[path] = -lr * u
        grads_dtypes = {p: g.dtype for p, g in _flatten(grads).items()}
        updates = _unflatten({p: u.astype(grads_dtypes[p]) for p, u in out.items()})
        new_state = {"count": optax.safe_increment(count), "mu": _unflatten(new_mu), "nu": _unflatten(new_nu)}
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init, update)


def opt_state_shardings(opt_state_abstract, params_shardings, mesh: Mesh):
    """Shardings for the optimizer state: "mu"/"nu" leaves like the param at the same path, the rest replicated."""
    by_path = _flatten(params_shardings)
    replicated = meshlib.replicated(mesh)

    def one(key_path, leaf):
        names = tuple(str(getattr(k, "key", k)) for k in key_path)
        if names and names[0] in ("mu", "nu") and names[1:] in by_path:
            return by_path[names[1:]]
        return replicated

    return jax.tree_util.tree_map_with_path(one, opt_state_abstract)


def step_count(opt_state) -> jax.Array:
    """The number of updates applied so far (the step the next update will use for its schedules)."""
    return opt_state["count"]
