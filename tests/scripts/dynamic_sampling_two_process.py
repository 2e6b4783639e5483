"""Run by `accelerate launch` in the two-process dynamic sampling test: one epoch, each rank's view recorded."""

import json
import sys

from vppo_trl import VPPOConfig, VPPOTrainer
from vppo_trl.testing import COLOURS, build_tiny_vlm, exit_cleanly, make_colour_dataset

GROUP = 4


class RecordingTrainer(VPPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompt_ids: list[int] = []
        self.batches: list[dict] = []

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self.prompt_ids.extend(example["pid"] for example in inputs)
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        advantages = output["advantages"]  # [B] or, after VPPO's token filtering, [B, T]
        zero_rows = (advantages.reshape(len(advantages), -1) == 0).all(dim=1)
        uninformative = int(zero_rows.view(-1, GROUP).all(dim=1).sum())
        self.batches.append({"rows": len(advantages), "uninformative_groups": uninformative})
        return output


def parity_reward(completions, pid, **kwargs) -> list[float]:
    """Uniform groups for even prompt ids, binary completion-dependent rewards for odd ones."""
    return [1.0 if p % 2 == 0 else float(len(str(c)) % 2) for c, p in zip(completions, pid, strict=True)]


def main(output_path: str) -> None:
    model, processor = build_tiny_vlm("qwen2_5_vl", extra_words=COLOURS)
    args = VPPOConfig(
        output_dir=output_path + ".out",
        per_device_train_batch_size=8,
        num_generations=GROUP,
        max_completion_length=4,
        num_train_epochs=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=11,
        dynamic_sampling=True,
        dynamic_sampling_reward="parity_reward",
        dynamic_sampling_max_rounds=8,
    )
    trainer = RecordingTrainer(
        model=model,
        reward_funcs=parity_reward,
        args=args,
        train_dataset=make_colour_dataset(32, seed=3).add_column("pid", list(range(32))),
        processing_class=processor,
    )
    trainer.train()
    rank = trainer.accelerator.process_index
    result = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "global_step": trainer.state.global_step,
        "epoch": trainer.state.epoch,
        "prompt_ids": trainer.prompt_ids,
        "batch_rows": [batch["rows"] for batch in trainer.batches],
        "uninformative_groups": [batch["uninformative_groups"] for batch in trainer.batches],
        "metrics": [
            {key: value for key, value in entry.items() if key.startswith("dynamic_sampling/")}
            for entry in trainer.state.log_history
            if "dynamic_sampling/rounds" in entry
        ],
    }
    with open(f"{output_path}.rank{rank}.json", "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1])
    exit_cleanly()
