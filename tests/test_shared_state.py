"""VPPOTrainer's mixins: their shared state has one home, and a class that orders them wrongly fails when defined."""

import pytest
from trl import GRPOTrainer

from vppo_trl import VPPOConfig, VPPOTrainer
from vppo_trl.longrun.dynamic_sampling import DynamicSamplingMixin
from vppo_trl.longrun.resume import ExactResumeMixin
from vppo_trl.method.passes import VisualDependencyPassesMixin
from vppo_trl.method.perturbations import PixelLayout
from vppo_trl.method.shared_state import SharedState, SharedStateMixin
from vppo_trl.testing import COLOURS, build_tiny_vlm, colour_reward, make_colour_dataset


def test_a_mixin_order_that_breaks_a_dependency_is_refused_with_the_reason():
    with pytest.raises(TypeError) as error:

        class ResumeFirst(ExactResumeMixin, DynamicSamplingMixin, GRPOTrainer):
            pass

    message = str(error.value)
    assert "ResumeFirst: DynamicSamplingMixin must come before ExactResumeMixin" in message
    assert "_training_state" in message

    with pytest.raises(TypeError, match="VisualDependencyPassesMixin must come before DynamicSamplingMixin"):

        class SamplingFirst(DynamicSamplingMixin, VisualDependencyPassesMixin, GRPOTrainer):
            pass


def test_a_mixin_after_grpo_trainer_is_refused():
    with pytest.raises(TypeError, match=r"^GrpoFirst: DynamicSamplingMixin must come before GRPOTrainer"):

        class GrpoFirst(GRPOTrainer, DynamicSamplingMixin):
            pass


def test_subclassing_vppo_trainer_keeps_its_order():
    class MyTrainer(VPPOTrainer):
        pass

    names = [klass.__name__ for klass in MyTrainer.__mro__]
    assert names.index("SharedStateMixin") == names.index("GRPOTrainer") - 1  # below every mixin, above GRPO


def test_the_trainer_keeps_shared_facts_in_one_place(tmp_path):
    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS)
    args = VPPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=4,
        report_to="none",
        use_cpu=True,
    )
    trainer = VPPOTrainer(
        model=model,
        reward_funcs=colour_reward,
        args=args,
        train_dataset=make_colour_dataset(8),
        processing_class=processor,
    )
    assert isinstance(trainer.shared, SharedState)
    assert isinstance(trainer.shared.pixel_layout, PixelLayout)
    assert trainer.shared.forward_passes_must_match is False  # one process
    assert trainer.shared.has_dropout is False and trainer.shared.perturbation_round == 0
    # The facts are not kept a second time as attributes of the trainer.
    for stale in ("pixel_layout", "_perturbation_round", "_has_dropout", "_resumed_state", "spotlight_capture"):
        assert not hasattr(trainer, stale), stale
    assert all(issubclass(klass, SharedStateMixin) for klass in VPPOTrainer.__bases__[:-1])
