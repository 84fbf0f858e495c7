"""The summary's channels lines on a transformer (issue 30): a LayerNorm gives the residual stream and its own
output one reason, so the summary counts alike groups instead of repeating them."""

import onnx
from paths import SAMPLES

from asr_onnx.prune import channels
from asr_onnx.report.build import _channel_lines
from asr_onnx.report.schema import Channels, Group


def test_alike_whole_groups_are_counted_and_the_rest_pointed_to_the_report():
    model = onnx.load(SAMPLES / "vit.onnx")
    plan = channels.plan(model, sparsity=0.5)
    entry = channels.summary(plan, model, model)
    lines = _channel_lines(Channels(groups=tuple(Group(**g) for g in entry["groups"]), score=entry["score"],
                                    params=tuple(entry["params"]), macs=tuple(entry["macs"])))
    assert lines[0].startswith("channels: 396 of 1,698 removed in 12 prunable groups (score magnitude)")
    whole = [line for line in lines if line.startswith("  whole: ")]
    assert whole[0].startswith("  whole: 2 x layernorm group of 64 (LayerNorm LayerNormalization "
                               "/blocks/blocks.0/norm1/LayerNormalization normalises over these channels")
    assert len(whole) == 5 and len(set(whole)) == 5
    assert lines[-1] == "  ... 9 more whole groups: the report gives each one's reason"
