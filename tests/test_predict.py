"""Prediction on new images: decisions, outputs, unreadable files, errors."""

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from patchcore.apps.predict import COLUMNS, output_stems, streamed_results
from patchcore.cli.predict import predict_cli
from patchcore.config import PreprocessingConfig
from patchcore.data.datasets import ImageDataset, list_samples
from patchcore.data.preprocessing import inspected_region
from patchcore.evaluation.visualization import colour_bar_rgb, grey_out
from patchcore.model.calibration import colour_range
from patchcore.model.patchcore import PatchCore
from patchcore.model.serialization import save_models
from test_deploy import fit_small_model, run_script_help


@pytest.fixture(scope="module")
def models(synthetic_root, tmp_path_factory) -> dict:
    """A calibrated model folder, the same model without a threshold, and the threshold."""
    folder = tmp_path_factory.mktemp("predict_models")
    model = fit_small_model(synthetic_root, "texture")
    save_models(folder / "calibrated", [model])
    uncalibrated = PatchCore(model.config)
    uncalibrated.set_memory_bank(model.memory_bank)
    save_models(folder / "uncalibrated", [uncalibrated])
    return {
        "calibrated": folder / "calibrated",
        "uncalibrated": folder / "uncalibrated",
        "threshold": model.normal_statistics.threshold,
        "model": model,
        "uncalibrated_model": uncalibrated,
    }


def predict(model_dir: Path, inputs: list, output: Path, *options) -> tuple[int, str]:
    arguments = [model_dir, *inputs, "--output", output, "--gpu", "-1", "--num_workers", "0",
                 *options]  # fmt: skip
    outcome = CliRunner().invoke(predict_cli, [str(argument) for argument in arguments])
    return outcome.exit_code, outcome.output


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def expected_code(rows: list[dict]) -> int:
    """The documented exit code of a results file's rows: 4 any error, 3 any reject, else 0."""
    decisions = {row["decision"] for row in rows}
    return 4 if "error" in decisions else 3 if "reject" in decisions else 0


def test_every_image_gets_a_row_with_a_decision_against_the_saved_threshold(
    models, synthetic_root, tmp_path
):
    test_folder = synthetic_root / "texture" / "test"
    code, output = predict(models["calibrated"], [test_folder], tmp_path / "out.csv")
    rows = read_rows(tmp_path / "out.csv")
    assert "reject" in {row["decision"] for row in rows}
    assert code == 3, output
    expected_paths = sorted(str(path) for path in test_folder.glob("*/*.png"))
    assert [row["path"] for row in rows] == expected_paths
    assert list(rows[0]) == list(COLUMNS)
    for row in rows:
        assert float(row["threshold"]) == models["threshold"]
        rejected = float(row["score"]) > models["threshold"]
        assert row["decision"] == ("reject" if rejected else "accept")
    rejected = sum(row["decision"] == "reject" for row in rows)
    assert f"{len(rows)} scored: {rejected} rejected, {len(rows) - rejected} accepted; " in output
    assert "0 unreadable" in output


def test_scores_equal_the_library_on_the_same_images(models, synthetic_root, tmp_path):
    samples = list_samples(synthetic_root, "texture", "test")[:3]
    paths = [sample.image_path for sample in samples]
    code, output = predict(models["calibrated"], paths, tmp_path / "out.csv")
    assert code == expected_code(read_rows(tmp_path / "out.csv")), output
    model = models["model"]
    dataset = ImageDataset(samples, model.config.preprocessing)
    expected = model.predict(torch.stack([dataset[i]["image"] for i in range(3)]))
    scores = [float(row["score"]) for row in read_rows(tmp_path / "out.csv")]
    np.testing.assert_allclose(scores, expected.scores.numpy(), rtol=1e-4)


@pytest.mark.parametrize(("threshold", "decision"), [("-1", "reject"), ("1e9", "accept")])
def test_threshold_option_overrides_the_saved_one(
    models, synthetic_root, tmp_path, threshold, decision
):
    pattern = str(synthetic_root / "texture" / "test" / "*" / "00[01].png")
    code, output = predict(
        models["calibrated"], [pattern], tmp_path / "out.csv", "--threshold", threshold
    )
    assert code == (3 if decision == "reject" else 0), output
    rows = read_rows(tmp_path / "out.csv")
    assert len(rows) == 8  # good has 000-003, each defect type 000-002
    assert {row["decision"] for row in rows} == {decision}
    assert {float(row["threshold"]) for row in rows} == {float(threshold)}


