"""Teachers of another architecture: how a pool declares them, their own heads, their logits.

A pool's ``_pretrained_`` (a CLIP vision model) is the *target architecture*. Every task model whose
parameter names or shapes differ from it is a *teacher*, and it must be a classifier with its own
head:

* ``clip``: a ``CLIPVisionModel`` of another width/depth. Its head is its own zero-shot head: its
  own CLIP text tower embeds the task's FusionBench class names and templates (exactly as
  ``HFCLIPClassifier.set_classification_task`` does), logits are
  ``exp(logit_scale) * cos(visual_projection(pooled), head)``. The full ``CLIPModel`` (text tower,
  projections, logit scale) and the processor are loaded from the teacher's source directory.
* ``classifier``: a transformers ``*ForImageClassification`` model
  (``ResNetForImageClassification``, ``ConvNextForImageClassification``, ...). Logits are its own
  ``model(pixel_values).logits``; its processor is ``AutoImageProcessor.from_pretrained(<source>)``.
  When its ``config.id2label`` names classes, a name that is one of the task's class names must sit
  at that class's index (:func:`check_label_order`); a teacher in another class order is refused.

The *source directory* is the ``name_or_path`` that ``from_pretrained`` records on the model (so
weights and processor/CLIP saved together, the Hugging Face convention), unless the method option
``teachers.<task>.processor`` / ``teachers.<task>.clip_model`` names another path.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

TEACHER_KINDS = ("clip", "classifier")


def parameter_shapes(model: nn.Module) -> Dict[str, tuple]:
    """``{parameter name: shape}`` of every parameter tensor (the merged tensors)."""
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def same_architecture(base_shapes: Mapping[str, tuple], shapes: Mapping[str, tuple]) -> bool:
    """True when both models have exactly the same parameter names and shapes."""
    return dict(base_shapes) == dict(shapes)


def is_clip_vision_model(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) == "clip_vision_model" or type(model).__name__ in (
        "CLIPVisionModel",
        "CLIPVisionModelWithProjection",
    )


def is_image_classifier(model: nn.Module) -> bool:
    """A transformers image classifier with its own head (``*ForImageClassification``)."""
    return type(model).__name__.endswith("ForImageClassification") and hasattr(
        getattr(model, "config", None), "num_labels"
    )


def teacher_kind(model: nn.Module) -> Optional[str]:
    """``"clip"``, ``"classifier"`` or ``None`` (no usable head)."""
    if is_clip_vision_model(model):
        return "clip"
    if is_image_classifier(model):
        return "classifier"
    return None


def source_of(model: nn.Module) -> Optional[str]:
    """Directory/repo the model was loaded from (``from_pretrained`` records it), if any."""
    path = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", None
    )
    return str(path) if path else None


@torch.no_grad()
def clip_zero_shot_head(
    clip_model, processor, classnames: Sequence[str], templates
) -> torch.Tensor:
    """``[classes, dim]`` zero-shot head, computed by FusionBench's own ``HFCLIPClassifier``."""
    from fusion_bench.models.hf_clip import HFCLIPClassifier

    classifier = HFCLIPClassifier(clip_model, processor)
    classifier.eval()
    classifier.set_classification_task(list(classnames), templates)
    return classifier.zeroshot_weights.detach().clone()


def clip_head_logits(
    vision_model: nn.Module,
    visual_projection: nn.Module,
    head: torch.Tensor,
    logit_scale_exp: torch.Tensor,
    pixels: torch.Tensor,
) -> torch.Tensor:
    """``exp(logit_scale) * normalize(projection(pooled)) @ head.T``: the CLIP zero-shot logits.

    Identical to ``CLIPClassificationMixin.compute_logits`` and to the CLIP task pool's classifier.
    """
    pooled = vision_model(pixels)[1]
    embeds = visual_projection(pooled)
    embeds = embeds / embeds.norm(p=2, dim=-1, keepdim=True)
    return logit_scale_exp * embeds @ head.t()


def normalised_class_name(name) -> str:
    """``"Annual_Crop-land"`` -> ``"annual crop land"``: case, ``_``/``-`` and spacing ignored."""
    return " ".join(str(name).replace("_", " ").replace("-", " ").lower().split())


