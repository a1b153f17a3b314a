import pytest
import torch

from patchcore.evaluation.ensemble import combine_members
from patchcore.errors import ConfigurationError
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
