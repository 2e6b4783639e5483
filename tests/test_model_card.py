"""The VPPO section of the model card: what it says, and that adding it to TRL's card is idempotent."""

import pytest
from trl.trainer.utils import generate_model_card

from vppo_trl import VPPOConfig
from vppo_trl.method.model_card import SECTION_BEGIN, SECTION_END, append_vppo_section, vppo_model_card_section


def make_config(tmp_path, **kwargs) -> VPPOConfig:
    return VPPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", **kwargs)


def write_trl_card(tmp_path) -> str:
    """A README.md exactly as TRL's `create_model_card` writes it."""
    card = generate_model_card(
        base_model="Qwen/Qwen2.5-VL-7B-Instruct",
        model_name="Qwen2.5-VL-7B-VPPO",
        hub_model_id="someone/Qwen2.5-VL-7B-VPPO",
        dataset_name="TIGER-Lab/ViRL39K",
        tags=["trl", "grpo", "vppo"],
        wandb_url=None,
        trackio_url=None,
        comet_url=None,
        trainer_name="VPPO",
        paper_title="Spotlight on Token Perception for Multimodal Reinforcement Learning",
        paper_id="2510.09285",
    )
    path = tmp_path / "README.md"
    card.save(str(path))
    return str(path)


class TestSection:
    def test_names_the_method_the_paper_and_the_default_settings(self, tmp_path):
        section = vppo_model_card_section(make_config(tmp_path))
        assert section.startswith(SECTION_BEGIN) and section.rstrip().endswith(SECTION_END)
        assert "## VPPO" in section
        assert "Visually-Perceptive Policy Optimization" in section
        assert "[Spotlight on Token Perception for Multimodal Reinforcement Learning]" in section
        assert "(https://arxiv.org/abs/2510.09285)" in section
        assert (
            "| Image perturbation | `patch_blackening`: 14-px patches, each blackened with probability 0.5, "
            "on the image before the processor resizes it |" in section
        )
        assert "| Dependency estimator | `k3` |" in section
        assert "| Token filter ratio (TGF) | 0.4 (" in section
        assert "| Advantage shaping (TAS) | on: scales from 0.9 up to a per-batch maximum" in section
        assert "| Entropy penalty coefficient | 0.0 |" in section
        assert "| Skip zero-advantage samples | on |" in section
        assert "| Dynamic sampling | off |" in section
        assert "dynamic_sampling_" not in section  # its settings only matter when it is on

    def test_reports_the_settings_of_the_run(self, tmp_path):
        args = make_config(
            tmp_path,
            perturbation="gaussian_noise",
            perturbation_noise_std=100.0,
            perturbation_space="pixel_values",
            dependency_estimator="kl",
            token_filter_ratio=1.0,
            advantage_scale_max=1.2,
            entropy_penalty_coef=0.12,
            skip_zero_advantage=False,
            dynamic_sampling=True,
        )
        section = vppo_model_card_section(args)
        assert (
            "| Image perturbation | `gaussian_noise`: Gaussian noise, sigma 100.0 (0-255 pixel units), "
            "on the processed pixel_values |" in section
        )
        assert "| Dependency estimator | `kl` |" in section
        assert "| Token filter ratio (TGF) | 1.0 (off: every token gets policy gradient) |" in section
        assert "| Advantage shaping (TAS) | on: scales from 0.9 to 1.2 |" in section
        assert "| Entropy penalty coefficient | 0.12 |" in section
        assert "| Skip zero-advantage samples | off |" in section
        assert "| Dynamic sampling | on |" in section
        assert "| `dynamic_sampling_min` | 0.01 |" in section and "| `dynamic_sampling_max_rounds` | 5 |" in section

    @pytest.mark.parametrize(
        "perturbation, text",
        [("gaussian_blur", "Gaussian blur, radius 6.0 px"), ("solid", "every pixel set to 128")],
    )
    def test_other_perturbations(self, tmp_path, perturbation, text):
        assert text in vppo_model_card_section(make_config(tmp_path, perturbation=perturbation))

    def test_shaping_off(self, tmp_path):
        section = vppo_model_card_section(make_config(tmp_path, advantage_shaping=False))
        assert "| Advantage shaping (TAS) | off |" in section


class TestAppend:
    def test_goes_before_the_citations_of_trls_card(self, tmp_path):
        readme = write_trl_card(tmp_path)
        trl_card = open(readme).read()
        append_vppo_section(readme, make_config(tmp_path))
        card = open(readme).read()
        # TRL's content is untouched, the section sits between the training procedure and the citations.
        assert card.replace(vppo_model_card_section(make_config(tmp_path)) + "\n", "") == trl_card
        assert card.index("## Training procedure") < card.index(SECTION_BEGIN) < card.index("## Citations")
        assert "TIGER-Lab/ViRL39K" in card and "Qwen/Qwen2.5-VL-7B-Instruct" in card

    def test_is_idempotent_and_refreshes_the_settings(self, tmp_path):
        readme = write_trl_card(tmp_path)
        append_vppo_section(readme, make_config(tmp_path))
        once = open(readme).read()
        append_vppo_section(readme, make_config(tmp_path))
        assert open(readme).read() == once

        append_vppo_section(readme, make_config(tmp_path, entropy_penalty_coef=0.06))
        card = open(readme).read()
        assert card.count(SECTION_BEGIN) == 1 and card.count(SECTION_END) == 1
        assert "| Entropy penalty coefficient | 0.06 |" in card
        assert "| Entropy penalty coefficient | 0.0 |" not in card
        assert card == once.replace("| Entropy penalty coefficient | 0.0 |", "| Entropy penalty coefficient | 0.06 |")

    def test_card_without_citations_gets_it_at_the_end(self, tmp_path):
        readme = tmp_path / "README.md"
        readme.write_text("# My model\n\nTrained by hand.\n")
        append_vppo_section(str(readme), make_config(tmp_path))
        append_vppo_section(str(readme), make_config(tmp_path))
        card = readme.read_text()
        assert card.startswith("# My model\n\nTrained by hand.\n\n" + SECTION_BEGIN)
        assert card.endswith(SECTION_END + "\n") and card.count(SECTION_BEGIN) == 1


class TestLocalBaseModel:
    def test_names_the_local_folder_instead_of_none(self, tmp_path):
        card = generate_model_card(
            base_model=None, model_name="tiny-VPPO", hub_model_id="tiny-VPPO", dataset_name=None, tags=["vppo"],
            wandb_url=None, trackio_url=None, comet_url=None, trainer_name="VPPO",
        )  # fmt: skip
        path = tmp_path / "README.md"
        card.save(str(path))
        assert "[None]" in path.read_text()  # what TRL writes for a model loaded from a folder
        append_vppo_section(str(path), make_config(tmp_path), base_model="./tiny-qwen2.5-vl")
        text = path.read_text()
        assert "None" not in text.split("## VPPO")[0]
        assert "This model is a fine-tuned version of the local model `./tiny-qwen2.5-vl`." in text

    def test_hub_base_model_is_left_as_trl_wrote_it(self, tmp_path):
        path = write_trl_card(tmp_path)
        append_vppo_section(path, make_config(tmp_path), base_model="Qwen/Qwen2.5-VL-7B-Instruct")
        text = open(path).read()
        assert "[Qwen/Qwen2.5-VL-7B-Instruct](https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct)" in text
