"""VPPOTrainer: GRPO whose policy gradient is focused on the tokens and trajectories that depend on the image."""

import contextlib
import os
import textwrap
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from transformers.utils import logging
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import get_config_model_id, maybe_gather_lm_head_ctx

from .batch_rows import model_inputs, select_rows
from .checkpoints import ExactResumeMixin
from .config import VPPOConfig
from .core import (
    TOKEN_SUM_LOSS_TYPES,
    advantage_scales,
    entropy_penalty,
    kl_token_dependency,
    random_token_mask,
    token_dependency,
    top_dependency_mask,
    top_entropy_mask,
    trajectory_dependency,
)
from .data import check_prompt_lengths
from .dynamic_sampling import DynamicSamplingMixin
from .guards import NonFiniteLossGuardMixin
from .model_card import append_vppo_section
from .perturbations import PixelLayout, perturb_original_images, perturb_pixel_values
from .spotlight_callback import SpotlightCallback, capture_spotlight
from .vision_sync import ImagelessProcessMixin

logger = logging.get_logger(__name__)

# Batch keys of a generation batch whose TGF and TAS wait for the loss's forward pass (see `_defers_original_logps`).
DEFERRED_KEY = "vppo_perturbed_logps"
# Batch key of each completion's images as the data delivered them (perturbation_space="original_image").
IMAGES_KEY = "vppo_images"
# Image layouts the perturbation cannot rebuild (tiled or position-indexed pixels).
UNSUPPORTED_PIXEL_KEYS = ("spatial_shapes", "num_tiles", "image_position_ids")
# Logits (rows x positions x vocabulary) per chunk when the `kl` estimator projects hidden states onto the
# vocabulary: 2**25 float32 values are 128 MiB per temporary, whatever the batch, length and vocabulary.
KL_LOGITS_PER_CHUNK = 2**25