def test_unreadable_files_get_error_rows_and_exit_code_4(models, synthetic_root, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    folder = tmp_path / "incoming"
    folder.mkdir()
    for path in sorted((synthetic_root / "texture" / "test" / "good").glob("*.png"))[:3]:
        shutil.copy(path, folder / path.name)
    (folder / "broken.png").write_bytes(b"this is not an image")
    (folder / "truncated.png").write_bytes((folder / "000.png").read_bytes()[:200])
    code, output = predict(
        models["calibrated"], [folder], tmp_path / "out.csv", "--num_workers", "2",
        "--batch_size", "2",
    )  # fmt: skip
    assert code == 4, output
    rows = read_rows(tmp_path / "out.csv")
    assert [Path(row["path"]).name for row in rows] == [
        "000.png", "001.png", "002.png", "broken.png", "truncated.png"]  # fmt: skip
    for row in rows[3:]:
        assert row["decision"] == "error" and row["score"] == "" and row["heatmap"] == ""
        assert row["error"].startswith(f"{row['path']}: cannot read image")
        assert float(row["threshold"]) == models["threshold"]
    assert all(row["error"] == "" and row["decision"] != "error" for row in rows[:3])
    assert "3 scored" in output and "2 unreadable (decision error)" in output
    assert f"Cannot score {folder / 'broken.png'}: cannot read image" in caplog.text
    assert str(folder / "truncated.png") in caplog.text


def test_json_lines_output(models, synthetic_root, tmp_path):
    inputs = sorted((synthetic_root / "texture" / "test" / "hole").glob("*.png"))
    code, output = predict(models["calibrated"], inputs, tmp_path / "out.jsonl")
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert code == (3 if any(r["decision"] == "reject" for r in records) else 0), output
    assert [record["path"] for record in records] == [str(path) for path in inputs]
    assert all(set(record) == set(COLUMNS) for record in records)
    assert all(isinstance(record["score"], float) for record in records)


def test_heat_maps_and_masks_are_written_at_the_input_size(models, synthetic_root, tmp_path):
    test_folder = synthetic_root / "texture" / "test"
    inputs = [test_folder / "good" / "000.png", test_folder / "scratch" / "000.png"]
    code, output = predict(
        models["calibrated"], inputs, tmp_path / "out.csv",
        "--heatmaps", tmp_path / "heat", "--masks", tmp_path / "masks",
    )  # fmt: skip
    assert code == expected_code(read_rows(tmp_path / "out.csv")), output
    names = ["good_000.png", "scratch_000.png"]
    assert sorted(p.name for p in (tmp_path / "heat").iterdir()) == names
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == names
    rows = {Path(row["path"]).parent.name: row for row in read_rows(tmp_path / "out.csv")}
    model = models["model"]
    seen = inspected_region((256, 256), model.config.preprocessing).numpy()
    assert 0 < seen.sum() < seen.size  # a centre crop: the border was never inspected
    for name in names:
        row = rows[name.split("_")[0]]
        assert row["heatmap"] == str(tmp_path / "heat" / name)
        assert row["mask"] == str(tmp_path / "masks" / name)
        heat = np.asarray(Image.open(tmp_path / "heat" / name))
        original = np.asarray(Image.open(test_folder / name.replace("_", "/", 1)).convert("RGB"))
        assert original.shape == (256, 256, 3)
        # The image at its own size, then the colour bar below it.
        assert heat.shape[1:] == (256, 3) and heat.shape[0] > 256
        image_part = heat[:256]
        assert not np.array_equal(image_part[seen], original[seen])
        assert np.array_equal(image_part[~seen], grey_out(original, original, seen)[~seen])
        expected_bar = colour_bar_rgb(
            colour_range(models["threshold"], model.normal_statistics), models["threshold"], 256
        )
        bar = heat[256 : 256 + len(expected_bar)]
        assert np.array_equal(bar, expected_bar)
        caption = heat[256 + len(expected_bar) :]
        assert len(caption) > 0
        red = (caption[..., 0] > 150) & (caption[..., 1] < 80)
        green = (caption[..., 1] > 80) & (caption[..., 0] < 60)
        assert red.any() if row["decision"] == "reject" else green.any()
        mask = np.asarray(Image.open(tmp_path / "masks" / name))
        assert mask.shape == (256, 256) and set(np.unique(mask)) <= {0, 255}
        assert not mask[~seen].any()
        if row["decision"] == "accept":
            assert not mask.any()  # the map never exceeds the image score


def test_regions_outside_the_crop_are_grey_not_edge_streaks():
    picture = np.full((6, 8, 3), 200, dtype=np.uint8)
    seen = np.zeros((6, 8), dtype=bool)
    seen[1:5, 2:6] = True
    heat = np.zeros_like(picture)
    heat[..., 0] = 255  # red: a strong score colour everywhere, like a repeated crop edge
    greyed = grey_out(heat, picture, seen)
    assert np.array_equal(greyed[seen], heat[seen])
    assert len(np.unique(greyed[~seen])) == 1  # one flat grey from the image, no red left
    assert grey_out(heat, picture, np.ones((6, 8), dtype=bool)) is heat
    # The inspected region is the crop's footprint on the input: a 72 -> 64 crop of a
    # 72 x 72 input leaves 4 pixels on every side.
    region = inspected_region((72, 72), PreprocessingConfig(resize=72, imagesize=64)).numpy()
    assert region[4:68, 4:68].all() and region.sum() == 64 * 64
    assert inspected_region((50, 70), PreprocessingConfig(resize=36, crop="none")).all()


def test_mask_threshold_sets_the_pixel_threshold(models, synthetic_root, tmp_path):
    image = synthetic_root / "texture" / "test" / "good" / "001.png"
    seen = inspected_region((256, 256), models["model"].config.preprocessing).numpy()
    for mask_threshold, expected in (("-1", 255), ("1e9", 0)):
        code, output = predict(
            models["calibrated"], [image], tmp_path / "out.csv", "--masks", tmp_path / "m",
            "--mask_threshold", mask_threshold,
        )  # fmt: skip
        assert code == expected_code(read_rows(tmp_path / "out.csv")), output
        mask = np.asarray(Image.open(tmp_path / "m" / "001.png"))
        assert set(np.unique(mask[seen])) == {expected} and not mask[~seen].any()


def test_outputs_are_named_after_the_given_path_not_a_link_target(
    models, synthetic_root, tmp_path
):
    target = synthetic_root / "texture" / "test" / "good" / "000.png"
    (tmp_path / "line").mkdir()
    link = tmp_path / "line" / "part_17.png"
    link.symlink_to(target)
    code, output = predict(
        models["calibrated"], [link], tmp_path / "out.jsonl", "--heatmaps", tmp_path / "heat",
    )  # fmt: skip
    (record,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert code == (3 if record["decision"] == "reject" else 0), output
    assert record["path"] == str(link)
    assert record["heatmap"] == str(tmp_path / "heat" / "part_17.png") and record["mask"] == ""
    assert [p.name for p in (tmp_path / "heat").iterdir()] == ["part_17.png"]


def test_missing_threshold_is_an_error_naming_both_fixes(models, synthetic_root, tmp_path):
    image = synthetic_root / "texture" / "test" / "good" / "000.png"
    code, output = predict(models["uncalibrated"], [image], tmp_path / "out.csv")
    assert code == 1
    assert "no saved threshold and no --threshold was given; pass --threshold T" in output
    assert "--save_patchcore_model" in output
    assert not (tmp_path / "out.csv").exists()
    code, output = predict(
        models["uncalibrated"], [image], tmp_path / "out.csv", "--threshold", "0.5"
    )
    assert code == expected_code(read_rows(tmp_path / "out.csv")), output


def test_bad_inputs_and_ensembles_are_one_line_errors(models, synthetic_root, tmp_path):
    code, output = predict(models["calibrated"], [tmp_path / "nope" / "*.png"], tmp_path / "o.csv")
    assert code == 1
    assert f"Error: {tmp_path / 'nope' / '*.png'}: no such file or folder" in output
    model = models["model"]
    save_models(tmp_path / "pair", [model, model])
    image = synthetic_root / "texture" / "test" / "good" / "000.png"
    code, output = predict(tmp_path / "pair", [image], tmp_path / "o.csv")
    assert code == 1
    assert "the ensemble has no saved threshold on its combined scale and no --threshold" in output
    code, output = predict(tmp_path / "pair", [image], tmp_path / "o.csv", "--threshold", "0.5")
    assert code == expected_code(read_rows(tmp_path / "o.csv")) and "1 scored" in output
    save_models(tmp_path / "uncalibrated_pair", [models["uncalibrated_model"]] * 2)
    code, output = predict(tmp_path / "uncalibrated_pair", [image], tmp_path / "o.csv")
    assert code == 1 and "an ensemble without normal-image statistics cannot score" in output


def test_output_stems_are_unique_relative_paths(tmp_path):
    paths = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "a b" / "x.png",
             tmp_path / "a_b" / "x.png"]  # fmt: skip
    assert output_stems(paths) == ["a_x", "b_x", "a_b_x", "a_b_x-2"]


def test_results_stream_to_a_temporary_file_and_appear_at_the_end(tmp_path):
    target = tmp_path / "out.csv"
    with streamed_results(target, json_lines=False) as writer:
        writer.write({"path": "p", "score": 1.5, "threshold": 1.0, "decision": "reject",
                      "heatmap": "h/p.png", "mask": "", "error": "", "model_id": "ab12",
                      "model_format": "patchcore-model/3", "inspection": ""})  # fmt: skip
        assert "p,1.5,1.0,reject,h/p.png,,,ab12,patchcore-model/3," in writer.temporary.read_text()
        assert not target.exists()
    assert target.read_text().splitlines() == [
        "path,score,threshold,decision,heatmap,mask,error,model_id,model_format,inspection",
        "p,1.5,1.0,reject,h/p.png,,,ab12,patchcore-model/3,"]  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]
    with pytest.raises(KeyboardInterrupt), streamed_results(tmp_path / "x.csv", False) as writer:
        writer.write({"path": "q", "score": 0.5, "threshold": 1.0, "decision": "accept",
                      "heatmap": "", "mask": "", "error": "", "model_id": "", "model_format": "",
                      "inspection": ""})  # fmt: skip
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_heat_map_colour_scale_centres_the_threshold(models):
    statistics = models["model"].normal_statistics
    low, high = colour_range(2.0, statistics)
    assert low == statistics.pixel_score_min and (low + high) / 2 == pytest.approx(2.0)
    assert colour_range(1.0, None) == (0.0, 2.0)


