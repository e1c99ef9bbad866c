"""Heterogeneous architectures (StatsMerging §4): distil other-architecture teachers, then merge.

A tiny mixed pool built in the test: the tiny random CLIP of ``tiny_clip.py`` (``_pretrained_``
and a same-architecture ``mnist`` model), a tiny ``ResNetForImageClassification`` teacher for
``eurosat`` and a wider tiny CLIP teacher (its own text tower) for ``svhn``; then the mixed mini
benchmark's teachers (``statsmerge_plugin.mini.hetero``) on a smoke base build. Real FusionBench
classes, no mocks. Accuracies on random weights mean nothing: the tests check behaviour, never
numbers.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import read_json, run_fusion_bench, write_tiny_configs
from datasets import load_from_disk
from hydra.utils import instantiate
from omegaconf import DictConfig
from tiny_clip import build_tiny_clip, pool_config

import statsmerge_plugin
from statsmerge_plugin.method.statsmerging.distillation import soft_distillation_loss
from statsmerge_plugin.method.statsmerging.hetero import (
    DistillToBaseForCLIP,
    HeteroStatsMergingForCLIP,
)
from statsmerge_plugin.method.statsmerging.hetero.augment import (
    apply_augmentation,
    sample_augmentation,
)
from statsmerge_plugin.method.statsmerging.hetero.cache import (
    cached_student,
    save_student,
    student_cache_key,
)
from statsmerge_plugin.method.statsmerging.hetero.distill import (
    DistillOptions,
    backward_in_chunks,
    batch_indices,
    distill,
)
from statsmerge_plugin.method.statsmerging.hetero.losses import label_free_loss, supervised_loss
from statsmerge_plugin.method.statsmerging.hetero.stream import (
    PairedViews,
    TeacherMemo,
    images_digest,
)
from statsmerge_plugin.method.statsmerging.hetero.teachers import (
    build_teacher,
    check_label_order,
    clip_head_logits,
    head_class_names,
    parameter_shapes,
    pixel_values,
    same_architecture,
)
from statsmerge_plugin.mini.build import read_manifest
from statsmerge_plugin.mini.data import load_split
from statsmerge_plugin.mini.hetero.build import ensure_hetero_built, load_teacher
from statsmerge_plugin.mini.hetero.recipe import HETERO_PRESETS, HETERO_VERSION
from statsmerge_plugin.mini.hetero.recipe import TEACHERS as MINI_TEACHERS
from statsmerge_plugin.mini.hetero.recipe import hetero_key, key_payload
from statsmerge_plugin.mini.hetero.train import train_wide_clip
from statsmerge_plugin.mini.recipe import get_recipe
from statsmerge_plugin.mini.tasks import get_task

TEACHERS = {"eurosat": "resnet", "svhn": "clip"}
FAST = dict(max_steps=3, batch_size=8, evaluate_test=False)


def resnet_teacher(path: Path, num_labels: int = 10, seed: int = 1, classnames=None) -> Path:
    """A tiny ResNet classifier teacher; ``classnames`` become its ``id2label`` (in that order)."""
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    names = {} if classnames is None else {"id2label": dict(enumerate(classnames))}
    config = ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=num_labels,
        **names,
    )
    ResNetForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def wide_clip_teacher(path: Path, pretrained: Path, seed: int = 2, text_tower: bool = True) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPVisionModel

    torch.manual_seed(seed)
    cfg = CLIPModel.from_pretrained(pretrained).config.to_dict()
    cfg["vision_config"].update(hidden_size=48, intermediate_size=96)
    clip = CLIPModel(
        CLIPConfig(**{k: cfg[k] for k in ("text_config", "vision_config", "projection_dim")})
    )
    if text_tower:
        clip.save_pretrained(path)
    else:  # only the vision tower: no head of its own
        vision = CLIPVisionModel(clip.config.vision_config)
        vision.vision_model.load_state_dict(clip.vision_model.state_dict())
        vision.save_pretrained(path)
    CLIPProcessor.from_pretrained(pretrained).save_pretrained(path)
    return path


def teacher_entry(kind: str, path: Path, auto: str = "AutoModelForImageClassification") -> dict:
    target = (
        f"transformers.{auto}.from_pretrained"
        if kind == "resnet"
        else "transformers.CLIPVisionModel.from_pretrained"
    )
    return {"_target_": target, "pretrained_model_name_or_path": str(path)}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Paths of the tiny mixed pool (built once for the module)."""
    root = tmp_path_factory.mktemp("tiny_mixed")
    paths = build_tiny_clip(root, tasks=("mnist", "eurosat", "svhn"), n_images=16)
    paths["teachers"] = {
        "eurosat": resnet_teacher(root / "teacher_resnet"),
        "svhn": wide_clip_teacher(root / "teacher_clip", paths["pretrained"]),
    }
    return paths


def mixed_config(paths: dict, **model_overrides) -> dict:
    cfg = pool_config(paths)
    for task, kind in TEACHERS.items():
        cfg["models"][task] = teacher_entry(kind, paths["teachers"][task])
    cfg["models"].update(model_overrides)
    return cfg


