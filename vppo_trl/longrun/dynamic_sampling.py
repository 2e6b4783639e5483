"""Dynamic sampling (DAPO), the base algorithm of the VPPO paper, on TRL's GRPOTrainer.

A prompt group whose rewards are all equal (all answers right, or all wrong) has zero advantage everywhere: it adds no
policy gradient but still takes its share of the batch and of the loss normaliser. Dynamic sampling drops such groups
and generates on the next prompts of the training data until the batch is full of informative groups.
"""

import math
import sys
from collections import deque
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import has_length
from transformers.utils import logging

from ..method.batch_rows import concatenate_rows, select_rows
from ..method.shared_state import SharedStateMixin

logger = logging.get_logger(__name__)


class PromptStream:
    """The Trainer's epoch iterator, from which dynamic sampling also draws the next generation batches.

    TRL's sampler yields each generation batch `block` times in a row (`steps_per_generation * num_iterations` training
    steps): the first copy is generated on, the others only pace the training steps. Drawing a batch takes its whole
    block out of the stream, so the Trainer, which iterates this stream, ends the epoch once every prompt was used.
    """

    def __init__(self, source: Iterator, block: int, epoch: int):
        self.source = source
        self.block = block
        self.epoch = epoch
        self.consumed = 0  # items taken from `source`, by the Trainer or by `draw`
        self._pending: deque = deque()  # copies of the current batch that the Trainer has not taken yet

    def __iter__(self) -> "PromptStream":
        return self

    def __next__(self) -> Any:
        return self._pending.popleft() if self._pending else self._pull()

    def _pull(self) -> Any:
        item = next(self.source)
        self.consumed += 1
        return item

    def position(self) -> dict[str, int]:
        """Where the stream is in the data, enough to rebuild it on a fresh iterator of the same epoch."""
        return {"epoch": self.epoch, "consumed": self.consumed, "pending": len(self._pending)}

    @classmethod
    def resume(cls, source: Iterator, block: int, epoch: int, consumed: int, pending: int) -> "PromptStream":
        """
        The stream at a saved `position()`, on a fresh iterator that yields the same items as the saved one.

        The pending copies only pace the Trainer's steps (GRPO generates on the first copy of a block), so the last
        items pulled serve as well as the original ones.
        """
        stream = cls(source, block, epoch)
        for _ in range(consumed):
            item = stream._pull()
            if consumed - stream.consumed < pending:
                stream._pending.append(item)
        return stream

    def draw(self) -> Any | None:
        """The next generation batch of the data, or `None` when the epoch has no more."""
        try:
            while self.consumed % self.block:
                self._pending.append(self._pull())
            batch = self._pull()
        except StopIteration:
            return None
        with suppress(StopIteration):
            for _ in range(self.block - 1):
                self._pull()
        return batch


SHORTFALL_ADVICE = (
    "Raise dynamic_sampling_max_rounds, widen (dynamic_sampling_min, dynamic_sampling_max), filter on another reward "
    "(dynamic_sampling_reward) or use data of better suited difficulty"
)


@dataclass
class ShortfallCount:
    """Generation batches of one `train()` call, and those the round limit left short (all processes together)."""

    batches: int = 0
    short_batches: int = 0
    groups: int = 0
    uninformative_groups: int = 0

    def add(self, short: bool, found: int, target: int) -> None:
        self.batches += 1
        self.groups += target
        if short:
            self.short_batches += 1
            self.uninformative_groups += target - found

    def summary(self, max_rounds: int) -> str:
        return (
            f"Dynamic sampling: the round limit (dynamic_sampling_max_rounds={max_rounds}) left {self.short_batches} "
            f"of {self.batches} generation batches short; they were topped up with {self.uninformative_groups} "
            f"uninformative groups of the {self.groups} trained on ({self.uninformative_groups / self.groups:.1%}). "
            f"{SHORTFALL_ADVICE}."
        )


class _EpochProgressCallback(TrainerCallback):
    """Reports `state.epoch` from the data consumed: with dynamic sampling an epoch takes fewer optimizer steps."""

    def __init__(self, trainer: "DynamicSamplingMixin"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, train_dataloader=None, **kwargs):
        stream = self.trainer._prompt_stream
        if stream is not None and has_length(train_dataloader):
            state.epoch = stream.epoch + stream.consumed / len(train_dataloader)


