"""Grad-CAM, overlays, box mapping and localisation scoring (cxr.explain, cxr explain/localize)."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from cxr.cli import app
from cxr.data.transforms import Preprocess, map_box
from cxr.errors import DataError
from cxr.explain.gradcam import _Head, _stitched_cams, gradcam, gradcam_with_logits
from cxr.explain.localize import (
    box_mask,
    localize,
    peak_location,
    read_boxes,
    score_heatmap,
)
from cxr.explain.render import choose_pathologies, heatmap_rgb, overlay_png
from cxr.labels import PATHOLOGIES
from cxr.model.bundle import BundleMeta, load_bundle, save_bundle
from cxr.model.network import build_model
from cxr.run import RunFolder
from cxr.workflows.localize import localize_run

REAL_BOXED = {
    "00001369_000.png": "Cardiomegaly",
    "00001933_000.png": "Pneumonia",
    "00002578_000.png": "Nodule",
    "00004296_000.png": "Atelectasis",
    "00009745_000.png": "Cardiomegaly",
    "00013911_000.png": "Nodule",
    "00015649_000.png": "Mass",
    "00022084_000.png": "Pneumonia",
    "00022178_000.png": "Pneumonia",
    "00026911_000.png": "Infiltration",  # 'Infiltrate' in the box file
}


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    """An untrained DenseNet121 bundle at 64 px (2x2 feature map), seeded."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bundle") / "model"
    save_bundle(folder, build_model(), BundleMeta(image_size=64, normalization="imagenet"))
    return folder


@pytest.fixture(scope="module")
def real_boxes(nih_dir: Path) -> Path:
    return nih_dir / "metadata" / "BBox_List_2017.csv.gz"


# ---------------------------------------------------------------------------- constructed model


class RegionGate(nn.Module):
    """Zero every feature-map cell outside a fixed mask, per channel."""

    def __init__(self, masks: torch.Tensor):
        super().__init__()
        self.register_buffer("masks", masks)

    def forward(self, x):
        return x * self.masks


class RegionModel(nn.Module):
    """features -> ReLU -> global average pool -> classifier, like DenseNet121, but built so
    that channel k of the 8x8 feature map only sees the input pixels of region k.

    Class 0 reads channel 0 only, class 1 channel 1 only, class 2 is channel 1 minus
    channel 0 (its evidence in region 0 is negative).
    """

    REGIONS = ((slice(1, 3), slice(5, 7)), (slice(5, 7), slice(1, 3)))  # cells (rows, cols)

    def __init__(self):
        super().__init__()
        patchify = nn.Conv2d(3, 2, kernel_size=8, stride=8, bias=False)
        with torch.no_grad():
            patchify.weight.fill_(1.0 / (3 * 64))  # each cell: the mean of its 8x8 pixels
        masks = torch.zeros(2, 8, 8)
        for channel, (rows, cols) in enumerate(self.REGIONS):
            masks[channel, rows, cols] = 1.0
        self.features = nn.Sequential(patchify, RegionGate(masks), nn.BatchNorm2d(2))
        self.classifier = nn.Linear(2, 3, bias=True)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]]))
            self.classifier.bias.zero_()

    def forward(self, x):
        pooled = F.adaptive_avg_pool2d(F.relu(self.features(x)), 1)
        return self.classifier(torch.flatten(pooled, 1))

    @classmethod
    def pixel_box(cls, region: int) -> tuple[float, float, float, float]:
        rows, cols = cls.REGIONS[region]
        return (
            cols.start * 8,
            rows.start * 8,
            (cols.stop - cols.start) * 8,
            (rows.stop - rows.start) * 8,
        )


def test_gradcam_points_at_the_only_region_the_logit_depends_on():
    model = RegionModel().eval()
    torch.manual_seed(1)
    images = torch.rand(3, 3, 64, 64) + 0.1  # positive everywhere: every cell is active
    maps = gradcam(model, images, [0, 1, 2])
    assert maps.shape == (3, 3, 64, 64) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    for image in range(3):
        for position, region in ((0, 0), (1, 1), (2, 1)):
            heatmap = maps[image, position]
            box = RegionModel.pixel_box(region)
            x, y = peak_location(heatmap)
            assert box[0] <= x <= box[0] + box[2] and box[1] <= y <= box[1] + box[3]
            assert score_heatmap(heatmap, [box])["hit"]
            inside = box_mask([box], 64)
            assert heatmap[inside].mean() > 5 * heatmap[~inside].mean()
        # Class 2 counts region 0 against itself: it must stay cold there, not turn hot.
        cold = box_mask([RegionModel.pixel_box(0)], 64)
        assert maps[image, 2][cold].max() < 0.05


