"""`make reproduce`: run every numbered notebook through papermill, in order, and write results/<notebook>/.

Each notebook gets `-p profile <profile>`, runs with `notebooks/` as its working directory, and is saved executed as
`results/<notebook>/<notebook>.ipynb` (smoke runs: into the cache, never under results/). A failing notebook stops
the run with its name and the failing cell. At the end the README's results section is regenerated.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .cache import PROJECT_ROOT
from .profiles import get_profile

NOTEBOOKS = PROJECT_ROOT / "notebooks"


def numbered_notebooks(folder: Path = NOTEBOOKS) -> list[Path]:
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def strip_machine_metadata(path: Path) -> None:
    """papermill records absolute paths and timestamps; keep the executed notebook free of them."""
    nb = json.loads(path.read_text())
    papermill = nb.get("metadata", {}).get("papermill", {})
    for key in ("input_path", "output_path"):
        if key in papermill:
            papermill[key] = Path(papermill[key]).name
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def run_notebook(notebook: Path, profile: str, kernel: str | None = None) -> tuple[Path, float]:
    import papermill

    prof = get_profile(profile)
    out_dir = prof.results_dir(notebook.stem)
    output = out_dir / notebook.name
    start = time.perf_counter()
    papermill.execute_notebook(str(notebook), str(output), parameters={"profile": profile}, cwd=str(notebook.parent),
                               kernel_name=kernel, progress_bar=False, log_output=True, report_mode=False)
    strip_machine_metadata(output)
    return output, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu", help="smoke | cpu | gpu | paper (default cpu)")
    parser.add_argument("--only", nargs="*", help="run only these notebooks (names or number prefixes)")
    parser.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's own)")
    args = parser.parse_args(argv)
    try:
        get_profile(args.profile)  # fail early on a bad name, or on the gpu profile without a GPU
    except (ValueError, RuntimeError) as error:
        print(f"tokenpo.reproduce: {error}", file=sys.stderr)
        return 2

    from papermill.exceptions import PapermillExecutionError

    notebooks = numbered_notebooks()
    if args.only:
        notebooks = [nb for nb in notebooks if any(nb.stem.startswith(key) for key in args.only)]
    if not notebooks:
        print("no notebooks to run", file=sys.stderr)
        return 2
    timings = {}
    for nb in notebooks:
        print(f"==> {nb.name} (profile {args.profile})", flush=True)
        try:
            output, seconds = run_notebook(nb, args.profile, args.kernel)
        except PapermillExecutionError as err:
            print(f"\nFAILED: {nb.name}, cell {err.cell_index} (execution count {err.exec_count}): "
                  f"{err.ename}: {err.evalue}", file=sys.stderr)
            return 1
        timings[nb.stem] = seconds
        figures = sorted(p.relative_to(PROJECT_ROOT) if p.is_relative_to(PROJECT_ROOT) else p
                         for p in output.parent.glob("*.png"))
        print(f"    done in {seconds / 60:.1f} min -> {output}")
        for fig in figures:
            print(f"    figure: {fig}")
    print("\nwall time per notebook: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()))
    if get_profile(args.profile).writes_results:
        from .report import update_readme

        update_readme()
        print("README.md results section regenerated from results/*/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
