"""The StatsMerging merge rule (Algorithm 1, line 19; spec §3 step C), one tensor at a time.

    theta^l = theta_0^l + sum_k lambda_k^l * tau_k^l

With coefficients that sum to one over tasks (softmax) this equals the paper's sum_k lambda_k^l theta_k^l.
Everything here is functional, so gradients reach the coefficients (and through them the learner) only;
theta_0 and the task vectors are constants.

Training does not back-propagate through the merge itself (:class:`LeafMerge`): the merged tensors
of a step are built once, without a graph, and used as autograd leaves; since
``d loss / d lambda_k^l = <d loss / d theta^l, tau_k^l>``, each tensor's gradient is folded into the
coefficients' gradient as soon as autograd has it, and dropped. A step then holds the task vectors,
one merged model and the activations of one backward pass, however many backward passes (one per
task) it makes.

With ``in_place=True`` (:meth:`TaskVectorMerge.applied`) the merged tensors do not even exist next to
theta_0: theta_0's own storage holds the merge while it is used and is restored afterwards by
subtracting the same sum. That restore is exact up to float rounding (measured: an RMS relative drift
of ~3e-7 of theta_0 after 500 merge/restore cycles at realistic task-vector sizes), so the final
merge starts again from theta_0 as loaded.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call

from statsmerge_plugin.precision import is_low_precision


def merge_tensor(
    pretrained: torch.Tensor,
    task_vectors: torch.Tensor,
    coefficients: torch.Tensor,
    name: str = "<tensor>",
) -> torch.Tensor:
    """``pretrained + sum_k coefficients[k] * task_vectors[k]`` for one tensor.

    Args:
        pretrained: theta_0^l, any shape S.
        task_vectors: ``[K, *S]``.
        coefficients: ``[K]``.
    """
    check_mergeable(pretrained, task_vectors, coefficients, name)
    K = task_vectors.shape[0]
    if is_low_precision(task_vectors.dtype):  # summed in float32, rounded once (precision.py)
        merged = torch.addmv(
            pretrained.reshape(-1).float(),
            task_vectors.reshape(K, -1).T.float(),
            coefficients.float(),
        )
        return merged.to(pretrained.dtype).view(pretrained.shape)
    merged = torch.addmv(  # one pass over the task vectors, no [K, *S] or S-sized temporaries
        pretrained.reshape(-1),
        task_vectors.reshape(K, -1).T,
        coefficients.to(task_vectors.dtype),
    )
    return merged.view(pretrained.shape)


def merge_tensor_(
    pretrained: torch.Tensor,
    task_vectors: torch.Tensor,
    coefficients: torch.Tensor,
    name: str = "<tensor>",
    alpha: float = 1.0,
) -> torch.Tensor:
    """In place: ``pretrained += alpha * sum_k coefficients[k] * task_vectors[k]`` (``alpha=-1``
    undoes ``alpha=1`` up to rounding); returns ``pretrained``. Must not need a gradient."""
    check_mergeable(pretrained, task_vectors, coefficients, name)
    K = task_vectors.shape[0]
    pretrained.view(-1).addmv_(
        task_vectors.reshape(K, -1).T, coefficients.to(task_vectors.dtype), alpha=alpha
    )
    return pretrained


def check_mergeable(pretrained, task_vectors, coefficients, name: str) -> None:
    """``task_vectors`` is ``[K, *pretrained.shape]`` and ``coefficients`` ``[K]``; the error names
    the tensor."""
    if task_vectors.shape[1:] != pretrained.shape or task_vectors.shape[0] != coefficients.shape[0]:
        raise ValueError(
            f"tensor {name!r}: cannot merge task vectors of shape {tuple(task_vectors.shape)} with "
            f"coefficients {tuple(coefficients.shape)} into a tensor of shape {tuple(pretrained.shape)}"
        )


def coefficient_columns(coefficients: torch.Tensor, names: Sequence[str]) -> Callable[[int], int]:
    """``l -> column`` of tensor ``l`` in ``[K, L]`` (layer-wise) or ``[K, 1]`` (task-wise)
    coefficients; ``ValueError`` for any other shape."""
    if coefficients.dim() != 2 or coefficients.shape[1] not in (1, len(names)):
        raise ValueError(
            f"coefficients must have shape [K, {len(names)}] (layer-wise) or [K, 1] (task-wise), "
            f"got {tuple(coefficients.shape)}"
        )
    return (lambda l: 0) if coefficients.shape[1] == 1 else (lambda l: l)


def merge_state(
    pretrained: Mapping[str, torch.Tensor],
    task_vectors: Mapping[str, torch.Tensor],
    coefficients: torch.Tensor,
    names: Sequence[str],
) -> Dict[str, torch.Tensor]:
    """Merge every tensor in ``names``; ``coefficients`` is ``[K, L]`` with ``L == len(names)`` or 1."""
    column = coefficient_columns(coefficients, names)
    return {
        name: merge_tensor(pretrained[name], task_vectors[name], coefficients[:, column(l)], name)
        for l, name in enumerate(names)
    }


def functional_model(base: nn.Module, state: Mapping[str, torch.Tensor]) -> Callable:
    """``base`` run with ``state`` in place of its parameters (buffers and the rest from ``base``)."""

    def forward(*args, **kwargs):
        return functional_call(base, dict(state), args, kwargs, strict=False)

    return forward


@dataclass
class TaskVectorMerge:
    """Everything the merge rule needs: the frozen base module, its parameters theta_0 (the merged
    tensors, in order) and the task vectors stacked per tensor (name -> ``[K, *shape]``)."""

    base: nn.Module
    pretrained: Dict[str, torch.Tensor]
    task_vectors: Dict[str, torch.Tensor]
    _applied: bool = field(default=False, init=False, repr=False)

    @property
    def names(self) -> List[str]:
        return list(self.pretrained)

    def state(self, coefficients: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The merged parameters for ``[K, L]`` (or ``[K, 1]``) coefficients."""
        self._check_not_applied()
        return merge_state(self.pretrained, self.task_vectors, coefficients, self.names)

    def model(self, coefficients: torch.Tensor) -> Callable:
        """The base module run functionally with the merged parameters."""
        return functional_model(self.base, self.state(coefficients))

    @contextmanager
    def applied(self, coefficients: torch.Tensor) -> Iterator[Dict[str, torch.Tensor]]:
        """theta_0's own tensors hold the merge for ``coefficients`` (no gradient) inside the block,
        which receives them as the merged state; on leaving (also on an error) the same sum is
        subtracted again. No second model-sized tensor is allocated; theta_0 comes back up to float
        rounding (see the module docstring)."""
        self._check_not_applied()
        coefficients = coefficients.detach()
        done: List[str] = []
        self._applied = True
        try:
            self.merge_(coefficients, done=done)
            yield self.pretrained
        finally:
            self.merge_(coefficients, alpha=-1.0, names=done)
            self._applied = False

    @torch.no_grad()
    def merge_(
        self,
        coefficients: torch.Tensor,
        alpha: float = 1.0,
        names: Optional[Sequence[str]] = None,
        done: Optional[List[str]] = None,
    ) -> Dict[str, torch.Tensor]:
        """In place: ``theta_0^l += alpha * sum_k lambda_k^l tau_k^l`` for every tensor (or those in
        ``names``), one tensor at a time; ``done`` collects the names merged so far. Returns
        theta_0's tensors, which now hold the merge (use :meth:`applied` to get theta_0 back)."""
        column = coefficient_columns(coefficients, self.names)
        wanted = None if names is None else set(names)
        for l, name in enumerate(self.names):
            if wanted is None or name in wanted:
                c = coefficients[:, column(l)]
                merge_tensor_(self.pretrained[name], self.task_vectors[name], c, name, alpha)
                if done is not None:
                    done.append(name)
        return self.pretrained

    @contextmanager
    def merged_model(
        self, coefficients: torch.Tensor, in_place: bool = False
    ) -> Iterator[Callable]:
        """The merged model (run functionally) for the duration of the block: a new merged state
        (differentiable in ``coefficients``), or with ``in_place`` theta_0's storage (no gradient).
        """
        if not in_place:
            yield self.model(coefficients)
            return
        with self.applied(coefficients) as state:
            yield functional_model(self.base, state)

    def _check_not_applied(self) -> None:
        if self._applied:
            raise RuntimeError(
                "theta_0 holds a merge in place (TaskVectorMerge.applied): leave that block before "
                "building another merge"
            )