def test_the_logit_really_depends_on_the_region_only():
    model = RegionModel().eval()
    images = torch.rand(1, 3, 64, 64)
    changed = images.clone()
    changed[..., 0:8, 0:8] = 5.0  # a cell outside both regions
    with torch.no_grad():
        assert torch.allclose(model(images), model(changed))
        changed[..., 8:24, 40:56] = 5.0  # inside region 0
        assert not torch.allclose(model(images)[:, 0], model(changed)[:, 0])


class StrideModel(nn.Module):
    """DenseNet121's geometry without its weights: one feature cell per 32 x 32 pixels.

    Each cell is a weighted sum of its pixels (``kernel``, 32 x 32), ReLU'd, average-pooled
    and read by a 1 -> 1 classifier, so the class logit's Grad-CAM is the cell values.
    """

    def __init__(self, kernel: torch.Tensor):
        super().__init__()
        conv = nn.Conv2d(3, 1, kernel_size=32, stride=32, bias=False)
        with torch.no_grad():
            conv.weight.copy_(kernel.expand(1, 3, 32, 32) / 3)
        self.features = nn.Sequential(conv)
        self.classifier = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.classifier.weight.fill_(1.0)


def test_shift_and_stitch_samples_the_map_where_it_says():
    # Each cell averages the two pixels either side of its centre, so on a ramp image (each
    # pixel's value is its centre's x coordinate) a cell's class activation is the x of its
    # centre. The stitched map, before min-max scaling, must then be the ramp itself: a sample
    # put at the wrong place, or a pass on another scale, shows.
    kernel = torch.zeros(32, 32)
    kernel[15:17, 15:17] = 0.25
    model = StrideModel(kernel).eval()
    size = 128
    ramp = torch.arange(size, dtype=torch.float32) + 0.5
    images = ramp.expand(1, 3, size, size).clone()
    inner = slice(16, size - 16)  # between the outermost samples (held constant beyond)
    for shifts in (2, 4, 8):
        unshifted = F.relu(model.features(images)).detach()
        head = _Head(model.classifier)
        raw = _stitched_cams(model, head, images, unshifted, [0], shifts)[0, 0]
        assert raw.shape == (size, size)
        np.testing.assert_allclose(
            raw[:, inner].numpy(),
            ramp[inner].expand(size, -1).numpy(),
            atol=1e-3,
            err_msg=f"shifts={shifts}",
        )


@pytest.mark.parametrize("spot", [(40, 72), (24, 104), (96, 40)])
def test_shift_and_stitch_points_inside_a_finding_smaller_than_a_cell(spot):
    # An 8 px bright spot on black, and cells that weigh their pixels by closeness to their
    # centre: plain Grad-CAM can only point at a cell centre (every 32 px), none of which is
    # on these spots; 4 shifts per axis sample every 8 px, which brings the maximum onto them.
    centre = torch.arange(32, dtype=torch.float32) - 15.5
    kernel = torch.exp(-(centre[:, None] ** 2 + centre[None, :] ** 2) / (2 * 10.0**2))
    model = StrideModel(kernel).eval()
    size, (x, y) = 128, spot
    images = torch.zeros(1, 3, size, size)
    images[..., y - 4 : y + 4, x - 4 : x + 4] = 1.0
    box = (x - 4, y - 4, 8, 8)
    plain = gradcam(model, images, [0])[0, 0]
    stitched = gradcam(model, images, [0], shifts=4)[0, 0]
    assert not score_heatmap(plain, [box])["hit"]
    assert score_heatmap(stitched, [box])["hit"]
    # Same logits whatever the density: they come from the unshifted image.
    _, logits_plain = gradcam_with_logits(model, images, [0])
    _, logits_stitched = gradcam_with_logits(model, images, [0], shifts=4)
    np.testing.assert_array_equal(logits_plain, logits_stitched)


