"""corral in a Jupyter notebook: a real notebook executed by nbclient in a real ipykernel.

``progress=True`` draws a widget there (the kernel's stderr is no terminal, yet someone is
watching), the widget ends at the total, no text reaches stderr and no tqdm thread starts;
``pool.stats()`` as a cell's value is an HTML table, the same as its text; a function
defined in the notebook (a kernel's ``__main__``, no file behind it) runs in the workers;
and a kernel without ipywidgets hears at the call what to install.

The kernel runs this test's own interpreter: a kernelspec written to a temporary folder
names ``sys.executable``, so a ``python3`` kernel installed elsewhere on the machine (in
another environment) cannot stand in for it. The client drives the kernel over Unix
sockets (no TCP ports to race for on a busy machine) and shuts it down before the test
ends; the kernel's pool is closed by the notebook itself, so no process outlives the test.
"""

from __future__ import annotations

import ast
import json
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from tests.test_stats import html_lines, text_lines

# Seconds for the kernel to start and for each cell: a kernel's start on a loaded 2-core CI
# machine takes 10-20 s, a cell starting a process pool a few.
KERNEL_BOUND = 120
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
KERNEL_NAME = "corral-test"

# The test's own event loop only drives the client's sockets; the loop under test is the
# kernel's, the same either way, so one loop suffices for starting a kernel.
pytestmark = [pytest.mark.loops("asyncio"), pytest.mark.timeout(3 * KERNEL_BOUND)]


@pytest.fixture
def kernels(tmp_path: Path) -> KernelSpecManager:
    """A kernelspec running this interpreter's ipykernel, found only through the returned
    manager (nothing installed, no environment variable set)."""
    folder = tmp_path / "kernels" / KERNEL_NAME
    folder.mkdir(parents=True)
    spec = {
        # frozen_modules=off: 3.11+ debugger support warns on stderr otherwise.
        "argv": [
            sys.executable,
            "-Xfrozen_modules=off",
            "-m",
            "ipykernel_launcher",
            "-f",
            "{connection_file}",
        ],
        "display_name": f"corral tests ({sys.executable})",
        "language": "python",
    }
    (folder / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])


async def run_notebook(
    cells: list[str], kernels: KernelSpecManager, folder: Path
) -> nbformat.NotebookNode:
    """The notebook of these code cells, executed top to bottom in a fresh kernel started
    in folder; raises ``CellExecutionError`` at a cell that raises. The kernel is shut
    down when this returns or raises."""
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(textwrap.dedent(cell).strip()) for cell in cells]
    )
    # The kernel's sockets in a short folder of their own: a Unix socket's path may not
    # pass 107 bytes, which a deep pytest tmp_path can.
    with tempfile.TemporaryDirectory(prefix="corral-nb-") as sockets:
        # The async manager, not the sync one: its sync wrappers run a loop on a thread of
        # their own that outlives the test (jupyter_core's run_sync).
        manager = AsyncKernelManager(
            kernel_name=KERNEL_NAME,
            kernel_spec_manager=kernels,
            transport="ipc",
            ip=str(Path(sockets) / "kernel"),
        )
        client = NotebookClient(
            notebook,
            km=manager,
            timeout=KERNEL_BOUND,
            startup_timeout=KERNEL_BOUND,
            resources={"metadata": {"path": str(folder)}},
        )
        # cleanup_kc: shut the kernel down at the end, as nbclient does with a manager of
        # its own making.
        await client.async_execute(cleanup_kc=True)
    return notebook


def outputs(cell: nbformat.NotebookNode, kind: str) -> list[Any]:
    """A cell's outputs of one type ("display_data", "execute_result", "stream", ...)."""
    return [out for out in cell.outputs if out.output_type == kind]


def value(cell: nbformat.NotebookNode) -> str:
    """The plain text of a cell's value."""
    (result,) = outputs(cell, "execute_result")
    return str(result.data["text/plain"])


def bar_of(cell: nbformat.NotebookNode, notebook: nbformat.NotebookNode) -> dict[str, Any]:
    """The one progress widget a cell displayed, as its final state: the label's text, the
    bar's value, maximum and style, and the counts' text."""
    (shown,) = [out for out in outputs(cell, "display_data") if WIDGET_VIEW in out.data]
    models = notebook.metadata.widgets[WIDGET_STATE]["state"]
    box = models[shown.data[WIDGET_VIEW]["model_id"]]
    assert box["model_name"] == "HBoxModel"
    label, bar, counts = (
        models[child.removeprefix("IPY_MODEL_")]["state"] for child in box["state"]["children"]
    )
    return {
        "label": label["value"].replace("\u2007", " "),  # tqdm pads with figure spaces
        "value": bar["value"],
        "max": bar["max"],
        "style": bar["bar_style"],
        "counts": counts["value"].replace("\u2007", " "),
    }