class VPPOTrainer(DynamicSamplingMixin, ExactResumeMixin, NonFiniteLossGuardMixin, ImagelessProcessMixin, GRPOTrainer):
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
        super().__init__(model, reward_funcs, args=args, **kwargs)
        self._check_vision_model()
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        if tokenizer.padding_side != "left":
            # GRPOTrainer left-pads prompts; a right-padding processor would misalign `mm_token_type_ids` with them
            # whenever prompts of one batch differ in length (TRL sets "left" only when it loads the processor).
            logger.info("Setting the processor's padding_side to 'left', as GRPOTrainer's prompt layout requires.")
            tokenizer.padding_side = "left"
        self.pixel_layout = PixelLayout.from_image_processor(self.processing_class.image_processor)
        self._perturbation_round = 0
        self._loss_inputs: dict[str, Any] | None = None  # the inputs of the loss being computed
        self._policy_logps: torch.Tensor | None = None
        self._warned_without_images = False
        self._warned_image_mismatch = False
        # With dropout, train-mode forwards are random: VPPO scores in eval mode and cannot reuse train-mode log-probs.
        self._has_dropout = has_dropout(self.model)
        # Set by SpotlightCallback on the steps it writes: keep what `_shape_advantages` measured in `spotlight_batch`.
        self.spotlight_capture = False
        self.spotlight_batch = None
        if args.spotlight_steps > 0:
            self.add_callback(SpotlightCallback(self))
        columns = getattr(self.train_dataset, "column_names", None)
        if columns is not None and "images" not in columns and "image" not in columns:
            self._warn_without_images()

    def _training_state(self) -> dict[str, Any]:
        return {**super()._training_state(), "perturbation_round": self._perturbation_round}

    def _restore_training_state(self, state: dict[str, Any]) -> None:
        super()._restore_training_state(state)
        self._perturbation_round = state["perturbation_round"]

    def _check_vision_model(self) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if is_peft_model(model):
            model = model.get_base_model()
        if getattr(model.config, "vision_config", None) is None:
            raise ValueError(
                f"VPPOTrainer needs a vision-language model, but {type(model).__name__} "
                f"({get_config_model_id(model.config)}) has no vision tower (its config has no `vision_config`)."
            )
        if getattr(self.processing_class, "image_processor", None) is None:
            raise ValueError(
                f"VPPOTrainer needs a processor with an image processor to perturb images, got "
                f"{type(self.processing_class).__name__}. Pass the model's processor as `processing_class`."
            )

    def _warn_without_images(self) -> None:
        if not self._warned_without_images:
            warnings.warn(
                "The training data has no images ('images' or 'image' column): VPPO has no visual dependency to "
                "measure and trains exactly like GRPO.",
                stacklevel=3,
            )
            self._warned_without_images = True

    # ------------------------------------------------------------------------------------------------------------
    # Generation: measure visual dependency, fold TGF and TAS into the advantages
    # ------------------------------------------------------------------------------------------------------------

    def _tokenize_prompts(self, prompts: list):
        prompt_ids, images, multimodal_fields = super()._tokenize_prompts(prompts)
        # Name a prompt the model's context cannot hold, rather than run past it (RoPE) or fail in the generator.
        check_prompt_lengths(prompts, prompt_ids, self.args.max_completion_length, self.model.config)
        if images is not None:
            # TRL marks a text-only prompt's images None, which processors reject in a batch mixing text and images.
            images = [prompt_images or [] for prompt_images in images]
        return prompt_ids, images, multimodal_fields

    def _generate_and_score_round(self, inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor | Any]:
        output = super()._generate_and_score_round(inputs)
        if self.args.perturbation_space == "original_image" and output.get("num_images") is not None:
            images = completion_images(inputs)
            if [len(row) for row in images] == list(output["num_images"]):
                output[IMAGES_KEY] = images
            elif not self._warned_image_mismatch:
                # Tool calls can add images to a completion: only the processed pixels hold all of them.
                logger.warning(
                    "The batch's images are not those of the training data (tool images?): perturbing the processed "
                    "pixel_values instead (perturbation_space='pixel_values')."
                )
                self._warned_image_mismatch = True
        return output

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
        self._perturbation_round += 1
        mask = loss_mask(batch)
        advantages = batch["advantages"]
        num_images = batch.get("num_images")
        if num_images is None:
            self._warn_without_images()
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
        run_pass = bool(rows) or self._forward_passes_must_match()
        if self._defers_original_logps(batch):
            perturbed_logps = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
            if run_pass:
                perturbed_logps = self._visual_dependency(batch, rows, mask, self._perturbed_token_logps)
            batch[DEFERRED_KEY] = perturbed_logps
            batch.update({f"{DEFERRED_KEY}_{name}": value for name, value in roles.items()})
            return
        dependency = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        entropies = None
        if run_pass:
            dependency = self._visual_dependency(batch, rows, mask)
        if self.args.token_filter_criterion == "entropy" and self.args.token_filter_ratio < 1.0:
            # No forward of this route gives the original-image entropies (old log-probs are reused without them, and
            # `kl` keeps its logits chunk-local): one more forward, on the measured rows only.
            entropies = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
            if run_pass:
                entropies = self._visual_dependency(batch, rows, mask, self._original_token_entropies)
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
            and not self._has_dropout
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
        Fold TGF (per-token mask) and TAS (per-completion scale) into `batch["advantages"]`, and log metrics.

        `entropies` (original-image policy entropies) are needed only by the `entropy` token filter criterion.
        """
        args = self.args
        mask = loss_mask(batch)
        advantages = batch["advantages"]
        if args.token_filter_ratio < 1.0:
            filtered = self._filter_tokens(dependency, entropies, mask)
            keep = torch.where(measured.unsqueeze(-1), filtered, mask.bool())
        else:
            keep = mask.bool()

        # TAS statistics span the whole generation batch, all processes together.
        all_dependency = self.accelerator.gather(trajectory_dependency(dependency, mask))
        all_shapeable = self.accelerator.gather(shapeable)
        if args.advantage_shaping:
            all_scales = advantage_scales(
                all_dependency, all_shapeable, args.advantage_scale_min, args.advantage_scale_max
            )
        else:
            all_scales = torch.ones_like(all_dependency)
        first = self.accelerator.process_index * len(advantages)
        shaped = advantages * all_scales[first : first + len(advantages)].to(advantages.dtype)
        if args.token_filter_ratio < 1.0:
            batch["advantages"] = shaped.unsqueeze(-1) * keep.to(shaped.dtype)
        else:
            batch["advantages"] = shaped
        if self.spotlight_capture:
            scales = all_scales[first : first + len(advantages)]
            self.spotlight_batch = capture_spotlight(self, batch, dependency, mask, keep, measured, scales, advantages)
        self._log_dependency_metrics(dependency, mask, keep, measured, with_image, all_scales, all_shapeable)

    def _filter_tokens(
        self, dependency: torch.Tensor, entropies: torch.Tensor | None, mask: torch.Tensor
    ) -> torch.Tensor:
        """TGF's kept tokens under `token_filter_criterion`: by dependency (VPPO), at random or by entropy."""
        ratio, criterion = self.args.token_filter_ratio, self.args.token_filter_criterion
        if criterion == "random":
            # Own stream, seeded like the perturbation draws; drawn for the whole batch: skipping changes nothing.
            seed = hash((self.args.seed, self._perturbation_round, self.accelerator.process_index, 1)) % (2**63)
            return random_token_mask(mask, ratio, torch.Generator(device=mask.device).manual_seed(seed))
        if criterion == "entropy":
            if entropies is None:
                raise RuntimeError("token_filter_criterion='entropy' needs the original-image entropies.")
            return top_entropy_mask(entropies, mask, ratio)
        return top_dependency_mask(dependency, mask, ratio)

    def _visual_dependency(
        self, batch: dict[str, Any], rows: list[int], mask: torch.Tensor, measure: Callable | None = None
    ) -> torch.Tensor:
        """`[B, T]` token dependencies (or what `measure` gives for the perturbed batch) for `rows`, 0 elsewhere."""
        unsupported = [key for key in UNSUPPORTED_PIXEL_KEYS if key in batch]
        if unsupported:
            raise ValueError(
                f"VPPO cannot perturb this model's images: its processor returns {unsupported}. Supported layouts are "
                "Qwen-VL patch rows (`image_grid_thw`) and plain [N, C, H, W] `pixel_values`."
            )
        measured_rows = rows
        if self._forward_passes_must_match():
            # Pad with repeats so that every process runs as many forward passes; the repeats are discarded.
            counts = self.accelerator.gather(torch.tensor([len(rows)], device=mask.device))
            target = int(counts.max())
            filler = rows[:1] or self._rows_with_images(batch)[:1] or [0]
            measured_rows = rows + filler * (target - len(rows))
            if not measured_rows:
                return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)

        dependency = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        # The whole batch is perturbed, so each completion's draw does not depend on which rows are measured.
        perturbed = (
            {**batch, "pixel_values": self._perturbed_pixel_values(batch)} if "pixel_values" in batch else batch
        )
        logits_to_keep = mask.size(1)
        if measure is None:
            measure = self._k3_dependency if self.args.dependency_estimator == "k3" else self._kl_dependency
        # Both passes in eval mode (no dropout), as the official code scores them.
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            eval_mode(self.model),
        ):
            measured = measure(batch, perturbed, measured_rows, mask, logits_to_keep)
        if rows:
            dependency[rows] = measured[: len(rows)]
        return dependency

    def _rows_with_images(self, batch: dict[str, Any]) -> list[int]:
        return [i for i, n in enumerate(batch.get("num_images") or []) if n]

    def _perturbed_pixel_values(self, batch: dict[str, Any]) -> torch.Tensor:
        """
        Every image of the generation batch perturbed, with a draw seeded by trainer seed, round and process.

        On the images as the data delivered them when the batch carries them (`perturbation_space="original_image"`),
        otherwise on the processed `pixel_values`. Either way the result has the batch's layout, shape and dtype.
        """
        pixel_values = batch["pixel_values"]
        seed = hash((self.args.seed, self._perturbation_round, self.accelerator.process_index)) % (2**63)
        generator = torch.Generator(device=pixel_values.device).manual_seed(seed)
        args = self.args
        kwargs = {
            "patch_size": args.perturbation_patch_size,
            "prob": args.perturbation_prob,
            "noise_std": args.perturbation_noise_std,
            "blur_radius": args.perturbation_blur_radius,
        }
        if IMAGES_KEY not in batch:
            return perturb_pixel_values(
                pixel_values,
                self.pixel_layout,
                args.perturbation,
                generator,
                image_grid_thw=batch.get("image_grid_thw"),
                **kwargs,
            )
        images = [image for row in batch[IMAGES_KEY] for image in row]
        processed = perturb_original_images(
            images, self.processing_class.image_processor, args.perturbation, generator, pixel_values.device, **kwargs
        )
        grid = batch.get("image_grid_thw")
        if processed["pixel_values"].shape != pixel_values.shape or (
            grid is not None and not torch.equal(processed["image_grid_thw"].to(grid.device), grid)
        ):
            raise RuntimeError(
                "The perturbed images do not have the original batch's token layout (the processor was called with "
                "other settings for the batch?); set perturbation_space='pixel_values'."
            )
        return processed["pixel_values"].to(pixel_values.dtype)

    @staticmethod
    def _select_rows(batch: dict[str, Any], rows: Sequence[int]) -> dict:
        """Model inputs for the completions `rows` of a generation batch (prompt + completion)."""
        if list(rows) == list(range(batch["prompt_ids"].size(0))):
            return model_inputs(batch)  # nothing skipped: no copies
        return model_inputs(select_rows(batch, list(rows)))

    def _sampled_token_logps(self, inputs: dict, logits_to_keep: int) -> torch.Tensor:
        logps, _, _ = self._get_per_token_logps_and_entropies(
            self.model,
            inputs["input_ids"],
            inputs["attention_mask"],
            logits_to_keep,
            batch_size=self.args.per_device_train_batch_size,
            **{key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask")},
        )
        return logps

    def _original_token_entropies(self, batch, perturbed, rows, mask, logits_to_keep) -> torch.Tensor:
        """The policy's per-token entropies on the original images (the `entropy` token filter criterion)."""
        inputs = self._select_rows(batch, rows)
        _, entropies, _ = self._get_per_token_logps_and_entropies(
            self.model,
            inputs["input_ids"],
            inputs["attention_mask"],
            logits_to_keep,
            batch_size=self.args.per_device_train_batch_size,
            compute_entropy=True,
            **{key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask")},
        )
        return entropies

    def _perturbed_token_logps(self, batch, perturbed, rows, mask, logits_to_keep) -> torch.Tensor:
        return self._sampled_token_logps(self._select_rows(perturbed, rows), logits_to_keep)

    def _k3_dependency(self, batch, perturbed, rows, mask, logits_to_keep) -> torch.Tensor:
        index = torch.tensor(rows, device=mask.device, dtype=torch.long)
        if "old_per_token_logps" in batch and not self._has_dropout:
            # TRL already scored the batch with the generating policy: reuse it, one forward pass saved (TRL scores
            # in train mode, which only differs from eval mode with dropout).
            logps = batch["old_per_token_logps"][index]
        else:
            logps = self._sampled_token_logps(self._select_rows(batch, rows), logits_to_keep)
        perturbed_logps = self._perturbed_token_logps(batch, perturbed, rows, mask, logits_to_keep)
        return token_dependency(logps, perturbed_logps, mask[index])

    def _kl_dependency(self, batch, perturbed, rows, mask, logits_to_keep) -> torch.Tensor:
        """Full-vocabulary KL per token, a few completions and positions at a time so that logits stay small."""
        model = self.accelerator.unwrap_model(self.model)
        if is_peft_model(model):
            model = model.get_base_model()
        backbone, lm_head = model.base_model, model.get_output_embeddings()
        chunks = []
        step = self.args.per_device_train_batch_size
        for start in range(0, len(rows), step):
            chunk_rows = rows[start : start + step]
            inputs = self._select_rows(batch, chunk_rows)
            hidden = self._completion_hidden_states(backbone, inputs, logits_to_keep)
            perturbed_hidden = self._completion_hidden_states(
                backbone, self._select_rows(perturbed, chunk_rows), logits_to_keep
            )
            chunk_mask = mask[torch.tensor(chunk_rows, device=mask.device, dtype=torch.long)]
            kl = torch.zeros(chunk_mask.shape, dtype=torch.float32, device=mask.device)
            # `out_features`, not the weight shape: under ZeRO-3 the weight is a 0-size shard until gathered.
            positions = max(1, KL_LOGITS_PER_CHUNK // (len(chunk_rows) * lm_head.out_features))
            with maybe_gather_lm_head_ctx(lm_head.weight, lm_head.bias), self.accelerator.autocast():
                for position in range(0, logits_to_keep, positions):
                    window = slice(position, position + positions)
                    # F.linear on the gathered weight: no per-window collectives, whatever the local length.
                    logits = F.linear(hidden[:, window], lm_head.weight, lm_head.bias) / self.temperature
                    perturbed_logits = F.linear(perturbed_hidden[:, window], lm_head.weight, lm_head.bias)
                    perturbed_logits = perturbed_logits / self.temperature
                    kl[:, window] = kl_token_dependency(logits, perturbed_logits, chunk_mask[:, window])
            chunks.append(kl)
        return torch.cat(chunks)

    def _completion_hidden_states(self, backbone, inputs: dict, logits_to_keep: int) -> torch.Tensor:
        """Final hidden states at the positions that predict the completion tokens."""
        model_inputs = {key: value for key, value in inputs.items() if key != "num_images"}
        with self.accelerator.autocast():
            hidden = backbone(**model_inputs, use_cache=False).last_hidden_state
        return hidden[:, -logits_to_keep - 1 : -1]

    def _log_dependency_metrics(
        self,
        dependency: torch.Tensor,
        mask: torch.Tensor,
        keep: torch.Tensor,
        measured: torch.Tensor,
        with_image: torch.Tensor,
        all_scales: torch.Tensor,
        all_shapeable: torch.Tensor,
    ) -> None:
        valid = mask.bool() & measured.unsqueeze(-1)
        selected = valid & keep
        rejected = valid & ~keep
        sample_dependency = trajectory_dependency(dependency, mask)
        sums = torch.stack(
            [
                valid.sum(),
                selected.sum(),
                (dependency * valid).sum(),
                (dependency * selected).sum(),
                (dependency * rejected).sum(),
                rejected.sum(),
                (sample_dependency * measured).sum(),
                measured.sum(),
                (with_image & ~measured).sum(),
                with_image.sum(),
            ]
        ).float()
        (
            tokens,
            selected_tokens,
            dependency_sum,
            selected_sum,
            rejected_sum,
            rejected_tokens,
            trajectory_sum,
            samples,
            skipped,
            with_image_samples,
        ) = self.accelerator.reduce(sums, reduction="sum").tolist()
        metrics = self._metrics["train"]
        if tokens > 0:
            metrics["vppo/token_fraction"].append(selected_tokens / tokens)
            metrics["vppo/dependency_mean"].append(dependency_sum / tokens)
        if selected_tokens > 0:
            metrics["vppo/dependency_selected_mean"].append(selected_sum / selected_tokens)
        if rejected_tokens > 0:
            metrics["vppo/dependency_rejected_mean"].append(rejected_sum / rejected_tokens)
        if samples > 0:
            metrics["vppo/trajectory_dependency_mean"].append(trajectory_sum / samples)
        if with_image_samples > 0:
            metrics["vppo/skipped_fraction"].append(skipped / with_image_samples)
        scales = all_scales[all_shapeable.bool()] if bool(all_shapeable.any()) else torch.ones(1)
        scale_min, scale_mean, scale_max = torch.stack([scales.min(), scales.mean(), scales.max()]).tolist()
        metrics["vppo/advantage_scale_min"].append(scale_min)
        metrics["vppo/advantage_scale_mean"].append(scale_mean)
        metrics["vppo/advantage_scale_max"].append(scale_max)
        metrics["vppo/beta_max"].append(scale_max)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card (base model, dataset, trainer, citations), plus a section with the run's VPPO settings."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if self.is_world_process_zero():
            base_model = get_config_model_id(self.accelerator.unwrap_model(self.model).config)
            append_vppo_section(os.path.join(self.args.output_dir, "README.md"), self.args, base_model)

    # ------------------------------------------------------------------------------------------------------------
    # Loss: GRPO's, plus the entropy penalty on the current policy's log-probs
    # ------------------------------------------------------------------------------------------------------------

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        inputs, self._loss_inputs = self._loss_inputs, None
        if inputs is not None:
            # The loss's own forward: GRPO reads the advantages only after it, so deferred TGF and TAS land in time.
            self._policy_logps = logps
            if DEFERRED_KEY in inputs:
                self._finish_deferred_shaping(inputs, logps.detach(), entropies)
        return logps, entropies, aux_loss

    def _finish_deferred_shaping(
        self, inputs: dict[str, Any], logps: torch.Tensor, entropies: torch.Tensor | None
    ) -> None:
        """
        TGF and TAS from the loss forward's log-probs (original images) and the stored perturbed log-probs.

        GRPO's loss forward also computes the entropies, so the `entropy` criterion costs no extra pass here.
        """
        roles = {name: inputs.pop(f"{DEFERRED_KEY}_{name}") for name in ("measured", "shapeable", "with_image")}
        measured_mask = loss_mask(inputs) * roles["measured"].unsqueeze(-1)
        dependency = token_dependency(logps, inputs.pop(DEFERRED_KEY), measured_mask)
        self._shape_advantages(inputs, dependency, **roles, entropies=entropies)

    def _compute_loss(self, model, inputs):
        self._loss_inputs = inputs
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._loss_inputs = None
            policy_logps, self._policy_logps = self._policy_logps, None
        if DEFERRED_KEY in inputs:
            raise RuntimeError(
                "VPPO's deferred advantage shaping did not run: GRPOTrainer's loss changed its forward."
            )
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


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether a train-mode forward of `model` is random: a dropout layer (LoRA's included) or attention dropout."""
    dropout_layers = (
        torch.nn.Dropout,
        torch.nn.Dropout1d,
        torch.nn.Dropout2d,
        torch.nn.Dropout3d,
        torch.nn.AlphaDropout,
        torch.nn.FeatureAlphaDropout,
    )
    for module in model.modules():
        attention_dropout = getattr(module, "attention_dropout", None)  # a probability in transformers' attention
        if (isinstance(module, dropout_layers) and module.p > 0) or (
            isinstance(attention_dropout, float | int) and attention_dropout > 0
        ):
            return True
    return False


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run `model` in eval mode inside the block, then give every module back its own train/eval mode."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def completion_images(inputs: list[dict[str, Any]]) -> list[list[Any]]:
    """Each completion's images as the data delivers them (`images` or `image` column), as GRPOTrainer reads them."""
    if "images" in inputs[0]:
        return [list(example.get("images") or []) for example in inputs]
    return [[example["image"]] if example.get("image") is not None else [] for example in inputs]


def loss_mask(batch: dict[str, Any]) -> torch.Tensor:
    """The tokens GRPO's loss counts: completion tokens, less tool outputs in multi-turn rollouts."""
    return batch["completion_mask"] if "tool_mask" not in batch else batch["completion_mask"] * batch["tool_mask"]