def test_shifts_must_keep_whole_pixels():
    with pytest.raises(ValueError, match="shifts"):
        gradcam(RegionModel(), torch.rand(1, 3, 64, 64), [0], shifts=3)


def test_gradcam_uses_eval_mode_and_restores_train_mode():
    model = RegionModel()
    with torch.no_grad():
        model.features[2].running_mean.fill_(0.01)
    model.train()
    images = torch.rand(4, 3, 64, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    in_train = gradcam(model, images, [0, 1])
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # BatchNorm statistics untouched
    assert all(p.grad is None for p in model.parameters())
    in_eval = gradcam(model.eval(), images, [0, 1])
    np.testing.assert_allclose(in_train, in_eval, atol=1e-6)
    # One image alone gives the same map as in a batch: eval-mode BatchNorm couples nothing.
    np.testing.assert_allclose(gradcam(model, images[:1], [0, 1]), in_eval[:1], atol=1e-6)


def test_flat_maps_are_zeros_not_nan():
    model = RegionModel().eval()
    flat = torch.zeros(2, 3, 64, 64)  # every feature is 0: no evidence anywhere
    maps = gradcam(model, flat, [0, 1, 2])
    assert np.isfinite(maps).all() and not maps.any()
    constant = build_model().eval()
    maps = gradcam(constant, torch.zeros(1, 3, 32, 32), [0, 5])  # 1x1 feature map: flat
    assert np.isfinite(maps).all() and not maps.any()


def test_gradcam_works_inside_inference_mode():
    model = RegionModel().eval()
    images = torch.rand(2, 3, 64, 64)
    expected = gradcam(model, images, [0])
    with torch.inference_mode():
        inside = gradcam(model, images.clone(), [0])
    np.testing.assert_array_equal(inside, expected)


def test_densenet_gradcam_is_cam_of_the_final_relu_feature_map_and_logits_match():
    torch.manual_seed(0)
    model = build_model().eval()
    images = torch.randn(2, 3, 96, 96)
    classes = [1, 4, 13]
    maps, logits = gradcam_with_logits(model, images, classes)
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(images).numpy(), rtol=1e-4, atol=1e-5)
        features = F.relu(model.features(images))  # 1024 x 3 x 3
        assert features.shape[-2:] == (3, 3)
        for position, c in enumerate(classes):
            cam = F.relu(torch.einsum("k,bkhw->bhw", model.classifier.weight[c], features))
            cam = F.interpolate(cam[:, None], size=(96, 96), mode="bilinear")[:, 0]
            low, high = cam.amin((1, 2), keepdim=True), cam.amax((1, 2), keepdim=True)
            expected = torch.where(high > low, (cam - low) / (high - low), 0 * cam).numpy()
            np.testing.assert_allclose(maps[:, position], expected, atol=1e-4)


# ---------------------------------------------------------------------------- overlays


def test_overlay_colours_are_rgb_hot_where_the_map_is_high():
    gray = np.full((32, 32), 128, dtype=np.uint8)
    heatmap = np.zeros((32, 32), dtype=np.float32)
    heatmap[:, :16] = 1.0
    rgb = heatmap_rgb(gray, heatmap)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    hot, cold = rgb[5, 5].astype(int), rgb[5, 25].astype(int)
    assert hot[0] > hot[2] + 50  # red where the map is 1
    assert cold[2] > cold[0] + 50  # blue where it is 0
    with pytest.raises(ValueError):
        heatmap_rgb(gray, heatmap[:16])


def test_overlay_png_is_a_png_with_room_for_title_and_colour_bar():
    gray = (np.arange(64 * 64) % 256).astype(np.uint8).reshape(64, 64)
    heatmap = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    data = overlay_png(gray, heatmap, "Effusion, p = 0.91")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    assert image.width > image.height > 200  # the colour bar widens it, the title heightens it


# ---------------------------------------------------------------------------- boxes


