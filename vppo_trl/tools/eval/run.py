"""Run an evaluation (generate, grade, resume), regrade it, write its reports, and compare runs."""

import importlib.util
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ...data import (
    INSTRUCTION_SUFFIX,
    ON_BAD_ROW_CHOICES,
    PAPER_MAX_PIXELS,
    PAPER_MIN_PIXELS,
    fit_image_pixels,
    load_vppo_dataset,
)
from ...rewards import accuracy_reward, extract_boxed_answer
from .benchmarks import load_benchmark, resolve_benchmarks
from .generation import VLLM_MISSING, chunk_seed
from .metrics import benchmark_metrics, paired_bootstrap

SAMPLES_FILE, RESULTS_FILE, RUN_FILE = "samples.jsonl", "results.json", "run.json"
# Settings that change the samples: a resumed run must use the same ones.
_SAMPLING_FIELDS = (
    "model",
    "adapter",
    "benchmarks",
    "data",
    "data_root",
    "k",
    "temperature",
    "top_p",
    "max_new_tokens",
    "seed",
    "batch_size",
    "min_pixels",
    "max_pixels",
    "instruction_suffix",
    "max_problems",
    "backend",
)


@dataclass
class EvalConfig:
    """What an evaluation run generates on and how; stored in `run.json` and `results.json`."""

    model: str | None = field(
        default=None, metadata={"help": "Hub model id or local folder (a VPPO checkpoint, a base model...)."}
    )
    output_dir: str = field(
        default="eval", metadata={"help": "Folder of the run's outputs; an unfinished run there is resumed."}
    )
    adapter: str | None = field(default=None, metadata={"help": "LoRA adapter folder, merged into the model (HF)."})
    benchmarks: list[str] = field(
        default_factory=list, metadata={"help": "Benchmark names, comma-separated or several, or 'all'."}
    )
    data: list[str] = field(
        default_factory=list,
        metadata={"help": "Local file or folder in the training data layout; repeatable.", "action": "append"},
    )
    data_root: str | None = field(
        default=None, metadata={"help": "The `data` folder of the paper's evaluation data (chamber111/VPPO-Eval)."}
    )
    k: int = field(default=8, metadata={"help": "Samples per problem (the paper: 8)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (the paper: 1.0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling (default %(default)s)."})
    max_new_tokens: int = field(default=2048, metadata={"help": "Longest completion (the 7B paper run: 2048)."})
    seed: int = field(default=0, metadata={"help": "Sampling seed; each chunk of problems derives its own."})
    batch_size: int = field(default=8, metadata={"help": "Problems generated together (x k sequences)."})
    min_pixels: int | None = field(
        default=PAPER_MIN_PIXELS,
        metadata={
            "help": "Smaller images are scaled up to this many pixels (default: the paper's %(default)s; 'none')."
        },
    )
    max_pixels: int | None = field(
        default=PAPER_MAX_PIXELS,
        metadata={
            "help": "Larger images are scaled down to this many pixels (default: the paper's %(default)s; 'none')."
        },
    )
    instruction_suffix: str = field(
        default=INSTRUCTION_SUFFIX, metadata={"help": "Appended to every problem ('' for none)."}
    )
    max_problems: int | None = field(
        default=None, metadata={"help": "Evaluate the first N problems of each benchmark (quick runs)."}
    )
    on_bad_row: str = field(
        default="raise",
        metadata={"help": "Stop at invalid rows, or skip them.", "choices": list(ON_BAD_ROW_CHOICES)},
    )
    backend: str = field(
        default="hf", metadata={"help": "Generation engine (default %(default)s).", "choices": ["hf", "vllm"]}
    )
    device: str | None = field(
        default=None, metadata={"help": "Device of the HF backend (default: the accelerate process's device)."}
    )
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto, bfloat16, float16, float32."})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM: GPUs per model copy."})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vLLM: share of GPU memory it may take."})
    max_model_len: int | None = field(default=None, metadata={"help": "vLLM: context length (prompt + completion)."})

    def __post_init__(self):
        # From the command line: `--benchmarks geo3k,mmk12` and `--data a --data b` (nested lists).
        if isinstance(self.benchmarks, str):
            self.benchmarks = [self.benchmarks]
        if isinstance(self.data, str):
            self.data = [self.data]
        self.benchmarks = [name.strip() for entry in self.benchmarks for name in entry.split(",") if name.strip()]
        self.data = [path for entry in self.data for path in (entry if isinstance(entry, list) else [entry])]

    def check(self) -> None:
        """Refuse settings that cannot work, before anything is loaded."""
        if self.model is None:
            raise ValueError("--model is required (a Hub model id or a local folder).")
        if not self.benchmarks and not self.data:
            raise ValueError("Nothing to evaluate: pass --benchmarks NAME,... and/or --data FILE_OR_FOLDER.")
        names = [benchmark.name for benchmark in resolve_benchmarks(self.benchmarks)] if self.benchmarks else []
        names += [data_name(source) for source in self.data]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(
                f"Two benchmarks or data files are named {repeated[0]!r}; rename one (names key samples)."
            )
        for name, value, low in (
            ("k", self.k, 1),
            ("batch_size", self.batch_size, 1),
            ("max_new_tokens", self.max_new_tokens, 1),
        ):
            if value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}.")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"Need temperature >= 0 and 0 < top_p <= 1, got {self.temperature} and {self.top_p}.")
        if self.temperature == 0 and self.k > 1:
            raise ValueError("temperature 0 is greedy decoding: all k samples would be the same; use --k 1.")
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"--backend must be 'hf' or 'vllm', got {self.backend!r}.")
        if self.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise RuntimeError(VLLM_MISSING)  # before any data or model is loaded
        if self.backend == "vllm" and self.adapter is not None:
            raise ValueError("--adapter works with --backend hf; for vLLM, merge the adapter into the model first.")
        named = [("Data file or folder", path) for path in self.data]
        named += [("--data-root folder", self.data_root), ("Adapter folder", self.adapter)]
        for what, path in named:
            if path is not None and not Path(path).expanduser().exists():
                raise FileNotFoundError(f"{what} {path!r} does not exist.")
        looks_local = self.model.startswith((".", "/", "~")) or self.model.count("/") > 1
        if looks_local and not Path(self.model).expanduser().exists():
            raise FileNotFoundError(f"Model folder {self.model!r} does not exist.")

    def sampling_settings(self) -> dict:
        return {name: getattr(self, name) for name in _SAMPLING_FIELDS}


