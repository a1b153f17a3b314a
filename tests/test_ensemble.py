import pytest
import torch

from patchcore.errors import ConfigurationError
from patchcore.evaluation.ensemble import combine_members, combine_predictions
from patchcore.model.calibration import NormalStatistics
from patchcore.model.scoring import Prediction


def prediction(scores, maps):
    scores = torch.tensor(scores, dtype=torch.float32)
    return Prediction(scores, torch.tensor(maps, dtype=torch.float32), torch.zeros(len(scores)))


def test_single_member_is_unchanged():
    member = prediction([1.0, 5.0], [[[1.0]], [[2.0]]])
    scores, maps = combine_members([member])
    assert torch.equal(scores, member.scores) and torch.equal(maps, member.maps)


def test_test_minmax_normalises_each_member_over_the_test_set_then_averages():
    first = prediction([2.0, 4.0, 6.0], [[[0.0, 1.0]], [[2.0, 3.0]], [[4.0, 8.0]]])
    second = prediction([10.0, 30.0, 20.0], [[[5.0, 5.0]], [[6.0, 7.0]], [[5.0, 9.0]]])
    scores, maps = combine_members([first, second], "test_minmax")
    torch.testing.assert_close(scores, torch.tensor([0.0, 0.75, 0.75]))
    torch.testing.assert_close(maps[2, 0], torch.tensor([(0.5 + 0.0) / 2, (1.0 + 1.0) / 2]))


def test_normal_stats_use_the_fit_time_statistics_not_the_test_set():
    first = prediction([2.0, 4.0], [[[1.0]], [[3.0]]])
    second = prediction([10.0, 30.0], [[[5.0]], [[7.0]]])
    stats = [
        NormalStatistics(0.0, 4.0, 0.0, 2.0, 4.0, 0.99, 10),
        NormalStatistics(10.0, 20.0, 5.0, 6.0, 20.0, 0.99, 10),
    ]
    scores, maps = combine_members([first, second], "normal_stats", stats)
    torch.testing.assert_close(scores, torch.tensor([(0.5 + 0.0) / 2, (1.0 + 2.0) / 2]))
    torch.testing.assert_close(maps[:, 0, 0], torch.tensor([(0.5 + 0.0) / 2, (1.5 + 2.0) / 2]))


def test_normal_stats_without_statistics_and_unknown_mode_are_errors():
    members = [prediction([1.0], [[[1.0]]]), prediction([2.0], [[[2.0]]])]
    with pytest.raises(ConfigurationError, match="member 1 has no normal-data statistics"):
        combine_members(members, "normal_stats", [None, None])
    with pytest.raises(ConfigurationError, match="must be one of"):
        combine_members(members, "zscore")


def test_patch_scores_are_combined_on_the_image_scores_scale():
    first = Prediction(torch.tensor([2.0, 4.0]), torch.zeros(2, 2, 2),
                       torch.tensor([[[1.0, 2.0], [0.0, 0.0]], [[4.0, 3.0], [0.0, 1.0]]]))
    second = Prediction(torch.tensor([10.0, 30.0]), torch.zeros(2, 2, 2),
                        torch.tensor([[[10.0, 5.0], [5.0, 5.0]], [[20.0, 30.0], [5.0, 5.0]]]))
    combined = combine_predictions([first, second], "test_minmax")
    # Member ranges: scores 2..4 and 10..30; a patch is normalised like its image's score.
    expected_first_image = ((torch.tensor([[1.0, 2.0], [0.0, 0.0]]) - 2) / 2
                            + (torch.tensor([[10.0, 5.0], [5.0, 5.0]]) - 10) / 20) / 2
    torch.testing.assert_close(combined.patch_scores[0], expected_first_image)
    # Each member's highest patch normalises to its normalised image score.
    torch.testing.assert_close(combined.scores, torch.tensor([0.0, 1.0]))
    assert combine_predictions([first]) is first
    coarse = Prediction(second.scores, second.maps, second.patch_scores[:, :1, :1])
    assert combine_predictions([first, coarse], "test_minmax").patch_scores.shape == (2, 2, 2)
