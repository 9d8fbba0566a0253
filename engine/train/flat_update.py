"""The optimizer step over one flat vector of every trainable array, not array by array (CUDA: FLAT_UPDATE).

With LoRA on all seven linear layers of a 7B model the optimizer updates 448 small arrays (128 on q/v). Even
compiled (step.build_update), each array gets its own kernels: the gradient's cast and scale, the clip, AdamW;
a few microseconds each, and the host builds every one (bench/probe_update.py, bench/RESULTS.md). Here the
micro step concatenates the gradients into one vector (one copy each), and from there the scale, the norm, the
clip and AdamW are a few kernels over the whole vector; the model's arrays and the optimizer's moments are
views into the updated vectors. Element for element the arithmetic is the optimizer's own (its apply_single,
run on the vectors), so the result is the per-array update's but for the gradient norm's summation order.

During a run the vectors are the truth: the model's arrays are written back from them after every update, so
nothing else may change the trainable arrays between updates (nothing does: a resume loads before the first).
Only for elementwise optimizers (the Adam family, AdamW included) and float32 arrays.
"""

from __future__ import annotations

import copy
import itertools
from functools import partial

from engine.model.loading import cuda_default, env_switch
from engine.train.step import kept_where

# None: on CUDA only. An H100's step end for 128 arrays took 1.7 ms against 7.8 array by array, and whole steps
# ran 5-14% faster with look-ahead (bench/RESULTS.md, issue 22, fifteenth session). On a 2-core CPU the per-array
# update is faster (197 against 245 ms for 448 arrays): its kernels cost little there, the concatenation is a pass.
# Metal is not measured, so it keeps the per-array update. LORA_TUI_FLAT_UPDATE=0 or 1 forces it for a process.
FLAT_UPDATE: bool | None = env_switch("LORA_TUI_FLAT_UPDATE")


class ParameterVector:
    """Where each trainable array sits in one flat vector: keys in the model's order, shapes and split points."""

    def __init__(self, tree):
        from mlx.utils import tree_flatten
        named = tree_flatten(tree)
        self.keys = [k for k, _ in named]
        self.shapes = [v.shape for _, v in named]
        self.bounds = list(itertools.accumulate(v.size for _, v in named))[:-1]

    def flatten(self, tree):
        """The leaves of `tree` (keyed as the model's trainable arrays), concatenated in the vector's order."""
        import mlx.core as mx
        from mlx.utils import tree_flatten
        leaves = dict(tree_flatten(tree))
        return mx.concatenate([leaves[k].reshape(-1) for k in self.keys])

    def views(self, vector) -> list:
        """The vector's parts in the arrays' shapes: views into its buffer, no copies."""
        import mlx.core as mx
        parts = mx.split(vector, self.bounds) if self.bounds else [vector]
        return [part.reshape(shape) for part, shape in zip(parts, self.shapes)]


def flat_parameters(model, optimizer) -> ParameterVector | None:
    """A ParameterVector of the model's trainable arrays where the flat update applies, else None."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    if not cuda_default(FLAT_UPDATE) or not isinstance(optimizer, optim.Adam):
        return None
    leaves = tree_flatten(model.trainable_parameters())
    if not leaves or any(v.dtype != mx.float32 for _, v in leaves):
        return None
    return ParameterVector(model.trainable_parameters())


def leaf_slot(tree, key: str) -> tuple:
    """(container, index) of the leaf at a dotted key such as "layers.3.self_attn.q_proj.lora_a": a module or dict
    and a name, or a list and a position; `container[index]` reads or replaces it."""
    *path, last = key.split(".")
    for part in path:
        tree = tree[int(part)] if isinstance(tree, list) else tree[part]
    return tree, int(last) if isinstance(tree, list) else last


class FlatUpdate:
    """build_update's apply over a ParameterVector: call it with the gradients (the vector, or a tree). Guarded,
    it is build_guarded_update's: call it with the gradients, `healthy` and what to queue with the update, and
    the update applies only where `healthy` holds (the look-ahead of step_queue.py): a few more element-wise
    ops in the same fused kernel, where the per-array guard is three more kernels an array."""

    def __init__(self, model, optimizer, vector: ParameterVector, guarded: bool = False):
        import mlx.core as mx
        from mlx.utils import tree_map
        self.optimizer, self.vector, self.guarded = optimizer, vector, guarded
        optimizer.init(model.trainable_parameters())  # the moments exist (zeros, or a resumed checkpoint's)
        # Where each array lives: its module and name, and its dict of moments in the optimizer's state. Both
        # containers outlive the compiled steps, which only replace the leaves in them.
        self.slots = [leaf_slot(model, key) for key in vector.keys]
        self.moments = [slot[index] for slot, index in (leaf_slot(optimizer.state, key) for key in vector.keys)]
        names = sorted(self.moments[0])
        self.flat = copy.copy(optimizer)  # same hyperparameters and schedule; its state holds the vectors
        self.flat.state = {"step": optimizer.state["step"], "learning_rate": optimizer.state["learning_rate"],
                           "flat": {n: mx.concatenate([m[n].reshape(-1) for m in self.moments]) for n in names}}
        self.flat.init({"flat": mx.zeros((0,))})  # marks it initialized: the state above is complete
        self.params = vector.flatten(model.trainable_parameters())
        mx.eval(self.params, self.flat.state)
        state = [self.flat.state]

        def apply(grads, params):
            return self.flat.apply_gradients({"flat": grads}, {"flat": params})["flat"]

        @partial(mx.compile, inputs=state, outputs=state)
        def step(grads, params, healthy):
            if not guarded:
                return apply(grads, params)
            old = tree_map(lambda x: x, self.flat.state)  # the same arrays, in a tree the update won't touch
            new = apply(grads, params)
            self.flat.state.update(kept_where(healthy, self.flat.state, old))  # the same dict: compile tracks it
            return kept_where(healthy, new, params)

        self._step = step

    def __call__(self, grads, healthy=None, *read_later) -> None:
        import mlx.core as mx
        grads = grads if isinstance(grads, mx.array) else self.vector.flatten(grads)
        self.params = self._step(grads, self.params, healthy if self.guarded else mx.array(True))
        # queued, not waited for: the GPU starts while the host writes the views back
        mx.async_eval(self.params, self.flat.state, *([healthy] if self.guarded else []), *read_later)
        for (parent, name), view in zip(self.slots, self.vector.views(self.params)):
            parent[name] = view
        for name, vector in self.flat.state["flat"].items():
            for moments, view in zip(self.moments, self.vector.views(vector)):
                moments[name] = view
        self.optimizer.state["step"] = self.flat.state["step"]
        self.optimizer.state["learning_rate"] = self.flat.state["learning_rate"]
