"""The `vppo-trl` command: `vppo-trl train --config <recipe>.yaml [overrides...]`, `vppo-trl demo [...]`,
`vppo-trl spotlight --model ... --image ... --prompt ...`, `vppo-trl eval --model ... --benchmarks ...` and
`vppo-trl tiny --output-dir .` (the model and data of recipes/cpu_demo.yaml)."""

import argparse
import sys

COMMANDS = {
    "train": "Train with VPPO from a YAML recipe (`--config recipes/<recipe>.yaml`); flags override the recipe.",
    "demo": "Run the CPU demo: a tiny vision-language model learns a visual task with VPPO.",
    "spotlight": "Show which tokens of a model's answer depend on the image (chart, HTML, JSON).",
    "eval": "Evaluate like the paper (avg@k on its benchmarks), regrade, or compare runs (`eval compare`).",
    "tiny": "Write the tiny Qwen2.5-VL and colour dataset that recipes/cpu_demo.yaml trains on (built locally).",
}


def main(argv: list[str] | None = None) -> None:
    """Dispatch to a subcommand, which parses the rest of the command line itself."""
    parser = argparse.ArgumentParser(
        prog="vppo-trl",
        description="VPPO (Visually-Perceptive Policy Optimization) for vision-language models on TRL.",
        epilog="Run `vppo-trl <command> --help` for the options of a command.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, help_text in COMMANDS.items():
        # No help of their own: `vppo-trl train --help` must reach the training script's parser.
        subparsers.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)

    # Each subcommand's module is imported only when it runs.
    if args.command == "train":
        from .train import command as train_command

        train_command(rest, prog="vppo-trl train")
    elif args.command == "demo":
        from .tools.demo import main as demo_main

        demo_main(rest, prog="vppo-trl demo")
    elif args.command == "eval":
        from .tools.eval import main as eval_main

        eval_main(rest)
    elif args.command == "tiny":
        from .testing import tiny_main

        tiny_main(rest, prog="vppo-trl tiny")
    else:
        from .tools.spotlight import main as spotlight_main

        spotlight_main(rest)


if __name__ == "__main__":
    main()
