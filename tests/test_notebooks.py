"""The notebooks in notebooks/ run top to bottom (quick mode) in a Jupyter kernel of this
interpreter, so they cannot rot; they are stored without outputs."""

import importlib
import json
import os
import re
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

# Under CI a missing Jupyter package fails the run instead of skipping the notebooks.
_need = importlib.import_module if os.environ.get("CI") else pytest.importorskip
nbformat = _need("nbformat")
nbclient = _need("nbclient")
_need("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

# Run after the quickstart, in its kernel: its printed claims recomputed independently
# (loss from logits in numpy, the pruned steps from a plain argsort of the scores).
QUICKSTART_CHECKS = textwrap.dedent("""
    import numpy as _np

    def _naive_loss(m, tokens):
        logits = _np.asarray(dj.apply(m, tokens[:, :-1]), _np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - _np.log(_np.exp(logits).sum(-1, keepdims=True))
        return -_np.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

    assert abs(_naive_loss(model, valid) - results["full model"]) < 1e-4
    _want = _np.sort(_np.argsort(scores["block_influence"].values, kind="stable")[N_PRUNE:])
    assert _np.asarray(pruned["block_influence"].program.block).tolist() == _want.tolist()
    printed = results[f"block_influence: + linear r{LINEAR_RANK}"]
    assert abs(_naive_loss(recovered, valid) - printed) < 1e-4
    assert (_np.asarray(pruned["attn_ablation"].program.attn) == 0).sum() == 2 * N_PRUNE
    assert edits["loop the middle pair twice"].depth == model.depth + 2
    print("NOTEBOOK CHECKS PASSED")
""")


def _kernel_manager(tmp: Path):
    """A kernel of this test's interpreter (not whatever `python3` spec Jupyter finds)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = tmp / "kernels" / "depthjax-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "depthjax test",
                "language": "python",
            }
        )
    )
    ksm = KernelSpecManager(kernel_dirs=[str(tmp / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name="depthjax-test", kernel_spec_manager=ksm)


def _execute(path: Path, extra_cells: list[str], monkeypatch, tmp_path):
    monkeypatch.setenv("DEPTHJAX_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("DEPTHJAX_NOTEBOOK_WORK", str(tmp_path / "work"))
    # A persistent compilation cache (shared with test_train): compiling dominates a tiny run.
    monkeypatch.setenv(
        "JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "depthjax-test-jax-cache")
    )
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    nb = nbformat.read(path, as_version=4)
    nb.cells += [nbformat.v4.new_code_cell(src) for src in extra_cells]
    client = nbclient.NotebookClient(
        nb,
        km=_kernel_manager(tmp_path),
        timeout=300,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    return nb


def _outputs(cell, mime: str) -> list[str]:
    return [
        o["data"][mime]
        for o in cell.get("outputs", [])
        if o["output_type"] in ("display_data", "execute_result") and mime in o["data"]
    ]


def _stream(cell) -> str:
    return "".join(o["text"] for o in cell.get("outputs", []) if o["output_type"] == "stream")


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name} cell {i} holds outputs: store notebooks stripped"
            )


@pytest.mark.slow
def test_quickstart_runs(monkeypatch, tmp_path):
    nb = _execute(NOTEBOOKS / "quickstart.ipynb", [QUICKSTART_CHECKS], monkeypatch, tmp_path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "NOTEBOOK CHECKS PASSED" in _stream(code[-1])
    # The model, the recovered model and the edited models render as HTML step tables.
    html = [h for c in code for h in _outputs(c, "text/html")]
    assert sum("<b>DepthModel</b>" in h for h in html) >= 2
    assert any("adapter" in h for h in html)  # the recovered model
    assert any("LoRA r=" in h and "tied with" in h for h in html)  # tie + relax
    assert any(re.search(r"g\d+ ┐", h) for h in html)  # a parallel group
    # Training progress and every plot came out.
    assert "[train] done" in "".join(_stream(c) for c in code)
    assert sum(len(_outputs(c, "image/png")) for c in code) >= 3