def make_pool(cfg: dict):
    return instantiate(DictConfig(cfg), _recursive_=False)


def students_of(report: dict) -> dict:
    from transformers import CLIPVisionModel

    return {
        t: CLIPVisionModel.from_pretrained(r["student_path"]) for t, r in report["teachers"].items()
    }


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------------------------------------
# pure parts


def test_losses_match_the_paper_formula():
    torch.manual_seed(0)
    s, t = torch.randn(5, 10), torch.randn(5, 10)
    y = torch.randint(0, 10, (5,))
    kl = soft_distillation_loss(s, t, 4.0)
    torch.testing.assert_close(label_free_loss(s, t, 4.0), kl)
    manual = (
        16
        * (torch.softmax(t / 4, -1) * (torch.log_softmax(t / 4, -1) - torch.log_softmax(s / 4, -1)))
        .sum(-1)
        .mean()
    )
    torch.testing.assert_close(kl, manual)
    ce = torch.nn.functional.cross_entropy(s, y)
    torch.testing.assert_close(supervised_loss(s, t, y, 4.0, 0.7), 0.7 * ce + 0.3 * kl)
    torch.testing.assert_close(supervised_loss(s, t, y, 4.0, 0.0), kl)
    assert float(label_free_loss(t, t, 4.0)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        label_free_loss(s, t[:, :7])


def test_augmentation_is_shared_across_resolutions_and_seeded():
    x32 = torch.randn(6, 3, 32, 32)
    x64 = torch.nn.functional.interpolate(x32, scale_factor=2, mode="nearest")
    p = sample_augmentation(6, "flip_crop", 0.125, torch.Generator().manual_seed(0))
    q = sample_augmentation(6, "flip_crop", 0.125, torch.Generator().manual_seed(0))
    assert torch.equal(p.flip, q.flip) and torch.equal(p.dx, q.dx)
    a32, a64 = apply_augmentation(x32, p), apply_augmentation(x64, p)
    assert a32.shape == x32.shape and a64.shape == x64.shape
    # the same crop at both resolutions (offsets are fractions of the size; 64 px = 2x upsampled 32
    # px)
    p_even = copy.deepcopy(p)
    p_even.dx, p_even.dy = torch.round(p.dx * 32) / 32, torch.round(p.dy * 32) / 32
    down = apply_augmentation(x64, p_even)[..., ::2, ::2]
    torch.testing.assert_close(down, apply_augmentation(x32, p_even))
    assert apply_augmentation(x32, sample_augmentation(6, "none", 0.1, torch.Generator())) is x32
    with pytest.raises(ValueError, match="augmentation"):
        sample_augmentation(2, "mixup", 0.1, torch.Generator())


def test_batches_are_epoch_wise_permutations():
    b = batch_indices(10, 4, 5, torch.Generator().manual_seed(0))
    flat = torch.cat(b)
    assert len(b) == 5 and sorted(flat[:10].tolist()) == list(range(10))


def test_options_are_validated_naming_the_option():
    with pytest.raises(ValueError, match="augmentation"):
        DistillOptions(augmentation="mixup")
    with pytest.raises(ValueError, match="alpha"):
        DistillToBaseForCLIP(alpha=1.5)
    with pytest.raises(ValueError, match="max_steps"):
        HeteroStatsMergingForCLIP(distillation={"max_steps": 0})
    assert (
        "alpha" not in DistillOptions().key() and "alpha" in DistillOptions(use_labels=True).key()
    )


def test_cache_key_and_atomic_store(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    k1 = student_cache_key({"task": "a", "w": 1}, {"x": 1}, {"lr": 1})
    assert k1 == student_cache_key({"task": "a", "w": 1}, {"x": 1}, {"lr": 1}) and k1.startswith(
        "a-"
    )
    assert k1 != student_cache_key({"task": "a", "w": 2}, {"x": 1}, {"lr": 1})
    assert k1 != student_cache_key({"task": "a", "w": 1}, {"x": 1}, {"lr": 2})
    model = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
        )
    )
    (tmp_path / k1).mkdir()
    model.save_pretrained(
        tmp_path / k1
    )  # weights without a complete manifest: an interrupted write
    assert cached_student(tmp_path, k1) is None
    path = save_student(tmp_path, k1, model, {"note": "x"})
    assert cached_student(tmp_path, k1) == path and read_json(path / "manifest.json")["complete"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_teacher_heads_and_logit_functions(mixed, tiny_pool):
    from fusion_bench.tasks.clip_classification import get_classnames_and_templates
    from transformers import (
        AutoModelForImageClassification,
        CLIPModel,
        CLIPProcessor,
        CLIPVisionModel,
    )

    pool = make_pool(mixed_config(mixed))
    base = pool.load_pretrained_model()
    assert same_architecture(parameter_shapes(base), parameter_shapes(pool.load_model("mnist")))
    cn, tpl = get_classnames_and_templates("eurosat")
    resnet = build_teacher("eurosat", pool.load_model("eurosat"), cn, tpl)
    assert resnet.kind == "classifier" and resnet.num_classes == 10
    x = torch.randn(3, 3, 32, 32)
    ref = AutoModelForImageClassification.from_pretrained(mixed["teachers"]["eurosat"]).eval()
    torch.testing.assert_close(resnet.logits(x), ref(pixel_values=x).logits)
    cn, tpl = get_classnames_and_templates("svhn")
    wide = pool.load_model("svhn")
    assert not same_architecture(parameter_shapes(base), parameter_shapes(wide))
    clip_teacher = build_teacher("svhn", wide, cn, tpl)
    assert clip_teacher.kind == "clip" and clip_teacher.head.shape[0] == len(cn)
    # the teacher's head is its own CLIP's zero-shot head, as FusionBench's classifier computes it
    from fusion_bench.models.hf_clip import HFCLIPClassifier

    clip = CLIPModel.from_pretrained(mixed["teachers"]["svhn"])
    clf = HFCLIPClassifier(clip, CLIPProcessor.from_pretrained(mixed["teachers"]["svhn"]))
    clf.set_classification_task(cn, tpl)
    torch.testing.assert_close(clf(x), clip_teacher.logits(x), atol=1e-4, rtol=1e-4)
    # student logits: the same computation as CLIPClassificationMixin.compute_logits
    alg = DistillToBaseForCLIP()
    alg.modelpool = pool
    alg.setup_zero_shot_classification_head(task_names=["svhn"])
    student = CLIPVisionModel.from_pretrained(mixed["pretrained"]).eval()
    torch.testing.assert_close(
        alg.compute_logits(student, x, "svhn"),
        clip_head_logits(
            student, alg.visual_projection, alg.zeroshot_weights["svhn"], alg.logit_scale_exp, x
        ),
    )


def test_classifier_teacher_label_order_is_checked(mixed, tmp_path):
    from fusion_bench.tasks.clip_classification import get_classnames_and_templates
    from transformers import AutoModelForImageClassification

    cn, tpl = get_classnames_and_templates("eurosat")
    cn = list(cn)
    # names compare without case, "_" or "-"; names that are not the task's cannot be checked
    assert check_label_order("eurosat", [c.upper().replace(" ", "_") for c in cn], cn) == []
    assert check_label_order("eurosat", ["AnnualCrop"] + cn[1:], cn) == ["AnnualCrop"]
    with pytest.raises(ValueError, match=r"output 0 is .*, which is class 1 of task 'eurosat'"):
        check_label_order("eurosat", [cn[1], cn[0], *cn[2:]], cn)
    with pytest.raises(ValueError, match=r"output 9 is .*class 0 of task"):
        check_label_order("eurosat", ["x"] * 9 + [cn[0]], cn)
    # from the teacher's config, through build_teacher
    swapped = resnet_teacher(tmp_path / "swapped", classnames=[cn[1], cn[0], *cn[2:]])
    with pytest.raises(ValueError, match="another order"):
        build_teacher("eurosat", AutoModelForImageClassification.from_pretrained(swapped), cn, tpl)
    ordered = AutoModelForImageClassification.from_pretrained(
        resnet_teacher(tmp_path / "ordered", classnames=cn)
    )
    assert head_class_names(ordered) == cn
    assert build_teacher("eurosat", ordered, cn, tpl).num_classes == len(cn)
    # transformers' placeholder names (LABEL_0, ...) say nothing about the order
    placeholder = AutoModelForImageClassification.from_pretrained(mixed["teachers"]["eurosat"])
    assert head_class_names(placeholder) is None


# ------------------------------------------------------------------------------------------------
# the data path at CI-small shapes (issue 10): a split is streamed one batch at a time and the
# teacher labels only the images the steps use


class RecordingRows(torch.utils.data.Dataset):
    """A real train split whose row reads are recorded (when the loop reads what)."""

    def __init__(self, dataset):
        self.dataset, self.reads = dataset, []

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.reads.append(int(i))
        return self.dataset[i]


@pytest.mark.parametrize("steps, batch", [(3, 4), (6, 4)])
def test_training_images_stream_one_batch_at_a_time_and_only_used_ones_are_labelled(
    mixed, steps, batch
):
    from transformers import CLIPProcessor, CLIPVisionModel

    train = RecordingRows(load_from_disk(str(mixed["data"][("mnist", "train")])))  # 16 images
    processor = CLIPProcessor.from_pretrained(mixed["pretrained"])
    views = PairedViews(train, processor, processor, list(range(len(train))))
    student = CLIPVisionModel.from_pretrained(mixed["pretrained"])
    teacher = CLIPVisionModel.from_pretrained(mixed["models"]["mnist"]).eval()
    head = torch.randn(32, 10, generator=torch.Generator().manual_seed(0))
    labelled, rows_read_by_step = [], []

    def teacher_logits(pixels):
        labelled.append(len(pixels))
        return teacher(pixels)[1] @ head

    def student_logits(model, pixels):
        rows_read_by_step.append(len(set(train.reads)))
        return model(pixels)[1] @ head

    run = distill(
        student,
        student_logits,
        teacher_logits,
        views,
        DistillOptions(max_steps=steps, batch_size=batch),
        progress=False,
    )
    assert len(run.losses) == len(run.step_seconds) == steps
    # when step k runs, the split has been read no further than its first k + 1 batches
    assert rows_read_by_step[0] == batch
    assert all(n <= (k + 1) * batch for k, n in enumerate(rows_read_by_step))
    # the teacher labelled each used image once: 3 x 4 of 16 images; 6 x 4 draws of 16 images
    assert run.images_used == min(len(train), steps * batch)
    assert (
        sum(labelled)
        == run.teacher_labelled
        == run.images_used
        < max(len(train) + 1, steps * batch)
    )


def test_micro_batches_give_the_same_steps(mixed):
    """Chunked forward/backward with accumulated gradients: the whole batch's step."""
    from transformers import CLIPProcessor, CLIPVisionModel

    train = load_from_disk(str(mixed["data"][("mnist", "train")]))
    processor = CLIPProcessor.from_pretrained(mixed["pretrained"])
    views = PairedViews(train, processor, processor, list(range(len(train))))
    teacher = CLIPVisionModel.from_pretrained(mixed["models"]["mnist"]).eval()
    head = torch.randn(32, 10, generator=torch.Generator().manual_seed(0))
    students, runs = [], []
    for chunk in (None, 3):
        student = CLIPVisionModel.from_pretrained(mixed["pretrained"])
        runs.append(
            distill(
                student,
                lambda m, px: m(px)[1] @ head,
                lambda px: teacher(px)[1] @ head,
                views,
                DistillOptions(max_steps=3, batch_size=8, lr=1e-3),
                micro_batch_size=chunk,
                progress=False,
            )
        )
        students.append(student)
    torch.testing.assert_close(runs[0].losses, runs[1].losses, rtol=1e-4, atol=1e-6)
    # Adam turns float-level gradient differences into up to lr-sized steps: at most 3 x lr
    for a, b in zip(students[0].parameters(), students[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=3e-3)


def test_backward_in_chunks_accumulates_the_batch_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, t = torch.randn(8, 5), torch.randn(8, 3)

    def chunk_loss(part):
        return torch.nn.functional.mse_loss(model(x[part]), t[part])

    grads, values = [], []
    for chunk in (None, 3, 1):
        model.zero_grad()
        values.append(backward_in_chunks(chunk_loss, 8, chunk))
        grads.append([p.grad.clone() for p in model.parameters()])
    assert values[0] == pytest.approx(float(chunk_loss(slice(0, 8)).detach()))
    for other in (1, 2):
        assert values[other] == pytest.approx(values[0], rel=1e-6)
        for g, h in zip(grads[0], grads[other]):
            torch.testing.assert_close(g, h)


def test_teacher_memo_labels_each_position_once():
    calls = []
    memo = TeacherMemo(lambda px: calls.append(len(px)) or px.sum(dim=1, keepdim=True))
    px = torch.arange(8.0).view(4, 2)
    first = memo.targets(torch.tensor([3, 1, 3, 0]), px)  # position 3 twice in one batch
    assert calls == [3] and first[:, 0].tolist() == [1.0, 5.0, 1.0, 13.0]
    again = memo.targets(torch.tensor([1, 2]), px[:2] + 100)
    assert calls == [3, 1] and again[0].item() == 5.0 and again[1].item() == 205.0


def test_images_digest_is_the_used_images_in_order_never_the_labels(mixed):
    from datasets import Image as ImageFeature

    ds = load_from_disk(str(mixed["data"][("mnist", "train")]))
    wrong = ds.map(lambda ex: {"label": (ex["label"] + 1) % 10})
    digest = images_digest(ds, [0, 1, 2])
    assert digest == images_digest(wrong, [0, 1, 2])
    assert digest not in (images_digest(ds, [1, 0, 2]), images_digest(ds, [0, 1, 3]))
    # through a torch Subset, and from decoded pixels when images are not an encoded column
    assert images_digest(torch.utils.data.Subset(ds, [2, 1, 0]), [2, 1, 0]) == digest
    decoded = ds.cast_column("image", ImageFeature(decode=True)).with_format(None)
    plain = [(decoded[i]["image"], 0) for i in range(3)]
    assert images_digest(plain, [0, 1]) == images_digest(plain, [0, 1])
    assert images_digest(plain, [0, 1]) != images_digest(plain, [1, 0])


def test_distill_to_base_records_what_it_read_and_labelled(mixed, tmp_path):
    alg = DistillToBaseForCLIP(
        cache_dir=str(tmp_path / "cache"), max_steps=1, batch_size=8, evaluate_test=False
    )
    _, report = alg.distill_pool(make_pool(mixed_config(mixed)))
    for task, r in report["teachers"].items():
        assert (r["num_train_images"], r["images_used"], r["teacher_labelled"]) == (16, 8, 8)
        assert r["train_data"]["paths"] == [str(Path(mixed["data"][(task, "train")]).resolve())]
        assert len(r["step_seconds"]) == 1


def test_one_teacher_at_a_time_on_the_compute_device(mixed, tmp_path, monkeypatch):
    """Distillation and the test evaluation move each teacher to the device and back: whenever a
    teacher goes onto the device no other teacher is there, and all end in host memory."""
    from statsmerge_plugin.method.statsmerging.hetero.teachers import Teacher

    seen, on_device_counts = [], []
    real = Teacher.to_device

    def spy(self, device):
        if self not in seen:
            seen.append(self)
        on_device_counts.append(sum(t.on_device for t in seen))  # before this one moves
        return real(self, device)

    monkeypatch.setattr(Teacher, "to_device", spy)
    alg = DistillToBaseForCLIP(
        cache_dir=str(tmp_path / "cache"), max_steps=1, batch_size=8, evaluate_test=True
    )
    _, report = alg.distill_pool(make_pool(mixed_config(mixed)))
    assert len(seen) == len(TEACHERS) == 2
    assert len(on_device_counts) == 2 * len(TEACHERS)  # its distillation and its evaluation
    assert on_device_counts == [0] * len(on_device_counts)
    assert not any(t.on_device for t in seen)
    for t in seen:  # really in host memory
        assert {p.device.type for p in t.model.parameters()} == {"cpu"}
    assert all(r["teacher_accuracy"] is not None for r in report["teachers"].values())


# ------------------------------------------------------------------------------------------------
# distillation through the FusionBench method


def scrambled_labels_copy(mixed: dict, tmp_path: Path) -> dict:
    """The same train images with every label wrong."""
    paths = copy.deepcopy(mixed)
    for task in TEACHERS:
        ds = load_from_disk(str(mixed["data"][(task, "train")]))
        wrong = ds.map(lambda ex: {"label": (ex["label"] + 1) % 10})
        out = tmp_path / f"wrong_{task}"
        wrong.save_to_disk(str(out))
        paths["data"][(task, "train")] = out
    return paths


def test_label_free_never_reads_labels(mixed, tmp_path):
    cfg = mixed_config(mixed)
    wrong_cfg = mixed_config(scrambled_labels_copy(mixed, tmp_path))
    a = DistillToBaseForCLIP(cache_dir=str(tmp_path / "c1"), **FAST)
    b = DistillToBaseForCLIP(cache_dir=str(tmp_path / "c2"), **FAST)
    _, ra = a.distill_pool(make_pool(cfg))
    _, rb = b.distill_pool(make_pool(wrong_cfg))
    assert set(ra["teachers"]) == set(TEACHERS) and ra["same_architecture"] == ["mnist"]
    for task in TEACHERS:
        assert not ra["teachers"][task]["cache_hit"] and not rb["teachers"][task]["cache_hit"]
        # labels are not part of a label-free student's identity, and the students are bit-identical
        assert ra["teachers"][task]["cache_key"] == rb["teachers"][task]["cache_key"]
    sa, sb = students_of(ra), students_of(rb)
    for task in TEACHERS:
        assert_same_weights(sa[task], sb[task])
        base = make_pool(cfg).load_pretrained_model()
        assert any(not torch.equal(p, q) for p, q in zip(sa[task].parameters(), base.parameters()))


def test_use_labels_trains_on_the_labels(mixed, tmp_path):
    cfg = mixed_config(mixed)
    wrong_cfg = mixed_config(scrambled_labels_copy(mixed, tmp_path))
    opts = dict(FAST, use_labels=True, alpha=0.7, augmentation="flip_crop")  # online teacher
    _, ra = DistillToBaseForCLIP(cache_dir=str(tmp_path / "c1"), **opts).distill_pool(
        make_pool(cfg)
    )
    _, rb = DistillToBaseForCLIP(cache_dir=str(tmp_path / "c2"), **opts).distill_pool(
        make_pool(wrong_cfg)
    )
    _, rc = DistillToBaseForCLIP(cache_dir=str(tmp_path / "c1"), **FAST).distill_pool(
        make_pool(cfg)
    )
    sa, sb = students_of(ra), students_of(rb)
    for task in TEACHERS:
        assert ra["teachers"][task]["use_labels"] is True
        assert ra["teachers"][task]["cache_key"] != rb["teachers"][task]["cache_key"]
        assert ra["teachers"][task]["cache_key"] != rc["teachers"][task]["cache_key"]
        assert any(
            not torch.equal(p, q) for p, q in zip(sa[task].parameters(), sb[task].parameters())
        )


def test_student_cache_hit_and_invalidation(mixed, tmp_path):
    cfg = mixed_config(mixed)
    cache = tmp_path / "cache"
    _, first = DistillToBaseForCLIP(cache_dir=str(cache), **FAST).distill_pool(make_pool(cfg))
    _, again = DistillToBaseForCLIP(cache_dir=str(cache), **FAST).distill_pool(make_pool(cfg))
    for task in TEACHERS:
        assert not first["teachers"][task]["cache_hit"] and again["teachers"][task]["cache_hit"]
        assert again["teachers"][task]["student_path"] == first["teachers"][task]["student_path"]
    # another option -> another student
    _, other = DistillToBaseForCLIP(cache_dir=str(cache), temperature=2.0, **FAST).distill_pool(
        make_pool(cfg)
    )
    assert all(not r["cache_hit"] for r in other["teachers"].values())
    # another teacher (new weights at a new path) -> only that student is retrained
    new_resnet = resnet_teacher(tmp_path / "resnet2", seed=7)
    cfg2 = mixed_config(mixed, eurosat=teacher_entry("resnet", new_resnet))
    _, changed = DistillToBaseForCLIP(cache_dir=str(cache), **FAST).distill_pool(make_pool(cfg2))
    assert (
        not changed["teachers"]["eurosat"]["cache_hit"] and changed["teachers"]["svhn"]["cache_hit"]
    )
    # a partial write (manifest missing) is never taken as complete: the student is retrained
    svhn = Path(first["teachers"]["svhn"]["student_path"])
    (svhn / "manifest.json").unlink()
    _, redo = DistillToBaseForCLIP(cache_dir=str(cache), **FAST).distill_pool(make_pool(cfg))
    assert not redo["teachers"]["svhn"]["cache_hit"] and redo["teachers"]["eurosat"]["cache_hit"]
    assert (svhn / "manifest.json").is_file()


def test_distill_to_base_writes_students_pool_yaml_and_report(mixed, tmp_path):
    from fusion_bench.method import TaskArithmeticAlgorithm

    out = tmp_path / "out"
    alg = DistillToBaseForCLIP(
        cache_dir=str(tmp_path / "cache"), output_dir=str(out), max_steps=2, batch_size=8
    )
    assert alg.run(make_pool(mixed_config(mixed))) is None
    pool_cfg = yaml.safe_load((out / "modelpool" / "distilled.yaml").read_text())
    assert list(pool_cfg["models"]) == ["_pretrained_", "mnist", "eurosat", "svhn"]
    for task in TEACHERS:
        assert Path(pool_cfg["models"][task]) == (out / "students" / task).resolve()
    report = read_json(out / "report.json")
    for task in TEACHERS:
        r = report["teachers"][task]
        assert 0 <= r["teacher_accuracy"] <= 1 and 0 <= r["student_accuracy"] <= 1
    assert (
        "| eurosat |" in (out / "report.md").read_text()
        and (out / "accuracy.png").stat().st_size > 1000
    )
    # any FusionBench method merges the written pool
    merged = TaskArithmeticAlgorithm(scaling_factor=0.3).run(make_pool(pool_cfg))
    assert (
        merged.state_dict().keys()
        == make_pool(pool_cfg).load_pretrained_model().state_dict().keys()
    )


# ------------------------------------------------------------------------------------------------
# bad input: one clear error naming the culprit, before any work


@pytest.mark.parametrize(
    "case, match",
    [
        ("no_pretrained", "no `_pretrained_`"),
        ("headless_resnet", "teacher 'eurosat' .*no usable classification head"),
        ("headless_clip", "teacher 'svhn' .*no usable head"),
        ("class_count", "teacher 'eurosat': its head has 7 classes but task 'eurosat' has 10"),
        ("no_processor", "teacher 'eurosat' .*processor"),
        ("label_order", "teacher 'eurosat': its head's output 0 is .* another order"),
    ],
)
def test_bad_input_fails_before_any_work(mixed, tmp_path, case, match):
    cfg = mixed_config(mixed)
    if case == "no_pretrained":
        del cfg["models"]["_pretrained_"]
    elif case == "headless_resnet":  # AutoModel gives the bare ResNetModel backbone
        cfg["models"]["eurosat"] = teacher_entry(
            "resnet", mixed["teachers"]["eurosat"], auto="AutoModel"
        )
    elif case == "headless_clip":
        path = wide_clip_teacher(tmp_path / "vision_only", mixed["pretrained"], text_tower=False)
        cfg["models"]["svhn"] = teacher_entry("clip", path)
    elif case == "class_count":
        cfg["models"]["eurosat"] = teacher_entry(
            "resnet", resnet_teacher(tmp_path / "rn7", num_labels=7)
        )
    elif case == "label_order":  # the task's classes, first two swapped
        from fusion_bench.tasks.clip_classification import get_classnames

        names = list(get_classnames("eurosat"))
        path = resnet_teacher(tmp_path / "rn_swapped", classnames=[names[1], names[0], *names[2:]])
        cfg["models"]["eurosat"] = teacher_entry("resnet", path)
    elif case == "no_processor":
        path = tmp_path / "rn_no_proc"
        shutil.copytree(mixed["teachers"]["eurosat"], path)
        (path / "preprocessor_config.json").unlink()
        cfg["models"]["eurosat"] = teacher_entry("resnet", path)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=match):
        HeteroStatsMergingForCLIP(distillation=dict(FAST, cache_dir=str(cache))).run(make_pool(cfg))
    assert not cache.exists() or not any(cache.iterdir())  # nothing was distilled


def test_output_dir_is_checked_before_any_work(mixed, tmp_path):
    pool, cache = make_pool(mixed_config(mixed)), tmp_path / "cache"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="`output_dir` .*a_file' is an existing file"):
        DistillToBaseForCLIP(cache_dir=str(cache), output_dir=str(a_file), **FAST).run(pool)
    earlier = tmp_path / "earlier"
    (earlier / "modelpool").mkdir(parents=True)
    with pytest.raises(
        ValueError, match=r"already holds an earlier run's outputs \(\['modelpool'\]\)"
    ):
        DistillToBaseForCLIP(cache_dir=str(cache), output_dir=str(earlier), **FAST).run(pool)
    assert not cache.exists()  # nothing was distilled
    again = DistillToBaseForCLIP(
        cache_dir=str(cache), output_dir=str(earlier), overwrite=True, **FAST
    )
    assert again.run(pool) is None and (earlier / "modelpool" / "distilled.yaml").is_file()


