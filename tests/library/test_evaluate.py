"""Accuracy as the tutorial computes it; top-5 only where it means something."""

import torch

from quantlab import report
from quantlab.evaluate import evaluate
from quantlab.registry import ResultRow


class Logits(torch.nn.Module):
    """Returns fixed logits per image index (the image is its index)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[x.long().flatten()]


def test_top1_top5_and_no_top5_with_five_classes_or_fewer():
    target = torch.tensor([0, 1, 2, 3])
    ten = torch.eye(10)[[0, 2, 2, 9]] + torch.linspace(0, 0.5, 10)  # top-1 right for 0 and 2
    result = evaluate(Logits(ten), [(torch.arange(4.0), target)])
    assert result.top1 == 50.0 and result.top5 is not None and result.top5 >= 50.0
    three = torch.eye(3)[[0, 1, 1, 2]]
    small = evaluate(Logits(three), [(torch.arange(4.0), target.clamp(max=2))])
    assert small.top5 is None
    row = ResultRow(variant="ptq", method="ptq", top1=small.top1, top5=small.top5, size_bytes=1,
                    latency_ms=None, speedup=None)
    assert report.table_rows([row], None)[0]["top-5 %"] == "-"