def test_read_real_box_file_header_with_more_fields_and_infiltrate_alias(real_boxes: Path):
    boxes = read_boxes(real_boxes)
    assert len(boxes) == 984
    assert boxes["image"].nunique() == 880
    assert "Infiltrate" not in set(boxes["pathology"])
    assert (boxes["pathology"] == "Infiltration").sum() > 0
    assert set(boxes["pathology"]) <= set(PATHOLOGIES)
    row = boxes[boxes["image"] == "00026911_000.png"].iloc[0]
    assert row["pathology"] == "Infiltration"
    assert 0 < row["x"] < 1024 and row["w"] > 0


def test_read_boxes_nine_field_header_six_field_rows(tmp_path: Path):
    path = tmp_path / "BBox_List_2017.csv.gz"
    text = (
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "a.png,Infiltrate,10.5,20,30,40\n"
        "a.png,Mass,1,2,3,4\n"
        "\n"
        "b.png,pleural_thickening,5,6,7,8\n"
    )
    assert len(text.splitlines()[0].split(",")) == 9
    path.write_bytes(gzip.compress(text.encode()))
    boxes = read_boxes(path)
    assert boxes.to_dict("records") == [
        {"image": "a.png", "pathology": "Infiltration", "x": 10.5, "y": 20, "w": 30, "h": 40},
        {"image": "a.png", "pathology": "Mass", "x": 1, "y": 2, "w": 3, "h": 4},
        {"image": "b.png", "pathology": "Pleural_Thickening", "x": 5, "y": 6, "w": 7, "h": 8},
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("a.png,Fracture,1,2,3,4", "line 2: unknown pathology 'Fracture'"),
        ("a.png,Mass,1,two,3,4", "line 2: box"),
        ("a.png,Mass,1,2,0,4", "w, h > 0"),
        ("a.png,Mass,1,2", "expected 6 fields"),
    ],
)
def test_read_boxes_names_the_bad_line(tmp_path: Path, line: str, message: str):
    path = tmp_path / "boxes.csv"
    path.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n" + line + "\n")
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        read_boxes(path)


def test_read_boxes_rejects_other_files(tmp_path: Path):
    path = tmp_path / "other.csv"
    path.write_text("name,value\n")
    with pytest.raises(DataError, match="header"):
        read_boxes(path)
    with pytest.raises(DataError, match="not found"):
        read_boxes(tmp_path / "missing.csv")


def test_map_box_square_1024_to_224():
    x, y, w, h = map_box((512, 256, 128, 64), 1024, 1024, Preprocess(224))
    assert (x, y, w, h) == pytest.approx((112, 56, 28, 14))


def test_map_box_wide_and_tall_images_use_the_centre_crop():
    preprocess = Preprocess(50)
    assert preprocess.geometry(100, 200) == (50, 100, 0, 25)
    assert map_box((60, 10, 40, 20), 100, 200, preprocess) == pytest.approx((5, 5, 20, 10))
    # A box in the cropped-away left margin vanishes; one across the edge is clipped.
    assert map_box((0, 0, 40, 20), 100, 200, preprocess)[2] == 0
    assert map_box((30, 0, 40, 20), 100, 200, preprocess) == pytest.approx((0, 0, 10, 10))
    assert preprocess.geometry(200, 100) == (100, 50, 25, 0)
    assert map_box((10, 60, 20, 40), 200, 100, preprocess) == pytest.approx((5, 5, 10, 20))


def test_map_box_agrees_with_the_pixels_the_model_sees():
    """A bright rectangle drawn at a box lands inside the mapped box of the model's crop."""
    gray = np.zeros((300, 420), dtype=np.uint8)
    box = (250, 90, 60, 45)
    gray[90:135, 250:310] = 255
    preprocess = Preprocess(96)
    crop = preprocess.crop_resized(gray)
    x, y, w, h = map_box(box, 300, 420, preprocess)
    bright = np.argwhere(crop > 200)
    assert len(bright) > 0
    assert bright[:, 1].min() + 0.5 >= x - 1 and bright[:, 1].max() + 0.5 <= x + w + 1
    assert bright[:, 0].min() + 0.5 >= y - 1 and bright[:, 0].max() + 0.5 <= y + h + 1
    assert box_mask([(x, y, w, h)], 96)[crop > 200].mean() > 0.9


# ---------------------------------------------------------------------------- scoring


