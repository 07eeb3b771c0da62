"""Architectures by name, safe checkpoint loading, and errors that name the mismatch."""

import io
import os

import pytest
import torch

from quantlab import models
from quantlab.errors import CheckpointError


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_large", "resnet18", "resnet50",
                                  "shufflenet_v2_x1_0"])
def test_architecture_builds_fuses_and_runs(name):
    model = models.build(name, num_classes=7).eval()
    models.fuse(model, is_qat=False)
    with torch.inference_mode():
        out = model(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 7)


def test_unknown_architecture_lists_valid_ones():
    with pytest.raises(CheckpointError, match="unknown model 'vgg'; valid: mobilenet_v2, mobilenet_v3_large"):
        models.build("vgg", 10)


def _save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_state_dict_round_trip_and_the_checkpoint_shapes_people_save(tmp_path):
    src = models.build("mobilenet_v2", 3, width_mult=0.25)
    wrapped = {f"module.{k}": v for k, v in src.state_dict().items()}  # nn.DataParallel / DDP
    for payload, layout in [
            (src.state_dict(), "a state_dict"),
            ({"model": src.state_dict(), "epoch": 3}, "the 'model' entry of a training checkpoint"),
            ({"state_dict": src.state_dict(), "epoch": 3},
             "the 'state_dict' entry of a training checkpoint"),
            (wrapped, "a state_dict of an nn.DataParallel/DDP model ('module.' prefix stripped)"),
            ({"state_dict": wrapped}, "the 'state_dict' entry of a training checkpoint of an "
             "nn.DataParallel/DDP model ('module.' prefix stripped)")]:
        path = tmp_path / "ckpt.pth"
        path.write_bytes(_save(payload))
        loaded, found = models.load_float_checkpoint("mobilenet_v2", 3, str(path), width_mult=0.25)
        assert torch.equal(loaded.features[0][0].weight, src.features[0][0].weight)
        assert found == layout


def test_other_dicts_are_refused_naming_their_keys():
    with pytest.raises(CheckpointError, match="found a dict with keys 'weights', 'epoch'"):
        models.read_state_dict(_save({"weights": [1, 2], "epoch": 3}), "odd.pth")


def test_a_whole_pickled_model_gets_one_short_line_with_the_fix():
    with pytest.raises(CheckpointError) as e:
        models.read_state_dict(_save(models.build("resnet18", 3)), "model.pth")
    msg = str(e.value)
    assert "is a whole pickled model" in msg and "torch.save(model.state_dict(), path)" in msg
    assert "\n" not in msg and "\x1b" not in msg and "weights_only=False" not in msg
    assert len(msg) < 250


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_refused_by_weights_only_is_never_loaded_unsafely():
    with pytest.raises(CheckpointError, match=r"refused by torch.load\(weights_only=True\)"):
        models.read_state_dict(_save({"model": Evil()}), "evil.pth")


def test_not_a_torch_file():
    with pytest.raises(CheckpointError, match="is not a torch file"):
        models.read_state_dict(b"hello, I am text", "notes.txt")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        models.load_float_model("mobilenet_v2", 3, str(tmp_path / "nope.pth"))


def test_num_classes_mismatch_is_named():
    data = _save(models.build("mobilenet_v2", 1000, width_mult=0.25).state_dict())
    with pytest.raises(CheckpointError, match="has 1000 classes but the dataset has 10"):
        models.load_float_weights(models.build("mobilenet_v2", 10, width_mult=0.25), data,
                                  "float.pth", "mobilenet_v2")


def test_architecture_mismatch_names_keys():
    data = _save(models.build("resnet18", 10).state_dict())
    with pytest.raises(CheckpointError) as e:
        models.load_float_weights(models.build("mobilenet_v2", 10), data, "r18.pth", "mobilenet_v2")
    msg = str(e.value)
    assert "does not fit mobilenet_v2" in msg and "missing keys (e.g. features.0.0.weight" in msg
    assert "unexpected keys (e.g. conv1.weight" in msg
