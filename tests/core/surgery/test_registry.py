"""The surgery registry: per source, its surgery, its replay and its pre-flight check; options only where taken."""


import pytest
from torch import nn

from lightning_worm import (
    AttentionHeadSource,
    AttentionQKSource,
    BatchNormSource,
    EarlyBirdCallback,
    LayerNormSource,
    PruneAndFinetune,
    ScoreSource,
)
from lightning_worm.core.surgery import (
    LAYERNORM_REFUSAL,
    Surgery,
    check_prunable,
    prune_channels,
    prune_elementwise,
    prune_heads,
    register_surgery,
    surgery_for,
)
from tests.helpers import tiny_loader, trainer
from tests.models import TinyNet


@pytest.mark.parametrize(("source", "kind", "prune", "options"), [
    (BatchNormSource(), "channels", prune_channels,
         ("coupling", "round_to", "measure_latency", "latency_repeats", "check")),
    (AttentionHeadSource(), "heads", prune_heads, ("round_to", "measure_latency", "latency_repeats", "check")),
    (AttentionQKSource(), "elementwise", prune_elementwise, ("measure_latency", "latency_repeats")),
])
def test_each_library_source_has_its_surgery_and_only_its_options(source, kind, prune, options):
    surgery = surgery_for(source)
    assert (surgery.kind, surgery.prune, surgery.options) == (kind, prune, options)


def test_a_subclass_finds_its_bases_surgery_and_an_unknown_source_has_none():
    class Effective(BatchNormSource):
        pass

    class Weights(ScoreSource):
        pass

    assert surgery_for(Effective()) is surgery_for(BatchNormSource())
    with pytest.raises(ValueError, match="cannot remove the units of Weights: it has no surgery.*register_surgery"):
        surgery_for(Weights())
    with pytest.raises(ValueError) as refused:
        check_prunable(TinyNet(), LayerNormSource())
    assert str(refused.value) == LAYERNORM_REFUSAL


def test_registering_checks_what_it_is_given():
    class Weights(ScoreSource):
        pass

    with pytest.raises(ValueError, match="ScoreSource subclass"):
        register_surgery(nn.Linear, "no")
    with pytest.raises(ValueError, match="kind 'channels' is registered by another surgery"):
        register_surgery(Weights, Surgery("channels", prune=prune_heads, replay=lambda model, plan: {}))
    with pytest.raises(ValueError, match="a Surgery or a refusal"):
        register_surgery(Weights, 3)
    register_surgery(Weights, "Weights are single weights: nothing to remove.")
    with pytest.raises(ValueError, match="nothing to remove"):
        surgery_for(Weights())


def test_the_head_surgery_refuses_round_to_true():
    with pytest.raises(ValueError, match="`round_to` must be None or an integer >= 1, got True"):
        prune_heads(nn.Module(), {}, round_to=True)


@pytest.mark.parametrize(("options", "match"), [
    ({"coupling": "all"}, r"PruneAndFinetune\(coupling='all'\) does not apply to AttentionHeadSource.*\['round_to'"),
    ({"coupling": "mean_rank", "round_to": 2}, r"coupling='mean_rank'\) does not apply"),
])
def test_prune_and_finetune_refuses_an_option_its_surgery_does_not_take(options, match):
    from tests.models import tiny_vit

    eb = EarlyBirdCallback(prune_ratio=0.5, source=AttentionHeadSource())
    t = trainer(callbacks=[eb, PruneAndFinetune(eb, **options, wait_for="ticket")], max_epochs=1)
    with pytest.raises(ValueError, match=match):
        t.fit(tiny_vit(), tiny_loader())


def test_layernorm_prune_is_refused_with_what_to_use_instead():
    with pytest.raises(ValueError, match="AttentionHeadSource") as error:
        surgery_for(LayerNormSource())
    assert str(error.value) == LAYERNORM_REFUSAL
