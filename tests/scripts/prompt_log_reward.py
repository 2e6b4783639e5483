"""A reward for runs of the training entry point (`reward_funcs: [prompt_log_reward.prompt_log_reward]`, with this
folder on PYTHONPATH) that records the prompts each process scored: tests/test_two_machines.py checks with it which
prompts each rank trained on, without changing the entry point.

Every process appends one JSON line per call to `$VPPO_PROMPT_LOG.rank<RANK>.jsonl`: its global rank, the text of
each distinct prompt of its batch and how many images that prompt has. The reward alternates 0 and 1 within each
batch, so that every group of completions is informative and dynamic sampling keeps it (a random tiny model never
earns the accuracy reward).
"""

import json
import os


def _prompt_text(prompt) -> str:
    """The text of a conversational prompt (its messages' text blocks), or the prompt itself if it is a string."""
    if isinstance(prompt, str):
        return prompt
    texts = []
    for message in prompt:
        content = message["content"]
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        texts += [block["text"] for block in blocks if block.get("type") == "text"]
    return " ".join(texts)


def prompt_log_reward(prompts, completions, images=None, **kwargs) -> list[float]:
    rank = int(os.environ["RANK"])
    seen = []
    for position, prompt in enumerate(prompts):
        entry = {"text": _prompt_text(prompt), "images": len(images[position] or []) if images else 0}
        if entry not in seen:
            seen.append(entry)
    with open(f"{os.environ['VPPO_PROMPT_LOG']}.rank{rank}.jsonl", "a") as log:
        log.write(json.dumps({"rank": rank, "prompts": seen}) + "\n")
    return [float(position % 2) for position in range(len(completions))]
