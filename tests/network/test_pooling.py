import pytest
import torch

from cnncodes.network import Pooling, parse_poolings


def test_parse_keeps_order_and_drops_repeats():
    assert [p.name for p in parse_poolings("avg, max4,avg,none")] == ["avg", "max4", "none"]


@pytest.mark.parametrize("bad", ["median", "avg0", "", "avgx", "cls2"])
def test_parse_rejects_unknown_names_with_the_accepted_forms(bad):
    with pytest.raises(ValueError, match="avgK"):
        parse_poolings(bad)


def test_grid_pooling_matches_quadrant_means():
    x = torch.randn(2, 3, 4, 4)
    code = Pooling("avg", 2)(x)
    assert code.shape == (2, 12)
    manual = x.reshape(2, 3, 2, 2, 2, 2).mean((3, 5)).flatten(1)
    torch.testing.assert_close(code, manual)
    assert Pooling("avg", 2).dims((3, 4, 4)) == 12


def test_global_and_flat_pooling_dims_match_outputs():
    x = torch.randn(2, 5, 3, 7)
    for p in parse_poolings("avg,max,avg3,none"):
        assert p(x).shape == (2, p.dims((5, 3, 7)))
    torch.testing.assert_close(Pooling("max")(x), x.amax((2, 3)))
