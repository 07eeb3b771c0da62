"""The PTQ algorithms of quantlab.algorithms on tiny models: CLE, bias correction, percentile."""

import copy

import pytest
import torch
import torch.ao.quantization as tq
from torch import nn

from quantlab import algorithms, models
from quantlab.backend import get_backend
from quantlab.config import DEFAULT_VARIANTS, PTQ_PRESETS, VariantConfig, parse_config
from quantlab.errors import ConfigError

MINMAX = PTQ_PRESETS["ptq-minmax"]


class ConvChain(nn.Module):
    """conv+ReLU -> depthwise conv+ReLU -> pointwise conv, with fuse_model as torchvision's."""

    def __init__(self, spread: float = 100.0):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.dw, self.relu2 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU()
        self.pw = nn.Conv2d(8, 6, 1)
        # Per-channel weight ranges 1x..100x apart, compensated by the next layer, as folded
        # BatchNorm leaves them: the function is ordinary, per-tensor int8 is not.
        factors = spread ** torch.linspace(0, 1, 8)
        with torch.no_grad():
            for conv in (self.conv1, self.dw):
                conv.weight.mul_(factors.view(-1, 1, 1, 1))
                conv.bias.mul_(factors)
            self.dw.weight.div_(factors.view(-1, 1, 1, 1))  # dw reads channel c: undo conv1's
            self.pw.weight.div_(factors.view(1, -1, 1, 1))

    def forward(self, x):
        x = self.relu1(self.conv1(self.quant(x)))
        return self.dequant(self.pw(self.relu2(self.dw(x))))

    def fuse_model(self, is_qat=False):
        fuse = tq.fuse_modules_qat if is_qat else tq.fuse_modules
        fuse(self, [["conv1", "relu1"], ["dw", "relu2"]], inplace=True)


@torch.inference_mode()
def _sqnr(reference: torch.Tensor, y: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).sum() / (reference - y).pow(2).sum()))


def _int8(model: nn.Module, variant: VariantConfig, batches: list) -> tuple[nn.Module, nn.Module]:
    """(fused float model, int8 model) of `variant`, as quantize_ptq builds them."""
    backend = get_backend()
    observed = backend.prepare_ptq(model, variant)
    with torch.inference_mode():
        for x in batches:
            observed(x)
    int8 = backend.convert(observed, variant.engine)
    return model, backend.apply_after_convert(model, int8, variant, batches)


def test_cle_keeps_the_float_function_and_raises_per_tensor_sqnr():
    torch.manual_seed(0)
    model = ConvChain().eval().requires_grad_(False)
    x = torch.rand(16, 3, 12, 12)
    calib = [torch.rand(8, 3, 12, 12) for _ in range(4)]
    reference = model(x)

    fused = models.fuse(copy.deepcopy(model), is_qat=False)
    pairs = algorithms.equalize(fused)
    assert pairs == [("conv1", "dw"), ("dw", "pw")]  # the depthwise conv on both sides
    torch.testing.assert_close(fused(x), reference, atol=1e-5, rtol=1e-5)
    ranges = algorithms._out_ranges(fused.conv1[0])
    assert ranges.max() / ranges.min() < 10  # was 100

    cle = MINMAX.model_copy(update={"name": "cle", "cross_layer_equalization": True})
    _, plain = _int8(copy.deepcopy(model), MINMAX, calib)
    _, equalized = _int8(copy.deepcopy(model), cle, calib)
    before, after = _sqnr(reference, plain(x)), _sqnr(reference, equalized(x))
    assert after > before + 10, (before, after)  # dB


def test_cle_pairs_of_a_quantizable_mobilenet_v2_and_its_float_function():
    torch.manual_seed(0)
    model = models.build("mobilenet_v2", num_classes=3, width_mult=0.25).eval()
    x = torch.randn(2, 3, 32, 32)
    reference = model(x)
    fused = models.fuse(copy.deepcopy(model), is_qat=False)
    pairs = algorithms.equalize(fused)
    assert ("features.2.conv.0.0", "features.2.conv.1.0") in pairs  # expand -> depthwise
    assert ("features.2.conv.1.0", "features.2.conv.2") in pairs    # depthwise -> project
    assert ("features.17.conv.2", "features.18.0") in pairs         # a projection without add
    assert ("features.18.0", "classifier.1") in pairs               # through pooling, dropout
    assert not any(a == "features.3.conv.2" for a, _ in pairs)      # it feeds a residual add
    assert len(pairs) == 35                                         # blocks 1 (dw only), 2-17
    torch.testing.assert_close(fused(x), reference, atol=1e-4, rtol=1e-4)


