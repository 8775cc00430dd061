"""``select``: choose taps from sweep (and property) results under a budget; write a preset.

The preset file is taken by ``--taps`` of ``extract`` and ``eval`` and by the ``settings`` of
a training config. ``--architecture MODEL`` writes instead the study's measurement-free rules
applied to the architecture alone (the recipe of the shipped ``@<model>-study-rules``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from . import app, console, fail, user_errors


@app.command("select")
def select(
    sweep: Annotated[
        Path | None,
        typer.Argument(help="sweep.json of the study's sweep (or the folder holding it)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Preset file to write (.yaml or .json).")
    ] = None,
    properties: Annotated[
        Path | None,
        typer.Option("--properties", help="properties.json of the property probes (optional)."),
    ] = None,
    max_taps: Annotated[
        int | None, typer.Option("--max-taps", help="Budget: at most K taps.")
    ] = None,
    max_channels: Annotated[
        int | None, typer.Option("--max-channels", help="Budget: at most C channels in all.")
    ] = None,
    metric: Annotated[
        str, typer.Option("--metric", help="Score: pck_bbox (default) or pck_img.")
    ] = "pck_bbox",
    rule: Annotated[
        str,
        typer.Option(
            "--rule",
            help="greedy (best PCK first, near-duplicates skipped) or study (locality, "
            "redundancy and noise rules first, then greedy).",
        ),
    ] = "greedy",
    step: Annotated[
        int | None, typer.Option("--step", help="Score every tap at this step (default: best).")
    ] = None,
    redundancy: Annotated[
        float,
        typer.Option("--redundancy", help="Granularity similarity that marks near-duplicates."),
    ] = 0.9,
    max_locality: Annotated[
        float | None,
        typer.Option("--max-locality", help="Drop taps whose measured locality exceeds this."),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Preset name (default: the file's stem).")
    ] = None,
    description: Annotated[
        str | None, typer.Option("--description", help="How it was obtained (default: built).")
    ] = None,
    architecture: Annotated[
        str | None,
        typer.Option(
            "--architecture",
            help="Instead of a sweep: the study's locality rule on MODEL's architecture alone "
            "(no weights, no ranking, no budget).",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing preset file.")
    ] = False,
) -> None:
    """Choose taps from a sweep under a budget and write them as a preset file.

    Example: hyperfeatures select runs/sweep/sweep.json --properties runs/probe/properties.json
    --rule study --max-taps 8 --out sd15-top8.yaml; then: hyperfeatures extract IMAGES
    --model sd15 --taps sd15-top8.yaml
    """
    from ..presets import PRESET_SUFFIXES
    from ..presets.derive import write_shipped_preset
    from ..study.selection import select_taps, write_preset

    if out is None:
        fail("give the preset file to write with --out PRESET.yaml")
    assert out is not None
    if not out.name.lower().endswith(PRESET_SUFFIXES):
        fail(f"--out {out}: name the preset .yaml, .yml or .json so that --taps takes it")
    if out.exists() and not overwrite:
        fail(f"{out} already exists; pass --overwrite to replace it")
    if (sweep is None) == (architecture is None):
        fail("give a sweep file (SWEEP.json) or --architecture MODEL, not both or neither")
    preset_name = name or out.name.rsplit(".", 1)[0]
    with user_errors():
        if architecture is not None:
            given = {"--properties": properties, "--max-taps": max_taps, "--step": step}
            given["--max-channels"] = max_channels
            extra = [flag for flag, value in given.items() if value is not None]
            if extra:
                fail(f"{', '.join(extra)}: --architecture ranks nothing; give a sweep file")
            preset = write_shipped_preset(architecture, out, name=preset_name)
            console.print(escape(preset.description), highlight=False)
            console.print(f"wrote {escape(str(out))} (use: --taps {escape(str(out))})")
            return
        assert sweep is not None
        selection = select_taps(
            sweep,
            properties,
            max_taps=max_taps,
            max_channels=max_channels,
            metric=metric,
            step=step,
            rule=rule,
            redundancy=redundancy,
            max_locality=max_locality,
        )
        write_preset(selection, out, name=preset_name, description=description)
    ranked = sorted(selection.taps, key=lambda t: -selection.scores[t])
    console.print(
        f"selected {len(ranked)} taps of {escape(selection.model)} ({selection.rule} rule, "
        f"{metric}):",
        highlight=False,
    )
    width = max(len(t) for t in ranked)
    header = f"  {'#':>2}  {'tap':<{width}}  {'kind':<11} {'size':>7} {'ch':>5} {metric:>8} step"
    console.print(header, highlight=False)
    for i, tap in enumerate(ranked, 1):
        h, w = selection.sizes[tap]
        console.print(
            f"  {i:>2}  {escape(tap):<{width}}  {selection.kinds[tap]:<11} {f'{h}x{w}':>7} "
            f"{selection.channels[tap]:>5} {selection.scores[tap]:>8.2f} "
            f"{selection.steps[tap]:>4}",
            highlight=False,
        )
    used = [f"{len(ranked)}/{max_taps} taps" if max_taps else f"{len(ranked)} taps"]
    total = selection.total_channels
    used.append(f"{total}/{max_channels} channels" if max_channels else f"{total} channels")
    console.print(f"budget used: {', '.join(used)}", highlight=False)
    reasons = Counter(r.split(":", 1)[0] for r in selection.excluded.values())
    if reasons:
        listed = ", ".join(f"{n} {k}" for k, n in reasons.most_common())
        console.print(f"excluded {sum(reasons.values())} taps: {listed}", highlight=False)
    for note in selection.notes:
        console.print(f"note: {escape(note)}", highlight=False)
    console.print(f"wrote {escape(str(out))} (use: --taps {escape(str(out))})")