# ----------------------------------------------------------------------------------------------------------------
# Samples on disk
# ----------------------------------------------------------------------------------------------------------------


def _sample_files(output_dir: Path) -> list[Path]:
    """`samples.jsonl` and the per-process files of a run in progress."""
    return sorted(output_dir.glob("samples*.jsonl"))


def read_samples(output_dir: Path) -> dict[tuple[str, str], list[dict]]:
    """Samples already written, by (benchmark, problem id). A line cut off by an interruption is ignored."""
    samples: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for path in _sample_files(output_dir):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            samples[(record["benchmark"], record["problem_id"])][record["sample"]] = record
    return {key: [by_index[i] for i in sorted(by_index)] for key, by_index in samples.items()}


def grade(completion: str, answer: str) -> tuple[str | None, float]:
    """The training reward's verdict on one completion, and the answer it extracted."""
    return extract_boxed_answer(completion), accuracy_reward([completion], [answer])[0]


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


def _load_model(config: EvalConfig, device):
    """Model and processor, or a one-line error when the model cannot be found."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(config.model)
        if config.backend == "vllm":
            return None, processor
        model = AutoModelForImageTextToText.from_pretrained(config.model, dtype=config.dtype)
    except OSError as error:
        reason = str(error).strip().splitlines()[0]
        where = "" if Path(config.model).expanduser().exists() else "there is no such local folder, and "
        raise FileNotFoundError(f"Cannot load model {config.model!r}: {where}{reason}") from None
    if config.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, config.adapter).merge_and_unload()
    return model.to(device).eval(), processor


def _make_backend(config: EvalConfig, device):
    from .generation import HFBackend, VLLMBackend, vllm_engine_kwargs

    model, processor = _load_model(config, device)
    sampling = dict(temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens)
    if config.backend == "vllm":
        engine = vllm_engine_kwargs(
            config.model,
            tensor_parallel_size=config.tensor_parallel_size,
            dtype=config.dtype,
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_model_len=config.max_model_len,
            seed=config.seed,
        )
        return VLLMBackend(processor, engine, **sampling)
    return HFBackend(model, processor, **sampling)


def data_name(source: str) -> str:
    """The name a local data file or folder is reported under: its file name without extension."""
    return Path(source.rstrip("/")).stem


def _suites(config: EvalConfig, output_dir: Path):
    """(name, title, dataset) of every benchmark and local data source of the run, loaded lazily."""
    common = dict(on_bad_row=config.on_bad_row, instruction_suffix=config.instruction_suffix)
    for benchmark in resolve_benchmarks(config.benchmarks) if config.benchmarks else []:
        yield (
            benchmark.name,
            benchmark.title,
            lambda b=benchmark: load_benchmark(
                b, config.data_root, cache_dir=output_dir / "data", max_problems=config.max_problems, **common
            ),
        )
    for source in config.data:
        name = data_name(source)
        yield name, name, lambda s=source: load_vppo_dataset(s, "test", max_rows=config.max_problems, **common)[0]


def _problem_ids(dataset, name: str) -> list[str]:
    has_ids = "id" in dataset.column_names
    ids = [str(value) for value in dataset["id"]] if has_ids else [str(index) for index in range(len(dataset))]
    if len(set(ids)) != len(ids):
        duplicated = sorted({value for value in ids if ids.count(value) > 1})[:5]
        raise ValueError(f"{name}: problem ids must be unique; repeated: {duplicated}.")
    return ids


def _check_resume(config: EvalConfig, output_dir: Path) -> None:
    run_path = output_dir / RUN_FILE
    if run_path.is_file():
        stored = json.loads(run_path.read_text(encoding="utf-8"))["settings"]
        changed = {
            key: (stored.get(key), value)
            for key, value in config.sampling_settings().items()
            if stored.get(key) != value
        }
        if changed and _sample_files(output_dir):
            details = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
            raise ValueError(
                f"{output_dir} holds samples of a run with other settings ({details}); use another --output-dir."
            )


def process_state():
    """accelerate's process state; on a machine without GPUs, `accelerate launch` processes meet over gloo."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def evaluate(config: EvalConfig) -> dict:
    """
    Evaluate `config.model` on the configured benchmarks and data, write `samples.jsonl`, `results.json`,
    `results.md` and `results.png` into `config.output_dir`, and return the results.

    Problems whose `k` samples are already in the output folder are not generated again, so an interrupted run
    resumes where it stopped, with the same samples it would have drawn (each chunk of `batch_size` problems is
    seeded from the run seed, the benchmark and the chunk's position). Under `accelerate launch`, each process
    generates every n-th chunk and the main process writes the reports.
    """
    from tqdm.auto import tqdm

    config.check()
    state = process_state()
    if config.backend == "vllm" and state.num_processes > 1:
        raise ValueError(
            "--backend vllm runs in one process (--tensor-parallel-size spreads a model over GPUs); use the HF "
            "backend under accelerate launch, or start vLLM runs on separate benchmarks and GPUs yourself."
        )
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _check_resume(config, output_dir)
    state.wait_for_everyone()
    if state.is_main_process:
        settings = {"settings": config.sampling_settings(), "suites": []}
        (output_dir / RUN_FILE).write_text(json.dumps(settings, indent=2), encoding="utf-8")
    done = read_samples(output_dir)
    suites, work = [], []
    for name, title, load in _suites(config, output_dir):
        with state.main_process_first():  # one process converts and caches the data, the others reuse it
            dataset = load()
        ids = _problem_ids(dataset, name)
        suites.append({"name": name, "title": title, "problem_ids": ids})
        for chunk, start in enumerate(range(0, len(ids), config.batch_size)):
            todo = [
                i
                for i in range(start, min(start + config.batch_size, len(ids)))
                if len(done.get((name, ids[i]), [])) < config.k
            ]
            if todo:
                work.append((name, dataset, ids, chunk, start, todo))
    work = work[state.process_index :: state.num_processes]
    if work:
        device = config.device or state.device
        backend = _make_backend(config, device)
        part = output_dir / f"samples.part{state.process_index}.jsonl"
        total = sum(len(todo) for *_, todo in work)
        with (
            part.open("a", encoding="utf-8") as handle,
            tqdm(total=total, unit="problem", desc="Evaluating", disable=not state.is_local_main_process) as progress,
        ):
            for name, dataset, ids, chunk, start, todo in work:
                rows = [dataset[i] for i in range(start, min(start + config.batch_size, len(ids)))]
                images = [
                    [fit_image_pixels(image, config.min_pixels, config.max_pixels) for image in row["images"]]
                    for row in rows
                ]
                generated = backend.generate(
                    [row["prompt"] for row in rows], images, config.k, chunk_seed(config.seed, name, chunk)
                )
                for index in todo:
                    row, completions = rows[index - start], generated[index - start]
                    for sample, completion in enumerate(completions):
                        extracted, score = grade(completion.text, row["answer"])
                        record = {
                            "benchmark": name,
                            "problem_id": ids[index],
                            "sample": sample,
                            "answer": row["answer"],
                            "completion": completion.text,
                            "extracted": extracted,
                            "score": score,
                            "length": completion.length,
                        }
                        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                progress.update(len(todo))
    state.wait_for_everyone()
    results = None
    if state.is_main_process:
        settings["suites"] = [{"name": s["name"], "title": s["title"]} for s in suites]
        (output_dir / RUN_FILE).write_text(json.dumps(settings, indent=2), encoding="utf-8")
        results = _finish(output_dir, config.k, suites, settings["settings"])
    state.wait_for_everyone()
    return results if results is not None else json.loads((output_dir / RESULTS_FILE).read_text(encoding="utf-8"))