# ------------------------------------------------------------------------------------------------
# CLI


@pytest.mark.parametrize("how", ["its path", "a saved copy"])
def test_cli_distill_to_base_refuses_a_train_split_that_is_a_task_pool_test_set(
    mixed, tmp_path, how
):
    """The model pool has no test sets (as FusionBench's often do); the task pool's test set of
    ``eurosat`` is the teacher's train split, by path or as a re-saved copy (same fingerprint)."""
    models = mixed_config(mixed)["models"]
    config_dir = write_tiny_configs(mixed, tmp_path / "cfg", pool_overrides={"models": models})
    pool = yaml.safe_load((config_dir / "modelpool" / "tiny.yaml").read_text())
    del pool["test_datasets"]
    train = mixed["data"][("eurosat", "train")]
    if how == "a saved copy":
        load_from_disk(str(train)).save_to_disk(str(tmp_path / "copy"))
        pool["train_datasets"]["eurosat"]["dataset_path"] = str(tmp_path / "copy")
    (config_dir / "modelpool" / "tiny.yaml").write_text(yaml.safe_dump(pool))
    taskpool = yaml.safe_load((config_dir / "taskpool" / "tiny.yaml").read_text())
    taskpool["test_datasets"]["eurosat"]["dataset_path"] = str(train)
    (config_dir / "taskpool" / "tiny.yaml").write_text(yaml.safe_dump(taskpool))
    cache = tmp_path / "cache"
    proc = run_fusion_bench(
        [
            "--config-dir",
            str(config_dir),
            "method=statsmerging/distill_to_base",
            "modelpool=tiny",
            "taskpool=tiny",
            f"method.cache_dir={cache}",
            f"method.output_dir={tmp_path / 'out'}",
            "method.batch_size=8",
            "fabric.accelerator=cpu",
            "print_config=false",
        ],
        cwd=tmp_path,
        log_dir=tmp_path / "run",
        check=False,
    )
    assert proc.returncode != 0
    assert "task 'eurosat': its 'train' dataset" in proc.stderr + proc.stdout
    assert "the test set of task 'eurosat' in the task pool" in proc.stderr + proc.stdout
    assert not cache.exists() or not any(cache.iterdir())  # nothing was distilled
    assert not (tmp_path / "out").exists()