def test_predict_script_is_a_thin_entry_point(monkeypatch, capsys):
    assert "MODEL [INPUTS]..." in run_script_help("predict_patchcore.py", monkeypatch, capsys)


def test_every_row_names_the_model_by_content_hash_and_format(models, synthetic_root, tmp_path):
    import hashlib

    from patchcore.model.serialization import BACKBONE_STATISTICS_FORMAT_VERSION

    folder = tmp_path / "model"
    shutil.copytree(models["calibrated"], folder)
    image = synthetic_root / "texture" / "test" / "good" / "000.png"
    predict(folder, [image, image.with_name("001.png")], tmp_path / "a.csv")
    rows = read_rows(tmp_path / "a.csv")
    digest = hashlib.sha256()  # independently: names, sizes and contents in name order
    for file in sorted(folder.iterdir()):
        digest.update(f"{file.name}\0{file.stat().st_size}\0".encode() + file.read_bytes())
    assert {row["model_id"] for row in rows} == {digest.hexdigest()[:16]}
    # the reference's backbone statistics (the default) are recorded since version 6
    assert {row["model_format"] for row in rows} == {f"patchcore-model/{BACKBONE_STATISTICS_FORMAT_VERSION}"}
    (folder / "MODEL_CARD.md").write_text("a description is not part of the model")
    predict(folder, [image], tmp_path / "b.csv")
    assert read_rows(tmp_path / "b.csv")[0]["model_id"] == rows[0]["model_id"]
    meta = folder / "patchcore_meta.json"
    meta.write_text(meta.read_text().replace('"num_nn": 1', '"num_nn": 2'))
    predict(folder, [image], tmp_path / "c.csv")
    assert read_rows(tmp_path / "c.csv")[0]["model_id"] != rows[0]["model_id"]


