"""Run by `accelerate launch` in tests/test_vllm_processes.py: VPPO with a colocated vLLM engine in each process, two
steps per job, recording after every weight sync how the engine's weights compare with the trainer's.

    two_process_vllm.py OUTPUT_PATH MODEL_DIR DATA

MODEL_DIR is a saved tiny VLM whose heads vLLM's CPU attention serves; DATA is `repeated_images` (the same 4 images
every step) or `alternating_text` (rank 1 gets only text-only prompts). One job per launch: a process holds one
engine. Each rank writes OUTPUT_PATH.rank{R}.json.
"""

import json
import sys

import torch
from two_process_vppo import Recorder, alternating_text_dataset

from vppo_trl import VPPOConfig, VPPOTrainer
from vppo_trl.testing import exit_cleanly, make_colour_dataset


def alternating_reward(completions, **kwargs) -> list[float]:
    """1 and 0 in turn within each group of 4 (text-only ones too): every advantage non-zero, so every step trains."""
    return [float(index % 2) for index in range(len(completions))]


def engine_view(engine: torch.Tensor, trainer: torch.Tensor) -> torch.Tensor:
    """The part of an engine tensor that holds the trainer's: vLLM pads the vocabulary rows of the embedding and the
    LM head."""
    return engine[tuple(slice(0, size) for size in trainer.shape)]


class SyncRecorder:
    """Wraps the trainer's `vllm_generation.sync_weights`: after each sync, every trainer parameter the engine holds
    as it is is compared with the engine's copy (gathered first under ZeRO-3, on every rank alike). vLLM's CPU build
    keeps linear weights packed in its kernels' format (an empty parameter is left): those are checked through the
    engine's log-probs, which TRL compares with the trainer's (`sampling/sampling_logp_difference`)."""

    def __init__(self, trainer: VPPOTrainer):
        self.trainer, self.records, self.first_engine = trainer, [], None
        generation = trainer.vllm_generation
        self.original_sync = generation.sync_weights
        generation.sync_weights = self.sync_and_record

    def engine_model(self) -> torch.nn.Module:
        return self.trainer.vllm_generation.llm.llm_engine.model_executor.driver_worker.model_runner.model

    def sync_and_record(self) -> None:
        self.original_sync()
        generation = self.trainer.vllm_generation
        engine_model, model = self.engine_model(), generation.model
        engine = {name: param for name, param in engine_model.named_parameters() if param.numel()}
        with generation._dist.gather_params(list(model.parameters())):
            trainer = {name: param.data.detach().clone() for name, param in model.named_parameters()}
        # vLLM's own renaming of checkpoint names; fused (q/k/v, gate/up) and packed tensors have no counterpart
        matches = {name: engine_model.hf_to_vllm_mapper.map_name(name) for name in trainer}
        matches = {name: engine_name for name, engine_name in matches.items() if engine_name in engine}
        snapshot = {name: engine_view(engine[match], trainer[name]).clone() for name, match in matches.items()}
        self.first_engine = self.first_engine or snapshot
        exact = [name for name in matches if torch.equal(snapshot[name], trainer[name].to(snapshot[name].dtype))]
        changed = [name for name in matches if not torch.equal(snapshot[name], self.first_engine[name])]
        self.records.append(
            {
                "step": self.trainer.state.global_step,
                "trainer_parameters": len(trainer),
                "matched": sorted(matches),
                "equal_to_trainer": sorted(exact),
                "changed_since_first_sync": sorted(changed),
                "engine_dtype": str(next(iter(snapshot.values())).dtype),
                "engine_checksum": sum(tensor.double().sum().item() for tensor in snapshot.values()),
            }
        )


DATASETS = {
    # 4 prompts per step over both processes: every step shows the engine the images it saw before the last sync
    "repeated_images": lambda: make_colour_dataset(4, seed=3),
    "alternating_text": lambda: alternating_text_dataset(32),
}


def train(output_path: str, model_dir: str, data: str) -> None:
    args = VPPOConfig(
        output_dir=f"{output_path}.out",
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=5,
        max_steps=2,
        learning_rate=1e-2,  # a step moves every weight by more than the engine dtype's rounding
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        logging_steps=1,
        seed=11,
        shuffle_dataset=data == "repeated_images",
        use_vllm=True,
        vllm_mode="colocate",
        vllm_max_model_length=512,
    )
    trainer = VPPOTrainer(
        model=model_dir,
        reward_funcs=alternating_reward,
        args=args,
        train_dataset=DATASETS[data](),
    )
    syncs = SyncRecorder(trainer)
    with Recorder() as recorder:
        trainer.train()
    rank = trainer.accelerator.process_index
    result = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "global_step": trainer.state.global_step,
        "syncs": syncs.records,
        "images_per_step": recorder.images_per_step,
        "tas": recorder.tas,
        "logs": [entry for entry in trainer.state.log_history if "loss" in entry],
    }
    with open(f"{output_path}.rank{rank}.json", "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    train(*sys.argv[1:4])
    exit_cleanly()
