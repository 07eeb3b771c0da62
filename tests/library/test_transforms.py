"""data.build_transform: the padding a TransformConfig asks for, before the crops and flips."""

import pytest
import torch
from PIL import Image

from quantlab import data
from quantlab.config import TransformConfig, parse_config
from quantlab.errors import ConfigError

WHITE_28 = Image.new("RGB", (28, 28), (255, 255, 255))
# No normalization and no random crop, so that the output is the padded image itself.
PLAIN = dict(input_size=32, resize_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
             train_crop_scale=(1.0, 1.0), hflip=False)


@pytest.mark.parametrize("train", [False, True])
def test_pad_adds_a_black_border_instead_of_resizing(train):
    out = data.build_transform(TransformConfig(pad=2, **PLAIN), train=train)(WHITE_28)
    assert out.shape == (3, 32, 32)
    assert torch.all(out[:, 2:30, 2:30] == 1.0)             # the 28x28 image, unscaled
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.all(out[:, border] == 0.0)                 # 2 zero pixels on each side


def test_no_pad_by_default_resizes_the_whole_image():
    out = data.build_transform(TransformConfig(**PLAIN), train=False)(WHITE_28)
    assert out.shape == (3, 32, 32) and torch.all(out == 1.0)


def test_negative_pad_is_a_config_error():
    with pytest.raises(ConfigError, match="data.transforms.pad"):
        parse_config({"model": {"checkpoint": "float.pth"},
                      "data": {"uri": "data/", "transforms": {"pad": -1}}})