class LeafMerge:
    """One training step's merged model, with the gradient of the loss folded into the coefficients.

    The merged tensors are built once from ``coefficients`` without a graph and made autograd leaves
    (:attr:`state`, run with :meth:`model`). Any number of backward passes through the model (one
    per task) then accumulate ``d loss / d lambda`` into :attr:`grad` (``[K, L]`` or ``[K, 1]``,
    as ``coefficients``): by the chain rule through ``theta^l = theta_0^l + sum_k lambda_k^l
    tau_k^l``, ``grad[k, col(l)] += <d loss / d theta^l, tau_k^l>``, computed by a
    post-accumulate-grad hook the moment autograd has accumulated tensor ``l``'s gradient, which is
    then dropped. So no merge graph is kept (it would hold every merged tensor's gradient until the
    end of each backward pass) and at most one merged tensor's gradient exists at a time.
    ``coefficients.backward(grad)`` then gives the learner the gradient that one backward through
    the differentiable merge would have given it.

    With ``in_place`` the leaves share theta_0's storage, which holds the merge until the step ends
    (:meth:`TaskVectorMerge.applied`): a step then allocates no merged model at all.

    Use as a context manager: leaving it removes the hooks and releases the merged tensors (in
    place: restores theta_0).
    """

    def __init__(
        self, target: "TaskVectorMerge", coefficients: torch.Tensor, in_place: bool = False
    ):
        coefficients = coefficients.detach()
        column = coefficient_columns(coefficients, target.names)
        self.target = target
        self.grad = torch.zeros_like(coefficients)
        self.state: Dict[str, torch.Tensor] = {}
        self._hooks: List = []
        self._stack = ExitStack()
        try:
            source = self._stack.enter_context(target.applied(coefficients)) if in_place else None
            with torch.no_grad():
                for l, name in enumerate(target.names):
                    if in_place:  # a leaf that shares theta_0's (now merged) storage
                        merged = source[name].detach().requires_grad_(True)
                    else:
                        merged = merge_tensor(
                            target.pretrained[name],
                            target.task_vectors[name],
                            coefficients[:, column(l)],
                            name,
                        ).requires_grad_(True)
                    hook = self._fold(target.task_vectors[name], column(l))
                    self._hooks.append(merged.register_post_accumulate_grad_hook(hook))
                    self.state[name] = merged
        except BaseException:
            self.close()
            raise

    def _fold(self, task_vectors: torch.Tensor, col: int) -> Callable:
        flat = task_vectors.reshape(task_vectors.shape[0], -1)

        def fold(merged: torch.Tensor) -> None:
            with torch.no_grad():  # d loss / d lambda = <g, tau>, in float32 for half precision
                grad = merged.grad.reshape(-1)
                if is_low_precision(flat.dtype):
                    self.grad[:, col] += (flat.float() @ grad.float()).to(self.grad.dtype)
                else:
                    self.grad[:, col] += (flat @ grad.to(flat.dtype)).to(self.grad.dtype)
            merged.grad = None

        return fold

    def model(self) -> Callable:
        """The base module run functionally with this step's merged tensors."""
        return functional_model(self.target.base, self.state)

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks, self.state = [], {}
        self._stack.close()  # in place: theta_0 restored

    def __enter__(self) -> "LeafMerge":
        return self

    def __exit__(self, *exc) -> Optional[bool]:
        self.close()
        return None


class SavedActivations:
    """Counts the bytes autograd saves for backward while active (a context manager over
    ``torch.autograd.graph.saved_tensors_hooks``): every distinct storage once, except the
    storages in ``exclude`` (e.g. the merged tensors, which exist anyway)."""

    def __init__(self, exclude: Sequence[torch.Tensor] = ()):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: set = set()
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._exclude and ptr not in self._seen:
            self._seen.add(ptr)
            self.bytes += storage.nbytes()
        return tensor

    def _unpack(self, packed):
        return packed

    def __enter__(self) -> "SavedActivations":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> Optional[bool]:
        self._hooks.__exit__(*exc)
        self._seen = set()
        return None