def test_all_accepted_exits_0(models, synthetic_root, tmp_path):
    image = synthetic_root / "texture" / "test" / "good" / "000.png"
    code, output = predict(models["calibrated"], [image], tmp_path / "o.csv", "--threshold", "1e9")
    assert code == 0, output
    assert [row["decision"] for row in read_rows(tmp_path / "o.csv")] == ["accept"]


def test_a_reject_without_a_visible_region_says_why_and_the_peak_is_boxed():
    from patchcore.evaluation.visualization import hidden_reject_note, mark_peak

    smooth = np.full((40, 60), 0.4)
    smooth[10, 45] = 0.9
    assert "smoothed map peaks at 0.9, below the threshold" in hidden_reject_note(True, smooth, 1.0)
    assert hidden_reject_note(False, smooth, 1.0) == ""  # accepted: nothing to explain
    assert hidden_reject_note(True, smooth, 0.5) == ""  # the map shows the region
    image = np.full((40, 60, 3), 128, dtype=np.uint8)
    seen = np.ones((40, 60), dtype=bool)
    seen[:, :5] = False
    marked = mark_peak(image, smooth, seen)
    changed = np.argwhere((marked != image).any(axis=2))
    assert changed.min(axis=0).tolist() == [6, 41] and changed.max(axis=0).tolist() == [14, 49]
    smooth[20, 2] = 5.0  # a larger value outside the inspected region is not the peak
    assert np.array_equal(mark_peak(image, smooth, seen), marked)