def test_bias_correction_reduces_a_layers_mean_output_error():
    torch.manual_seed(0)
    model = ConvChain(spread=30.0).eval()
    calib = [torch.rand(8, 3, 12, 12) + 0.5 for _ in range(8)]   # inputs with a mean: E[e x] != 0
    held_out = torch.rand(64, 3, 12, 12) + 0.5
    fused, plain = _int8(copy.deepcopy(model), MINMAX, calib)
    bc = MINMAX.model_copy(update={"name": "bc", "bias_correction": True})
    _, corrected = _int8(copy.deepcopy(model), bc, calib)

    @torch.inference_mode()
    def mean_error(int8):  # per output channel, over images and pixels, then mean |.|
        return float((int8(held_out) - fused(held_out)).mean(dim=(0, 2, 3)).abs().mean())
    before, after = mean_error(plain), mean_error(corrected)
    assert after < 0.5 * before, (before, after)
    # the int8 model still scripts, as every artifact must
    torch.testing.assert_close(torch.jit.script(corrected)(held_out), corrected(held_out))


def test_bias_correction_reports_each_layer_and_needs_batches():
    torch.manual_seed(0)
    model = ConvChain(spread=30.0).eval()
    calib = [(torch.rand(4, 3, 8, 8), torch.zeros(4)) for _ in range(2)]  # (images, labels)
    fused, int8 = _int8(copy.deepcopy(model), MINMAX, [b[0] for b in calib])
    shifts = algorithms.correct_bias(fused, int8, iter(calib))  # a one-shot iterator works too
    assert set(shifts) == {"conv1", "dw", "pw"} and all(s > 0 for s in shifts.values())
    with pytest.raises(ValueError, match="at least one calibration batch"):
        algorithms.correct_bias(fused, int8, [])


def test_percentile_observer_clips_outliers():
    values = torch.cat([torch.randn(100_000), torch.tensor([1000.0])])
    ranges = {}
    for p in (99.9, 100.0):
        obs = algorithms.PercentileObserver(percentile=p)
        obs(values)
        scale, _ = obs.calculate_qparams()
        ranges[p] = float(scale) * 255
    assert ranges[99.9] < 20  # 99.9% of N(0, 1) lies within +-3.3
    assert ranges[100.0] > 1000  # the outlier
    with pytest.raises(ConfigError, match="percentile 40"):
        algorithms.PercentileObserver(percentile=40)


def test_variant_options_presets_and_defaults():
    assert [v.name for v in DEFAULT_VARIANTS] == ["ptq-minmax", "ptq-x86"]
    cfg = parse_config({"model": {"checkpoint": "m.pth"}, "data": {"uri": "d"},
                        "variants": ["ptq-minmax-cle-bc", "ptq-x86-cle-bc", "ptq-x86-percentile"]})
    assert [v.algorithms for v in cfg.variants] == [
        "minmax+cle+bc", "histogram+per-channel+cle+bc", "percentile99.99+per-channel"]
    assert PTQ_PRESETS["ptq-minmax"].algorithms == "minmax"
    default = parse_config({"model": {"checkpoint": "m.pth"}, "data": {"uri": "d"}})
    assert [v.name for v in default.variants] == ["ptq-minmax", "ptq-x86"]
    with pytest.raises(ConfigError, match="activation_percentile"):
        parse_config({"model": {"checkpoint": "m.pth"}, "data": {"uri": "d"},
                      "variants": [{"name": "p", "activation_observer": "percentile",
                                    "activation_percentile": 30}]})
    with pytest.raises(ConfigError, match="valid: minmax, moving_average_minmax, histogram, percentile"):
        parse_config({"model": {"checkpoint": "m.pth"}, "data": {"uri": "d"},
                      "variants": [{"name": "p", "activation_observer": "entropy"}]})


def test_a_cle_bc_preset_quantizes_mobilenet_v2_end_to_end():
    torch.manual_seed(0)
    model = models.build("mobilenet_v2", num_classes=3, width_mult=0.25).eval()
    calib = [torch.randn(2, 3, 16, 16)]
    x = torch.randn(2, 3, 16, 16)
    reference = model(x)
    _, int8 = _int8(copy.deepcopy(model), PTQ_PRESETS["ptq-minmax-cle-bc"], calib)
    scripted = torch.jit.script(int8)
    assert scripted(x).shape == reference.shape