def _finish(output_dir: Path, k: int, suites: list[dict], settings: dict, regrade: bool = False) -> dict:
    """Merge the samples into `samples.jsonl` (in problem order), compute the metrics, write the reports."""
    samples = read_samples(output_dir)
    ordered, benchmarks = [], {}
    for suite in suites:
        by_problem = {}
        for problem_id in suite.get("problem_ids") or [pid for (name, pid) in samples if name == suite["name"]]:
            records = samples.get((suite["name"], problem_id), [])
            if len(records) < k:
                raise ValueError(
                    f"{suite['name']}: problem {problem_id!r} has {len(records)} of {k} samples; run the "
                    "evaluation again to complete it."
                )
            if regrade:
                for record in records:
                    record["extracted"], record["score"] = grade(record["completion"], record["answer"])
            by_problem[problem_id] = records[:k]
            ordered.extend(records[:k])
        benchmarks[suite["name"]] = {"title": suite["title"], **benchmark_metrics(by_problem, k)}
    merged = output_dir / (SAMPLES_FILE + ".tmp")
    merged.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in ordered), encoding="utf-8")
    merged.replace(output_dir / SAMPLES_FILE)
    for part in output_dir.glob("samples.part*.jsonl"):
        part.unlink()
    metric_names = [f"avg@{k}", f"maj@{k}", "no_boxed_share", "mean_length"]
    mean = {name: sum(b[name] for b in benchmarks.values()) / len(benchmarks) for name in metric_names}
    mean["pass@k"] = {
        j: sum(b["pass@k"][j] for b in benchmarks.values()) / len(benchmarks)
        for j in next(iter(benchmarks.values()))["pass@k"]
    }
    results = {"settings": settings, "k": k, "benchmarks": benchmarks, "mean": mean}
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2), encoding="utf-8")
    (output_dir / "results.md").write_text(results_table(results), encoding="utf-8")
    plot_results(results, output_dir / "results.png")
    return results


