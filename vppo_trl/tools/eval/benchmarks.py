"""The paper's eight benchmarks: where their data lives, and loading them (or any local file) for evaluation.

The paper's numbers were measured on the official VPPO evaluation data (Hub dataset `chamber111/VPPO-Eval`, a
`data/` folder for the LLaMA-Factory based PAPO-Eval harness: a `dataset_info.json` naming one ShareGPT-style JSON
file per benchmark, `messages` = [user turn with `<image>` placeholders, assistant turn holding the answer] and
`images` = paths relative to the folder). MathVerse, MathVision and DynaMath are filtered there to problems with an
exactly checkable answer. `--data-root` points at such a folder; each benchmark's file is found through its
`dataset_info.json`. Without it, the benchmarks whose original Hub dataset already has the training layout are
read from the Hub.
"""

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset

from ...data import INSTRUCTION_SUFFIX, load_vppo_dataset

PAPER_DATA_ID = "chamber111/VPPO-Eval"


@dataclass(frozen=True)
class HubSource:
    """A Hub dataset in the training layout, read by `load_vppo_dataset` as it is."""

    repo_id: str
    split: str
    problem_column: str = "problem"
    answer_column: str = "answer"
    images_column: str = "images"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark of the paper's table."""

    name: str
    title: str
    source: str  # the original dataset, as the official VPPO README names it
    paper_name: str  # its name in the PAPO-Eval / VPPO-Eval `dataset_info.json`
    answers: str  # what the gold answers are: "letter" (multiple choice), "math" or "mixed"
    hub: HubSource | None = None  # direct Hub route, where the original dataset has the training layout
    evidence: str = ""  # what the entry's facts rest on


BENCHMARKS: dict[str, Benchmark] = {
    benchmark.name: benchmark
    for benchmark in (
        Benchmark(
            "geo3k",
            "Geo3k",
            "hiyouga/geometry3k",
            "hiyouga_geometry3k",
            "math",
            hub=HubSource("hiyouga/geometry3k", "test"),
            evidence="Hub dataset card: columns images (image list), problem, answer; test split of 601 rows; "
            "paper name from PAPO-Eval's dataset_info.json",
        ),
        Benchmark(
            "wemath",
            "We-Math",
            "We-Math/We-Math",
            "We-Math_We-Math",
            "letter",
            evidence="PAPO-Eval's dataset_info.json; the original has options in a separate column (no Hub route)",
        ),
        Benchmark(
            "mmk12",
            "MMK12",
            "FanqingM/MMK12",
            "PAPO_MMK12",
            "mixed",
            hub=HubSource("FanqingM/MMK12", "test", problem_column="question", images_column="image"),
            evidence="PAPO-Eval's dataset_info.json; Hub columns question/answer/image as in this project's paper "
            "recipes (not seen on real data here)",
        ),
        Benchmark(
            "mathverse",
            "MathVerse",
            "AI4Math/MathVerse",
            "AI4Math_MathVerse",
            "mixed",
            evidence="PAPO-Eval's dataset_info.json; the original testmini has query/question_for_eval columns and "
            "is filtered for the paper (no Hub route)",
        ),
        Benchmark(
            "mathvision",
            "MathVision",
            "MathLLMs/MathVision",
            "MathVision",
            "mixed",
            evidence="official VPPO README (added by VPPO-Eval, filtered); file looked up by name in "
            "dataset_info.json, not seen",
        ),
        Benchmark(
            "dynamath",
            "DynaMath",
            "DynaMath/DynaMath_Sample",
            "DynaMath",
            "mixed",
            evidence="official VPPO README (added by VPPO-Eval, filtered); file looked up by name in "
            "dataset_info.json, not seen",
        ),
        Benchmark(
            "logicvista",
            "LogicVista",
            "lscpku/LogicVista",
            "lscpku_LogicVista",
            "letter",
            evidence="PAPO-Eval's dataset_info.json; original layout not checked (no Hub route)",
        ),
        Benchmark(
            "mmmu_pro",
            "MMMU-Pro",
            "MMMU/MMMU_Pro",
            "MMMU_MMMU_Pro",
            "letter",
            evidence="PAPO-Eval's dataset_info.json; the original keeps options as a string and images in "
            "image_1..image_7 columns (no Hub route)",
        ),
    )
}


def resolve_benchmarks(names: str | list[str]) -> list[Benchmark]:
    """Registry entries for comma-separated or listed names ("all" for the eight), failing on an unknown one."""
    if isinstance(names, str):
        names = [name for name in names.split(",") if name.strip()]
    names = [name.strip().lower().replace("-", "_") for name in names]
    if names == ["all"]:
        return list(BENCHMARKS.values())
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        guesses = {name: difflib.get_close_matches(name, list(BENCHMARKS), n=1) for name in unknown}
        hints = "".join(f" Did you mean {guess[0]!r} for {name!r}?" for name, guess in guesses.items() if guess)
        raise ValueError(f"Unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)} (or 'all').{hints}")
    return [BENCHMARKS[name] for name in dict.fromkeys(names)]


