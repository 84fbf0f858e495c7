"""Issue 30: whether LayerNorm outputs are sites, by the refit that runs (the held-out rule) or as asked."""

import pytest
import zoo

from asr_onnx.pipeline.driver import repair
from asr_onnx.pipeline.recipe import Recipe, layernorm_default


@pytest.mark.parametrize("pattern, reconstruct, asked, sites", [
    ("global", "none", None, True), ("uniform", "none", None, True), ("global", "ls", None, False),
    ("2:4", "none", None, False), ("global", "ls", True, True), ("2:4", "none", True, True),
    ("global", "none", False, False)])
def test_layernorm_sites_follow_the_rule_unless_asked(pattern, reconstruct, asked, sites):
    """Statistics only after unstructured pruning, LayerNorms are sites by default; after the refit or 2:4 they
    are not (held-out: they bought nothing there); ``layernorm`` overrides either way, and the report's settings
    say which ran."""
    model, feeds = zoo.linear_layernorm()
    job = repair(model, zoo.DictSet(feeds), sparsity=0.6, pattern=pattern, batch_size=48, device="cpu",
                 progress=False, reconstruct=reconstruct, layernorm=asked)
    found = [s.key for s in job.measurement.sites if s.ln is not None]
    assert bool(found) is sites and job.settings["layernorm"] is sites and job.recipe.layernorm is sites
    assert [job.written[key] for key in found] == ["layernorm"] * len(found)
    assert asked is not None or layernorm_default(reconstruct, pattern) is sites
    assert Recipe(layernorm=asked).layernorm_for(reconstruct, pattern) is sites
