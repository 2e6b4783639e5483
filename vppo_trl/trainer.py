"""VPPOTrainer: GRPO whose policy gradient is focused on the tokens and trajectories that depend on the image."""

import functools
import os
import textwrap
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import trl
from transformers.utils import logging
from trl import GRPOTrainer
from trl.trainer.utils import get_config_model_id

from .data import check_prompt_lengths
from .longrun.dynamic_sampling import DynamicSamplingMixin
from .longrun.guards import NonFiniteLossGuardMixin
from .longrun.imageless import ImagelessProcessMixin
from .longrun.resume import ExactResumeMixin
from .method.config import VPPOConfig
from .method.core import TOKEN_SUM_LOSS_TYPES, entropy_penalty, token_dependency
from .method.model_card import append_vppo_section
from .method.passes import VisualDependencyPassesMixin
from .method.shaping import ShapingSettings, shape_advantages
from .vllm_support import engine_dropped_weights, refuse_vllm_server_without_cuda, reload_colocated_weights

logger = logging.get_logger(__name__)

# Batch keys of a generation batch whose TGF and TAS wait for the loss's forward pass (see `_defers_original_logps`).
DEFERRED_KEY = "vppo_perturbed_logps"


class VPPOTrainer(
    VisualDependencyPassesMixin,
    DynamicSamplingMixin,
    ExactResumeMixin,
    NonFiniteLossGuardMixin,
    ImagelessProcessMixin,
    GRPOTrainer,
):
    """
    Trainer for Visually-Perceptive Policy Optimization (VPPO).

    VPPO ("Spotlight on Token Perception for Multimodal Reinforcement Learning", https://arxiv.org/abs/2510.09285)
    is GRPO for vision-language models with two changes, both driven by how much each generated token depends on the
    image, measured by scoring the batch a second time on perturbed images:

    - Token-level Gradient Filtering: only the `token_filter_ratio` most image-dependent tokens of each completion
      receive policy gradient.
    - Trajectory-level Advantage Shaping: each completion's advantage is scaled by its mean dependency.

    Both are folded into per-token advantages right after generation, so GRPO's loss, clipping, KL and logging are
    used unchanged. The only other change is the optional entropy penalty added to the loss.

    It takes the same arguments as [`~trl.GRPOTrainer`], with a [`VPPOConfig`].
    """

    _tag_names = ["trl", "grpo", "vppo"]
    _name = "VPPO"
    _paper = {
        "title": "Spotlight on Token Perception for Multimodal Reinforcement Learning",
        "id": "2510.09285",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{huang2026spotlight,
                title        = {{Spotlight on Token Perception for Multimodal Reinforcement Learning}},
                author       = {Siyuan Huang and Xiaoye Qu and Yafu Li and Yun Luo and Zefeng He and Daizong Liu
                                and Yu Cheng},
                booktitle    = {International Conference on Learning Representations},
                year         = 2026,
                eprint       = {arXiv:2510.09285},
            }"""),
    }

    def __init__(self, model, reward_funcs=None, args: VPPOConfig | None = None, **kwargs):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = VPPOConfig(f"{model_name.split('/')[-1]}-VPPO")
        elif not isinstance(args, VPPOConfig):
            raise TypeError(f"args must be a VPPOConfig, got {type(args).__name__}.")
        refuse_vllm_server_without_cuda(args)
        super().__init__(model, reward_funcs, args=args, **kwargs)
        if self.use_vllm and self.vllm_mode == "colocate" and engine_dropped_weights(self.vllm_generation):
            self.vllm_generation.sync_weights = functools.partial(reload_colocated_weights, self.vllm_generation)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        if tokenizer.padding_side != "left":
            # GRPOTrainer left-pads prompts; a right-padding processor would misalign `mm_token_type_ids` with them
            # whenever prompts of one batch differ in length (TRL sets "left" only when it loads the processor).
            logger.info("Setting the processor's padding_side to 'left', as GRPOTrainer's prompt layout requires.")
            tokenizer.padding_side = "left"
        self._loss_forward: LossForward | None = None  # the loss being computed, while `_compute_loss` runs
        self._warned_without_images = False
        if args.spotlight_steps > 0:
            from .tools.spotlight_callback import SpotlightCallback  # the viewer is loaded only when it is asked for

            self.add_callback(SpotlightCallback(self))
        columns = getattr(self.train_dataset, "column_names", None)
        # Whether the data's columns say if it has images; when they do not (an iterable dataset), a batch without
        # images is the only sign. A text-only batch from data with an image column is a mixed dataset's share
        # (or a process given only text prompts), not data without images.
        self._image_columns_unknown = columns is None
        if columns is not None and "images" not in columns and "image" not in columns:
            self._warn_without_images("The training data has no images ('images' or 'image' column)")

    def _training_state(self) -> dict[str, Any]:
        return {**super()._training_state(), "perturbation_round": self.shared.perturbation_round}

    def _restore_training_state(self, state: dict[str, Any]) -> None:
        super()._restore_training_state(state)
        self.shared.perturbation_round = state["perturbation_round"]

    def _warn_without_images(self, what: str) -> None:
        if not self._warned_without_images:
            warnings.warn(
                f"{what}: VPPO has no visual dependency to measure and trains exactly like GRPO on it.",
                stacklevel=3,
            )
            self._warned_without_images = True

    # ------------------------------------------------------------------------------------------------------------
    # Generation: measure visual dependency, fold TGF and TAS into the advantages
    # ------------------------------------------------------------------------------------------------------------

    def _tokenize_prompts(self, prompts: list):
        prompt_ids, images, multimodal_fields = super()._tokenize_prompts(prompts)
        # Some processors (Mistral 3's) return the ids as a tensor, which vLLM cannot take as `prompt_token_ids`.
        prompt_ids = [ids.tolist() if isinstance(ids, torch.Tensor) else ids for ids in prompt_ids]
        # Name a prompt the model's context cannot hold, rather than run past it (RoPE) or fail in the generator.
        check_prompt_lengths(prompts, prompt_ids, self.args.max_completion_length, self.model.config)
        return prompt_ids, images, multimodal_fields

    def _generate(self, prompts: list):
        """
        TRL's generation, with each text-only prompt's images made `[]` for the processor that scores the batch.

        A text-only prompt's images are TRL's `None` while generating: every generation backend expects it (vLLM
        attaches an image to each prompt whose list is not `None`). Only the processor call after generation, which
        rejects `None` in a batch mixing text and images, gets the empty list, here, where generation hands it over.
        """
        *generated, images, tool_images = super()._generate(prompts)
        if images is not None:
            images = [prompt_images or [] for prompt_images in images]
        return *generated, images, tool_images

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor | Any]:
        output = super()._generate_and_score_completions(inputs)
        if self.model.training:
            self._apply_visual_dependency(output)
        return output

    def _apply_visual_dependency(self, batch: dict[str, Any]) -> None:
        """
        Measure token visual dependency on `batch` and rewrite `batch["advantages"]` with TGF and TAS.

        When the loss's own forward pass gives the original-image log-probs (see `_defers_original_logps`), only the
        perturbed pass runs here, and the advantages are rewritten in the loss, right after that forward.
        """
        args = self.args
        self.shared.perturbation_round += 1
        mask = loss_mask(batch)
        advantages = batch["advantages"]
        num_images = batch.get("num_images")
        if num_images is None and self._image_columns_unknown:
            self._warn_without_images(
                "A generation batch of this process has no images, and the data's columns are unknown"
            )
        has_image = torch.tensor([bool(n) for n in (num_images or [0] * len(advantages))], device=advantages.device)
        has_tokens = mask.sum(-1) > 0
        roles = {
            "measured": has_image & has_tokens,
            "shapeable": has_image & has_tokens & (advantages != 0),
            "with_image": has_image & has_tokens,
        }
        if args.skip_zero_advantage:
            roles["measured"] = roles["shapeable"]
        rows = roles["measured"].nonzero().squeeze(-1).tolist()
        run_pass = bool(rows) or self.shared.forward_passes_must_match
        if self._defers_original_logps(batch):
            perturbed_logps = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
            if run_pass:
                perturbed_logps, _ = self._visual_dependency(batch, rows, mask, self._perturbed_token_logps)
            batch[DEFERRED_KEY] = perturbed_logps
            batch.update({f"{DEFERRED_KEY}_{name}": value for name, value in roles.items()})
            return
        # The `entropy` criterion's entropies come from a forward that runs anyway: the original-image pass, or TRL's
        # old-log-prob pass when its log-probs are reused.
        needs_entropies = self.args.token_filter_criterion == "entropy" and self.args.token_filter_ratio < 1.0
        dependency = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        entropies = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device) if needs_entropies else None
        if run_pass:
            dependency, entropies = self._visual_dependency(batch, rows, mask, compute_entropy=needs_entropies)
        self._shape_advantages(batch, dependency, **roles, entropies=entropies)

    def _defers_original_logps(self, batch: dict[str, Any]) -> bool:
        """
        Whether the original-image log-probs can come from the loss's own forward instead of an extra pass.

        True for `k3` in TRL's on-policy configuration (no `old_per_token_logps`) when each generation batch feeds
        exactly one loss call (`steps_per_generation == 1`, `num_iterations == 1`): that forward scores the batch with
        the generating policy, as TRL itself assumes when it uses `per_token_logps.detach()` as the old log-probs.
        Never with dropout: the loss's forward runs in train mode, the perturbed pass in eval mode.
        """
        return (
            self.args.dependency_estimator == "k3"
            and not self.shared.has_dropout
            and "old_per_token_logps" not in batch
            and self.args.steps_per_generation == 1
            and self.num_iterations == 1
        )

    def _shape_advantages(
        self,
        batch: dict[str, Any],
        dependency: torch.Tensor,
        measured: torch.Tensor,
        shapeable: torch.Tensor,
        with_image: torch.Tensor,
        entropies: torch.Tensor | None = None,
    ) -> None:
        """
        Rewrite `batch["advantages"]` with TGF and TAS ([`shape_advantages`], over all processes), show the result to
        the spotlight, log its metrics. `entropies` (original-image policy entropies) serve the `entropy` criterion.
        """
        mask = loss_mask(batch)
        advantages = batch["advantages"]
        generator = None
        if self.args.token_filter_criterion == "random":
            # Own stream, seeded like the perturbation draws; drawn for the whole batch: skipping changes nothing.
            seed = hash((self.args.seed, self.shared.perturbation_round, self.accelerator.process_index, 1)) % (2**63)
            generator = torch.Generator(device=mask.device).manual_seed(seed)
        reduce_sum = functools.partial(self.accelerator.reduce, reduction="sum")
        shaped = shape_advantages(
            ShapingSettings.of(self.args), advantages, dependency, mask, measured, shapeable, with_image,
            entropies=entropies, generator=generator, process_index=self.accelerator.process_index,
            gather=self.accelerator.gather, reduce_sum=reduce_sum,
        )  # fmt: skip
        batch["advantages"] = shaped.advantages
        if self.shared.spotlight_capture is not None:
            self.shared.spotlight_capture(batch, dependency, mask, shaped.keep, measured, shaped.scales, advantages)
        for name, value in shaped.metrics().items():
            self._metrics["train"][name].append(value)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card (base model, dataset, trainer, citations), plus a section with the run's VPPO settings."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if self.is_world_process_zero():
            base_model = get_config_model_id(self.accelerator.unwrap_model(self.model).config)
            append_vppo_section(os.path.join(self.args.output_dir, "README.md"), self.args, base_model)

    # ------------------------------------------------------------------------------------------------------------
    # Loss: GRPO's, plus the entropy penalty on the current policy's log-probs
    # ------------------------------------------------------------------------------------------------------------

    def _get_per_token_logps_and_entropies(self, model, input_ids, *args, **kwargs):
        loss_forward = self._loss_forward
        if loss_forward is None:  # not inside `_compute_loss`: generation, scoring, VPPO's own passes
            return super()._get_per_token_logps_and_entropies(model, input_ids, *args, **kwargs)
        loss_forward.check(model, input_ids)
        logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(model, input_ids, *args, **kwargs)
        loss_forward.logps = logps
        if DEFERRED_KEY in loss_forward.inputs:
            # GRPO reads the advantages only after this forward, so the deferred TGF and TAS land in time. Its
            # entropies serve the `entropy` criterion without an extra pass.
            inputs = loss_forward.inputs
            roles = {name: inputs.pop(f"{DEFERRED_KEY}_{name}") for name in ("measured", "shapeable", "with_image")}
            measured_mask = loss_mask(inputs) * roles["measured"].unsqueeze(-1)
            dependency = token_dependency(logps.detach(), inputs.pop(DEFERRED_KEY), measured_mask)
            self._shape_advantages(inputs, dependency, **roles, entropies=entropies)
        return logps, entropies, aux_loss

    def _compute_loss(self, model, inputs):
        loss_forward = self._loss_forward = LossForward(model, inputs, torch.is_grad_enabled())
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._loss_forward = None
        policy_logps = loss_forward.logps
        if policy_logps is None:
            raise RuntimeError(call_order_message("it computed the loss without a forward pass of the policy"))
        if self.args.entropy_penalty_coef == 0.0:
            return loss
        mask = loss_mask(inputs)
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        # Normalised like GRPO's loss for this loss_type (TRL's `_compute_loss`): the token-sum types divide by the
        # accumulated batch's token count, the others are per micro-batch and divided by the accumulation steps.
        if self.loss_type in TOKEN_SUM_LOSS_TYPES:
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            normalizer = normalizer * accumulation / (self.args.steps_per_generation if mode == "train" else 1)
            penalty = entropy_penalty(policy_logps, mask, self.loss_type, normalizer)
        else:
            penalty = entropy_penalty(policy_logps, mask, self.loss_type, self.max_completion_length) / accumulation
        token_mean = entropy_penalty(policy_logps.detach(), mask)  # logged: mean -log p per token of this batch
        self._metrics[mode]["vppo/entropy_penalty"].append(self.accelerator.gather(token_mean).mean().item())
        return loss + self.args.entropy_penalty_coef * penalty


@dataclass
class LossForward:
    """
    The loss `_compute_loss` is computing, while it runs, and the log-probs of its own forward pass once it ran.

    VPPO recognises that forward by what it is given, not by its place among the calls: the same model as the loss,
    the batch's own prompt and completion tokens, gradient on exactly when the loss has it. Its log-probs are the
    original-image pass of the deferred TGF and TAS, and the entropy penalty's.
    """

    model: Any
    inputs: dict[str, Any]
    grad_enabled: bool
    logps: torch.Tensor | None = None

    def check(self, model, input_ids: torch.Tensor) -> None:
        """Raise an error naming what changed unless this forward is the loss's own, and the first one."""
        prompt_ids, completion_ids = self.inputs["prompt_ids"], self.inputs["completion_ids"]
        tokens = prompt_ids.size(1) + completion_ids.size(1)
        same_tokens = input_ids.shape == (prompt_ids.size(0), tokens) and torch.equal(
            input_ids, torch.cat([prompt_ids, completion_ids], dim=1).to(input_ids.device)
        )
        if self.logps is not None:
            problem = "it ran a second forward pass after the loss's own"
        elif model is not self.model:
            problem = f"it ran a forward pass of another model ({type(model).__name__}) before the loss's own"
        elif not same_tokens:
            problem = (
                f"it ran a forward pass on other tokens (input_ids {list(input_ids.shape)}) than the batch's prompt "
                f"and completion ({[prompt_ids.size(0), tokens]}) before the loss's own"
            )
        elif torch.is_grad_enabled() != self.grad_enabled:
            mode = "on" if torch.is_grad_enabled() else "off"
            problem = f"it ran a forward pass with gradient {mode} before the loss's own"
        else:
            return
        raise RuntimeError(call_order_message(problem))


def call_order_message(problem: str) -> str:
    return (
        f"GRPOTrainer._compute_loss of the installed trl {trl.__version__} does not run the one forward pass VPPO "
        f"expects, the policy's own on the batch's prompt and completion (as trl 1.16 does): {problem}. VPPOTrainer "
        "reads that forward's log-probs for its deferred TGF and TAS and for its entropy penalty, and stops rather "
        "than use the wrong ones. Install a trl this vppo-trl supports (setup.cfg: trl>=1.16,<1.17)."
    )


def loss_mask(batch: dict[str, Any]) -> torch.Tensor:
    """The tokens GRPO's loss counts: completion tokens, less tool outputs in multi-turn rollouts."""
    return batch["completion_mask"] if "tool_mask" not in batch else batch["completion_mask"] * batch["tool_mask"]