class DynamicSamplingMixin(SharedStateMixin):
    """
    Dynamic sampling for [`~trl.GRPOTrainer`] subclasses, on with `dynamic_sampling=True` in the config.

    Each process generates on its local generation batch as usual, then keeps the prompt groups whose filter reward
    (`dynamic_sampling_reward`) is not uniform and has a mean strictly between `dynamic_sampling_min` and
    `dynamic_sampling_max`. While any process lacks groups, every process generates on its next generation batch of the
    training data (one round), so all processes run the same generation rounds and collectives. Whole groups are kept,
    so their advantages stay those computed in their own round (with `scale_rewards="batch"`, normalised over that
    round's batch). The batch handed on has the structure and size of GRPO's.

    Logged per generation batch: `dynamic_sampling/rounds` (generation rounds, 1 when nothing was dropped),
    `dynamic_sampling/kept_fraction` (share of the generated groups that were informative),
    `dynamic_sampling/prompts_consumed` (prompts generated on, all processes), `dynamic_sampling/batch_fill` (share
    of the batch's groups that are informative: below 1 only when the round limit or the end of the data was reached)
    and `dynamic_sampling/round_limit_reached` (1 when the round limit left the batch short, else 0).

    A batch left short by the round limit is a condition that repeats (data too easy or too hard for the policy): it
    is warned about once, then counted, and the count is summarised when training ends.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._prompt_stream: PromptStream | None = None
        self._rng_checkpoint: str | None = None
        self._round_rewards: torch.Tensor | None = None
        self._shortfalls = ShortfallCount()
        if self.args.dynamic_sampling:
            name = self.args.dynamic_sampling_reward
            if name != "total" and name not in self.reward_func_names:
                raise ValueError(
                    f"dynamic_sampling_reward={name!r} is not one of the trainer's reward functions "
                    f"{self.reward_func_names}; use one of them, or 'total' for their weighted sum."
                )
            self.add_callback(_EpochProgressCallback(self))

    def train(self, *args, **kwargs):
        if not self.args.dynamic_sampling:
            return super().train(*args, **kwargs)
        # An epoch takes a data-dependent number of steps, so the step count cannot tell how far into the data a
        # checkpoint was: the prompt stream repositions itself from the saved state instead of the Trainer's skip.
        ignore_data_skip, self.args.ignore_data_skip = self.args.ignore_data_skip, True
        self._shortfalls = ShortfallCount()
        try:
            output = super().train(*args, **kwargs)
        finally:
            self.args.ignore_data_skip = ignore_data_skip
        if self._shortfalls.short_batches > 1 and self.accelerator.is_main_process:
            logger.warning(self._shortfalls.summary(self.args.dynamic_sampling_max_rounds))
        return output

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if self.args.dynamic_sampling and checkpoint is not None and self._prompt_stream is None:
            # The epoch's data iterator is created after this call and draws from the global RNG: restore once the
            # prompt stream is rebuilt on it (`get_batch_samples`), as the Trainer does when it skips batches.
            self._rng_checkpoint = checkpoint
            return
        super()._load_rng_state(checkpoint)

    def _training_state(self) -> dict[str, Any]:
        state = super()._training_state()
        stream = self._prompt_stream
        state["prompt_stream"] = None if stream is None else stream.position()
        return state

    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        if args.dynamic_sampling and args.max_steps > 0:
            # Epochs take a data-dependent number of steps: go over the data as often as `max_steps` needs.
            return (sys.maxsize, *values[1:])
        return values

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.args.dynamic_sampling:
            if self._prompt_stream is None or self._prompt_stream.source is not epoch_iterator:
                block = self.args.steps_per_generation * self.args.num_iterations
                resumed = (self.shared.resumed or {}).get("prompt_stream") if self._prompt_stream is None else None
                if resumed is not None:
                    self._prompt_stream = PromptStream.resume(epoch_iterator, block, **resumed)
                    checkpoint, self._rng_checkpoint = self._rng_checkpoint, None
                    super()._load_rng_state(checkpoint)
                else:
                    self._prompt_stream = PromptStream(epoch_iterator, block, epoch=math.floor(self.state.epoch))
            epoch_iterator = self._prompt_stream
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self.args.dynamic_sampling:
            self._round_rewards = rewards_per_func  # [global batch, reward functions], all processes
        return rewards_per_func

    def _generate_and_score_round(self, inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor | Any]:
        """One round of GRPO's generation and scoring; subclasses add per-completion fields here, which then follow
        the completions they belong to (a list or tensor with one entry per completion)."""
        return super()._generate_and_score_completions(inputs)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor | Any]:
        if not (self.args.dynamic_sampling and self.model.training):
            return self._generate_and_score_round(inputs)
        args = self.args
        target = len(inputs) // self.num_generations  # groups per process
        informative_pieces: list[dict[str, Any]] = []
        spare_pieces: list[dict[str, Any]] = []  # uninformative groups, to top up a batch that cannot be filled
        found = spares = generated = informative_generated = extra_rounds = 0
        out_of_data = False
        batch = inputs
        while True:
            output = self._generate_and_score_round(batch)
            informative = self._informative_groups(len(batch))
            generated += len(informative)
            informative_generated += int(informative.sum())
            take = informative.nonzero().squeeze(-1).tolist()[: target - found]
            missing = target - found - len(take)
            global_missing = int(self.accelerator.reduce(torch.tensor(missing, device=informative.device), "max"))
            if extra_rounds == 0 and global_missing == 0:
                self._log_dynamic_sampling(1, generated, informative_generated, target, target)
                return output  # every group of every process is informative: GRPO's batch as is
            if take:
                informative_pieces.append(select_rows(output, self._group_rows(take)))
                found += len(take)
            spare = (~informative).nonzero().squeeze(-1).tolist()[: max(missing - spares, 0)]
            if spare:
                spare_pieces.append(select_rows(output, self._group_rows(spare)))
                spares += len(spare)
            if global_missing == 0 or extra_rounds == args.dynamic_sampling_max_rounds:
                break
            batch = self._prompt_stream.draw() if self._prompt_stream is not None else None
            available = torch.tensor(batch is not None, device=informative.device)
            if int(self.accelerator.reduce(available.long(), "sum")) < self.accelerator.num_processes:
                out_of_data = True
                break
            extra_rounds += 1

        found_all, target_all = self._log_dynamic_sampling(
            1 + extra_rounds, generated, informative_generated, found, target, limited=not out_of_data
        )
        if found_all < target_all and not out_of_data:
            message = (
                f"Dynamic sampling found {found_all} informative prompt groups of the {target_all} that a generation "
                f"batch holds (all processes together) after {1 + extra_rounds} generation rounds "
                f"(dynamic_sampling_max_rounds={args.dynamic_sampling_max_rounds}). "
            )
            if args.dynamic_sampling_on_exhausted == "raise":
                raise RuntimeError(f"{message}{SHORTFALL_ADVICE}, or set dynamic_sampling_on_exhausted='continue'.")
            if self._shortfalls.short_batches == 1 and self.accelerator.is_main_process:
                logger.warning(
                    f"{message}The batch is topped up with uninformative groups. {SHORTFALL_ADVICE}. Reported once: "
                    "later batches left short are logged as dynamic_sampling/round_limit_reached and counted when "
                    "training ends."
                )
        pieces = informative_pieces + self._first_groups(spare_pieces, target - found)
        merged = concatenate_rows(pieces, self._tokenizer.pad_token_id)
        loss_mask = (
            merged["completion_mask"] * merged["tool_mask"] if "tool_mask" in merged else merged["completion_mask"]
        )
        merged["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        return merged

    def _informative_groups(self, local_size: int) -> torch.Tensor:
        """Bool `[local groups]`: which of this process's groups of the last round carry a learning signal."""
        rewards_per_func = self._round_rewards
        if self.args.dynamic_sampling_reward == "total":
            weights = self.reward_weights.to(rewards_per_func.device)
            rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
            rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan  # unscorable, as in TRL
        else:
            rewards = rewards_per_func[:, self.reward_func_names.index(self.args.dynamic_sampling_reward)]
        start = self.accelerator.process_index * local_size
        grouped = rewards[start : start + local_size].view(-1, self.num_generations)
        scored = ~torch.isnan(grouped)
        spread = torch.where(scored, grouped, -math.inf).amax(dim=1) - torch.where(scored, grouped, math.inf).amin(1)
        mean = torch.nanmean(grouped, dim=1)
        return (spread > 0) & (mean > self.args.dynamic_sampling_min) & (mean < self.args.dynamic_sampling_max)

    def _group_rows(self, groups: list[int]) -> list[int]:
        return [group * self.num_generations + i for group in groups for i in range(self.num_generations)]

    def _first_groups(self, pieces: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
        """The first `count` groups of `pieces`."""
        selected = []
        for piece in pieces:
            groups = min(len(piece["prompt_ids"]) // self.num_generations, count)
            if groups == 0:
                break
            selected.append(select_rows(piece, self._group_rows(list(range(groups)))))
            count -= groups
        return selected

    def _log_dynamic_sampling(
        self, rounds: int, generated: int, informative: int, found: int, target: int, limited: bool = True
    ) -> tuple[int, int]:
        """Log the batch's dynamic-sampling metrics and count it (`limited`: a shortfall is the round limit's, not
        the end of the data's); returns the informative and wanted groups over all processes."""
        counts = torch.tensor([generated, informative, found, target], device=self.accelerator.device)
        generated, informative, found, target = self.accelerator.reduce(counts, "sum").tolist()
        short = limited and found < target
        self._shortfalls.add(short, found, target)
        metrics = self._metrics["train"]
        metrics["dynamic_sampling/rounds"].append(rounds)
        metrics["dynamic_sampling/kept_fraction"].append(informative / generated)
        metrics["dynamic_sampling/prompts_consumed"].append(generated)
        metrics["dynamic_sampling/batch_fill"].append(found / target)
        metrics["dynamic_sampling/round_limit_reached"].append(float(short))
        return found, target
