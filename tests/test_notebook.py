"""The LoRA walkthrough notebook runs top to bottom in its tiny CPU configuration (papermill, kernel `python3`)."""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

papermill = pytest.importorskip("papermill")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "lora_walkthrough.ipynb"
KERNEL = "python3"


@pytest.fixture(scope="session")
def python3_kernel() -> str:
    """The `python3` kernel, registered in this environment if Jupyter does not know it yet."""
    from jupyter_client.kernelspec import KernelSpecManager

    if KERNEL not in KernelSpecManager().find_kernel_specs():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", KERNEL], check=True)
    return KERNEL


@pytest.mark.slow
def test_notebook_runs_in_tiny_cpu_mode(tmp_path, python3_kernel):
    output_dir = tmp_path / "walkthrough"
    executed = papermill.execute_notebook(
        str(NOTEBOOK),
        str(tmp_path / "executed.ipynb"),
        parameters={"tiny": True, "device": "cpu", "max_steps": 1, "output_dir": str(output_dir)},
        kernel_name=python3_kernel,
        cwd=str(tmp_path),
        progress_bar=False,
    )

    # papermill raises on a failing cell; check that every code cell ran, and that the metrics table shows VPPO's.
    code_cells = [cell for cell in executed.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code_cells)
    outputs = "".join(
        str(output.get("text", "")) + str(output.get("data", {}).get("text/plain", ""))
        for cell in code_cells
        for output in cell.outputs
    )
    assert "vppo/token_fraction" in outputs

    with Image.open(output_dir / "token_perception.png") as image:
        assert image.format == "PNG"
        image.verify()
    adapter = output_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
