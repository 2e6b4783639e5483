"""The one-screen table printed at the end of a check run."""

from __future__ import annotations

from typing import Any


def _num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.1f} GiB"


def _overhead(section: dict[str, Any]) -> list[str]:
    lines = []
    for name in ("skip_off", "half_uniform"):
        run = section.get(name)
        if run:
            lines.append(
                f"{name}: efficiency {_num(run['overhead_efficiency'])} (target <= {run['efficiency_target']}), "
                f"step ratio {_num(run['ratio'], 3)}, peak-memory ratio {_num(run['peak_mem_ratio'], 3)}, "
                f"skipped {_num(run['skipped_fraction'])}"
            )
    return lines


def _lora(section: dict[str, Any]) -> list[str]:
    return [
        f"peak {_gib(section['peak_mem_bytes'])}, adapter tensors moved {section['adapter_tensors_moved']}/"
        f"{section['adapter_tensors']}, base tensors changed {len(section['base_tensors_changed'])}",
        f"adapter calls inside the perturbed passes: {section['adapter_calls_in_perturbed_passes']} "
        f"({section['perturbed_passes']} passes)",
    ]


def _qwen3(section: dict[str, Any]) -> list[str]:
    fractions = ", ".join(_num(f) for f in section["perturbed_patch_rows_changed_fraction"])
    return [
        f"peak {_gib(section['peak_mem_bytes'])}, losses {', '.join(_num(x, 4) for x in section['losses'])}",
        f"patch rows changed by the perturbation: {fractions}",
    ]


def _zero3(section: dict[str, Any]) -> list[str]:
    prints = section["fingerprints"]
    return [
        f"{section['processes']} process(es), steps {section['steps_first']} then {section['steps_resumed']}, "
        f"{section['checkpoint']} complete: {section['checkpoint_complete']}",
        f"resumed weights = checkpoint's: {prints['resumed_begin'] == prints['first_end']}, "
        f"peak {_gib(section['peak_mem_bytes_first'])} / {_gib(section['peak_mem_bytes_resumed'])}",
    ]


DETAILS = {"overhead": _overhead, "lora": _lora, "qwen3": _qwen3, "zero3": _zero3}


def print_table(results: dict[str, Any]) -> None:
    run = results["run"]
    load = "/".join(f"{x:.1f}" for x in run["load_average_start"])
    print(f"\n{run['device']} | torch {run['versions']['torch']}, transformers {run['versions']['transformers']} | "
          f"{run.get('wall_s', 0):.0f} s of {run['budget_s']:.0f} s | load average at start {load}")  # fmt: skip
    for name in DETAILS:
        section = results.get(name)
        if section is None:
            continue
        status = "ok  " if section["ok"] else "FAIL"
        print(f"{status} {name:<9} {section['seconds']:6.0f} s (expected {section['expected_s']:.0f} s, "
              f"{section['steps']} steps)")  # fmt: skip
        if "error" in section:
            print(f"       error: {section['error'].splitlines()[0][:200]}")
            continue
        for line in DETAILS[name](section):
            print(f"       {line}")
        failed = [check for check, passed in section["checks"].items() if not passed]
        if failed:
            print(f"       failed checks: {', '.join(failed)}")
