"""Decision plots: curves checked against scikit-learn, files written with the threshold."""

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import precision_recall_curve, roc_curve

from patchcore.evaluation.plots import pr_points, roc_points, save_decision_plots


@pytest.fixture
def scores_and_labels():
    generator = np.random.default_rng(4)
    labels = np.r_[np.zeros(40, dtype=bool), np.ones(25, dtype=bool)]
    scores = generator.normal(size=65) + 1.2 * labels
    scores[[3, 50]] = scores[10]  # ties between a good and a defective image
    return scores, labels


def test_curves_equal_sklearns(scores_and_labels):
    scores, labels = scores_and_labels
    fpr, tpr = roc_points(scores, labels)
    expected_fpr, expected_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, expected_fpr)
    np.testing.assert_allclose(tpr, expected_tpr)
    recall, precision = pr_points(scores, labels)
    expected_precision, expected_recall, _ = precision_recall_curve(labels, scores)
    # sklearn: lowest score first, ending with the (recall 0, precision 1) point
    np.testing.assert_allclose(recall, expected_recall[:-1][::-1])
    np.testing.assert_allclose(precision, expected_precision[:-1][::-1])


def test_plots_are_written_as_pngs(scores_and_labels, tmp_path):
    scores, labels = scores_and_labels
    written = save_decision_plots(tmp_path / "plots", "mvtec_x", scores, labels, 0.8)
    assert [path.name for path in written] == ["mvtec_x_roc.png", "mvtec_x_pr.png",
                                               "mvtec_x_scores.png"]  # fmt: skip
    for path in written:
        image = np.asarray(Image.open(path).convert("RGB")).astype(int)
        assert image.shape[0] > 200 and image.shape[1] > 300
        red = (image[..., 0] > 180) & (image[..., 1] < 80) & (image[..., 2] < 80)
        dark = image.sum(axis=2) < 100
        if path.name.endswith("_scores.png"):  # the threshold: a dashed vertical line
            unmarked = save_decision_plots(tmp_path / "unmarked", "mvtec_x", scores, labels, None)
            plain = np.asarray(Image.open(unmarked[-1]).convert("RGB")).astype(int)
            assert dark.sum() > (plain.sum(axis=2) < 100).sum() + 50
        else:
            assert red.any()  # the threshold's point
    good_only = save_decision_plots(tmp_path / "good", "g", scores[~labels], labels[~labels], None)
    assert [path.name for path in good_only] == ["g_scores.png"]
