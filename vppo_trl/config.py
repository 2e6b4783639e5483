"""Configuration of the VPPO trainer."""

from dataclasses import dataclass, field

from trl import GRPOConfig

PERTURBATIONS = ("patch_blackening", "gaussian_noise", "gaussian_blur", "solid")
DEPENDENCY_ESTIMATORS = ("k3", "kl")


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
        advantage_shaping (`bool`, *optional*, defaults to `True`):
            Whether to scale each completion's advantage by its mean visual dependency (TAS).
        advantage_scale_min (`float`, *optional*, defaults to `0.9`):
            Smallest advantage scale (beta_min).
        advantage_scale_max (`float` or `None`, *optional*, defaults to `None`):
            Largest advantage scale (beta_max). `None` picks it per batch so that the mean scale is exactly 1
            (official code).
        entropy_penalty_coef (`float`, *optional*, defaults to `0.0`):
            Weight of the entropy penalty `-mean(log pi(y_t))` over all completion tokens (paper App. E). The paper
            uses 0.06 for 7B models and 0.12 for Qwen3-VL-8B.
        skip_zero_advantage (`bool`, *optional*, defaults to `True`):
            Whether to skip the perturbed forward pass for completions whose advantage is exactly 0: their loss cannot
            change. Results are identical either way.
    """

    perturbation: str = field(
        default="patch_blackening",
        metadata={"help": "Image perturbation.", "choices": list(PERTURBATIONS)},
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
    advantage_shaping: bool = field(
        default=True, metadata={"help": "Scale each completion's advantage by its mean visual dependency (TAS)."}
    )
    advantage_scale_min: float = field(default=0.9, metadata={"help": "Smallest TAS advantage scale (beta_min)."})
    advantage_scale_max: float | None = field(
        default=None,
        metadata={"help": "Largest TAS advantage scale (beta_max); None makes each batch's mean scale exactly 1."},
    )
    entropy_penalty_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of the entropy penalty -mean(log pi) over completion tokens (paper: 0.06 for 7B)."},
    )
    skip_zero_advantage: bool = field(
        default=True,
        metadata={"help": "Skip the perturbed pass for completions whose advantage is exactly 0 (same results)."},
    )

    def __post_init__(self):
        # VPPO's own fields first, so that their errors are not hidden behind the hardware checks of the parent.
        if self.perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation={self.perturbation!r} is not supported; choose one of {PERTURBATIONS}.")
        if self.dependency_estimator not in DEPENDENCY_ESTIMATORS:
            raise ValueError(
                f"dependency_estimator={self.dependency_estimator!r} is not supported; "
                f"choose one of {DEPENDENCY_ESTIMATORS}."
            )
        if not 0.0 < self.token_filter_ratio <= 1.0:
            raise ValueError(f"token_filter_ratio={self.token_filter_ratio} must be in (0, 1].")
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
        if self.entropy_penalty_coef < 0:
            raise ValueError(f"entropy_penalty_coef={self.entropy_penalty_coef} must be >= 0.")
        super().__post_init__()