def head_class_names(model: nn.Module) -> Optional[List[str]]:
    """A classifier's class names in output order (``config.id2label``); ``None`` when its config
    only has transformers' placeholder names ``LABEL_<i>`` (the order cannot be checked)."""
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    names = [id2label.get(i, id2label.get(str(i))) for i in range(len(id2label))]
    if not names or any(n is None for n in names):
        return None
    if all(str(n) == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return [str(n) for n in names]


def check_label_order(task: str, head_names: Sequence[str], classnames: Sequence[str]) -> List[str]:
    """A classifier teacher's outputs must be the task's classes *in the task's order*.

    Names are compared after :func:`normalised_class_name`. A head class that is one of the task's
    class names at another index means the teacher would teach wrong labels.

    Returns:
        The head's names that are none of the task's class names (another spelling: the order of
        those cannot be checked).

    Raises:
        ValueError: naming the teacher, the first misplaced class and both indices.
    """
    index = {normalised_class_name(c): i for i, c in enumerate(classnames)}
    unknown = []
    for i, name in enumerate(head_names):
        j = index.get(normalised_class_name(name))
        if j is None:
            unknown.append(str(name))
        elif j != i:
            raise ValueError(
                f"teacher {task!r}: its head's output {i} is {name!r}, which is class {j} of task "
                f"{task!r} ({classnames[j]!r}); the teacher's classes are in another order than "
                "the task's class names. Permute the head's outputs (and `config.id2label`) into "
                "the task's class order"
            )
    return unknown


def classifier_logits(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Logits of a transformers image classifier's own head."""
    return model(pixel_values=pixels).logits


@dataclass
class Teacher:
    """A loaded teacher and everything needed to compute its logits.

    Attributes:
        task: the task (pool model name) it teaches.
        kind: ``"clip"`` or ``"classifier"``.
        model: the vision model (``clip``) or the whole classifier.
        processor: its own image processor (a ``CLIPProcessor`` for CLIP teachers).
        num_classes: outputs of its head.
        source: where its processor / CLIP were loaded from.
        config: its pool entry (resolved), part of its identity in the student cache key.
        head, visual_projection, logit_scale_exp: the zero-shot head parts (``clip`` only).
    """

    task: str
    kind: str
    model: nn.Module
    processor: Any
    num_classes: int
    source: Optional[str]
    config: Any = None
    head: Optional[torch.Tensor] = None
    visual_projection: Optional[nn.Module] = None
    logit_scale_exp: Optional[torch.Tensor] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    #: whether it is on the compute device (:meth:`to_device`) or in host memory (:meth:`offload`)
    on_device: bool = False

    def to_device(self, device) -> "Teacher":
        """Onto the compute device for its distillation or evaluation; :meth:`offload` it right
        after, so that one teacher at a time shares the device with the base and the student."""
        self.on_device = True
        return self.to(device)

    def offload(self) -> "Teacher":
        """Back to host memory (a no-op move on a CPU run)."""
        self.on_device = False
        return self.to("cpu")

    def to(self, device) -> "Teacher":
        self.model.to(device)
        if self.kind == "clip":
            self.visual_projection.to(device)
            self.head = self.head.to(device)
            self.logit_scale_exp = self.logit_scale_exp.to(device)
        return self

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """Teacher logits (no gradient, eval mode) from pixels processed by :attr:`processor`."""
        self.model.eval()
        if self.kind == "clip":
            return clip_head_logits(
                self.model, self.visual_projection, self.head, self.logit_scale_exp, pixels
            )
        return classifier_logits(self.model, pixels)

    def head_state(self) -> Dict[str, torch.Tensor]:
        """The tensors that define the head (for the cache key)."""
        if self.kind == "clip":
            return {
                "head": self.head,
                "visual_projection": self.visual_projection.weight,
                "logit_scale_exp": self.logit_scale_exp.reshape(1),
            }
        return {}


def _load_processor(task: str, kind: str, path, override: Mapping):
    """The teacher's own processor (raises ``ValueError`` naming the teacher when missing)."""
    from fusion_bench.utils import instantiate
    from omegaconf import DictConfig

    spec = override.get("processor", path)
    if spec is None:
        raise ValueError(
            f"teacher {task!r} ({kind}): cannot find its own processor: the model records no "
            "source "
            f"directory; set the method option `teachers.{task}.processor`"
        )
    try:
        if isinstance(spec, (dict, DictConfig)):
            return instantiate(DictConfig(spec) if isinstance(spec, dict) else spec)
        if kind == "clip":
            from transformers import CLIPProcessor

            return CLIPProcessor.from_pretrained(str(spec))
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(str(spec))
    except Exception as err:  # OSError / ValueError from transformers
        raise ValueError(
            f"teacher {task!r} ({kind}): cannot load its own processor from {spec!r} "
            f"({type(err).__name__}: {err}); save it next to the weights or set "
            f"`teachers.{task}.processor`"
        ) from err


def _load_own_clip(task: str, clip_path):
    """The teacher's full ``CLIPModel``; ``ValueError`` unless a text tower is really there."""
    from transformers import AutoConfig, CLIPModel

    def no_head(reason: str) -> ValueError:
        return ValueError(
            f"teacher {task!r} (CLIP vision model) has no usable head: its zero-shot head needs "
            "its "
            f"own full CLIPModel (text tower), but {reason}; save the CLIPModel next to the vision "
            f"weights or set `teachers.{task}.clip_model`"
        )

    try:
        config = AutoConfig.from_pretrained(str(clip_path))
    except Exception as err:
        raise no_head(f"no config loads from {clip_path!r} ({type(err).__name__}: {err})") from err
    if config.model_type != "clip":
        raise no_head(f"{clip_path!r} holds a {config.model_type!r} model, not a 'clip' one")
    clip, info = CLIPModel.from_pretrained(str(clip_path), output_loading_info=True)
    missing = [k for k in info["missing_keys"] if not k.startswith("vision_model")]
    if missing:
        raise no_head(f"{clip_path!r} lacks the text-side weights {missing[:3]}")
    return clip


def build_teacher(
    task: str,
    model: nn.Module,
    classnames: Sequence[str],
    templates,
    override: Optional[Mapping] = None,
    config: Any = None,
) -> Teacher:
    """Turn a loaded model of another architecture into a :class:`Teacher`, checking its head.

    Raises:
        ValueError: naming ``task`` when the model has no usable head (neither a CLIP vision model
            with a loadable text tower nor a ``*ForImageClassification``), when its processor cannot
            be loaded, when its head's class count differs from the task's class names, or when a
            classifier's class names (``config.id2label``) are the task's in another order.
    """
    override = dict(override or {})
    kind = teacher_kind(model)
    if kind is None:
        raise ValueError(
            f"teacher {task!r} ({type(model).__name__}) has no usable classification head: a "
            "teacher "
            "of another architecture must be a CLIP vision model (its own text tower gives its "
            "zero-shot head) or a transformers `*ForImageClassification` model with its own head"
        )
    source = source_of(model)
    processor = _load_processor(task, kind, source, override)
    teacher = Teacher(task, kind, model.eval(), processor, 0, source, config)
    if kind == "clip":
        clip_path = override.get("clip_model", source)
        clip = _load_own_clip(task, clip_path)
        if clip.config.vision_config.hidden_size != model.config.hidden_size:
            raise ValueError(
                f"teacher {task!r}: the CLIPModel at {clip_path!r} (vision width "
                f"{clip.config.vision_config.hidden_size}) is not the teacher's own CLIP (width "
                f"{model.config.hidden_size})"
            )
        teacher.head = clip_zero_shot_head(clip, processor, classnames, templates)
        teacher.visual_projection = copy.deepcopy(clip.visual_projection).requires_grad_(False)
        teacher.logit_scale_exp = clip.logit_scale.detach().clone().exp()
        teacher.num_classes = teacher.head.shape[0]
        teacher.extra["clip_model"] = str(clip_path)
        del clip
    else:
        teacher.num_classes = int(model.config.num_labels)
    model.requires_grad_(False)
    if teacher.num_classes != len(classnames):
        raise ValueError(
            f"teacher {task!r}: its head has {teacher.num_classes} classes but task {task!r} has "
            f"{len(classnames)} class names; a teacher must classify exactly the task's classes"
        )
    if kind == "classifier":
        check_classifier_labels(task, model, classnames)
    return teacher


def check_classifier_labels(task: str, model: nn.Module, classnames: Sequence[str]) -> None:
    """:func:`check_label_order` on a classifier's ``id2label``; logs what cannot be checked."""
    names = head_class_names(model)
    if names is None:
        log.warning(
            f"teacher {task!r}: its config names no classes (id2label is LABEL_0, LABEL_1, ...): "
            "the order of its outputs cannot be checked against the task's class names"
        )
        return
    unknown = check_label_order(task, names, classnames)
    if unknown:
        log.warning(
            f"teacher {task!r}: {len(unknown)} of its {len(names)} class names are not the task's "
            f"(e.g. {unknown[:3]}); their order cannot be checked"
        )


def processor_identity(processor) -> Any:
    """A JSON-able description of an image processor (for the cache key)."""
    image_processor = getattr(processor, "image_processor", processor)
    try:
        return image_processor.to_dict()
    except Exception:  # pragma: no cover - exotic processors
        return repr(image_processor)


def pixel_values(processor, image) -> torch.Tensor:
    """``processor(images=[image])["pixel_values"][0]``, as FusionBench's ``CLIPDataset`` does."""
    return processor(images=[image], return_tensors="pt")["pixel_values"][0]