def test_cli_hetero_run_into_an_earlier_log_dir_stops_before_any_work(mixed, tmp_path):
    models = mixed_config(mixed)["models"]
    config_dir = write_tiny_configs(mixed, tmp_path / "cfg", pool_overrides={"models": models})
    log_dir = tmp_path / "run"
    log_dir.mkdir()
    (log_dir / "config.yaml").write_text("earlier: run\n")
    cache = tmp_path / "cache"
    proc = run_fusion_bench(
        [
            "--config-dir",
            str(config_dir),
            "method=statsmerging/clip_layer_wise_hetero",
            "modelpool=tiny",
            "taskpool=tiny",
            f"method.distillation.cache_dir={cache}",
            "fabric.accelerator=cpu",
            "print_config=false",
        ],
        cwd=tmp_path,
        log_dir=log_dir,
        check=False,
    )
    assert proc.returncode == 1 and "already holds the outputs of an earlier run" in proc.stderr
    assert (log_dir / "config.yaml").read_text() == "earlier: run\n" and not cache.exists()


def test_cli_hetero_statsmerging_on_a_tiny_mixed_pool(mixed, tmp_path):
    models = mixed_config(mixed)["models"]
    config_dir = write_tiny_configs(mixed, tmp_path / "cfg", pool_overrides={"models": models})
    # the tiny taskpool of conftest evaluates the three tasks
    log_dir = tmp_path / "run"
    run_fusion_bench(
        [
            "--config-dir",
            str(config_dir),
            "method=statsmerging/clip_layer_wise_hetero",
            "modelpool=tiny",
            "taskpool=tiny",
            f"method.distillation.cache_dir={tmp_path / 'cache'}",
            "method.distillation.batch_size=8",
            "method.num_unlabelled_per_task=8",
            "method.mlp.hidden_dim=16",
            "fabric.accelerator=cpu",
            "print_config=false",
            "fast_dev_run=true",
        ],
        cwd=tmp_path,
        log_dir=log_dir,
    )
    report = read_json(log_dir / "program_report.json")
    assert {"mnist", "eurosat", "svhn"} <= set(report)
    hetero = read_json(log_dir / "hetero" / "report.json")
    assert set(hetero["teachers"]) == set(TEACHERS) and hetero["fast_dev_run"] is True
    assert all(r["steps"] == 1 for r in hetero["teachers"].values())
    summary = read_json(log_dir / "statsmerging" / "summary.json")
    assert sorted(summary["tasks"]) == ["eurosat", "mnist", "svhn"] and summary["steps"] == 1