@pytest.fixture
def notebook_folder(tmp_path: Path) -> Path:
    """The kernel's working folder."""
    folder = tmp_path / "notebook"
    folder.mkdir()
    return folder


async def test_progress_is_a_widget_and_stats_an_html_table(
    kernels: KernelSpecManager, notebook_folder: Path
) -> None:
    """In a notebook, ``map`` and ``imap`` with ``progress=True`` each display one widget
    whose bar ends full at the total, marked a success; no text reaches stdout or stderr
    and tqdm starts no monitor thread. ``pool.stats()`` as a cell's value is an HTML table
    with the same cells as its text table, which is also its plain-text view. The mapped
    function is defined in the notebook, and the workers run it."""
    notebook = await run_notebook(
        [
            """
            import corral
            pool = corral.Pool(2)
            await pool.start()
            """,
            """
            def square(x):
                return x * x

            results = await pool.map(square, range(200), chunksize=10, progress=True)
            len(results), sum(results)
            """,
            """
            [y async for y in pool.imap(square, range(50), progress=True)]
            """,
            """
            pool.stats()
            """,
            """
            import threading
            from tqdm._monitor import TMonitor

            await pool.close()
            [t.name for t in threading.enumerate() if isinstance(t, TMonitor)]
            """,
        ],
        kernels,
        notebook_folder,
    )
    _, mapped, streamed, stats, closed = notebook.cells
    for cell in notebook.cells:  # no text bar, no warning, on stdout or stderr
        assert not outputs(cell, "stream"), cell.outputs

    assert ast.literal_eval(value(mapped)) == (200, sum(x * x for x in range(200)))
    bar = bar_of(mapped, notebook)
    assert (bar["label"], bar["value"], bar["max"], bar["style"]) == (
        "map square: 100%",
        200,
        200,
        "success",
    )
    assert bar["counts"].startswith(" 200/200 [")  # then the time and the rate

    assert ast.literal_eval(value(streamed)) == [x * x for x in range(50)]
    bar = bar_of(streamed, notebook)
    assert (bar["label"], bar["value"], bar["max"], bar["style"]) == (
        "imap square: 100%",
        50,
        50,
        "success",
    )
    assert bar["counts"].startswith(" 50/50 [")

    (shown,) = outputs(stats, "execute_result")
    page, text = shown.data["text/html"], shown.data["text/plain"]
    assert "<table>" in page
    assert text.startswith("2 workers, 0 queued, 0 in flight, ")
    assert "(0 failed)" in text
    assert html_lines(page) == text_lines(text)
    assert sum(1 for line in text.splitlines() if " process " in line) == 2

    assert value(closed) == "[]"  # no tqdm monitor thread in the kernel


async def test_a_kernel_without_ipywidgets_is_told_what_to_install(
    kernels: KernelSpecManager, notebook_folder: Path
) -> None:
    """In a kernel where ipywidgets cannot be imported, ``progress=True`` on ``imap`` and
    on ``map`` raises ImportError at the call naming the extra to install; without a bar
    the same map works."""
    notebook = await run_notebook(
        [
            """
            import sys
            sys.modules["ipywidgets"] = None  # as if the extra were not installed
            import corral

            def square(x):
                return x * x

            messages = []
            async with corral.Pool(1, kind="thread") as pool:
                try:
                    pool.imap(square, range(3), progress=True)
                except ImportError as exc:
                    messages.append(str(exc))
                try:
                    await pool.map(square, range(3), progress=True)
                except ImportError as exc:
                    messages.append(str(exc))
                plain = await pool.map(square, range(3))
            messages, plain
            """
        ],
        kernels,
        notebook_folder,
    )
    (cell,) = notebook.cells
    messages, plain = ast.literal_eval(value(cell))
    assert len(messages) == 2
    for message in messages:
        assert "ipywidgets is not installed" in message
        assert "pip install 'corral[notebook]'" in message
    assert plain == [0, 1, 4]