def regrade(output_dir: str) -> dict:
    """Grade the samples of a finished or interrupted run again (e.g. after a grader fix), without generating."""
    folder = Path(output_dir)
    if not (folder / RUN_FILE).is_file():
        raise FileNotFoundError(f"{output_dir!r} holds no evaluation run ({RUN_FILE} is missing).")
    run = json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))
    if not run["suites"]:
        raise ValueError(f"The run in {output_dir!r} never finished loading its benchmarks; evaluate it first.")
    return _finish(folder, run["settings"]["k"], run["suites"], run["settings"], regrade=True)


# ----------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------


def results_table(results: dict) -> str:
    """Markdown table of a run: one row per benchmark and the mean over benchmarks, accuracies in percent."""
    k = results["k"]
    passes = list(next(iter(results["benchmarks"].values()))["pass@k"])
    header = [
        "benchmark",
        "problems",
        f"avg@{k}",
        *(f"pass@{j}" for j in passes[1:]),
        f"maj@{k}",
        "no boxed",
        "mean length",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = [(b["title"], str(b["problems"]), b) for b in results["benchmarks"].values()]
    rows.append(("**mean**", "", results["mean"]))
    for title, problems, values in rows:
        cells = [title, problems, f"{100 * values[f'avg@{k}']:.1f}"]
        cells += [f"{100 * values['pass@k'][j]:.1f}" for j in passes[1:]]
        cells += [
            f"{100 * values[f'maj@{k}']:.1f}",
            f"{100 * values['no_boxed_share']:.1f}%",
            f"{values['mean_length']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_results(results: dict, path: Path) -> None:
    """Bar chart of avg@k per benchmark and the mean over benchmarks."""
    from matplotlib.figure import Figure  # a Figure of its own: the user's backend is left as it is

    k = results["k"]
    titles = [b["title"] for b in results["benchmarks"].values()] + ["Mean"]
    values = [100 * b[f"avg@{k}"] for b in results["benchmarks"].values()] + [100 * results["mean"][f"avg@{k}"]]
    figure = Figure(figsize=(max(4.0, 0.9 * len(titles) + 1.5), 3.2))
    axis = figure.subplots()
    bars = axis.bar(titles, values, color=["tab:blue"] * (len(titles) - 1) + ["tab:orange"])
    axis.bar_label(bars, fmt="%.1f", fontsize=8)
    axis.set_ylabel(f"avg@{k} (%)")
    axis.set_ylim(0, max(100.0, max(values) * 1.1))
    axis.set_title(Path(str(results["settings"]["model"])).name)
    axis.tick_params(axis="x", labelrotation=30)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def compare(
    result_paths: list[str],
    labels: list[str] | None = None,
    output_dir: str | None = None,
    resamples: int = 10_000,
    seed: int = 0,
) -> dict:
    """
    Compare runs with the first one: per benchmark and for the mean over benchmarks, the difference in avg@k and its
    paired bootstrap 95% interval over the problems both runs evaluated. Writes `compare.json`, `compare.md` and
    `compare.png` into `output_dir` when given.
    """
    if len(result_paths) < 2:
        raise ValueError("compare needs at least two results.json files: the baseline first, then the others.")
    runs = []
    for path in result_paths:
        file = Path(path) / RESULTS_FILE if Path(path).is_dir() else Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"{path!r} is not a results.json file or a folder holding one.")
        runs.append(json.loads(file.read_text(encoding="utf-8")))
    labels = labels or [Path(path).parent.name if Path(path).suffix else Path(path).name for path in result_paths]
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} results.")
    baseline = runs[0]
    comparisons = []
    for label, run in zip(labels[1:], runs[1:], strict=True):
        names = [name for name in baseline["benchmarks"] if name in run["benchmarks"]]
        if not names:
            raise ValueError(f"{labels[0]} and {label} have no benchmark in common.")
        base_scores, cand_scores, rows = [], [], []
        for name in names:
            base, cand = baseline["benchmarks"][name]["per_problem"], run["benchmarks"][name]["per_problem"]
            common = [problem for problem in base if problem in cand]
            if not common:
                raise ValueError(f"{name}: {labels[0]} and {label} have no problem in common.")
            base_scores.append([base[p] for p in common])
            cand_scores.append([cand[p] for p in common])
            rows.append({"benchmark": name, "title": baseline["benchmarks"][name]["title"], "problems": len(common)})
        per_benchmark, overall = paired_bootstrap(base_scores, cand_scores, resamples=resamples, seed=seed)
        for row, base, cand, (difference, low, high) in zip(
            rows, base_scores, cand_scores, per_benchmark, strict=True
        ):
            row.update(
                baseline=sum(base) / len(base),
                candidate=sum(cand) / len(cand),
                difference=difference,
                low=low,
                high=high,
            )
        mean = {
            "benchmark": "mean",
            "title": "Mean",
            "problems": sum(r["problems"] for r in rows),
            "baseline": sum(r["baseline"] for r in rows) / len(rows),
            "candidate": sum(r["candidate"] for r in rows) / len(rows),
            "difference": overall[0],
            "low": overall[1],
            "high": overall[2],
        }
        comparisons.append({"baseline": labels[0], "candidate": label, "rows": rows + [mean]})
    report = {"resamples": resamples, "seed": seed, "comparisons": comparisons}
    if output_dir is not None:
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "compare.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        (folder / "compare.md").write_text(compare_table(report), encoding="utf-8")
        plot_comparison(report, folder / "compare.png")
    return report