def test_inputs_are_required_unless_describing(models, tmp_path):
    code, output = predict(models["calibrated"], [], tmp_path / "o.csv")
    assert code == 2 and "give at least one INPUT" in output


def test_rows_say_when_a_known_defect_lies_outside_the_inspected_region(tmp_path):
    """Test images of the MVTec layout with ground truth: predict's `inspection` column says
    wholly / partly outside the centre crop (the coverage logic of inspection_coverage.csv);
    a defect inside and an image without a mask get an empty cell."""
    from conftest import small_config
    from patchcore.config import SamplerConfig

    category = tmp_path / "part"
    (category / "test" / "crack").mkdir(parents=True)
    (category / "ground_truth" / "crack").mkdir(parents=True)
    cases = {"corner": (slice(0, 6), slice(0, 6)), "edge": (slice(0, 20), slice(30, 50)),
             "centre": (slice(30, 40), slice(30, 40))}  # fmt: skip
    generator = np.random.default_rng(0)
    for name, (rows, columns) in cases.items():
        pixels = generator.integers(0, 256, (80, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(category / "test" / "crack" / f"{name}.png")
        mask = np.zeros((80, 80), dtype=np.uint8)
        mask[rows, columns] = 255
        Image.fromarray(mask).save(category / "ground_truth" / "crack" / f"{name}_mask.png")
    Image.fromarray(generator.integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(
        category / "test" / "crack" / "unlabelled.png"
    )
    # centre crop 64 of 80
    config = small_config(preprocessing=PreprocessingConfig(resize=80, imagesize=64),
                          sampler=SamplerConfig(name="identity"))  # fmt: skip
    model = PatchCore(config)
    model.fit([torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))])
    model.calibrate([torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))])
    save_models(tmp_path / "model", [model])
    code, output = predict(tmp_path / "model", [category / "test" / "crack"], tmp_path / "out.csv")
    assert code in (0, 3), output
    notes = {Path(row["path"]).stem: row["inspection"] for row in read_rows(tmp_path / "out.csv")}
    assert notes == {
        "corner": "defect wholly outside the inspected region (centre crop 64 of 80)",
        "edge": "defect partly outside the inspected region (centre crop 64 of 80)",
        "centre": "",
        "unlabelled": "",
    }