# ------------------------------------------------------------------------------------------------
# the mixed mini benchmark's teachers (statsmerge_plugin.mini.hetero), smoke preset


@pytest.fixture(scope="module")
def mini_hetero(smoke_mini, tmp_path_factory):
    """A smoke base build holding the teacher tasks and its teachers' build.

    The base is a copy of the session's smoke build (``conftest.smoke_mini``; its derived corrupted
    splits left out) in this module's own root, so that the teachers' sibling build stays out of the
    shared root."""
    shared = Path(smoke_mini["path"])
    assert set(MINI_TEACHERS) <= set(smoke_mini["tasks"])
    base = tmp_path_factory.mktemp("mini_hetero") / shared.name
    shutil.copytree(shared, base, ignore=shutil.ignore_patterns("corrupted"))
    return base, ensure_hetero_built(base, progress=False)


def test_mini_hetero_teachers_load_as_the_method_expects(mini_hetero):
    from PIL import Image
    from transformers import CLIPVisionModel, ResNetForImageClassification

    base, path = mini_hetero
    manifest = read_manifest(path)
    assert manifest["key"] == path.name and manifest["hetero_version"] == HETERO_VERSION == 2
    assert path.parent == base.parent and path.name.startswith(f"{base.name}-hetero-h2-smoke-")
    expected = {"mini_gtsrb": ResNetForImageClassification, "mini_eurosat": CLIPVisionModel}
    for task, cls in expected.items():
        model = load_teacher(task, base)
        assert type(model) is cls
        spec = get_task(task)
        teacher = build_teacher(task, model, spec.classnames, spec.templates)
        assert teacher.num_classes == len(spec.classnames)
        # its own processor and head give the val accuracy the build measured while training it
        val = load_split(base / "data" / task / "val")
        images = [Image.fromarray(a) for a in val.images]
        pixels = torch.stack([pixel_values(teacher.processor, im) for im in images])
        acc = float((teacher.logits(pixels).argmax(-1).numpy() == val.labels).mean())
        recorded = manifest["teachers"][task]["accuracy"]["val"]
        assert abs(acc - recorded) <= 1 / len(val.labels) + 1e-4, (task, acc, recorded)
    with pytest.raises(KeyError, match="no teacher for 'mini_mnist'"):
        load_teacher("mini_mnist", base)


