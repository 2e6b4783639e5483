"""Configuration of the VPPO trainer."""

from dataclasses import dataclass, field

from trl import GRPOConfig

from .shaping import ShapingSettings

PERTURBATIONS = ("patch_blackening", "gaussian_noise", "gaussian_blur", "solid")
PERTURBATION_SPACES = ("original_image", "pixel_values")
DEPENDENCY_ESTIMATORS = ("k3", "kl")
TOKEN_FILTER_CRITERIA = ("dependency", "random", "entropy")
ON_EXHAUSTED = ("continue", "raise")


@dataclass
class VPPOConfig(GRPOConfig):
    r"""
    Configuration class for [`VPPOTrainer`].

    VPPO (Visually-Perceptive Policy Optimization, "Spotlight on Token Perception for Multimodal Reinforcement
    Learning", https://arxiv.org/abs/2510.09285) measures how much each generated token depends on the image by
    scoring the completion a second time on a perturbed copy of the image. It then trains only the most
    image-dependent tokens (Token-level Gradient Filtering, TGF) and rescales each completion's advantage by its mean
    dependency (Trajectory-level Advantage Shaping, TAS). [`VPPOConfig`] inherits every parameter of [`GRPOConfig`].
    With `token_filter_ratio=1.0`, `advantage_shaping=False` and `entropy_penalty_coef=0.0`, training is exactly
    GRPO.

    Parameters:
        perturbation (`str`, *optional*, defaults to `"patch_blackening"`):
            How the image is made uninformative: `"patch_blackening"` (each patch set to black with probability
            `perturbation_prob`), `"gaussian_noise"` (sigma `perturbation_noise_std`, clipped to [0, 255]),
            `"gaussian_blur"` (radius `perturbation_blur_radius`) or `"solid"` (every pixel 128).
        perturbation_space (`str`, *optional*, defaults to `"original_image"`):
            Where the image is perturbed. `"original_image"` (official code): on the image as the data delivers it,
            before the processor resizes it (patches on its own grid from the top-left corner), then processed like
            the original, on the device. `"pixel_values"`: on the processed `pixel_values`, at the resolution the
            vision tower sees; cheaper (no second image processing), and for `"patch_blackening"` with the
            processor's patch size a plain row mask. The two blacken the same pixels only for images whose sides are
            multiples of twice the patch size (28 px for Qwen2.5-VL) and that the processor does not resize.
        perturbation_patch_size (`int`, *optional*, defaults to `14`):
            Side of the square patches, in pixels, for `"patch_blackening"`.
        perturbation_prob (`float`, *optional*, defaults to `0.5`):
            Probability that a patch is blackened.
        perturbation_noise_std (`float`, *optional*, defaults to `189.0`):
            Standard deviation, in 0-255 pixel units, for `"gaussian_noise"`.
        perturbation_blur_radius (`float`, *optional*, defaults to `6.0`):
            Gaussian blur radius (the standard deviation, in pixels) for `"gaussian_blur"`.
        dependency_estimator (`str`, *optional*, defaults to `"k3"`):
            `"k3"` estimates the visual dependency of a token from the log-probs of the sampled token only (official
            code); `"kl"` computes the full-vocabulary KL divergence between the two predictions (paper Def. 3.1).
        token_filter_ratio (`float`, *optional*, defaults to `0.4`):
            Share of each completion's tokens, the most image-dependent ones, that receive policy gradient. `1.0`
            turns TGF off.
        token_filter_criterion (`str`, *optional*, defaults to `"dependency"`):
            Which tokens TGF keeps: `"dependency"` (the most image-dependent ones, VPPO), or one of the paper's
            ablations (Table 4), keeping as many tokens: `"random"` (a uniform draw per completion, seeded from `seed`)
            or `"entropy"` (the tokens where the policy's entropy on the original image is highest). The perturbed pass
            still runs for TAS and the dependency metrics.
        advantage_shaping (`bool`, *optional*, defaults to `True`):
            Whether to scale each completion's advantage by its mean visual dependency (TAS).
        advantage_scale_min (`float`, *optional*, defaults to `0.9`):
            Smallest advantage scale (beta_min).
        advantage_scale_max (`float` or `None`, *optional*, defaults to `None`):
            Largest advantage scale (beta_max). `None` picks it per batch so that the mean scale is exactly 1
            (the official code's dynamic range, computed here over the whole generation batch of all processes and
            over the completions with a non-zero advantage only, as the specification says; the official code takes
            its minimum and maximum per process and its mean per micro-batch, zero advantages included: see
            `docs/cold_start_guard.md`). That `beta_max` has no bound: one outlier among `n` near-equal completions
            gets a scale of about `0.9 + 0.1 n`.
        advantage_scale_max_cap (`float` or `None`, *optional*, defaults to `None`):
            Upper bound of the dynamic `beta_max` (with `advantage_scale_max=None` only); where it binds, the mean
            scale is below 1. `None` leaves it unbounded, as the paper and the official code do.
        entropy_penalty_coef (`float`, *optional*, defaults to `0.0`):
            Weight of the entropy penalty `-mean(log pi(y_t))` over all completion tokens (paper App. E). The paper
            uses 0.06 for 7B models and 0.12 for Qwen3-VL-8B.
        freeze_vision_tower (`bool`, *optional*, defaults to `False`):
            Train the language model and the projector only: the vision tower's weights (and any LoRA adapters in it)
            are left as they are, for every model family (the tower is found from the model's structure; a model
            whose tower cannot be found is refused when the trainer is built). The perturbed pass still runs the
            frozen tower. The paper trains the tower.
        skip_zero_advantage (`bool`, *optional*, defaults to `True`):
            Whether to skip the perturbed forward pass for completions whose advantage is exactly 0: their loss cannot
            change. Results are identical either way.
        max_consecutive_nonfinite_steps (`int`, *optional*, defaults to `5`):
            A loss that is NaN or infinite (fp16 overflow, a corrupt sample) is never back-propagated: the step is
            skipped with a warning and counted in `vppo/nonfinite_loss_skipped`. After this many skipped steps in a
            row, training stops with an error (the checkpoints already written are kept).
        cold_start_guard (`bool`, *optional*, defaults to `False`):
            Let TGF and TAS act only as far as the visual dependencies carry signal, for a policy that does not yet
            read the image (a small or weak model, a new kind of image). Each batch, the mean dependency of the
            tokens TGF would keep is read on a log scale between `cold_start_guard_floor` (closed: every token
            trained, every TAS scale 1, i.e. GRPO) and `cold_start_guard_full` (open: VPPO as configured); in
            between, TGF's ratio and the TAS scales are blended linearly towards GRPO. Logged as `vppo/guard_*`. It
            reuses the measured dependencies: no extra forward pass. `False` is the paper's behaviour.
        cold_start_guard_floor (`float`, *optional*, defaults to `0.02`):
            Mean kept-token dependency (nats) at and below which the guard is closed.
        cold_start_guard_full (`float`, *optional*, defaults to `0.2`):
            Mean kept-token dependency (nats) at and above which the guard is fully open.
        cold_start_guard_balance (`bool`, *optional*, defaults to `True`):
            With the guard on, also rescale the TAS scales so that on each side of the advantage's sign their
            `|advantage|`-weighted mean is 1: TAS then moves credit among the completions of one sign and no longer
            changes how much the batch pushes answers up or down (k3 gives wrong answers larger dependencies than
            right ones). Logged as `vppo/guard_sign_gap`, the gap it removes. Unused without the guard.
        dynamic_sampling (`bool`, *optional*, defaults to `False`):
            DAPO's dynamic sampling, the paper's base algorithm: prompt groups whose rewards carry no learning signal
            are dropped and more prompts, the next ones of the training data, are generated until every process holds
            a full generation batch of informative groups. An epoch then ends once every prompt was generated on, after
            fewer optimizer steps than without it.
        dynamic_sampling_reward (`str`, *optional*, defaults to `"accuracy_reward"`):
            Reward the groups are filtered on: the name of one of the trainer's reward functions (as in the
            `rewards/<name>/mean` logs), or `"total"` for the weighted sum of all rewards.
        dynamic_sampling_min (`float`, *optional*, defaults to `0.01`):
            A group is kept when its rewards are not all equal and `dynamic_sampling_min < mean <
            dynamic_sampling_max` (official code: mean accuracy strictly between 0.01 and 0.99).
        dynamic_sampling_max (`float`, *optional*, defaults to `0.99`):
            Upper bound of the open interval above.
        dynamic_sampling_max_rounds (`int`, *optional*, defaults to `5`):
            Most generation rounds added to fill one generation batch.
        dynamic_sampling_on_exhausted (`str`, *optional*, defaults to `"continue"`):
            What to do when `dynamic_sampling_max_rounds` extra rounds did not fill the batch: `"continue"` tops it up
            with uninformative groups (zero advantage) and logs `dynamic_sampling/batch_fill`; `"raise"` stops training
            with a `RuntimeError`. When the data runs out (end of an epoch), training always continues.
        spotlight_steps (`int`, *optional*, defaults to `0`):
            Every `spotlight_steps` optimizer steps, write the token-perception page of a few completions of the
            current batch (their tokens shaded by visual dependency, the TGF-kept ones boxed, their TAS scales) and
            the batch's dependency distributions to `output_dir/spotlight/step-N/`, and log them to wandb and trackio
            when they are active. It reuses the dependencies training measured: no extra forward pass. `0` turns it
            off.
        spotlight_completions (`int`, *optional*, defaults to `4`):
            Completions of one prompt group shown on each spotlight page.
    """

    perturbation: str = field(
        default="patch_blackening",
        metadata={"help": "Image perturbation.", "choices": list(PERTURBATIONS)},
    )
    perturbation_space: str = field(
        default="original_image",
        metadata={
            "help": "Where the image is perturbed: 'original_image' (before the processor resizes it, official code) "
            "or 'pixel_values' (the processed pixels the vision tower sees; faster).",
            "choices": list(PERTURBATION_SPACES),
        },
    )
    perturbation_patch_size: int = field(
        default=14, metadata={"help": "Patch side in pixels for the 'patch_blackening' perturbation."}
    )
    perturbation_prob: float = field(
        default=0.5, metadata={"help": "Probability that a patch is blackened ('patch_blackening')."}
    )
    perturbation_noise_std: float = field(
        default=189.0, metadata={"help": "Noise standard deviation in 0-255 pixel units ('gaussian_noise')."}
    )
    perturbation_blur_radius: float = field(
        default=6.0, metadata={"help": "Gaussian blur radius in pixels ('gaussian_blur')."}
    )
    dependency_estimator: str = field(
        default="k3",
        metadata={
            "help": "Token visual dependency: 'k3' (sampled token, official code) or 'kl' (full vocabulary, paper).",
            "choices": list(DEPENDENCY_ESTIMATORS),
        },
    )
    token_filter_ratio: float = field(
        default=0.4,
        metadata={"help": "Share of each completion's tokens (most image-dependent first) that get policy gradient."},
    )
    token_filter_criterion: str = field(
        default="dependency",
        metadata={
            "help": "Which tokens TGF keeps: 'dependency' (VPPO), or the paper's ablations 'random' and 'entropy'.",
            "choices": list(TOKEN_FILTER_CRITERIA),
        },
    )
    advantage_shaping: bool = field(
        default=True, metadata={"help": "Scale each completion's advantage by its mean visual dependency (TAS)."}
    )
    advantage_scale_min: float = field(default=0.9, metadata={"help": "Smallest TAS advantage scale (beta_min)."})
    advantage_scale_max: float | None = field(
        default=None,
        metadata={"help": "Largest TAS advantage scale (beta_max); None makes each batch's mean scale exactly 1."},
    )
    advantage_scale_max_cap: float | None = field(
        default=None,
        metadata={"help": "Upper bound of the dynamic beta_max (advantage_scale_max=None); None: unbounded (paper)."},
    )
    entropy_penalty_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of the entropy penalty -mean(log pi) over completion tokens (paper: 0.06 for 7B)."},
    )
    freeze_vision_tower: bool = field(
        default=False,
        metadata={
            "help": "Train only the language model and the projector; the vision tower's weights stay as they are."
        },
    )
    skip_zero_advantage: bool = field(
        default=True,
        metadata={"help": "Skip the perturbed pass for completions whose advantage is exactly 0 (same results)."},
    )
    max_consecutive_nonfinite_steps: int = field(
        default=5,
        metadata={"help": "Stop training after this many consecutive steps skipped for a NaN or infinite loss."},
    )
    cold_start_guard: bool = field(
        default=False,
        metadata={
            "help": "Blend TGF and TAS towards GRPO while the kept tokens' visual dependency is at noise level "
            "(a policy that does not yet read the image)."
        },
    )
    cold_start_guard_floor: float = field(
        default=0.02, metadata={"help": "Kept-token mean dependency (nats) at and below which the guard is closed."}
    )
    cold_start_guard_full: float = field(
        default=0.2, metadata={"help": "Kept-token mean dependency (nats) at and above which the guard is open."}
    )
    cold_start_guard_balance: bool = field(
        default=True,
        metadata={
            "help": "With the guard on, keep the TAS scales' weighted mean at 1 on each side of the advantage's sign "
            "(TAS moves credit among completions of one sign, not between signs)."
        },
    )
    dynamic_sampling: bool = field(
        default=False,
        metadata={"help": "Drop prompt groups without learning signal and generate more prompts to fill the batch."},
    )
    dynamic_sampling_reward: str = field(
        default="accuracy_reward",
        metadata={"help": "Reward function name the groups are filtered on, or 'total' for the weighted sum."},
    )
    dynamic_sampling_min: float = field(
        default=0.01, metadata={"help": "Groups whose mean reward is <= this are dropped (dynamic sampling)."}
    )
    dynamic_sampling_max: float = field(
        default=0.99, metadata={"help": "Groups whose mean reward is >= this are dropped (dynamic sampling)."}
    )
    dynamic_sampling_max_rounds: int = field(
        default=5, metadata={"help": "Most extra generation rounds to fill one generation batch (dynamic sampling)."}
    )
    dynamic_sampling_on_exhausted: str = field(
        default="continue",
        metadata={
            "help": "When the extra rounds did not fill the batch: 'continue' (top up with uninformative groups) or "
            "'raise'.",
            "choices": list(ON_EXHAUSTED),
        },
    )

    spotlight_steps: int = field(
        default=0,
        metadata={
            "help": "Every N optimizer steps, write the token-perception page of a few completions of the batch to "
            "output_dir/spotlight/step-N/ (and log it to wandb/trackio); 0 turns it off."
        },
    )
    spotlight_completions: int = field(
        default=4, metadata={"help": "Completions of one prompt group shown on each spotlight page."}
    )

    def __post_init__(self):
        # VPPO's own fields first, so that their errors are not hidden behind the hardware checks of the parent.
        if self.perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation={self.perturbation!r} is not supported; choose one of {PERTURBATIONS}.")
        if self.perturbation_space not in PERTURBATION_SPACES:
            raise ValueError(
                f"perturbation_space={self.perturbation_space!r} is not supported; "
                f"choose one of {PERTURBATION_SPACES}."
            )
        if self.dependency_estimator not in DEPENDENCY_ESTIMATORS:
            raise ValueError(
                f"dependency_estimator={self.dependency_estimator!r} is not supported; "
                f"choose one of {DEPENDENCY_ESTIMATORS}."
            )
        if not 0.0 < self.token_filter_ratio <= 1.0:
            raise ValueError(f"token_filter_ratio={self.token_filter_ratio} must be in (0, 1].")
        if self.token_filter_criterion not in TOKEN_FILTER_CRITERIA:
            raise ValueError(
                f"token_filter_criterion={self.token_filter_criterion!r} is not supported; "
                f"choose one of {TOKEN_FILTER_CRITERIA}."
            )
        if self.perturbation_patch_size < 1:
            raise ValueError(f"perturbation_patch_size={self.perturbation_patch_size} must be a positive integer.")
        if not 0.0 <= self.perturbation_prob <= 1.0:
            raise ValueError(f"perturbation_prob={self.perturbation_prob} must be in [0, 1].")
        if self.perturbation_noise_std < 0:
            raise ValueError(f"perturbation_noise_std={self.perturbation_noise_std} must be >= 0.")
        if self.perturbation_blur_radius < 0:
            raise ValueError(f"perturbation_blur_radius={self.perturbation_blur_radius} must be >= 0.")
        if self.advantage_scale_min < 0:
            raise ValueError(f"advantage_scale_min={self.advantage_scale_min} must be >= 0.")
        if self.advantage_scale_max is not None and self.advantage_scale_max < self.advantage_scale_min:
            raise ValueError(
                f"advantage_scale_max={self.advantage_scale_max} must be >= "
                f"advantage_scale_min={self.advantage_scale_min} (or None for the dynamic range)."
            )
        if self.advantage_scale_max is None and self.advantage_scale_min > 1.0:
            raise ValueError(
                f"advantage_scale_min={self.advantage_scale_min} must be <= 1 with the dynamic range "
                "(advantage_scale_max=None), whose mean scale is 1."
            )
        if self.advantage_scale_max_cap is not None:
            if self.advantage_scale_max is not None:
                raise ValueError(
                    f"advantage_scale_max_cap={self.advantage_scale_max_cap} bounds the dynamic range only; it cannot "
                    f"be combined with a fixed advantage_scale_max={self.advantage_scale_max}."
                )
            if self.advantage_scale_max_cap < 1.0:
                raise ValueError(
                    f"advantage_scale_max_cap={self.advantage_scale_max_cap} must be >= 1 (the dynamic beta_max is "
                    "never below 1)."
                )
        ShapingSettings.of(self)  # refuses the combinations whose shaping would divide 0 by 0
        if not 0.0 < self.cold_start_guard_floor < self.cold_start_guard_full:
            raise ValueError(
                f"cold_start_guard_floor={self.cold_start_guard_floor} and cold_start_guard_full="
                f"{self.cold_start_guard_full} must satisfy 0 < floor < full."
            )
        if self.entropy_penalty_coef < 0:
            raise ValueError(f"entropy_penalty_coef={self.entropy_penalty_coef} must be >= 0.")
        if self.max_consecutive_nonfinite_steps < 1:
            raise ValueError(f"max_consecutive_nonfinite_steps={self.max_consecutive_nonfinite_steps} must be >= 1.")
        if self.dynamic_sampling_on_exhausted not in ON_EXHAUSTED:
            raise ValueError(
                f"dynamic_sampling_on_exhausted={self.dynamic_sampling_on_exhausted!r} is not supported; "
                f"choose one of {ON_EXHAUSTED}."
            )
        if self.dynamic_sampling_max_rounds < 0:
            raise ValueError(f"dynamic_sampling_max_rounds={self.dynamic_sampling_max_rounds} must be >= 0.")
        if not self.dynamic_sampling_min < self.dynamic_sampling_max:
            raise ValueError(
                f"dynamic_sampling_min={self.dynamic_sampling_min} must be < "
                f"dynamic_sampling_max={self.dynamic_sampling_max}."
            )
        if getattr(self, "activation_checkpointing", False) is None:
            # TRL's default `gradient_checkpointing=True` makes transformers warn, for every config, that this name is
            # deprecated in favour of `activation_checkpointing`: hand the value over to the new name first.
            self.activation_checkpointing = self.gradient_checkpointing
        if self.spotlight_steps < 0:
            raise ValueError(f"spotlight_steps={self.spotlight_steps} must be >= 0 (0 turns the spotlight off).")
        if self.spotlight_completions < 1:
            raise ValueError(f"spotlight_completions={self.spotlight_completions} must be >= 1.")
        if not self.dynamic_sampling_reward:
            raise ValueError("dynamic_sampling_reward must name a reward function, or be 'total'.")
        super().__post_init__()
        # The generation batch layout is only known once the parent has resolved steps_per_generation.
        local_batch = self.per_device_train_batch_size * self.steps_per_generation
        if self.dynamic_sampling and local_batch % self.num_generations != 0:
            # Groups must not straddle processes: each process keeps or drops its own groups.
            raise ValueError(
                "dynamic_sampling needs each process's generation batch, per_device_train_batch_size "
                f"({self.per_device_train_batch_size}) x steps_per_generation ({self.steps_per_generation}) = "
                f"{local_batch}, to be a multiple of num_generations ({self.num_generations}). Change "
                "per_device_train_batch_size, steps_per_generation (or generation_batch_size) or num_generations."
            )
        steps_per_batch = self.steps_per_generation * self.num_iterations
        if self.dynamic_sampling and steps_per_batch % self.gradient_accumulation_steps != 0:
            # An epoch now ends after a data-dependent number of generation batches; it must end on an optimizer step.
            raise ValueError(
                f"dynamic_sampling needs steps_per_generation ({self.steps_per_generation}) x num_iterations "
                f"({self.num_iterations}) = {steps_per_batch} to be a multiple of gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps}), so that every optimizer step trains on whole generation "
                "batches. Leave steps_per_generation and generation_batch_size unset (steps_per_generation then "
                "equals gradient_accumulation_steps) or make it a multiple of gradient_accumulation_steps."
            )
