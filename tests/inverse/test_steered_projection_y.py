"""steered(mode="projection") without y: one clear GuidelabError (was torch's "Could not infer dtype of NoneType")."""

import pytest
from inverse_worlds import SIGMAS

from guidelab.errors import GuidelabError
from guidelab.inverse import steered


def test_projection_without_y_is_one_clear_error(mask_task):
    x, _ = mask_task.start(4)
    with pytest.raises(GuidelabError, match=r"steered mode='projection' needs y"):
        steered(mask_task.prior, x, SIGMAS, mask_task.op, mode="projection")


def test_gradient_without_operator_or_y_is_refused(mask_task):
    x, _ = mask_task.start(4)
    for kwargs in ({"operator": mask_task.op}, {"y": mask_task.y}):
        with pytest.raises(GuidelabError, match="needs an operator and y, or a loss"):
            steered(mask_task.prior, x, SIGMAS, **kwargs)