def test_mini_hetero_key_is_the_recipe_not_the_source():
    smoke = HETERO_PRESETS["smoke"]
    key = hetero_key("base-a", smoke, "smoke")
    assert hetero_key("base-a", HETERO_PRESETS["smoke"], "smoke") == key
    assert set(key_payload("base-a", smoke)) == {
        "version",
        "base",
        "recipe",
        "teachers",
        "libraries",
    }
    assert hetero_key("base-b", smoke, "smoke") != key
    assert hetero_key("base-a", dataclasses.replace(smoke, resnet_steps=11), "smoke") != key
    wider = dataclasses.replace(smoke, wide_clip=dict(smoke.wide_clip, vision_width=64))
    assert hetero_key("base-a", wider, "smoke") != key


def test_mini_hetero_wide_clip_teacher_must_differ_in_width(tmp_path):
    base, smoke = get_recipe("smoke"), HETERO_PRESETS["smoke"]
    same = dataclasses.replace(
        smoke, wide_clip=dict(smoke.wide_clip, vision_width=base.vision_width)
    )
    with pytest.raises(ValueError, match="must differ in width"):
        train_wide_clip(tmp_path, "mini_eurosat", {}, base, same, 0, False)
    assert not any(tmp_path.iterdir())  # nothing trained or written


