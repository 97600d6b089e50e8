"""Build one ``recipe.yaml`` with rattler-build's Python API.

build_recipes runs this as a subprocess (``python -m tasks.recipes.rattler_build_runner``): each
build gets its own process, so its whole log (rattler-build's events and the build
script's output) goes to one file, a crash cannot take doit down, and parallel builds
under ``doit -n N`` do not share rattler's runtime.

Prints the build log on stdout and, on success, writes the list of built packages as
JSON to ``--result``. Exit status 1 means the recipe failed; the last lines say why.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.fsutil import atomic_write_json


class LogPrinter:
    """rattler-build progress callback: every log event becomes a line of the build log."""

    def on_log(self, event) -> None:
        prefix = {"error": "error: ", "warn": "warning: "}.get(event.level, "")
        for line in str(event.message).splitlines() or [""]:
            print(f"{prefix}{line}" if line.strip() else line, flush=True)

    def on_build_step(self, event) -> None:
        print(f"== {event.step_name}: {event.message}", flush=True)

    def on_download_start(self, event) -> None:
        print(f"downloading {event.url}", flush=True)


def build(recipe: Path, output_dir: Path, channels: list[str], package_format: str) -> list[dict]:
    from rattler_build import Stage0Recipe, ToolConfiguration

    parsed = Stage0Recipe.from_file(recipe)
    results = parsed.run_build(
        output_dir=output_dir,
        channels=channels,
        package_format=package_format,
        progress_callback=LogPrinter(),
        # Run the recipe's own tests; strict priority keeps internal packages first.
        tool_config=ToolConfiguration(test_strategy="native", channel_priority="strict"),
    )
    return [
        {"path": str(path), "name": result.name, "version": result.version,
         "build": result.build_string, "subdir": result.platform}
        for result in results for path in result.packages
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--channel", action="append", default=[])
    parser.add_argument("--package-format", default="conda")
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        packages = build(args.recipe, args.output_dir, args.channel, args.package_format)
    except Exception as exc:  # rattler-build raises its own exception family
        print(f"error: {type(exc).__name__}: {exc}", flush=True)
        return 1
    atomic_write_json(args.result, packages)  # a run cut short leaves no half a list
    return 0


if __name__ == "__main__":
    sys.exit(main())
