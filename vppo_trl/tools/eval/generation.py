"""Generation backends: batched Hugging Face `generate`, and vLLM. Both sample `k` completions per problem."""

import copy
import hashlib
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import GenerationConfig
from trl.data_utils import prepare_multimodal_messages

VLLM_MISSING = (
    "The vLLM backend needs vLLM, which is not installed: pip install 'vppo-trl[vllm]' (vLLM 0.22 to 0.31), "
    "or use --backend hf."
)


@dataclass
class Completion:
    text: str
    length: int  # generated tokens, end-of-sequence token excluded


def chunk_seed(seed: int, benchmark: str, chunk: int) -> int:
    """
    Seed of one chunk of problems, from the run seed, the benchmark and the chunk's position. Chunks are fixed
    slices of the benchmark, so a resumed or sharded run draws exactly the samples an uninterrupted one does.
    """
    digest = hashlib.sha256(f"{seed}/{benchmark}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _conversations(prompts: list[list[dict]], images: list[list[Image.Image]]) -> list[list[dict]]:
    pairs = zip(prompts, images, strict=True)
    return [prepare_multimodal_messages(copy.deepcopy(prompt), images=list(imgs)) for prompt, imgs in pairs]


class HFBackend:
    """`model.generate` on a batch of problems (left-padded), `k` sampled completions each."""

    def __init__(self, model, processor, *, temperature: float, top_p: float, max_new_tokens: int):
        self.model, self.processor = model, processor
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        eos = model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        pad = model.generation_config.pad_token_id
        self.stop_ids |= {pad} if pad is not None else set()

    def _generation_config(self, k: int) -> GenerationConfig:
        """
        The protocol's sampling and nothing else: a checkpoint's own `generation_config.json` is not inherited
        (Qwen2.5-VL's sets top_k=1, top_p=0.001 and repetition_penalty=1.05, which would turn k samples into one).
        """
        own = self.model.generation_config
        return GenerationConfig(
            do_sample=self.temperature > 0,
            temperature=self.temperature if self.temperature > 0 else None,
            top_p=self.top_p if self.temperature > 0 else None,
            top_k=0 if self.temperature > 0 else None,
            repetition_penalty=1.0,
            max_new_tokens=self.max_new_tokens,
            num_return_sequences=k,
            bos_token_id=own.bos_token_id,
            eos_token_id=own.eos_token_id,
            pad_token_id=own.pad_token_id,
        )

    @torch.no_grad()
    def generate(self, prompts: list[list[dict]], images: list[list[Image.Image]], k: int, seed: int):
        # Rendered, then processed with padding, as GRPOTrainer does; left padding so that completions follow prompts.
        texts = [
            self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
            for conversation in _conversations(prompts, images)
        ]
        flat_images = [image for problem_images in images for image in problem_images]
        inputs = self.processor(
            text=texts, images=flat_images or None, padding=True, padding_side="left", return_tensors="pt"
        ).to(self.model.device)
        torch.manual_seed(seed)
        output = self.model.generate(**inputs, generation_config=self._generation_config(k))
        completions = output[:, inputs["input_ids"].size(1) :].tolist()
        results = []
        for ids in completions:
            length = next((position for position, token in enumerate(ids) if token in self.stop_ids), len(ids))
            text = self.processor.decode(ids[:length], skip_special_tokens=True)
            results.append(Completion(text, length))
        return [results[index * k : (index + 1) * k] for index in range(len(prompts))]


def vllm_engine_kwargs(
    model: str,
    *,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    max_model_len: int | None = None,
    dtype: str = "auto",
    seed: int = 0,
    max_images_per_prompt: int = 8,
) -> dict:
    """Arguments of `vllm.LLM` for evaluation."""
    if tensor_parallel_size < 1:
        raise ValueError(f"--tensor-parallel-size must be >= 1, got {tensor_parallel_size}.")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization must lie in (0, 1], got {gpu_memory_utilization}.")
    kwargs = {
        "model": model,
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "dtype": dtype,
        "seed": seed,
        "limit_mm_per_prompt": {"image": max_images_per_prompt},
    }
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    return kwargs


def vllm_sampling_kwargs(k: int, *, temperature: float, top_p: float, max_new_tokens: int, seed: int) -> dict:
    """Arguments of one problem's `vllm.SamplingParams`: `k` completions, seeded per problem."""
    # top_k and repetition_penalty explicit: vLLM may otherwise take them from the checkpoint's generation config.
    return {
        "n": k,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": -1,
        "repetition_penalty": 1.0,
        "max_tokens": max_new_tokens,
        "seed": seed,
    }


class VLLMBackend:
    """vLLM offline generation; each problem's request carries its own seed."""

    def __init__(self, processor, engine_kwargs: dict, *, temperature: float, top_p: float, max_new_tokens: int):
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise RuntimeError(VLLM_MISSING) from None
        self.processor, self.sampling_params_class = processor, SamplingParams
        self.llm = LLM(**engine_kwargs)
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens

    def generate(self, prompts: list[list[dict]], images: list[list[Image.Image]], k: int, seed: int):
        requests, params = [], []
        for index, (conversation, problem_images) in enumerate(
            zip(_conversations(prompts, images), images, strict=True)
        ):
            text = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
            request = {"prompt": text}
            if problem_images:
                request["multi_modal_data"] = {"image": list(problem_images)}
            requests.append(request)
            sampling = vllm_sampling_kwargs(
                k,
                temperature=self.temperature,
                top_p=self.top_p,
                max_new_tokens=self.max_new_tokens,
                seed=seed + index,
            )
            params.append(self.sampling_params_class(**sampling))
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [[Completion(out.text, len(out.token_ids)) for out in output.outputs] for output in outputs]