def test_mini_hetero_build_is_reused_after_a_pure_refactor(mini_hetero, tmp_path):
    """A copy of the package with the teachers' functions renamed finds the existing build."""
    base, path = mini_hetero
    stamp = (path / "manifest.json").stat().st_mtime_ns
    src = tmp_path / "src"
    shutil.copytree(
        Path(statsmerge_plugin.__file__).parent,
        src / "statsmerge_plugin",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    hetero = src / "statsmerge_plugin" / "mini" / "hetero"
    for name in ("train.py", "build.py"):
        code = (hetero / name).read_text()
        renamed = code.replace("train_resnet", "fit_resnet").replace("imagenet_pixels", "to_pixels")
        (hetero / name).write_text(renamed + "\n# refactored\n")
    assert "fit_resnet" in (hetero / "build.py").read_text()
    probe = (
        "import json, statsmerge_plugin;"
        "from statsmerge_plugin.mini.hetero.build import ensure_hetero_built as e;"
        f"print(json.dumps([statsmerge_plugin.__file__, str(e({str(base)!r}, progress=False))]))"
    )
    env = os.environ | {"PYTHONPATH": str(src)}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    module_file, found = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(module_file).is_relative_to(src)  # the refactored copy ran
    assert Path(found) == path and (path / "manifest.json").stat().st_mtime_ns == stamp
    assert [p.name for p in base.parent.glob("*hetero*") if p.is_dir()] == [path.name]