def compare_table(report: dict) -> str:
    """Markdown tables of a comparison, accuracies and differences in points (percent)."""
    parts = []
    for comparison in report["comparisons"]:
        base, cand = comparison["baseline"], comparison["candidate"]
        lines = [
            f"**{cand}** vs **{base}** (paired bootstrap, {report['resamples']} resamples, 95% interval)\n",
            f"| benchmark | problems | {base} | {cand} | difference | 95% interval |",
            "|---|---|---|---|---|---|",
        ]
        for row in comparison["rows"]:
            lines.append(
                f"| {row['title']} | {row['problems']} | {100 * row['baseline']:.1f} | {100 * row['candidate']:.1f} "
                f"| {100 * row['difference']:+.1f} | [{100 * row['low']:+.1f}, {100 * row['high']:+.1f}] |"
            )
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def plot_comparison(report: dict, path: Path) -> None:
    """Differences with their intervals, one panel per compared run; an interval clear of 0 is significant."""
    from matplotlib.figure import Figure  # a Figure of its own: the user's backend is left as it is

    count = len(report["comparisons"])
    rows = len(report["comparisons"][0]["rows"])
    figure = Figure(figsize=(4.8 * count, 0.45 * rows + 1.4))
    axes = figure.subplots(1, count, squeeze=False)
    for axis, comparison in zip(axes[0], report["comparisons"], strict=True):
        titles = [row["title"] for row in comparison["rows"]][::-1]
        values = [100 * row["difference"] for row in comparison["rows"]][::-1]
        errors = [
            [100 * (row["difference"] - row["low"]) for row in comparison["rows"]][::-1],
            [100 * (row["high"] - row["difference"]) for row in comparison["rows"]][::-1],
        ]
        colours = [
            "tab:green" if row["low"] > 0 else "tab:red" if row["high"] < 0 else "tab:gray"
            for row in comparison["rows"]
        ][::-1]
        axis.barh(titles, values, xerr=errors, color=colours, capsize=3)
        axis.axvline(0, color="black", linewidth=0.8)
        axis.set_xlabel("difference in avg@k (points), 95% interval")
        axis.set_title(f"{comparison['candidate']} - {comparison['baseline']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