def test_peak_location_of_a_border_plateau_is_the_cell_centre_not_the_corner():
    cam = torch.tensor([[[[1.0, 0.2], [0.1, 0.0]]]])
    heatmap = F.interpolate(cam, size=(64, 64), mode="bilinear")[0, 0].numpy()
    assert heatmap[0, 0] == heatmap[15, 15] == 1.0  # bilinear leaves a plateau to the corner
    # The 2x2 map's top-left cell centre is (16, 16); the plateau's innermost pixel is 15.
    assert peak_location(heatmap) == (15.5, 15.5)


def test_score_heatmap_hit_and_iou():
    heatmap = np.zeros((20, 20), dtype=np.float32)
    heatmap[2:6, 2:6] = 1.0  # 16 px at 1
    heatmap[2:6, 6:10] = 0.4  # 16 px at 0.4
    box = (2, 2, 4, 4)  # exactly the hot square
    score = score_heatmap(heatmap, [box], thresholds=(0.25, 0.5))
    assert score["hit"]
    assert score["iou"] == {"0.25": pytest.approx(0.5), "0.5": pytest.approx(1.0)}
    assert score["distance"] == 0.0 and score["hit_tolerant"]
    miss = score_heatmap(heatmap, [(12, 12, 5, 5)], thresholds=(0.5,), tolerance=10)
    assert not miss["hit"] and miss["iou"]["0.5"] == 0.0
    # Of the tied hot square, the pixel nearest the image centre, (5.5, 5.5), is taken; the
    # box corner (12, 12) is 6.5 * sqrt(2) = 9.2 px away: within 10 px, not within 9.
    assert miss["point"] == [5.5, 5.5]
    assert miss["distance"] == pytest.approx(6.5 * 2**0.5)
    assert miss["hit_tolerant"]
    assert not score_heatmap(heatmap, [(12, 12, 5, 5)], tolerance=9)["hit_tolerant"]

    # Several boxes of one finding: their union.
    assert score_heatmap(heatmap, [(12, 12, 5, 5), box], thresholds=(0.5,))["hit"]
    assert not score_heatmap(np.zeros((20, 20), np.float32), [box])["hit"]


def test_choose_pathologies_positive_falls_back_to_top_three():
    probs = np.linspace(0.1, 0.8, 14)
    assert choose_pathologies(probs, [0.95] * 14) == ([13, 12, 11], "top 3")
    chosen, reason = choose_pathologies(probs, [0.7] * 14)  # 0.746 and 0.8 reach it
    assert reason == "positive" and chosen == [13, 12]
    assert choose_pathologies(probs, [0.5] * 14, mode="all")[0] == list(range(14))
    assert choose_pathologies(probs, [0.5] * 14, pathologies=["Infiltrate", "hernia"]) == (
        [3, 13],
        "named",
    )
    with pytest.raises(ValueError):
        choose_pathologies(probs, [0.5] * 14, pathologies=["Fracture"])
    # `positive`: only the positive calls, none when nothing reaches its threshold.
    assert choose_pathologies(probs, [0.95] * 14, mode="positive") == ([], "positive")
    assert choose_pathologies(probs, [0.7] * 14, mode="positive") == ([13, 12], "positive")


# ---------------------------------------------------------------------------- CLI on real data


def _check_heatmap(path: Path, size: int) -> None:
    heatmap = np.load(path)
    assert heatmap.shape == (size, size) and heatmap.dtype == np.float32
    assert np.isfinite(heatmap).all() and heatmap.min() >= 0.0 and heatmap.max() <= 1.0