def _paper_file(data_root: Path, benchmark: Benchmark) -> tuple[Path, Path, dict]:
    """
    The data folder (the one holding `dataset_info.json`; image paths start there, as in LLaMA-Factory), the
    benchmark's file and its `dataset_info.json` entry.
    """
    info_path = data_root / "dataset_info.json"
    if not info_path.is_file() and (data_root / "data" / "dataset_info.json").is_file():
        data_root, info_path = data_root / "data", data_root / "data" / "dataset_info.json"
    if not info_path.is_file():
        raise FileNotFoundError(
            f"No dataset_info.json in {str(data_root)!r}: --data-root must be the `data` folder of {PAPER_DATA_ID}."
        )
    info = json.loads(info_path.read_text(encoding="utf-8"))
    key = benchmark.paper_name.lower()
    matches = [name for name in info if name.lower() == key] or [name for name in info if key in name.lower()]
    if len(matches) != 1:
        found = "no entry" if not matches else f"several entries {matches}"
        raise ValueError(
            f"{info_path} has {found} for benchmark {benchmark.name!r} (looked for {benchmark.paper_name!r}); "
            f"its entries are {sorted(info)}."
        )
    entry = info[matches[0]]
    if "file_name" not in entry:
        raise ValueError(f"{info_path}: entry {matches[0]!r} has no file_name.")
    return data_root, data_root / entry["file_name"], entry


def _sharegpt_rows(path: Path, entry: dict, image_folder: Path) -> list[dict]:
    """
    Rows of a LLaMA-Factory ShareGPT file in the training layout: the user turn is the problem (its `<image>`
    placeholders kept), the assistant turn the answer, image paths made absolute. A row that does not have this
    shape gets `None` fields, which the training loader reports with the row's index.
    """
    columns = {"messages": "messages", "images": "images", **entry.get("columns", {})}
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    tags |= entry.get("tags", {})
    records = json.loads(path.read_text(encoding="utf-8"))
    rows = []
    for index, record in enumerate(records):
        turns = record.get(columns["messages"]) or []
        turns = [turn for turn in turns if isinstance(turn, dict)]
        by_role = {turn.get(tags["role_tag"]): turn.get(tags["content_tag"]) for turn in turns}
        images = record.get(columns["images"]) or []
        rows.append(
            {
                "id": str(record.get("id", index)),
                "problem": by_role.get(tags["user_tag"]),
                "answer": by_role.get(tags["assistant_tag"]),
                "images": [str(image_folder / image) if isinstance(image, str) else image for image in images],
            }
        )
    return rows


def load_benchmark(
    benchmark: Benchmark,
    data_root: str | None,
    *,
    cache_dir: Path,
    on_bad_row: str = "raise",
    max_problems: int | None = None,
    instruction_suffix: str = INSTRUCTION_SUFFIX,
) -> Dataset:
    """
    The benchmark's problems in the training layout (`prompt`, `images`, `answer`, `id`), through the training data
    loader, so that prompts, placeholders and row validation are exactly those of training.
    """
    common = dict(on_bad_row=on_bad_row, max_rows=max_problems, instruction_suffix=instruction_suffix)
    if data_root is not None:
        root = Path(data_root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"--data-root {data_root!r} is not a folder.")
        root, path, entry = _paper_file(root, benchmark)
        if not path.is_file():
            raise FileNotFoundError(f"Benchmark {benchmark.name!r}: file {str(path)!r} does not exist.")
        cache_dir.mkdir(parents=True, exist_ok=True)
        converted = cache_dir / f"{benchmark.name}.jsonl"
        rows = _sharegpt_rows(path, entry, image_folder=root.absolute())
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if not converted.is_file() or converted.read_text(encoding="utf-8") != text:
            converted.write_text(text, encoding="utf-8")
        dataset, _ = load_vppo_dataset(str(converted), "test", **common)
        return dataset
    if benchmark.hub is None:
        raise ValueError(
            f"Benchmark {benchmark.name!r} ({benchmark.source}) has no Hub source in the training layout: download "
            f"{PAPER_DATA_ID} (`hf download {PAPER_DATA_ID} --repo-type dataset --local-dir vppo-eval`) and pass "
            "--data-root vppo-eval/data."
        )
    hub = benchmark.hub
    try:
        dataset, _ = load_vppo_dataset(
            hub.repo_id,
            hub.split,
            problem_column=hub.problem_column,
            answer_column=hub.answer_column,
            images_column=hub.images_column,
            **common,
        )
    except ConnectionError as error:
        raise ConnectionError(
            f"Benchmark {benchmark.name!r}: {error}. Without Hub access, copy {PAPER_DATA_ID} here and pass "
            "--data-root."
        ) from None
    return dataset
