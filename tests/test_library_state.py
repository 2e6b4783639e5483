"""The trainer loads no viewer or command line, and the package's pictures leave the user's matplotlib as it is."""

import json
import subprocess
import sys
import textwrap

IMPORTS = """
import json, sys
import vppo_trl.trainer
print(json.dumps(sorted(sys.modules)))
"""

# Modules training does not need: the viewer, the command lines, evaluation, the demo, the test helpers, plotting.
NOT_FOR_TRAINING = (
    "vppo_trl.tools.spotlight",
    "vppo_trl.tools.spotlight_callback",
    "vppo_trl.tools.spotlight_page",
    "vppo_trl.cli",
    "vppo_trl.train",
    "vppo_trl.tools.eval",
    "vppo_trl.tools.demo",
    "vppo_trl.testing",
    "matplotlib",
)


def test_importing_the_trainer_loads_no_viewer_cli_eval_demo_or_testing_module():
    printed = subprocess.run([sys.executable, "-c", IMPORTS], check=True, capture_output=True, text=True).stdout
    loaded = json.loads(printed.strip().splitlines()[-1])
    assert "vppo_trl.trainer" in loaded
    unwanted = [name for name in loaded if any(name == m or name.startswith(f"{m}.") for m in NOT_FOR_TRAINING)]
    assert unwanted == []


PICTURES = """
import json, sys
import matplotlib
matplotlib.use("svg")
from PIL import Image
from vppo_trl.tools.eval.run import plot_comparison, plot_results
from vppo_trl.tools.spotlight import TokenPerception
from vppo_trl.tools.spotlight_page import save_distributions_png, save_perception_png

out = sys.argv[1]
item = TokenPerception(tokens=["red", "<|im_end|>"], dependency=[0.5, 0.001], kept=[True, False],
                       trajectory_dependency=0.25, completion="red", special=[False, True], advantage_scale=1.0)
image = Image.new("RGB", (28, 28), "red")
save_perception_png([item], [image], [image], "What colour?", f"{out}/perception.png")
save_distributions_png([0.5, 0.001], [0.25], f"{out}/distributions.png")
benchmark = {"title": "colour", "avg@2": 0.5}
plot_results({"k": 2, "benchmarks": {"colour": benchmark}, "mean": {"avg@2": 0.5},
              "settings": {"model": "m"}}, f"{out}/results.png")
row = {"title": "colour", "difference": 0.1, "low": -0.1, "high": 0.3}
plot_comparison({"comparisons": [{"rows": [row], "candidate": "b", "baseline": "a"}]}, f"{out}/compare.png")
print(json.dumps({"backend": matplotlib.get_backend(), "pyplot": "matplotlib.pyplot" in sys.modules}))
"""


def test_pictures_leave_the_users_backend_alone(tmp_path):
    command = [sys.executable, "-c", textwrap.dedent(PICTURES), str(tmp_path)]
    printed = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    state = json.loads(printed.strip().splitlines()[-1])
    assert state == {"backend": "svg", "pyplot": False}
    for name in ("perception.png", "distributions.png", "results.png", "compare.png"):
        with open(tmp_path / name, "rb") as picture:
            assert picture.read(8) == b"\x89PNG\r\n\x1a\n", name