@pytest.mark.slow
def test_cli_explain_real_nih_pngs(tmp_path: Path, bundle_dir: Path, sample_images: Path):
    images = [sample_images / "00001369_000.png", sample_images / "00026911_000.png"]  # RGBA, L
    out = tmp_path / "explained"
    result = CliRunner().invoke(
        app, ["explain", str(bundle_dir), *map(str, images), "--out", str(out), "--all"]
    )
    assert result.exit_code == 0, result.output
    assert "00026911_000.png" in result.output and "Hernia" in result.output
    summary = json.loads((out / "explanations.json").read_text())
    assert len(summary["images"]) == 2
    for image in images:
        folder = out / image.stem
        for name in PATHOLOGIES:
            _check_heatmap(folder / f"{name}.npy", 64)
            png = Image.open(folder / f"{name}.png")
            assert png.format == "PNG" and png.width > 200
    record = summary["images"][0]
    assert record["original_size"] == [1024, 1024] and record["selection"] == "all"
    assert set(record["probabilities"]) == set(PATHOLOGIES)
    # The heatmaps differ between pathologies (a class-specific gradient, not one map).
    maps = [np.load(out / images[1].stem / f"{n}.npy") for n in PATHOLOGIES]
    assert max(np.abs(m - maps[0]).max() for m in maps[1:]) > 0.05


def test_cli_explain_named_pathology_and_default_positive_mode(
    tmp_path: Path, bundle_dir: Path, sample_images: Path
):
    image = str(sample_images / "00026911_000.png")
    named = tmp_path / "named"
    result = CliRunner().invoke(
        app, ["explain", str(bundle_dir), image, "--out", str(named), "--pathology", "Infiltrate"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (named / "00026911_000").iterdir()) == [
        "Infiltration.npy",
        "Infiltration.png",
    ]
    # Thresholds no probability reaches: nothing is positive, so the top 3 are explained.
    strict = tmp_path / "strict"
    save_bundle(strict, load_bundle(bundle_dir).model, BundleMeta(
        image_size=64, normalization="imagenet", thresholds=[1.0] * 14
    ))  # fmt: skip
    out = tmp_path / "positive"
    result = CliRunner().invoke(app, ["explain", str(strict), image, "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "explanations.json").read_text())["images"][0]
    assert record["selection"] == "top 3" and record["positive"] == []
    probs = record["probabilities"]
    top = sorted(probs, key=lambda n: -probs[n])[:3]
    assert [e["pathology"] for e in record["explained"]] == top
    assert len(list((out / "00026911_000").glob("*.png"))) == 3

    # --positive explains only what is called positive: here nothing, and says so.
    only = tmp_path / "only-positive"
    args = ["explain", str(strict), image, "--out", str(only), "--positive"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((only / "explanations.json").read_text())["images"][0]
    assert record["selection"] == "positive" and record["explained"] == []
    assert not list(only.rglob("*.png"))


def test_cli_explain_rejects_conflicting_modes_and_unknown_names(
    tmp_path: Path, bundle_dir: Path, sample_images: Path
):
    image = str(sample_images / "00026911_000.png")
    base = ["explain", str(bundle_dir), image, "--out", str(tmp_path / "x")]
    result = CliRunner().invoke(app, [*base, "--all", "--pathology", "Mass"])
    assert result.exit_code == 2 and "choose one of" in result.output
    result = CliRunner().invoke(app, [*base, "--pathology", "Fracture"])
    assert result.exit_code == 2 and "unknown pathology 'Fracture'" in result.output


def test_cli_localize_real_boxes_on_the_ten_real_sample_images(
    tmp_path: Path, bundle_dir: Path, real_boxes: Path, sample_images: Path
):
    out = tmp_path / "localization.json"
    result = CliRunner().invoke(
        app,
        ["localize", str(bundle_dir), "--boxes", str(real_boxes), "--images", str(sample_images),
         "--out", str(out), "--split", "all"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "overall" in result.output and "split all: 10 of 880 image(s)" in result.output
    # A bare bundle has no training split to check against: nothing is "trained on".
    assert "0 trained on" in result.output
    assert "±16" in result.output  # the tolerant pointing game's column
    report = json.loads(out.read_text())
    assert report["images_scored"] == 10 and report["images_not_found"] == 870
    assert report["overall"]["findings"] == 10
    assert {f["image"]: f["pathology"] for f in report["findings"]} == REAL_BOXED
    assert set(report["per_pathology"]) == set(REAL_BOXED.values())
    assert sum(e["findings"] for e in report["per_pathology"].values()) == 10
    for finding in report["findings"]:
        assert finding["original_size"] == [1024, 1024]
        (x, y, w, h), (ox, oy, ow, oh) = finding["boxes"][0], finding["boxes_original"][0]
        assert (x, y, w, h) == pytest.approx((ox / 16, oy / 16, ow / 16, oh / 16))  # 1024 -> 64
        assert isinstance(finding["hit"], bool) and set(finding["iou"]) == {"0.25", "0.5", "0.75"}
    overall = report["overall"]
    assert overall["pointing_hit_rate"] == overall["hits"] / 10
    assert (
        overall["hits"]
        <= overall["hits_tolerant"]
        == sum(f["hit_tolerant"] for f in report["findings"])
    )
    assert report["tolerance_px"] == 16.0


@pytest.mark.slow
def test_localize_run_on_synthetic_boxes(tmp_path: Path, make_run, synth_data: Path, bundle_dir):
    run = make_run(tmp_path / "run")
    bundle = load_bundle(bundle_dir)
    save_bundle(run, bundle.model, bundle.meta)
    report = localize_run(run, split="test")
    assert Path(report["path"]) == run / "localization.json"
    assert json.loads((run / "localization.json").read_text())["overall"] == report["overall"]
    boxes = read_boxes(synth_data / "BBox_List_2017.csv")
    test_names = set(RunFolder(run).read_split("test")["Image Index"])
    expected = boxes[boxes["image"].isin(test_names)].groupby(["image", "pathology"]).ngroups
    assert report["overall"]["findings"] == expected > 0
    assert report["images_not_found"] == 0
    for finding in report["findings"]:
        assert finding["original_size"] == [64, 64]  # synthetic boxes are in 64 px pixels
        assert finding["boxes"] == [pytest.approx(b) for b in finding["boxes_original"]]
    assert report["split"] == "test" and report["images_trained_on"] == 0
    # Every image with a box, not only the test split.
    everything = localize(bundle, synth_data / "BBox_List_2017.csv", synth_data)
    assert everything["images_scored"] == boxes["image"].nunique()
    assert everything["overall"]["findings"] > report["overall"]["findings"]
    # The run's own `all` says how many of them the model trained on, and warns.
    trained = set(RunFolder(run).read_split("train")["Image Index"])
    trained |= set(RunFolder(run).read_split("val")["Image Index"])
    scored_all = localize_run(run, split="all", out=tmp_path / "all.json")
    expected_trained = len(set(boxes["image"]) & trained)
    assert scored_all["images_trained_on"] == expected_trained > 0
    assert len(scored_all["warnings"]) == 1
    assert f"{expected_trained:,} of the" in scored_all["warnings"][0]
    assert "cxr data split --official" in scored_all["warnings"][0]
    with pytest.raises(DataError, match="split must be one of test, val, train, all"):
        localize_run(run, split="holdout")


@pytest.mark.slow
def test_cli_localize_and_explain_with_shift_and_stitch(
    tmp_path: Path, bundle_dir: Path, real_boxes: Path, sample_images: Path
):
    out = tmp_path / "localization.json"
    result = CliRunner().invoke(
        app,
        ["localize", str(bundle_dir), "--boxes", str(real_boxes), "--images", str(sample_images),
         "--out", str(out), "--shifts", "2", "--split", "all"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "sampled every 16 px (shift-and-stitch)" in result.output
    report = json.loads(out.read_text())
    assert report["shifts"] == 2 and report["sample_spacing_px"] == 16.0
    assert report["overall"]["findings"] == 10
    image = str(sample_images / "00026911_000.png")
    explained = tmp_path / "explained"
    result = CliRunner().invoke(
        app,
        ["explain", str(bundle_dir), image, "--out", str(explained), "--pathology", "Mass",
         "--shifts", "4"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((explained / "explanations.json").read_text())["shifts"] == 4
    _check_heatmap(explained / "00026911_000" / "Mass.npy", 64)
    for command in (["localize", str(bundle_dir)], ["explain", str(bundle_dir), image]):
        result = CliRunner().invoke(app, [*command, "--out", str(tmp_path / "x"), "--shifts", "3"])
        assert result.exit_code == 2 and "--shifts must be one of 1, 2, 4, 8" in result.output


def test_localize_without_any_image_found_is_an_error(tmp_path: Path, bundle_dir, real_boxes):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="none of the 880 image"):
        localize(load_bundle(bundle_dir), real_boxes, tmp_path / "empty")
